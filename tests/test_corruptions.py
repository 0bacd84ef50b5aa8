"""CIFAR-10-C corruptions: each checked against a direct computation of the reference definition on real images.

The direct computations use numpy, scipy.ndimage (when installed), colorsys and PIL, with the same random draws
(re-drawn from an identically seeded generator in the order the implementation draws them).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from epcli import corruptions as C
from epcli.errors import DatasetError, UsageError

TOL = 1e-5  # float32 vs float64 arithmetic


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    from epcli.data import load_dataset

    d = load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))
    return d.test_x[::10][:32].clone(), d.test_y[::10][:32].clone()  # uint8 (32, 3, 32, 32), mixed classes


@pytest.fixture(scope="module")
def x(imgs):
    return imgs[0][:16].float() / 255


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ndimage():
    return pytest.importorskip("scipy.ndimage")


# ------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_gaussian_and_speckle_noise(x, sev):
    c = (0.04, 0.06, 0.08, 0.09, 0.10)[sev - 1]
    z = torch.randn(x.shape, generator=gen())
    assert torch.allclose(C.corrupt(x, "gaussian_noise", sev, gen()), (x + c * z).clamp(0, 1), atol=TOL)
    c = (0.06, 0.10, 0.12, 0.16, 0.20)[sev - 1]
    assert torch.allclose(C.corrupt(x, "speckle_noise", sev, gen()), (x + x * c * z).clamp(0, 1), atol=TOL)
    # the noise std is the parameter: residual where unclipped
    y = C.corrupt(x, "gaussian_noise", sev, gen(1))
    inside = (y > 0) & (y < 1)
    assert abs(float((y - x)[inside].std()) - (0.04, 0.06, 0.08, 0.09, 0.10)[sev - 1]) < 0.01


@pytest.mark.parametrize("sev", [1, 5])
def test_shot_noise(x, sev):
    c = (500, 250, 100, 75, 50)[sev - 1]
    ref = (torch.poisson(x * c, generator=gen()) / c).clamp(0, 1)
    y = C.corrupt(x, "shot_noise", sev, gen())
    assert torch.allclose(y, ref, atol=TOL)
    # Poisson: variance of the count equals its mean (x * c)
    var = float(((y - x) * c).pow(2)[(y < 1)].mean())
    assert 0.8 < var / float((x * c)[(y < 1)].mean()) < 1.2


@pytest.mark.parametrize("sev", [1, 5])
def test_impulse_noise_rate(x, sev):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[sev - 1]
    y = C.corrupt(x, "impulse_noise", sev, gen(3))
    flipped = (y != x)
    n = x.numel()
    # flipped values become exactly 0 or 1, per channel value, about half each
    assert bool(((y[flipped] == 0) | (y[flipped] == 1)).all())
    already = float(((x == 0) | (x == 1)).float().mean())
    rate = float(flipped.float().mean())
    assert abs(rate - amount * (1 - already)) < 5 * math.sqrt(amount / n) + amount * already
    salt = float((y[flipped] == 1).float().mean())
    assert 0.4 < salt < 0.6
    # not whole pixels: channels flip independently
    per_pixel = flipped.sum(1)
    assert bool((per_pixel == 1).any())


# ------------------------------------------------------------------------------------------ blurs


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_gaussian_blur_matches_scipy_nearest(x, sev):
    nd = ndimage()
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[sev - 1]
    ref = nd.gaussian_filter(x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    assert np.allclose(C.corrupt(x, "gaussian_blur", sev).numpy(), np.clip(ref, 0, 1), atol=TOL)


def _glass_reference(img_hwc_u8, sigma, offsets, iters, nd):
    """The reference loop, literally: numpy view 'swap' over h, w = 31..2, then blur."""
    a = img_hwc_u8.copy()
    for it in range(iters):
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                dx, dy = int(offsets[it][0, h, w]), int(offsets[it][1, h, w])
                hp, wp = h + dy, w + dx
                a[h, w], a[hp, wp] = a[hp, wp], a[h, w]
    return np.clip(nd.gaussian_filter(a / 255.0, sigma=(sigma, sigma, 0), mode="nearest"), 0, 1)


@pytest.mark.parametrize("sev", [3, 4])
def test_glass_blur_matches_reference_loop(x, sev):
    nd = ndimage()
    sigma, delta, iters = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][sev - 1]
    xs = x[:4]
    g = gen(5)
    draws = [torch.randint(-delta, delta, (4, 2, 32, 32), generator=g) for _ in range(iters)]
    y = C.corrupt(xs, "glass_blur", sev, gen(5))
    for i in range(4):
        hwc = xs[i].permute(1, 2, 0).double().numpy()
        first = np.uint8(nd.gaussian_filter(hwc, sigma=(sigma, sigma, 0), mode="nearest") * 255)
        ref = _glass_reference(first, sigma, [d[i].numpy() for d in draws], iters, nd)
        assert np.allclose(y[i].permute(1, 2, 0).numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("sev", [1, 4, 5])
def test_defocus_blur_disk_kernel(x, sev):
    nd = ndimage()
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][sev - 1]
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(float)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias ** 2))
    g /= g.sum()
    kernel = nd.correlate(disk, np.outer(g, g), mode="mirror")  # cv2.GaussianBlur, BORDER_REFLECT_101
    ref = np.stack([nd.correlate(x[i, c].double().numpy(), kernel, mode="mirror")
                    for i in range(len(x)) for c in range(3)]).reshape(x.shape)
    assert np.allclose(C.corrupt(x, "defocus_blur", sev).numpy(), np.clip(ref, 0, 1), atol=TOL)


def _im_motion_blur(a, radius, sigma, angle):
    """ImageMagick MotionBlurImage on an (H, W, C) 0..255 array: one-sided Gaussian line, edge pixels."""
    width = int(2 * math.ceil(radius) + 1)
    k = np.array([math.exp(-(i * i) / (2 * sigma * sigma)) for i in range(width)])
    k /= k.sum()
    h, w = a.shape[:2]
    out = np.zeros(a.shape)
    rad = math.radians(angle)
    for i in range(width):
        ox = math.ceil(i * math.cos(rad) - 0.5)
        oy = math.ceil(i * math.sin(rad) - 0.5)
        rows = np.clip(np.arange(h) + oy, 0, h - 1)
        cols = np.clip(np.arange(w) + ox, 0, w - 1)
        out += k[i] * a[rows][:, cols]
    return np.round(out)


@pytest.mark.parametrize("sev", [1, 5])
def test_motion_blur_imagemagick_kernel(x, sev):
    radius, sigma = [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)][sev - 1]
    angles = torch.rand(len(x), generator=gen(7)) * 90 - 45
    y = C.corrupt(x, "motion_blur", sev, gen(7))
    for i in range(len(x)):
        ref = _im_motion_blur(np.round(x[i].permute(1, 2, 0).double().numpy() * 255), radius, sigma,
                              float(angles[i]))
        diff = np.abs(y[i].permute(1, 2, 0).numpy() * 255 - ref)
        assert diff.max() <= 1.0001 and diff.mean() < 0.01  # only 8-bit rounding ties may differ
    # the kernel is one-sided: the weights fall from the pixel itself outwards
    k, _, _ = C._motion_taps(radius, sigma, torch.zeros(1))
    assert k[0] == k.max() and np.all(np.diff(k) <= 0) and abs(k.sum() - 1) < 1e-12


def _clipped_zoom(img, z, nd):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    out = nd.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (out.shape[0] - h) // 2
    return out[t:t + h, t:t + h]


@pytest.mark.parametrize("sev", [1, 5])
def test_zoom_blur_matches_scipy_zoom(x, sev):
    nd = ndimage()
    zs = np.arange(1, (1.06, 1.11, 1.16, 1.21, 1.26)[sev - 1], 0.01)
    assert len(zs) == (7, 12, 16, 21, 26)[sev - 1]  # float arange: 1.06 and 1.11 are included
    y = C.corrupt(x[:6], "zoom_blur", sev)
    for i in range(6):
        a = x[i].permute(1, 2, 0).numpy().astype(np.float32)
        acc = np.zeros_like(a)
        for z in zs:
            acc += _clipped_zoom(a, z, nd)
        ref = np.clip((a + acc) / (len(zs) + 1), 0, 1)
        assert np.allclose(y[i].permute(1, 2, 0).numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------ weather


@pytest.mark.parametrize("sev", [2, 4])
def test_snow_definition(x, sev):
    nd = ndimage()
    loc, scale, zoom, thr, rad, sig, keep = C.PARAMS["snow"][sev - 1]
    g = gen(11)
    layer = (loc + scale * torch.randn((len(x), 1, 32, 32), generator=g)).numpy()
    angles = torch.rand(len(x), generator=g) * 90 - 135
    y = C.corrupt(x, "snow", sev, gen(11))
    for i in range(len(x)):
        s = _clipped_zoom(layer[i, 0][..., None].astype(np.float64), zoom, nd)
        s[s < thr] = 0
        s = np.floor(np.clip(s, 0, 1) * 255)
        s = _im_motion_blur(s, rad, sig, float(angles[i]))[..., 0] / 255.0
        im = x[i].permute(1, 2, 0).double().numpy()
        gray = (0.299 * im[..., 0] + 0.587 * im[..., 1] + 0.114 * im[..., 2])[..., None]
        im = keep * im + (1 - keep) * np.maximum(im, gray * 1.5 + 0.5)
        ref = np.clip(im + s[..., None] + np.rot90(s, 2)[..., None], 0, 1)
        diff = np.abs(y[i].permute(1, 2, 0).numpy() - ref)
        assert diff.mean() < 1e-3 and diff.max() <= 2.01 / 255


@pytest.mark.parametrize("sev", [1, 5])
def test_frost_uses_photographs_resized_by_0_2(x, sev):
    from PIL import Image

    keep, weight = C.PARAMS["frost"][sev - 1]
    u = torch.rand((len(x), 3), generator=gen(13)).double()
    y = C.corrupt(x, "frost", sev, gen(13))
    files = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"]
    for i in range(len(x)):
        idx = int(u[i, 0] * 5)
        a = np.asarray(Image.open(C.FROST_DIR / files[idx]).convert("RGB")).astype(np.float64)
        hh, ww = round(a.shape[0] * 0.2), round(a.shape[1] * 0.2)
        # OpenCV INTER_LINEAR without antialiasing: source coordinate (d + 0.5) / 0.2 - 0.5
        sr, sc = (np.arange(hh) + 0.5) / 0.2 - 0.5, (np.arange(ww) + 0.5) / 0.2 - 0.5
        r0, c0 = np.floor(sr).astype(int), np.floor(sc).astype(int)
        fr, fc = (sr - r0)[:, None, None], (sc - c0)[None, :, None]
        r1, c1 = np.minimum(r0 + 1, a.shape[0] - 1), np.minimum(c0 + 1, a.shape[1] - 1)
        small = ((1 - fr) * ((1 - fc) * a[r0][:, c0] + fc * a[r0][:, c1])
                 + fr * ((1 - fc) * a[r1][:, c0] + fc * a[r1][:, c1]))
        xs, ys = int(u[i, 1] * (hh - 32)), int(u[i, 2] * (ww - 32))
        crop = small[xs:xs + 32, ys:ys + 32]
        ref = np.clip(keep * x[i].permute(1, 2, 0).double().numpy() * 255 + weight * crop, 0, 255) / 255
        assert np.allclose(y[i].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    assert float((y - x).abs().mean()) > 0.05


@pytest.mark.parametrize("sev", [1, 5])
def test_fog_formula_and_plasma(x, sev):
    weight, decay = C.PARAMS["fog"][sev - 1]
    plasma = C._plasma(len(x), 32, decay, gen(17), "cpu")
    assert float(plasma.amin()) == 0.0 and float(plasma.amax()) == 1.0
    y = C.corrupt(x, "fog", sev, gen(17))
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    ref = ((x + weight * plasma[:, None].float()) * peak / (peak + weight)).clamp(0, 1)
    assert torch.allclose(y, ref, atol=TOL)
    # a smaller wibble decay keeps more fine detail: rougher maps
    rough = [float(C._plasma(64, 32, d, gen(1), "cpu").diff(dim=2).abs().mean()) for d in (3, 1.75)]
    assert rough[1] > rough[0]


# ------------------------------------------------------------------------------------------ digital


def _hsv_map(x, fn):
    out = torch.empty_like(x, dtype=torch.float64)
    a = x.double().numpy()
    for i in range(a.shape[0]):
        for r in range(a.shape[2]):
            for c in range(a.shape[3]):
                h, s, v = colorsys.rgb_to_hsv(*a[i, :, r, c])
                out[i, :, r, c] = torch.tensor(colorsys.hsv_to_rgb(*fn(h, s, v)))
    return out.clamp(0, 1)


@pytest.mark.parametrize("sev", [1, 5])
def test_brightness_and_saturate_hsv(x, sev):
    b = C.PARAMS["brightness"][sev - 1]
    ref = _hsv_map(x[:3], lambda h, s, v: (h, s, min(max(v + b, 0), 1)))
    assert torch.allclose(C.corrupt(x[:3], "brightness", sev).double(), ref, atol=TOL)
    a, o = C.PARAMS["saturate"][sev - 1]
    ref = _hsv_map(x[:3], lambda h, s, v: (h, min(max(s * a + o, 0), 1), v))
    assert torch.allclose(C.corrupt(x[:3], "saturate", sev).double(), ref, atol=TOL)


@pytest.mark.parametrize("sev", [1, 5])
def test_contrast_about_channel_mean(x, sev):
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[sev - 1]
    m = x.double().mean(dim=(2, 3), keepdim=True)
    ref = ((x.double() - m) * c + m).clamp(0, 1)
    assert torch.allclose(C.corrupt(x, "contrast", sev).double(), ref, atol=TOL)


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_pixelate_equals_pil_box(imgs, sev):
    from PIL import Image

    c = (0.95, 0.9, 0.85, 0.75, 0.65)[sev - 1]
    xu8 = imgs[0][:12]
    y = C.to_uint8(C.corrupt(xu8.float() / 255, "pixelate", sev))
    for i in range(len(xu8)):
        im = Image.fromarray(xu8[i].permute(1, 2, 0).numpy())
        ref = np.asarray(im.resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX))
        assert np.array_equal(y[i].permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize("sev", [1, 5])
def test_jpeg_equals_pil_round_trip(imgs, sev):
    import io

    from PIL import Image

    q = (80, 65, 58, 50, 40)[sev - 1]
    xu8 = imgs[0][:12]
    y = C.to_uint8(C.corrupt(xu8.float() / 255, "jpeg_compression", sev))
    for i in range(len(xu8)):
        buf = io.BytesIO()
        Image.fromarray(xu8[i].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=q)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(y[i].permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize("sev", [2, 5])
def test_elastic_matches_scipy(x, sev):
    nd = ndimage()
    alpha, sigma, jitter = C.PARAMS["elastic_transform"][sev - 1]
    xs = x[:4]
    g = gen(19)
    jit = (jitter * (2 * torch.rand((4, 3, 2), generator=g).double() - 1)).float().double().numpy()
    fields = (2 * torch.rand((4, 2, 32, 32), generator=g).double() - 1).numpy()
    y = C.corrupt(xs, "elastic_transform", sev, gen(19))
    pts1 = np.array([[26, 26], [26, 6], [6, 6]], dtype=np.float64)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    for i in range(4):
        pts2 = pts1 + jit[i]
        m = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # (2, 3): (x, y) -> (x', y')
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        sx = np.round((inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]) * 32) / 32
        sy = np.round((inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]) * 32) / 32
        img = xs[i].double().numpy()
        warped = np.stack([nd.map_coordinates(img[c], [sy, sx], order=1, mode="mirror") for c in range(3)])
        dx = nd.gaussian_filter(fields[i, 0], sigma, mode="reflect", truncate=3) * alpha
        dy = nd.gaussian_filter(fields[i, 1], sigma, mode="reflect", truncate=3) * alpha
        ref = np.stack([nd.map_coordinates(warped[c], [yy + dy, xx + dx], order=1, mode="reflect")
                        for c in range(3)])
        diff = np.abs(y[i].numpy() - np.clip(ref, 0, 1))
        # identical inside; scipy's own out-of-range handling may differ on border pixels
        assert np.median(diff) < 1e-5 and diff.mean() < 2e-3


@pytest.mark.parametrize("sev", [4, 5])
def test_spatter_mud_definition(x, sev):
    nd = ndimage()
    loc, scale, sigma, thr, msig, mode = C.PARAMS["spatter"][sev - 1]
    assert mode == 1
    liquid = (loc + scale * torch.randn((len(x), 1, 32, 32), generator=gen(23))).double().numpy()
    y = C.corrupt(x, "spatter", sev, gen(23))
    color = np.array([63, 42, 20])[:, None, None] / 255
    for i in range(len(x)):
        lq = nd.gaussian_filter(liquid[i, 0], sigma, mode="nearest")
        lq[lq < thr] = 0
        m = nd.gaussian_filter((lq > thr).astype(np.float64), msig, mode="nearest")
        m[m < 0.8] = 0
        ref = np.clip(x[i].double().numpy() * (1 - m) + color * m, 0, 1)
        assert np.allclose(y[i].numpy(), ref, atol=1e-5)


def test_spatter_water_adds_pale_turquoise(x):
    y = C.corrupt(x, "spatter", 3, gen(29))
    add = (y - x).double()
    unclipped = (y < 1).all(dim=1, keepdim=True).expand_as(y)
    assert float(add.min()) >= -1e-6
    r, g, b = add[:, 0][unclipped[:, 0]], add[:, 1][unclipped[:, 0]], add[:, 2][unclipped[:, 0]]
    big = g > 0.02
    assert bool(big.any())
    assert torch.allclose(r[big] / g[big], torch.full_like(r[big], 175 / 238), atol=1e-3)
    assert torch.allclose(b[big], g[big], atol=1e-5)


def test_canny_and_distance_helpers():
    img = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    img[..., 4:12, 4:12] = 200  # a square: edges on its outline only
    e = C._canny(img, 50, 150)[0, 0]
    assert bool(e[3:13, 3:13].any()) and not bool(e[:2].any()) and not bool(e[7:9, 7:9].any())
    z = torch.zeros(1, 1, 9, 9, dtype=torch.bool)
    z[0, 0, 4, 4] = True
    d = C._distance_to_zero(z, 20)[0, 0]
    assert float(d[4, 6]) == 2 and abs(float(d[5, 5]) - 1.4) < 1e-6 and abs(float(d[5, 6]) - 2.1969) < 1e-5


# ------------------------------------------------------------------------------------------ properties


MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur", "defocus_blur",
            "zoom_blur", "motion_blur", "contrast", "brightness", "pixelate", "jpeg_compression", "fog", "snow")


def _mean_change(x, name):
    return [float((C.corrupt(x, name, s, gen(31)) - x).abs().mean()) * 255 for s in range(1, 6)]


@pytest.mark.parametrize("name", MONOTONE)
def test_mean_change_grows_with_severity(x, name):
    ch = _mean_change(x, name)
    # motion blur 3 -> 4 only lengthens a line whose Gaussian weights are already ~0 there (sigma 2)
    slack = 0.05 if name == "motion_blur" else 0.0
    assert all(b >= a - slack for a, b in zip(ch, ch[1:])), ch
    assert ch[0] > 0


def test_saturate_follows_its_parameters(x):
    ch = _mean_change(x, "saturate")
    # s*0.3 and s*0.1 desaturate (0.1 more), s*1.5 changes least, then 2s+0.1 and 2.5s+0.2
    assert ch[1] > ch[0] > ch[2] and ch[2] < ch[3] < ch[4], ch


def test_all_outputs_in_range_and_deterministic(x, device):
    xs = x[:8].to(device)
    for name in C.CORRUPTIONS:
        for sev in (1, 5):
            a = C.corrupt(xs, name, sev, gen(0))
            assert a.shape == xs.shape and a.dtype == xs.dtype
            assert float(a.min()) >= 0 and float(a.max()) <= 1 and bool(torch.isfinite(a).all())
            assert torch.equal(a, C.corrupt(xs, name, sev, gen(0))), name
            if name in C.RANDOM_CORRUPTIONS:
                assert not torch.equal(a, C.corrupt(xs, name, sev, gen(1))), name


def test_names():
    assert len(C.CORRUPTIONS) == 19 and len(set(C.CORRUPTIONS)) == 19
    assert len(C.BENCHMARK_CORRUPTIONS) == 15
    assert set(C.CORRUPTIONS) - set(C.BENCHMARK_CORRUPTIONS) == {"speckle_noise", "gaussian_blur", "spatter",
                                                                  "saturate"}


def test_bad_input_errors(x):
    with pytest.raises(UsageError, match="unknown corruption 'blurry'"):
        C.corrupt(x, "blurry", 1)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(UsageError, match="severity"):
            C.corrupt(x, "fog", bad)
    with pytest.raises(UsageError, match="float"):
        C.corrupt((x * 255).to(torch.uint8), "fog", 1)
    with pytest.raises(UsageError, match="shape"):
        C.corrupt(x[0], "fog", 1)


# ------------------------------------------------------------------------------------------ evaluation, files


class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3 * 32 * 32, 10, generator=g) * 0.05)

    def forward(self, x):
        return (x.flatten(1) - 0.5) @ self.w


NAMES = ("gaussian_noise", "glass_blur", "frost", "jpeg_compression")


def test_evaluate_is_batch_size_independent(imgs):
    xu8, y = imgs[0][:23], imgs[1][:23]
    for name in NAMES:
        whole = C.corrupt_range(xu8, name, 3, 7, 0, 23)
        parts = torch.cat([C.corrupt_range(xu8, name, 3, 7, s, min(s + 5, 23)) for s in range(0, 23, 5)])
        assert torch.equal(whole, parts), name
    model = TinyModel()
    seen = []
    r1 = C.evaluate(model, xu8, y, names=NAMES, severities=(1, 5), seed=7, batch_size=23,
                    on_batch=seen.append)
    r2 = C.evaluate(model, xu8, y, names=NAMES, severities=(1, 5), seed=7, batch_size=4)
    assert set(r1["correct"]) == {(n, s) for n in NAMES for s in (1, 5)}
    assert torch.equal(r1["clean_correct"], r2["clean_correct"])
    for k in r1["correct"]:
        assert r1["correct"][k].dtype == torch.bool and torch.equal(r1["correct"][k], r2["correct"][k]), k
    assert seen[-1] == {"name": NAMES[-1], "severity": 5, "done": 23, "total": 23}


def test_summarize_metrics():
    n = 10
    ones = torch.ones(n, dtype=torch.bool)
    half = torch.arange(n) < 5
    res = {"clean_correct": ones, "seconds": 1.0,
           "correct": {(nm, s): (half if nm == "fog" else ones) for nm in ("fog", "contrast", "saturate")
                       for s in (1, 2)}}
    s = C.summarize(res)
    assert s["cells"]["fog"][1] == 50.0 and s["per_corruption"]["contrast"] == 100.0
    assert s["mean_accuracy_benchmark"] == 75.0 and s["mce_unnormalized"] == 25.0
    assert abs(s["mean_accuracy_all"] - 250 / 3) < 1e-9 and s["extra_corruptions"] == ["saturate"]
    ref = {"clean_correct": ones, "correct": {k: torch.arange(n) < 8 for k in res["correct"]}}
    s2 = C.summarize(res, ref, reference_label="resnet18")
    assert abs(s2["ce_vs_reference"]["fog"] - 100 * 100 / 40) < 1e-9  # (50+50) / (20+20)
    assert s2["ce_vs_reference"]["contrast"] == 0.0
    assert abs(s2["relative_mce_vs_reference"] - (250 + 0) / 2) < 1e-9
    assert "resnet18" in s2["note"] and "AlexNet" in s2["note"]


def test_export_load_round_trip_and_evaluate_official(imgs, tmp_path):
    xu8, y = imgs[0][:12], imgs[1][:12]
    names = ("contrast", "shot_noise")
    paths = C.export(tmp_path, xu8, y, names=names, seed=3, batch_size=5)
    assert {p.name for p in paths} == {"contrast.npy", "shot_noise.npy", "labels.npy"}
    assert not list(tmp_path.glob("*.tmp"))
    raw = np.load(tmp_path / "shot_noise.npy")
    assert raw.shape == (60, 32, 32, 3) and raw.dtype == np.uint8
    assert np.load(tmp_path / "labels.npy").dtype == np.uint8
    xl, yl = C.load_official(tmp_path, "shot_noise")
    assert xl.shape == (60, 3, 32, 32) and torch.equal(yl, y.repeat(5))
    for sev in (1, 4):
        exp = C.to_uint8(C.corrupt_range(xu8, "shot_noise", sev, 3, 0, 12))
        assert torch.equal(xl[(sev - 1) * 12:sev * 12], exp)
    # the reference's truncation: contrast of 8-bit images exported as floor(v * 255)
    xc, _ = C.load_official(tmp_path, "contrast")
    v = C.corrupt(xu8.float() / 255, "contrast", 2).double() * 255
    assert torch.equal(xc[12:24].double(), torch.floor(v + 1e-3))
    model = TinyModel()
    r_off = C.evaluate_official(model, tmp_path, clean=(xu8, y), batch_size=7)
    r_gen = C.evaluate(model, xu8, y, names=("contrast", "shot_noise"), seed=3)
    assert set(r_off["correct"]) == set(r_gen["correct"])
    assert torch.equal(r_off["clean_correct"], r_gen["clean_correct"])
    # the exported images went through uint8, generated ones did not: predictions agree almost everywhere
    agree = np.mean([float((r_off["correct"][k] == r_gen["correct"][k]).float().mean()) for k in r_gen["correct"]])
    assert agree > 0.9


def test_load_official_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        C.load_official(tmp_path / "nope", "fog")
    with pytest.raises(DatasetError, match="fog.npy not found"):
        C.load_official(tmp_path, "fog")
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(10, np.uint8))
    with pytest.raises(DatasetError, match=r"expected uint8 \(5N, H, W, 3\)"):
        C.load_official(tmp_path, "fog")
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(9, np.uint8))
    with pytest.raises(DatasetError, match="labels.npy has shape"):
        C.load_official(tmp_path, "fog")
    with pytest.raises(UsageError, match="unknown corruption"):
        C.load_official(tmp_path, "mist")
    np.save(tmp_path / "labels.npy", np.zeros(10, np.uint8))
    x, y = C.load_official(tmp_path, "fog")
    assert x.shape == (10, 3, 32, 32) and y.dtype == torch.int64


def test_sample_grid(imgs):
    g = C.sample_grid(imgs[0][:2], names=("fog", "pixelate"), severities=(1, 5), seed=0)
    assert g.dtype == torch.uint8 and g.shape == (3, 2 + 4 * 34, 2 + 3 * 34)
    assert torch.equal(g[:, 2:34, 2:34], imgs[0][0])
