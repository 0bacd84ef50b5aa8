"""Model registry: name -> constructor. Every model maps float images in [0, 1] (B, 3, 32, 32) to logits.

Normalisation is a module inside each model (`Normalize`), so attack budgets are in pixel units. Every model
carries `model.spec`, a JSON-serialisable dict with "name", "num_classes" and every constructor argument;
`build_from_spec(model.spec)` rebuilds the same architecture.

Entries (see docs/models.md):
- `ep-cnn`, `ep-cnn-cifar100`, `ep-cnn-small`, `ep-cnn-tiny`: the EP-CNN (`epcli.ep.EPCNN.preset`);
- `ep-student`: a feed-forward copy of an EP-CNN distilled from it (`epcli.student`);
- `cnn` (the paper's feed-forward baseline), `cnn-cifar100`, `cnn-hardsigmoid`, `cnn-small`;
- `resnet18`, `vit`, `vit-p8`, and `timm:<name>` for any timm architecture that accepts 32x32 inputs.

The registry is explicit (a decorator in this file, no import side effects); timm and `epcli.ep` are imported
only when a model that needs them is built. Pretrained weights are never loaded.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from epcli.errors import UnknownModelError, UsageError

__all__ = ["Normalize", "PaperCNN", "SmallCNN", "register_model", "create_model", "build_from_spec",
           "list_models", "model_info", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)  # the true per-channel std of the CIFAR-10 training set
PAPER_STD = (0.2023, 0.1994, 0.2010)  # the widespread (slightly wrong) CIFAR-10 std; the paper used 3x it
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TIMM_PREFIX = "timm:"


# --- building blocks ------------------------------------------------------------------------------------

class Normalize(nn.Module):
    """(x - mean) / std per channel. Constants are non-persistent buffers: they live in the spec, not the weights."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, " \
               f"std={[round(v, 4) for v in self.std.flatten().tolist()]}"


class HardSigmoid(nn.Module):
    """The EP activation: clamp(x / 2, 0, 1) = (1 + hardtanh(x - 1)) / 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0.5).clamp(0.0, 1.0)


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "hardsigmoid":
        return HardSigmoid()
    raise UsageError(f"unknown activation {name!r}: use relu or hardsigmoid")


class PaperCNN(nn.Module):
    """The paper's feed-forward baseline: 4 x [conv k3 (pad 1,1,1,0) no bias -> BN -> act -> maxpool 2] -> linear.

    With channels 128-256-512-512 a 32x32 image ends as 512x1x1 (the last conv has no padding: 4 -> 2 -> 1).
    """

    def __init__(self, num_classes: int, channels, paddings, activation: str, mean, std, batchnorm: bool = True):
        super().__init__()
        if len(channels) != len(paddings):
            raise UsageError(f"cnn: {len(channels)} channels but {len(paddings)} paddings")
        self.normalize = Normalize(mean, std)
        layers, c_in = [], 3
        for c, p in zip(channels, paddings):
            layers += [nn.Conv2d(c_in, c, 3, 1, p, bias=not batchnorm)]
            layers += [nn.BatchNorm2d(c)] if batchnorm else []
            layers += [_act(activation), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.normalize(x))  # (B, C, 1, 1) for 32x32 inputs
        return self.head(torch.flatten(h, 1))


class SmallCNN(nn.Module):
    """A small fast CNN for CPU demos and tests: 3 x [conv3 -> BN -> ReLU -> maxpool] -> global pool -> linear."""

    def __init__(self, num_classes: int, width: int, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        w = [width, 2 * width, 4 * width]
        layers, c_in = [], 3
        for c in w:
            layers += [nn.Conv2d(c_in, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.normalize(x)).mean((2, 3))  # (B, 4*width)
        return self.head(h)


class Normalized(nn.Module):
    """Wraps a network that expects normalised inputs (timm models) so that it takes [0, 1] images."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# --- registry -------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    name: str
    fn: Callable[..., nn.Module]
    help: str = ""
    tags: tuple = field(default_factory=tuple)


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, help: str = "", tags: tuple = ()):
    """Decorator: register `fn(num_classes, **kwargs) -> nn.Module` under `name`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(name, fn, help or (fn.__doc__ or "").strip().split("\n")[0], tuple(tags))
        return fn

    return deco


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names (sorted), optionally filtered by a shell wildcard. `timm:<name>` is also accepted."""
    names = sorted(_REGISTRY)
    if pattern:
        import fnmatch
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_info(name: str) -> dict:
    """Name, one-line help and tags of a registered model (for `epcli models`)."""
    e = _lookup(name) if not name.startswith(TIMM_PREFIX) else None
    if e is None:
        return {"name": name, "help": "a timm architecture adapted to 32x32", "tags": ("timm",)}
    return {"name": e.name, "help": e.help, "tags": e.tags}


