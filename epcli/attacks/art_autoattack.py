"""IBM ART's AutoAttack (ART 1.14.1 as used by Mansingh et al.; the algorithms are unchanged in ART 1.20.1):
APGD-CE, APGD-DLR, DeepFool and Square in that order, each on the images still robust, in torch.

This is NOT fra31's AutoAttack (autoattack.py: APGD-CE, APGD-T, FAB-T, Square). ART's `AutoAttack(estimator,
norm, eps, batch_size)` with its default list runs
- `AutoProjectedGradientDescent` with the cross-entropy and then with the "difference_logits_ratio" loss: 100
  iterations, 5 random inits, step size eps_step (0.1 by default, whatever eps is);
- `DeepFool` (100 iterations, overshoot 1e-3, the 10 top classes' gradients);
- `SquareAttack` (5000 iterations, p_init 0.8, 5 restarts) on the logit margin;
and counts an image as broken only when its prediction left y AND (1 - 1e-4) * ||x_adv - x|| <= eps
(DeepFool is unbounded: its images mostly fail that test at small eps).

ART's APGD is not the paper's APGD (apgd.py), and that is kept here on purpose:
- the first step is eps_step (not 2 eps); the momentum step is always taken; the checkpoints are
  ceil(p * max_iter) of the fractions 0.22, 0.41, ... summed in floats (N = 100: 22, 41, 58, 70, ...);
- the random start is uniform in the cube (L-inf) or in the ball (L2), added to the current point, clipped and
  projected; an image not broken by a restart keeps that random start, the next restart adds its noise on top,
  and the attack returns it;
- f_0 is the loss at the start, the first iterate is kept when f_1 >= f_0; halving resets the iterate to the
  best point and the momentum iterate to the point before it; a batch stops when every loss is exactly 0;
- the returned point is the last iterate (when it is misclassified), not the best-loss point;
- DLR is -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3) with no 1e-12; both losses are averaged over the batch
  before the gradient (which matters for L2, normalised with + 1e-7);
- loss values come from a forward pass with no gradient (ART's compute_loss) and gradients from a separate
  forward pass (ART's loss_gradient); on an EP model only the latter uses the gradient mode.
ART's DeepFool computes f and the class gradients for the whole batch, picks the class l minimising
|f_l - f_k| / ||w_l - w_k||, steps by |f_l - f_k| / (||w_l - w_k||^2 + 1e-7) (w_l - w_k), clipped to [0, 1],
until the prediction changes, then scales the total perturbation by (1 + overshoot). With nb_grads below the
number of classes it keeps ART's indexing of f by the position of the predicted class in the class subset.

Randomness: ART draws from numpy's global stream (and Python's `random` in Square). Here a
`numpy.random.RandomState` (and a `random.Random`) makes the same calls in the same order, so with the same seed
the images are ART's up to float rounding (tests/test_art_autoattack.py). art_autoattack seeds one pair for the
whole ensemble from one draw of the torch generator (`ensemble_seed`), and the members consume it in turn.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from epcli.attacks._common import check_counts, check_eps, check_inputs, check_norm, eval_mode, need_classes
from epcli.attacks.art_square import _pairwise_sum, _sqrt, art_square_run, check_windows
from epcli.attacks.autoattack import run_members
from epcli.errors import UsageError

MEMBERS = ("apgd-ce", "apgd-dlr", "deepfool", "square")
APGD_LOSSES = ("ce", "dlr")
REL_ACC = 1e-4  # ART's run_attack: broken only when (1 - 1e-4) * ||x_adv - x|| <= eps
GRAD_TOL = 1e-7  # ART's tol = 10e-8, in the L2 step direction and DeepFool


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


PREDICT_BATCH = 128  # ART's predict() default chunk, where its callers pass none


def _predict(model, x: torch.Tensor, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """Logits with no gradient, in chunks of batch_size (ART's predict; a conv's last bits depend on the batch)."""
    with torch.no_grad():
        if len(x) <= batch_size:
            return model(x)
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _sumsq(v: torch.Tensor, start: int) -> torch.Tensor:
    """Sum of squares over the dims from `start` on, added in numpy's pairwise order (art_square's
    `_pairwise_sum`): every L2 norm goes through here. torch.sum adds in another order, and through a long L2
    run its last-bit differences grew to 0.07 and flipped a prediction (APGD-DLR, 20 steps, eps 0.5)."""
    sq = v.flatten(start).square().contiguous()
    return _pairwise_sum(sq.reshape(-1, sq.shape[-1])).view(sq.shape[:-1])


def _norms(v: torch.Tensor, norm: str) -> torch.Tensor:
    return v.flatten(1).abs().amax(1) if norm == "linf" else _sqrt(_sumsq(v, 1))


def art_projection(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """ART's `projection` (suboptimal=True): L-inf clamps each pixel to [-eps, eps]; L2 rescales by
    min(1, eps / ||delta||) in float64 (eps broadcast as float64 there) and rounds back."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _norms(delta, "l2").double()
    factor = torch.where(n > 0, torch.clamp(eps / n, max=1.0), torch.zeros_like(n))
    return (delta.double() * _view(factor, delta)).to(delta.dtype)


