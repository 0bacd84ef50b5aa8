"""The EP student: a feed-forward copy of an EP-CNN, distilled from the teacher's fixed points.

The EP-CNN's state l at a fixed point is s*_l = σ(P(W_l ⋆ s*_{l-1} + b_l) + W_{l+1}ᵀ ⋆ Unpool(s*_{l+1})): a
bottom-up term plus the feedback of the layer above. The student keeps the bottom-up term only and computes its
layers in one pass, s_l = σ(P(W_l ⋆ s_{l-1} + b_l)) with s_0 = the normalised image, in the teacher's order
(conv, then pool, then σ), so its layer l has the shape of the teacher's state l and can be regressed onto it.
Hidden linear layers and the read-out follow the teacher's as well ("ce": logits = W_o vec(s_N) + b_o outside
the states; "mse": the last state is the num_classes-wide layer and is the logits).

This is the natural guess for Mansingh, Kenyon & Teti (NFAM 2025), whose protocol is not known (see
docs/models.md, "Distillation"). The module imports no store, CLI or rich.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from epcli.ep import ACTIVATIONS, PRESETS, layer_stack
from epcli.errors import UsageError

__all__ = ["EPStudent", "ARCH_KEYS", "arch_from", "init_from_teacher", "check_matches_teacher"]

# The keys of an EP-CNN spec that fix the student's architecture (T, tol, update, solver, grad_mode are how the
# teacher relaxes, not what it computes at its fixed point).
ARCH_KEYS = ("in_channels", "image_size", "channels", "kernels", "paddings", "pools", "fc", "activation", "readout",
             "mean", "std", "init_gain")


def arch_from(teacher_spec: dict | None, num_classes: int, given: dict) -> dict:
    """The student's architecture: the teacher spec's ARCH_KEYS, or the keys given, the rest from the paper's
    EP-CNN preset (`ep-cnn`, or `ep-cnn-cifar100` for 100 classes). Giving both is refused: a student that
    differs from its teacher has no layer-wise targets."""
    given = {k: v for k, v in given.items() if v is not None}
    if teacher_spec is not None:
        if not isinstance(teacher_spec, dict) or not teacher_spec.get("channels"):
            raise UsageError(f"teacher_spec must be an EP-CNN spec (a dict with channels), got {teacher_spec!r:.80}")
        if given:
            raise UsageError(f"ep-student: give teacher_spec or the architecture ({', '.join(sorted(given))}), "
                             "not both: the student copies its teacher's layers")
        nc = teacher_spec.get("num_classes", num_classes)
        if nc != num_classes:
            raise UsageError(f"ep-student: the teacher has {nc} classes, the student {num_classes}")
        defaults = {"in_channels": 3, "image_size": 32, "kernels": 3, "paddings": 1, "pools": None, "fc": [],
                    "activation": "my_hard_sig", "readout": "ce", "init_gain": 1.0}
        return {k: teacher_spec.get(k, defaults.get(k)) for k in ARCH_KEYS}
    preset = PRESETS["ep-cnn-cifar100" if num_classes == 100 else "ep-cnn"]
    base = {"in_channels": 3, "image_size": 32, "fc": [], "activation": "my_hard_sig", "readout": "ce",
            "init_gain": 1.0, **{k: v for k, v in preset.items() if k in ARCH_KEYS}}
    return {k: given.get(k, base.get(k)) for k in ARCH_KEYS}


def _list(v, n: int, what: str) -> list[int]:
    v = [v] * n if isinstance(v, int) and not isinstance(v, bool) else list(v)
    if len(v) != n or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in v):
        raise UsageError(f"ep-student: {what} needs {n} non-negative integers (one per conv layer), got {v!r}")
    return v


class EPStudent(nn.Module):
    """Images in [0, 1] (B, C, H, W) -> logits, in one bottom-up pass through an EP-CNN's layers.

    `states(x)` returns every layer (the distillation targets' shapes, `self.shapes` per sample); `forward(x)`
    returns the logits only, so the student is a plain classifier for attacks, corruptions and reports.
    """

    def __init__(self, num_classes: int, *, in_channels: int, image_size, channels, kernels, paddings, pools,
                 fc, activation: str, readout: str, mean, std, init_gain: float = 1.0):
        super().__init__()
        n = len(channels) if isinstance(channels, (list, tuple)) else 0
        if n < 1 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise UsageError(f"ep-student: channels must be a non-empty list of positive ints, got {channels!r}")
        kernels, paddings = _list(kernels, n, "kernels"), _list(paddings, n, "paddings")
        pools = "m" * n if pools is None else pools
        if not isinstance(pools, str) or len(pools) != n or set(pools) - set("mai"):
            raise UsageError(f"ep-student: pools must be {n} letters from m (max), a (avg), i (none), got {pools!r}")
        if activation not in ACTIVATIONS:
            raise UsageError(f"ep-student: unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if readout not in ("ce", "mse"):
            raise UsageError(f"ep-student: unknown readout {readout!r}: use ce or mse")
        if isinstance(init_gain, bool) or not isinstance(init_gain, (int, float)) or not init_gain > 0:
            raise UsageError(f"ep-student: init_gain must be a positive number, got {init_gain!r}")
        hw = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        if len(mean) != in_channels or len(std) != in_channels or min(std) <= 0:
            raise UsageError(f"ep-student: mean/std need {in_channels} entries with std > 0")
        self.num_classes, self.readout, self.pools, self.paddings = num_classes, readout, pools, paddings
        self.act = ACTIVATIONS[activation]
        # constants live in the spec, not in the weights (as models.Normalize)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.convs, self.fcs, self.out, self.shapes = layer_stack(num_classes, in_channels, hw, channels, kernels,
                                                                  paddings, pools, fc, readout)
        if init_gain != 1.0:  # the teacher's init (EPCNN scales its couplings the same way)
            with torch.no_grad():
                for m in self._couplings():
                    m.weight.mul_(float(init_gain))
        self.spec = {"in_channels": in_channels, "image_size": image_size, "channels": list(channels),
                     "kernels": kernels, "paddings": paddings, "pools": pools, "fc": [int(v) for v in fc],
                     "activation": activation, "readout": readout, "mean": [float(v) for v in mean],
                     "std": [float(v) for v in std], "init_gain": float(init_gain)}

    def _couplings(self) -> list[nn.Module]:
        return list(self.convs) + list(self.fcs) + ([self.out] if self.out is not None else [])

    def layer_param_groups(self) -> list[list[nn.Parameter]]:
        """[conv1, ..., convN, fc1, ..., readout], as the EP-CNN's: per-layer learning rates fit both."""
        return [list(m.parameters()) for m in self._couplings()]

    def states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer s_1..s_N of one bottom-up pass: s_l = σ(P(W_l ⋆ s_{l-1} + b_l)), s_0 = normalised x."""
        s = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = []
        for conv, pool in zip(self.convs, self.pools):
            z = conv(s)
            z = F.max_pool2d(z, 2) if pool == "m" else F.avg_pool2d(z, 2) if pool == "a" else z
            s = self.act(z)
            out.append(s)
        for fc in self.fcs:
            s = self.act(fc(s.flatten(1)))
            out.append(s)
        return out

    def logits(self, states: list[torch.Tensor]) -> torch.Tensor:
        """The read-out of the last layer (the teacher's: W_o vec(s_N) + b_o, or s_N itself for "mse")."""
        return states[-1] if self.out is None else self.out(states[-1].flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.states(x))


def check_matches_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The student's layers have the teacher's state shapes (else there is nothing to regress onto)."""
    have, want = [tuple(s) for s in getattr(student, "shapes", [])], [tuple(s) for s in getattr(teacher, "shapes", [])]
    if have != want:
        raise UsageError(f"the student's layers {have} do not match the teacher's states {want}: build the student "
                         "from the teacher's spec (create_model('ep-student', teacher_spec=teacher.spec))")


@torch.no_grad()
def init_from_teacher(student: EPStudent, teacher: nn.Module) -> None:
    """Copy the teacher's couplings and read-out into the student (same shapes, layer by layer)."""
    check_matches_teacher(student, teacher)
    mine, theirs = student._couplings(), teacher._couplings()
    if len(mine) != len(theirs):
        raise UsageError(f"the student has {len(mine)} weighted layers, the teacher {len(theirs)}")
    for a, b in zip(mine, theirs):
        a.weight.copy_(b.weight.to(a.weight.dtype))
        a.bias.copy_(b.bias.to(a.bias.dtype))