def _lookup(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UnknownModelError(f"unknown model {name!r}: {hint}known: {', '.join(sorted(_REGISTRY))}, "
                            f"or timm:<name>")


def create_model(name: str, num_classes: int = 10, **overrides) -> nn.Module:
    """Build a registered model (or `timm:<name>`) with fresh weights; `None` overrides are ignored.

    The returned module has `model.spec` (name, num_classes and every constructor argument, resolved).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise UsageError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX):], num_classes, overrides)
    entry = _lookup(name)
    sig = inspect.signature(entry.fn)
    params = {k: p for k, p in sig.parameters.items() if k != "num_classes" and p.kind == p.KEYWORD_ONLY}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(set(overrides) - set(params)) if not takes_any else []
    if unknown:
        raise UsageError(f"model {name!r} has no option {', '.join(unknown)}; options: "
                         f"{', '.join(params) or 'none'}")
    model = entry.fn(num_classes, **overrides)
    if not isinstance(getattr(model, "spec", None), dict):  # builders may set a richer spec themselves
        kwargs = {k: (overrides[k] if k in overrides else p.default) for k, p in params.items()}
        _set_spec(model, {"name": name, "num_classes": num_classes, **_jsonable(kwargs)})
    _set_spec(model, {**model.spec, "name": name, "num_classes": num_classes})
    json.dumps(model.spec)  # a spec that cannot travel in checkpoint metadata is a bug here, not a user error
    return model


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild the architecture described by `model.spec` (fresh weights; load the state_dict after)."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    if not isinstance(spec, dict) or "name" not in spec:
        raise UsageError(f"a model spec must be a dict with a 'name', got {spec!r:.80}")
    rest = dict(spec)
    name = rest.pop("name")
    num_classes = rest.pop("num_classes", 10)
    entry = _REGISTRY.get(name)
    if entry is not None and "ep" in entry.tags:
        return _ep_from_spec(name, num_classes, rest)
    return create_model(name, num_classes, **rest)


def _set_spec(model: nn.Module, spec: dict) -> None:
    """Attach a spec, unless the class computes its own (a read-only `spec` property, like EPCNN's)."""
    if isinstance(getattr(type(model), "spec", None), property):
        if model.spec.get("name") != spec.get("name") and hasattr(model, "name"):
            model.name = spec["name"]
        return
    model.spec = spec


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _stats(num_classes: int, paper_cnn: bool = False):
    """Default (mean, std): CIFAR-100 statistics for 100 classes, CIFAR-10 otherwise; the paper CNN used 3x std."""
    if num_classes == 100:
        mean, std = CIFAR100_MEAN, CIFAR100_STD
    else:
        mean, std = CIFAR10_MEAN, PAPER_STD if paper_cnn else CIFAR10_STD
    if paper_cnn:
        std = tuple(3 * s for s in std)
    return list(mean), [round(s, 6) for s in std]


# --- EP-CNN (epcli.ep, imported lazily) -----------------------------------------------------------------

def _ep_module():
    try:
        from epcli import ep
    except ImportError as e:
        raise UnknownModelError(f"the EP-CNN is not available in this build (epcli.ep: {e})") from None
    return ep


def _ep_create(name: str, num_classes: int, overrides: dict) -> nn.Module:
    ep = _ep_module()
    try:
        model = ep.EPCNN.preset(name, num_classes, **overrides)
    except TypeError as e:
        raise UsageError(f"model {name!r}: bad option ({e})") from None
    _set_spec(model, _jsonable({**dict(getattr(model, "spec", None) or {}), "name": name,
                                "num_classes": num_classes}))
    return model


def _ep_from_spec(name: str, num_classes: int, rest: dict) -> nn.Module:
    ep = _ep_module()
    full = {"name": name, "num_classes": num_classes, **rest}
    if hasattr(ep.EPCNN, "from_spec"):
        model = ep.EPCNN.from_spec(full)
    else:  # the preset with the spec's settings as overrides
        model = ep.EPCNN.preset(name, num_classes, **rest)
    _set_spec(model, _jsonable({**dict(getattr(model, "spec", None) or {}), "name": name,
                                "num_classes": num_classes}))
    return model


def _register_ep(name: str, help: str):
    def fn(num_classes: int, **overrides):
        return _ep_create(name, num_classes, overrides)

    fn.__doc__ = help
    register_model(name, help=help, tags=("ep",))(fn)


_register_ep("ep-cnn", "The paper's EP-CNN (CIFAR-10): conv 128-256-512-512, hard-sigmoid, T=250.")
_register_ep("ep-cnn-cifar100", "The paper's EP-CNN for CIFAR-100: last conv 1024.")
_register_ep("ep-cnn-small", "A narrower EP-CNN (conv 16-32-64) that relaxes until equilibrium (tol 1e-3, cap T=250).")
_register_ep("ep-cnn-tiny", "A tiny EP-CNN (conv 4-8) for tests.")


# --- EP student (epcli.student, imported lazily: it needs epcli.ep's activations) ---------------------------

@register_model("ep-student", tags=("student", "distilled"))
def ep_student(num_classes: int, *, teacher_spec: dict | None = None, in_channels: int | None = None,
               image_size: int | list | None = None, channels: list | None = None, kernels: list | None = None,
               paddings: list | None = None, pools: str | None = None, fc: list | None = None,
               activation: str | None = None, readout: str | None = None, mean: list | None = None,
               std: list | None = None, init_gain: float | None = None) -> nn.Module:
    """Feed-forward copy of an EP-CNN (no feedback), distilled from its fixed points (epcli train --teacher)."""
    try:
        from epcli import student
    except ImportError as e:
        raise UnknownModelError(f"the EP student is not available in this build (epcli.student: {e})") from None
    given = dict(in_channels=in_channels, image_size=image_size, channels=channels, kernels=kernels,
                 paddings=paddings, pools=pools, fc=fc, activation=activation, readout=readout, mean=mean,
                 std=std, init_gain=init_gain)
    model = student.EPStudent(num_classes, **student.arch_from(teacher_spec, num_classes, given))
    model.spec = _jsonable(dict(model.spec))  # explicit: build_from_spec needs no teacher
    return model


# --- feed-forward CNNs ----------------------------------------------------------------------------------

def _paper_cnn(num_classes, channels, paddings, activation, mean, std, batchnorm, wide_last):
    if channels is None:
        channels = [128, 256, 512, 1024 if wide_last else 512]
    d_mean, d_std = _stats(num_classes, paper_cnn=True)
    mean, std = list(mean or d_mean), list(std or d_std)
    model = PaperCNN(num_classes, list(channels), list(paddings), activation, mean, std, batchnorm)
    model.spec = {"channels": list(channels), "paddings": list(paddings), "activation": activation,
                  "mean": mean, "std": std, "batchnorm": batchnorm}
    return model


@register_model("cnn", tags=("paper", "baseline"))
def cnn(num_classes: int, *, channels: list | None = None, paddings: list = (1, 1, 1, 0), activation: str = "relu",
        mean: list | None = None, std: list | None = None, batchnorm: bool = True) -> nn.Module:
    """The paper's feed-forward CNN (BN + ReLU, 128-256-512-512; last conv 1024 for 100 classes)."""
    return _paper_cnn(num_classes, channels, paddings, activation, mean, std, batchnorm, num_classes == 100)


@register_model("cnn-cifar100", tags=("paper", "baseline"))
def cnn_cifar100(num_classes: int, *, channels: list | None = None, paddings: list = (1, 1, 1, 0),
                 activation: str = "relu", mean: list | None = None, std: list | None = None,
                 batchnorm: bool = True) -> nn.Module:
    """The paper's CIFAR-100 CNN: last conv 1024 wide, whatever num_classes."""
    return _paper_cnn(num_classes, channels, paddings, activation, mean, std, batchnorm, True)


@register_model("cnn-hardsigmoid", tags=("paper", "control"))
def cnn_hardsigmoid(num_classes: int, *, channels: list | None = None, paddings: list = (1, 1, 1, 0),
                    activation: str = "hardsigmoid", mean: list | None = None, std: list | None = None,
                    batchnorm: bool = True) -> nn.Module:
    """The paper's control: the feed-forward CNN with the EP activation clamp(x/2, 0, 1), trained by BP."""
    return _paper_cnn(num_classes, channels, paddings, activation, mean, std, batchnorm, num_classes == 100)


@register_model("cnn-small", tags=("demo",))
def cnn_small(num_classes: int, *, width: int = 16, mean: list | None = None, std: list | None = None) -> nn.Module:
    """A small fast CNN (16-32-64, ~25k parameters) for CPU demos and tests."""
    d_mean, d_std = _stats(num_classes)
    mean, std = list(mean or d_mean), list(std or d_std)
    model = SmallCNN(num_classes, int(width), mean, std)
    model.spec = {"width": int(width), "mean": mean, "std": std}
    return model


# --- timm models ----------------------------------------------------------------------------------------

def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency
        raise UnknownModelError("timm models need the timm package (pip install timm)") from None
    return timm


def _adapt_stem_32(net: nn.Module) -> bool:
    """Make an ImageNet stem fit 32x32 inputs: a 3x3 stride-1 first conv and no stem max-pool (ResNet family)."""
    conv1, pool = getattr(net, "conv1", None), getattr(net, "maxpool", None)
    if isinstance(conv1, nn.Conv2d) and pool is not None:
        net.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=conv1.bias is not None)
        net.maxpool = nn.Identity()
        return True
    return False


def _timm_net(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    timm = _timm()
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown timm model {arch!r}{hint}")
    try:
        try:  # transformers and friends take the input size as a constructor argument
            net = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=32, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UsageError(f"timm:{arch}: bad option ({e})") from None
    return net


def _check_32(model: nn.Module, name: str, num_classes: int) -> None:
    """One dummy forward on a 1x3x32x32 image in eval mode: fail now, with one line, not inside training."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(1, 3, 32, 32))
    except Exception as e:  # timm raises AssertionError/RuntimeError/ValueError for sizes it cannot take
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"model {name!r} cannot take 32x32 images: {msg[:160]}") from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise UsageError(f"model {name!r} returns {tuple(out.shape)} for one image, not (1, {num_classes}) logits")


def _create_timm(arch: str, num_classes: int, overrides: dict) -> nn.Module:
    overrides = dict(overrides)
    d_mean, d_std = _stats(num_classes)
    mean, std = list(overrides.pop("mean", None) or d_mean), list(overrides.pop("std", None) or d_std)
    stem = overrides.pop("cifar_stem", True)
    net = _timm_net(arch, num_classes, overrides)
    adapted = _adapt_stem_32(net) if stem else False
    model = Normalized(net, mean, std)
    name = TIMM_PREFIX + arch
    _check_32(model, name, num_classes)
    model.spec = _jsonable({"name": name, "num_classes": num_classes, "mean": mean, "std": std,
                            "cifar_stem": bool(stem), **overrides})
    model.cifar_stem_adapted = adapted
    return model


@register_model("resnet18", tags=("timm", "baseline"))
def resnet18(num_classes: int, *, mean: list | None = None, std: list | None = None) -> nn.Module:
    """ResNet-18 (timm) with a CIFAR stem: 3x3 stride-1 first conv, no stem max-pool (~11M parameters)."""
    model = _create_timm("resnet18", num_classes, {"mean": mean, "std": std})
    model.spec = {"mean": model.spec["mean"], "std": model.spec["std"]}
    return model


def _vit(num_classes, patch_size, embed_dim, depth, num_heads, mlp_dim, mean, std):
    from timm.models.vision_transformer import VisionTransformer  # lazy: timm only when a ViT is built
    if 32 % int(patch_size):
        raise UsageError(f"vit: patch_size must divide 32, got {patch_size}")
    if embed_dim % num_heads:
        raise UsageError(f"vit: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    d_mean, d_std = _stats(num_classes)
    mean, std = list(mean or d_mean), list(std or d_std)
    net = VisionTransformer(img_size=32, patch_size=int(patch_size), num_classes=num_classes,
                            embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads),
                            mlp_ratio=mlp_dim / embed_dim, class_token=True, global_pool="token")
    model = Normalized(net, mean, std)
    model.spec = {"patch_size": int(patch_size), "embed_dim": int(embed_dim), "depth": int(depth),
                  "num_heads": int(num_heads), "mlp_dim": int(mlp_dim), "mean": mean, "std": std}
    return model


@register_model("vit", tags=("timm", "baseline", "paper"))
def vit(num_classes: int, *, patch_size: int = 4, embed_dim: int = 384, depth: int = 7, num_heads: int = 12,
        mlp_dim: int = 384, mean: list | None = None, std: list | None = None) -> nn.Module:
    """The paper's ViT from scratch: patch 4, 7 blocks, width 384, 12 heads, MLP 384 (~6.3M parameters)."""
    return _vit(num_classes, patch_size, embed_dim, depth, num_heads, mlp_dim, mean, std)


@register_model("vit-p8", tags=("timm", "baseline"))
def vit_p8(num_classes: int, *, patch_size: int = 8, embed_dim: int = 384, depth: int = 7, num_heads: int = 12,
           mlp_dim: int = 384, mean: list | None = None, std: list | None = None) -> nn.Module:
    """The same ViT with 8x8 patches (16 tokens)."""
    return _vit(num_classes, patch_size, embed_dim, depth, num_heads, mlp_dim, mean, std)
