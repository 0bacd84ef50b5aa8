"""Low-level operations shared by the corruption families, each restating what the reference's library computed
(numpy's draws, scipy's Gaussian filter, OpenCV's borders and filter2D, ImageMagick's motion blur, the clipped zoom
of make_cifar_c.py) in the same precision and operation order, so that the corruptions built on them give the
reference's 8-bit images bit for bit. Helpers that serve a single corruption live in that corruption's module.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


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
# Every corruption function (noise.py, blur.py, weather.py, digital.py) takes `u`, the images as float64 8-bit
# levels (B, 3, H, W) (what the reference's np.array(pil_image) holds), and returns the reference's value *before*
# its final np.uint8(...) on the 0..255 scale, as float64, computed with the reference's own precision and operation
# order: float64 where numpy worked in float64, float32 where it worked in float32 (snow, spatter, elastic, zoom),
# integers where a library returned 8-bit images (motion blur, pixelate, JPEG). `_truncate` (core.py) then does
# what np.uint8 did.

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


def _fold(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    if mode == "symmetric":
        m = i % (2 * n)
        return torch.where(m >= n, 2 * n - 1 - m, m)
    p = max(2 * n - 2, 1)  # reflect101
    m = i % p
    return torch.where(m >= n, p - m, m)


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


# ----------------------------------------------------------------------------------------------- motion blur, zoom
# (motion_blur and snow both use ImageMagick's motion blur; zoom_blur and snow both use the clipped zoom)

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
