"""ART's AutoAttack ensemble (epcli/attacks/art_autoattack.py) against IBM ART 1.20.1 itself, image by image.

ART draws from numpy's global stream (and Python's `random` in Square): np.random.seed(s) before ART and a
RandomState(s) here give both the same draws, so the adversarial images must agree up to float rounding. ART runs
the torch model through PyTorchClassifier with clip_values (0, 1), as in the paper. Models: the small CNN trained
for a few seconds (conftest) on all ten classes, on 32 real CIFAR-10 test images of every class, and an EP-CNN
with truncated gradients (values and gradients from different forward passes); CPU, one thread, small budgets.

Measured on 2026-11-30 (these images, float32): APGD-CE/DLR, L-inf and L2, bit-identical images; DeepFool within
2.7e-7 (bit-identical with ART's whole-batch recomputation, see the module); the ensemble bit-identical with the
same robust mask after every member; the same predictions everywhere. The L2 norms add up in numpy's order and
take a correctly rounded square root: with torch's own sum and sqrt, 20 L2 steps drifted to 0.07 and flipped a
prediction.
"""

from __future__ import annotations

import importlib
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import SmallCNN, train_briefly

from epcli.attacks import ATTACKS, evaluate
from epcli.errors import UsageError

aa = importlib.import_module("epcli.attacks.art_autoattack")  # the module: the package attribute is the function

pytest.importorskip("art")
from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, DeepFool
from art.estimators.classification import PyTorchClassifier

ART_LOSS = {"ce": "cross_entropy", "dlr": "difference_logits_ratio"}
ART_NORM = {"linf": np.inf, "l2": 2}
# measured: 0 (APGD, both norms) and 2.7e-7 (DeepFool, which differentiates only the images still active: the
# conv's arithmetic depends on the batch size); headroom for another CPU
TOL = {"linf": 1e-6, "l2": 1e-6}


@pytest.fixture(scope="module")
def data(mini):
    torch.manual_seed(0)
    # all ten classes (the first 2,000 training images hold four) and test images of every class (sorted by class)
    model = train_briefly(SmallCNN(), mini, steps=200, n=5000)
    x = mini.test_x[torch.arange(32) * 31].float() / 255
    with torch.no_grad():
        pred = model(x).argmax(1)
    return model, x, pred


def classifier(model):
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10,
                             clip_values=(0, 1), device_type="cpu")


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def art_apgd(model, x, y, *, loss, norm, eps, eps_step, max_iter, restarts, batch_size, seed):
    atk = AutoProjectedGradientDescent(classifier(model), norm=ART_NORM[norm], eps=eps, eps_step=eps_step,
                                       max_iter=max_iter, targeted=False, nb_random_init=restarts,
                                       batch_size=batch_size, loss_type=ART_LOSS[loss], verbose=False)
    np.random.seed(seed)
    return torch.from_numpy(atk.generate(x.numpy(), y=np.eye(10)[y.numpy()]))


def assert_same(model, got, ref, x, y, norm, *, some_broken=True):
    torch.testing.assert_close(got, ref, atol=TOL[norm], rtol=0)
    assert torch.equal(predict(model, got), predict(model, ref))  # every image, the same verdict
    broken = predict(model, got) != y
    if some_broken:  # not vacuous: some images break, not all
        assert 0 < int(broken.sum()) < len(y), int(broken.sum())
    return broken


# norm, eps, eps_step (ART's default 0.1 above eps, and below it), restarts, batch_size (12: three batches)
APGD_CASES = [("linf", 4 / 255, 0.1, 2, 12), ("linf", 3 / 255, 0.005, 1, 32),
              ("l2", 0.1, 0.2, 1, 32), ("l2", 0.5, 0.1, 2, 12)]


