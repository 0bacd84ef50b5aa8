"""The 19 CIFAR-10-C corruptions in torch, batched, seeded; the official .npy loader and exporter; metrics.

`corrupt_uint8` takes uint8 images (B, 3, H, W) on any device and returns the corrupted uint8 images (`corrupt`:
the same for float images on the 8-bit grid), with the CIFAR-10-C severity parameters of Hendrycks & Dietterich
(hendrycks/robustness, `make_cifar_c.py`; see docs/corruptions.md for the table and the measured fidelity). Random
draws come from a `torch.Generator`; when it lives on the CPU the draws are made there and moved, so the same seed
gives the same draws on every device.

The reference itself set no seed, so random corruptions can be matched in distribution only; given the same
draws, every corruption follows the reference maths step by step in the reference's own precision (float64,
float32 or 8-bit, as numpy, OpenCV, PIL and ImageMagick computed it) and ends with its `np.uint8(...)`
truncation. Every corrupted image is therefore an 8-bit image, the same one whether it is generated, exported or
read back from the exported files. docs/corruptions.md has the measured fidelity table.

Only torch, numpy and Pillow are used; the module never imports the store, the CLI or rich.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from epcli.atomic import atomic_write, remove_stale_temps
from epcli.errors import DatasetError, UsageError

__all__ = [
    "CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "EXTRA_CORRUPTIONS", "PARAMS", "corrupt", "corrupt_range",
    "corrupt_uint8", "corrupt_range_uint8", "chunk_generator", "evaluate", "summarize", "load_official",
    "load_clean", "evaluate_official", "export", "sample_grid", "to_uint8",
]

BENCHMARK_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS

FROST_DIR = Path(__file__).parent / "assets" / "frost"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the reference never picks frost6
CHUNK = 100  # examples per seeded generator in evaluate/export: images do not depend on the batch size

_S = 32  # the reference's image size (CIFAR); size-dependent parameters below are for 32 x 32

# CIFAR-10-C parameters per severity 1..5 (make_cifar_c.py). Tuples name their fields in docs/corruptions.md.
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                     # std
    "shot_noise": (500, 250, 100, 75, 50),                                # Poisson photons per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                      # salt-and-pepper amount
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),                      # multiplicative std
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),                           # sigma
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),        # radius, alias sigma
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),                        # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),                          # arange(1, stop, 0.01)
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image weight, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),       # fog weight, wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                            # added to V (HSV)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                              # scale about the channel mean
    "elastic_transform": tuple((_S * a, _S * s, _S * j) for a, s, j in
                               ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03))),                      # alpha, sigma, affine jitter (px)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                            # downscale factor (PIL BOX)
    "jpeg_compression": (80, 65, 58, 50, 40),                             # PIL quality
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    # loc, scale, sigma, threshold, intensity (water) / mud sigma, mode (0 water, 1 mud)
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),     # S * a + b (HSV)
}


# ----------------------------------------------------------------------------------------------- random draws

def _gdev(gen: torch.Generator | None) -> torch.device:
    return gen.device if gen is not None else torch.device("cpu")


def _randn(shape, gen, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=_gdev(gen)).to(device)


def _rand(shape, gen, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=_gdev(gen)).to(device)


def _randint(low, high, shape, gen, device) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen, device=_gdev(gen)).to(device)


# ----------------------------------------------------------------------------------------------- arithmetic
#
# Every corruption below takes `u`, the images as float64 8-bit levels (B, 3, H, W) (what the reference's
# np.array(pil_image) holds), and returns the reference's value *before* its final np.uint8(...) on the 0..255
# scale, as float64, computed with the reference's own precision and operation order: float64 where numpy
# worked in float64, float32 where it worked in float32 (snow, spatter, elastic, zoom), integers where a library
# returned 8-bit images (motion blur, pixelate, JPEG). `_truncate` then does what np.uint8 did.

F32, F64 = torch.float32, torch.float64


def _out(x: torch.Tensor) -> torch.Tensor:
    """np.clip(x, 0, 1) * 255 in x's own precision, returned as float64 (exact)."""
    return (x.clamp(0, 1) * 255).double()


def _f32(v: float) -> torch.Tensor:
    """A Python constant as numpy uses it against a float32 array (cast to float32 first)."""
    return torch.tensor(v, dtype=F32)