def random_sphere(rng: np.random.RandomState, n: int, m: int, eps: float, norm: str) -> np.ndarray:
    """ART's `random_sphere` drawn from rng: (n, m) float64, uniform in the cube (L-inf) or the ball (L2, radius
    from the regularised lower incomplete gamma function: torch.special.gammainc here, scipy's in ART)."""
    if norm == "linf":
        return rng.uniform(-eps, eps, (n, m))
    a = rng.randn(n, m)
    s2 = np.sum(a ** 2, axis=1)
    inc = torch.special.gammainc(torch.tensor(m / 2.0, dtype=torch.float64), torch.from_numpy(s2 / 2.0)).numpy()
    base = inc ** (1 / m) * eps / np.sqrt(s2)
    return a * np.tile(base, (m, 1)).T


def checkpoints(max_iter: int) -> list[int]:
    """ART's APGD checkpoints var_w (0-based iterations, with 0 and any repeats, as ART's list.index reads them)."""
    w = [0, 0.22]
    while True:
        p = w[-1] + max(w[-1] - w[-2] - 0.03, 0.06)
        if p > 1:
            break
        w.append(p)
    return [math.ceil(p * max_iter) for p in w]


def art_dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ART's DLR per example: -(z_y - z_i) / (z_pi1 - z_pi3), z_i the largest logit other than z_y, no 1e-12
    (equal top and third logits give inf or nan, as in ART)."""
    top3 = logits.topk(3, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).argmax(1)
    z_i = logits.gather(1, other[:, None]).squeeze(1)
    return -(z_y - z_i) / (top3[:, 0] - top3[:, 2])


def _loss_fn(loss: str):
    return (lambda z, y: F.cross_entropy(z, y, reduction="none")) if loss == "ce" else art_dlr


def _loss_values(model, x, y, fn):
    """ART's compute_loss(reduction="none"): a forward pass on an input that does not require a gradient."""
    with torch.no_grad():
        return fn(model(x), y)


def _loss_gradient(model, x, y, fn):
    """ART's loss_gradient: the gradient of the batch MEAN of the loss, from its own forward pass."""
    z = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(fn(model(z), y).mean(), z)
    return g.detach()


