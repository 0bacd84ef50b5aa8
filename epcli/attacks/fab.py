"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", https://arxiv.org/abs/1907.02044), L-inf and L2.

Per target class t, each step linearises the decision boundary z_t - z_y = 0 at the current point, projects
both the current point and the original image onto that hyperplane within the [0,1] box (minimal Lp
distance), and moves to a convex combination of the two projections (weight alpha <= alpha_max toward the
original, with overshoot eta). When the iterate is adversarial it is recorded if it has the smallest norm
so far and pulled back toward the original (factor beta). An example counts as broken when the smallest
adversarial perturbation has norm <= eps. The box-constrained projections are our own formulation (exact,
from the sorted kinks of a piecewise-linear function), not the reference's sorting algorithms. As in the
reference code
(fra31/auto-attack), the first run toward each target starts at the image itself (deterministic), and each
restart is a fresh run from a random point on the surface of the eps/2-ball, on the images not yet broken.
"""

from __future__ import annotations

import torch

from epcli.attacks._common import (check_counts, check_eps, check_inputs, check_norm, eval_mode, flat_norm,
                                   project, rand_like, runner_up_targets)
from epcli.errors import UsageError


def _view(t, like):
    return t.view(-1, *([1] * (like.dim() - 1)))


def project_hyperplane(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str):
    """Closest point (in Lp) to p on {z: <w, z> + b = 0} inside [0,1]^d, per example; when the plane does
    not meet the box, the box point closest to crossing it. Shapes: p, w (B, d); b (B,).

    Both norms move each pixel toward the plane until the box stops it: by t (L-inf: z_i = p_i +- t) or by
    lam * |w_i| (L2, the KKT form z = clip(p + s * lam * w)). Either way <w, z> changes by a piecewise-linear
    f(t) = sum_i slope_i * min(t, kink_i), solved exactly by `_first_reach`. A pixel with zero weight does
    not move: there the L-inf projection is not unique, and this is the reference's choice (moving it changed
    FAB's images by up to eps on a max-pool model)."""
    r = (w * p).sum(1) + b                      # current value; we need to bring it to 0
    s = torch.where(r > 0, -1.0, 1.0)[:, None]  # direction of change of <w, z>
    room = torch.where(s * w > 0, 1 - p, p).clamp_min(0)  # how far each pixel can move before the box stops it
    aw = w.abs()
    if norm == "linf":
        t = _first_reach(room, aw, r.abs(), cap=1.0)[:, None]
        moved = torch.where(s * w > 0, torch.minimum(p + t, torch.ones_like(p)),
                            torch.maximum(p - t, torch.zeros_like(p)))
        return torch.where(w == 0, p, moved)
    kink = torch.where(w == 0, torch.full_like(room, 1e30), room / aw.clamp_min(1e-30))
    lam = _first_reach(kink, aw * aw, r.abs(), cap=1e30)[:, None]
    return (p + s * lam * w).clamp(0, 1)


def _first_reach(kink: torch.Tensor, slope: torch.Tensor, need: torch.Tensor, cap: float) -> torch.Tensor:
    """Per row, the smallest t >= 0 with f(t) = sum_i slope_i * min(t, kink_i) >= need (cap when f never gets
    there). f is piecewise linear and concave: after sorting the kinks, f at each kink is the part of the pixels
    already stopped plus the kink times the slope of those still moving, and t is read off the segment where f
    first reaches `need`. Exact, and one sort instead of the bisection's 30 passes (and no host syncs)."""
    kink, order = kink.sort(1)
    slope = slope.gather(1, order)
    done = torch.cumsum(slope * kink, 1)                          # the stopped pixels' part, at each kink
    # the slope still moving after each kink, as suffix sums: exactly 0 past the last moving pixel (a total
    # minus a prefix sum leaves rounding there, which the 1e30 kinks of zero-weight pixels would blow up)
    free = torch.flip(torch.cumsum(torch.flip(slope, [1]), 1), [1]) - slope
    need = need[:, None]
    k = ((done + kink * free) < need).sum(1, keepdim=True)        # kinks passed before f reaches need
    k0 = (k - 1).clamp_min(0)
    done_before = torch.where(k > 0, done.gather(1, k0), torch.zeros_like(need))
    free_before = torch.where(k > 0, free.gather(1, k0), slope.sum(1, keepdim=True))
    t = ((need - done_before) / free_before.clamp_min(1e-30)).squeeze(1)
    return torch.where(k.squeeze(1) < kink.shape[1], t, torch.full_like(t, cap))


