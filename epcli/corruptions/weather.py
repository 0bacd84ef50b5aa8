"""Weather: snow (a zoomed, motion-blurred noise layer), frost (a crop of one of the bundled frost photographs),
fog (a diamond-square plasma) and spatter (water drops through OpenCV's Canny, distance transform and histogram
equalisation, or mud), each in the precision the reference computed it. The paper counts brightness as weather
too; it lives in digital.py beside saturate, which shares its HSV conversion.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epcli.corruptions._ops import (F32, F64, _box3_sum, _conv2d_same, _f32, _gaussian, _magick_motion_blur, _out,
                                    _rand, _randn, _zoom_matrix)
from epcli.corruptions.params import PARAMS

FROST_DIR = Path(__file__).parent.parent / "assets" / "frost"  # epcli/assets/frost, shipped as package data
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # the reference never picks frost6


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