def _apgd_batch(model, x_k, x_init, y, fn, *, eps, norm, eps_step, max_iter) -> torch.Tensor:
    """ART's APGD iterations on one batch from x_k; returns the last iterate."""
    b = x_k.shape[0]
    var_w = checkpoints(max_iter)
    eta = torch.full((b,), float(eps_step), dtype=x_k.dtype, device=x_k.device)
    count = torch.zeros(b, dtype=torch.float64, device=x_k.device)
    x_k_m_1 = x_k
    for k in range(max_iter):
        g = _loss_gradient(model, x_k, y, fn)
        if norm == "linf":
            g = g.sign()
        else:
            g = g / _view(_sqrt(_sumsq(g, 1)) + GRAD_TOL, g)
        z = (x_k + _view(eta, x_k) * g).clamp(0.0, 1.0)
        if k == 0:
            x_1 = x_init + art_projection(z - x_init, eps, norm)
            f_0 = _loss_values(model, x_k, y, fn)
            f_1 = _loss_values(model, x_1, y, fn)
            eta_ckpt, f_max_ckpt = eta.clone(), f_0.clone()
            up = f_1 >= f_0
            f_max = torch.where(up, f_1, f_0)
            x_max = torch.where(_view(up, x_k), x_1, x_k)
            x_max_m_1 = x_init.clone()
            count += up.double()
            x_k_m_1, x_k = x_k, x_1
            continue
        z = x_init + art_projection(z - x_init, eps, norm)
        # ART's operation order (float32 rounding): x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})
        x_new = (x_k + 0.75 * (z - x_k) + 0.25 * (x_k - x_k_m_1)).clamp(0.0, 1.0)
        x_new = x_init + art_projection(x_new - x_init, eps, norm)
        f = _loss_values(model, x_new, y, fn)
        if bool((f == 0).all()):
            return x_new
        up = f > f_max
        count += up.double()
        upx = _view(up, x_k)
        x_max, x_max_m_1 = torch.where(upx, x_new, x_max), torch.where(upx, x_k, x_max_m_1)
        f_max = torch.where(up, f, f_max)
        x_k_m_1, x_k = x_k, x_new
        if k in var_w:
            h = k - var_w[var_w.index(k) - 1]
            cond = (count < 0.75 * h) | ((eta_ckpt == eta) & (f_max_ckpt == f_max))
            eta = torch.where(cond, eta / 2, eta)
            cx = _view(cond, x_k)
            x_k, x_k_m_1 = torch.where(cx, x_max, x_k), torch.where(cx, x_max_m_1, x_k_m_1)
            count.zero_()
            eta_ckpt, f_max_ckpt = eta.clone(), f_max.clone()
    return x_k


def _check_rng(rng, py_rng=None):
    if not isinstance(rng, np.random.RandomState):
        raise UsageError(f"rng must be a numpy.random.RandomState (ART draws from numpy's legacy stream), "
                         f"got {type(rng).__name__}")
    if py_rng is not None and not isinstance(py_rng, random.Random):
        raise UsageError(f"py_rng must be a random.Random, got {type(py_rng).__name__}")


def art_apgd_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                 eps_step: float = 0.1, max_iter: int = 100, restarts: int = 5, loss: str = "ce",
                 rng: np.random.RandomState, batch_size: int = 32) -> torch.Tensor:
    """ART's AutoProjectedGradientDescent (untargeted, clip (0, 1)) away from labels y; `restarts` is ART's
    nb_random_init, `batch_size` its batch (the loss is averaged over it before the gradient). Images not broken
    come back at their last random start."""
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if loss not in APGD_LOSSES:
        raise UsageError(f"unknown ART APGD loss {loss!r}: use 'ce' or 'dlr'")
    check_counts("ART APGD", max_iter=max_iter, restarts=restarts, batch_size=batch_size)
    _check_step(eps_step)
    _check_rng(rng)
    fn = _loss_fn(loss)
    max_iter, batch_size = int(max_iter), int(batch_size)
    x_adv = x.clone()
    if len(x) == 0 or eps == 0:  # (ART refuses eps = 0; nothing can move)
        return x_adv
    with eval_mode(model):
        if loss == "dlr":
            need_classes(int(_predict(model, x[:1], 1).shape[1]), 3, "ART APGD-DLR")
        for _ in range(int(restarts)):
            robust = _predict(model, x_adv).argmax(1) == y
            idx = robust.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x_init, y_rob = x[idx], y[idx]
            noise = random_sphere(rng, len(idx), x[0].numel(), eps, norm).astype(np.float32)
            noise = torch.from_numpy(noise).to(x.device, x.dtype).view_as(x_init)
            x_rob = (x_adv[idx] + noise).clamp(0.0, 1.0)
            x_rob = x_init + art_projection(x_rob - x_init, eps, norm)
            for lo in range(0, len(idx), batch_size):
                sl = slice(lo, lo + batch_size)
                x_k = _apgd_batch(model, x_rob[sl], x_init[sl], y_rob[sl], fn, eps=eps, norm=norm,
                                  eps_step=eps_step, max_iter=max_iter)
                broken = _predict(model, x_k).argmax(1) != y_rob[sl]
                x_rob[sl] = torch.where(_view(broken, x_k), x_k, x_rob[sl])
            x_adv[idx] = x_rob
    return x_adv


