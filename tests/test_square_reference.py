"""Square against the official implementation, image by image: same seed, same adversarial images.

The official code is fra31/auto-attack's autoattack/square.py, installed from PyPI as `pyautoattack` (0.2.0;
its square.py is the repository's file at a392200, whitespace and one relative import aside). epcli's
square(generator=torch.Generator().manual_seed(s)) must give what SquareAttack(seed=s).perturb gives (it seeds
torch's global CPU generator and draws everything from it). torchattacks.Square is a port of the same file; it
agrees too where it does not depart from it (L2: it sums the window norms over the channels, so it is checked
on one-channel images only; targeted: it keeps the margin loss where the official switches to cross-entropy).

CPU, a small CNN trained for a few seconds on the embedded CIFAR-10 images, 32 images, <= 150 queries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from epcli.attacks import square

SquareAttack = pytest.importorskip("pyautoattack.square").SquareAttack
torchattacks = pytest.importorskip("torchattacks")

EPS = {"linf": 16 / 255, "l2": 2.5}
OFFICIAL_NORM = {"linf": "Linf", "l2": "L2"}


def cnn(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 10))


def trained(channels: int, d) -> nn.Module:
    torch.manual_seed(0)
    model = cnn(channels)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = d.train_x[:2000].float() / 255, d.train_y[:2000]
    if channels == 1:
        xt = xt.mean(1, keepdim=True)
    for _ in range(100):
        j = torch.randint(0, len(yt), (64,))
        opt.zero_grad()
        F.cross_entropy(model(xt[j]), yt[j]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from epcli.data import load_dataset
    d = load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))
    return trained(3, d), d.test_x[:32].float() / 255, d.test_y[:32], d


def official(model, x, y, *, norm, eps, seed, n_queries, targeted=False, restarts=1, rescale=True):
    return SquareAttack(model, norm=OFFICIAL_NORM[norm], eps=eps, n_queries=n_queries, seed=seed,
                        targeted=targeted, n_restarts=restarts, resc_schedule=rescale).perturb(x, y)


def ours(model, x, y, *, norm, eps, seed, n_queries, targeted=False, restarts=1, rescale=True):
    return square(model, x, y, eps=eps, norm=norm, targeted=targeted, n_queries=n_queries, restarts=restarts,
                  rescale_schedule=rescale, generator=torch.Generator().manual_seed(seed))


def fooled(model, xa, y, targeted):
    with torch.no_grad():
        pred = model(xa).argmax(1)
    return pred == y if targeted else pred != y


@pytest.mark.parametrize("norm,targeted,restarts,rescale,seed", [
    ("linf", False, 1, True, 0),
    ("linf", True, 2, False, 1),
    ("l2", False, 2, True, 2),
    ("l2", True, 1, False, 3),
])
def test_same_images_as_the_official_square(data, norm, targeted, restarts, rescale, seed):
    model, x, y, _ = data
    y = (y + 3) % 10 if targeted else y  # targeted: y holds the targets, in both
    kw = dict(norm=norm, eps=EPS[norm], seed=seed, n_queries=150, targeted=targeted, restarts=restarts,
              rescale=rescale)
    ref = official(model, x, y, **kw)
    got = ours(model, x, y, **kw)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.equal(fooled(model, got, y, targeted), fooled(model, ref, y, targeted))
    # not vacuous: the search after the initialisation breaks images, and some stay robust
    attacked = ~fooled(model, x, y, targeted)
    broken = fooled(model, got, y, targeted) & attacked
    init_only = fooled(model, ours(model, x, y, **dict(kw, n_queries=1)), y, targeted) & attacked
    assert int(broken.sum()) >= int(init_only.sum()) + 2, (int(broken.sum()), int(init_only.sum()))
    assert int((attacked & ~broken).sum()) >= 2
    # robust images come back unchanged, broken ones inside the ball and the box
    assert torch.equal(got[~broken], x[~broken])
    dist = (got - x).flatten(1)
    dist = dist.abs().amax(1) if norm == "linf" else dist.norm(dim=1)
    assert float(dist.max()) <= EPS[norm] * (1 + 1e-6) and 0 <= float(got.min()) and float(got.max()) <= 1


def test_another_seed_gives_other_images(data):
    model, x, y, _ = data
    kw = dict(norm="linf", eps=EPS["linf"], n_queries=50)
    assert not torch.equal(ours(model, x, y, seed=0, **kw), ours(model, x, y, seed=1, **kw))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_images_as_torchattacks(data, norm):
    model, x, y, d = data
    if norm == "l2":  # one channel: torchattacks' window norm (over all channels) is then the official one
        model, x = trained(1, d), x.mean(1, keepdim=True)
    eps, seed = EPS[norm], 5
    ref = torchattacks.Square(model, norm=OFFICIAL_NORM[norm], eps=eps, n_queries=150, seed=seed)(x, y)
    got = ours(model, x, y, norm=norm, eps=eps, seed=seed, n_queries=150)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert int((fooled(model, got, y, False) & fooled(model, x, y, False).logical_not()).sum()) >= 3


def test_same_images_as_the_official_on_an_ep_cnn():
    from epcli.ep import EPCNN
    torch.manual_seed(1)
    ep = EPCNN.preset("ep-cnn-tiny")
    ep.T = 8
    ep.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        y = ep(x).argmax(1)  # every image is attacked
    kw = dict(norm="linf", eps=8 / 255, seed=0, n_queries=30)
    got = ours(ep, x, y, **kw)
    torch.testing.assert_close(got, official(ep, x, y, **kw), atol=1e-6, rtol=0)
    assert bool(fooled(ep, got, y, False).any())
