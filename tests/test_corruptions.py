"""CIFAR-10-C corruptions: every one replayed through an independent statement of the reference definition
(tests/cifar_c_reference.py: numpy, scipy.ndimage, OpenCV <= 4.10, PIL, and a restatement of ImageMagick 6's Q16
motion blur) with epcli's own random draws, on real images; the 8-bit images must be identical.
"""

from __future__ import annotations

import math
import os
import stat

import numpy as np
import pytest
import torch

from epcli import corruptions as C
from epcli.corruptions import _ops, blur, digital
from epcli.errors import DatasetError, UsageError


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


@pytest.fixture(scope="module")
def ref():
    pytest.importorskip("scipy.ndimage")
    cv2 = pytest.importorskip("cv2")
    if tuple(int(v) for v in cv2.__version__.split(".")[:2]) > (4, 10):
        pytest.skip("OpenCV > 4.10 changed warpAffine's fixed-point positions; the reference used an older one")
    import cifar_c_reference as R
    return R


def mismatch(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return float((d > 0).mean()), int(d.max())


# ------------------------------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_identical_to_reference_given_the_same_draws(imgs, ref, name):
    """All five severities on 8 real images: epcli's uint8 images equal the reference's, value for value."""
    xu8 = imgs[0][:8]
    for sev in range(1, 6):
        ours = C.corrupt_uint8(xu8, name, sev, C.chunk_generator(5, name, sev, 0)).numpy()
        theirs = ref.reference_batch(name, sev, xu8, C.chunk_generator(5, name, sev, 0))
        assert mismatch(ours, theirs) == (0.0, 0), (name, sev, mismatch(ours, theirs))


def test_corrupt_float_api_is_the_uint8_image(imgs):
    xu8 = imgs[0][:6]
    for name in ("fog", "motion_blur", "contrast"):
        a = C.corrupt(xu8.float() / 255, name, 3, gen(2))
        b = C.corrupt_uint8(xu8, name, 3, gen(2))
        assert a.dtype == torch.float32 and torch.equal(C.to_uint8(a), b) and torch.equal(a, b.float() / 255)


def test_motion_blur_is_imagemagick_q16_not_8bit_rounding(imgs, ref):
    """ImageMagick reads 8-bit values as value * 257 (Q16), rounds the blurred quantum, then scales back to 8 bits:
    two roundings. A single rounding of the 8-bit blur, or a truncation, differ on a measurable share of values."""
    xu8 = imgs[0][:8]
    g = C.chunk_generator(0, "motion_blur", 5, 0)
    angles = (-45 + 90 * torch.rand(8, generator=g).double()).tolist()
    ours = C.corrupt_uint8(xu8, "motion_blur", 5, C.chunk_generator(0, "motion_blur", 5, 0)).numpy()
    single, trunc = [], []
    for i in range(8):
        img = xu8[i].permute(1, 2, 0).numpy()
        q16 = ref.magick_motion_blur(img, 9, 2.5, angles[i])
        assert np.array_equal(ours[i].transpose(1, 2, 0), q16)
        # the same blur on the 8-bit scale, in float: rounded once, or truncated
        w = 19
        k = np.exp(-np.arange(w) ** 2 / (2 * 2.5 ** 2))
        k /= k.sum()
        a = math.radians(angles[i])
        acc = np.zeros(img.shape)
        for t in range(w):
            dy, dx = math.ceil(t * math.sin(a) - 0.5), math.ceil(t * math.cos(a) - 0.5)
            acc += k[t] * img[np.clip(np.arange(32) + dy, 0, 31)][:, np.clip(np.arange(32) + dx, 0, 31)]
        single.append(mismatch(np.round(acc), q16)[0])
        trunc.append(mismatch(np.floor(acc), q16)[0])
    assert np.mean(single) < 0.05  # nearly the same as one rounding ...
    assert np.mean(trunc) > 0.3    # ... and far from truncation (about half the values would be one level lower)


def test_spatter_water_wraps_like_numpy_uint8_cast(imgs, ref):
    """Severity 3 (scale 0.3) pushes the blurred liquid above 1 on some images; the reference's astype(uint8) wraps
    those values (x86 cast), it does not clip them."""
    xu8 = imgs[0][:32]
    g = C.chunk_generator(1, "spatter", 3, 0)
    z = torch.randn((32, 1, 32, 32), generator=g).double()
    liquid = _ops._gaussian(0.65 + 0.3 * z, 1, "nearest")
    over = (liquid * 255 >= 256).flatten(1).any(1)
    assert 0 < int(over.sum()) < 32  # some images wrap, some do not
    ours = C.corrupt_uint8(xu8, "spatter", 3, C.chunk_generator(1, "spatter", 3, 0)).numpy()
    theirs = ref.reference_batch("spatter", 3, xu8, C.chunk_generator(1, "spatter", 3, 0))
    assert mismatch(ours, theirs) == (0.0, 0)
    with np.errstate(invalid="ignore"):  # the premise: numpy's float -> uint8 cast wraps (x86)
        np.testing.assert_equal(np.array([255.0, 256.0, 300.9]).astype(np.uint8), [255, 0, 44])


def test_elastic_positions_are_opencv_fixed_point(imgs, ref):
    """cv2.warpAffine (<= 4.10) samples at (round(A x * 1024) + round((B y + C) * 1024) + 16) >> 5 in 1/32 pixel;
    epcli's warp equals it value for value, while rounding positions straight to 1/32 does not."""
    import cv2

    img = imgs[0][0].permute(1, 2, 0).numpy().astype(np.float32) / 255.
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    straight = []
    for _ in range(20):
        pts2 = pts1 + rng.uniform(-2.56, 2.56, (3, 2)).astype(np.float32)
        m = cv2.getAffineTransform(pts1, pts2)
        want = cv2.warpAffine(img, m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        m_t = digital._affine_from_points(torch.from_numpy(pts1.astype(np.float64))[None],
                                          torch.from_numpy(pts2.astype(np.float64))[None])
        got = digital._warp_affine_f32(t, m_t)
        assert np.array_equal(got[0].permute(1, 2, 0).numpy(), want)
        inv = cv2.invertAffineTransform(m)
        sx = np.round((inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]) * 32) / 32
        sy = np.round((inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]) * 32) / 32
        r0, c0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        fy, fx = (sy - r0)[..., None], (sx - c0)[..., None]

        def at(r, c):  # BORDER_REFLECT_101
            r = np.abs(r)
            c = np.abs(c)
            return img[np.where(r > 31, 62 - r, r), np.where(c > 31, 62 - c, c)]

        direct = ((1 - fy) * ((1 - fx) * at(r0, c0) + fx * at(r0, c0 + 1))
                  + fy * ((1 - fx) * at(r0 + 1, c0) + fx * at(r0 + 1, c0 + 1)))
        straight.append(float((np.abs(direct - want) > 1e-6).mean()))
    assert np.mean(straight) > 0.005, np.mean(straight)


