"""ART's Square (epcli/attacks/art_square.py) against IBM ART's own `SquareAttack`, image by image.

The reference is ART 1.20.1 from PyPI (its Square is ART 1.14.1's, the paper's). ART draws from the global
np.random and random; epcli's art_square_run from a RandomState and a Random seeded alike. Both attack the same
real CIFAR-10 test images on the same small CNN (conftest's SmallCNN, trained a few seconds), read through a
softmax (ART's BlackBoxClassifierNeuralNetwork, the paper's black-box closure) or as logits (ART's
PyTorchClassifier): the adversarial images must be bit-identical, every prediction the same, and the model
must be queried on as many images as ART queries it. Also on an untrained EP-CNN (16 images). CPU, 32 images
(one run: 200, the paper's batch), <= 60 iterations.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SmallCNN, train_briefly

from epcli.attacks import ATTACKS, BLACK_BOX, evaluate
from epcli.attacks.art_square import _l2, _pairwise_sum, _sqrt, art_square, art_square_run, p_schedule
from epcli.attacks.evaluate import forward_budget
from epcli.errors import UsageError

pytest.importorskip("art")
from art.attacks.evasion import SquareAttack  # noqa: E402
from art.estimators.classification import BlackBoxClassifierNeuralNetwork, PyTorchClassifier  # noqa: E402


@pytest.fixture(scope="module")
def data(mini):
    torch.manual_seed(0)
    model = train_briefly(SmallCNN(), mini)
    x = mini.test_x[:200].float() / 255
    return model, x, mini.test_y[:200], predict(model, x)


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


class Counted(nn.Module):
    """The model, counting the images it is queried on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


def art(model, x, *, norm, eps, scores, restarts, max_iter, seed, y=None, p_init=0.8):
    """ART's SquareAttack.generate(x, y) after np.random.seed(seed), random.seed(seed); returns the images and
    the images ART queried the model on beyond the clean prediction it makes when y is None."""
    counted = Counted(model)
    if scores == "softmax":
        def predict_fn(a):
            with torch.no_grad():
                return F.softmax(counted(torch.from_numpy(a)), dim=1).numpy()
        est = BlackBoxClassifierNeuralNetwork(predict_fn, (3, 32, 32), 10, clip_values=(0, 1))
    else:
        est = PyTorchClassifier(counted, nn.CrossEntropyLoss(), (3, 32, 32), 10, clip_values=(0, 1),
                                device_type="cpu")
    atk = SquareAttack(est, norm=np.inf if norm == "linf" else 2, max_iter=max_iter, eps=eps, p_init=p_init,
                       nb_restarts=restarts, verbose=False)
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # ART's L2 step divides 0 by 0 (see below)
            out = atk.generate(x.numpy(), y=None if y is None else y.numpy())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return torch.from_numpy(out), counted.rows - (len(x) if y is None else 0)


