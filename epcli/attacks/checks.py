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


ALPHA = 0.01  # significance level of the paired tests below


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the discordant pairs are Binomial(only_a + only_b, 1/2) under H0."""
    return min(1.0, 2 * more_p(max(only_a, only_b), min(only_a, only_b))) if only_a + only_b else 1.0


def more_p(k: int, other: int) -> float:
    """One-sided exact McNemar: P(X >= k), X ~ Binomial(k + other, 1/2). Small when the k side of the
    discordant pairs is significantly larger (one image alone is never significant: p(1, 0) = 0.5)."""
    n = k + other
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def _mark(results, i, reason):
    results[i].setdefault("unreliable", []).append(reason)


def check_reliability(results: list[dict], strength: list[dict] | None = None, alpha: float = ALPHA) -> list[dict]:
    """Run the checks on a list of evaluate() results for one model (plus optional strength_check outputs).

    - monotone: robust accuracy never rises with eps (beyond statistical slack);
    - large-eps: at eps >= LARGE_EPS[norm] (only when such an eps was run) robust accuracy <= 10%;
    - white-vs-black: on the same points, norm and eps, Square does not break significantly more points than
      a white-box attack (paired one-sided McNemar at `alpha`); when it does, the other white-box results
      in the list tell a weak attack (they already break those points) from gradient masking (nothing
      gradient-based does) — see white_vs_black;
    - strength: the outputs of strength_check (more steps/restarts must not break significantly more points).
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

    def same_points(a, b):
        m = min(a["n"], b["n"])
        return m if m and torch.equal(a["y"][:m], b["y"][:m]) else 0

    for j, bb in enumerate(results):
        if bb["attack"] not in BLACK_BOX:
            continue
        for i, wb in enumerate(results):
            if wb["attack"] not in WHITE_BOX or wb["norm"] != bb["norm"]:
                continue
            m = same_points(wb, bb)
            if not m:
                continue
            cut = lambda r: {**r, "robust": {e: v[:m] for e, v in r["robust"].items()}}  # noqa: E731
            others = [cut(o) for k, o in enumerate(results) if k != i and o["attack"] in WHITE_BOX
                      and o["norm"] == wb["norm"] and same_points(o, wb) >= m]
            for c in white_vs_black(cut(wb), cut(bb), others, alpha):
                checks.append({**c, "result": i})
                if not c["passed"]:
                    _mark(results, i, c["reason"])
    for s in strength or []:
        checks.append(dict(s))
    return checks


def white_vs_black(wb: dict, bb: dict, others: list[dict] = (), alpha: float = ALPHA) -> list[dict]:
    """White-box result `wb` vs black-box result `bb` on the same points (robust masks aligned), per shared eps.

    Passes unless the black-box attack breaks significantly more of the points than the white-box one (exact
    one-sided McNemar on the discordant points, p < alpha). On a failure the points broken only by the black
    box are looked up in `others` (other white-box results, same points): when, counting the points they
    break, the white-box side is no longer significantly weaker, the verdict is "weak-attack" (a stronger
    gradient attack already breaks them); otherwise "masking-suspected" (no gradient attack breaks them).
    Each dict: check, passed, verdict, detail, reason, counts.
    """
    out = []
    for e in sorted(set(wb["robust"]) & set(bb["robust"])):
        w, b = wb["robust"][e].bool(), bb["robust"][e].bool()
        m = len(w)
        only_black, only_white = int((w & ~b).sum()), int((~w & b).sum())
        p = more_p(only_black, only_white)
        head = (f"{wb['attack']} vs {bb['attack']}, {wb['norm']} eps {e:g} on {m} points: robust "
                f"{float(w.float().mean()):.3f} vs {float(b.float().mean()):.3f}; broken only by {bb['attack']} "
                f"{only_black}, only by {wb['attack']} {only_white} (one-sided McNemar p={p:.3g})")
        c = {"check": "white-vs-black", "passed": True, "verdict": "ok", "detail": head, "reason": "",
             "only_black": only_black, "only_white": only_white, "p": p}
        if p < alpha:
            broken_elsewhere = torch.zeros_like(w)
            names = []
            for o in others:
                if e in o["robust"]:
                    hit = ~o["robust"][e].bool() & w & ~b
                    if hit.any():
                        names.append(f"{o['attack']} ({int(hit.sum())})")
                    broken_elsewhere |= ~o["robust"][e].bool()
            wu = w & ~broken_elsewhere
            left, p2 = int((wu & ~b).sum()), more_p(int((wu & ~b).sum()), int((~wu & b).sum()))
            weak = p2 >= alpha
            c.update(passed=False, verdict="weak-attack" if weak else "masking-suspected", p_union=p2,
                     left=left)
            if weak:
                c["reason"] = (f"{bb['attack']} beats {wb['attack']} at eps {e:g}, but white-box attacks "
                               f"{', '.join(names)} already break {only_black - left} of its {only_black} points: "
                               f"{wb['attack']} is a weak attack here, not evidence of gradient masking")
            else:
                c["reason"] = (f"{bb['attack']} beats {wb['attack']} at eps {e:g} on {only_black} points and "
                               f"{left} of them resist every white-box attack run on them"
                               f"{' (' + ', '.join(names) + ' break some)' if names else ''}: gradient masking "
                               "suspected")
            c["detail"] = head + f"; {c['verdict']}: {c['reason']}"
        out.append(c)
    return out