@pytest.mark.parametrize("norm,eps,eps_step,restarts,batch_size", APGD_CASES)
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_equals_art_image_by_image(data, loss, norm, eps, eps_step, restarts, batch_size):
    model, x, y = data
    kw = dict(loss=loss, norm=norm, eps=eps, eps_step=eps_step, max_iter=20, restarts=restarts,
              batch_size=batch_size)
    ref = art_apgd(model, x, y, seed=3, **kw)
    got = aa.art_apgd_run(model, x, y, rng=np.random.RandomState(3), **kw)
    broken = assert_same(model, got, ref, x, y, norm)
    # inside the ball and the box; the images left robust come back at their random start (ART's quirk)
    d = (got - x).flatten(1)
    dist = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(dist.max()) <= eps * (1 + 1e-5) and 0 <= float(got.min()) and float(got.max()) <= 1
    assert bool((dist[~broken] > 0).all())


def test_apgd_another_seed_other_starts_and_not_fra31s_apgd(data):
    model, x, y = data
    kw = dict(loss="ce", norm="linf", eps=4 / 255, eps_step=0.1, max_iter=10, restarts=1, batch_size=32)
    a = aa.art_apgd_run(model, x, y, rng=np.random.RandomState(3), **kw)
    b = aa.art_apgd_run(model, x, y, rng=np.random.RandomState(4), **kw)
    assert not torch.equal(a, b)
    # the fra31 APGD (a different algorithm: step 2 eps, surface start, best-loss point) is not ART's
    from epcli.attacks import apgd_ce
    other = apgd_ce(model, x, y, eps=4 / 255, steps=10, generator=torch.Generator().manual_seed(3))
    assert (other - a).abs().max() > 1e-3


def test_apgd_checkpoints_are_arts_float_schedule():
    # ART: ceil(p * N) of p = 0, 0.22, 0.41, ... (each step max(previous step - 0.03, 0.06)), summed in floats:
    # 0.22 + 0.19 + 0.16 = 0.5700000000000001 -> 58, not 57; 0.9299999999999999 * 10 -> 10 (never reached)
    assert aa.checkpoints(100) == [0, 22, 41, 58, 70, 80, 87, 93, 99]
    assert aa.checkpoints(10) == [0, 3, 5, 6, 8, 8, 9, 10, 10]


@pytest.mark.parametrize("n", [1, 7, 8, 13, 128, 129, 784, 1000, 3072])
def test_norms_add_up_in_numpys_order(n):
    """Every L2 norm sums its squares as numpy's pairwise np.add.reduce does (ART's norms): equal to the last bit,
    where torch.sum differs (through a 20-step L2 run that difference grew to 0.07 and flipped a prediction)."""
    v = torch.from_numpy(np.random.RandomState(n).randn(4, 2, n).astype(np.float32))
    assert torch.equal(aa._sumsq(v, 2), torch.from_numpy(np.sum(np.square(v.numpy()), axis=-1)))
    b = torch.from_numpy(np.random.RandomState(0).rand(8, 3, 32, 32).astype(np.float32))
    ref = np.sqrt(np.sum(np.square(b.numpy()), axis=(1, 2, 3)))
    assert torch.equal(aa._norms(b, "l2"), torch.from_numpy(ref))
    assert not torch.equal(b.flatten(1).square().sum(1).sqrt(), torch.from_numpy(ref))  # torch's order, its sqrt


def test_apgd_on_an_ep_cnn_with_truncated_gradients(data):
    """Loss values from the full relaxation, gradients through a 3-step unroll: both codes call the model the same
    way (ART's compute_loss on an input without grad, loss_gradient on one with)."""
    from epcli.ep import EPCNN
    torch.manual_seed(1)
    ep = EPCNN.preset("ep-cnn-tiny").eval()
    ep.T, ep.grad_mode = 8, "truncated:3"
    x = data[1][:8]
    y = predict(ep, x)
    kw = dict(loss="dlr", norm="linf", eps=8 / 255, eps_step=0.1, max_iter=4, restarts=1, batch_size=8)
    ref = art_apgd(ep, x, y, seed=0, **kw)
    got = aa.art_apgd_run(ep, x, y, rng=np.random.RandomState(0), **kw)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.equal(predict(ep, got), predict(ep, ref)) and bool((predict(ep, got) != y).any())
    # DeepFool: f from the full relaxation, class gradients through the unroll
    ref = torch.from_numpy(DeepFool(classifier(ep), max_iter=3, epsilon=1e-3, nb_grads=10, batch_size=8,
                                    verbose=False).generate(x.numpy()))
    got = aa.art_deepfool_run(ep, x, max_iter=3, overshoot=1e-3, nb_grads=10, batch_size=8)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert torch.equal(predict(ep, got), predict(ep, ref)) and bool((predict(ep, got) != y).any())


