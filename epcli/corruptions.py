"""The 19 CIFAR-10-C corruptions in torch, batched, seeded; the official .npy loader and exporter; metrics.

Every corruption takes float images (B, 3, H, W) in [0, 1] on any device and returns the same shape, with the
CIFAR-10-C severity parameters of Hendrycks & Dietterich (hendrycks/robustness, `make_cifar_c.py`; see
docs/corruptions.md for the table and the fidelity notes). Random draws come from a `torch.Generator`; when it
lives on the CPU the draws are made there and moved, so the same seed gives the same images on every device.

The reference itself set no seed, so random corruptions can be matched in distribution only; the deterministic
ones (blurs, brightness, contrast, saturate, pixelate, JPEG) follow the reference maths step by step, including
its 8-bit round trips (PIL / ImageMagick) where it had them. Saved images use the reference's conversion,
`uint8(value * 255)` (truncation, not rounding).

Only torch, numpy and Pillow are used; the module never imports the store, the CLI or rich.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from epcli.errors import DatasetError, UsageError

__all__ = [
    "CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "EXTRA_CORRUPTIONS", "PARAMS", "corrupt", "corrupt_range",
    "evaluate", "summarize", "load_official", "evaluate_official", "export", "sample_grid", "to_uint8",
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


# ----------------------------------------------------------------------------------------------- filters

def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid, as the reference's PIL / ImageMagick / PNG round trips do."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def _pad_index(n: int, r: int, mode: str, device) -> torch.Tensor:
    """Indices into an axis of length n, extended by r on both sides with a border rule.

    nearest: edge replication (scipy 'nearest', ImageMagick edge); symmetric: d c b a | a b c d (scipy
    'reflect'); reflect101: d c b | a b c d (OpenCV BORDER_REFLECT_101, torch 'reflect').
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
    """scipy.ndimage / skimage Gaussian weights: radius int(truncate*sigma + 0.5), normalised."""
    r = int(truncate * sigma + 0.5)
    if sigma <= 0 or r == 0:
        return np.ones(1)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _sep_filter(x: torch.Tensor, k: np.ndarray, mode: str) -> torch.Tensor:
    """Apply a symmetric 1-D kernel along H and W of (B, C, H, W) with a given border rule."""
    r = len(k) // 2
    if r == 0:
        return x.clone()
    b, c, h, w = x.shape
    kt = torch.as_tensor(k, dtype=x.dtype, device=x.device)
    xp = x.index_select(3, _pad_index(w, r, mode, x.device))
    xp = F.conv2d(xp.reshape(b * c, 1, h, -1), kt.view(1, 1, 1, -1)).view(b, c, h, w)
    xp = xp.index_select(2, _pad_index(h, r, mode, x.device))
    return F.conv2d(xp.reshape(b * c, 1, -1, w), kt.view(1, 1, -1, 1)).view(b, c, h, w)