def _float32_variant(name, sev, xu8):
    """The same corruption in float32 with the old `floor(v * 255 + 1e-3)` export (what epcli did before)."""
    x = xu8.float() / 255
    if name == "brightness":
        h, s, v = digital._rgb_to_hsv(x)
        y = digital._hsv_to_rgb(h, s, (v + C.PARAMS[name][sev - 1]).clamp(0, 1))
    elif name == "saturate":
        a, b = C.PARAMS[name][sev - 1]
        h, s, v = digital._rgb_to_hsv(x)
        y = digital._hsv_to_rgb(h, (s * a + b).clamp(0, 1), v)
    elif name == "contrast":
        m = x.mean(dim=(2, 3), keepdim=True)
        y = (x - m) * C.PARAMS[name][sev - 1] + m
    else:  # defocus_blur
        k = torch.zeros(5, 5)
        for di, dj, w in blur._disk_taps(*C.PARAMS[name][sev - 1]):
            k[di + 2, dj + 2] = w
        y = _ops._conv2d_same(x, k, "reflect101")
    return torch.floor(y.clamp(0, 1) * 255 + 1e-3).to(torch.uint8).numpy()


@pytest.mark.parametrize("name,sev", [("brightness", 5), ("saturate", 1), ("contrast", 5), ("defocus_blur", 4)])
def test_float64_ties(imgs, ref, name, sev):
    """Values that land on an integer in float64 truncate exactly as numpy's do. float32 arithmetic with a
    rounding guard (epcli before) differs on a measurable share of values; float64 in numpy's order does not."""
    xu8 = imgs[0][:16]
    theirs = ref.reference_batch(name, sev, xu8, None)
    assert mismatch(C.corrupt_uint8(xu8, name, sev).numpy(), theirs) == (0.0, 0)
    rate, worst = mismatch(_float32_variant(name, sev, xu8), theirs)
    assert rate > 0.0005 and worst == 1, (rate, worst)


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


