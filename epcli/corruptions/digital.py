"""Digital: brightness and saturate (skimage's HSV), contrast, elastic transform (OpenCV's affine warp, then
scipy's map_coordinates on smoothed random fields), pixelate (Pillow's BOX resize) and JPEG compression (a PIL
round trip in a thread pool), each in the precision the reference computed it.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from epcli.corruptions._ops import F32, F64, _fold, _gaussian, _out, _rand
from epcli.corruptions.params import PARAMS


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
_POOL_LOCK = threading.Lock()  # two threads corrupting at once must not each start a pool


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
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    out = np.stack(list(_POOL.map(lambda a: _jpeg_one(a, q), u8)))
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(u.device, F64)
