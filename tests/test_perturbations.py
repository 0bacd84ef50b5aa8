"""The perturbation spectrum (epcli/report/perturbations.py) against an independent computation: the 2-D DFT as
two matrix products and rings counted pixel by pixel, on patterns whose answer is known."""
import numpy as np
import pytest

from epcli.report import low_frequency_share, radial_spectrum


def _reference(delta: np.ndarray) -> np.ndarray:
    """Mean over images and channels of the normalised power, summed per ring, by explicit DFT matrices."""
    n, c, h, w = delta.shape
    Wh = np.exp(-2j * np.pi * np.outer(np.arange(h), np.arange(h)) / h)
    Ww = np.exp(-2j * np.pi * np.outer(np.arange(w), np.arange(w)) / w)
    rings = {}
    for y in range(h):
        for x in range(w):
            fy, fx = (y if y < h / 2 else y - h), (x if x < w / 2 else x - w)
            rings[(y, x)] = int(round((fy * fy + fx * fx) ** 0.5))
    out = np.zeros(max(rings.values()) + 1)
    k = 0
    for img in delta.reshape(n * c, h, w):
        p = np.abs(Wh @ img @ Ww.T) ** 2
        if p.sum() == 0:
            continue
        p /= p.sum()
        k += 1
        for (y, x), r in rings.items():
            out[r] += p[y, x]
    return out / k


def test_a_cosine_puts_its_energy_on_its_ring():
    yy, xx = np.mgrid[0:32, 0:32]
    for ky, kx, ring in ((3, 0, 3), (3, 4, 5), (0, 12, 12)):
        delta = np.cos(2 * np.pi * (ky * yy + kx * xx) / 32)[None, None]
        r, f = radial_spectrum(delta)
        assert f[ring] == pytest.approx(1.0) and f.sum() == pytest.approx(1.0)
        assert low_frequency_share(r, f) == pytest.approx(1.0 if ring <= 4 else 0.0, abs=1e-12)


def test_random_perturbations_match_the_explicit_dft():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(3, 3, 16, 16)), axis=2), axis=3)  # low-frequency heavy
    for delta in (rng.normal(size=(4, 3, 16, 16)), smooth, rng.choice([-1.0, 1.0], size=(2, 1, 16, 12))):
        r, f = radial_spectrum(delta)
        assert f == pytest.approx(_reference(delta), abs=1e-12) and r.tolist() == list(range(len(f)))
    r, f = radial_spectrum(smooth)
    r2, f2 = radial_spectrum(rng.normal(size=(3, 3, 16, 16)))
    assert low_frequency_share(r, f) > 0.8 > 0.3 > low_frequency_share(r2, f2)


def test_untouched_images_are_left_out():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(3, 3, 8, 8))
    with_zero = np.concatenate([delta, np.zeros((2, 3, 8, 8))])
    assert radial_spectrum(with_zero)[1] == pytest.approx(radial_spectrum(delta)[1])
    r, f = radial_spectrum(np.zeros((2, 3, 8, 8)))
    assert len(r) == len(f) == 0 and low_frequency_share(r, f) is None