def _class_gradients(model, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ART's class_gradient: one forward pass, then the input gradient of each listed logit (summed over the
    batch, i.e. per image); (B, len(labels), C, H, W)."""
    z = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(z)
        grads = [torch.autograd.grad(out[:, int(c)].sum(), z, retain_graph=i + 1 < len(labels))[0]
                 for i, c in enumerate(labels.tolist())]
    return torch.stack(grads, 1)


def art_deepfool_run(model: torch.nn.Module, x: torch.Tensor, *, max_iter: int = 100, overshoot: float = 1e-3,
                     nb_grads: int = 10, batch_size: int = 1) -> torch.Tensor:
    """ART's DeepFool with clip_values (0, 1): away from the model's own predictions (ART ignores y)."""
    if x.dim() != 4:
        raise UsageError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
    x, _ = check_inputs(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
    check_counts("ART DeepFool", max_iter=max_iter, nb_grads=nb_grads, batch_size=batch_size)
    if not float(overshoot) >= 0:
        raise UsageError(f"ART DeepFool needs overshoot >= 0, got {overshoot!r}")
    max_iter, batch_size = int(max_iter), int(batch_size)
    x_adv = x.clone()
    if len(x) == 0:
        return x_adv
    with eval_mode(model):
        preds = _predict(model, x, batch_size)
        c = preds.shape[1]
        if int(nb_grads) < c:  # the union over ALL images of each one's top nb_grads classes, sorted
            labels_set = torch.unique(preds.argsort(1, descending=True)[:, :int(nb_grads)])
        else:
            labels_set = torch.arange(c, device=x.device)
        for lo in range(0, len(x), batch_size):
            x0 = x_adv[lo:lo + batch_size]
            batch = x0.clone()
            f = preds[lo:lo + batch_size]
            fk_hat = f.argmax(1)
            rows = torch.arange(len(batch), device=x.device)
            # position of the predicted class in labels_set; ART also indexes f by that position (the same as the
            # class when every class is in the set)
            pos = torch.searchsorted(labels_set, fk_hat)
            active = torch.ones(len(batch), dtype=torch.bool, device=x.device)
            step = 0
            grd = _class_gradients(model, batch, labels_set)
            while bool(active.any()) and step < max_iter:
                # ART recomputes f and the gradients for the whole batch after every step; only the images still
                # active use them (the others no longer move), so they are computed for those alone here
                grad_diff = grd - grd[rows, pos][:, None]
                f_diff = f[:, labels_set] - f[rows, pos][:, None]
                dist = _sqrt(_sumsq(grad_diff, 2)) + GRAD_TOL
                value = f_diff.abs() / dist
                value[rows, pos] = float("inf")
                best = value.argmin(1)
                w = grad_diff[rows, best]
                r = f_diff[rows, best].abs() / (_sqrt(_sumsq(w, 1)).square() + GRAD_TOL)
                batch = torch.where(_view(active, batch), (batch + _view(r, w) * w).clamp(0.0, 1.0), batch)
                act = active.nonzero().squeeze(1)
                f = f.clone()
                f[act] = _predict(model, batch[act])
                active = f.argmax(1) == fk_hat
                step += 1
                act = active.nonzero().squeeze(1)
                if act.numel() and step < max_iter:
                    grd = grd.clone()
                    grd[act] = _class_gradients(model, batch[act], labels_set)
            x_adv[lo:lo + batch_size] = (x0 + (1 + float(overshoot)) * (batch - x0)).clamp(0.0, 1.0)
    return x_adv


def _check_step(eps_step) -> None:
    if not (isinstance(eps_step, (int, float)) and not isinstance(eps_step, bool)) or not 0 < eps_step < math.inf:
        raise UsageError(f"eps_step must be a number > 0, got {eps_step!r}")


def ensemble_seed(generator: torch.Generator | None) -> int:
    """The seed of the ensemble's RandomState and random.Random: one draw in [0, 2^31) from the generator (the
    global torch stream when None)."""
    dev = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=dev).item())


def _broken(model, adv, x, y, eps, norm):
    """ART's run_attack verdict: the prediction left y and (1 - 1e-4) * ||adv - x|| <= eps."""
    pred = _predict(model, adv).argmax(1)
    return (pred != y) & ((1 - REL_ACC) * _norms(adv - x, norm) <= eps)