@pytest.mark.parametrize("nb_grads,batch_size", [(10, 32), (10, 5), (3, 12)])
def test_deepfool_equals_art_image_by_image(data, nb_grads, batch_size):
    model, x, y = data
    ref = torch.from_numpy(DeepFool(classifier(model), max_iter=20, epsilon=1e-3, nb_grads=nb_grads,
                                    batch_size=batch_size, verbose=False).generate(x.numpy()))
    got = aa.art_deepfool_run(model, x, max_iter=20, overshoot=1e-3, nb_grads=nb_grads, batch_size=batch_size)
    assert_same(model, got, ref, x, y, "l2", some_broken=False)
    # DeepFool is unbounded: it fools every image, with perturbations from tiny to large
    linf = (got - x).flatten(1).abs().amax(1)
    assert bool((predict(model, got) != y).all()) and float(linf.min()) < 4 / 255 < float(linf.max())


def test_deepfool_class_subset_keeps_arts_indexing(data):
    """With nb_grads below the number of classes ART differentiates only the union of every image's top classes
    and reads f at the predicted class's POSITION in that subset: a proper subset here, so that quirk is live."""
    model, x, y = data
    pick = (y >= 5).nonzero().squeeze(1)[:3]  # predicted classes away from 0, 1, 2: positions differ from classes
    x, y = x[pick], y[pick]
    with torch.no_grad():
        top = model(x).argsort(1, descending=True)[:, :2]
    labels = torch.unique(top)
    assert len(labels) < 10 and not torch.equal(torch.searchsorted(labels, y), y)
    ref = torch.from_numpy(DeepFool(classifier(model), max_iter=10, epsilon=1e-3, nb_grads=2, batch_size=3,
                                    verbose=False).generate(x.numpy()))
    got = aa.art_deepfool_run(model, x, max_iter=10, overshoot=1e-3, nb_grads=2, batch_size=3)
    assert_same(model, got, ref, x, y, "l2", some_broken=False)


# the ensemble ------------------------------------------------------------------------------------------------

def art_members(model, norm, eps, eps_step, batch_size, with_square):
    """ART's default AutoAttack list with small budgets."""
    from art.attacks.evasion import SquareAttack
    clf = classifier(model)
    out = [AutoProjectedGradientDescent(clf, norm=ART_NORM[norm], eps=eps, eps_step=eps_step, max_iter=5,
                                        targeted=False, nb_random_init=2, batch_size=batch_size,
                                        loss_type=ART_LOSS[loss], verbose=False) for loss in ("ce", "dlr")]
    out.append(DeepFool(clf, max_iter=10, epsilon=1e-3, nb_grads=10, batch_size=batch_size, verbose=False))
    if with_square:
        out.append(SquareAttack(clf, norm=ART_NORM[norm], max_iter=40, eps=eps, p_init=0.8, nb_restarts=2,
                                verbose=False))
    return clf, out


def run_both(model, x, y, norm, eps, seed, members):
    """ART's AutoAttack(attacks=...) with y=None and epcli's with the same budgets; returns (ref, ART's robust
    masks after each member, got, epcli's masks)."""
    clf, attacks = art_members(model, norm, eps, 0.1, 16, "square" in members)
    s = aa.ensemble_seed(torch.Generator().manual_seed(seed))
    np.random.seed(s)
    random.seed(s)
    art = AutoAttack(clf, norm=ART_NORM[norm], eps=eps, eps_step=0.1, attacks=attacks, batch_size=16)
    ref = torch.from_numpy(art.generate(x.numpy()))
    best = torch.from_numpy(np.asarray(art.best_attacks))  # -1: robust; k: broken by member k
    ref_masks = [(best == -1) | (best > k) for k in range(len(members))]
    masks = []
    got = aa.art_autoattack(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(seed),
                            batch_size=16, apgd_iter=5, restarts=2, deepfool_iter=10, square_iter=40,
                            square_restarts=2, on_member=lambda name, m: masks.append((name, m)))
    return ref, ref_masks, got, masks


