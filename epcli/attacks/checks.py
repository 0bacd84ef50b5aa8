"""Reliability checks over evaluate() results for one model (in the spirit of AutoAttack's flags and
Carlini et al. 2019 "On evaluating adversarial robustness").

Each check is a dict(check, passed, detail, result) where `result` is the index of the evaluate() result
it concerns (None when it concerns several). A result that fails a check gets `unreliable`: a list of
reasons, added to that result dict.
"""

from __future__ import annotations

import math

import torch

from epcli.attacks import BLACK_BOX, WHITE_BOX
from epcli.attacks._common import check_norm

# an eps this large should break (almost) any model that is not masking gradients
LARGE_EPS = {"linf": 0.3, "l2": 8.0}
LARGE_EPS_MAX_ROBUST = 0.10


def _slack(p: float, n: int) -> float:
    """Statistical slack for comparing accuracies on n examples: two binomial standard errors, >= 1/n."""
    if n <= 0:
        return 0.0
    return max(1.0 / n, 2.0 * math.sqrt(max(p * (1 - p), 0.0) / n))


def _mark(results, i, reason):
    results[i].setdefault("unreliable", []).append(reason)


def check_reliability(results: list[dict], strength: list[dict] | None = None) -> list[dict]:
    """Run the checks on a list of evaluate() results for one model (plus optional strength_check outputs).

    - monotone: robust accuracy never rises with eps (beyond statistical slack);
    - large-eps: at eps >= LARGE_EPS[norm] (only when such an eps was run) robust accuracy <= 10%;
    - white-vs-black: on the same points, norm and eps, a white-box attack is not weaker than Square
      (Square breaking points a white-box attack left robust is a classic sign of gradient masking);
    - strength: the outputs of strength_check (more steps/restarts must not change the verdict).
    """
    checks = []
    for i, r in enumerate(results):
        eps = sorted(r["robust_accuracy"])
        acc = [r["robust_accuracy"][e] for e in eps]
        bad = [(eps[k], eps[k + 1]) for k in range(len(eps) - 1) if acc[k + 1] > acc[k] + _slack(acc[k], r["n"])]
        detail = (f"{r['attack']} {r['norm']}: robust accuracy " +
                  ", ".join(f"{e:g}:{a:.3f}" for e, a in zip(eps, acc)))
        checks.append({"check": "monotone", "passed": not bad, "result": i,
                       "detail": detail + (f"; rises between eps {bad}" if bad else "")})
        if bad:
            _mark(results, i, f"robust accuracy rises with eps between {bad}")
        big = [e for e in eps if e >= LARGE_EPS[check_norm(r["norm"])]]
        if big and r["attack"] in WHITE_BOX:
            worst = max(r["robust_accuracy"][e] for e in big)
            ok = worst <= LARGE_EPS_MAX_ROBUST
            checks.append({"check": "large-eps", "passed": ok, "result": i,
                           "detail": f"{r['attack']} {r['norm']} at eps {big}: max robust accuracy {worst:.3f} "
                                     f"(expected <= {LARGE_EPS_MAX_ROBUST})"})
            if not ok:
                _mark(results, i, f"robust accuracy {worst:.3f} at large eps {big}: attack too weak or "
                                  "gradients masked")
    for j, bb in enumerate(results):
        if bb["attack"] not in BLACK_BOX:
            continue
        for i, wb in enumerate(results):
            if wb["attack"] not in WHITE_BOX or wb["norm"] != bb["norm"]:
                continue
            m = min(wb["n"], bb["n"])
            if m == 0 or not torch.equal(wb["y"][:m], bb["y"][:m]):
                continue
            for e in sorted(set(wb["robust"]) & set(bb["robust"])):
                w, b = wb["robust"][e][:m], bb["robust"][e][:m]
                only_black = int((w & ~b).sum())
                wa, ba = float(w.float().mean()), float(b.float().mean())
                ok = wa <= ba + _slack(ba, m) and only_black <= max(1, round(0.01 * m))
                checks.append({"check": "white-vs-black", "passed": ok, "result": i,
                               "detail": f"{wb['attack']} vs square, {wb['norm']} eps {e:g} on {m} points: "
                                         f"robust {wa:.3f} vs {ba:.3f}; {only_black} points broken only by "
                                         "square"})
                if not ok:
                    _mark(results, i, f"square beats {wb['attack']} at eps {e:g} ({ba:.3f} < {wa:.3f}, "
                                      f"{only_black} points): gradient masking suspected")
    for s in strength or []:
        checks.append(dict(s))
    return checks


def strength_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                   steps: int = 20, restarts: int = 1, n: int = 200, factor: int = 2, tolerance: float = 0.02,
                   seed: int = 0, device="cpu", grad_mode: str = "bptt", surrogate=None,
                   batch_size: int = 256, labels: str = "true", on_step=None) -> dict:
    """Re-run PGD on the first n examples with factor x steps and factor x restarts (random starts) and
    compare with the base PGD (steps, restarts). Passes when the stronger attack neither raises robust
    accuracy (beyond slack) nor lowers it by more than `tolerance` (the base attack had not converged).
    on_step: evaluate()'s progress callback, its info tagged with phase "base" or "strong"."""
    from epcli.attacks.evaluate import evaluate
    xs, ys = x[:n], y[:n]
    common = dict(attack="pgd", norm=norm, eps_list=[eps], batch_size=batch_size, device=device, seed=seed,
                  grad_mode=grad_mode, surrogate=surrogate, labels=labels, keep_adv=0)
    tag = (lambda phase: (lambda info: on_step({**info, "phase": phase}))) if on_step else (lambda phase: None)
    base = evaluate(model, xs, ys, params={"steps": steps, "restarts": restarts}, on_step=tag("base"), **common)
    strong = evaluate(model, xs, ys, params={"steps": factor * steps, "restarts": factor * max(restarts, 1),
                                             "random_start": True}, on_step=tag("strong"), **common)
    a, b = base["robust_accuracy"][float(eps)], strong["robust_accuracy"][float(eps)]
    m = len(ys)
    ok = b <= a + _slack(a, m) and a - b <= tolerance
    return {"check": "strength", "passed": ok, "result": None,
            "detail": f"PGD-{steps}x{restarts} robust {a:.3f} vs PGD-{factor * steps}x{factor * max(restarts, 1)} "
                      f"(random starts) {b:.3f} on {m} points, {norm} eps {eps:g}, grad {grad_mode}",
            "base": a, "strong": b}
