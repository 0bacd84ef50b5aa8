"""Shared pieces of every attack: validation, eps-ball projection, losses, eval mode, seeded noise.

Everything works in pixel space: images are float tensors in [0, 1] of shape (B, C, H, W) and eps is
measured in the same units (L-inf: max |delta|, L2: Euclidean norm of the flattened delta, per example).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from epcli.errors import UsageError

NORMS = ("linf", "l2")
_NORM_ALIASES = {"linf": "linf", "inf": "linf", "li": "linf", "l_inf": "linf",
                 "l2": "l2", "2": "l2"}


def check_norm(norm) -> str:
    """Canonical norm name ("linf" or "l2"); anything else is a UsageError."""
    key = str(norm).strip().lower().replace("∞", "inf")
    if key not in _NORM_ALIASES:
        raise UsageError(f"unknown norm {norm!r}: use 'linf' or 'l2'")
    return _NORM_ALIASES[key]


def check_eps(eps) -> float:
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"eps must be a number, got {eps!r}") from None
    if not value >= 0 or value != value or value == float("inf"):
        raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


ATTACK_DTYPES = (torch.float32, torch.float64)


def check_attack_dtype(dtype: torch.dtype, what: str) -> None:
    """Attacks run in float32 or float64: in 16 bits the DLR and L2 normalisers (1e-12) vanish and steps of a
    fraction of eps round away (float16 APGD-DLR L2 returned NaN images, FAB-T and C&W L2 failed)."""
    if dtype not in ATTACK_DTYPES:
        raise UsageError(f"attacks run in float32 or float64; the {what} are {dtype} (use model.float() and "
                         "float32 images)")


def check_inputs(x: torch.Tensor, y: torch.Tensor, clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return the images detached (clipped to [0, 1] unless clip=False) and the labels on
    their device."""
    if x.dim() != 4:
        raise UsageError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if not x.is_floating_point():  # clamping uint8 to [0, 1] would attack a binarised image
        raise UsageError(f"images must be floating point in [0, 1], got {x.dtype} (divide uint8 images by 255)")
    check_attack_dtype(x.dtype, "images")
    x = x.detach().clamp(0.0, 1.0) if clip else x.detach()
    return x, y.to(x.device)


def check_counts(what: str, **counts) -> None:
    """Steps, restarts, queries, target classes: each a whole number >= 1 (0 would silently attack nothing, or
    return the random start)."""
    bad = [f"{k}={v!r}" for k, v in counts.items() if int(v) < 1]
    if bad:
        raise UsageError(f"{what} needs {', '.join(counts)} >= 1, got {', '.join(bad)}")


def need_classes(num_classes: int, minimum: int, what: str) -> None:
    if num_classes < minimum:
        raise UsageError(f"{what} needs at least {minimum} classes (the DLR loss ranks logits); "
                         f"this model has {num_classes}")


def runner_up_targets(model, x: torch.Tensor, y: torch.Tensor, n_target_classes: int, what: str):
    """For targeted attacks that pick their own targets (APGD-T, FAB-T): the classes ranked by the clean
    logits (B, C), the number of target classes to try (<= C - 1) and the examples already misclassified."""
    with torch.no_grad():
        logits = model(x)
    c = logits.shape[1]
    need_classes(c, 3, what)
    return logits.argsort(dim=1, descending=True), max(1, min(int(n_target_classes), c - 1)), logits.argmax(1) != y


def flat_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of a (B, ...) tensor."""
    v = v.flatten(1)
    return v.abs().amax(1) if norm == "linf" else v.norm(p=2, dim=1)


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps, norm: str, clip: bool = True) -> torch.Tensor:
    """Project onto the eps-ball around x (per example) and then clip to [0, 1] (unless clip=False: the
    paper's ART setting, clip_values=None).

    Clipping after the projection never leaves the ball: x is in [0, 1], so clipping only moves each
    pixel toward x. eps may be a float or a (B,) tensor.
    """
    delta = x_adv - x
    if not torch.is_tensor(eps):
        eps = torch.full((x.shape[0],), float(eps), device=x.device, dtype=x.dtype)
    if norm == "linf":
        e = _view(eps, x)
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        n = flat_norm(delta, "l2")
        factor = torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        delta = delta * _view(factor, x)
    return (x + delta).clamp(0.0, 1.0) if clip else x + delta


def normalize_grad(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction: sign for L-inf, unit L2 direction for L2 (zero stays zero)."""
    if norm == "linf":
        return g.sign()
    n = flat_norm(g, "l2")
    return g / _view(n + 1e-10, g)


def rand_like(x: torch.Tensor, generator: torch.Generator | None, kind: str = "uniform") -> torch.Tensor:
    """Seeded noise shaped like x, drawn on the generator's device and moved to x's device."""
    dev = generator.device if generator is not None else x.device
    if kind == "uniform":
        r = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype)
    else:
        r = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return r.to(x.device)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the eps-ball: uniform per pixel for L-inf, uniform in the ball for L2."""
    if norm == "linf":
        delta = (2 * rand_like(x, generator) - 1) * eps
    else:
        d = rand_like(x, generator, "normal")
        d = d / _view(flat_norm(d, "l2").clamp_min(1e-12), x)
        u = rand_like(x[:, :1, :1, :1], generator)  # (B,1,1,1)
        radius = eps * u.pow(1.0 / x[0].numel())
        delta = d * radius
    return project(x + delta, x, eps, norm)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put the model (every submodule) in eval mode for the attack and restore each module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted difference-of-logits-ratio loss per example (higher = closer to misclassified).

    -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), with pi the logits sorted in decreasing order.
    """
    srt, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return -(z_y - other) / (srt[:, 0] - srt[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR per example: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2). With 3 classes, z_pi3 alone."""
    srt, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    # z_pi1 - (z_pi3 + z_pi4)/2 in fra31's operation order: a one-ulp difference in the loss flips APGD's
    # step-size tests on ties (torchattacks' z_pi1 - z_pi3/2 - z_pi4/2 moved an image by 3.7e-3 in 20 steps)
    low = (srt[:, 2] + srt[:, 3]) / 2 if logits.shape[1] >= 4 else srt[:, 2]
    return -(z_y - z_t) / (srt[:, 0] - low + 1e-12)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C&W margin per example: max_{i != y} z_i - z_y (positive = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return other - z_y


LOSSES = ("ce", "dlr", "margin")


def per_example_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    if name in ("margin", "cw"):
        return margin_loss(logits, y)
    raise UsageError(f"unknown loss {name!r}: use one of {', '.join(LOSSES)}")


def num_classes_of(model: torch.nn.Module, x: torch.Tensor) -> int:
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and "num_classes" in spec:
        return int(spec["num_classes"])
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    with torch.no_grad():
        return int(model(x[:1]).shape[1])
