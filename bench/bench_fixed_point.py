"""Steps to the fixed point and EP-update quality, per relaxation method (counts, not seconds: device-independent).

For a net (the demo's `ep-cnn-small` or the paper's `ep-cnn`, random or trained weights) and a batch of real test
images, each method — plain sync steps, plain alternating sweeps, Anderson mixing on either, and warm starts
(from the fixed point of another crop-flip of the same image: the training state bank; from the fixed point of
x + δ, ‖δ‖∞ = 2/255: the previous PGD iterate) — reports:

- steps to a relative residual (epcli.ep.relative_residual) of 1e-3 and 1e-5 (cap --cap): each image stops on
  its own, so mean (the work per image) and max (the slowest image);
- the symmetric EP update with both phases stopped at a tolerance τ, for τ in --taus: total steps used (free +
  nudged, per phase: per-image mean and max) and its cosine, per layer, with the true loss gradient at the fixed point
  (implicit differentiation at a converged state, i.e. BPTT run to convergence; --check-bptt also compares that
  reference with plain BPTT through the whole free phase).

Usage: python bench/bench_fixed_point.py --net small [--weights demo.pt] [--batch 32]
       python bench/bench_fixed_point.py --net paper --batch 4 --taus 1e-2,1e-3
One JSON line per measurement, then a markdown table. Threads: 1 by default (shared CPU box).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli.data import crop_flip, load_dataset  # noqa: E402
from epcli.ep import EPCNN  # noqa: E402

METHODS = [  # name, update, solver, warm start
    ("plain-sync", "sync", "plain", None), ("plain-alt", "alternate", "plain", None),
    ("anderson-sync", "sync", "anderson", None), ("anderson-alt", "alternate", "anderson", None),
    ("warm-aug-alt", "alternate", "plain", "aug"), ("warm-aug-anderson-alt", "alternate", "anderson", "aug"),
    ("warm-pgd-alt", "alternate", "plain", "pgd"), ("warm-pgd-anderson-alt", "alternate", "anderson", "pgd"),
]


def reference_grads(m, x, y, cap):
    """dL/dθ at the (converged) free fixed point: implicit differentiation (adjoint), read-out included."""
    params = [p for g in m.layer_param_groups() for p in g]
    m.grad_mode, m.implicit_tol, m.implicit_iters = "implicit", 1e-10, 4 * cap
    T, tol = m.T, m.tol
    m.T, m.tol = cap, 1e-9
    xr = x.clone().requires_grad_()
    loss = F.cross_entropy(m(xr), y)
    g = torch.autograd.grad(loss, params)
    m.T, m.tol, m.grad_mode = T, tol, "bptt"
    return g


def bptt_grads(m, x, y, T):
    params = [p for g in m.layer_param_groups() for p in g]
    with torch.enable_grad():
        s, _ = m.relax(x, T)
        return torch.autograd.grad(F.cross_entropy(m.logits(s), y), params)


def start_states(m, x, kind, update, gen):
    """The warm start: a fixed point of a related input (another crop-flip, or x + δ)."""
    if kind is None:
        return None
    if kind == "aug":
        xo = crop_flip(x, pad=4, pad_mode="edge", generator=gen)
    else:
        d = (torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1) * (2 / 255)
        xo = (x + d).clamp(0, 1)
    with torch.no_grad():
        return m.relax(xo, 1000, tol=1e-6, update=update)[0]


def ep_update(m, x, y, beta, tau, update, solver, init, cap, fixed=None):
    """The symmetric EP update with both phases stopped at tau (each image on its own), or with `fixed` =
    (T1, T2) steps and no tolerance (the paper's schedule)."""
    B = x.shape[0]
    (T1, T2), tau = (fixed, None) if fixed else ((cap, cap), tau)
    with torch.no_grad():
        s0, n1 = m.relax(x, T1, states=init, tol=tau, update=update, solver=solver)
        w1 = float(m.last_sample_steps.double().mean())
        betas = torch.full((2 * B,), beta)
        betas[B:] = -beta
        s2, n2 = m.relax(torch.cat([x, x]), T2, beta=betas, y=torch.cat([y, y]),
                         states=[torch.cat([t, t]) for t in s0], tol=tau, update=update, solver=solver)
        w2 = float(m.last_sample_steps.double().mean())
    g = m.ep_update(x, [t[:B] for t in s2], beta, [t[B:] for t in s2], -beta, y, 2 * beta)
    return g, (n1, w1), (n2, w2)


def cos(a, b):
    return float(F.cosine_similarity(a.detach().double().flatten(), b.detach().double().flatten(), 0))


def layer_cos(ga, gb, m):
    """Cosine per coupling, weight and bias together."""
    out, i = [], 0
    for grp in m.layer_param_groups():
        k = len(grp)
        out.append(cos(torch.cat([t.flatten() for t in ga[i:i + k]]), torch.cat([t.flatten() for t in gb[i:i + k]])))
        i += k
    return out


def compare_rules(m, x, y, cap=3000):
    """Which fixed point each relaxation rule reaches from zero, against the alternate one (docs/ep.md table)."""
    def dist(a, b):
        return torch.stack([((u - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-8))
                            for u, v in zip(a, b)]).amax(0)
    out, fp = {}, {}
    with torch.no_grad():
        for name, upd, sol in [("alternate", "alternate", "plain"), ("sync", "sync", "plain"),
                               ("anderson-sync", "sync", "anderson"), ("anderson-alt", "alternate", "anderson")]:
            steps = {}
            for tol in (1e-3, 1e-5):
                s, k = m.relax(x, cap, tol=tol, update=upd, solver=sol)
                steps[tol] = k if float(m.last_residual.max()) < tol else None
            fp[name] = s
            out[name] = {"steps_1e-3": steps[1e-3], "steps_1e-5": steps[1e-5],
                         "unconverged": int((m.last_residual > 1e-5).sum()),
                         "acc": float((m.logits(s).argmax(1) == y).float().mean())}
        s_T, _ = m.relax(x, m.T)
        fp[f"T={m.T}"], out[f"T={m.T}"] = s_T, {"residual_max": float(m.last_residual.max()),
                                               "residual_mean": float(m.last_residual.mean())}
        ref = fp["alternate"]
        for name, s in fp.items():
            d = dist(s, ref)
            out[name].update(dist_median=float(d.median()), dist_max=float(d.max()),
                             argmax_agree=float((m.logits(s).argmax(1) == m.logits(ref).argmax(1)).float().mean()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", choices=["small", "paper"], default="small")
    ap.add_argument("--weights", help="a state_dict (.pt) or epcli checkpoint (.safetensors) of the net")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--cap", type=int, default=1000)
    ap.add_argument("--taus", default="1e-2,1e-3,1e-4", help="'' : steps to the residuals only, no EP update")
    ap.add_argument("--methods", default=",".join(n for n, *_ in METHODS),
                    help="comma list; also 'fixed-250-30' (the paper's T1=250, T2=30 with no tolerance, in the net's "
                         "own update rule; EP columns only)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check-bptt", type=int, default=0, help="also BPTT through this many plain sync steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-rules", action="store_true",
                    help="only: which fixed point sync / alternate / Anderson reach from zero (cap 3000)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    m = EPCNN.preset("ep-cnn-small" if a.net == "small" else "ep-cnn")
    weights = "random"
    if a.weights:
        if a.weights.endswith(".safetensors"):
            from epcli import checkpoint
            m, _ = checkpoint.load(a.weights)
        else:
            m.load_state_dict(torch.load(a.weights))
        weights = Path(a.weights).name
    ds = load_dataset(None, cache_dir=str(Path.home() / ".cache" / "epcli-bench"))
    x, y = ds.test_x[:a.batch].float() / 255, ds.test_y[:a.batch]
    print(json.dumps({"what": "run", "argv": sys.argv, "net": m.name, "weights": weights, "batch": a.batch,
                      "threads": a.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d")}), flush=True)
    if a.compare_rules:
        print(json.dumps({"what": "rules", **compare_rules(m, x, y)}), flush=True)
        return
    taus = [float(t) for t in a.taus.split(",") if t]
    t0 = time.time()
    ref = reference_grads(m, x, y, a.cap) if taus else None
    print(json.dumps({"what": "reference", "seconds": round(time.time() - t0, 1)}), flush=True)
    if a.check_bptt:
        bp = bptt_grads(m, x, y, a.check_bptt)
        print(json.dumps({"what": "bptt-vs-reference", "T": a.check_bptt,
                          "cos": [round(c, 5) for c in layer_cos(bp, ref, m)]}), flush=True)
    rows = []
    wanted = a.methods.split(",")
    if "fixed-250-30" in wanted and taus:  # the paper's schedule (T1=250, T2=30, no tolerance), the net's own rule
        g, (n1, w1), (n2, w2) = ep_update(m, x, y, a.beta, None, m.update, "plain", None, a.cap, fixed=(250, 30))
        row = {"what": "method", "method": f"fixed-250-30-{m.update}", "steps_1e-3": None, "steps_1e-5": None,
               "mean_steps_1e-3": None, "mean_steps_1e-5": None,
               "ep": [{"tau": None, "free": n1, "nudged": n2, "free_mean": w1, "nudged_mean": w2,
                       "cos": [round(c, 4) for c in layer_cos(g, ref, m)]}] * len(taus)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for name, update, solver, warm in METHODS:
        if name not in wanted:
            continue
        gen = torch.Generator().manual_seed(a.seed + 1)
        init = start_states(m, x, warm, update, gen)
        steps = {}
        for tol in (1e-3, 1e-5):  # each image stops on its own: max = the slowest image, mean = the work per image
            with torch.no_grad():
                _, n = m.relax(x, a.cap, states=init, tol=tol, update=update, solver=solver)
            ok = float(m.last_residual.max()) < tol  # None: not reached within the cap
            steps[tol] = {"max": n if ok else None,
                          "mean": round(float(m.last_sample_steps.double().mean()), 1) if ok else None}
        row = {"what": "method", "method": name, "steps_1e-3": steps[1e-3]["max"], "steps_1e-5": steps[1e-5]["max"],
               "mean_steps_1e-3": steps[1e-3]["mean"], "mean_steps_1e-5": steps[1e-5]["mean"], "ep": []}
        for tau in taus:
            g, (n1, w1), (n2, w2) = ep_update(m, x, y, a.beta, tau, update, solver, init, a.cap)
            row["ep"].append({"tau": tau, "free": n1, "nudged": n2, "free_mean": round(w1, 1),
                              "nudged_mean": round(w2, 1), "cos": [round(c, 4) for c in layer_cos(g, ref, m)]})
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{m.name} ({weights}), {a.batch} test images, beta {a.beta}, cap {a.cap}\n")
    print("| method | steps to 1e-3, mean / max | to 1e-5, mean / max | " + " | ".join(
        f"τ={t:g}: mean steps free+nudged, min cos" for t in taus) + " |")
    print("|---" * (3 + len(taus)) + "|")
    for r in rows:
        cells = [f"{e['free_mean']:g}+{e['nudged_mean']:g}, {min(e['cos']):.3f}" for e in r["ep"]]
        print(f"| {r['method']} | {r['mean_steps_1e-3']} / {r['steps_1e-3']} | {r['mean_steps_1e-5']} / "
              f"{r['steps_1e-5']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
