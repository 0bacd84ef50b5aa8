"""The front door: the name -> function registry, argument checks, the reference's final 8-bit truncation, and
seeded generation in fixed chunks (`corrupt_range_uint8`), so that an image never depends on batch size or device.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable

import numpy as np
import torch

from epcli.corruptions.blur import defocus_blur, gaussian_blur, glass_blur, motion_blur, zoom_blur
from epcli.corruptions.digital import (brightness, contrast, elastic_transform, jpeg_compression, pixelate,
                                       saturate)
from epcli.corruptions.noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from epcli.corruptions.params import CORRUPTIONS
from epcli.corruptions.weather import fog, frost, snow, spatter
from epcli.errors import UsageError

CHUNK = 100  # examples per seeded generator in evaluate/export: images do not depend on the batch size

_FUNCS: dict[str, Callable] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise, "defocus_blur": defocus_blur, "glass_blur": glass_blur,
    "motion_blur": motion_blur, "zoom_blur": zoom_blur, "gaussian_blur": gaussian_blur, "snow": snow,
    "frost": frost, "fog": fog, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "spatter": spatter, "saturate": saturate,
}
RANDOM_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur",
                      "motion_blur", "snow", "frost", "fog", "elastic_transform", "spatter")


def _check(name: str, severity) -> None:
    if name not in _FUNCS:
        raise UsageError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise UsageError(f"severity must be an integer from 1 to 5, got {severity!r}")


def _check_names(names) -> tuple[str, ...]:
    names = tuple(names)
    for nm in names:
        _check(nm, 1)
    return names


def _check_severities(severities) -> tuple[int, ...]:
    severities = tuple(severities)
    for s in severities:
        _check(CORRUPTIONS[0], s)
    return severities


def _truncate(y255: torch.Tensor) -> torch.Tensor:
    """The reference's np.uint8(value) on its 0..255 float values: truncation (values are already in range)."""
    return torch.floor(y255).clamp(0, 255).to(torch.uint8)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """float64 8-bit levels of images in [0, 1] (exact for uint8 / 255): the reference's np.array(pil_image)."""
    return torch.round(x.double().clamp(0, 1) * 255)


def _check_images(x) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UsageError(f"corrupt expects images of shape (B, 3, H, W), got {shape}")


def corrupt_uint8(x_uint8: torch.Tensor, name: str, severity: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt uint8 images (B, 3, H, W) exactly as the reference made CIFAR-10-C: returns uint8, same shape.

    Runs on x's device. Random corruptions draw from `generator` (the global RNG when None); a CPU generator
    gives the same draws on every device.
    """
    _check(name, severity)
    _check_images(x_uint8)
    if x_uint8.dtype != torch.uint8:
        raise UsageError(f"corrupt_uint8 expects uint8 images, got dtype {x_uint8.dtype}")
    if x_uint8.shape[0] == 0:
        return x_uint8.clone()
    with torch.no_grad():
        return _truncate(_FUNCS[name](x_uint8.double(), int(severity), generator))


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt float images (B, 3, H, W) in [0, 1] with CIFAR-10-C `name` at `severity` (1..5).

    The images are taken on the 8-bit grid (rounded to levels / 255, as the reference's PIL images were) and
    the result is the 8-bit image the reference would have saved, divided by 255: a new float tensor in [0, 1]
    with x's shape and dtype, on x's device. Random corruptions draw from `generator` (the global RNG when None);
    a CPU generator gives identical images on every device.
    """
    _check(name, severity)
    _check_images(x)
    if not x.is_floating_point():
        raise UsageError(f"corrupt expects float images in [0, 1], got dtype {x.dtype} (divide uint8 by 255, "
                         "or use corrupt_uint8)")
    if x.shape[0] == 0:
        return x.clone()
    with torch.no_grad():
        return (_truncate(_FUNCS[name](_levels(x), int(severity), generator)).to(x.dtype) / 255)


def _chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    h = hashlib.sha256(f"epcli-corruptions:{seed}:{name}:{severity}:{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def chunk_generator(seed: int, name: str, severity: int, chunk: int) -> torch.Generator:
    """The CPU generator that draws chunk `chunk` (examples chunk*CHUNK ...) of (name, severity) for `seed`."""
    return torch.Generator().manual_seed(_chunk_seed(seed, name, severity, chunk))


def corrupt_range_uint8(x_uint8: torch.Tensor, name: str, severity: int, seed: int, start: int, stop: int,
                        device="cpu") -> torch.Tensor:
    """Corrupted uint8 images for examples [start, stop) of a uint8 set, computed on `device`.

    Examples are corrupted in fixed chunks of CHUNK, each with its own generator seeded from (seed, name,
    severity, chunk index), so an example's image never depends on how the caller batches the set.
    """
    _check(name, severity)
    n = x_uint8.shape[0]
    if not 0 <= start <= stop <= n:
        raise ValueError(f"examples [{start}, {stop}) are not a range of a set of {n}")
    if start == stop:  # nothing to corrupt: no chunk to draw
        return x_uint8[:0].to(device)
    c0 = (start // CHUNK) * CHUNK
    c1 = min(-(-stop // CHUNK) * CHUNK, n)
    parts = []
    for s in range(c0, c1, CHUNK):
        e = min(s + CHUNK, n)
        parts.append(corrupt_uint8(x_uint8[s:e].to(device), name, severity, chunk_generator(seed, name, severity,
                                                                                            s // CHUNK)))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out[start - c0:stop - c0]


def corrupt_range(x_uint8: torch.Tensor, name: str, severity: int, seed: int, start: int, stop: int,
                  device="cpu") -> torch.Tensor:
    """What the model sees for examples [start, stop): the uint8 images of `corrupt_range_uint8` as float32 / 255
    on `device`, exactly as `evaluate_official` feeds the same images read from .npy files."""
    return corrupt_range_uint8(x_uint8, name, severity, seed, start, stop, device).to(device).float().div_(255)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images on the 8-bit grid (what `corrupt` returns) back to uint8: round(x * 255)."""
    return torch.round(x.double().clamp(0, 1) * 255).to(torch.uint8)


def sample_grid(x_uint8_few: torch.Tensor, names: Iterable[str] = CORRUPTIONS,
                severities: Iterable[int] = (1, 2, 3, 4, 5), seed: int = 0, pad: int = 2) -> torch.Tensor:
    """A uint8 image (3, H, W) for reports: one row per (image, corruption), columns clean then severities."""
    names, severities = _check_names(names), _check_severities(severities)
    k, c, h, w = x_uint8_few.shape
    tiles = []
    for i in range(k):
        for name in names:
            row = [x_uint8_few[i]]
            for sev in severities:
                row.append(corrupt_range_uint8(x_uint8_few, name, sev, seed, i, i + 1)[0])
            tiles.append(row)
    cols = 1 + len(severities)
    grid = torch.full((3, len(tiles) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for r, row in enumerate(tiles):
        for col, t in enumerate(row):
            y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
            grid[:, y0:y0 + h, x0:x0 + w] = t
    return grid
