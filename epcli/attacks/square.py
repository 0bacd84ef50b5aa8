"""Square attack (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049), L-inf and L2: a
score-based black-box random search that only needs logits (no gradients).

This follows the reference implementation (square.py of fra31/auto-attack, which torchattacks ports) draw for
draw: with generator=torch.Generator().manual_seed(s) it makes the same torch.rand calls, with the same shapes
and in the same order, as the reference after torch.manual_seed(s), so on the CPU both give the same
adversarial images (tests/test_square_reference.py). What the reference does, and so what this does:
- only the images the model gets right (targeted: does not already put in the target class) are attacked; the
  others, and the images still robust at the end, are returned unchanged;
- the initialisation is the first query: vertical +-eps stripes (L-inf) or a grid of centred dipoles with a
  random sign per tile and channel, scaled to norm eps (L2); then up to n_queries more queries;
- each query changes ONE square window shared by the whole batch (side from the p schedule, p_init 0.8): L-inf
  sets it to x +- eps with one random sign per channel (shared by the batch); L2 moves the perturbation mass of
  the window and of a second random window into a dipole with a random sign per image and channel;
- a candidate is kept when it lowers the loss (margin z_y - max_{i!=y} z_i; targeted: cross-entropy to the
  target) or misclassifies (targeted: hits the target); an image stops being queried once its margin is <= 0;
- a restart runs on the images not yet fooled, judged by the argmax on one more forward pass.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from epcli.attacks._common import check_eps, check_inputs, check_norm, eval_mode, margin_loss
from epcli.errors import UsageError

_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """Fraction of pixels changed at iteration `it` (halved at the Square paper's iteration thresholds)."""
    if rescale:
        it = int(it / n_queries * 10000)
    return p_init / 2 ** sum(it > t for t in _THRESHOLDS)


# --- random draws: all torch.rand on the generator's device (the CPU by default, as in the reference) -------

def _uniform(shape, generator):
    return torch.rand(shape, generator=generator, device=generator.device if generator is not None else "cpu")


def _signs(shape, generator, device):
    """+-1 (0 with probability ~2^-24, as in the reference): the sign of 2U - 1."""
    return torch.sign(2 * _uniform(shape, generator) - 1).to(device)


def _offset(span: int, generator) -> int:
    """A window's top or left edge in [0, span): floor(span * U) in float32 (0 when span is 0). The last
    position, span itself, is never drawn (the reference's convention)."""
    return int((span * _uniform((1,), generator)).long())


@functools.lru_cache(maxsize=64)
def _bump(rows: int, cols: int) -> torch.Tensor:
    """rows x cols, unit L2 norm: sum of 1/(k+1)^2 over the square rings k >= the Chebyshev distance from
    (rows // 2, cols // 2), accumulated ring by ring in float32 as the reference does."""
    i = (torch.arange(rows) - rows // 2).abs()[:, None]
    j = (torch.arange(cols) - cols // 2).abs()[None, :]
    ring = torch.maximum(i, j)
    out = torch.zeros(rows, cols)
    for k in range(max(rows, cols) // 2 + 1):
        out += (ring <= k) * (1.0 / torch.tensor(float((k + 1) ** 2)))
    return out / (out ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


@functools.lru_cache(maxsize=64)
def dipole(s: int) -> torch.Tensor:
    """s x s L2 pattern: a positive bump on the top s // 2 rows and a negative one below, unit L2 norm."""
    pat = torch.cat([_bump(s // 2, s), -_bump(s - s // 2, s)])
    return pat / (pat ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def _random_dipole(s: int, generator, device) -> torch.Tensor:
    pat = dipole(s)
    # contiguous: the per-window sums below then add in the reference's order, bit for bit
    return (pat.t().contiguous() if bool(_uniform((1,), generator) > 0.5) else pat).to(device)


# --- the attack ---------------------------------------------------------------------------------------------

def square(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           targeted: bool = False, generator: torch.Generator | None = None, n_queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = True) -> torch.Tensor:
    """Square attack: the initialisation and up to n_queries more queries per image and restart (default
    5000, p_init 0.8; untargeted margin loss, targeted cross-entropy).

    rescale_schedule=True (standalone default, as in the reference) stretches the p schedule to the budget;
    AutoAttack runs it with rescale_schedule=False. Restarts run only on examples not yet fooled. For the
    reference's numbers pass a CPU generator (the reference draws everything on the CPU).
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if int(n_queries) < 1 or int(restarts) < 1 or not 0 < p_init <= 1:
        raise UsageError("square needs n_queries >= 1, restarts >= 1 and 0 < p_init <= 1")
    if eps == 0:
        return x.clone()
    out = x.clone()
    with eval_mode(model), torch.no_grad():
        pred = model(x).argmax(1)
        todo = pred != y if targeted else pred == y
        for _ in range(int(restarts)):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            adv = _square_run(model, x[idx], y[idx], eps, norm, targeted, generator, int(n_queries), p_init,
                              rescale_schedule)
            pred = model(adv).argmax(1)
            hit = pred == y[idx] if targeted else pred != y[idx]
            out[idx[hit]] = adv[hit]
            todo[idx[hit]] = False
    return out


def _scores(model, x, y, targeted):
    """(margin, loss) per image: margin > 0 means not fooled yet; the loss decides what is kept."""
    logits = model(x)
    if not targeted:
        margin = -margin_loss(logits, y)
        return margin, margin
    return margin_loss(logits, y), F.cross_entropy(logits, y, reduction="none")


def _l2_norm(d):
    return (d ** 2).flatten(1).sum(-1).sqrt().view(-1, *([1] * (d.dim() - 1)))


def _square_run(model, x, y, eps, norm, targeted, generator, n_queries, p_init, rescale):
    n, c, h, w = x.shape
    dev = x.device
    if norm == "linf":
        best = (x + eps * _signs((n, c, 1, w), generator, dev)).clamp(0, 1)
    else:
        s = max(h // 5, 1)
        start = max((h - 5 * s) // 2, 0)
        delta = torch.zeros_like(x)
        for top in range(start, start + (h // s) * s, s):
            for left in range(start, start + (w // s) * s, s):
                tile = _random_dipole(s, generator, dev).view(1, 1, s, s) * _signs((n, c, 1, 1), generator, dev)
                win = delta[:, :, top:top + s, left:left + s]  # cropped at the border (the reference fails there)
                win += tile[:, :, :win.shape[2], :win.shape[3]]
        best = (x + delta / (_l2_norm(delta) + 1e-12) * eps).clamp(0, 1)
    margin, loss = _scores(model, best, y, targeted)
    if bool((margin < 0).all()):
        return best
    for it in range(n_queries):
        act = (margin > 0).nonzero().squeeze(1)
        xa, xb = x[act], best[act]
        p = p_schedule(p_init, it, n_queries, rescale)
        side = round(math.sqrt(p * (c * h * w) / c))
        if norm == "linf":
            cand = _linf_candidate(xa, xb, eps, min(max(side, 1), h, w), generator)
        else:
            side = max(side, 3)
            cand = _l2_candidate(xa, xb, eps, min(side + (side % 2 == 0), h, w), generator)
        if act.numel():  # the draws above are made even for an empty batch, as in the reference
            m_new, l_new = _scores(model, cand, y[act], targeted)
            better = l_new < loss[act]
            loss[act] = torch.where(better, l_new, loss[act])
            keep = better | (m_new <= 0)
            margin[act] = torch.where(keep, m_new, margin[act])
            best[act] = torch.where(keep.view(-1, 1, 1, 1), cand, xb)
        if bool((margin <= 0).all()):
            break
    return best


def _linf_candidate(xa, xb, eps, s, generator):
    """One s x s window (shared by the batch) pushed to x +- eps with a random sign per channel."""
    _, c, h, w = xa.shape
    top, left = _offset(h - s, generator), _offset(w - s, generator)
    step = torch.zeros(c, h, w, device=xa.device)
    step[:, top:top + s, left:left + s] = 2 * eps * _signs((c, 1, 1), generator, xa.device)
    return torch.min(torch.max(xb + step, xa - eps), xa + eps).clamp(0, 1)


def _l2_candidate(xa, xb, eps, s, generator):
    """Window 1 gets a random dipole plus its old content, window 2 is emptied; the energy of both windows
    (and what is left below eps) goes into window 1, per channel; then the whole delta is scaled to norm eps."""
    k, c, h, w = xa.shape
    top, left = _offset(h - s, generator), _offset(w - s, generator)
    top2, left2 = _offset(h - s, generator), _offset(w - s, generator)
    w1 = (slice(None), slice(None), slice(top, top + s), slice(left, left + s))
    w2 = (slice(None), slice(None), slice(top2, top2 + s), slice(left2, left2 + s))
    d = xb - xa
    n_w1 = (d[w1] ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
    both = torch.zeros_like(xa)
    both[w1] = 1.0
    both[w2] = 1.0
    n_both = ((d * both) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
    n_img = _l2_norm(d)
    new = _random_dipole(s, generator, xa.device).view(1, 1, s, s) * _signs((k, c, 1, 1), generator, xa.device)
    new = new + d[w1] / (1e-12 + n_w1)
    room = (torch.full_like(n_both, eps) ** 2 - n_img ** 2).clamp_min(0) / c + n_both ** 2
    new = new / (1e-12 + (new ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * room.sqrt()
    d[w2] = 0.0
    d[w1] = new
    return (xa + d / (_l2_norm(d) + 1e-12) * eps).clamp(0, 1)