class Rounded(nn.Module):
    """The model behind 8-bit rounding of its input: every input gradient is 0, so APGD breaks images only with
    its random starts and DeepFool not at all, and the images left are Square's to break."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 255) / 255)


@pytest.mark.parametrize("masked,norm,eps", [(False, "linf", 4 / 255), (False, "l2", 0.3), (True, "linf", 4 / 255),
                                             (True, "l2", 1.0)])
def test_ensemble_equals_art(data, masked, norm, eps):
    model, x, _ = data
    model = Rounded(model).eval() if masked else model
    y = predict(model, x)
    ref, ref_masks, got, masks = run_both(model, x, y, norm, eps, 1, aa.MEMBERS)
    assert [n for n, _ in masks] == list(aa.MEMBERS)
    for (name, m), r in zip(masks, ref_masks):
        assert torch.equal(m, r), name
    torch.testing.assert_close(got, ref, atol=TOL[norm], rtol=0)
    assert torch.equal(predict(model, got), predict(model, ref))
    # not vacuous: here APGD-CE (trained model) or Square (rounded input) breaks images, and some stay robust
    counts = [len(y)] + [int(m.sum()) for _, m in masks]
    assert (counts[4] < counts[3]) if masked else (counts[1] < counts[0]), counts
    assert counts[-1] > 0, counts


# registry, validation -------------------------------------------------------------------------------------

def test_registered_and_evaluated_with_predicted_labels(data):
    model, x, y = data
    assert aa.art_autoattack is ATTACKS["art-autoattack"]
    p = {"apgd_iter": 3, "restarts": 1, "deepfool_iter": 3, "square_iter": 10, "square_restarts": 1}
    kw = dict(attack="art-autoattack", norm="linf", eps_list=[4 / 255], labels="predicted", params=p, keep_adv=12,
              seed=2)
    r = evaluate(model, x[:12], y[:12], **kw)
    assert r["params"]["eps_step"] == 0.1 and r["params"]["batch_size"] == 200
    xa = r["x_adv"][4 / 255]
    assert float((xa - x[:12]).abs().max()) <= 4 / 255 / (1 - 1e-4) and r["robust_accuracy"][4 / 255] < 1
    # seeded: the same seed, the same images
    assert torch.equal(evaluate(model, x[:12], y[:12], **kw)["x_adv"][4 / 255], xa)
    # forward_budget bounds the passes per attacked image (progress and ETA), and is reached when nothing breaks
    from epcli.attacks.evaluate import forward_budget
    budget = forward_budget("art-autoattack", r["params"])
    assert 0 < r["attack_forward_passes"] <= 12 * budget
    r = evaluate(Rounded(model).eval(), x[:12], y[:12], **dict(kw, eps_list=[1e-4]))
    assert r["robust_accuracy"][1e-4] == 1 and 0.95 * 12 * budget <= r["attack_forward_passes"] <= 12 * budget


@pytest.mark.parametrize("kw,match", [
    (dict(targeted=True), "untargeted"),
    (dict(eps_step=0), "eps_step"),
    (dict(restarts=0), "restarts"),
    (dict(batch_size=0), "batch_size"),
    (dict(p_init=1.0), "p_init"),
    (dict(norm="l1"), "norm"),
])
def test_bad_parameters_are_one_line_usage_errors(data, kw, match):
    model, x, y = data
    with pytest.raises(UsageError, match=match):
        aa.art_autoattack(model, x[:2], y[:2], **{"eps": 0.03, **kw})
    with pytest.raises(UsageError, match="RandomState"):
        aa.art_apgd_run(model, x[:2], y[:2], eps=0.03, rng=np.random.default_rng(0))
    with pytest.raises(UsageError, match="loss"):
        aa.art_apgd_run(model, x[:2], y[:2], eps=0.03, loss="margin", rng=np.random.RandomState(0))
