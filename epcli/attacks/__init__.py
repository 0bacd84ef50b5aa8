"""Adversarial attacks: one file per family, a registry, evaluation and reliability checks.

Every attack has the signature `fn(model, x, y, *, eps, norm, targeted=False, generator=None, **params)
-> x_adv`, with x and x_adv float images in [0, 1] and x_adv inside the eps-ball (L-inf or L2, per example).
"""

from __future__ import annotations

from epcli.attacks._common import NORMS, check_norm, eval_mode, project
from epcli.attacks.pgd import fgsm, pgd

ATTACKS = {
    "fgsm": fgsm,
    "pgd": pgd,
}

__all__ = ["ATTACKS", "NORMS", "check_norm", "eval_mode", "fgsm", "pgd", "project"]