def _gaussian(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    return _sep_filter(x, _gauss1d(sigma, truncate), mode)


def _conv2d_same(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every channel with a (k, k) kernel (odd k), borders by `mode` (OpenCV filter2D semantics)."""
    b, c, h, w = x.shape
    r = kernel.shape[-1] // 2
    xp = x.index_select(3, _pad_index(w, r, mode, x.device)).index_select(2, _pad_index(h, r, mode, x.device))
    return F.conv2d(xp.reshape(b * c, 1, h + 2 * r, w + 2 * r), kernel.to(x)[None, None]).view(b, c, h, w)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur(., (3, 3)): mean over 3 x 3 with BORDER_REFLECT_101."""
    return _conv2d_same(x, torch.full((3, 3), 1.0 / 9), "reflect101")


# ----------------------------------------------------------------------------------------------- noise

def gaussian_noise(x, severity, gen=None):
    c = PARAMS["gaussian_noise"][severity - 1]
    return (x + c * _randn(x.shape, gen, x.device)).clamp(0, 1)


def shot_noise(x, severity, gen=None):
    c = PARAMS["shot_noise"][severity - 1]
    counts = torch.poisson((x * c).to(_gdev(gen)), generator=gen).to(x.device)
    return (counts / c).clamp(0, 1)


def impulse_noise(x, severity, gen=None):
    """skimage random_noise(mode='s&p'): each channel value flips with probability `amount`, half to 1, half to 0."""
    c = PARAMS["impulse_noise"][severity - 1]
    u = _rand((2,) + tuple(x.shape), gen, x.device)
    flip = u[0] < c
    salt = u[1] < 0.5
    return torch.where(flip, salt.to(x.dtype), x).clamp(0, 1)


def speckle_noise(x, severity, gen=None):
    c = PARAMS["speckle_noise"][severity - 1]
    return (x + x * c * _randn(x.shape, gen, x.device)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- blurs

def gaussian_blur(x, severity, gen=None):
    return _gaussian(x, PARAMS["gaussian_blur"][severity - 1], "nearest").clamp(0, 1)


def glass_blur(x, severity, gen=None):
    """Blur, 8-bit truncation, local pixel 'swaps', blur again.

    The reference walks h, w from H-1 down to delta+1 and assigns x[h, w], x[h', w'] = x[h', w'], x[h, w] with
    numpy views, which copies x[h', w'] into x[h, w] and leaves x[h', w'] as it was. With delta = 1 the offsets
    come from randint(-1, 1), i.e. {-1, 0}, so every source lies up/left of its target and has not been written
    yet in that pass: one pass is exactly a gather from the pass's input, done here for all pixels at once.
    """
    sigma, delta, iters = PARAMS["glass_blur"][severity - 1]
    assert delta == 1  # the gather argument above needs sources not yet visited
    b, c, h, w = x.shape
    y = torch.floor(_gaussian(x.double(), sigma, "nearest") * 255).clamp(0, 255).to(x.dtype)  # float64 like numpy
    rows = torch.arange(h, device=x.device).view(h, 1).expand(h, w)
    cols = torch.arange(w, device=x.device).view(1, w).expand(h, w)
    inner = (rows > delta) & (cols > delta) & (rows <= h - delta) & (cols <= w - delta)
    for _ in range(iters):
        d = _randint(-delta, delta, (b, 2, h, w), gen, x.device)  # (dx, dy) per pixel, all channels alike
        src = (rows + d[:, 1] * inner) * w + (cols + d[:, 0] * inner)  # (B, H, W)
        y = y.flatten(2).gather(2, src.flatten(1)[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
    return _gaussian(y / 255, sigma, "nearest").clamp(0, 1)


@lru_cache(maxsize=None)
def _disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference's disk: grid -8..8, (X^2 + Y^2 <= r^2) normalised, then a 3 x 3 Gaussian (OpenCV
    GaussianBlur, BORDER_REFLECT_101) of sigma alias_blur; cropped to its non-zero 5 x 5 support."""
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-0.5 * (np.arange(-1, 2) / alias_blur) ** 2)
    g /= g.sum()
    blurred = _sep_filter(torch.as_tensor(disk)[None, None], g, "reflect101")[0, 0]
    assert float(blurred[:6].abs().sum() + blurred[11:].abs().sum()) == 0.0
    return blurred[6:11, 6:11].float()


def defocus_blur(x, severity, gen=None):
    radius, alias = PARAMS["defocus_blur"][severity - 1]
    return _conv2d_same(x, _disk_kernel(radius, alias), "reflect101").clamp(0, 1)


def _motion_taps(radius: float, sigma: float, angle_deg: torch.Tensor):
    """ImageMagick MotionBlurImage: width = 2*ceil(radius)+1 taps on a one-sided line, weights
    exp(-i^2 / (2 sigma^2)) normalised, tap i at offset (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) in (x, y)."""
    width = int(2 * math.ceil(radius) + 1)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    a = angle_deg.double() * (math.pi / 180)
    ii = torch.arange(width, dtype=torch.float64, device=a.device)
    ox = torch.ceil(ii[None] * torch.cos(a)[:, None] - 0.5).long()  # (B, width)
    oy = torch.ceil(ii[None] * torch.sin(a)[:, None] - 0.5).long()
    return k, ox, oy


def _motion_blur_u8(x: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """One-sided Gaussian line blur, edge virtual pixels, result rounded to 8 bits (x on the 8-bit grid)."""
    b, c, h, w = x.shape
    k, ox, oy = _motion_taps(radius, sigma, angle_deg.to(x.device))
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    xc = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    out = torch.zeros_like(xc)
    for t in range(len(k)):
        r = (rows[None] + oy[:, t:t + 1]).clamp(0, h - 1)  # (B, H)
        q = (cols[None] + ox[:, t:t + 1]).clamp(0, w - 1)  # (B, W)
        out += float(k[t]) * xc[bidx, r[:, :, None], q[:, None, :]]
    return _quantize(out.permute(0, 3, 1, 2))


def motion_blur(x, severity, gen=None):
    radius, sigma = PARAMS["motion_blur"][severity - 1]
    angle = _rand((x.shape[0],), gen, x.device) * 90 - 45
    return _motion_blur_u8(_quantize(x), radius, sigma, angle)


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


@lru_cache(maxsize=None)
def _zoom_blur_operator(severity: int, n: int) -> torch.Tensor:
    """(n*n, n*n) operator: (x + sum_z Z_z x Z_z^T) / (len(z) + 1) on a flattened channel."""
    zs = _zoom_factors(PARAMS["zoom_blur"][severity - 1])
    op = np.eye(n * n)
    for z in zs:
        a = _zoom_matrix(n, float(z))
        op += np.kron(a, a)
    return torch.as_tensor(op / (len(zs) + 1), dtype=torch.float32)


def zoom_blur(x, severity, gen=None):
    b, c, h, w = x.shape
    op = _zoom_blur_operator(severity, h).to(x.device)
    return (x.reshape(b * c, h * w) @ op.T).view(b, c, h, w).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- weather

def snow(x, severity, gen=None):
    loc, scale, zoom, thresh, radius, sigma, keep = PARAMS["snow"][severity - 1]
    b, c, h, w = x.shape
    layer = loc + scale * _randn((b, 1, h, w), gen, x.device)
    a = torch.as_tensor(_zoom_matrix(h, float(zoom)), dtype=x.dtype, device=x.device)
    layer = a @ layer @ a.T
    layer = torch.where(layer < thresh, torch.zeros_like(layer), layer)
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255  # PIL 'L' image via astype(uint8)
    angle = _rand((b,), gen, x.device) * 90 - 135
    layer = _motion_blur_u8(layer, radius, sigma, angle)
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    x = keep * x + (1 - keep) * torch.maximum(x, gray * 1.5 + 0.5)
    return (x + layer + layer.flip(2, 3)).clamp(0, 1)


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


def frost(x, severity, gen=None):
    keep, weight = PARAMS["frost"][severity - 1]
    b, c, h, w = x.shape
    bank, sizes = _frost_bank()
    u = _rand((b, 3), gen, "cpu").double()
    idx = (u[:, 0] * len(FROST_FILES)).long().clamp(max=len(FROST_FILES) - 1)
    hs, ws = sizes[idx, 0], sizes[idx, 1]
    r0 = (u[:, 1] * (hs - h)).long()
    c0 = (u[:, 2] * (ws - w)).long()
    rr = (r0[:, None] + torch.arange(h))[:, :, None]
    cc = (c0[:, None] + torch.arange(w))[:, None, :]
    crops = bank.permute(0, 2, 3, 1)[idx[:, None, None], rr, cc].permute(0, 3, 1, 2)  # (B, 3, h, w) uint8
    return (keep * x + weight * crops.to(x.device, x.dtype) / 255).clamp(0, 1)


def _plasma(b: int, n: int, decay: float, gen, device) -> torch.Tensor:
    """Diamond-square height maps (B, n, n) in [0, 1], the reference's algorithm with wibble starting at 100."""
    m = torch.zeros(b, n, n, dtype=torch.float64, device=device)
    step, wibble = n, 100.0

    def wibbled(a):
        return a / 4 + wibble * (wibble * (2 * _rand(a.shape, gen, device).double() - 1))

    while step >= 2:
        half = step // 2
        corners = m[:, 0:n:step, 0:n:step]
        sq = corners + torch.roll(corners, -1, 1)
        sq = sq + torch.roll(sq, -1, 2)
        m[:, half:n:step, half:n:step] = wibbled(sq)
        dr = m[:, half:n:step, half:n:step]
        ul = m[:, 0:n:step, 0:n:step]
        m[:, 0:n:step, half:n:step] = wibbled(dr + torch.roll(dr, 1, 1) + ul + torch.roll(ul, -1, 2))
        m[:, half:n:step, 0:n:step] = wibbled(dr + torch.roll(dr, 1, 2) + ul + torch.roll(ul, -1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog(x, severity, gen=None):
    weight, decay = PARAMS["fog"][severity - 1]
    b, c, h, w = x.shape
    n = 1 << (max(h, w, 2) - 1).bit_length()  # the reference's map is 32 for 32 x 32
    plasma = _plasma(b, n, decay, gen, x.device)[:, None, :h, :w].to(x.dtype)
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x + weight * plasma) * peak / (peak + weight)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------- digital

def _rgb_to_hsv(x):
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v, _ = x.max(dim=1)
    mn, _ = x.min(dim=1)
    delta = v - mn
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hr = (g - b) / safe
    hg = 2 + (b - r) / safe
    hb = 4 + (r - g) / safe
    hue = torch.where(b == v, hb, torch.where(g == v, hg, hr))  # skimage's precedence: blue, green, red
    hue = torch.where(delta > 0, (hue / 6) % 1, torch.zeros_like(hue))
    return hue, s, v


def _hsv_to_rgb(hue, s, v):
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


def brightness(x, severity, gen=None):
    c = PARAMS["brightness"][severity - 1]
    hue, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(hue, s, (v + c).clamp(0, 1)).clamp(0, 1)


def saturate(x, severity, gen=None):
    a, b = PARAMS["saturate"][severity - 1]
    hue, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(hue, (s * a + b).clamp(0, 1), v).clamp(0, 1)


def contrast(x, severity, gen=None):
    c = PARAMS["contrast"][severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0, 1)


def _bilinear(img: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample (B, C, H, W) at float positions (B, H, W) bilinearly; neighbours outside follow `mode`."""
    b, c, h, w = img.shape
    r0 = torch.floor(rows)
    c0 = torch.floor(cols)
    fr = (rows - r0).to(img.dtype)[:, None]
    fc = (cols - c0).to(img.dtype)[:, None]
    r0, c0 = r0.long(), c0.long()

    def fold(i, n):
        if mode == "symmetric":
            m = i % (2 * n)
            return torch.where(m >= n, 2 * n - 1 - m, m)
        p = 2 * n - 2  # reflect101
        m = i % p
        return torch.where(m >= n, p - m, m)

    flat = img.flatten(2)

    def at(ri, ci):
        idx = (fold(ri, h) * w + fold(ci, w)).flatten(1)[:, None, :].expand(b, c, -1)
        return flat.gather(2, idx).view(b, c, h, w)

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bot = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bot * fr


def _affine_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """cv2.getAffineTransform for a batch: (B, 3, 2) x (B, 3, 2) -> (B, 2, 3) mapping src points to dst."""
    ones = torch.ones(src.shape[0], 3, 1, dtype=src.dtype, device=src.device)
    a = torch.cat([src, ones], 2)  # (B, 3, 3)
    return torch.linalg.solve(a, dst).transpose(1, 2)


def elastic_transform(x, severity, gen=None):
    """Random affine (cv2.warpAffine, bilinear with 1/32-pixel positions, BORDER_REFLECT_101), then a smooth
    random displacement (uniform(-1, 1) fields, Gaussian sigma truncated at 3, times alpha) sampled bilinearly
    with symmetric borders (scipy map_coordinates order=1, mode='reflect')."""
    alpha, sigma, jitter = PARAMS["elastic_transform"][severity - 1]
    b, c, h, w = x.shape
    dev = x.device
    centre = np.float32([h, w]) // 2
    sq = min(h, w) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    src = torch.as_tensor(pts1, dtype=torch.float64, device=dev).expand(b, 3, 2)
    dst = src + (jitter * (2 * _rand((b, 3, 2), gen, dev).double() - 1)).float().double()
    m = _affine_from_points(src, dst)  # maps (x=col, y=row) source -> destination
    full = torch.cat([m, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=m.dtype, device=dev).expand(b, 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2]  # dst -> src, what warpAffine samples with
    yy, xx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64),
                            torch.arange(w, device=dev, dtype=torch.float64), indexing="ij")
    sx = inv[:, 0, 0, None, None] * xx + inv[:, 0, 1, None, None] * yy + inv[:, 0, 2, None, None]
    sy = inv[:, 1, 0, None, None] * xx + inv[:, 1, 1, None, None] * yy + inv[:, 1, 2, None, None]
    sx, sy = torch.round(sx * 32) / 32, torch.round(sy * 32) / 32  # OpenCV's INTER_BITS = 5 sub-pixel grid
    warped = _bilinear(x, sy, sx, "reflect101")
    fields = (2 * _rand((b, 2, h, w), gen, dev).double() - 1).float()  # float32: torch's CPU float64 conv is slow
    fields = _gaussian(fields, sigma, "symmetric", truncate=3.0) * alpha
    dx, dy = fields[:, 0], fields[:, 1]
    rows = yy.float()[None] + dy
    cols = xx.float()[None] + dx
    return _bilinear(warped, rows, cols, "symmetric").clamp(0, 1)


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


def pixelate(x, severity, gen=None):
    c = PARAMS["pixelate"][severity - 1]
    h = x.shape[-1]
    small = int(h * c)
    x255 = torch.round(x.clamp(0, 1) * 255)
    return (_pil_resize_u8(_pil_resize_u8(x255, small), h) / 255).to(x.dtype)


_POOL: ThreadPoolExecutor | None = None


def _jpeg_one(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_compression(x, severity, gen=None):
    """PIL JPEG round trip at the reference quality, on the CPU, one image per task in a thread pool."""
    global _POOL
    q = PARAMS["jpeg_compression"][severity - 1]
    u8 = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    out = np.stack(list(_POOL.map(lambda a: _jpeg_one(a, q), u8)))
    return (torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255)


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


def _chamfer_weights() -> torch.Tensor:
    """OpenCV DIST_L2 with a 5 x 5 mask: steps 1 (axis), 1.4 (diagonal), 2.1969 (knight); inf elsewhere."""
    w = torch.full((5, 5), float("inf"))
    for i in range(5):
        for j in range(5):
            di, dj = abs(i - 2), abs(j - 2)
            if (di, dj) == (0, 0):
                w[i, j] = 0
            elif di + dj == 1:
                w[i, j] = 1.0
            elif (di, dj) == (1, 1):
                w[i, j] = 1.4
            elif {di, dj} == {1, 2}:
                w[i, j] = 2.1969
    return w.flatten()


def _distance_to_zero(mask_zero: torch.Tensor, cap: float) -> torch.Tensor:
    """Chamfer distance (B, 1, H, W) to the nearest True pixel, exact up to `cap` (min-plus relaxation)."""
    b, _, h, w = mask_zero.shape
    big = 1e6
    d = torch.where(mask_zero, 0.0, big).float()
    wts = _chamfer_weights().to(d.device)[None, :, None]
    for _ in range(int(cap) + 1):
        p = F.pad(d, (2, 2, 2, 2), value=big)
        nd = (F.unfold(p, 5) + wts).amin(dim=1).view(b, 1, h, w)
        if torch.equal(nd, d):
            break
        d = nd
    return d


def _equalize_hist(u8: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image on (B, 1, H, W) values 0..255."""
    b = u8.shape[0]
    v = u8.long().flatten(1)
    hist = torch.zeros(b, 256, dtype=torch.float64, device=u8.device).scatter_add_(
        1, v, torch.ones_like(v, dtype=torch.float64))
    total = v.shape[1]
    first = (hist > 0).double().argmax(1)  # first non-empty bin
    h0 = hist.gather(1, first[:, None])
    cdf = hist.cumsum(1) - h0  # sum of bins after the first up to i
    denom = (total - h0).clamp(min=1)
    lut = torch.round(cdf * (255.0 / denom)).clamp(0, 255)
    bins = torch.arange(256, device=u8.device)[None]
    lut = torch.where(bins <= first[:, None], torch.zeros_like(lut), lut)
    lut = torch.where(h0 == total, first[:, None].double().expand(-1, 256), lut)
    return lut.gather(1, v).view_as(u8).to(u8.dtype)


def spatter(x, severity, gen=None):
    loc, scale, sigma, thresh, inten, mode = PARAMS["spatter"][severity - 1]
    b, c, h, w = x.shape
    liquid = loc + scale * _randn((b, 1, h, w), gen, x.device)
    liquid = _gaussian(liquid, sigma, "nearest")
    liquid = torch.where(liquid < thresh, torch.zeros_like(liquid), liquid)
    if mode == 0:  # water
        lq = torch.floor(liquid * 255).clamp(0, 255)
        edges = _canny(lq, 50, 150)
        dist = _distance_to_zero(edges, 20).clamp(max=20)
        dist = torch.floor(_box3(dist) + 1e-9).clamp(0, 255)
        dist = _equalize_hist(dist)
        ker = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = torch.round(_conv2d_same(dist.float(), ker, "reflect101")).clamp(0, 255)
        dist = torch.round(_box3(dist)).clamp(0, 255)
        m = lq * dist
        peak = m.amax(dim=(2, 3), keepdim=True)
        m = torch.where(peak > 0, m / peak.clamp(min=1e-12), torch.zeros_like(m)) * inten
        color = torch.tensor([175, 238, 238], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
        return (x + (m * color).to(x.dtype)).clamp(0, 1)
    m = (liquid > thresh).to(x.dtype)  # mud
    m = _gaussian(m, inten, "nearest")
    m = torch.where(m < 0.8, torch.zeros_like(m), m).to(x.dtype)
    color = torch.tensor([63, 42, 20], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255
    return (x * (1 - m) + color * m).clamp(0, 1)


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


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Corrupt float images (B, 3, H, W) in [0, 1] with CIFAR-10-C `name` at `severity` (1..5).

    Runs on x's device. Random corruptions draw from `generator` (the global RNG when None); a CPU generator
    gives identical images on every device. Returns a new float tensor in [0, 1], same shape and dtype.
    """
    _check(name, severity)
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise UsageError(f"corrupt expects float images of shape (B, 3, H, W), got {shape}")
    if not x.is_floating_point():
        raise UsageError(f"corrupt expects float images in [0, 1], got dtype {x.dtype} (divide uint8 by 255)")
    if x.shape[0] == 0:
        return x.clone()
    with torch.no_grad():
        return _FUNCS[name](x, int(severity), generator).to(x.dtype)


def _chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    h = hashlib.sha256(f"epcli-corruptions:{seed}:{name}:{severity}:{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def corrupt_range(x_uint8: torch.Tensor, name: str, severity: int, seed: int, start: int, stop: int,
                  device="cpu") -> torch.Tensor:
    """Corrupted float images for examples [start, stop) of a uint8 set, on `device`.

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
        xb = x_uint8[s:e].to(device).float().div_(255)
        g = torch.Generator().manual_seed(_chunk_seed(seed, name, severity, s // CHUNK))
        parts.append(corrupt(xb, name, severity, g))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out[start - c0:stop - c0]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The reference's export, np.uint8(value * 255): truncation. A 1e-3 gray-level guard keeps values that are
    exact integers in the reference's float64 (e.g. 8-bit round trips) from dropping a level in float32."""
    return torch.floor(x.float() * 255 + 1e-3).clamp(0, 255).to(torch.uint8)


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


def evaluate_official(model, directory, names: Iterable[str] | None = None, *,
                      severities: Iterable[int] = (1, 2, 3, 4, 5), batch_size: int = 500, device="cpu",
                      clean: tuple[torch.Tensor, torch.Tensor] | None = None,
                      on_batch: Callable[[dict], None] | None = None) -> dict:
    """Like `evaluate`, on the published (or exported) .npy files. names=None: every corruption file present.

    clean: optional (x_uint8, y) of the clean test set; without it "clean_correct" is an empty tensor.
    """
    d = Path(directory)
    if names is None:
        names = [n for n in CORRUPTIONS if (d / f"{n}.npy").is_file()]
        if not names:
            raise DatasetError(f"no CIFAR-10-C files (<name>.npy) in {d}")
    names, severities = _check_names(names), _check_severities(severities)
    t0 = time.perf_counter()
    clean_ok = torch.zeros(0, dtype=torch.bool)
    if clean is not None:
        cx, cy = clean
        clean_ok = torch.cat([_predict(model, cx[s:s + batch_size].to(device).float() / 255).cpu()
                              == cy[s:s + batch_size].long() for s in range(0, len(cy), batch_size)])
    correct = {}
    for name in names:
        x, y = load_official(d, name)
        n = x.shape[0] // 5
        for sev in severities:
            ok = torch.zeros(n, dtype=torch.bool)
            base = (sev - 1) * n
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                xb = x[base + s:base + e].to(device).float().div_(255)
                ok[s:e] = _predict(model, xb).cpu() == y[base + s:base + e]
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
            correct[(name, sev)] = ok
    return {"clean_correct": clean_ok, "correct": correct, "seconds": time.perf_counter() - t0}


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export(directory, x_uint8: torch.Tensor, y: torch.Tensor, names: Iterable[str] = CORRUPTIONS, seed: int = 0,
           *, batch_size: int = 500, device="cpu", on_batch: Callable[[dict], None] | None = None) -> list[Path]:
    """Write a generated set in the CIFAR-10-C layout: <name>.npy uint8 (5N, H, W, 3) and labels.npy (5N,).

    Images are exactly those `evaluate` sees for the same seed. Each file is written to a temporary name in
    the directory and renamed into place. Returns the written paths.
    """
    names = _check_names(names)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise UsageError(f"export expects uint8 images (N, 3, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n = x_uint8.shape[0]
    y = torch.as_tensor(y).long()
    written = []
    for name in names:
        out = np.empty((5 * n,) + tuple(x_uint8.shape[2:]) + (3,), dtype=np.uint8)
        for sev in range(1, 6):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                xb = to_uint8(corrupt_range(x_uint8, name, sev, seed, s, e, device))
                out[(sev - 1) * n + s:(sev - 1) * n + e] = xb.permute(0, 2, 3, 1).cpu().numpy()
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
        _atomic_save(d / f"{name}.npy", out)
        written.append(d / f"{name}.npy")
    lab_dtype = np.uint8 if (int(y.max()) if y.numel() else 0) < 256 else np.int64  # CIFAR-10/100: uint8
    _atomic_save(d / "labels.npy", np.tile(y.numpy(), 5).astype(lab_dtype))
    written.append(d / "labels.npy")
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
                row.append(to_uint8(corrupt_range(x_uint8_few, name, sev, seed, i, i + 1))[0])
            tiles.append(row)
    cols = 1 + len(severities)
    grid = torch.full((3, len(tiles) * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for r, row in enumerate(tiles):
        for col, t in enumerate(row):
            y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
            grid[:, y0:y0 + h, x0:x0 + w] = t
    return grid