@pytest.mark.parametrize("norm,eps,scores,restarts,max_iter,seed,n", [
    ("linf", 8 / 255, "softmax", 1, 40, 0, 32),
    ("linf", 16 / 255, "logits", 2, 30, 1, 32),
    ("linf", 16 / 255, "softmax", 2, 60, 4, 32),
    ("linf", 8 / 255, "softmax", 1, 10, 5, 200),  # the paper's batch of 200: ART queries in chunks of 128
    ("l2", 1.0, "softmax", 2, 40, 2, 32),
    ("l2", 2.5, "logits", 1, 30, 3, 32),
    ("l2", 0.5, "logits", 2, 20, 6, 32),
])
def test_same_images_as_art(data, norm, eps, scores, restarts, max_iter, seed, n):
    model, x, _, pred = data
    x, pred = x[:n], pred[:n]
    ref, art_queries = art(model, x, norm=norm, eps=eps, scores=scores, restarts=restarts, max_iter=max_iter,
                           seed=seed)
    counted = Counted(model)
    ours = art_square_run(counted, x, pred, eps=eps, norm=norm, max_iter=max_iter, p_init=0.8, restarts=restarts,
                          scores=scores, rng=np.random.RandomState(seed), py_rng=random.Random(seed))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # bit for bit
    p_ours, p_ref = predict(model, ours), predict(model, ref)
    assert torch.equal(p_ours, p_ref)
    fooled = int((p_ours != pred).sum())
    assert 0 < fooled < n  # the attack has work to do, and the test could fail
    assert counted.rows == art_queries  # the same queries, image for image
    assert art_queries <= n * forward_budget("art-square", {"max_iter": max_iter, "restarts": restarts})
    d = (ours - x).flatten(1)
    bound = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    # inside the ball up to float32 rounding (ART's x + eps * d / ||d|| in float32: 1.3e-6 over measured)
    assert float(bound.max()) <= eps * (1 + 1e-5) and 0 <= float(ours.min()) and float(ours.max()) <= 1


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 1.0)])
def test_same_images_as_art_on_an_ep_cnn(mini, norm, eps):
    """The model the paper attacked: an EP-CNN (untrained ep-cnn-tiny, 8 relaxation steps per query)."""
    from epcli.ep import EPCNN
    torch.manual_seed(1)
    ep = EPCNN.preset("ep-cnn-tiny")
    ep.T = 8
    ep.eval()
    x = mini.test_x[:16].float() / 255
    pred = predict(ep, x)
    ref, queries = art(ep, x, norm=norm, eps=eps, scores="softmax", restarts=1, max_iter=20, seed=0)
    counted = Counted(ep)
    ours = art_square_run(counted, x, pred, eps=eps, norm=norm, max_iter=20, p_init=0.8, restarts=1,
                          scores="softmax", rng=np.random.RandomState(0), py_rng=random.Random(0))
    assert torch.equal(ours, ref) and counted.rows == queries
    assert 0 < int((predict(ep, ours) != pred).sum()) < len(x)


def test_true_labels_given_as_art_y(data):
    """With y given (here the true labels, misclassified images included) ART skips its clean prediction."""
    model, x, y, _ = data
    x, y = x[:32], y[:32]
    ref, queries = art(model, x, norm="linf", eps=8 / 255, scores="logits", restarts=1, max_iter=20, seed=7,
                       y=F.one_hot(y, 10))
    counted = Counted(model)
    ours = art_square_run(counted, x, y, eps=8 / 255, norm="linf", max_iter=20, p_init=0.8, restarts=1,
                          scores="logits", rng=np.random.RandomState(7), py_rng=random.Random(7))
    assert torch.equal(ours, ref) and counted.rows == queries


def test_p_schedule_is_arts(data):
    model = data[0]
    est = BlackBoxClassifierNeuralNetwork(lambda a: np.zeros((len(a), 10)), (3, 32, 32), 10, clip_values=(0, 1))
    for max_iter in (1, 7, 30, 1000):
        for p_init in (0.8, 0.3):
            atk = SquareAttack(est, max_iter=max_iter, p_init=p_init, verbose=False)
            for i in range(max_iter):
                assert p_schedule(p_init, i, max_iter) == atk._get_percentage_of_elements(i)
    assert p_schedule(0.8, 999, 1000) == 0.8 / 512


def test_sums_and_roots_round_as_numpys():
    """The L2 step's norms in numpy's summation order and with correctly rounded roots (the independent
    computation: numpy itself); torch's own sum and CPU sqrt do not match (why these helpers exist)."""
    rs = np.random.RandomState(0)
    torch_sum_differs = torch_sqrt_differs = False
    for dtype in (np.float32, np.float64):
        cases = [((7, 3, 32, 32), (1, 2, 3))] + [((5, 3, s, s), (2, 3)) for s in range(3, 32, 2)] + \
                [((4, 1, 10, 10), (1, 2, 3)), ((2, 3, 2, 2), (2, 3))]
        for shape, dims in cases:
            a = (rs.randn(*shape) * rs.rand()).astype(dtype)
            ref = np.sqrt(np.sum(a ** 2, axis=dims, keepdims=True))
            ours = _l2(torch.from_numpy(a), dims).numpy()
            assert ours.dtype == dtype and np.array_equal(ours, ref), (shape, dims)
            k = math.prod(shape[:4 - len(dims)])
            assert np.array_equal(_pairwise_sum(torch.from_numpy(a ** 2).reshape(k, -1)).numpy(),
                                  np.sum(a ** 2, axis=dims).reshape(-1))
            torch_sum_differs |= not np.array_equal(torch.from_numpy(a ** 2).sum(dim=dims).numpy(),
                                                    np.sum(a ** 2, axis=dims))
        v = rs.rand(4096).astype(dtype) * 3
        assert np.array_equal(_sqrt(torch.from_numpy(v)).numpy(), np.sqrt(v))
        torch_sqrt_differs |= not np.array_equal(torch.from_numpy(v).sqrt().numpy(), np.sqrt(v))
    assert torch_sum_differs  # else the pairwise helper would be needless
    if not torch_sqrt_differs:
        pytest.skip("this CPU's torch.sqrt rounds as numpy's; the helper is still checked above")