def art_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
                   targeted: bool = False, generator: torch.Generator | None = None, eps_step: float = 0.1,
                   batch_size: int = 200, apgd_iter: int = 100, restarts: int = 5, deepfool_iter: int = 100,
                   overshoot: float = 1e-3, nb_grads: int = 10, square_iter: int = 5000, p_init: float = 0.8,
                   square_restarts: int = 5,
                   on_member: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """ART's AutoAttack(norm, eps, eps_step, batch_size) with its default members (their budgets as keyword
    parameters, ART's defaults), away from labels y (the paper: the model's clean predictions). Images robust at
    the start (predicted as y) are attacked by each member in turn; on_member(name, robust_mask) after each.
    targeted=True is refused (ART's targeted mode loops the members over every class: not the paper's run)."""
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if targeted:
        raise UsageError("art-autoattack is untargeted (the paper's ART AutoAttack run)")
    check_counts("art-autoattack", batch_size=batch_size, apgd_iter=apgd_iter, restarts=restarts,
                 deepfool_iter=deepfool_iter, nb_grads=nb_grads, square_iter=square_iter,
                 square_restarts=square_restarts)
    _check_step(eps_step)
    if not 0 < float(p_init) < 1:
        raise UsageError(f"art-autoattack needs 0 < p_init < 1, got {p_init!r}")
    check_windows(norm, x.shape[2], x.shape[3], float(p_init))  # Square's: before any member runs
    if not float(overshoot) >= 0:
        raise UsageError(f"art-autoattack needs overshoot >= 0, got {overshoot!r}")
    bs = int(batch_size)
    seed = ensemble_seed(generator)
    rng, py_rng = np.random.RandomState(seed), random.Random(seed)

    def square_member(m, a, b):
        return art_square_run(m, a, b, eps=eps, norm=norm, max_iter=int(square_iter), p_init=float(p_init),
                              restarts=int(square_restarts), scores="logits", rng=rng, py_rng=py_rng)

    members = {
        "apgd-ce": lambda m, a, b: art_apgd_run(m, a, b, eps=eps, norm=norm, eps_step=eps_step,
                                                max_iter=int(apgd_iter), restarts=int(restarts), loss="ce",
                                                rng=rng, batch_size=bs),
        "apgd-dlr": lambda m, a, b: art_apgd_run(m, a, b, eps=eps, norm=norm, eps_step=eps_step,
                                                 max_iter=int(apgd_iter), restarts=int(restarts), loss="dlr",
                                                 rng=rng, batch_size=bs),
        "deepfool": lambda m, a, b: art_deepfool_run(m, a, max_iter=int(deepfool_iter), overshoot=overshoot,
                                                     nb_grads=int(nb_grads), batch_size=bs),
        "square": square_member,
    }
    with eval_mode(model):
        logits = _predict(model, x)
        need_classes(logits.shape[1], 3, "ART AutoAttack (APGD-DLR)")
        return run_members(model, x, y, logits, {name: members[name] for name in MEMBERS},
                           lambda adv, x0, y0: _broken(model, adv, x0, y0, eps, norm), eps=eps, on_member=on_member)
