"""An independent statement of how CIFAR-10-C was made (hendrycks/robustness, make_cifar_c.py), per image, in
numpy / scipy / OpenCV / PIL, with the random draws injected so that epcli's own draws can be replayed through it.

Used by tests/test_corruptions.py (a few images) and bench/corruption_fidelity.py (1,000 images). Written from the
reference's definitions and the libraries' documented behaviour; nothing here calls epcli.corruptions except the
draw replay (`replay_draws`), which re-draws epcli's random numbers from an identically seeded generator in the
order epcli draws them.

Library notes (the reference ran in 2018-2019 with numpy 1.x, scipy 1.x, skimage 0.14, OpenCV 3.4, Wand +
ImageMagick 6 Q16):
- skimage.filters.gaussian is scipy.ndimage.gaussian_filter (mode 'nearest' unless given, truncate 4) on float64;
  skimage 0.14's img_as_float turned float32 input into float64, so the mud mask is blurred in float64.
- skimage.color.rgb2hsv / hsv2rgb are restated below (their float64 formulas have not changed since 0.14).
- ImageMagick is not installed here: MotionBlurImage is restated from ImageMagick 6's source (magick/effect.c,
  magick/quantum.h): Q16 quanta (8-bit value * 257), double accumulation, ClampToQuantum (round half up) and
  ScaleQuantumToChar for the 8-bit PNG the reference read back.
- OpenCV must be <= 4.10 for warpAffine's fixed-point coordinates (4.11 changed them); its float32 RGB2GRAY uses
  FMA on AVX2 machines, OpenCV 3.4 did not, so the grey of snow is restated as 3.4 computed it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

FROST_DIR = Path(__file__).resolve().parents[1] / "epcli" / "assets" / "frost"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def _nd():
    import scipy.ndimage as nd
    return nd


def _cv2():
    import cv2
    return cv2


def skimage_gaussian(img, sigma, mode="nearest", truncate=4.0, multichannel=False):
    s = (sigma, sigma, 0) if multichannel else sigma
    return _nd().gaussian_filter(np.asarray(img, dtype=np.float64), sigma=s, mode=mode, truncate=truncate)


def rgb2hsv(arr):
    out = np.empty_like(arr)
    v = arr.max(-1)
    delta = arr.max(-1) - arr.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = delta / v
        s[delta == 0.0] = 0.0
        for ch, off, a, b in ((0, 0.0, 1, 2), (1, 2.0, 2, 0), (2, 4.0, 0, 1)):  # later channels win ties
            idx = arr[..., ch] == v
            out[idx, 0] = off + (arr[idx, a] - arr[idx, b]) / delta[idx]
    h = (out[..., 0] / 6.0) % 1.0
    h[delta == 0.0] = 0.0
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


def hsv2rgb(arr):
    hi = np.floor(arr[..., 0] * 6)
    f = arr[..., 0] * 6 - hi
    v = arr[..., 2]
    p = v * (1 - arr[..., 1])
    q = v * (1 - f * arr[..., 1])
    t = v * (1 - (1 - f) * arr[..., 1])
    hi = np.dstack([hi, hi, hi]).astype(np.uint8) % 6
    return np.choose(hi, [np.dstack((v, t, p)), np.dstack((q, v, p)), np.dstack((p, v, t)),
                          np.dstack((p, q, v)), np.dstack((t, p, v)), np.dstack((v, p, q))])


def magick_motion_blur(img_u8, radius, sigma, angle):
    """ImageMagick 6 Q16 MotionBlurImage of an 8-bit image (H, W) or (H, W, C), written back as 8-bit."""
    a = np.asarray(img_u8).astype(np.float64) * 257.0
    if a.ndim == 2:
        a = a[..., None]
    width = int(2 * math.ceil(radius) + 1)
    two_s2 = 2.0 * sigma * sigma
    kern = np.array([math.exp(-(float(i) * i) / two_s2) / (2.50662827463100024161235523934010416269302368164062
                                                            * sigma) for i in range(width)])
    norm = 0.0
    for k in kern:
        norm += k
    kern = kern / norm
    ang = math.pi * angle / 180.0
    px, py = width * math.sin(ang), width * math.cos(ang)
    hyp = math.hypot(px, py)
    h, w = a.shape[:2]
    acc = np.zeros_like(a)
    for i in range(width):
        dx = math.ceil((i * py) / hyp - 0.5)
        dy = math.ceil((i * px) / hyp - 0.5)
        rows = np.clip(np.arange(h) + dy, 0, h - 1)
        cols = np.clip(np.arange(w) + dx, 0, w - 1)
        acc = acc + kern[i] * a[rows][:, cols]
    q = np.where(acc <= 0, 0, np.where(acc >= 65535, 65535, np.floor(acc + 0.5))).astype(np.int64)
    out = (((q + 128) - ((q + 128) >> 8)) >> 8).astype(np.uint8)
    return out[..., 0] if np.asarray(img_u8).ndim == 2 else out


def clipped_zoom(img, z):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = _nd().zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t:t + h, t:t + h]


def plasma_fractal(uniforms, mapsize=32, wibbledecay=3):
    """Diamond-square map; `uniforms` are the U(0, 1) arrays drawn in order (squares, diamonds, diamonds, ...)."""
    draws = iter(uniforms)
    m = np.empty((mapsize, mapsize), dtype=np.float64)
    m[0, 0] = 0
    step = mapsize
    wibble = 100.0

    def wibbled(arr):
        u = next(draws)
        assert u.shape == arr.shape
        return arr / 4 + wibble * (-wibble + (wibble - -wibble) * u)  # numpy uniform(-wibble, wibble)

    while step >= 2:
        half = step // 2
        corners = m[0:mapsize:step, 0:mapsize:step]
        acc = corners + np.roll(corners, shift=-1, axis=0)
        acc += np.roll(acc, shift=-1, axis=1)
        m[half:mapsize:step, half:mapsize:step] = wibbled(acc)
        dr = m[half:mapsize:step, half:mapsize:step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        m[0:mapsize:step, half:mapsize:step] = wibbled((dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1)))
        m[half:mapsize:step, 0:mapsize:step] = wibbled((dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0)))
        step //= 2
        wibble /= wibbledecay
    m -= m.min()
    return m / m.max()


def frost_photo(idx):
    cv2 = _cv2()
    f = cv2.imread(str(FROST_DIR / FROST_FILES[idx]))
    return cv2.resize(f, (0, 0), fx=0.2, fy=0.2)


# ------------------------------------------------------------------------------------------ the 19 definitions
# Each takes an (H, W, 3) uint8 image, a severity and the draws for that image; returns what the reference's
# function returned (float or uint8 values on the 0..255 scale), before np.uint8.

def gaussian_noise(img, s, d):
    c = [0.04, 0.06, .08, .09, .10][s - 1]
    x = np.array(img) / 255.
    return np.clip(x + (0.0 + c * d["z"]), 0, 1) * 255


def shot_noise(img, s, d):
    c = [500, 250, 100, 75, 50][s - 1]
    return np.clip(d["counts"] / c, 0, 1) * 255


def impulse_noise(img, s, d):
    x = np.array(img) / 255.
    out = x.copy()
    out[d["flip"] & d["salt"]] = 1
    out[d["flip"] & ~d["salt"]] = 0
    return np.clip(out, 0, 1) * 255


def speckle_noise(img, s, d):
    c = [.06, .1, .12, .16, .2][s - 1]
    x = np.array(img) / 255.
    return np.clip(x + x * (0.0 + c * d["z"]), 0, 1) * 255


def gaussian_blur(img, s, d):
    c = [.4, .6, 0.7, .8, 1][s - 1]
    return np.clip(skimage_gaussian(np.array(img) / 255., c, multichannel=True), 0, 1) * 255


def glass_blur(img, s, d):
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s - 1]
    x = np.uint8(skimage_gaussian(np.array(img) / 255., sigma, multichannel=True) * 255)
    size = x.shape[0]
    for i in range(iters):
        off = d["offsets"][i]  # (2, H, W): dx, dy for every position
        for h in range(size - delta, delta, -1):
            for w in range(size - delta, delta, -1):
                dx, dy = int(off[0, h, w]), int(off[1, h, w])
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]
    return np.clip(skimage_gaussian(x / 255., sigma, multichannel=True), 0, 1) * 255


def _disk(radius, alias_blur):
    lin = np.arange(-8, 8 + 1)
    xx, yy = np.meshgrid(lin, lin)
    k = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    k /= np.sum(k)
    return _cv2().GaussianBlur(k, ksize=(3, 3), sigmaX=alias_blur)


def defocus_blur(img, s, d):
    c = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][s - 1]
    x = np.array(img) / 255.
    k = _disk(*c)
    out = np.array([_cv2().filter2D(x[:, :, ch], -1, k) for ch in range(3)]).transpose((1, 2, 0))
    return np.clip(out, 0, 1) * 255


def motion_blur(img, s, d):
    c = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][s - 1]
    return magick_motion_blur(np.array(img), c[0], c[1], d["angle"])


def zoom_blur(img, s, d):
    zs = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][s - 1], 0.01)
    x = (np.array(img) / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for z in zs:
        out += clipped_zoom(x, z)
    return np.clip((x + out) / (len(zs) + 1), 0, 1) * 255


def snow(img, s, d):
    c = [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)][s - 1]
    from PIL import Image

    x = np.array(img, dtype=np.float32) / 255.
    layer = c[0] + c[1] * d["z"]  # numpy normal(loc, scale), (H, W)
    layer = clipped_zoom(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer = Image.fromarray((np.clip(layer.squeeze(), 0, 1) * 255).astype(np.uint8), mode="L")
    buf = io.BytesIO()
    layer.save(buf, format="PNG")  # the PNG the reference handed to ImageMagick: lossless
    layer = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    layer = magick_motion_blur(layer, c[4], c[5], d["angle"]) / 255.
    layer = layer[..., None]
    w = np.float32([0.299, 0.587, 0.114])
    gray = (x[..., 0] * w[0] + x[..., 1] * w[1]) + x[..., 2] * w[2]  # OpenCV 3.4 float32 RGB2GRAY
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray.reshape(x.shape[0], x.shape[1], 1) * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


def frost(img, s, d):
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][s - 1]
    f = frost_photo(d["idx"])
    x0 = int(d["u"][1] * (f.shape[0] - 32))  # epcli's draws: U * (size - 32), truncated
    y0 = int(d["u"][2] * (f.shape[1] - 32))
    f = f[x0:x0 + 32, y0:y0 + 32][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(img) + c[1] * f, 0, 255)


def fog(img, s, d):
    c = [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)][s - 1]
    x = np.array(img) / 255.
    peak = x.max()
    x += c[0] * plasma_fractal(d["uniforms"], 32, c[1])[:32, :32][..., None]
    return np.clip(x * peak / (peak + c[0]), 0, 1) * 255


def brightness(img, s, d):
    c = [.05, .1, .15, .2, .3][s - 1]
    x = rgb2hsv(np.array(img) / 255.)
    x[:, :, 2] = np.clip(x[:, :, 2] + c, 0, 1)
    return np.clip(hsv2rgb(x), 0, 1) * 255


def contrast(img, s, d):
    c = [.75, .5, .4, .3, 0.15][s - 1]
    x = np.array(img) / 255.
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def saturate(img, s, d):
    c = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][s - 1]
    x = rgb2hsv(np.array(img) / 255.)
    x[:, :, 1] = np.clip(x[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv2rgb(x), 0, 1) * 255


def jpeg_compression(img, s, d):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.array(img)).save(buf, "JPEG", quality=[80, 65, 58, 50, 40][s - 1])
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def pixelate(img, s, d):
    from PIL import Image

    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    x = Image.fromarray(np.array(img))
    return np.asarray(x.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX))


def elastic_transform(img, s, d):
    cv2 = _cv2()
    size = 32
    c = [(size * 0, size * 0, size * 0.08), (size * 0.05, size * 0.2, size * 0.07),
         (size * 0.08, size * 0.06, size * 0.06), (size * 0.1, size * 0.04, size * 0.05),
         (size * 0.1, size * 0.03, size * 0.03)][s - 1]
    image = np.array(img, dtype=np.float32) / 255.
    shape = image.shape
    centre = np.float32(shape[:2]) // 2
    sq = min(shape[:2]) // 3
    pts1 = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    pts2 = pts1 + (-c[2] + (c[2] - -c[2]) * d["u_affine"]).astype(np.float32)  # uniform(-c, c)
    m = cv2.getAffineTransform(pts1, pts2)
    image = cv2.warpAffine(image, m, shape[:2][::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (skimage_gaussian(-1 + 2 * d["u_dx"], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (skimage_gaussian(-1 + 2 * d["u_dy"], c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dx, dy = dx[..., None], dy[..., None]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    idx = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(_nd().map_coordinates(image, idx, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def spatter(img, s, d):
    cv2 = _cv2()
    c = [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
         (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][s - 1]
    x = np.array(img, dtype=np.float32) / 255.
    liquid = c[0] + c[1] * d["z"]  # numpy normal(loc, scale)
    liquid = skimage_gaussian(liquid, c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        with np.errstate(invalid="ignore"):
            liquid = (liquid * 255).astype(np.uint8)  # wraps above 255 on x86
        dist = 255 - cv2.Canny(liquid, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
        dist = cv2.equalizeHist(dist)
        ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = cv2.filter2D(dist, cv2.CV_8U, ker)
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor(liquid * dist, cv2.COLOR_GRAY2BGRA)
        with np.errstate(invalid="ignore", divide="ignore"):
            m /= np.max(m, axis=(0, 1))
        m *= c[4]
        color = np.concatenate((175 / 255. * np.ones_like(m[..., :1]), 238 / 255. * np.ones_like(m[..., :1]),
                                238 / 255. * np.ones_like(m[..., :1])), axis=2)
        color = cv2.cvtColor(color, cv2.COLOR_BGR2BGRA)
        x = cv2.cvtColor(x, cv2.COLOR_BGR2BGRA)
        out = cv2.cvtColor(np.clip(x + m * color, 0, 1), cv2.COLOR_BGRA2BGR) * 255
        return np.nan_to_num(out, nan=0.0)  # np.uint8(nan) is 0 on x86; said explicitly to avoid the warning
    m = np.where(liquid > c[3], 1, 0)
    m = skimage_gaussian(m.astype(np.float32).astype(np.float64), c[4])  # skimage 0.14: float64
    m[m < 0.8] = 0
    color = np.concatenate((63 / 255. * np.ones_like(x[..., :1]), 42 / 255. * np.ones_like(x[..., :1]),
                            20 / 255. * np.ones_like(x[..., :1])), axis=2)
    color *= m[..., None]
    x *= (1 - m[..., None])
    return np.clip(x + color, 0, 1) * 255


DEFINITIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression, speckle_noise, gaussian_blur, spatter,
    saturate)}


def reference_uint8(name, img_hwc_u8, severity, draws):
    """The reference's saved image: np.uint8 of what its function returned."""
    img = np.ascontiguousarray(img_hwc_u8)  # what np.array(pil_image) gives; numpy's reductions follow the layout
    with np.errstate(invalid="ignore"):
        return np.uint8(DEFINITIONS[name](img, severity, draws))


