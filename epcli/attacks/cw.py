"""Carlini & Wagner L2 (Carlini & Wagner 2017, https://arxiv.org/abs/1608.04644) with a binary search
over the trade-off constant c.

Minimises ||x' - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa) (untargeted; targeted uses
max_{i!=t} z_i - z_t) over x' = (tanh(w) + 1) / 2 with Adam. Per example, c starts at initial_const and is
multiplied by 10 until an adversarial example is found, then bisected. The attack is minimum-norm and its
optimisation never looks at eps: `cw_min_norm` runs it once and `cw_at_eps` reads the answer at any eps (the
smallest adversarial example found when its L2 norm is <= eps, otherwise the last iterate projected onto the
ball), so evaluate() runs it once per example for a whole eps list. L2 only.
"""

from __future__ import annotations

import torch

from epcli.attacks._common import (check_eps, check_inputs, check_norm, eval_mode, margin_loss,
                                   project)
from epcli.errors import UsageError


def cw(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "l2",
       targeted: bool = False, generator: torch.Generator | None = None, steps: int = 100,
       binary_search_steps: int = 9, initial_const: float = 1e-2, kappa: float = 0.0, lr: float = 0.01,
       abort_early: bool = True) -> torch.Tensor:
    """C&W-L2: defaults 9 binary-search steps x 100 Adam steps, c0 = 0.01, kappa 0, lr 0.01.

    Deterministic (generator unused). norm must be "l2".
    """
    norm, eps = check_norm(norm), check_eps(eps)
    if norm != "l2":
        raise UsageError("cw is an L2 attack: use norm='l2' (for L-inf use pgd or apgd)")
    x, y = check_inputs(x, y)
    if eps == 0:
        return x.clone()
    found = cw_min_norm(model, x, y, targeted=targeted, steps=steps, binary_search_steps=binary_search_steps,
                        initial_const=initial_const, kappa=kappa, lr=lr, abort_early=abort_early)
    return cw_at_eps(x, found, eps)


def cw_at_eps(x: torch.Tensor, found: dict, eps: float) -> torch.Tensor:
    """The C&W answer at radius eps: the smallest adversarial example if its norm is <= eps, otherwise the
    last iterate projected onto the L2 ball (which is rarely adversarial)."""
    if eps == 0:
        return x.clone()
    ok = found["norm"] <= eps * (1 + 1e-6)
    return project(torch.where(ok.view(-1, 1, 1, 1), found["best"], found["last"]), x, eps, "l2")


def cw_min_norm(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, targeted: bool = False,
                steps: int = 100, binary_search_steps: int = 9, initial_const: float = 1e-2, kappa: float = 0.0,
                lr: float = 0.01, abort_early: bool = True) -> dict:
    """Run C&W-L2 once. Returns dict(best, norm, last): per example the smallest adversarial example found
    (x where none), its L2 norm (inf where none) and the last iterate."""
    x, y = check_inputs(x, y)
    if int(steps) < 1 or int(binary_search_steps) < 1:
        raise UsageError("cw needs steps >= 1 and binary_search_steps >= 1")
    n = x.shape[0]
    dev = x.device
    # tanh space; pixels at exactly 0 or 1 (atanh = ±inf) start 5e-7 inside. The distance is optimised to that
    # start x0, as in Carlini's code: its gradient is then exactly 0 at the start (Adam scales every coordinate's
    # step to about lr, so even a 1e-7 gradient would take full-size steps). The norm that is recorded and
    # compared with eps is to x itself.
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    x0 = (torch.tanh(w0) + 1) / 2
    dt = x.dtype
    lo = torch.zeros(n, device=dev, dtype=dt)
    hi = torch.full((n,), 1e10, device=dev, dtype=dt)
    const = torch.full((n,), float(initial_const), device=dev, dtype=dt)
    best_norm = torch.full((n,), float("inf"), device=dev, dtype=dt)
    best = x.clone()
    last = x.clone()

    def margin(logits):  # > 0 while not adversarial (with confidence kappa)
        m = margin_loss(logits, y)  # max other - z_y
        return (-m if not targeted else m) + kappa

    with eval_mode(model):
        for _ in range(int(binary_search_steps)):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(n, dtype=torch.bool, device=dev)
            prev = float("inf")
            for k in range(int(steps)):
                with torch.enable_grad():
                    xa = (torch.tanh(w) + 1) / 2
                    logits = model(xa)
                    f = margin(logits).clamp_min(0)
                    total = ((xa - x0).flatten(1).pow(2).sum(1) + const * f).sum()
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                opt.step()
                with torch.no_grad():
                    pred = logits.argmax(1)
                    adv = (pred == y) if targeted else (pred != y)
                    if kappa > 0:
                        adv &= f <= 0
                    d = (xa.detach() - x).flatten(1).norm(dim=1)
                    better = adv & (d < best_norm)
                    # torch.where, not best[better] = ...: no host sync per step
                    best = torch.where(better.view(-1, 1, 1, 1), xa.detach(), best)
                    best_norm = torch.where(better, d, best_norm)
                    found |= adv
                if abort_early and k % max(int(steps) // 10, 1) == 0:
                    if total.item() > prev * 0.9999:
                        break
                    prev = total.item()
            last = ((torch.tanh(w) + 1) / 2).detach()
            hi = torch.where(found, torch.minimum(hi, const), hi)
            lo = torch.where(found, lo, torch.maximum(lo, const))
            const = torch.where(hi < 1e9, (lo + hi) / 2, const * 10)
    return {"best": best, "norm": best_norm, "last": last}
