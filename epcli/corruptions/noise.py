"""Noise: gaussian, shot (Poisson), impulse (salt-and-pepper) and speckle (multiplicative) noise, in float64 as
the reference's numpy and skimage computed them, drawing from the caller's generator.
"""

from __future__ import annotations

import torch

from epcli.corruptions._ops import _gdev, _out, _rand, _randn
from epcli.corruptions.params import PARAMS


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
