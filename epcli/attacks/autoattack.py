"""AutoAttack "standard" (Croce & Hein 2020, https://arxiv.org/abs/2003.01690): APGD-CE, APGD-T, FAB-T and
Square run in that order, each only on the points still robust; the result is the worst case per example.

Published defaults: APGD-CE 100 steps, 1 restart; APGD-T 100 steps, 9 target classes, 1 restart; FAB-T 100
steps, 9 target classes, 1 restart; Square 5000 queries, p_init 0.8, schedule not rescaled. For L2 the same
list. This is fra31's ensemble (not ART's, which swaps FAB-T/APGD-T for DeepFool/APGD-DLR, and not
torchattacks' wrapper, which runs 10 steps), our own code. As fra31's AutoAttack(seed=s) reseeds every member
with s, each member here gets a fresh generator seeded with the given generator's initial seed: with a CPU
generator seeded s the members draw what fra31's AutoAttack(seed=s) draws, and give its images
(tests/test_attack_references.py, test_square_reference.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from epcli.attacks._common import check_counts, check_eps, check_inputs, check_norm, eval_mode, need_classes
from epcli.attacks.apgd import apgd_ce, apgd_t
from epcli.attacks.fab import fab_t
from epcli.attacks.square import square
from epcli.errors import UsageError

MEMBERS = ("apgd-ce", "apgd-t", "fab-t", "square")


def member_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A fresh generator on the same device seeded with generator's initial seed (None stays None: the
    global stream), so that every member starts from the same seed, as in the reference."""
    if generator is None:
        return None
    return torch.Generator(device=generator.device).manual_seed(generator.initial_seed())


def autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "linf",
               targeted: bool = False, generator: torch.Generator | None = None, version: str = "standard",
               steps: int = 100, n_target_classes: int = 9, n_queries: int = 5000, p_init: float = 0.8,
               on_member: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """AutoAttack standard; on_member(name, robust_mask) is called after each member with the points still
    robust (BoolTensor over the batch). y are true labels; targeted=True is refused (APGD-T/FAB-T pick
    their own targets)."""
    norm, eps = check_norm(norm), check_eps(eps)
    x, y = check_inputs(x, y)
    if version != "standard":
        raise UsageError(f"unknown AutoAttack version {version!r}: only 'standard' is implemented")
    if targeted:
        raise UsageError("autoattack is untargeted (its targeted members choose their own targets)")
    # checked here, not by a member: a member runs only when images survive the ones before it
    check_counts("autoattack", steps=steps, n_target_classes=n_target_classes, n_queries=n_queries)
    if not 0 < p_init <= 1:
        raise UsageError(f"autoattack needs 0 < p_init <= 1, got {p_init!r}")
    fresh = lambda: member_generator(generator)  # noqa: E731
    members = {
        "apgd-ce": lambda m, a, b: apgd_ce(m, a, b, eps=eps, norm=norm, generator=fresh(), steps=steps),
        "apgd-t": lambda m, a, b: apgd_t(m, a, b, eps=eps, norm=norm, generator=fresh(), steps=steps,
                                         n_target_classes=n_target_classes),
        "fab-t": lambda m, a, b: fab_t(m, a, b, eps=eps, norm=norm, generator=fresh(), steps=steps,
                                       n_target_classes=n_target_classes),
        "square": lambda m, a, b: square(m, a, b, eps=eps, norm=norm, generator=fresh(), n_queries=n_queries,
                                         p_init=p_init, rescale_schedule=False),
    }
    with eval_mode(model):
        with torch.no_grad():
            logits = model(x)
        # APGD-T and FAB-T rank the logits: refuse now, not after APGD-CE and only if images survive it
        need_classes(logits.shape[1], 3, "AutoAttack (APGD-T, FAB-T)")

        def broken(adv, x0, y0):
            with torch.no_grad():
                return model(adv).argmax(1) != y0

        return run_members(model, x, y, logits, members, broken, eps=eps, on_member=on_member)


def run_members(model, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, members: dict, broken, *, eps: float,
                on_member=None) -> torch.Tensor:
    """An ensemble: each member (name -> fn(model, x, y) -> x_adv, in order) runs on the images still robust
    (their clean logits give y), keeping the images broken(adv, x, y) says it broke; on_member(name, robust
    mask) after each. Returns the adversarial images (the clean ones where nothing broke)."""
    out = x.clone()
    robust = logits.argmax(1) == y
    for name, member in members.items():
        idx = robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        if eps > 0:
            adv = member(model, x[idx], y[idx])
            hit = broken(adv, x[idx], y[idx])
            out[idx[hit]] = adv[hit]
            robust[idx[hit]] = False
        if on_member is not None:
            on_member(name, robust.clone())
    return out
