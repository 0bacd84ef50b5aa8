"""Square attack (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049), L-inf and L2: a
score-based black-box random search that only needs logits (no gradients).

Each query changes one random square window (side s shrinking with the schedule p, starting from p_init
0.8): for L-inf the window gets a fresh +-eps value per channel; for L2 a centred "dipole" pattern takes the
perturbation mass of that window and of a second, zeroed window, and the whole perturbation is rescaled to
norm eps. A change is kept when it lowers the margin loss z_y - max_{i!=y} z_i (untargeted) or
max_{i!=t} z_i - z_t (targeted). Examples stop being queried once fooled. The first query is the
initialisation (vertical +-eps stripes for L-inf, a grid of dipoles for L2).
"""

from __future__ import annotations

import math

import torch

from epcli.attacks._common import (check_eps, check_inputs, check_norm, eval_mode, flat_norm, margin_loss,
                                   project)
from epcli.errors import UsageError

_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels changed at iteration `it` (halved at the Square paper's iteration thresholds)."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > t for t in _THRESHOLDS)


def _margin(logits, y, targeted):
    # to minimise; < 0 means success
    return -margin_loss(logits, y) if not targeted else margin_loss(logits, y)


def _randint(high: int, n: int, generator, device):
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, high, (n,), generator=generator, device=dev).to(device)


def _signs(shape, generator, device):
    dev = generator.device if generator is not None else "cpu"
    return (torch.randint(0, 2, shape, generator=generator, device=dev).to(device) * 2 - 1).float()


def _window(n, h, w, s, generator, device, corners=False):
    """Per-example random s x s window masks (n, 1, h, w) (and the top-left corners when asked)."""
    vh, vw = _randint(h - s + 1, n, generator, device), _randint(w - s + 1, n, generator, device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    mr = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    mc = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    m = (mr[:, :, None] & mc[:, None, :])[:, None]
    return (m, vh, vw) if corners else m


def dipole(s: int, device) -> torch.Tensor:
    """s x s pattern: two centred bumps of opposite sign (mass ~ 1/(ring+1)^2), unit L2 norm."""
    def bump(hh, ww):
        i = torch.arange(hh, device=device).float()[:, None]
        j = torch.arange(ww, device=device).float()[None, :]
        ring = torch.maximum((i - (hh - 1) / 2).abs(), (j - (ww - 1) / 2).abs()).floor()
        top = int(ring.max()) + 1
        return sum(((ring <= r).float() / (r + 1) ** 2) for r in range(top))
    half = s // 2
    pat = torch.cat([bump(half, s), -bump(s - half, s)], 0) if half > 0 else bump(s, s)
    return pat / pat.norm().clamp_min(1e-12)


def square(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           targeted: bool = False, generator: torch.Generator | None = None, n_queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = True) -> torch.Tensor:
    """Square attack with a query budget per example (default 5000 queries, p_init 0.8, margin loss).

    rescale_schedule=True (standalone default, as in the reference) stretches the p schedule to the budget;
    AutoAttack runs it with rescale_schedule=False. Restarts run only on examples not yet fooled.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if int(n_queries) < 1 or int(restarts) < 1 or not 0 < p_init <= 1:
        raise UsageError("square needs n_queries >= 1, restarts >= 1 and 0 < p_init <= 1")
    if eps == 0:
        return x.clone()
    out = x.clone()
    with eval_mode(model), torch.no_grad():
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for _ in range(int(restarts)):
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv, ok = _square_run(model, x[idx], y[idx], eps, norm, targeted, generator, int(n_queries),
                                  p_init, rescale_schedule)
            take = ok | ~done[idx]
            out[idx[take]] = adv[take]
            done[idx[ok]] = True
    return out


def _square_run(model, x, y, eps, norm, targeted, generator, n_queries, p_init, rescale):
    n, c, h, w = x.shape
    dev = x.device
    if norm == "linf":
        best = (x + eps * _signs((n, c, 1, w), generator, dev)).clamp(0, 1)
    else:
        s0 = max(h // 5, 1)
        delta = torch.zeros_like(x)
        pat = dipole(s0, dev)
        for i in range(0, h - s0 + 1, s0):
            for j in range(0, w - s0 + 1, s0):
                delta[:, :, i:i + s0, j:j + s0] = pat * _signs((n, c, 1, 1), generator, dev)
        delta = delta / flat_norm(delta, "l2").clamp_min(1e-12).view(-1, 1, 1, 1) * eps
        best = project(x + delta, x, eps, "l2")
    loss = _margin(model(best), y, targeted)
    for it in range(n_queries - 1):
        act = (loss >= 0).nonzero().squeeze(1)  # not yet fooled
        if act.numel() == 0:
            break
        xa, xb = x[act], best[act]
        k = act.numel()
        p = p_schedule(p_init, it, n_queries, rescale)
        if norm == "linf":
            s = int(min(max(round(math.sqrt(p * h * w)), 1), h - 1))
            m = _window(k, h, w, s, generator, dev)
            new = (xa + eps * _signs((k, c, 1, 1), generator, dev)).clamp(0, 1)
            same = ((new - xb).abs() < 1e-7) | ~m
            unchanged = same.flatten(1).all(1)
            if bool(unchanged.any()):  # resample the value once by flipping: a query must change something
                flip = (xa - eps * (new - xa).sign().where((new - xa) != 0, torch.ones_like(xa))).clamp(0, 1)
                new = torch.where(unchanged.view(-1, 1, 1, 1), flip, new)
            cand = torch.where(m, new, xb)
        else:
            s = int(min(max(round(math.sqrt(p * h * w)), 3), h - 1))
            m1, vh, vw = _window(k, h, w, s, generator, dev, corners=True)
            m2 = _window(k, h, w, s, generator, dev)
            d = xb - xa
            n_img = flat_norm(d, "l2")
            n_w1 = (d * m1).pow(2).sum((2, 3)).sqrt()  # (k, c)
            n_union = (d * (m1 | m2)).pow(2).sum((2, 3)).sqrt()
            pats = dipole(s, dev)
            flip_t = _signs((k,), generator, dev) > 0  # random transposition of the pattern
            base = torch.where(flip_t.view(-1, 1, 1), pats.t()[None], pats[None])  # (k, s, s)
            rr = (torch.arange(h, device=dev)[None] - vh[:, None]).clamp(0, s - 1)  # (k, h)
            cc = (torch.arange(w, device=dev)[None] - vw[:, None]).clamp(0, s - 1)
            pat = base[torch.arange(k, device=dev)[:, None, None], rr[:, :, None], cc[:, None, :]][:, None]
            new_w = pat * _signs((k, c, 1, 1), generator, dev) + d * m1 / n_w1.clamp_min(1e-12)[:, :, None, None]
            new_w = new_w * m1
            target = ((eps ** 2 - n_img ** 2).clamp_min(0)[:, None] / c + n_union ** 2).sqrt()
            new_w = new_w / new_w.pow(2).sum((2, 3)).sqrt().clamp_min(1e-12)[:, :, None, None] \
                * target[:, :, None, None]
            d_new = torch.where(m1, new_w, torch.where(m2, torch.zeros_like(d), d))
            d_new = d_new / flat_norm(d_new, "l2").clamp_min(1e-12).view(-1, 1, 1, 1) * eps
            cand = project(xa + d_new, xa, eps, "l2")
        new_loss = _margin(model(cand), y[act], targeted)
        better = new_loss < loss[act]
        best[act[better]] = cand[better]
        loss[act[better]] = new_loss[better]
    return best, loss < 0
