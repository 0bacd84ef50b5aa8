"""FGSM and PGD (Madry et al. 2018, https://arxiv.org/abs/1706.06083), L-inf and L2.

One step of PGD: x <- Proj_{B(x0, eps) ∩ [0,1]}(x + step_size * d), where d is sign(grad) for L-inf and
grad / ||grad||_2 for L2. Defaults follow the paper's ART preset (§5.2 of the fact sheet): 20 steps,
step size 2.5 * eps / steps, no random start, untargeted. This is the one PGD implementation in epcli:
evaluation and adversarial training both call `pgd`.
"""

from __future__ import annotations

import torch

from epcli.attacks._common import (check_eps, check_inputs, check_norm, eval_mode, normalize_grad,
                                   per_example_loss, project)
from epcli.attacks._common import random_start as _random_start
from epcli.errors import UsageError


def _fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def _pgd_run(model, x, y, eps, norm, steps, step_size, start, targeted, loss, generator, clip=True):
    x_adv = _random_start(x, eps, norm, generator) if start else x.clone()
    sign = -1.0 if targeted else 1.0
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            objective = sign * per_example_loss(loss, model(x_adv), y).sum()
            (grad,) = torch.autograd.grad(objective, x_adv)
        x_adv = project(x_adv.detach() + step_size * normalize_grad(grad, norm), x, eps, norm, clip)
    return x_adv.detach()


def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
        steps: int = 20, step_size: float | None = None, random_start: bool = False, restarts: int = 1,
        targeted: bool = False, loss: str = "ce", clip: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent inside the L-inf or L2 eps-ball, clipped to [0, 1] (unless clip=False).

    Args:
        model: nn.Module mapping (B, C, H, W) images in [0, 1] to logits; put in eval mode during the
            attack and restored afterwards. Only the input gradient is computed (parameter .grad untouched).
        x: images in [0, 1], float (B, C, H, W). y: labels (B,), or target labels when `targeted`.
        eps: radius in pixel units. norm: "linf" or "l2".
        steps: gradient steps. step_size: default 2.5 * eps / steps (the paper's preset).
        random_start: start from a random point of the ball (needed for restarts > 1 to differ).
        restarts: extra runs are made only for examples not yet fooled; per example the first fooling
            run wins, otherwise the run with the highest loss.
        loss: "ce" (cross-entropy), "dlr" (difference of logits ratio) or "margin" (C&W margin).
        clip: False leaves x and x_adv unclipped (the paper's ART run, clip_values=None): x_adv is then only
            inside the eps-ball, not necessarily in [0, 1].
        generator: torch.Generator for the random start (same seed, same result).

    Returns:
        x_adv (B, C, H, W), float, in [0, 1] and inside the eps-ball of each example.
    """
    norm = check_norm(norm)
    eps = check_eps(eps)
    x, y = check_inputs(x, y, clip=bool(clip))
    steps, restarts = int(steps), int(restarts)
    if steps < 1 or restarts < 1:
        raise UsageError(f"steps and restarts must be >= 1, got steps={steps}, restarts={restarts}")
    step_size = 2.5 * eps / steps if step_size is None else float(step_size)
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        best = _pgd_run(model, x, y, eps, norm, steps, step_size, random_start, targeted, loss, generator, clip)
        if restarts == 1:
            return best
        sign = -1.0 if targeted else 1.0
        with torch.no_grad():
            logits = model(best)
        done = _fooled(logits, y, targeted)
        best_loss = sign * per_example_loss(loss, logits, y)
        for _ in range(restarts - 1):
            todo = (~done).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            cand = _pgd_run(model, x[todo], y[todo], eps, norm, steps, step_size, random_start,
                            targeted, loss, generator, clip)
            with torch.no_grad():
                logits = model(cand)
            c_fooled = _fooled(logits, y[todo], targeted)
            c_loss = sign * per_example_loss(loss, logits, y[todo])
            better = c_fooled | (c_loss > best_loss[todo])
            idx = todo[better]
            best[idx] = cand[better]
            best_loss[idx] = c_loss[better]
            done[idx] = c_fooled[better]
        return best


def fgsm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
         targeted: bool = False, loss: str = "ce", clip: bool = True,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, https://arxiv.org/abs/1412.6572).

    One step of size eps: sign(grad) for L-inf; for L2 the normalised gradient (FGM). Deterministic;
    `generator` is accepted for the common signature and unused.
    """
    return pgd(model, x, y, eps=eps, norm=norm, steps=1, step_size=check_eps(eps), random_start=False,
               restarts=1, targeted=targeted, loss=loss, clip=clip, generator=generator)
