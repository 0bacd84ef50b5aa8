"""The EP-CNN: energy, explicit relaxation, EP / BPTT learning rules and gradient modes (the hot path).

One file, read top to bottom in the order things run (see docs/ep.md for the maths and the design notes):

  presets & recipes -> EPCNN (couplings, spec) -> primitive Φ -> explicit ∂Φ/∂s -> relax (fixed-point loop)
  -> forward (prediction + how it back-propagates: bptt | truncated:K | implicit | ep) -> ep_train_step

Conventions (Laborieux et al. 2021; Mansingh et al. 2024):
- Φ(x, s) = Σ_l <s_l, P_l(W_l ⋆ s_{l-1} + b_l)> (+ Σ <h_{j+1}, W_j vec(h_j) + b_j> for hidden linear layers),
  s_0 = normalised x, P = 2x2 max/avg pool. Φ is *maximised*: one step is s_l <- σ(∂Φ^β/∂s_l), synchronous.
- Φ^β = Φ - β·L(logits(s), y). With readout "ce" the logits W_o vec(s_N) + b_o sit outside Φ (only in the nudge);
  with readout "mse" the last state is a num_classes-wide layer inside Φ and L = ½‖s_N - onehot(y)‖².
- EP gradient (β -> 0): dL/dθ = -[∂Φ^β/∂θ(s^β) - ∂Φ/∂θ(s^0)]/β;
  symmetric: -[∂Φ^{+β}/∂θ(s^{+β}) - ∂Φ^{-β}/∂θ(s^{-β})]/(2β).
This module imports no store, CLI or rich: tensors in, tensors and plain dicts out.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from epcli.errors import CheckpointError, Diverged, UnknownModelError, UsageError

__all__ = ["EPCNN", "PRESETS", "EP_RECIPES", "ACTIVATIONS", "gradient_mode", "parse_grad_mode", "EQUILIBRIUM_TOL",
           "relative_residual", "prediction_residual"]

# A prediction counts as "at equilibrium" when its relative residual (`relative_residual`: the last step moved
# every layer of every sample by less than this fraction of its norm) is at most this. The report flags the rest.
EQUILIBRIUM_TOL = 1e-3

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# ---------------------------------------------------------------------------------------------------------------
# Presets (architectures) and training recipes (plain dicts merged into epcli.train.RECIPES by the trainer)
# ---------------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # The paper's CIFAR-10 net (Laborieux's P_CNN): 128-256-512-512, k3, paddings 1,1,1,0, max-pool, CE read-out.
    "ep-cnn": dict(channels=[128, 256, 512, 512], kernels=[3, 3, 3, 3], paddings=[1, 1, 1, 0], pools="mmmm",
                   mean=list(CIFAR10_MEAN), std=[3 * s for s in CIFAR10_STD], T=250),
    # CIFAR-100: conv4 widened to 1024, plain (not x3) CIFAR-100 statistics.
    "ep-cnn-cifar100": dict(channels=[128, 256, 512, 1024], kernels=[3, 3, 3, 3], paddings=[1, 1, 1, 0],
                            pools="mmmm", mean=list(CIFAR100_MEAN), std=list(CIFAR100_STD), T=250),
    # CPU demo: three layers, alternating (even/odd) sweeps, weights x1.5 at init (the default init shrinks the
    # states ~2x per layer under clamp(u/2, 0, 1): the read-out starts blind and EP learns slowly). An equilibrium
    # model: each image relaxes until its relative residual is below EQUILIBRIUM_TOL (T = 250 the cap).
    "ep-cnn-small": dict(channels=[16, 32, 64], kernels=[3, 3, 3], paddings=[1, 1, 1], pools="mmm",
                         mean=list(CIFAR10_MEAN), std=[3 * s for s in CIFAR10_STD], T=250, tol=EQUILIBRIUM_TOL,
                         update="alternate", init_gain=1.5),
    # Tests: two tiny layers.
    "ep-cnn-tiny": dict(channels=[4, 8], kernels=[3, 3], paddings=[1, 1], pools="mm",
                        mean=list(CIFAR10_MEAN), std=[3 * s for s in CIFAR10_STD], T=20),
}

_PAPER_OPT = dict(name="sgd", lr=0.05, lrs=[0.25, 0.15, 0.10, 0.08, 0.05], momentum=0.9, weight_decay=3e-4,
                  nesterov=False)
EP_RECIPES: dict[str, dict] = {
    # Mansingh et al. / Laborieux et al.: 120 epochs, cosine T_max=100 stepped per epoch (last 20 epochs at 1e-5).
    "paper-ep-cifar10": dict(model="ep-cnn", dataset="cifar10", epochs=120, batch_size=128,
                             optimizer=dict(_PAPER_OPT),
                             schedule=dict(name="cosine", t_max=100, eta_min=1e-5),
                             augment="crop-flip", pad_mode="edge", label_smoothing=0.0,
                             ep=dict(T1=250, T2=30, beta=0.5, rule="symmetric"), adv=None),
    "paper-ep-cifar100": dict(model="ep-cnn-cifar100", dataset="cifar100", epochs=120, batch_size=128,
                              optimizer=dict(_PAPER_OPT),
                              schedule=dict(name="cosine", t_max=100, eta_min=1e-5),
                              augment="crop-flip", pad_mode="reflect", label_smoothing=0.0,
                              ep=dict(T1=250, T2=30, beta=1.0, rule="symmetric"), adv=None),
    # CPU demo (embedded 5k images, 2 cores): the free phase runs each image to equilibrium (relative residual
    # < EQUILIBRIUM_TOL, T1 = 250 the cap; ~16 sweeps per image at first, ~29 by epoch 8), then a short fixed
    # ±β nudge (6 sweeps: converged nudges can change basin on this net, docs/ep.md); batch 64 with the lrs of
    # batch 32 x sqrt(2) (images stop at different sweeps, so the batch shrinks: 64 keeps per-call overheads
    # down; same accuracy in 19% less time than 32). See docs/ep.md.
    "demo-ep": dict(model="ep-cnn-small", dataset=None, epochs=8, batch_size=64,
                    optimizer=dict(name="sgd", lr=0.05, lrs=[0.28, 0.17, 0.11, 0.07], momentum=0.9,
                                   weight_decay=3e-4, nesterov=False),
                    schedule=dict(name="cosine", t_max=8, eta_min=1e-3),
                    augment="crop-flip", pad_mode="edge", label_smoothing=0.0,
                    ep=dict(T1=250, T2=6, beta=0.5, rule="symmetric", tol=EQUILIBRIUM_TOL), adv=None),
    # ep-cnn-tiny (2 conv layers + read-out: 3 learning rates) for smoke runs and tests; not tuned.
    "tiny-ep": dict(model="ep-cnn-tiny", dataset=None, epochs=3, batch_size=64,
                    optimizer=dict(name="sgd", lr=0.05, lrs=[0.2, 0.1, 0.05], momentum=0.9, weight_decay=3e-4,
                                   nesterov=False),
                    schedule=dict(name="cosine", t_max=3, eta_min=1e-3),
                    augment="crop-flip", pad_mode="edge", label_smoothing=0.0,
                    ep=dict(T1=20, T2=4, beta=0.5, rule="symmetric"), adv=None),
    # UNMEASURED (no GPU in the sessions that wrote it) for >=87% in 10 min on one H100; see docs/ep.md. From the
    # CPU measurements of bench/bench_fixed_point.py: fp16 relaxation (amp) and a per-image tolerance stop in the
    # free phase (T1 the cap: the saving); the net's own update rule (sync), so training and prediction share a
    # fixed point; no Anderson or warm starts (they land some images on another fixed point); a short fixed
    # nudge (a converged ±0.5 nudge was measured to point away from the gradient on the trained demo net).
    "fast-ep": dict(model="ep-cnn", dataset="cifar10", epochs=12, batch_size=256, amp=True,
                    optimizer=dict(name="sgd", lr=0.1, lrs=[0.4, 0.25, 0.15, 0.12, 0.08], momentum=0.9,
                                   weight_decay=3e-4, nesterov=True),
                    schedule=dict(name="onecycle", warmup_epochs=1, eta_min=1e-4),
                    augment="crop-flip", pad_mode="edge", label_smoothing=0.0,
                    ep=dict(T1=250, T2=15, beta=0.5, rule="symmetric", tol=EQUILIBRIUM_TOL), adv=None),
}

# ---------------------------------------------------------------------------------------------------------------
# Activations σ (applied to every state) and gradient modes
# ---------------------------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "my_hard_sig": lambda u: (u * 0.5).clamp(0, 1),  # Laborieux's clip(u/2, 0, 1): the paper's σ
    "hard_sigmoid": lambda u: u.clamp(0, 1),
    "ctrd_hard_sig": lambda u: (u * 0.5).clamp(-0.5, 0.5),
    "relu6": lambda u: u.clamp(0, 6),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
GRAD_MODES = ("bptt", "truncated:K", "implicit", "ep")
ACTIVATION_RANGES = {"my_hard_sig": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "ctrd_hard_sig": (-0.5, 0.5),
                     "relu6": (0.0, 6.0), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def parse_grad_mode(mode: str) -> tuple[str, int | None]:
    """'bptt' | 'implicit' | 'ep' | 'truncated:K' -> (kind, K). Anything else raises UsageError."""
    if isinstance(mode, str):
        if mode in ("bptt", "implicit", "ep"):
            return mode, None
        if mode.startswith("truncated:") and mode[10:].isdigit() and int(mode[10:]) > 0:
            return "truncated", int(mode[10:])
    raise UsageError(f"unknown gradient mode {mode!r}: use one of bptt, truncated:K (K>0), implicit, ep")


@contextlib.contextmanager
def gradient_mode(model: "EPCNN", mode: str):
    """Temporarily set `model.grad_mode` (how forward back-propagates; the predicted value never changes)."""
    parse_grad_mode(mode)
    old, model.grad_mode = model.grad_mode, mode
    try:
        yield model
    finally:
        model.grad_mode = old


def _pair(v, n, what):
    v = [v] * n if isinstance(v, int) else list(v)
    if len(v) != n:
        raise UsageError(f"{what} has {len(v)} entries for {n} conv layers")
    return v


def layer_stack(num_classes: int, in_channels: int, hw: list, channels, kernels, paddings, pools: str, fc,
                readout: str) -> tuple[nn.ModuleList, nn.ModuleList, nn.Module | None, list[tuple]]:
    """An EP-CNN's couplings (shared with its feed-forward student, epcli.student): convs, hidden linear layers
    and the read-out (None for "mse": the last state is the logits), created in that order, with the per-sample
    shape of every state they give. A stack that shrinks a feature map to nothing is refused."""
    convs, fcs, shapes = nn.ModuleList(), nn.ModuleList(), []
    c, (h, w) = in_channels, hw
    for cout, k, p, pool in zip(channels, kernels, paddings, pools):
        convs.append(nn.Conv2d(c, cout, k, padding=p))
        h, w = h + 2 * p - k + 1, w + 2 * p - k + 1
        if pool != "i":
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise UsageError(f"the conv stack {list(channels)} (kernels {kernels}, paddings {paddings}) "
                             f"does not fit {hw[0]}x{hw[1]} images: a feature map shrinks to nothing")
        c = cout
        shapes.append((c, h, w))
    d = c * h * w
    for width in list(fc) + ([num_classes] if readout == "mse" else []):
        fcs.append(nn.Linear(d, int(width)))
        d = int(width)
        shapes.append((d,))
    return convs, fcs, (nn.Linear(d, num_classes) if readout == "ce" else None), shapes


class EPCNN(nn.Module):
    """Convolutional energy-based model relaxed to a fixed point of Φ; logits = read-out of the last state.

    forward(x in [0,1], (B,C,H,W)) -> logits after T synchronous steps from zero states.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int | list = 32,
                 channels=(128, 256, 512, 512), kernels=3, paddings=1, pools: str | None = None,
                 fc=(), activation: str = "my_hard_sig", readout: str = "ce",
                 mean=CIFAR10_MEAN, std=tuple(3 * s for s in CIFAR10_STD), T: int = 250,
                 grad_mode: str = "bptt", update: str = "sync", init_gain: float = 1.0, solver: str = "plain",
                 tol: float | None = None):
        super().__init__()
        n = len(channels)
        if n < 1 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise UsageError(f"channels must be a non-empty list of positive ints, got {channels!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise UsageError(f"num_classes must be an int >= 2, got {num_classes!r}")
        kernels, paddings = _pair(kernels, n, "kernels"), _pair(paddings, n, "paddings")
        pools = pools if pools is not None else "m" * n
        if len(pools) != n or set(pools) - set("mai"):
            raise UsageError(f"pools must be {n} letters from m (max), a (avg), i (none), got {pools!r}")
        if activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if readout not in ("ce", "mse"):
            raise UsageError(f"unknown readout {readout!r}: use 'ce' (outside the energy) or 'mse' (inside)")
        hw = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.channels, self.kernels, self.paddings, self.pools = list(channels), kernels, paddings, pools
        self.fc, self.activation, self.readout = list(fc), activation, readout
        self._mean, self._std = [float(v) for v in mean], [float(v) for v in std]  # exact, for the spec
        self.name = "ep-cnn-custom"
        self.act = ACTIVATIONS[activation]

        # Couplings l = 1..N map state l-1 -> state l. State shapes are checked here, once.
        self.convs, self.fcs, self.out, self.shapes = layer_stack(num_classes, in_channels, hw, channels, kernels,
                                                                  paddings, pools, fc, readout)
        if not isinstance(init_gain, (int, float)) or isinstance(init_gain, bool) or not init_gain > 0:
            raise UsageError(f"init_gain must be a positive number, got {init_gain!r}")
        self.init_gain = float(init_gain)
        if self.init_gain != 1.0:  # PyTorch's default init shrinks the states ~2x per layer under clamp(u/2)
            with torch.no_grad():
                for m in self._couplings():
                    m.weight.mul_(self.init_gain)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        if self.mean.numel() != in_channels or self.std.numel() != in_channels or (self.std <= 0).any():
            raise UsageError(f"mean/std need {in_channels} entries with std > 0")
        self.update = update
        self.solver = solver
        self.T = T
        self.grad_mode = grad_mode
        # Runtime knobs (not architecture, so not in the spec).
        self.relax_dtype: torch.dtype | None = None  # e.g. torch.float16 on CUDA: states & convs in 16 bit
        self.tol = _check_tol(tol)  # forward: each sample stops once its residual < tol (T the cap); in the spec
        self.anderson_m = 5  # solver "anderson": how many past steps are mixed
        self.last_residual: torch.Tensor | None = None  # per-sample relative residual of the last relax
        self.ep_beta, self.ep_steps = 0.1, None      # grad_mode "ep": nudge size, nudged steps (None: T)
        self.implicit_tol, self.implicit_iters = 1e-6, None  # adjoint iteration for "implicit" (None: T)
        # "implicit" needs a fixed point: relax on (up to implicit_max_steps, None: 10*T) until the largest
        # relative residual of one step is below implicit_residual_tol; what happened goes to implicit_stats
        self.implicit_residual_tol, self.implicit_max_steps = 1e-3, None
        self.implicit_stats = new_implicit_stats()
        self.last_steps = 0
        self.last_sample_steps: torch.Tensor | None = None  # (B,) steps each sample of the last relax used
        self._step_fn, self._sweep_fn = self._step, self._sweep

    # -- spec, presets, validation ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of state layers: information from x needs this many synchronous steps to reach the read-out."""
        return len(self.shapes)

    @property
    def T(self) -> int:
        return self._T

    @T.setter
    def T(self, value):
        self._T = self._check_T(value)

    @property
    def update(self) -> str:
        """How a relaxation step updates the layers: "sync" (all at once, the paper) or "alternate" (even/odd)."""
        return self._update

    @update.setter
    def update(self, mode):
        self._update = _check_update(mode)

    def min_steps(self, update: str | None = None) -> int:
        """Fewest steps for the input to reach the read-out: depth (sync), ceil(depth/2) (alternate)."""
        return self.depth if (update or self.update) == "sync" else (self.depth + 1) // 2

    @property
    def solver(self) -> str:
        """How a relaxation reaches the fixed point: "plain" (iterate the step) or "anderson" (mixing)."""
        return self._solver

    @solver.setter
    def solver(self, mode):
        self._solver = _check_solver(mode)

    @property
    def grad_mode(self) -> str:
        return self._grad_mode

    @grad_mode.setter
    def grad_mode(self, mode):
        parse_grad_mode(mode)
        self._grad_mode = mode

    def _check_T(self, T, what="T", update=None) -> int:
        if not isinstance(T, int) or isinstance(T, bool):
            raise UsageError(f"{what} must be an integer, got {T!r}")
        if T < self.min_steps(update):
            raise UsageError(f"{what}={T} is smaller than the {self.min_steps(update)} {update or self.update} "
                             f"steps the input needs to reach the read-out (network depth {self.depth})")
        return T

    @property
    def spec(self) -> dict:
        """JSON-serialisable; EPCNN.from_spec(spec) (or EPCNN(**spec minus 'name')) rebuilds the architecture."""
        return dict(name=self.name, num_classes=self.num_classes, in_channels=self.in_channels,
                    image_size=self.image_size, channels=list(self.channels), kernels=list(self.kernels),
                    paddings=list(self.paddings), pools=self.pools, fc=list(self.fc),
                    activation=self.activation, readout=self.readout,
                    mean=list(self._mean), std=list(self._std), T=self.T, grad_mode=self.grad_mode,
                    update=self.update, init_gain=self.init_gain, solver=self.solver, tol=self.tol)

    @classmethod
    def from_spec(cls, spec: dict) -> "EPCNN":
        try:
            kw = {k: v for k, v in spec.items() if k != "name"}
            model = cls(**kw)
        except TypeError as e:
            raise CheckpointError(f"spec does not describe an EPCNN: {e}") from None
        model.name = spec.get("name", model.name)
        return model

    @classmethod
    def preset(cls, name: str, num_classes: int = 10, image_size: int = 32, **overrides) -> "EPCNN":
        if name not in PRESETS:
            raise UnknownModelError(f"unknown EP-CNN preset {name!r}: use one of {', '.join(PRESETS)}")
        model = cls(**{**PRESETS[name], "num_classes": num_classes, "image_size": image_size, **overrides})
        model.name = name
        return model

    def _check_input(self, x):
        hw = [self.image_size] * 2 if isinstance(self.image_size, int) else list(self.image_size)
        if x.dim() != 4 or list(x.shape[1:]) != [self.in_channels, *hw]:
            raise UsageError(f"{self.name} expects images of shape (B, {self.in_channels}, {hw[0]}, {hw[1]}), "
                             f"got {tuple(x.shape)}")

    def _couplings(self) -> list[nn.Module]:
        return list(self.convs) + list(self.fcs) + ([self.out] if self.out is not None else [])

    def layer_param_groups(self) -> list[list[nn.Parameter]]:
        """[conv1, ..., convN, fc1, ..., readout]: one list per layer, for per-layer learning rates."""
        return [list(m.parameters()) for m in self._couplings()]

    def extra_repr(self) -> str:
        return (f"T={self.T}, update={self.update!r}, grad_mode={self.grad_mode!r}, "
                f"activation={self.activation!r}, readout={self.readout!r}")

    # -- the primitive function Φ and its explicit state gradient ----------------------------------------------
    def _normalize(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _weights(self, dtype, channels_last=False):
        """(W, b) per coupling and for the read-out, cast once per relaxation when running in 16 bit.
        channels_last: conv weights in the states' layout (once per relaxation; differentiable), else oneDNN
        reorders an NCHW weight at every conv call: 6-15% of a paper-net relaxation on CPU (docs/ep.md)."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        cl = (lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t) if channels_last \
            else (lambda t: t)
        ws = [(cl(cast(m.weight)), cast(m.bias)) for m in list(self.convs) + list(self.fcs)]
        return ws, (None if self.out is None else (cast(self.out.weight), cast(self.out.bias)))

    def _up(self, l, s_prev, W):
        """Bottom-up term of state l: P(W_l ⋆ s_{l-1} + b_l), plus what the top-down pass needs (z, pool indices)."""
        w, b = W[l]
        if l >= len(self.convs):  # hidden / output linear coupling
            return F.linear(s_prev.flatten(1), w, b), None, None
        z = F.conv2d(s_prev, w, b, padding=self.paddings[l])
        pool = self.pools[l]
        if pool == "m":
            u, idx = F.max_pool2d(z, 2, return_indices=True)
            return u, z, idx
        if pool == "a":
            return F.avg_pool2d(z, 2), z, None
        return z, z, None

    def _down(self, l, s_l, z, idx, W, shape_prev):
        """Top-down term of state l-1: ∂<s_l, P(W_l ⋆ s_{l-1} + b_l)>/∂s_{l-1} = W_lᵀ ⋆ Unpool(s_l)."""
        w, _ = W[l]
        if l >= len(self.convs):
            return (s_l @ w).view(shape_prev)
        return F.conv_transpose2d(self._unpool(l, s_l, z, idx), w, padding=self.paddings[l])

    def _unpool(self, l, s_l, z, idx):
        """∂<s_l, P(z)>/∂z for conv coupling l: s_l routed back through the pooling P of that layer."""
        pool = self.pools[l]
        if pool == "m":  # unpool = max-pool backward: routes s_l to the arg-max positions of z
            return torch.ops.aten.max_pool2d_with_indices_backward(s_l, z, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                                                   idx)
        if pool == "a":
            return torch.ops.aten.avg_pool2d_backward(s_l, z, [2, 2], [2, 2], [0, 0], False, True, None)
        return s_l

    def logits(self, states):
        """Read-out of the last state: W_o vec(s_N) + b_o ("ce"), or s_N itself ("mse")."""
        if self.out is None:
            return states[-1]
        return self.out(states[-1].flatten(1).to(self.out.weight.dtype))

    def _dloss(self, logits, y):
        """dL/dlogits per sample. y: int labels (CE or MSE loss), or a float (B, C) tensor g for L = <g, logits>."""
        if y.is_floating_point():
            return y.to(logits.dtype)
        onehot = F.one_hot(y, self.num_classes).to(logits.dtype)
        return logits - onehot if self.readout == "mse" else torch.softmax(logits, 1) - onehot

    def _loss(self, logits, y):
        """Per-sample L(logits, y) (same conventions as _dloss)."""
        if y.is_floating_point():
            return (y.to(logits.dtype) * logits).sum(1)
        if self.readout == "mse":
            return 0.5 * ((logits - F.one_hot(y, self.num_classes).to(logits.dtype)) ** 2).sum(1)
        return F.cross_entropy(logits, y, reduction="none")

    def phi(self, x, states, beta=0.0, y=None):
        """Per-sample primitive function Φ^β(x, s) = Σ_l <s_l, P(W_l ⋆ s_{l-1} + b_l)> - β·L (shape (B,))."""
        W, _ = self._weights(None)
        s_prev, total = self._normalize(x), 0.0
        for l, s in enumerate(states):
            s = s.to(W[l][0].dtype)
            total = total + (s * self._up(l, s_prev, W)[0]).flatten(1).sum(1)
            s_prev = s
        if _nonzero(beta):
            total = total - _col(beta, total) * self._loss(self.logits([s.to(W[0][0].dtype) for s in states]), y)
        return total

    def dphi_ds(self, x, states, beta=0.0, y=None):
        """∂Φ^β/∂s_l for every layer, computed explicitly (what the dynamics apply σ to)."""
        W, Wo = self._weights(None)
        drive = self._up(0, self._normalize(x), W)[0]
        return self._pre(drive, states, beta, y, W, Wo)

    def _pre(self, drive, s, beta, y, W, Wo):
        # Bottom-up terms (and pool indices) from the current states; the input term `drive` is cached.
        ups = [(drive, None, None)] + [self._up(l, s[l - 1], W) for l in range(1, len(s))]
        return [self._pre_layer(l, s, ups, beta, y, W, Wo) for l in range(len(s))]

    def _pre_layer(self, l, s, ups, beta, y, W, Wo):
        """∂Φ^β/∂s_l from the bottom-up term ups[l] and the top-down term of s_{l+1} (pool indices in ups[l+1])."""
        h = ups[l][0]
        if l + 1 < len(s):
            _, z, idx = ups[l + 1]
            h = h + self._down(l + 1, s[l + 1], z, idx, W, s[l].shape)
        if l == len(s) - 1 and _nonzero(beta):  # nudge: -β ∂L/∂s_N = -β (dL/dlogits) W_o  (W_o = I for mse)
            g = self._dloss(self.logits(s) if Wo is None else F.linear(s[-1].flatten(1), *Wo), y)
            g = g if Wo is None else g @ Wo[0]
            h = h - (_col(beta, g) * g).view(s[-1].shape).to(h.dtype)
        return h

    def _step(self, drive, s, beta, y, W, Wo):
        """One synchronous step s_l <- σ(∂Φ^β/∂s_l) for all layers at once."""
        return [self.act(h) for h in self._pre(drive, s, beta, y, W, Wo)]

    def _sweep(self, drive, s, beta, y, W, Wo, ups_odd=None):
        """One alternating sweep (block Gauss-Seidel by layer parity): the even-indexed layers s_1, s_3, ...
        (0-based l = 0, 2, ...) from the current odd ones, then the odd ones from the new even ones. Layers of
        one parity do not interact, so each half is exact; the fixed point is the synchronous one.

        Every coupling is computed once per sweep, as in a synchronous step: `ups_odd` (the bottom-up terms of
        the odd layers, computed from the even states passed in) is returned for the next sweep to reuse.
        Returns (new states, ups_odd)."""
        n = len(s)
        s, ups = list(s), [None] * n
        ups[0] = (drive, None, None)
        for l in range(2, n, 2):
            ups[l] = self._up(l, s[l - 1], W)
        for l in range(1, n, 2):
            ups[l] = self._up(l, s[l - 1], W) if ups_odd is None else ups_odd[l // 2]
        for l in range(0, n, 2):
            s[l] = self.act(self._pre_layer(l, s, ups, beta, y, W, Wo))
        for l in range(1, n, 2):
            ups[l] = self._up(l, s[l - 1], W)
        for l in range(1, n, 2):
            s[l] = self.act(self._pre_layer(l, s, ups, beta, y, W, Wo))
        return s, [ups[l] for l in range(1, n, 2)]

    # -- relaxation ---------------------------------------------------------------------------------------------
    def zero_states(self, batch, device=None, dtype=None):
        return [torch.zeros(batch, *shape, device=device, dtype=dtype) for shape in self.shapes]

    def relax(self, x, T, beta=0.0, y=None, states=None, tol=None, update=None, solver=None):
        """Run T steps of the (nudged) dynamics from zero states (or `states`: warm start).

        update: "sync" (all layers at once) or "alternate" (even/odd sweeps; one sweep counts as one step and
        costs the same convs); None: the model's `update`.
        solver: "plain" (iterate the step) or "anderson" (Anderson mixing of the last `anderson_m` steps, same
        fixed point, fewer steps); None: the model's `solver`.
        With `tol`, each sample stops on its own as soon as (but not before `min_steps(update)` steps: a nudge must
        reach every layer) its relative residual (see `relative_residual`) is below `tol` (T is then the cap), so
        its state does not depend on the rest of the batch. Returns (states, steps used by the slowest sample);
        `self.last_residual` holds each sample's relative residual of its last step (B,), detached, and
        `self.last_sample_steps` each sample's number of steps (B,). A warm start may use any T >= 0. Gradients flow
        through every step when autograd is on and something requires grad (that is BPTT).
        """
        update = self.update if update is None else _check_update(update)
        solver = self.solver if solver is None else _check_solver(solver)
        if states is None:
            self._check_T(T, update=update)
        elif not isinstance(T, int) or T < 0:
            raise UsageError(f"T must be a non-negative integer, got {T!r}")
        if _nonzero(beta) and y is None:
            raise UsageError("a nudged relaxation (beta != 0) needs targets y")
        dtype = self.relax_dtype if (self.relax_dtype is not None and x.device.type == "cuda") else None
        W, Wo = self._weights(dtype, channels_last=True)
        # channels_last: 3-7x faster convs and pools on CPU too (oneDNN), and the tensor-core layout on CUDA
        xn = self._normalize(x).to(dtype or W[0][0].dtype).contiguous(memory_format=torch.channels_last)
        drive = self._up(0, xn, W)[0]  # the input never changes: its conv is computed once
        sdtype = dtype or W[0][0].dtype
        s = self.zero_states(x.shape[0], x.device, sdtype) if states is None else [t.to(sdtype) for t in states]
        s = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in s]
        # with tol, never stop before the input (or a nudge) has crossed the whole network
        t_min = self.min_steps(update)
        if solver == "anderson":
            return self._anderson(drive, s, T, beta, y, W, Wo, tol, update, t_min)
        return self._loop(drive, s, T, beta, y, W, Wo, tol, update, t_min)

    def _loop(self, drive, s, T, beta, y, W, Wo, tol, update="sync", t_min=1):
        if update == "alternate":
            step = lambda d, s, b, y_, u: self._sweep_fn(d, s, b, y_, W, Wo, u)  # noqa: E731
        else:
            step = lambda d, s, b, y_, u: (self._step_fn(d, s, b, y_, W, Wo), None)  # noqa: E731
        if tol is None:  # fixed T: the residual of the last step only
            ups, res = None, None  # alternate: the odd layers' bottom-up terms, carried from one sweep to the next
            for t in range(1, T + 1):
                new, ups = step(drive, s, beta, y, ups)
                if t == T:
                    res = relative_residual(new, s)
                s = new
            B = drive.shape[0]
            self.last_residual = res if res is not None else torch.zeros(B, device=drive.device)
            self.last_sample_steps = torch.full((B,), T, dtype=torch.long, device=drive.device)
            return s, T
        # With tol every sample stops on its own, at its first check with residual < tol: its state then does not
        # depend on which other images share the batch, and finished samples cost nothing (the active rows are
        # compacted), so a batch costs its mean number of steps, not its slowest sample's.
        check_every = 1 if drive.device.type == "cpu" else 5  # every convergence check is a host sync on GPU
        pos = torch.arange(drive.shape[0], device=drive.device)  # batch positions of the samples still relaxing
        done = []  # (positions, states, residuals, steps) of the samples that stopped, in stopping order
        ups, t = None, 0
        for t in range(1, T + 1):
            new, ups = step(drive, s, beta, y, ups)
            if t < T and (t < t_min or t % check_every):
                s = new
                continue
            res = relative_residual(new, s)
            stop = res < tol if t < T else torch.ones_like(res, dtype=torch.bool)
            s = new
            n_stop = int(stop.sum())
            if n_stop == 0:
                continue
            if n_stop == pos.numel():
                done.append((pos, s, res, t))
                break
            done.append((pos[stop], _rows(s, stop), res[stop], t))
            keep = ~stop
            pos, s, drive, beta, y, ups = (pos[keep], _rows(s, keep), _rows(drive, keep), _rows(beta, keep),
                                           _rows(y, keep), _rows(ups, keep))
        if not done:  # T == 0 (a warm start asked for no step)
            self.last_residual = torch.zeros(drive.shape[0], device=drive.device)
            self.last_sample_steps = torch.zeros(drive.shape[0], dtype=torch.long, device=drive.device)
            return s, 0
        return self._gather_done(done), t

    def _gather_done(self, done):
        """Put the samples that stopped at different steps back into batch order; sets last_residual and
        last_sample_steps."""
        steps = [torch.full_like(p, k) for p, _, _, k in done]
        if len(done) == 1:
            states, self.last_residual, self.last_sample_steps = done[0][1], done[0][2], steps[0]
            return states
        order = torch.argsort(torch.cat([p for p, _, _, _ in done]))
        states = [_rows(torch.cat([d[1][l] for d in done]), order) for l in range(len(done[0][1]))]
        self.last_residual = torch.cat([r for _, _, r, _ in done])[order]
        self.last_sample_steps = torch.cat(steps)[order]
        return states

    def _anderson(self, drive, s, T, beta, y, W, Wo, tol, update="sync", t_min=1):
        """Anderson mixing (type II, per sample) on the step map F: x_{k+1} = Σ_i α_i F(x_i) over the last m
        iterates, α = argmin ‖Σ α_i (F(x_i) − x_i)‖ with Σ α_i = 1 (a small regularised solve per sample).
        Same fixed points as the plain iteration; the returned state is the last F(x), so the residual and the
        state mean what they mean for `_loop` (with tol, each sample stops on its own there too). Under autograd
        the mixing weights are treated as constants."""
        m, lam = self.anderson_m, 1e-10
        fdt = torch.float64 if s[0].dtype == torch.float64 else torch.float32  # mixing in >= fp32
        flat = lambda ss: torch.cat([t.reshape(t.shape[0], -1).to(fdt) for t in ss], 1)  # noqa: E731
        sizes = [math.prod(t.shape[1:]) for t in s]

        def unflat(v, like):
            out = []
            for part, t in zip(v.split(sizes, 1), like):
                part = part.reshape(t.shape).to(t.dtype)
                out.append(part.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else part)
            return out

        dev, B = drive.device, drive.shape[0]
        F_hist, G_hist = [], []
        prev = torch.full((B,), float("inf"), device=dev)
        cool = torch.zeros(B, dtype=torch.long, device=dev)  # plain steps left after a setback
        lo, hi = ACTIVATION_RANGES.get(self.activation, (-math.inf, math.inf))
        pos, done = torch.arange(B, device=dev), []
        for t in range(1, T + 1):
            f = (self._sweep_fn(drive, s, beta, y, W, Wo, None)[0] if update == "alternate"
                 else self._step_fn(drive, s, beta, y, W, Wo))
            res = relative_residual(f, s)
            stop = (torch.ones_like(res, dtype=torch.bool) if t == T else
                    res < tol if tol is not None and t >= t_min else None)
            if stop is not None and bool(stop.any()):
                if bool(stop.all()):
                    done.append((pos, f, res, t))
                    break
                done.append((pos[stop], _rows(f, stop), res[stop], t))
                keep = ~stop
                pos, f, s, res, drive, beta, y, prev, cool = (_rows(v, keep) for v in (pos, f, s, res, drive, beta,
                                                                                      y, prev, cool))
                F_hist, G_hist = [h[keep] for h in F_hist], [h[keep] for h in G_hist]
            B = pos.numel()
            fv = flat(f).detach()
            F_hist.append(fv)
            G_hist.append(fv - flat(s).detach())
            F_hist, G_hist = F_hist[-m:], G_hist[-m:]
            k = len(G_hist)
            if k == 1:
                s = f
                continue
            G = torch.stack(G_hist, 1)  # (B, k, D)
            H = (G @ G.transpose(1, 2)).double()  # (B, k, k); solved in fp64: near s* the g_i are almost parallel
            reg = (lam * H.diagonal(dim1=1, dim2=2).amax(1)).clamp_min(1e-20)  # converged rows: H = 0
            H = H + reg.view(B, 1, 1) * torch.eye(k, device=H.device, dtype=H.dtype)
            a, info = torch.linalg.solve_ex(H, torch.ones(B, k, 1, device=H.device, dtype=H.dtype))
            a = (a / a.sum(1, keepdim=True)).to(fdt)
            # a failed solve, or a residual that grew (the map is only piecewise smooth: pool switches, clamps):
            # that sample takes plain steps F(x) until its history holds only plain steps again
            cool = torch.where(res > prev, torch.full_like(cool, m), (cool - 1).clamp_min(0))
            plain = (info != 0) | ~torch.isfinite(a).all(1).squeeze(1) | (cool > 0)
            prev = res
            a = torch.where(plain.view(B, 1, 1), torch.zeros_like(a).index_fill_(1, torch.tensor([k - 1],
                            device=a.device), 1.0), a)
            # every fixed point lies in σ's range: project the mix back into it
            mixed = (a.transpose(1, 2) @ torch.stack(F_hist, 1)).squeeze(1).clamp(lo, hi)  # (B, D)
            if f[0].requires_grad:  # BPTT through the mixing: the latest F carries the gradient
                s = [fi + (mi - fi).detach() for fi, mi in zip(f, unflat(mixed, f))]
            else:
                s = unflat(mixed, f)
        if not done:  # T == 0
            self.last_residual = torch.zeros(B, device=dev)
            self.last_sample_steps = torch.zeros(B, dtype=torch.long, device=dev)
            return s, 0
        return self._gather_done(done), t

    # -- prediction and its gradient modes ---------------------------------------------------------------------
    def forward(self, x, T: int | None = None):
        """Logits after T free steps (default self.T). The value never depends on grad_mode; the gradient does."""
        self._check_input(x)
        T = self._check_T(self.T if T is None else T)
        kind, K = parse_grad_mode(self.grad_mode)
        track = torch.is_grad_enabled() and x.requires_grad
        if track:  # the input gradient comes back in x's memory format, whatever layout the convs use
            x = _InputGradLayout.apply(x)
        if track and (kind == "bptt" or (kind == "truncated" and K >= T)):
            # exact: the same explicit steps, recorded by autograd (a K >= T unroll is all T steps)
            s, self.last_steps = self.relax(x, T, tol=self.tol)
            return self.logits(s)
        with torch.no_grad():
            s, self.last_steps = self.relax(x, T, tol=self.tol)
            full = self.logits(s)
        if not track:
            return full
        if kind == "truncated":  # value: full-T logits; gradient: BPTT through a K-step unroll from zero (K < T)
            k = self.logits(self.relax(x, K)[0])
            return full + (k - k.detach())
        if kind == "implicit":
            k = self._implicit_logits(x, self._to_fixed_point(x, s, T))
            return full + (k - k.detach())
        return _EPGrad.apply(self, x, [t.detach() for t in s], full)  # "ep"

    def fixed_point_residual(self, x, s) -> float:
        """Largest per-sample `relative_residual` of one synchronous step F from states s (0 exactly at a fixed
        point of the dynamics the implicit adjoint differentiates)."""
        with torch.no_grad():
            W, Wo = self._weights(None)
            drive = self._up(0, self._normalize(x), W)[0]
            s = [t.detach().to(drive.dtype) for t in s]
            return float(relative_residual(self._step(drive, s, 0.0, None, W, Wo), s).max())

    def _to_fixed_point(self, x, s, T):
        """The state the implicit adjoint is applied at: s after T steps, relaxed further (in chunks of T steps,
        up to implicit_max_steps) while its relative residual is above implicit_residual_tol. Recorded in
        implicit_stats: the adjoint at a non-fixed point is not the gradient of anything."""
        r0 = r = self.fixed_point_residual(x, s)
        extra, budget = 0, (10 * T if self.implicit_max_steps is None else int(self.implicit_max_steps))
        while r > self.implicit_residual_tol and extra < budget:
            n = min(T, budget - extra)
            with torch.no_grad():
                s, _ = self.relax(x, n, states=s)
            extra += n
            r = self.fixed_point_residual(x, s)
        self._adjoint_budget = T + extra  # the adjoint contracts like the relaxation: give it as many steps
        st = self.implicit_stats
        st["calls"] += 1
        st["max_residual_at_T"] = max(st["max_residual_at_T"], r0)
        st["max_residual"] = max(st["max_residual"], r)
        st["max_extra_steps"] = max(st["max_extra_steps"], extra)
        st["unconverged"] += int(r > self.implicit_residual_tol)
        st["tol"] = self.implicit_residual_tol
        return s

    def _implicit_logits(self, x, s_star):
        """One tracked step from the fixed point whose state gradient is replaced by the IFT adjoint (I-J)^-T g."""
        W, Wo = self._weights(None)
        drive = self._up(0, self._normalize(x), W)[0]
        s_star = [t.detach().to(drive.dtype) for t in s_star]  # fp16 states (accelerate) -> the weights' dtype
        f = self._step(drive, s_star, 0.0, None, W, Wo)
        f = _Adjoint.apply(self, drive.detach(), s_star, *f)
        return self.logits(list(f))

    # -- learning rules -------------------------------------------------------------------------------------------
    def ep_train_step(self, x, y, T1: int, T2: int, beta: float, rule: str = "symmetric",
                      update: str | None = None, tol: float | None = None, tol_nudged: float | None = None,
                      states=None, solver: str | None = None) -> dict:
        """One batch of EP (or the BPTT control): ACCUMULATES into p.grad (like .backward()); no optimiser step.

        rule "symmetric": free phase (T1), then +β and -β phases (T2 each, from the free state, one 2B batch);
          grad = -[∂Φ^{+β}/∂θ(s^+) - ∂Φ^{-β}/∂θ(s^-)]/(2β), batch mean  (≈ ∂L/∂θ, L = mean loss).
        rule "one-sided": free and +β phases; grad = -[∂Φ^β/∂θ(s^β) - ∂Φ/∂θ(s^0)]/β.
        rule "bptt": back-propagate the loss through the last T2 steps of the T1-step free phase.
        update: "sync" | "alternate" for every phase (None: the model's `update`); solver: "plain" | "anderson"
        for every phase (None: the model's `solver`).
        tol / tol_nudged: each sample's free / nudged phase stops once its relative residual is below it (T1 /
        T2 are then caps). states: warm start of the free phase (e.g. this batch's fixed points from the last
        epoch); then T1 may be any cap >= 1.
        Returns dict(loss, logits (B,C, detached), steps (free phase: its longest sample), steps_nudged,
        steps_mean / steps_nudged_mean (steps per sample: with tol each sample stops on its own), correct, rule,
        residual_free / residual_nudged (max over the batch of the per-sample relative residual at the end of
        the phase, see `relative_residual`), residual_free_mean / residual_nudged_mean, states (the free
        phase's end states, detached)).
        """
        self._check_input(x)
        update = self.update if update is None else _check_update(update)
        self._check_T(T1, "T1", update)
        if rule not in ("symmetric", "one-sided", "bptt"):
            raise UsageError(f"unknown learning rule {rule!r}: use symmetric, one-sided or bptt")
        if not isinstance(T2, int) or T2 < 1:
            raise UsageError(f"T2 must be a positive integer, got {T2!r}")
        if rule != "bptt" and not beta:
            raise UsageError("beta must be non-zero for EP (the update divides by beta)")
        tol, tol_nudged = _check_tol(tol), _check_tol(tol_nudged)
        params = [p for g in self.layer_param_groups() for p in g]
        B = x.shape[0]
        if states is not None and (not isinstance(T1, int) or T1 < 1):
            raise UsageError(f"T1 must be a positive integer, got {T1!r}")
        kw = dict(update=update, solver=solver)
        if rule == "bptt":
            with torch.no_grad():
                s = (self.relax(x, T1 - T2, states=self.zero_states(B, x.device), **kw)[0]
                     if T1 > T2 else None)  # from zero: any length (T1 - T2 may be below the depth)
            with torch.enable_grad():
                s, _ = (self.relax(x, min(T2, T1), states=s, **kw) if s is not None
                        else self.relax(x, T1, **kw))
                res_free = self.last_residual
                logits = self.logits([t.float() if t.dtype != torch.float64 else t for t in s])
                loss = self._loss(logits, y).mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            steps, steps2, res_nudged, s0 = T1, 0, torch.zeros_like(res_free), [t.detach() for t in s]
            work_free, work_nudged = torch.tensor(float(T1), device=x.device), torch.zeros((), device=x.device)
        else:
            with torch.no_grad():
                s0, steps = self.relax(x, T1, states=states, tol=tol, **kw)
                res_free, work_free = self.last_residual, self.last_sample_steps.double().mean()
                logits = self.logits(s0)
                loss = self._loss(logits, y).mean()
                if rule == "symmetric":  # ±β phases as one batch of 2B
                    # built on the device: a pageable host->device copy would stall the CUDA stream
                    betas = torch.full((2 * B,), float(beta), device=x.device)
                    betas[B:] = -float(beta)
                    s2, steps2 = self.relax(torch.cat([x, x]), T2, beta=betas, y=torch.cat([y, y]),
                                            states=[torch.cat([t, t]) for t in s0], tol=tol_nudged, **kw)
                    sa, sb = [t[:B] for t in s2], [t[B:] for t in s2]
                    ba, bb, denom = beta, -beta, 2 * beta
                else:
                    sa, steps2 = self.relax(x, T2, beta=beta, y=y, states=s0, tol=tol_nudged, **kw)
                    sb, ba, bb, denom = s0, beta, 0.0, beta
                res_nudged, work_nudged = self.last_residual, self.last_sample_steps.double().mean()
            grads = self.ep_update(x, sa, ba, sb, bb, y, denom)  # full precision, from state differences
        logits = logits.detach()
        gnorm = sum(g.float().pow(2).sum() for g in grads if g is not None)
        # loss, gradient norm, #correct and the residuals come back in one host transfer: the only sync of the batch
        dev = x.device
        loss_v, gnorm_v, correct, rf, rfm, rn, rnm, wf, wn = torch.stack([
            loss.detach().double(), torch.as_tensor(gnorm).double().to(dev), (logits.argmax(1) == y).sum().double(),
            res_free.max().double(), res_free.mean().double(), res_nudged.max().double(),
            res_nudged.mean().double(), work_free.double().to(dev), work_nudged.double().to(dev)]).tolist()
        if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
            raise Diverged(f"EP step diverged (loss {loss_v:.4g}): NaN or exploding states/gradients")
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g
        return dict(loss=loss_v, logits=logits, steps=int(steps), steps_nudged=int(steps2), steps_mean=wf,
                    steps_nudged_mean=wn, rule=rule,
                    correct=int(correct), residual_free=rf, residual_free_mean=rfm, residual_nudged=rn,
                    residual_nudged_mean=rnm, states=[t.detach() for t in s0])

    def ep_update(self, x, sa, ba, sb, bb, y, denom) -> list[torch.Tensor]:
        """−[∂Φ^{ba}/∂θ(sa) − ∂Φ^{bb}/∂θ(sb)] / denom, batch mean, one tensor per parameter in the order of
        `layer_param_groups()` (W1, b1, ..., W_o, b_o), computed without subtracting two large numbers.

        ∂Φ/∂W_l of the coupling ⟨s_l, P(W_l ⋆ s_{l−1} + b_l)⟩ is a bilinear G(u_l, s_{l−1}) of the unpooled
        state u_l = Unpool(s_l) (routed by each phase's own pool indices) and the state below, so
        G(u⁺, b⁺) − G(u⁻, b⁻) = ½[G(u⁺ − u⁻, b⁺ + b⁻) + G(u⁺ + u⁻, b⁺ − b⁻)]: the small differences are formed
        first, exactly (fp16 states are exact in fp32), and the convs see them. Bias: Σ(u⁺ − u⁻). The read-out
        (outside Φ) only enters through the nudge terms, which are added, not subtracted: autograd there."""
        W, Wo = self._weights(None, channels_last=True)
        dt, B = W[0][0].dtype, x.shape[0]
        sa, sb = [t.to(dt) for t in sa], [t.to(dt) for t in sb]
        xn = self._normalize(x).to(dt).contiguous(memory_format=torch.channels_last)  # the states' layout
        scale = -1.0 / (B * denom)
        grads: list[torch.Tensor] = []
        for l in range(len(sa)):
            w, bias = W[l]
            bp, bm = (xn, None) if l == 0 else (sa[l - 1], sb[l - 1])  # the input is the same in both phases
            if l >= len(self.convs):  # linear coupling: ∂/∂W = s_l vec(s_{l-1})ᵀ
                up, um = sa[l].flatten(1), sb[l].flatten(1)
                bp = bp.flatten(1)
                bm = bp if bm is None else bm.flatten(1)
                du, db = up - um, bp - bm
                gw = 0.5 * (du.t() @ (bp + bm) + (up + um).t() @ db)
            else:
                zp_ = self._up(l, bp, W)
                zm_ = zp_ if bm is None else self._up(l, bm, W)
                up = self._unpool(l, sa[l], zp_[1], zp_[2])
                um = self._unpool(l, sb[l], zm_[1], zm_[2])
                du = up - um
                pad = self.paddings[l]
                if bm is None:
                    gw = _conv_weight_grad(bp, w.shape, du, pad)
                else:
                    gw = 0.5 * (_conv_weight_grad(bp + bm, w.shape, du, pad)
                                + _conv_weight_grad(bp - bm, w.shape, up + um, pad))
            gb = du.sum(0) if du.dim() == 2 else du.sum((0, 2, 3))
            grads += [scale * gw.reshape(w.shape), scale * gb]
        if self.out is not None:  # −[−ba·L(sa) + bb·L(sb)] / denom: a sum of two losses, no cancellation
            with torch.enable_grad():
                la = self._loss(self.out(sa[-1].flatten(1)), y)
                lb = self._loss(self.out(sb[-1].flatten(1)), y)
                ba_, bb_ = _col(ba, la), _col(bb, lb)
                term = (ba_ * la - bb_ * lb).mean() / denom
                grads += list(torch.autograd.grad(term, [self.out.weight, self.out.bias]))
        return grads

    # -- speed switches (opt-in) ------------------------------------------------------------------------------
    def accelerate(self, dtype: torch.dtype | None = torch.float16, channels_last: bool = True,
                   compile: bool = False) -> "EPCNN":
        """CUDA speed switches: 16-bit relaxation (fp16 keeps the lowest layer's EP signal better than bf16),
        channels_last weights, torch.compile of the step. All of it is a no-op on CPU. Returns self."""
        dev = next(self.parameters()).device
        if dev.type != "cuda":
            return self
        self.relax_dtype = dtype
        torch.backends.cudnn.allow_tf32 = True  # fp32 convs (the weight update) may use TF32 tensor cores
        torch.backends.cudnn.benchmark = True
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            # dynamic=None: with tol the batch shrinks as samples stop; after the first new size torch.compile
            # makes the batch dimension symbolic instead of recompiling for every size
            self._step_fn = torch.compile(self._step, dynamic=None)
            self._sweep_fn = torch.compile(self._sweep, dynamic=None)
        return self


# ---------------------------------------------------------------------------------------------------------------
# Custom autograd: implicit differentiation at the fixed point, and EP input gradients
# ---------------------------------------------------------------------------------------------------------------

class _Adjoint(torch.autograd.Function):
    """Identity on the states F(s*) in forward; in backward solves a = g + Jᵀa (J = ∂F/∂s at s*) by fixed-point
    iteration, so the gradient reaching x and θ through the one tracked step is the IFT gradient. Memory O(1) in T."""

    @staticmethod
    def forward(ctx, model, drive, s_star, *f):
        ctx.model, ctx.drive, ctx.s_star = model, drive, s_star
        return tuple(t.clone() for t in f)

    @staticmethod
    def backward(ctx, *g):
        model = ctx.model
        g = [torch.zeros_like(s) if gi is None else gi for gi, s in zip(g, ctx.s_star)]
        with torch.enable_grad():
            W, Wo = model._weights(None)
            W = [(w.detach(), b.detach()) for w, b in W]
            s_req = [t.detach().requires_grad_() for t in ctx.s_star]
            out = model._step(ctx.drive, s_req, 0.0, None, W, None)
            a = list(g)
            scale = max(float(t.abs().max()) for t in g) or 1.0
            converged = False
            for _ in range(model.implicit_iters or getattr(model, "_adjoint_budget", None) or model.T):
                ja = torch.autograd.grad(out, s_req, a, retain_graph=True, allow_unused=True)
                new = [gi + (torch.zeros_like(gi) if j is None else j) for gi, j in zip(g, ja)]
                res = max(float((n - o).abs().max()) for n, o in zip(new, a))
                a = new
                if res < model.implicit_tol * scale:
                    converged = True
                    break
        # an adjoint iteration stopped by its budget is not (I - J)^-T g: recorded, the attack's check reads it
        model.implicit_stats["adjoint_unconverged"] = model.implicit_stats.get("adjoint_unconverged", 0) + (
            not converged)
        return (None, None, None, *a)


def new_implicit_stats() -> dict:
    """Running record of the "implicit" mode's fixed points (reset it before an attack, read it after)."""
    return {"calls": 0, "max_residual_at_T": 0.0, "max_residual": 0.0, "max_extra_steps": 0, "unconverged": 0,
            "adjoint_unconverged": 0, "tol": None}


class _InputGradLayout(torch.autograd.Function):
    """Identity; its backward hands the input gradient back in the input's memory format (the relaxation runs
    channels_last; libraries that call .view on the gradient need the layout they passed in)."""

    @staticmethod
    def forward(ctx, x):
        ctx.fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                   and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=ctx.fmt)


class _EPGrad(torch.autograd.Function):
    """Value: the free-phase logits. Gradient to x: EP with the linear loss L = <g, logits> nudged at ±β."""

    @staticmethod
    def forward(ctx, model, x, s_free, logits):
        ctx.model, ctx.s_free = model, s_free
        ctx.save_for_backward(x)
        return logits.clone()

    @staticmethod
    def backward(ctx, g):
        model, (x,) = ctx.model, ctx.saved_tensors
        beta, B = model.ep_beta, x.shape[0]
        if not beta:
            raise UsageError("ep_beta must be non-zero for the 'ep' gradient mode")
        c = g.abs().amax(1, keepdim=True).clamp_min(1e-30)  # nudge with g/|g|: the signal stays well above noise
        with torch.no_grad():
            betas = torch.full((2 * B,), float(beta), device=x.device)
            betas[B:] = -float(beta)
            s2, _ = model.relax(torch.cat([x, x]), model.ep_steps or model.T, beta=betas,
                                y=torch.cat([g / c, g / c]), states=[torch.cat([t, t]) for t in ctx.s_free])
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            dtype = model.convs[0].weight.dtype
            d = model.phi(xr, [t[:B].to(dtype) for t in s2]) - model.phi(xr, [t[B:].to(dtype) for t in s2])
            (dx,) = torch.autograd.grad(d.sum(), xr)
        return None, -dx / (2 * beta) * c.view(B, 1, 1, 1).to(dx.dtype), None, None


UPDATES = ("sync", "alternate")
SOLVERS = ("plain", "anderson")


def _check_solver(mode) -> str:
    if mode not in SOLVERS:
        raise UsageError(f"unknown solver {mode!r}: use 'plain' (iterate the step) or 'anderson' (mixing)")
    return mode


def _check_tol(tol):
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0 or not math.isfinite(tol):
        raise UsageError(f"tol must be a positive number or None, got {tol!r}")
    return float(tol)


def relative_residual(new, old) -> torch.Tensor:
    """Per-sample relative residual of one relaxation step s -> F(s): max over layers l of
    ‖F(s)_l − s_l‖₂ / max(‖F(s)_l‖₂, 1e-8), norms over each sample's layer (B,), in float32, detached.
    For plain iteration this is |s_T − s_{T−1}| / |s_T| at the last step; 0 exactly at a fixed point."""
    out = None
    for a, b in zip(new, old):
        a, b = a.detach().float(), b.detach().float()
        r = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1).clamp_min(1e-8)
        out = r if out is None else torch.maximum(out, r)
    return out


def _rows(v, rows):
    """The rows `rows` (a bool mask or indices over the batch) of a per-sample value: a tensor (a 0-d one is
    shared), a list/tuple of them, or a scalar / None (shared by every sample). 4-d results stay channels_last."""
    if isinstance(v, torch.Tensor):
        if v.dim() == 0:
            return v
        out = v[rows]
        return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
    if isinstance(v, (list, tuple)):
        return type(v)(_rows(t, rows) for t in v)
    return v


@torch.no_grad()
def prediction_residual(model, x, batch_size: int = 256) -> dict:
    """How far from equilibrium the model's predictions on images x are: relax exactly as forward does (T, tol,
    update, solver) and return {"max", "mean", "T", "steps", "steps_mean", "at_equilibrium"}: the per-image
    relative residual of its last step (max, mean), the most steps any image used and the mean over images;
    at_equilibrium is max <= EQUILIBRIUM_TOL."""
    res, steps, work = [], 0, 0
    for i in range(0, x.shape[0], batch_size):
        _, n = model.relax(x[i:i + batch_size], model.T, tol=model.tol)
        res.append(model.last_residual.float().cpu())
        steps, work = max(steps, n), work + int(model.last_sample_steps.sum())
    r = torch.cat(res) if res else torch.zeros(0)
    mx = float(r.max()) if r.numel() else 0.0
    return {"max": mx, "mean": float(r.mean()) if r.numel() else 0.0, "T": int(model.T), "steps": int(steps),
            "steps_mean": work / max(r.numel(), 1), "at_equilibrium": mx <= EQUILIBRIUM_TOL}


def _check_update(mode) -> str:
    if mode not in UPDATES:
        raise UsageError(f"unknown update {mode!r}: use 'sync' (all layers at once) or 'alternate' (even/odd)")
    return mode


def _conv_weight_grad(inp, weight_shape, grad_out, padding):
    """∂/∂W of Σ grad_out · conv2d(inp, W) (stride 1): the weight-gradient half of a conv backward. The weight
    argument only gives the shape and layout: channels_last like the states (on CPU, oneDNN was 1.1-1.4x faster
    per call on the paper net's three upper layers than with torch.nn.grad.conv2d_weight's NCHW stand-in,
    measured on a contended box); the result comes back NCHW, the parameters' layout."""
    w = torch.empty(weight_shape, dtype=grad_out.dtype, device=grad_out.device,
                    memory_format=torch.channels_last if len(weight_shape) == 4 else torch.contiguous_format)
    return torch.ops.aten.convolution_backward(grad_out, inp, w, None, [1, 1], [padding, padding], [1, 1], False,
                                               [0, 0], 1, (False, True, False))[1].contiguous()


def _nonzero(beta) -> bool:
    return bool(beta) if not torch.is_tensor(beta) else True


def _col(beta, like):
    """β as a scalar or a per-sample column broadcastable against `like` (B, ...)."""
    if not torch.is_tensor(beta):
        return beta
    return beta.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
