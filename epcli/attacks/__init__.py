"""Adversarial attacks: one file per family, a registry, evaluation and reliability checks.

Every attack has the signature `fn(model, x, y, *, eps, norm, targeted=False, generator=None, **params)
-> x_adv`, with x and x_adv float images in [0, 1] and x_adv inside the eps-ball (L-inf or L2, per example).
"""

from __future__ import annotations

from epcli.attacks._common import NORMS, check_norm, eval_mode, project
from epcli.attacks.apgd import apgd, apgd_ce, apgd_dlr, apgd_t
from epcli.attacks.art_autoattack import art_autoattack
from epcli.attacks.art_square import art_square
from epcli.attacks.autoattack import autoattack
from epcli.attacks.cw import cw
from epcli.attacks.fab import fab_t
from epcli.attacks.pgd import fgsm, pgd
from epcli.attacks.square import square
from epcli.errors import UsageError

ATTACKS = {
    "fgsm": fgsm,
    "pgd": pgd,
    "cw": cw,
    "apgd-ce": apgd_ce,
    "apgd-dlr": apgd_dlr,
    "apgd-t": apgd_t,
    "fab-t": fab_t,
    "square": square,
    "art-square": art_square,
    "autoattack": autoattack,
    "art-autoattack": art_autoattack,
}
WHITE_BOX = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "autoattack", "art-autoattack")
BLACK_BOX = ("square", "art-square")
NORMS_OF = {name: (("l2",) if name == "cw" else NORMS) for name in ATTACKS}


def get_attack(name: str):
    """The attack function for a registry name; unknown names are a UsageError listing the choices."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    return ATTACKS[key]


from epcli.attacks.evaluate import (  # noqa: E402
    MIN_NORM, SELF_TARGETED, UNTARGETED, check_grad_mode, evaluate, resolve_params)
from epcli.attacks.checks import check_reliability, strength_check  # noqa: E402

__all__ = ["ATTACKS", "BLACK_BOX", "MIN_NORM", "NORMS", "NORMS_OF", "SELF_TARGETED", "UNTARGETED", "WHITE_BOX",
           "apgd", "apgd_ce", "apgd_dlr", "apgd_t", "art_autoattack", "art_square", "autoattack", "check_grad_mode",
           "check_norm", "check_reliability", "cw", "eval_mode", "evaluate", "fab_t", "fgsm", "get_attack", "pgd",
           "project", "resolve_params", "square", "strength_check"]
