"""Benchmark the EP core: training s/epoch (T1, T2, β, batch) and inference images/s (T and converged T).

Prints first a "run" line (the exact command, the device, torch and thread count), then one JSON line per
measurement: device, date, command, impl, what, value (the median of --repeat runs), values, unit and settings.
GPU: `python bench/bench_ep.py` (the paper net, batch 128, T1=250, T2=30, β=0.5; add --dtype fp16 --compile).
CPU: `python bench/bench_ep.py --small` (ep-cnn-small, short phases, a few batches).
Random weights and random images: the step cost does not depend on them, but the *converged* T does
(a trained net needs more steps than a random one), so that line is a lower bound on steps.

--reference also times, in the same process on the same device, thread count, batch, weights, T1/T2/β, a
reference-style implementation (`RefStyleEP`, below: the approach of Laborieux et al. 2021, also used by
lanl/AdvEP — re-implemented here, not copied): the dynamics are `torch.autograd.grad` of Φ at every step, fp32,
NCHW, the input conv recomputed every step, a host-built `torch.tensor([1.]*B)` as grad_outputs every step,
free / +β / −β phases one after the other, the weight update by autograd of
[Φ^{−β}(s^−) − Φ^{+β}(s^+)]/(2β).
It first checks that both compute the same numbers: in float64 on a sub-batch (--check-images), sync
relaxation, the free / +β / −β states, logits and weight gradients (asserted, --atol); and in the timed precision
the free phase step by step (reported: in fp32 a 1-ulp difference between the two conv implementations
eventually flips a near-tie max-pool arg-max, after which the trajectories differ by ~1e-3..1e-2). Then it emits
impl="epcli" / impl="reference-style" lines and the ratio (reference time / epcli time; > 1: epcli is faster);
each repeat times epcli then the reference. Use --update sync: the reference is synchronous. On CUDA the
reference runs after epcli's accelerate() has set cudnn.benchmark (TF32 convs are PyTorch's default anyway).
"""

import argparse
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epcli.ep import EPCNN  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class RefStyleEP(nn.Module):
    """The reference approach for an EPCNN's conv stack with a CE read-out outside Φ, on a copy of its weights.

    Φ^β(x, s) = Σ_l <s_l, P_l(conv_l(s_{l-1}))> − β·CE(W_o vec(s_N) + b_o, y), per sample, s_0 = normalised x.
    One step: s ← σ(∂Φ^β/∂s) for all layers at once, ∂Φ/∂s by autograd. Plain fp32 NCHW modules.
    """

    def __init__(self, model: EPCNN):
        super().__init__()
        if model.fcs or model.out is None:
            raise ValueError("reference-style mode covers conv stacks with the CE read-out (no hidden fc layers)")
        self.convs = nn.ModuleList()
        for conv in model.convs:
            c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
            with torch.no_grad():
                c.weight.copy_(conv.weight.detach().float().contiguous())
                c.bias.copy_(conv.bias.detach().float())
            self.convs.append(c)
        self.out = nn.Linear(model.out.in_features, model.out.out_features)
        with torch.no_grad():
            self.out.weight.copy_(model.out.weight.detach().float())
            self.out.bias.copy_(model.out.bias.detach().float())
        self.pools = [{"m": nn.MaxPool2d(2), "a": nn.AvgPool2d(2), "i": nn.Identity()}[p] for p in model.pools]
        self.act, self.shapes = model.act, model.shapes
        self.register_buffer("mean", model.mean.detach().float().clone())
        self.register_buffer("std", model.std.detach().float().clone())
        self.to(model.mean.device)

    def params(self):
        return [p for m in [*self.convs, self.out] for p in m.parameters()]

    def phi(self, xn, s, beta, y):
        prev, total = xn, 0.0
        for conv, pool, sl in zip(self.convs, self.pools, s):  # the input conv is recomputed at every call
            total = total + (sl * pool(conv(prev))).sum(dim=(1, 2, 3))
            prev = sl
        if beta != 0.0:
            total = total - beta * F.cross_entropy(self.out(s[-1].flatten(1)), y, reduction="none")
        return total

    def relax(self, xn, y, s, T, beta):
        B = xn.shape[0]
        s = [t.detach().requires_grad_() for t in s]
        for _ in range(T):
            phi = self.phi(xn, s, beta, y)
            # grad_outputs built from a Python list at every step (a host->device copy, a sync on CUDA)
            ones = torch.tensor([1.0 for _ in range(B)], dtype=xn.dtype, device=xn.device)
            grads = torch.autograd.grad(phi, s, grad_outputs=ones)
            s = [self.act(g).detach().requires_grad_() for g in grads]
        return s

    def zeros(self, B, device):
        return [torch.zeros(B, *shape, device=device, dtype=self.mean.dtype) for shape in self.shapes]

    def logits(self, s):
        return self.out(s[-1].flatten(1))

    def train_step(self, x, y, T1, T2, beta):
        """Free (T1), +β (T2 from the free state), −β (T2 from the free state), then autograd of ΔΦ/(2β) into
        .grad. Returns the three end states and the free-phase logits (detached)."""
        xn = (x - self.mean) / self.std  # normalised once per batch, like a data transform
        s0 = self.relax(xn, y, self.zeros(x.shape[0], x.device), T1, 0.0)
        logits = self.logits(s0).detach()
        sp = self.relax(xn, y, s0, T2, beta)
        sm = self.relax(xn, y, s0, T2, -beta)
        dphi = (self.phi(xn, sm, -beta, y).mean() - self.phi(xn, sp, beta, y).mean()) / (2 * beta)
        dphi.backward()
        return s0, sp, sm, logits

    def predict(self, x, T):
        xn = (x - self.mean) / self.std
        s = self.relax(xn, None, self.zeros(x.shape[0], x.device), T, 0.0)
        return self.logits(s).detach()