def test_export_then_official_path_gives_identical_outcomes(imgs, tmp_path):
    """generate == export + evaluate_official, example by example: both paths feed the model the same uint8
    images divided by 255."""
    xu8, y = imgs[0][:12], imgs[1][:12]
    names = ("contrast", "shot_noise", "motion_blur", "elastic_transform")
    paths = C.export(tmp_path, xu8, y, names=names, seed=3, batch_size=5)
    assert {p.name for p in paths} == {f"{n}.npy" for n in names} | {"labels.npy", "clean.npy"}
    assert not list(tmp_path.glob("*.tmp"))
    for p in paths:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p  # readable by other users
    raw = np.load(tmp_path / "shot_noise.npy")
    assert raw.shape == (60, 32, 32, 3) and raw.dtype == np.uint8
    assert np.load(tmp_path / "labels.npy").dtype == np.uint8
    xl, yl = C.load_official(tmp_path, "shot_noise")
    assert xl.shape == (60, 3, 32, 32) and torch.equal(yl, y.repeat(5))
    for sev in (1, 4):
        assert torch.equal(xl[(sev - 1) * 12:sev * 12], C.corrupt_range_uint8(xu8, "shot_noise", sev, 3, 0, 12))
    cx, cy = C.load_clean(tmp_path)
    assert torch.equal(cx, xu8) and torch.equal(cy, y)
    model = TinyModel()
    r_off = C.evaluate_official(model, tmp_path, clean=(cx, cy), batch_size=7)
    r_gen = C.evaluate(model, xu8, y, names=names, seed=3, batch_size=5)
    assert set(r_off["correct"]) == set(r_gen["correct"]) == {(n, s) for n in names for s in range(1, 6)}
    assert torch.equal(r_off["clean_correct"], r_gen["clean_correct"])
    for k in r_gen["correct"]:
        assert torch.equal(r_off["correct"][k], r_gen["correct"][k]), k
    # the model sees exactly the exported bytes / 255
    seen = []
    C.evaluate(lambda b: seen.append(b) or torch.zeros(len(b), 10), xu8, y, names=("contrast",), severities=(2,),
               seed=3, batch_size=12)
    assert torch.equal(seen[-1], xl.new_tensor(np.load(tmp_path / "contrast.npy")[12:24]).permute(0, 3, 1, 2)
                       .float() / 255)
    # the first n examples only
    r_n = C.evaluate_official(model, tmp_path, names=["contrast"], clean=(cx, cy), n=5)
    assert len(r_n["clean_correct"]) == 5 and torch.equal(r_n["correct"][("contrast", 3)],
                                                          r_gen["correct"][("contrast", 3)][:5])
    assert C.load_clean(tmp_path / "nope") is None


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


def test_corrupt_range_empty_and_out_of_range():
    """An empty range gives an empty batch (no chunk is drawn); a range outside the set is refused."""
    x = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    for start in (0, 3, 5):
        out = C.corrupt_range_uint8(x, "gaussian_noise", 1, seed=0, start=start, stop=start)
        assert out.shape == (0, 3, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(ValueError):
        C.corrupt_range_uint8(x, "gaussian_noise", 1, seed=0, start=2, stop=6)
    with pytest.raises(ValueError):
        C.corrupt_range_uint8(x, "gaussian_noise", 1, seed=0, start=3, stop=2)