def test_through_evaluate_with_predicted_labels(data):
    """evaluate(attack="art-square", labels="predicted") is ART's generate(x) with y=None, seeded by one draw
    from the eps's generator (seed * 1_000_003 + its index)."""
    model, x, y, _ = data
    x, y = x[:32], y[:32]
    eps = 16 / 255
    r = evaluate(model, x, y, attack="art-square", norm="linf", eps_list=[eps], params={"max_iter": 30},
                 labels="predicted", seed=5, keep_adv=len(y))
    assert r["params"] == {"max_iter": 30, "p_init": 0.8, "restarts": 1, "scores": "softmax"}
    seed = int(torch.randint(0, 2 ** 32, (1,), generator=torch.Generator().manual_seed(5 * 1_000_003)))
    ref, queries = art(model, x, norm="linf", eps=eps, scores="softmax", restarts=1, max_iter=30, seed=seed)
    assert torch.equal(r["x_adv"][eps], ref)
    p_ref = predict(model, ref)
    assert torch.equal(r["pred_adv"][eps], p_ref) and torch.equal(r["robust"][eps], p_ref == y)
    assert 0 < int((p_ref != r["clean_pred"]).sum()) < len(y)
    assert r["attack_forward_passes"] == queries
    # the same seed, the same run; another seed, another run
    again = evaluate(model, x, y, attack="art-square", norm="linf", eps_list=[eps], params={"max_iter": 30},
                     labels="predicted", seed=5, keep_adv=len(y))
    other = evaluate(model, x, y, attack="art-square", norm="linf", eps_list=[eps], params={"max_iter": 30},
                     labels="predicted", seed=6, keep_adv=len(y))
    assert torch.equal(again["x_adv"][eps], ref) and not torch.equal(other["x_adv"][eps], ref)
    assert "art-square" in ATTACKS and "art-square" in BLACK_BOX


@pytest.mark.parametrize("kw,match", [
    ({"targeted": True}, "untargeted"),
    ({"p_init": 1.0}, "p_init"),
    ({"p_init": 0}, "p_init"),
    ({"scores": "probs"}, "scores"),
    ({"max_iter": 0}, "max_iter"),
    ({"restarts": 0}, "restarts"),
    ({"norm": "l1"}, "norm"),
    ({"eps": -0.1}, "eps"),
    ({"p_init": 0.99}, "window of side 32"),  # round(sqrt(0.99 * 1024)) = 32: no room for ART's randint
    ({"norm": "l2", "size": 8}, "too small"),
])
def test_bad_inputs_refused_in_one_line(data, kw, match):
    model, x, y, _ = data
    kw = dict(kw)
    size = kw.pop("size", 32)
    args = {"eps": 8 / 255, "norm": "linf", **kw}
    xs = x[:2, :, :size, :size]
    with pytest.raises(UsageError, match=match) as err:
        art_square(model, xs, y[:2], **args)
    assert "\n" not in str(err.value)


def test_unknown_parameter_refused_by_evaluate(data):
    model, x, y, _ = data
    with pytest.raises(UsageError, match="unknown parameter.*n_queries"):
        evaluate(model, x[:2], y[:2], attack="art-square", norm="linf", eps_list=[0.03], params={"n_queries": 10})


@pytest.mark.parametrize("attack", ["art-square", "art-autoattack"])
def test_targeted_refused_by_evaluate_before_any_image_is_attacked(data, attack):
    """The attack function refuses targeted=True, but only when it runs; evaluate refuses it up front, also
    when no image would be attacked (every clean prediction wrong)."""
    model, x, y, _ = data
    wrong = (predict(model, x[:4]) + 1) % 10
    with pytest.raises(UsageError, match=f"{attack} is untargeted"):
        evaluate(model, x[:4], wrong, attack=attack, norm="linf", eps_list=[0.03], targeted=True)