def _fab_start(x, radius, norm, generator):
    """A restart's starting point, as the reference draws it: on the surface of the radius-ball around x
    (L-inf: uniform noise scaled so its largest pixel is radius; L2: a Gaussian direction), clipped to
    [0, 1]. One draw of x's shape from the generator."""
    t = 2 * rand_like(x, generator) - 1 if norm == "linf" else rand_like(x, generator, "normal")
    return (x + radius * t / _view(flat_norm(t, norm), x)).clamp(0.0, 1.0)


def _fab_target(model, x, y, t, start, *, norm, steps, alpha_max, eta, beta):
    """One FAB run toward target t from start on a batch; returns (the adversarial point of smallest norm
    found, its norm; inf where none was found)."""
    b = x.shape[0]
    shape = x.shape
    xf = x.flatten(1)
    best = x.clone()
    best_norm = torch.full((b,), float("inf"), device=x.device, dtype=x.dtype)

    def lin(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            f = logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
            (g,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), g.detach().flatten(1), logits.detach()

    cur = start.clone()
    for _ in range(steps):
        f, g, _ = lin(cur)
        # hyperplane <g, z> + (f - <g, cur>) = 0
        bias = f - (g * cur.flatten(1)).sum(1)
        d_cur = project_hyperplane(cur.flatten(1), g, bias, norm) - cur.flatten(1)
        d_orig = project_hyperplane(xf, g, bias, norm) - xf
        # each distance at least 1e-8, as in the reference (both zero: alpha = alpha_max, not 0)
        n_cur, n_orig = flat_norm(d_cur, norm).clamp_min(1e-8), flat_norm(d_orig, norm).clamp_min(1e-8)
        alpha = torch.clamp(n_cur / (n_cur + n_orig), max=alpha_max)[:, None]
        nxt = ((1 - alpha) * (cur.flatten(1) + eta * d_cur) + alpha * (xf + eta * d_orig)).clamp(0, 1)
        nxt = nxt.view(shape)
        with torch.no_grad():
            adv = model(nxt).argmax(1) != y
        dist = flat_norm(nxt - x, norm)
        improve = adv & (dist < best_norm)
        # torch.where, not best[improve] = ...: no host sync per step
        best, best_norm = torch.where(_view(improve, x), nxt, best), torch.where(improve, dist, best_norm)
        # backward step for adversarial points: pull toward the original
        back = _view(adv, x)
        cur = torch.where(back, (1 - beta) * x + beta * nxt, nxt).detach()
    return best, best_norm


def fab_t(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
          targeted: bool = False, generator: torch.Generator | None = None, steps: int = 100,
          restarts: int = 1, n_target_classes: int = 9, alpha_max: float = 0.1, eta: float = 1.05,
          beta: float = 0.9) -> torch.Tensor:
    """FAB-T with AutoAttack's defaults (100 steps, 9 targets, 1 restart, alpha_max 0.1, eta 1.05, beta 0.9).

    y are true labels (the attack picks targets = runner-up classes of the clean logits); examples already
    broken by an earlier target are skipped. Returns the minimal adversarial point when its norm is <= eps,
    otherwise the clean image. Needs >= 3 classes, like the other targeted attacks.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if targeted:
        raise UsageError("fab-t picks its own target classes: pass the true labels with targeted=False")
    check_counts("fab-t", steps=steps, restarts=restarts, n_target_classes=n_target_classes)
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        ranked, n_t, done = runner_up_targets(model, x, y, n_target_classes, "FAB-T (targeted)")
        c = ranked.shape[1]
        out = x.clone()
        for k in range(n_t):
            for r in range(int(restarts)):
                idx = (~done).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                order = ranked[idx]
                order = order[order != y[idx][:, None]].view(len(idx), c - 1)
                # as the reference: the first run of each target starts at the image, a restart on the
                # surface of the eps/2-ball around it, each only on the images not yet broken
                start = x[idx] if r == 0 else _fab_start(x[idx], eps / 2, norm, generator)
                best, bn = _fab_target(model, x[idx], y[idx], order[:, k], start, norm=norm, steps=int(steps),
                                       alpha_max=alpha_max, eta=eta, beta=beta)
                ok = bn <= eps
                out[idx[ok]] = project(best[ok], x[idx[ok]], eps, norm)
                done[idx[ok]] = True
        return out