def peak_mib(dev) -> float:
    """Peak memory so far: CUDA memory allocated (since the last reset) on CUDA, the process's max RSS on CPU."""
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def max_diff(a, b):
    return max(float((u.detach().double() - v.detach().double()).abs().max()) for u, v in zip(a, b))


def agreement(model: EPCNN, x, y, T1, T2, beta, dtype=torch.float64):
    """Run both implementations on copies of `model` in `dtype` (sync relaxation, symmetric EP) and return the
    max |epcli − reference| of the free, +β and −β states and the free logits, and the max relative difference
    of the weight gradients (max |Δgrad| / max |grad| over the tensors)."""
    m = EPCNN.from_spec(model.spec).to(x.device)
    m.load_state_dict(model.state_dict())
    m = m.to(dtype)
    ref = RefStyleEP(m).to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        s0, _ = m.relax(x, T1, update="sync")
        lg = m.logits(s0)
        sp, _ = m.relax(x, T2, beta, y, states=s0, update="sync")
        sm, _ = m.relax(x, T2, -beta, y, states=s0, update="sync")
    m.ep_train_step(x, y, T1, T2, beta, "symmetric", update="sync")
    g_ep = [p.grad for g in m.layer_param_groups() for p in g]
    r0, rp, rm, rl = ref.train_step(x, y, T1, T2, beta)
    g_ref = [p.grad for p in ref.params()]
    return dict(states_free=max_diff(s0, r0), states_plus=max_diff(sp, rp), states_minus=max_diff(sm, rm),
                logits=max_diff([lg], [rl]),
                grad_rel=max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                             for a, b in zip(g_ep, g_ref)))


