"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", https://arxiv.org/abs/2003.01690): APGD-CE, APGD-DLR and APGD-T.

A PGD with momentum (0.75) whose step size starts at 2*eps and is halved at checkpoints (22% of the
budget, then spacing shrinking by 3% down to 6%, in whole iterations) when the loss rose in at most rho = 75%
of the steps of the last interval, or when neither the step size nor the best loss changed since the previous
checkpoint; on a halving the iterate goes back to the best point found. Written from the paper; the start
(a point on the ball's surface), the schedule and the choice of returned point follow the reference code
(fra31/auto-attack), so that the same seed gives the same starts (tests/test_attack_references.py).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from epcli.attacks._common import (check_counts, check_eps, check_inputs, check_norm, dlr_loss, dlr_targeted_loss,
                                   eval_mode, flat_norm, need_classes, num_classes_of,
                                   project, rand_like, runner_up_targets)
from epcli.errors import UsageError


def checkpoints(steps: int) -> list[int]:
    """Iterations (1-based) after which APGD decides whether to halve its step size.

    As in the reference code: the first interval is int(0.22 N) iterations, each next one int(0.03 N) shorter,
    never below int(0.06 N) (each at least 1); integer arithmetic, so N=100 gives 22, 41, 57, 70, 80, 87, 93,
    99 and N=20 gives 4, 7, 9, 10, 11, ... (the paper's 0.22, 0.41, ... fractions rounded up differ).
    """
    steps = int(steps)
    k, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = [], k
    while at <= steps:
        out.append(at)
        k = max(k - shrink, least)
        at += k
    return out


def _view(t, like):
    return t.view(-1, *([1] * (like.dim() - 1)))


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The step direction: sign(g) for L-inf, g / (|g|_2 + 1e-12) for L2 (the reference's 1e-12; PGD's
    normalize_grad keeps torchattacks' 1e-10)."""
    return g.sign() if norm == "linf" else g / _view(flat_norm(g, "l2") + 1e-12, g)


def surface_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """APGD's random start, as the reference draws it: a point on the surface of the eps-ball (L-inf: uniform
    noise in [-1, 1] scaled so its largest pixel is eps; L2: a Gaussian direction of length eps), clipped to
    [0, 1]. One draw of x's shape from the generator, so a generator seeded s gives the starts of the
    reference code after torch.manual_seed(s) (on the CPU)."""
    if norm == "linf":
        t = 2 * rand_like(x, generator) - 1
    else:
        t = rand_like(x, generator, "normal")
    delta = eps * t / _view(flat_norm(t, norm) + 1e-12, x)
    return (x + delta).clamp(0.0, 1.0)


def apgd_run(model, x, objective, success, *, eps, norm, steps, generator, rho=0.75, momentum=0.75,
             start=True, x_init=None, info=None):
    """One APGD run maximising objective(logits) (per example) in the eps-ball around x.

    Returns x_adv: per example the last iterate where success(logits) held (as the reference code keeps),
    otherwise the best-loss point. x_init: the starting point (default: surface_start, or x when
    start=False). info: a dict that receives the best-loss points and losses (x_best, loss_best) and the
    step sizes.
    A step size is halved at a checkpoint when the loss rose in at most rho * (interval) of the interval's
    steps, or when it was not halved at the previous checkpoint and the best loss did not improve since; as
    in the reference, the first interval's first step is compared with a zero loss history.
    """
    b = x.shape[0]
    ckpts = set(checkpoints(steps))
    last_ckpt = 0

    def loss_grad(z):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            loss = objective(logits)
            (g,) = torch.autograd.grad(loss.sum(), z)
        return loss.detach(), g.detach(), logits.detach()

    if x_init is not None:
        x_adv = x_init.detach().clone()
    else:
        x_adv = surface_start(x, eps, norm, generator) if start else x.clone()
    loss, grad, logits = loss_grad(x_adv)
    fooled = success(logits)
    x_best_adv = x_adv.clone()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((b,), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_prev = x_adv.clone()
    loss_prev = torch.zeros_like(loss)  # the reference's zero-initialised loss history
    n_increase = torch.zeros(b, device=x.device)
    best_at_ckpt = loss_best.clone()
    reduced_at_ckpt = torch.ones(b, dtype=torch.bool, device=x.device)
    for k in range(steps):
        with torch.no_grad():
            a = momentum if k > 0 else 1.0
            z = project(x_adv + _view(step, x) * _direction(grad, norm), x, eps, norm)
            x_new = project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps, norm)
            x_prev = x_adv
            x_adv = x_new
        loss, grad, logits = loss_grad(x_adv)
        # per-image updates with torch.where, not boolean indexing: no host sync per step (each x[mask] is one)
        now = success(logits)
        x_best_adv = torch.where(_view(now, x), x_adv, x_best_adv)  # the latest successful iterate, as the reference
        fooled |= now
        n_increase += (loss > loss_prev).float()
        loss_prev = loss
        better = loss > loss_best
        x_best, grad_best = torch.where(_view(better, x), x_adv, x_best), torch.where(_view(better, x), grad, grad_best)
        loss_best = torch.where(better, loss, loss_best)
        if k + 1 in ckpts:
            h = k + 1 - last_ckpt
            reduce = (n_increase <= rho * h) | (~reduced_at_ckpt & (best_at_ckpt >= loss_best))
            reduced_at_ckpt = reduce
            best_at_ckpt = loss_best.clone()
            step = torch.where(reduce, step / 2, step)
            # back to the best point; the momentum term keeps the previous iterate, as in the reference
            x_adv, grad = torch.where(_view(reduce, x), x_best, x_adv), torch.where(_view(reduce, x), grad_best, grad)
            n_increase.zero_()
            last_ckpt = k + 1
    if info is not None:
        info.update(x_best=x_best, loss_best=loss_best, step=step)
    return torch.where(_view(fooled, x), x_best_adv, x_best), fooled


def _cascade(model, x, y, runs, run_fn, done=None):
    """Call run_fn(idx, r) for r in range(runs) on the examples not yet fooled (done: those fooled before
    any run, left as they are); keep the first success."""
    out = x.clone()
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if done is None else done.clone()
    for r in range(runs):
        idx = (~done).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        adv, ok = run_fn(idx, r)
        # first run: take every point (best loss for the unsuccessful); later runs: only successes
        take = torch.ones_like(ok) if r == 0 else ok
        out[idx[take]] = adv[take]
        done[idx[ok]] = True
    return out


def apgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
         targeted: bool = False, generator: torch.Generator | None = None, loss: str = "ce",
         steps: int = 100, restarts: int = 1, rho: float = 0.75) -> torch.Tensor:
    """APGD with cross-entropy ("ce") or DLR ("dlr") loss; AutoAttack's defaults (100 steps, rho 0.75).

    Untargeted: y are true labels. targeted=True: y are target labels; the loss becomes -CE(target) or
    the DLR margin of the target class, success means predicting the target. As in the reference, only
    the examples not already fooled by the clean image are attacked (the others come back unchanged), and
    restarts (random starts) run only on the examples not yet fooled.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if loss not in ("ce", "dlr"):
        raise UsageError(f"unknown APGD loss {loss!r}: use 'ce' or 'dlr'")
    if int(steps) < 1 or int(restarts) < 1:
        raise UsageError("steps and restarts must be >= 1")
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        if loss == "dlr" or targeted:
            need_classes(num_classes_of(model, x), 3, "APGD-DLR" if loss == "dlr" else "targeted APGD")

        def run(idx, r):
            yy = y[idx]
            if targeted:
                obj = (lambda z: -F.cross_entropy(z, yy, reduction="none")) if loss == "ce" \
                    else (lambda z: -dlr_loss(z, yy))
                ok = lambda z: z.argmax(1) == yy  # noqa: E731
            else:
                obj = (lambda z: F.cross_entropy(z, yy, reduction="none")) if loss == "ce" \
                    else (lambda z: dlr_loss(z, yy))
                ok = lambda z: z.argmax(1) != yy  # noqa: E731
            return apgd_run(model, x[idx], obj, ok, eps=eps, norm=norm, steps=int(steps),
                            generator=generator, rho=rho)

        with torch.no_grad():
            pred = model(x).argmax(1)
        return _cascade(model, x, y, int(restarts), run, done=(pred == y) if targeted else (pred != y))


def apgd_ce(model, x, y, *, eps, norm="linf", targeted=False, generator=None, steps=100, restarts=1,
            rho=0.75):
    """APGD with the cross-entropy loss (AutoAttack standard: 100 steps, 1 restart)."""
    return apgd(model, x, y, eps=eps, norm=norm, targeted=targeted, generator=generator, loss="ce",
                steps=steps, restarts=restarts, rho=rho)


def apgd_dlr(model, x, y, *, eps, norm="linf", targeted=False, generator=None, steps=100, restarts=1,
             rho=0.75):
    """APGD with the DLR loss (needs >= 3 classes)."""
    return apgd(model, x, y, eps=eps, norm=norm, targeted=targeted, generator=generator, loss="dlr",
                steps=steps, restarts=restarts, rho=rho)


def apgd_t(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
           targeted: bool = False, generator: torch.Generator | None = None, steps: int = 100,
           restarts: int = 1, n_target_classes: int = 9, rho: float = 0.75) -> torch.Tensor:
    """APGD-T: APGD with the targeted DLR loss against each of the n_target_classes runner-up classes
    (ranked by the clean logits), in turn, on the examples still robust. y are the TRUE labels: the
    attack chooses its own targets, so targeted=True is refused. Needs >= 3 classes; n_target_classes is
    capped at num_classes - 1.
    """
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if targeted:
        raise UsageError("apgd-t picks its own target classes: pass the true labels with targeted=False")
    check_counts("apgd-t", steps=steps, restarts=restarts, n_target_classes=n_target_classes)
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        ranked, n_t, done = runner_up_targets(model, x, y, n_target_classes, "APGD-T (targeted DLR)")
        c = ranked.shape[1]
        out = x.clone()
        first = True
        for k in range(n_t):
            def run(idx, r, k=k):
                yy = y[idx]
                # k-th runner-up among classes other than y
                order = ranked[idx]
                order = order[order != yy[:, None]].view(len(idx), c - 1)
                tgt = order[:, k]
                return apgd_run(model, x[idx], lambda z: dlr_targeted_loss(z, yy, tgt),
                                lambda z: z.argmax(1) != yy, eps=eps, norm=norm, steps=int(steps),
                                generator=generator, rho=rho)
            idx = (~done).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            sub = _cascade(model, x[idx], y[idx], int(restarts), lambda i, r: run(idx[i], r))
            with torch.no_grad():
                ok = model(sub).argmax(1) != y[idx]
            take = torch.ones_like(ok) if first else ok
            out[idx[take]] = sub[take]
            done[idx[ok]] = True
            first = False
        return out
