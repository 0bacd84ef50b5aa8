"""IBM ART's Square attack (`art.attacks.evasion.SquareAttack`, ART 1.14-1.20), L-inf and L2: the black-box
attack Mansingh et al. ran (max_iter=1000, nb_restarts=1, p_init=0.8, clip_values=(0, 1), y=None, the model
read through a softmax), reproduced draw for draw in torch.

ART's Square is not fra31's (epcli/attacks/square.py). What ART does, and so what this does:
- it attacks the images whose scores still put y on top, judged afresh by a query on ALL images at the start of
  every restart and of every iteration, and its loss by another (fra31 keeps each image's margin and loss from
  the query that made it: one model call per iteration where ART makes three);
- the score is whatever the estimator's `predict` returns: the softmax of the logits (the paper's black-box
  closure) or the logits (a PyTorchClassifier, as inside ART's AutoAttack); the loss is
  score[y] - (second largest score) (0, not negative, when y is the runner-up: as the images attacked have y on
  top, this keeps the same candidates as fra31's margin except at exact ties); a candidate is kept only when its
  loss is strictly lower;
- a restart attacks the images still not fooled again from the clean images (as fra31's);
- L-inf: the first query adds +-eps vertical stripes (a sign per image, channel and column); each iteration
  moves ONE window shared by the whole batch by +-2 eps (one sign per channel) and projects back onto the ball;
  the window's side is max(round(sqrt(p h w)), 1) and its corner np.random.randint(0, h - side), so no window
  ever covers the last row or column (as fra31's);
- L2: the first query sums a 5 x 5 grid of (h // 5)-wide dipoles laid from the top-left corner (fra31 centres
  the grid), each with a random sign per image and channel and its own random transpose and sign (Python's
  `random`), scaled to norm eps; each iteration builds a dipole in window 1 and empties window 2 as fra31 does,
  but with ART's norms: the window energy w_norm summed over channels, and the new window content DIVIDED by
  sqrt(room) where fra31 multiplies, before the whole perturbation is rescaled to norm eps;
- the fraction p follows ART's schedule: p_init halved each time i / max_iter passes 0.001, 0.005, 0.02, 0.05,
  0.1, 0.2, 0.4, 0.6, 0.8 (fra31's fractions when it rescales, but fra31 compares int(10000 i / n) > 10000 f);
- each query runs in chunks of `batch_size` images (ART's default 128), as ART's predict does.
Per iteration that is three model calls: the scores of all current images, the loss of the robust ones and the
loss of their candidates; per restart one more round of the same three; so at most 3 (max_iter + 1) restarts
forward passes per image (3003 for the paper's budget; ART with y=None adds the clean prediction: 3004).

`art_square_run` makes the same calls, with the same arguments and in the same order, on a
`numpy.random.RandomState` and a `random.Random` as ART makes on the global `np.random` and `random`, and does
its arithmetic in ART's dtypes (images float32, the window steps and the L2 window norms in float64), its sums
in numpy's pairwise order and its square roots correctly rounded, as numpy's: with `RandomState(s), Random(s)`
it gives, bit for bit, the images ART gives after `np.random.seed(s); random.seed(s)` (tests/test_art_square.py).
ART's L2 step divides 0 by 0 when an image's perturbation already has norm eps and both windows hold none of it
(numpy warns); the NaN candidate is never kept, here as there.
"""

from __future__ import annotations

import bisect
import functools
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from epcli.attacks._common import check_counts, check_eps, check_inputs, check_norm, eval_mode
from epcli.errors import UsageError

SCORES = ("softmax", "logits")
_P_STEPS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)  # fractions of max_iter where p halves
_L2_GRID = 5  # the L2 initialisation's tiles per side


def p_schedule(p_init: float, i: int, max_iter: int) -> float:
    """ART's fraction of pixels in the window at iteration i: p_init / 2^k with k the number of steps of
    _P_STEPS strictly below i / max_iter (as ART: 1 / 2^k as a float, then times p_init)."""
    return p_init * (1 / 2 ** bisect.bisect_left(_P_STEPS, i / max_iter))


def _side(p: float, h: int, w: int, least: int) -> int:
    """The window side for fraction p: round(sqrt(p h w)) with Python's round, at least `least`."""
    return max(int(round(math.sqrt(p * h * w))), least)