def _pad_index(n: int, r: int, mode: str, device) -> torch.Tensor:
    """Indices into an axis of length n, extended by r on both sides with a border rule.

    nearest: edge replication (scipy 'nearest', ImageMagick edge); symmetric: d c b a | a b c d (scipy
    'reflect'); reflect101: d c b | a b c d (OpenCV BORDER_REFLECT_101, scipy 'mirror').
    """
    i = torch.arange(-r, n + r, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        m = i % (2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m)
    if mode == "reflect101":
        p = max(2 * n - 2, 1)
        m = i % p
        return torch.where(m >= n, p - m, m)
    raise ValueError(mode)


def _gauss1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's Gaussian weights, same formula and rounding: radius int(truncate*sigma + 0.5),
    exp(-0.5 / sigma^2 * t^2), divided by their sum."""
    r = int(truncate * float(sigma) + 0.5)
    t = np.arange(-r, r + 1)
    w = np.exp(-0.5 / (sigma * sigma) * t ** 2)
    return w / w.sum()


def _correlate_sym(x: torch.Tensor, w: np.ndarray, dim: int, mode: str) -> torch.Tensor:
    """scipy.ndimage.correlate1d with a symmetric kernel, in x's precision and scipy's order: the centre tap
    times x, then (left + right) * weight for the pairs from the farthest inwards."""
    r = len(w) // 2
    n = x.shape[dim]
    xp = x.index_select(dim, _pad_index(n, r, mode, x.device))
    out = xp.narrow(dim, r, n) * float(w[r])
    for j in range(r, 0, -1):
        out = out + (xp.narrow(dim, r - j, n) + xp.narrow(dim, r + j, n)) * float(w[r - j])
    return out


def _gaussian(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter (and skimage.filters.gaussian) over H then W: bit-identical in float64."""
    if sigma <= 1e-15:  # scipy skips such axes
        return x.clone()
    w = _gauss1d(sigma, truncate)
    return _correlate_sym(_correlate_sym(x, w, x.dim() - 2, mode), w, x.dim() - 1, mode)


def _conv2d_same(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with a (k, k) kernel (odd k), borders by `mode` (OpenCV filter2D semantics)."""
    b, c, h, w = x.shape
    r = kernel.shape[-1] // 2
    xp = x.index_select(3, _pad_index(w, r, mode, x.device)).index_select(2, _pad_index(h, r, mode, x.device))
    return F.conv2d(xp.reshape(b * c, 1, h + 2 * r, w + 2 * r), kernel.to(x)[None, None]).view(b, c, h, w)


def _box3_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over 3 x 3 with BORDER_REFLECT_101 (cv2.blur before its scale), in x's precision."""
    b, c, h, w = x.shape
    xp = x.index_select(3, _pad_index(w, 1, "reflect101", x.device)).index_select(
        2, _pad_index(h, 1, "reflect101", x.device))
    out = torch.zeros_like(x)
    for i in range(3):
        for j in range(3):
            out = out + xp[..., i:i + h, j:j + w]
    return out


# ----------------------------------------------------------------------------------------------- noise

def gaussian_noise(u, severity, gen=None):
    c = PARAMS["gaussian_noise"][severity - 1]
    return _out(u / 255 + c * _randn(u.shape, gen, u.device).double())


def shot_noise(u, severity, gen=None):
    c = PARAMS["shot_noise"][severity - 1]
    counts = torch.poisson((u / 255 * c).to(_gdev(gen)), generator=gen).to(u.device)
    return _out(counts / c)


def impulse_noise(u, severity, gen=None):
    """skimage random_noise(mode='s&p'): each channel value flips with probability `amount`, half to 1, half to 0."""
    c = PARAMS["impulse_noise"][severity - 1]
    d = _rand((2,) + tuple(u.shape), gen, u.device)
    flip = d[0] < c
    salt = d[1] < 0.5
    return _out(torch.where(flip, salt.double(), u / 255))


def speckle_noise(u, severity, gen=None):
    c = PARAMS["speckle_noise"][severity - 1]
    x = u / 255
    return _out(x + x * (c * _randn(u.shape, gen, u.device).double()))


# ----------------------------------------------------------------------------------------------- blurs

def gaussian_blur(u, severity, gen=None):
    return _out(_gaussian(u / 255, PARAMS["gaussian_blur"][severity - 1], "nearest"))


def glass_blur(u, severity, gen=None):
    """Blur, 8-bit truncation, local pixel 'swaps', blur again, all in float64 like the reference.

    The reference walks h, w from H-1 down to delta+1 and assigns x[h, w], x[h', w'] = x[h', w'], x[h, w] with
    numpy views, which copies x[h', w'] into x[h, w] and leaves x[h', w'] as it was. With delta = 1 the offsets
    come from randint(-1, 1), i.e. {-1, 0}, so every source lies up/left of its target and has not been written
    yet in that pass: one pass is exactly a gather from the pass's input, done here for all pixels at once.
    """
    sigma, delta, iters = PARAMS["glass_blur"][severity - 1]
    assert delta == 1  # the gather argument above needs sources not yet visited
    b, c, h, w = u.shape
    y = torch.floor(_gaussian(u / 255, sigma, "nearest") * 255).clamp(0, 255)
    rows = torch.arange(h, device=u.device).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=u.device).view(1, w).expand(h, w)
    inner = (rows > delta) & (cols > delta) & (rows <= h - delta) & (cols <= w - delta)
    for _ in range(iters):
        d = _randint(-delta, delta, (b, 2, h, w), gen, u.device)  # (dx, dy) per pixel, all channels alike
        src = (rows + d[:, 1] * inner) * w + (cols + d[:, 0] * inner)  # (B, H, W)
        y = y.flatten(2).gather(2, src.flatten(1)[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
    return _out(_gaussian(y / 255, sigma, "nearest"))


@lru_cache(maxsize=None)
def _disk_taps(radius: float, alias_blur: float) -> tuple[tuple[int, int, float], ...]:
    """The reference's float32 disk kernel: grid -8..8, (X^2 + Y^2 <= r^2) / count in float32, then OpenCV's
    3 x 3 GaussianBlur (float32 taps normalised in double, BORDER_REFLECT_101). Returns its non-zero taps
    (row offset, column offset, weight) in row-major order, the order cv2.filter2D sums them."""
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= np.sum(disk)
    g = np.exp((-0.5 / (alias_blur * alias_blur)) * np.arange(-1.0, 2.0) ** 2).astype(np.float32)
    g = (g.astype(np.float64) * (1.0 / float(g.astype(np.float64).sum()))).astype(np.float32).astype(np.float64)
    p = np.pad(disk.astype(np.float64), 1, mode="reflect")  # numpy 'reflect' = BORDER_REFLECT_101
    rows = (p[:, :-2] * g[0] + p[:, 1:-1] * g[1] + p[:, 2:] * g[2]).astype(np.float32).astype(np.float64)
    k = (rows[:-2] * g[0] + rows[1:-1] * g[1] + rows[2:] * g[2]).astype(np.float32)
    return tuple((i - 8, j - 8, float(k[i, j])) for i in range(17) for j in range(17) if k[i, j] != 0)


def defocus_blur(u, severity, gen=None):
    """cv2.filter2D(x, -1, disk) per channel in float64: non-zero taps summed in row-major order from 0."""
    radius, alias = PARAMS["defocus_blur"][severity - 1]
    taps = _disk_taps(radius, alias)
    r = max(max(abs(a), abs(b)) for a, b, _ in taps)
    _, _, h, w = u.shape
    x = u / 255
    xp = x.index_select(3, _pad_index(w, r, "reflect101", x.device)).index_select(
        2, _pad_index(h, r, "reflect101", x.device))
    acc = torch.zeros_like(x)
    for di, dj, k in taps:
        acc = acc + xp[..., r + di:r + di + h, r + dj:r + dj + w] * k
    return _out(acc)


_MAGICK_SQ2PI = 2.50662827463100024161235523934010416269302368164062  # MagickSQ2PI


def _magick_motion_taps(radius: float, sigma: float, angles: list[float]):
    """ImageMagick 6 MotionBlurImage's kernel and offsets: width 2*ceil(radius)+1, weights
    exp(-i^2 / (2 sigma^2)) / (sqrt(2 pi) sigma) normalised by their running sum, tap i at
    (ceil(i*py/hypot - 0.5), ceil(i*px/hypot - 0.5)) with (px, py) = width * (sin a, cos a). Python's math is
    C's libm, as ImageMagick's."""
    width = int(2.0 * math.ceil(radius) + 1.0)
    k = [math.exp(-(float(i) * i) / (2.0 * sigma * sigma)) / (_MAGICK_SQ2PI * sigma) for i in range(width)]
    total = 0.0
    for v in k:
        total += v
    k = [v / total for v in k]
    ox, oy = [], []
    for a in angles:
        rad = math.pi * a / 180.0
        px, py = width * math.sin(rad), width * math.cos(rad)
        hyp = math.hypot(px, py)
        ox.append([math.ceil((i * py) / hyp - 0.5) for i in range(width)])
        oy.append([math.ceil((i * px) / hyp - 0.5) for i in range(width)])
    return k, ox, oy


def _magick_motion_blur(levels: torch.Tensor, radius: float, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """MotionBlurImage on an 8-bit image read into ImageMagick 6 Q16 (value * 257) and written back as 8-bit PNG.

    Per pixel: sum of weight * quantum in double over the taps in order (edge virtual pixels), ClampToQuantum
    (clip, then +0.5 and truncate: round half up), ScaleQuantumToChar ((q + 128 - ((q + 128) >> 8)) >> 8).
    Input and output are float64 levels (B, C, H, W).
    """
    b, c, h, w = levels.shape
    dev = levels.device
    k, ox, oy = _magick_motion_taps(radius, sigma, [float(a) for a in angles.double().cpu()])
    ox_t = torch.tensor(ox, dtype=torch.long, device=dev)  # (B, width)
    oy_t = torch.tensor(oy, dtype=torch.long, device=dev)
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    bidx = torch.arange(b, device=dev)[:, None, None]
    q16 = (levels * 257).permute(0, 2, 3, 1)  # (B, H, W, C)
    acc = torch.zeros_like(q16)
    for t in range(len(k)):
        r = (rows[None] + oy_t[:, t:t + 1]).clamp(0, h - 1)  # (B, H)
        cc = (cols[None] + ox_t[:, t:t + 1]).clamp(0, w - 1)  # (B, W)
        acc = acc + k[t] * q16[bidx, r[:, :, None], cc[:, None, :]]
    q = torch.where(acc <= 0, torch.zeros_like(acc),
                    torch.where(acc >= 65535, torch.full_like(acc, 65535), torch.floor(acc + 0.5)))
    q = q.long() + 128
    return ((q - (q >> 8)) >> 8).double().permute(0, 3, 1, 2)


def motion_blur(u, severity, gen=None):
    radius, sigma = PARAMS["motion_blur"][severity - 1]
    angle = -45 + 90 * _rand((u.shape[0],), gen, u.device).double()  # numpy uniform(-45, 45)
    return _magick_motion_blur(u, radius, sigma, angle)


@lru_cache(maxsize=None)
def _zoom_matrix(n: int, z: float) -> np.ndarray:
    """The reference's clipped_zoom along one axis as an (n, n) matrix: crop the centre ceil(n/z), zoom with
    scipy.ndimage.zoom(order=1) to round(ceil(n/z)*z) samples (align-corners grid), trim the centre n."""
    ch = int(np.ceil(n / z))
    top = (n - ch) // 2
    out_n = int(round(ch * z))
    step = (ch - 1) / (out_n - 1) if out_n > 1 else 0.0
    trim = (out_n - n) // 2
    m = np.zeros((n, n))
    for j in range(n):
        pos = (j + trim) * step
        i0 = min(int(np.floor(pos)), ch - 1)
        f = pos - i0
        m[j, top + i0] += 1 - f
        if f > 0:
            m[j, top + min(i0 + 1, ch - 1)] += f
    return m


def _zoom_factors(stop: float) -> np.ndarray:
    return np.arange(1, stop, 0.01)  # float64 like the reference: 1.06 -> 7 factors (1.0 ... 1.06)


def zoom_blur(u, severity, gen=None):
    """float32 like the reference: each clipped_zoom is computed in float64 and stored as float32 (scipy's
    output dtype), accumulated in float32, averaged in float32."""
    _, _, h, _ = u.shape
    x32 = (u / 255).float()
    x64 = x32.double()
    out = torch.zeros_like(x32)
    for z in _zoom_factors(PARAMS["zoom_blur"][severity - 1]):
        a = torch.as_tensor(_zoom_matrix(h, float(z)), dtype=F64, device=u.device)
        out = out + (a @ x64 @ a.T).float()
    return _out((x32 + out) / (len(_zoom_factors(PARAMS["zoom_blur"][severity - 1])) + 1))


# ----------------------------------------------------------------------------------------------- weather

def _gray32(x32: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(float32 RGB, COLOR_RGB2GRAY) as OpenCV 3.4 computed it: (R*.299f + G*.587f) + B*.114f."""
    return (x32[:, 0:1] * _f32(0.299) + x32[:, 1:2] * _f32(0.587)) + x32[:, 2:3] * _f32(0.114)


def snow(u, severity, gen=None):
    loc, scale, zoom, thresh, radius, sigma, keep = PARAMS["snow"][severity - 1]
    b, c, h, w = u.shape
    layer = loc + scale * _randn((b, 1, h, w), gen, u.device).double()  # numpy normal(loc, scale)
    a = torch.as_tensor(_zoom_matrix(h, float(zoom)), dtype=F64, device=u.device)
    layer = a @ layer @ a.T
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255)  # PIL 'L' image via astype(uint8)
    angle = -135 + 90 * _rand((b,), gen, u.device).double()  # numpy uniform(-135, -45)
    layer = _magick_motion_blur(layer, radius, sigma, angle) / 255
    x32 = u.float() / 255  # np.array(x, dtype=np.float32) / 255.
    x32 = _f32(keep) * x32 + _f32(1 - keep) * torch.maximum(x32, _gray32(x32) * 1.5 + 0.5)
    return _out(x32.double() + layer + layer.flip(2, 3))


@lru_cache(maxsize=None)
def _frost_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """The five frost photographs resized by 0.2 (OpenCV INTER_LINEAR with fx = 0.2 samples source pixel 5i+2
    exactly), padded into one uint8 tensor (5, 3, Hmax, Wmax), plus their sizes (5, 2)."""
    from PIL import Image

    imgs = []
    for name in FROST_FILES:
        with Image.open(FROST_DIR / name) as im:
            a = np.asarray(im.convert("RGB"))
        hh, ww = int(round(a.shape[0] * 0.2)), int(round(a.shape[1] * 0.2))
        ri = np.minimum(5 * np.arange(hh) + 2, a.shape[0] - 1)
        ci = np.minimum(5 * np.arange(ww) + 2, a.shape[1] - 1)
        imgs.append(a[ri][:, ci])
    hm = max(i.shape[0] for i in imgs)
    wm = max(i.shape[1] for i in imgs)
    bank = torch.zeros(len(imgs), 3, hm, wm, dtype=torch.uint8)
    for j, a in enumerate(imgs):
        bank[j, :, :a.shape[0], :a.shape[1]] = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    sizes = torch.tensor([[a.shape[0], a.shape[1]] for a in imgs])
    return bank, sizes


def _frost_draws(b: int, h: int, w: int, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(photo index, crop row, crop column) per image, from three uniforms each."""
    _, sizes = _frost_bank()
    d = _rand((b, 3), gen, "cpu").double()
    idx = (d[:, 0] * len(FROST_FILES)).long().clamp(max=len(FROST_FILES) - 1)
    r0 = (d[:, 1] * (sizes[idx, 0] - h)).long()
    c0 = (d[:, 2] * (sizes[idx, 1] - w)).long()
    return idx, r0, c0


def frost(u, severity, gen=None):
    keep, weight = PARAMS["frost"][severity - 1]
    b, c, h, w = u.shape
    bank, _ = _frost_bank()
    idx, r0, c0 = _frost_draws(b, h, w, gen)
    rr = (r0[:, None] + torch.arange(h))[:, :, None]
    cc = (c0[:, None] + torch.arange(w))[:, None, :]
    crops = bank.permute(0, 2, 3, 1)[idx[:, None, None], rr, cc].permute(0, 3, 1, 2)  # (B, 3, h, w) uint8
    return (keep * u + weight * crops.to(u.device, F64)).clamp(0, 255)  # already on the 0..255 scale


def _plasma(b: int, n: int, decay: float, gen, device) -> torch.Tensor:
    """Diamond-square height maps (B, n, n) in [0, 1]: the reference's algorithm and float64 arithmetic, with
    its wibble draws uniform(-wibble, wibble) = -wibble + 2*wibble*U."""
    m = torch.zeros(b, n, n, dtype=F64, device=device)
    step, wibble = n, 100.0

    def wibbled(a):
        return a / 4 + wibble * (-wibble + (wibble - -wibble) * _rand(a.shape, gen, device).double())

    while step >= 2:
        half = step // 2
        corners = m[:, 0:n:step, 0:n:step]
        sq = corners + torch.roll(corners, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half:n:step, half:n:step] = wibbled(sq)
        dr = m[:, half:n:step, half:n:step]
        ul = m[:, 0:n:step, 0:n:step]
        m[:, 0:n:step, half:n:step] = wibbled((dr + torch.roll(dr, 1, 1)) + (ul + torch.roll(ul, -1, 2)))
        m[:, half:n:step, 0:n:step] = wibbled((dr + torch.roll(dr, 1, 2)) + (ul + torch.roll(ul, -1, 1)))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog(u, severity, gen=None):
    weight, decay = PARAMS["fog"][severity - 1]
    b, c, h, w = u.shape
    n = 1 << (max(h, w, 2) - 1).bit_length()  # the reference's map is 32 for 32 x 32
    x = u / 255
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + weight * _plasma(b, n, decay, gen, u.device)[:, None, :h, :w]
    return _out(x * peak / (peak + weight))


# ----------------------------------------------------------------------------------------------- digital

def _rgb_to_hsv(x):
    """skimage.color.rgb2hsv in float64, its operation order and hue precedence (blue, then green, then red)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, _ = x.max(dim=1)
    mn, _ = x.min(dim=1)
    delta = v - mn
    s = torch.where(delta > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = (g - b) / safe
    hg = 2 + (b - r) / safe
    hb = 4 + (r - g) / safe
    hue = torch.where(b == v, hb, torch.where(g == v, hg, hr))
    hue = torch.where(delta > 0, (hue / 6) % 1, torch.zeros_like(hue))
    return hue, s, v


def _hsv_to_rgb(hue, s, v):
    """skimage.color.hsv2rgb in float64."""
    h6 = hue * 6
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)  # (6, B, 3, H, W)
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1))[0]


def brightness(u, severity, gen=None):
    c = PARAMS["brightness"][severity - 1]
    hue, s, v = _rgb_to_hsv(u / 255)
    return _out(_hsv_to_rgb(hue, s, (v + c).clamp(0, 1)))


def saturate(u, severity, gen=None):
    a, b = PARAMS["saturate"][severity - 1]
    hue, s, v = _rgb_to_hsv(u / 255)
    return _out(_hsv_to_rgb(hue, (s * a + b).clamp(0, 1), v))


def _sequential_mean_hw(x: torch.Tensor) -> torch.Tensor:
    """np.mean(hwc, axis=(0, 1)): numpy adds the pixels one after another per channel, then divides."""
    flat = x.flatten(2)
    acc = flat[..., 0].clone()
    for i in range(1, flat.shape[-1]):
        acc = acc + flat[..., i]
    return (acc / flat.shape[-1])[..., None, None]


def contrast(u, severity, gen=None):
    c = PARAMS["contrast"][severity - 1]
    x = u / 255
    mean = _sequential_mean_hw(x)
    return _out((x - mean) * c + mean)


def _affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """cv2.getAffineTransform for a batch: (B, 3, 2) x (B, 3, 2) -> (B, 2, 3) mapping src points to dst."""
    ones = torch.ones(src.shape[0], 3, 1, dtype=src.dtype, device=src.device)
    a = torch.cat([src, ones], 2)  # (B, 3, 3)
    return torch.linalg.solve(a, dst).transpose(1, 2)


def _invert_affine(m: torch.Tensor) -> torch.Tensor:
    """cv2.invertAffineTransform, same formula (double)."""
    m0, m1, m2 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m3, m4, m5 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    d = m0 * m4 - m1 * m3
    d = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    a11, a22, a12, a21 = m4 * d, m0 * d, m1 * -d, m3 * -d
    b1 = -a11 * m2 - a12 * m5
    b2 = -a21 * m2 - a22 * m5
    return torch.stack([torch.stack([a11, a12, b1], 1), torch.stack([a21, a22, b2], 1)], 1)


def _warp_affine_f32(img: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """cv2.warpAffine(float32 img, M, INTER_LINEAR, BORDER_REFLECT_101) as OpenCV <= 4.10 computes it.

    Source positions are fixed point: round(A x * 1024) + round((B y + C) * 1024) + 16, shifted down to 1/32
    pixel (OpenCV's AB_BITS = 10 then INTER_BITS = 5); the bilinear weights come from its float32 table
    ((1 - fy)(1 - fx), (1 - fy) fx, fy (1 - fx), fy fx) and the four products are summed left to right in float32.
    """
    b, c, h, w = img.shape
    dev = img.device
    inv = _invert_affine(m)
    xs = torch.arange(w, dtype=F64, device=dev)
    ys = torch.arange(h, dtype=F64, device=dev)
    adelta = torch.round(inv[:, 0, 0, None] * xs * 1024).long()  # (B, W)
    bdelta = torch.round(inv[:, 1, 0, None] * xs * 1024).long()
    x0 = torch.round((inv[:, 0, 1, None] * ys + inv[:, 0, 2, None]) * 1024).long() + 16  # (B, H)
    y0 = torch.round((inv[:, 1, 1, None] * ys + inv[:, 1, 2, None]) * 1024).long() + 16
    xx = (x0[:, :, None] + adelta[:, None, :]) >> 5  # (B, H, W) in 1/32 pixel
    yy = (y0[:, :, None] + bdelta[:, None, :]) >> 5
    sx, fx = xx >> 5, (xx & 31).float() / 32
    sy, fy = yy >> 5, (yy & 31).float() / 32
    w00, w01 = (1 - fy) * (1 - fx), (1 - fy) * fx
    w10, w11 = fy * (1 - fx), fy * fx
    flat = img.flatten(2)

    def at(ri, ci):
        ri = _fold(ri, h, "reflect101")
        ci = _fold(ci, w, "reflect101")
        return flat.gather(2, (ri * w + ci).flatten(1)[:, None, :].expand(b, c, -1)).view(b, c, h, w)

    return (((at(sy, sx) * w00[:, None] + at(sy, sx + 1) * w01[:, None]) + at(sy + 1, sx) * w10[:, None])
            + at(sy + 1, sx + 1) * w11[:, None])


def _fold(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "symmetric":
        m = i % (2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m)
    p = max(2 * n - 2, 1)  # reflect101
    m = i % p
    return torch.where(m >= n, p - m, m)


def _map_coordinates_f32(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.map_coordinates(float32 img, order=1, mode='reflect') at float64 positions (B, H, W):
    bilinear in float64 with symmetric borders, stored as float32 (scipy's output dtype)."""
    b, c, h, w = img.shape
    r0, c0 = torch.floor(rows), torch.floor(cols)
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]
    r0, c0 = r0.long(), c0.long()
    flat = img.double().flatten(2)

    def at(ri, ci):
        idx = (_fold(ri, h, "symmetric") * w + _fold(ci, w, "symmetric")).flatten(1)[:, None, :].expand(b, c, -1)
        return flat.gather(2, idx).view(b, c, h, w)

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bot = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return (top * (1 - fr) + bot * fr).float()


def elastic_transform(u, severity, gen=None):
    """float32 like the reference: random affine (cv2.getAffineTransform + warpAffine, OpenCV's fixed-point
    positions and float32 bilinear table), then smooth uniform(-1, 1) displacement fields (skimage gaussian,
    mode reflect, truncate 3, float64, times alpha, stored float32) sampled by map_coordinates (order 1,
    mode reflect)."""
    alpha, sigma, jitter = PARAMS["elastic_transform"][severity - 1]
    b, c, h, w = u.shape
    dev = u.device
    img = u.float() / 255  # np.array(image, dtype=np.float32) / 255.
    centre = np.float32([h, w]) // 2
    sq = min(h, w) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    src = torch.as_tensor(pts1, dtype=F32, device=dev).expand(b, 3, 2)
    jit = (-jitter + (jitter - -jitter) * _rand((b, 3, 2), gen, dev).double()).float()  # uniform(-c, c) as float32
    dst = src + jit  # float32 sum, like pts1 + jitter in the reference
    warped = _warp_affine_f32(img, _affine_from_points(src.double(), dst.double()))
    fields = -1 + (1 - -1) * _rand((b, 2, h, w), gen, dev).double()  # uniform(-1, 1): dx's field, dy's field
    disp = (_gaussian(fields, sigma, "symmetric", truncate=3.0) * alpha).float()
    yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=F64), torch.arange(w, device=dev, dtype=F64),
                            indexing="ij")
    rows = yy[None] + disp[:, 1].double()
    cols = xx[None] + disp[:, 0].double()
    return _out(_map_coordinates_f32(warped, rows, cols))


@lru_cache(maxsize=None)
def _pil_box_weights(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's BOX resampling weights as integers with 22 fractional bits (its 8-bit fixed-point path).

    Pillow gives weight 1 to each source pixel whose centre falls in the output pixel's box (support
    0.5 * scale), normalised: not area-overlap weights."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
        centre = (o + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            t = (i - centre + 0.5) / fscale
            w[o, i] = 1.0 if -0.5 < t <= 0.5 else 0.0
        s = w[o].sum()
        if s:
            w[o] /= s
    return np.floor(w * (1 << 22) + 0.5)


def _pil_resize_u8(x255: torch.Tensor, size: int) -> torch.Tensor:
    """Pillow BOX resize of 8-bit images (B, C, H, W) with values 0..255: horizontal pass then vertical pass,
    each rounded and clipped to 8 bits, in exact integer arithmetic (float64)."""
    b, c, h, w = x255.shape
    wh = torch.as_tensor(_pil_box_weights(w, size), dtype=torch.float64, device=x255.device)
    wv = torch.as_tensor(_pil_box_weights(h, size), dtype=torch.float64, device=x255.device)
    half = float(1 << 21)
    t = torch.floor((x255.double() @ wh.T + half) / (1 << 22)).clamp(0, 255)
    return torch.floor((wv @ t + half) / (1 << 22)).clamp(0, 255)


def pixelate(u, severity, gen=None):
    c = PARAMS["pixelate"][severity - 1]
    h = u.shape[-1]
    return _pil_resize_u8(_pil_resize_u8(u, int(h * c)), h)


_POOL: ThreadPoolExecutor | None = None


def _jpeg_one(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_compression(u, severity, gen=None):
    """PIL JPEG round trip at the reference quality, on the CPU, one image per task in a thread pool."""
    global _POOL
    q = PARAMS["jpeg_compression"][severity - 1]
    u8 = u.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    out = np.stack(list(_POOL.map(lambda a: _jpeg_one(a, q), u8)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(u.device, F64)


# ----------------------------------------------------------------------------------------------- spatter

def _canny(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """OpenCV Canny (aperture 3, L1 gradient) on 8-bit images (B, 1, H, W) -> bool edges (B, 1, H, W)."""
    sob = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    f = img.float()  # integer gradients, exact in float32
    dx = _conv2d_same(f, sob, "nearest")
    dy = _conv2d_same(f, sob.T.contiguous(), "nearest")
    mag = dx.abs() + dy.abs()
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitude outside the image is 0

    def nb(dr, dc):
        h, w = mag.shape[-2:]
        return mp[..., 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]

    ax = dx.abs()
    ay = dy.abs() * 32768
    tg22 = ax * 13573
    tg67 = tg22 + ax * 65536
    horiz = ay < tg22
    vert = ay > tg67
    s_pos = (dx * dy) >= 0  # (dx ^ dy) >= 0 in OpenCV: same sign (zero counts as positive)
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_dp = (mag > nb(-1, -1)) & (mag > nb(1, 1))
    keep_dn = (mag > nb(-1, 1)) & (mag > nb(1, -1))
    keep = torch.where(horiz, keep_h, torch.where(vert, keep_v, torch.where(s_pos, keep_dp, keep_dn)))
    cand = (mag > low) & keep
    edges = cand & (mag > high)
    for _ in range(mag.shape[-1] * mag.shape[-2]):
        grown = cand & (F.max_pool2d(edges.float(), 3, 1, 1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


_CHAMFER_FIX = (65536, 91750, 143978)  # OpenCV DIST_L2 5x5 steps 1, 1.4, 2.1969 as cvRound(step * 2^16)


def _chamfer_steps() -> list[tuple[int, int, float]]:
    """The 5 x 5 chamfer moves (row offset, column offset, cost) in OpenCV's 16.16 fixed point: axis, diagonal,
    knight."""
    steps = []
    for di in range(-2, 3):
        for dj in range(-2, 3):
            a, b = abs(di), abs(dj)
            if a + b == 1:
                steps.append((di, dj, float(_CHAMFER_FIX[0])))
            elif (a, b) == (1, 1):
                steps.append((di, dj, float(_CHAMFER_FIX[1])))
            elif {a, b} == {1, 2}:
                steps.append((di, dj, float(_CHAMFER_FIX[2])))
    return steps


def _distance_to_zero(mask_zero: torch.Tensor, cap: float) -> torch.Tensor:
    """cv2.distanceTransform(DIST_L2, 5) (B, 1, H, W) float32 to the nearest True pixel, exact up to `cap`: integer
    16.16 chamfer distances by min-plus relaxation over the 16 moves (exact in float64), then times 2^-16 in
    float32 like OpenCV."""
    _, _, h, w = mask_zero.shape
    big = float(1 << 40)
    d = torch.where(mask_zero, 0.0, big).to(F64)
    steps = _chamfer_steps()
    for _ in range(int(cap) + 2):
        p = F.pad(d, (2, 2, 2, 2), value=big)
        nd = d
        for di, dj, cost in steps:
            nd = torch.minimum(nd, p[..., 2 + di:2 + di + h, 2 + dj:2 + dj + w] + cost)
        if torch.equal(nd, d):
            break
        d = nd
    return (d.clamp(max=float(1 << 30)) / 65536).float()


def _equalize_hist(u8: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image on (B, 1, H, W) values 0..255: lut = round(cdf * (255.f / (total - first)))
    in float32, first bin -> 0."""
    b = u8.shape[0]
    v = u8.long().flatten(1)
    hist = torch.zeros(b, 256, dtype=F64, device=u8.device).scatter_add_(1, v, torch.ones_like(v, dtype=F64))
    total = v.shape[1]
    first = (hist > 0).double().argmax(1)  # first non-empty bin
    h0 = hist.gather(1, first[:, None])
    cdf = (hist.cumsum(1) - h0).float()  # sum of bins after the first up to i (exact integers)
    scale = torch.tensor(255.0, dtype=F32) / (total - h0).clamp(min=1).float()
    lut = torch.round(cdf * scale).clamp(0, 255).double()
    bins = torch.arange(256, device=u8.device)[None]
    lut = torch.where(bins <= first[:, None], torch.zeros_like(lut), lut)
    lut = torch.where(h0 == total, first[:, None].double().expand(-1, 256), lut)
    return lut.gather(1, v).view_as(u8).to(u8.dtype)


def spatter(u, severity, gen=None):
    loc, scale, sigma, thresh, inten, mode = PARAMS["spatter"][severity - 1]
    b, c, h, w = u.shape
    dev = u.device
    x32 = u.float() / 255  # np.array(x, dtype=np.float32) / 255.
    liquid = loc + scale * _randn((b, 1, h, w), gen, dev).double()  # numpy normal(loc, scale)
    liquid = _gaussian(liquid, sigma, "nearest")
    liquid = torch.where(liquid < thresh, torch.zeros_like(liquid), liquid)
    if mode == 0:  # water
        lq = torch.remainder(torch.floor(liquid * 255), 256)  # astype(np.uint8) wraps values above 255
        edges = _canny(lq, 50, 150)
        dist = _distance_to_zero(edges, 20).clamp(max=20)  # distanceTransform, THRESH_TRUNC at 20
        dist = torch.floor((_box3_sum(dist.double()) * (1.0 / 9)).float())  # cv2.blur (float32) .astype(uint8)
        dist = _equalize_hist(dist)
        ker = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = _conv2d_same(dist.float(), ker, "reflect101").clamp(0, 255)  # filter2D CV_8U (integer sums)
        dist = torch.round(_box3_sum(dist.double()) * (1.0 / 9)).float()  # cv2.blur on uint8, .astype(float32)
        m = lq.float() * dist
        peak = m.amax(dim=(2, 3), keepdim=True)
        m = (m / peak) * _f32(inten)  # 0 / 0 = NaN when there is no liquid, as in the reference
        color = torch.stack([_f32(175 / 255.), _f32(238 / 255.), _f32(238 / 255.)]).to(dev).view(1, 3, 1, 1)
        out = _out(x32 + m * color)
        return torch.where(peak > 0, out, torch.zeros_like(out))  # np.uint8(NaN) is 0 on x86
    m = (liquid > thresh).double()  # mud; skimage 0.14's gaussian works in float64
    m = _gaussian(m, inten, "nearest")
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.stack([_f32(63 / 255.), _f32(42 / 255.), _f32(20 / 255.)]).to(dev).view(1, 3, 1, 1)
    color = (color.double() * m).float()  # color *= m (float32 array, float64 factor)
    x32 = (x32.double() * (1 - m)).float()  # x *= 1 - m
    return _out(x32 + color)


# ----------------------------------------------------------------------------------------------- front door

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


# ----------------------------------------------------------------------------------------------- evaluation

def _predict(model, xb: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(xb).argmax(dim=1)


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


def evaluate(model, x_uint8: torch.Tensor, y: torch.Tensor, *, names: Iterable[str] = CORRUPTIONS,
             severities: Iterable[int] = (1, 2, 3, 4, 5), seed: int = 0, batch_size: int = 500,
             device="cpu", on_batch: Callable[[dict], None] | None = None,
             span: tuple[int, int] | None = None) -> dict:
    """Accuracy of `model` on generated corruptions of a uint8 set (N, 3, H, W) with labels y.

    Returns {"clean_correct": bool (N,), "correct": {(name, severity): bool (N,)}, "seconds": float}. The model
    is called under torch.no_grad on float batches in [0, 1]; its train/eval mode is left as given. on_batch, if
    given, gets {"name", "severity", "done", "total"} after every batch ("name" is None for the clean pass).
    span=(lo, hi), lo a multiple of batch_size: evaluate only examples [lo, hi) (one process's share under
    torchrun), in the batches the whole set has there; outcomes outside the span are left False.
    """
    names, severities = _check_names(names), _check_severities(severities)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise UsageError(f"evaluate expects uint8 images (N, 3, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    n = x_uint8.shape[0]
    lo, hi = (0, n) if span is None else (int(span[0]), min(int(span[1]), n))
    if lo % batch_size:
        raise UsageError(f"span must start on a batch boundary (a multiple of {batch_size}), got {lo}")
    y = torch.as_tensor(y).long()
    t0 = time.perf_counter()
    clean = torch.zeros(n, dtype=torch.bool)
    for s in range(lo, hi, batch_size):
        e = min(s + batch_size, hi)
        xb = x_uint8[s:e].to(device).float().div_(255)
        clean[s:e] = (_predict(model, xb).cpu() == y[s:e])
        if on_batch:
            on_batch({"name": None, "severity": None, "done": e, "total": n})
    correct = {}
    for name in names:
        for sev in severities:
            ok = torch.zeros(n, dtype=torch.bool)
            for s in range(lo, hi, batch_size):
                e = min(s + batch_size, hi)
                xb = corrupt_range(x_uint8, name, sev, seed, s, e, device)
                ok[s:e] = _predict(model, xb).cpu() == y[s:e]
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
            correct[(name, sev)] = ok
    return {"clean_correct": clean, "correct": correct, "seconds": time.perf_counter() - t0}


def _acc(t: torch.Tensor) -> float:
    return 100.0 * float(t.double().mean()) if t.numel() else float("nan")


def _mean(vals):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(result: dict, reference: dict | None = None, reference_label: str = "reference") -> dict:
    """Accuracy tables and corruption errors (all in %) from an `evaluate` result.

    - "cells": {name: {severity: accuracy}}, "per_corruption": mean over severities, "per_severity": mean over
      the benchmark corruptions present;
    - "mean_accuracy_benchmark" (the 15, whichever were evaluated), "mean_accuracy_all" (every corruption
      evaluated), "mean_accuracy_extra";
    - "mce_unnormalized" = 100 - mean_accuracy_benchmark (AugMix / RobustBench CIFAR convention), and
      "mce_unnormalized_all" over all evaluated corruptions;
    - with `reference` (another model's result on the same cells): "mce_vs_reference" (sum of errors over
      severities divided by the reference's, averaged over benchmark corruptions, x100) and
      "relative_mce_vs_reference" (the same with clean error subtracted), labelled with reference_label. No
      ImageNet AlexNet constants are ever used.
    """
    clean = result.get("clean_correct")
    clean_acc = _acc(clean) if clean is not None and clean.numel() else None
    cells: dict[str, dict[int, float]] = {}
    for (name, sev), ok in result["correct"].items():
        cells.setdefault(name, {})[int(sev)] = _acc(ok)
    ordered = [n for n in CORRUPTIONS if n in cells] + [n for n in cells if n not in CORRUPTIONS]
    cells = {n: dict(sorted(cells[n].items())) for n in ordered}
    per_corr = {n: _mean(v.values()) for n, v in cells.items()}
    bench = [n for n in cells if n in BENCHMARK_CORRUPTIONS]
    extra = [n for n in cells if n not in BENCHMARK_CORRUPTIONS]
    sevs = sorted({s for v in cells.values() for s in v})
    per_sev = {s: _mean(cells[n].get(s) for n in bench) for s in sevs}
    all_cells = [a for n in cells for a in cells[n].values()]
    bench_cells = [a for n in bench for a in cells[n].values()]
    mb = _mean(bench_cells)
    ma = _mean(all_cells)
    out = {
        "clean_accuracy": clean_acc,
        "cells": cells,
        "per_corruption": per_corr,
        "per_severity": per_sev,
        "benchmark_corruptions": bench,
        "extra_corruptions": extra,
        "mean_accuracy_benchmark": mb,
        "mean_accuracy_extra": _mean(a for n in extra for a in cells[n].values()),
        "mean_accuracy_all": ma,
        "mce_unnormalized": None if mb is None else 100.0 - mb,
        "mce_unnormalized_all": None if ma is None else 100.0 - ma,
        "seconds": result.get("seconds"),
    }
    if reference is not None:
        ref = summarize(reference)
        ces, rces = {}, {}
        for n in bench:
            common = [s for s in cells[n] if s in ref["cells"].get(n, {})]
            if not common:
                continue
            err = sum(100 - cells[n][s] for s in common)
            rerr = sum(100 - ref["cells"][n][s] for s in common)
            ces[n] = 100.0 * err / rerr if rerr > 0 else None
            if clean_acc is not None and ref["clean_accuracy"] is not None:
                d = sum(clean_acc - cells[n][s] for s in common)
                rd = sum(ref["clean_accuracy"] - ref["cells"][n][s] for s in common)
                rces[n] = 100.0 * d / rd if rd > 0 else None
        out.update({
            "reference_label": reference_label,
            "ce_vs_reference": ces,
            "mce_vs_reference": _mean(ces.values()),
            "relative_ce_vs_reference": rces,
            "relative_mce_vs_reference": _mean(rces.values()),
            "note": f"CE normalised by {reference_label!r} (a CIFAR model), not by ImageNet AlexNet",
        })
    return out


# ----------------------------------------------------------------------------------------------- official files

def load_official(directory, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `<directory>/<name>.npy` (uint8 (5N, H, W, 3), severity s in rows (s-1)N .. sN) and labels.npy.

    Returns (x_uint8 (5N, 3, H, W), y int64 (5N,)); N is inferred as rows / 5 (10,000 for CIFAR-10-C).
    """
    _check(name, 1)
    d = Path(directory)
    f, lf = d / f"{name}.npy", d / "labels.npy"
    if not d.is_dir():
        raise DatasetError(f"corruption directory {d} not found (expected CIFAR-10-C's <name>.npy + labels.npy)")
    for p in (f, lf):
        if not p.is_file():
            raise DatasetError(f"{p} not found: expected the CIFAR-10-C layout (<name>.npy and labels.npy)")
    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
        lab = np.load(lf, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a broken file
        raise DatasetError(f"cannot read {f.name} or labels.npy in {d}: {exc}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] % 5 or arr.shape[0] == 0:
        raise DatasetError(f"{f} has {arr.dtype} {arr.shape}: expected uint8 (5N, H, W, 3), "
                           "e.g. (50000, 32, 32, 3), severities stacked 1..5")
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        raise DatasetError(f"{lf} has shape {lab.shape}: expected ({arr.shape[0]},) to match {f.name}")
    x = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).contiguous()  # copy out of the read-only memmap
    return x, torch.from_numpy(lab.astype(np.int64))


def load_clean(directory) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The clean images of an exported directory (`clean.npy`, uint8 (N, H, W, 3), with labels.npy's first N
    labels), or None when the directory has none (the official CIFAR-10-C folders do not)."""
    d = Path(directory)
    f = d / "clean.npy"
    if not f.is_file():
        return None
    try:
        arr = np.load(f, allow_pickle=False)
        lab = np.load(d / "labels.npy", allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a broken file
        raise DatasetError(f"cannot read clean.npy or labels.npy in {d}: {exc}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or lab.ndim != 1 or lab.shape[0] < arr.shape[0]:
        raise DatasetError(f"{f} has {arr.dtype} {arr.shape}: expected uint8 (N, H, W, 3) with N <= {lab.shape}")
    return (torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(lab[:arr.shape[0]].astype(np.int64)))


def evaluate_official(model, directory, names: Iterable[str] | None = None, *,
                      severities: Iterable[int] = (1, 2, 3, 4, 5), batch_size: int = 500, device="cpu",
                      clean: tuple[torch.Tensor, torch.Tensor] | None = None, n: int | None = None,
                      on_batch: Callable[[dict], None] | None = None) -> dict:
    """Like `evaluate`, on the published (or exported) .npy files. names=None: every corruption file present.

    clean: optional (x_uint8, y) of the same clean images, in the files' order; without it "clean_correct" is an
    empty tensor. n: only the first n examples of each severity (and of `clean`).
    """
    d = Path(directory)
    if names is None:
        names = [nm for nm in CORRUPTIONS if (d / f"{nm}.npy").is_file()]
        if not names:
            raise DatasetError(f"no CIFAR-10-C files (<name>.npy) in {d}")
    names, severities = _check_names(names), _check_severities(severities)
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    t0 = time.perf_counter()
    clean_ok = torch.zeros(0, dtype=torch.bool)
    if clean is not None:
        cx, cy = clean[0][:n], torch.as_tensor(clean[1])[:n].long()
        clean_ok = torch.cat([_predict(model, cx[s:s + batch_size].to(device).float().div_(255)).cpu()
                              == cy[s:s + batch_size] for s in range(0, len(cy), batch_size)]) if len(cy) else clean_ok
        if on_batch:
            on_batch({"name": None, "severity": None, "done": len(cy), "total": len(cy)})
    correct = {}
    for name in names:
        x, y = load_official(d, name)
        rows = x.shape[0] // 5
        m = rows if n is None else min(n, rows)
        for sev in severities:
            ok = torch.zeros(m, dtype=torch.bool)
            base = (sev - 1) * rows
            for s in range(0, m, batch_size):
                e = min(s + batch_size, m)
                xb = x[base + s:base + e].to(device).float().div_(255)
                ok[s:e] = _predict(model, xb).cpu() == y[base + s:base + e]
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": m})
            correct[(name, sev)] = ok
    return {"clean_correct": clean_ok, "correct": correct, "seconds": time.perf_counter() - t0}


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    atomic_write(path, write, mode=0o644)  # data sets are meant to be shared


def export_files(names: Iterable[str]) -> list[str]:
    """The file names `export` writes for these corruptions."""
    return [f"{n}.npy" for n in names] + ["labels.npy", "clean.npy"]


def export(directory, x_uint8: torch.Tensor, y: torch.Tensor, names: Iterable[str] = CORRUPTIONS, seed: int = 0,
           *, batch_size: int = 500, device="cpu", on_batch: Callable[[dict], None] | None = None) -> list[Path]:
    """Write a generated set in the CIFAR-10-C layout: <name>.npy uint8 (5N, H, W, 3) and labels.npy (5N,), plus
    clean.npy (N, H, W, 3), the clean images, so that evaluating the directory can report clean accuracy.

    Images are exactly those `evaluate` sees for the same seed (`corrupt_range_uint8`), so `evaluate_official` on
    the directory gives the same per-example outcomes. Each file is written to a temporary name in the directory
    (`.<name>.<host>.<pid>-<token>.tmp`) and renamed into place, mode 0644; the temporaries a killed export left
    there are removed when the next export into the folder starts (epcli.atomic). Returns the written paths.
    """
    names = _check_names(names)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise UsageError(f"export expects uint8 images (N, 3, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # a kill (SIGKILL cannot be caught) between writing a temporary and its rename leaves it behind: remove
    # those of dead exports (ours and earlier versions' naming), only for the files an export writes
    remove_stale_temps(d, targets=set(export_files(CORRUPTIONS)), legacy=("mkstemp",))
    n = x_uint8.shape[0]
    y = torch.as_tensor(y).long()
    written = []
    for name in names:
        out = np.empty((5 * n,) + tuple(x_uint8.shape[2:]) + (3,), dtype=np.uint8)
        for sev in range(1, 6):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                xb = corrupt_range_uint8(x_uint8, name, sev, seed, s, e, device)
                out[(sev - 1) * n + s:(sev - 1) * n + e] = xb.permute(0, 2, 3, 1).cpu().numpy()
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
        _atomic_save(d / f"{name}.npy", out)
        written.append(d / f"{name}.npy")
    lab_dtype = np.uint8 if (int(y.max()) if y.numel() else 0) < 256 else np.int64  # CIFAR-10/100: uint8
    _atomic_save(d / "labels.npy", np.tile(y.numpy(), 5).astype(lab_dtype))
    written.append(d / "labels.npy")
    _atomic_save(d / "clean.npy", x_uint8.permute(0, 2, 3, 1).contiguous().numpy())  # epcli's addition
    written.append(d / "clean.npy")
    return written


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