def strength_check(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                   steps: int = 20, restarts: int = 1, n: int = 500, factor: int = 2, alpha: float = ALPHA,
                   seed: int = 0, device="cpu", grad_mode: str = "bptt", surrogate=None,
                   batch_size: int = 256, labels: str = "true", params: dict | None = None,
                   base_robust: torch.Tensor | None = None, on_step=None) -> dict:
    """Re-run PGD on the first n examples with factor x steps and factor x restarts (random starts) and
    compare with the base PGD (steps, restarts) point by point. Fails when the stronger attack breaks
    significantly more points than it leaves (exact one-sided McNemar on the discordant points, p < alpha):
    the base attack had not converged. base_robust: the base attack's per-example outcome on these points
    when already known (it is then not re-run). params: other PGD parameters shared by both runs.
    on_step: evaluate()'s progress callback, its info tagged with phase "base" or "strong"."""
    from epcli.attacks.evaluate import evaluate
    xs, ys = x[:n], y[:n]
    m = len(ys)
    extra = {k: v for k, v in (params or {}).items() if k not in ("steps", "restarts", "random_start")}
    common = dict(attack="pgd", norm=norm, eps_list=[eps], batch_size=batch_size, device=device, seed=seed,
                  grad_mode=grad_mode, surrogate=surrogate, labels=labels, keep_adv=0)
    tag = (lambda phase: (lambda info: on_step({**info, "phase": phase}))) if on_step else (lambda phase: None)
    if base_robust is None:
        base_robust = evaluate(model, xs, ys, params={**extra, "steps": steps, "restarts": restarts},
                               on_step=tag("base"), **common)["robust"][float(eps)]
    base_robust = base_robust[:m].bool().cpu()
    strong = evaluate(model, xs, ys, params={**extra, "steps": factor * steps, "restarts": factor * max(restarts, 1),
                                             "random_start": True}, on_step=tag("strong"),
                      **common)["robust"][float(eps)].bool().cpu()
    only_strong, only_base = int((base_robust & ~strong).sum()), int((~base_robust & strong).sum())
    p = more_p(only_strong, only_base)
    a, b = float(base_robust.float().mean()), float(strong.float().mean())
    ok = p >= alpha
    return {"check": "strength", "passed": ok, "result": None,
            "detail": f"PGD-{steps}x{restarts} robust {a:.3f} vs PGD-{factor * steps}x{factor * max(restarts, 1)} "
                      f"(random starts) {b:.3f} on {m} points, {norm} eps {eps:g}, grad {grad_mode}: broken only "
                      f"by the stronger {only_strong}, only by the base {only_base} (one-sided McNemar p={p:.3g}"
                      f"{'' if ok else f' < {alpha}: the base attack has not converged'})",
            "base": a, "strong": b, "only_strong": only_strong, "only_base": only_base, "p": p}