def _l2_side(p: float, h: int, w: int) -> int:
    s = _side(p, h, w, 3)
    return s + 1 if s % 2 == 0 else s


@functools.lru_cache(maxsize=64)
def _base_dipole(s: int) -> np.ndarray:
    """s x s float64: the top s // 2 rows hold a bump (sum of 1/(k+1)^2 over k from the Chebyshev distance to
    (s // 4, s // 2) up to s // 2 - 1, accumulated k by k), normalised; the next s // 2 rows its negative (an odd
    s leaves the last row 0); the whole normalised. Built with numpy so that its float64 sums add in numpy's
    order, which is ART's (a one-ulp difference here can move a float32 pixel)."""
    half = s // 2
    rows = np.abs(np.arange(half) - s // 4)[:, None]
    cols = np.abs(np.arange(s) - s // 2)[None, :]
    ring = np.maximum(rows, cols)
    bump = np.zeros((half, s))
    for k in range(half):
        bump[ring <= k] += 1.0 / (k + 1) ** 2
    bump /= np.sqrt(np.sum(bump ** 2))
    pat = np.zeros((s, s))
    pat[:half] = bump
    pat[half:2 * half] = -bump
    pat /= np.sqrt(np.sum(pat ** 2))
    return pat


def _random_dipole(s: int, py_rng: random.Random) -> np.ndarray:
    """The dipole, transposed with probability 1/2 and then negated with probability 1/2 (two py_rng draws)."""
    pat = _base_dipole(s).copy()  # the cached one stays untouched
    if py_rng.random() > 0.5:
        pat = pat.T
    if py_rng.random() > 0.5:
        pat = -pat
    return pat


def _signs(rng: np.random.RandomState, size, values=(-1, 1)) -> np.ndarray:
    return rng.choice(list(values), size=size)


_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE


def _pairwise_sum(v: torch.Tensor) -> torch.Tensor:
    """Row sums of a (B, n) tensor in numpy's order for a contiguous run (its pairwise summation: rows under 8
    added one by one; up to 128 in 8 interleaved partial sums combined as a tree, then the tail; longer rows
    split at half rounded down to a multiple of 8), so float32 sums round as ART's np.sum does. It matters: ART's
    L2 step divides by sqrt(eps^2 - ||delta||^2), which is 0 or tiny depending on the last bit of ||delta||."""
    b, n = v.shape
    if n < 8:
        out = torch.zeros(b, dtype=v.dtype, device=v.device)
        for i in range(n):
            out = out + v[:, i]
        return out
    if n <= _PAIRWISE_BLOCK:
        m = n - n % 8
        r = v[:, :8]
        for i in range(8, m, 8):
            r = r + v[:, i:i + 8]
        out = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
        for i in range(m, n):
            out = out + v[:, i]
        return out
    half = n // 2 - (n // 2) % 8
    if 2 * half == n:  # both halves alike: one pass over (2B, n/2)
        both = _pairwise_sum(v.reshape(2 * b, half)).view(b, 2)
        return both[:, 0] + both[:, 1]
    return _pairwise_sum(v[:, :half]) + _pairwise_sum(v[:, half:])


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root, as np.sqrt (and CUDA) give it: torch's vectorised CPU sqrt is not
    (measured: 17% of a million float32 values and 1.3% of float64 values one ulp off), and ART's L2 step
    divides by a difference of squared norms that one ulp can turn from 0 into a tiny number."""
    if t.device.type != "cpu":
        return t.sqrt()
    return torch.from_numpy(np.sqrt(t.contiguous().numpy()))


def _l2(d: torch.Tensor, dims) -> torch.Tensor:
    """sqrt of the sum of squares over the trailing dims `dims`, kept, summed as np.sum sums."""
    sq = (d ** 2).contiguous()
    lead = sq.shape[:sq.dim() - len(dims)]
    sums = _pairwise_sum(sq.reshape(math.prod(lead), -1))
    return _sqrt(sums.view(*lead, *([1] * len(dims))))


def check_windows(norm: str, h: int, w: int, p_init: float) -> None:
    """The largest window (the first iteration's) must leave room for its corner (ART's randint(0, h - side)
    fails when it does not), and the L2 initialisation's 5 x 5 grid of tiles at least 2 pixels wide must fit."""
    side = _side(p_init, h, w, 1) if norm == "linf" else _l2_side(p_init, h, w)
    if side >= min(h, w):
        raise UsageError(f"art-square: a window of side {side} (p_init={p_init}) does not fit inside {h}x{w} "
                         "images with room to move (ART fails there): lower p_init")
    if norm == "l2" and (h < 2 * _L2_GRID or _L2_GRID * (h // _L2_GRID) > w):
        raise UsageError(f"art-square L2 starts from a {_L2_GRID}x{_L2_GRID} grid of (height // {_L2_GRID})-wide "
                         f"tiles: {h}x{w} images are too small for it (ART fails there, or with 1-pixel tiles "
                         "returns NaN); use images at least 10 pixels on a side")


def art_square_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str,
                   max_iter: int, p_init: float, restarts: int, scores: str, rng: np.random.RandomState,
                   py_rng: random.Random, batch_size: int = 128) -> torch.Tensor:
    """ART's SquareAttack.generate(x, y) on a model mapping [0, 1] images to logits: the adversarial images.

    y (B,) are the labels to move away from (ART's y, or with y=None the model's clean predictions); norm is
    "linf" or "l2" (canonical names); scores "softmax" or "logits" (what ART's predict returns). rng and py_rng
    stand for ART's global np.random and random. No validation here (see art_square). Queries run in eval mode
    without gradients on x's device, in chunks of batch_size images.
    """
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    f64 = torch.float64
    x = x.detach()
    y = y.to(dev)
    if n == 0:
        return x.clone()

    def predict(xb: torch.Tensor) -> torch.Tensor:
        outs = []
        for lo in range(0, xb.shape[0], batch_size):
            z = model(xb[lo:lo + batch_size])
            outs.append(F.softmax(z, dim=1) if scores == "softmax" else z)
        return torch.cat(outs).to(torch.float32)  # ART's predictions are float32

    def loss(xb, yb):
        """score of the label minus the second largest score (ART's logits difference)."""
        s = predict(xb)
        return s.gather(1, yb[:, None])[:, 0] - s.topk(2, dim=1).values[:, 1]

    def robust_now(xb):
        return predict(xb).argmax(1) == y

    def from_np(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=f64)

    x_adv = x.clone()
    with eval_mode(model), torch.no_grad():
        for _ in range(restarts):
            rob = robust_now(x_adv)
            if not bool(rob.any()):
                break
            x_r, y_r = x[rob], y[rob]
            k = x_r.shape[0]
            l_init = loss(x_r, y_r)
            if norm == "linf":
                stripes = eps * from_np(_signs(rng, (k, c, 1, w)))
                cand = (x_r.to(f64) + stripes).clamp(0.0, 1.0).to(dt)
            else:
                s = h // _L2_GRID
                delta = torch.zeros_like(x_r)
                for top in range(0, _L2_GRID * s, s):
                    for left in range(0, _L2_GRID * s, s):
                        pat = from_np(_random_dipole(s, py_rng)).view(1, 1, s, s)
                        delta[:, :, top:top + s, left:left + s] += pat * from_np(_signs(rng, (k, c, 1, 1)))
                cand = (x_r + delta / _l2(delta, (1, 2, 3)) * eps).clamp(0.0, 1.0)
            better = loss(cand, y_r) < l_init
            x_r[better] = cand[better]
            x_adv[rob] = x_r

            for i in range(max_iter):
                p = p_schedule(p_init, i, max_iter)
                rob = robust_now(x_adv)
                if not bool(rob.any()):
                    break
                x_r, x0, y_r = x_adv[rob], x[rob], y[rob]
                k = x_r.shape[0]
                l_init = loss(x_r, y_r)
                if norm == "linf":
                    cand = _linf_candidate(x_r, x0, eps, _side(p, h, w, 1), rng, from_np)
                else:
                    cand = _l2_candidate(x_r, x0, eps, _l2_side(p, h, w), rng, py_rng, from_np)
                better = loss(cand, y_r) < l_init
                x_r[better] = cand[better]
                x_adv[rob] = x_r
    return x_adv


def _linf_candidate(x_r, x0, eps, s, rng, from_np):
    """One s x s window, at the same place in every image, moved by +-2 eps (a sign per channel), then the
    eps-ball and [0, 1] (in float64, ART's dtype for this step) and back to the images' dtype."""
    _, c, h, w = x_r.shape
    top = rng.randint(0, h - s)
    left = rng.randint(0, w - s)
    step = torch.zeros((c, h, w), dtype=torch.float64, device=x_r.device)
    step[:, top:top + s, left:left + s] = from_np(_signs(rng, [c, 1, 1], (-2 * eps, 2 * eps)))
    cand = x_r.to(torch.float64) + step
    cand = torch.minimum(torch.maximum(cand, (x0 - eps).to(torch.float64)), (x0 + eps).to(torch.float64))
    return cand.clamp(0.0, 1.0).to(x_r.dtype)


def _l2_candidate(x_r, x0, eps, s, rng, py_rng, from_np):
    """ART's L2 step: window 1 gets a random dipole plus its old content over that content's per-channel norm,
    divided by its own norm times sqrt((eps^2 - ||delta||^2) / C + w_norm^2) (w_norm: delta's norm over both
    windows, all channels); window 2 is emptied, window 1 written; the whole delta rescaled to norm eps."""
    k, c, h, w = x_r.shape
    f64 = torch.float64
    d = x_r - x0
    top, left = rng.randint(0, h - s), rng.randint(0, w - s)
    win1 = (slice(None), slice(None), slice(top, top + s), slice(left, left + s))
    w1_norm = _l2(d[win1], (2, 3))
    top2, left2 = rng.randint(0, h - s), rng.randint(0, w - s)
    win2 = (slice(None), slice(None), slice(top2, top2 + s), slice(left2, left2 + s))
    d_norm = _l2(d, (1, 2, 3))
    both = torch.zeros((1, 1, h, w), dtype=f64, device=x_r.device)
    both[win1] = 1.0
    both[win2] = 1.0
    w_norm = _l2(d.to(f64) * both, (1, 2, 3))
    pat = from_np(_random_dipole(s, py_rng)).view(1, 1, s, s)
    new = pat * from_np(_signs(rng, [k, c, 1, 1]))
    new = new + (d[win1] / w1_norm.clamp_min(1e-9)).to(f64)
    room = (eps * eps - (d_norm ** 2).to(f64)).clamp_min(0.0)
    new = new / (_l2(new, (2, 3)) * _sqrt(room / c + w_norm ** 2))
    d[win2] = 0.0
    d[win1] = new.to(d.dtype)
    return (x0 + eps * d / _l2(d, (1, 2, 3))).clamp(0.0, 1.0)


def art_square(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               targeted: bool = False, generator: torch.Generator | None = None, max_iter: int = 1000,
               p_init: float = 0.8, restarts: int = 1, scores: str = "softmax") -> torch.Tensor:
    """ART's Square attack (the paper's black-box attack): max_iter iterations of three queries each, restarts
    from the clean images, untargeted away from y (under the paper's protocol the model's own predictions).

    scores="softmax" reads the model through a softmax, as the paper's black-box closure did; "logits" as
    ART's PyTorchClassifier. The numpy and Python generators ART would use are seeded with one draw from
    `generator` (torch's global one when None), so a seeded generator gives a reproducible run.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if targeted:
        raise UsageError("art-square is untargeted (ART's SquareAttack has no targeted mode): use square")
    check_counts("art-square", max_iter=max_iter, restarts=restarts)
    if not 0 < float(p_init) < 1:
        raise UsageError(f"art-square needs 0 < p_init < 1, got {p_init!r}")
    if scores not in SCORES:
        raise UsageError(f"art-square scores must be one of {', '.join(SCORES)}, got {scores!r}")
    check_windows(norm, x.shape[2], x.shape[3], float(p_init))
    dev = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2 ** 32, (1,), generator=generator, device=dev, dtype=torch.int64))
    if eps == 0 or x.shape[0] == 0:
        return x.clone()
    return art_square_run(model, x, y, eps=eps, norm=norm, max_iter=int(max_iter), p_init=float(p_init),
                          restarts=int(restarts), scores=scores, rng=np.random.RandomState(seed),
                          py_rng=random.Random(seed))
