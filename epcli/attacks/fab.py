"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", https://arxiv.org/abs/1907.02044), L-inf and L2.

Per target class t, each step linearises the decision boundary z_t - z_y = 0 at the current point, projects
both the current point and the original image onto that hyperplane within the [0,1] box (minimal Lp
distance), and moves to a convex combination of the two projections (weight alpha <= alpha_max toward the
original, with overshoot eta). When the iterate is adversarial it is recorded if it has the smallest norm
so far and pulled back toward the original (factor beta). An example counts as broken when the smallest
adversarial perturbation has norm <= eps. The box-constrained projections are our own formulation (L-inf
exact from sorted kinks, L2 by bisection), not the reference's sorting algorithms. As in the reference code
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


def project_hyperplane(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str, iters: int = 30):
    """Closest point (in Lp) to p on {z: <w, z> + b = 0} inside [0,1]^d, per example; when the plane does
    not meet the box, the box point closest to crossing it. Shapes: p, w (B, d); b (B,)."""
    r = (w * p).sum(1) + b                      # current value; we need to bring it to 0
    s = torch.where(r > 0, -1.0, 1.0)[:, None]  # direction of change of <w, z>
    if norm == "linf":
        def extreme(t):  # box point within L-inf t of p pushing <w,z> furthest in direction s
            up = torch.minimum(p + t[:, None], torch.ones_like(p))
            lo = torch.maximum(p - t[:, None], torch.zeros_like(p))
            # a pixel with zero weight does not move: the projection is not unique there, and this is
            # the reference's choice (moving it changed FAB's images by up to eps on a max-pool model)
            return torch.where(w == 0, p, torch.where(s * w > 0, up, lo))
        return extreme(_linf_radius(p, w, r, s))
    else:
        def extreme(lam):  # clip(p + s * lam * w): the KKT form of the L2 projection
            return (p + s * lam[:, None] * w).clamp(0, 1)
        wn = (w * w).sum(1).clamp_min(1e-20)
        lo_t = torch.zeros_like(r)
        hi_t = r.abs() / wn
        for _ in range(60):  # grow the bracket until the plane is crossed or the box saturates
            crossed = ((w * extreme(hi_t)).sum(1) + b) * s.squeeze(1) >= 0
            if bool(crossed.all()):
                break
            hi_t = torch.where(crossed, hi_t, hi_t * 2)
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        crossed = ((w * extreme(mid)).sum(1) + b) * s.squeeze(1) >= 0
        hi_t = torch.where(crossed, mid, hi_t)
        lo_t = torch.where(crossed, lo_t, mid)
    return extreme(hi_t)


def _linf_radius(p, w, r, s):
    """The smallest L-inf radius t at which the box point extreme(t) reaches the plane (1 when it never does).
    Moving every pixel t toward the plane changes <w, z> by f(t) = sum_i |w_i| min(t, room_i), room_i being how
    far pixel i can go before the box stops it: f is piecewise linear, with a kink at each room_i. After sorting
    the rooms, f at each kink is a prefix sum plus the kink times the weight still free; t is then read off the
    segment where f first reaches |r|. Exact, unlike a bisection, and one sort instead of 30 passes."""
    room = torch.where(s * w > 0, 1 - p, p).clamp_min(0)
    room, order = room.sort(1)
    aw = w.abs().gather(1, order)
    done = torch.cumsum(aw * room, 1)                        # sum over the pixels already stopped, at each kink
    free = aw.sum(1, keepdim=True) - torch.cumsum(aw, 1)     # weight of the pixels still moving after each kink
    f = done + room * free                                   # f(room_k)
    need = r.abs()[:, None]
    k = (f < need).sum(1, keepdim=True)                      # kinks passed before f reaches |r|
    reachable = k.squeeze(1) < room.shape[1]
    k0 = (k - 1).clamp_min(0)
    done_before = torch.where(k > 0, done.gather(1, k0), torch.zeros_like(need))
    free_before = torch.where(k > 0, free.gather(1, k0), aw.sum(1, keepdim=True))
    t = ((need - done_before) / free_before.clamp_min(1e-30)).squeeze(1)
    return torch.where(reachable, t, torch.ones_like(t))


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