def fp32_trajectory(model: EPCNN, ref: RefStyleEP, x, T, atol=1e-5):
    """The free phase of both in the run's own precision, step by step: (steps during which every state agrees
    to `atol`, max |Δstate| after T steps, max |Δlogit| after T steps). A 1-ulp difference between the two conv
    implementations eventually flips a max-pool arg-max on a near-tie (a discontinuity of the dynamics), after
    which the trajectories differ by ~1e-3..1e-2 although the mathematics is the same (see the fp64 check)."""
    xn = ((x - ref.mean) / ref.std).float()
    s, r, within = model.zero_states(x.shape[0], x.device), ref.zeros(x.shape[0], x.device), None
    for t in range(1, T + 1):
        with torch.no_grad():
            s, _ = model.relax(x, 1, states=s, update="sync")
        r = [v.detach() for v in ref.relax(xn, None, r, 1, 0.0)]
        if within is None and max_diff(s, r) > atol:
            within = t - 1
    with torch.no_grad():
        dl = max_diff([model.logits(s)], [ref.logits(r)])
    return (T if within is None else within), max_diff(s, r), dl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized run: ep-cnn-small, T1=30, T2=10, batch 64")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--T1", type=int, default=None)
    p.add_argument("--T2", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--rule", default="symmetric")
    p.add_argument("--update", choices=["sync", "alternate"], default=None,
                   help="relaxation: synchronous (the paper) or alternating even/odd sweeps (default: the preset's)")
    p.add_argument("--iters", type=int, default=None, help="timed training batches (after 1 warm-up)")
    p.add_argument("--repeat", type=int, default=1, help="repeat each timing; value = median, values = all")
    p.add_argument("--epoch-images", type=int, default=None, help="images per epoch (50k; 5k with --small)")
    p.add_argument("--tol", type=float, default=1e-3, help="convergence tolerance for the converged-T line")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="relaxation precision (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the relaxation step (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a shared box)")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference-style implementation (autograd-of-Φ dynamics) in this run, "
                        "after checking both agree numerically; emits the ratio")
    p.add_argument("--atol", type=float, default=1e-9,
                   help="--reference: max allowed difference in the float64 agreement check")
    p.add_argument("--check-images", type=int, default=16, help="--reference: images in the agreement check")
    p.add_argument("--no-converged", action="store_true", help="skip the converged-T inference line")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    small = a.small
    preset = a.preset or ("ep-cnn-small" if small else "ep-cnn")
    B = a.batch or (64 if small else 128)
    T1, T2 = a.T1 or (30 if small else 250), a.T2 or (10 if small else 30)
    iters = a.iters or (3 if small else 20)
    epoch_images = a.epoch_images or (5000 if small else 50000)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = EPCNN.preset(preset, **({"update": a.update} if a.update else {})).to(dev)
    ref = RefStyleEP(model) if a.reference else None  # fp32 NCHW copy, taken before accelerate()
    model.accelerate(DTYPES[a.dtype], channels_last=True, compile=a.compile)  # no-op on CPU
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    command = " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv])
    base = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=command, torch=torch.__version__, preset=preset, batch=B)
    settings = dict(dtype=a.dtype, compile=a.compile, update=model.update)

    def emit(**kw):
        print(json.dumps({**base, **kw}), flush=True)

    emit(what="run", cuda=torch.version.cuda, threads=torch.get_num_threads(), cpu=platform.processor() or None,
         reference=a.reference, repeat=a.repeat, **settings)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    x = torch.rand(B, 3, 32, 32, device=dev)
    y = torch.randint(0, model.num_classes, (B,), device=dev)

    if ref is not None:  # the same mathematics? (on a sub-batch: with a fixed T a sample's states do not
        nb = min(B, a.check_images)  # depend on its batch-mates)
        d = agreement(model, x[:nb], y[:nb], T1, T2, a.beta)
        ok = max(d.values()) <= a.atol
        within, ds, dl = fp32_trajectory(model, ref, x[:nb], T1)
        emit(what="agreement", impl="epcli vs reference-style", update="sync", T1=T1, T2=T2, beta=a.beta,
             images=nb, fp64_atol=a.atol, ok=ok, **{f"fp64_{k}": float(f"{v:.3g}") for k, v in d.items()},
             run_dtype=a.dtype, steps_within_1e_5=within, T1_state_diff=float(f"{ds:.3g}"),
             T1_logit_diff=float(f"{dl:.3g}"),
             note="fp64_*: max |difference| over free/+β/−β states, logits, and max |Δgrad|/max |grad| of the "
                  "symmetric EP update (asserted); run_dtype: free phase step by step in the timed precision, "
                  "steps until a near-tie max-pool arg-max flips (then ~1e-3..1e-2 apart)")
        assert ok, f"epcli and the reference-style implementation disagree in float64: {d}"

    def time_it(fn, n):
        fn()  # warm-up (cudnn autotune, compile)
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n

    def epcli_train():
        model.zero_grad(set_to_none=True)
        model.ep_train_step(x, y, T1, T2, a.beta, a.rule)

    def ref_train():
        ref.zero_grad(set_to_none=True)
        ref.train_step(x, y, T1, T2, a.beta)

    n_inf = max(1, iters // 2)
    impls = [("epcli", epcli_train, lambda: model(x, T=T1))]
    if ref is not None:
        if a.rule != "symmetric":
            raise SystemExit("--reference times the symmetric rule (the reference's --thirdphase)")
        impls.append(("reference-style", ref_train, lambda: ref.predict(x, T1)))
    res = {(n, w): [] for n, _, _ in impls for w in ("train", "infer")}
    peak = {}  # MiB: CUDA memory allocated at the peak of each implementation's timings (CPU: process max RSS)
    for _ in range(a.repeat):  # interleaved, so that a load change on a shared box hits both
        for n, train, infer in impls:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            res[n, "train"].append(time_it(train, iters))
            with torch.no_grad() if n == "epcli" else torch.enable_grad():
                res[n, "infer"].append(time_it(infer, n_inf))
            peak[n] = max(peak.get(n, 0.0), peak_mib(dev))
    batches = math.ceil(epoch_images / B)
    med = {k: statistics.median(v) for k, v in res.items()}
    for n, _, _ in impls:
        extra = settings if n == "epcli" else dict(dtype="fp32", compile=False, update="sync", layout="NCHW")
        emit(impl=n, what="train", value=round(med[n, "train"] * batches, 2), unit="s/epoch",
             values=[round(v * batches, 2) for v in res[n, "train"]], s_per_batch=round(med[n, "train"], 4),
             T1=T1, T2=T2, beta=a.beta, rule=a.rule, epoch_images=epoch_images, iters=iters, **extra,
             peak_mib=peak[n], peak_memory="cuda max allocated" if dev.type == "cuda" else "process max RSS",
             note="training only (no test pass, no data loading)")
        emit(impl=n, what="inference", value=round(B / med[n, "infer"], 1), unit="images/s",
             values=[round(B / v, 1) for v in res[n, "infer"]], T=T1, converged=False, **extra)
    if ref is not None:
        for w, unit in (("train", "s/epoch"), ("inference", "images/s")):
            k = "train" if w == "train" else "infer"
            emit(what=f"{w} ratio", value=round(med["reference-style", k] / med["epcli", k], 2),
                 unit="reference-style time / epcli time", per_repeat=[
                     round(r / e, 2) for r, e in zip(res["reference-style", k], res["epcli", k])],
                 **settings, note="same process, device, threads, batch, weights, T1/T2/β"
                 + ("" if model.update == "sync" else "; epcli ran alternate sweeps, the reference sync steps"))

    if a.no_converged:
        return
    with torch.no_grad():  # epcli only: the reference has no convergence test
        _, conv_T = model.relax(x, max(T1, 250), tol=a.tol)
        vals = [B / time_it(lambda: model(x, T=conv_T), n_inf) for _ in range(a.repeat)]
        emit(impl="epcli", what="inference", value=round(statistics.median(vals), 1), unit="images/s",
             values=[round(v, 1) for v in vals], T=conv_T, converged=True, tol=a.tol, **settings)


if __name__ == "__main__":
    main()
