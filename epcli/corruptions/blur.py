"""Blurs: gaussian (scipy), glass (blur, pixel swaps, blur), defocus (OpenCV disk kernel), motion (ImageMagick,
random angle) and zoom (the average of clipped zooms), each in the precision the reference computed it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from epcli.corruptions._ops import (F64, _gaussian, _magick_motion_blur, _out, _pad_index, _rand, _randint,
                                    _zoom_matrix)
from epcli.corruptions.params import PARAMS


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


def motion_blur(u, severity, gen=None):
    radius, sigma = PARAMS["motion_blur"][severity - 1]
    angle = -45 + 90 * _rand((u.shape[0],), gen, u.device).double()  # numpy uniform(-45, 45)
    return _magick_motion_blur(u, radius, sigma, angle)


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