# ------------------------------------------------------------------------------------------ replaying epcli's draws

def replay_draws(name, severity, x_uint8, gen):
    """Per-image draws (list of dicts) for a batch x_uint8 (B, 3, H, W) torch uint8, re-drawn from `gen` in the
    order and shapes epcli draws them for the whole batch."""
    import torch

    b, _, h, w = x_uint8.shape

    def hwc(t):
        return t.permute(1, 2, 0).double().numpy()

    if name in ("gaussian_noise", "speckle_noise"):
        z = torch.randn(x_uint8.shape, generator=gen)
        return [{"z": hwc(z[i])} for i in range(b)]
    if name == "shot_noise":
        c = [500, 250, 100, 75, 50][severity - 1]
        counts = torch.poisson(x_uint8.double() / 255 * c, generator=gen)
        return [{"counts": hwc(counts[i])} for i in range(b)]
    if name == "impulse_noise":
        c = [.01, .02, .03, .05, .07][severity - 1]
        u = torch.rand((2,) + tuple(x_uint8.shape), generator=gen)
        return [{"flip": hwc(u[0, i]) < c, "salt": hwc(u[1, i]) < 0.5} for i in range(b)]
    if name == "glass_blur":
        iters = [1, 1, 1, 2, 2][severity - 1]
        offs = [torch.randint(-1, 1, (b, 2, h, w), generator=gen) for _ in range(iters)]
        return [{"offsets": [o[i].numpy() for o in offs]} for i in range(b)]
    if name == "motion_blur":
        u = torch.rand((b,), generator=gen).double()
        return [{"angle": float(-45 + 90 * u[i])} for i in range(b)]
    if name == "snow":
        z = torch.randn((b, 1, h, w), generator=gen).double()
        u = torch.rand((b,), generator=gen).double()
        return [{"z": z[i, 0].numpy(), "angle": float(-135 + 90 * u[i])} for i in range(b)]
    if name == "frost":
        u = torch.rand((b, 3), generator=gen).double()
        return [{"u": u[i].numpy(), "idx": min(int(u[i, 0] * 5), 4)} for i in range(b)]
    if name == "fog":
        draws, step = [], 32
        while step >= 2:
            k = 32 // step
            draws += [torch.rand((b, k, k), generator=gen).double() for _ in range(3)]
            step //= 2
        return [{"uniforms": [t[i].numpy() for t in draws]} for i in range(b)]
    if name == "elastic_transform":
        ua = torch.rand((b, 3, 2), generator=gen).double()
        uf = torch.rand((b, 2, h, w), generator=gen).double()
        return [{"u_affine": ua[i].numpy(), "u_dx": uf[i, 0].numpy(), "u_dy": uf[i, 1].numpy()} for i in range(b)]
    if name == "spatter":
        z = torch.randn((b, 1, h, w), generator=gen).double()
        return [{"z": z[i, 0].numpy()} for i in range(b)]
    return [{} for _ in range(b)]


def reference_batch(name, severity, x_uint8, gen):
    """uint8 (B, 3, H, W) numpy: the reference applied image by image with epcli's replayed draws."""
    draws = replay_draws(name, severity, x_uint8, gen)
    imgs = np.ascontiguousarray(x_uint8.permute(0, 2, 3, 1).numpy())
    return np.stack([reference_uint8(name, imgs[i], severity, draws[i]) for i in range(len(imgs))]).transpose(
        0, 3, 1, 2)
