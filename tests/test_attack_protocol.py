"""Attacks: every flag does what it says (labels, targeted, truncated:K, clip), the paper's ART protocol
image by image, the paired-test checks, implicit at a fixed point, input-gradient layout, C&W once, APGD's
checkpoint schedule. CPU, tiny models, real embedded CIFAR-10 images."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SmallCNN, train_briefly

from epcli.attacks import ATTACKS, evaluate, pgd
from epcli.attacks.apgd import apgd_run, checkpoints
from epcli.attacks.checks import more_p, strength_check, white_vs_black
from epcli.ep import EPCNN
from epcli.errors import UsageError


@pytest.fixture(scope="module")
def data(mini):
    torch.manual_seed(0)
    model = train_briefly(SmallCNN(), mini)
    return model, mini.test_x[:48].float() / 255, mini.test_y[:48]


@pytest.fixture(scope="module")
def ep():
    torch.manual_seed(1)
    m = EPCNN.preset("ep-cnn-tiny")
    m.T = 8
    return m.eval()


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


# 1. --labels predicted ------------------------------------------------------------------------------------------

def test_predicted_labels_attack_every_image_against_the_prediction(data):
    model, x, y = data
    cp = predict(model, x)
    assert (cp != y).sum() >= 10  # a model with errors
    kw = dict(attack="pgd", norm="linf", eps_list=[4 / 255], params={"steps": 5}, keep_adv=len(y))
    t, p = evaluate(model, x, y, labels="true", **kw), evaluate(model, x, y, labels="predicted", **kw)
    assert p["labels"] == "predicted" and torch.equal(p["attack_labels"], cp) and torch.equal(t["attack_labels"], y)
    # independent: PGD from every image away from its clean prediction, scored against the true label
    xa = pgd(model, x, cp, eps=4 / 255, steps=5)
    torch.testing.assert_close(p["x_adv"][4 / 255], xa, atol=1e-6, rtol=0)
    assert torch.equal(p["robust"][4 / 255], predict(model, xa) == y)
    # true-label protocol: misclassified images are left alone and never robust
    wrong = cp != y
    assert torch.equal(t["x_adv"][4 / 255][wrong], x[wrong]) and not t["robust"][4 / 255][wrong].any()
    # misclassified images pushed away from their wrong prediction land on the true class sometimes
    assert p["robust"][4 / 255][wrong].any()
    assert p["robust_accuracy"][4 / 255] > t["robust_accuracy"][4 / 255]


# 2. truncated:K for any K ----------------------------------------------------------------------------------------

def _input_grad(model, x, mode, T, linear=False):
    model.T, model.grad_mode = T, mode
    xr = x.clone().requires_grad_()
    logits = model(xr)
    if linear:  # a loss whose logit gradient does not depend on the value: compares the Jacobians alone
        (logits * torch.linspace(-1, 1, logits.shape[1], dtype=logits.dtype)).sum().backward()
    else:
        F.cross_entropy(logits, torch.arange(len(x)) % 10).backward()
    model.grad_mode = "bptt"
    return xr.grad


@pytest.mark.parametrize("K", [3, 8, 12])
def test_truncated_any_K(ep, data, K):
    x = data[1][:4]
    g = _input_grad(ep, x, f"truncated:{K}", T=8)
    if K >= 8:  # all T steps: exactly BPTT
        torch.testing.assert_close(g, _input_grad(ep, x, "bptt", T=8), atol=0, rtol=0)
    else:  # independent: BPTT through a K-step relaxation from zero
        xr = x.clone().requires_grad_()
        F.cross_entropy(ep.logits(ep.relax(xr, K)[0]), torch.arange(4) % 10).backward()
        torch.testing.assert_close(g, xr.grad, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(g, _input_grad(ep, x, "bptt", T=8), atol=1e-6)
    ep.T = 8
    r = evaluate(ep, x, data[2][:4], attack="pgd", norm="linf", eps_list=[8 / 255], params={"steps": 2},
                 grad_mode=f"truncated:{K}")
    assert r["grad_mode"] == f"truncated:{K}"


# 3. targeted -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "apgd-dlr", "square", "cw"])
def test_targeted_attacks_aim_at_their_targets(data, name):
    model, x, y = data
    params = {"pgd": {"steps": 10}, "apgd-ce": {"steps": 10}, "apgd-dlr": {"steps": 10}, "square": {"n_queries": 50},
              "cw": {"steps": 10, "binary_search_steps": 2}, "fgsm": {}}[name]
    norm, eps = ("l2", 2.0) if name == "cw" else ("linf", 16 / 255)
    r = evaluate(model, x, y, attack=name, norm=norm, eps_list=[eps], params=params, targeted=True, seed=3,
                 keep_adv=len(y))
    tg = r["targets"]
    assert r["targeted"] and not (tg == y).any() and tg.min() >= 0 and tg.max() <= 9
    # the same targets come back for the same seed; the hit rate is what the model predicts
    assert torch.equal(evaluate(model, x[:8], y[:8], attack="fgsm", norm="linf", eps_list=[eps], targeted=True,
                                seed=3)["targets"], tg[:8])
    assert torch.equal(r["target_hit"][eps], (predict(model, r["x_adv"][eps]) == tg) & r["clean_correct"])
    hit = float(r["target_hit"][eps][r["clean_correct"]].float().mean())
    untargeted = evaluate(model, x, y, attack=name, norm=norm, eps_list=[eps], params=params, seed=3,
                          keep_adv=len(y))
    chance = float(((predict(model, untargeted["x_adv"][eps]) == tg) & r["clean_correct"]).float().sum()
                   / r["clean_correct"].sum())
    # aiming at the target reaches it at least as often as an untargeted attack does (strictly for the CE ones;
    # this weak model never predicts some classes, which caps every attack's hit rate)
    assert hit > chance if name in ("fgsm", "pgd", "apgd-ce") else hit >= chance


def test_targeted_refused_where_the_attack_picks_its_own_targets(data):
    model, x, y = data
    for name in ("apgd-t", "fab-t", "autoattack"):
        with pytest.raises(UsageError, match="picks its own target"):
            evaluate(model, x[:2], y[:2], attack=name, norm="linf", eps_list=[0.1], targeted=True)


# 4. the paper's ART protocol, image by image against ART -----------------------------------------------------

def _art_pgd(model, x, eps, norm, steps=20):
    art = pytest.importorskip("art")  # noqa: F841
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10,
                            clip_values=None, device_type="cpu")
    atk = ProjectedGradientDescentPyTorch(clf, norm=math.inf if norm == "linf" else 2, eps=eps,
                                          eps_step=2.5 * eps / steps, max_iter=steps, num_random_init=0,
                                          targeted=False, batch_size=len(x), verbose=False)
    return torch.from_numpy(atk.generate(x.numpy()))  # y=None: the model's predictions


PAPER = {"steps": 20, "random_start": False, "clip": False}


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("linf", 0.1), ("l2", 1.0)])
def test_paper_protocol_equals_art_image_by_image(data, norm, eps):
    model, x, y = data
    ref = _art_pgd(model, x, eps, norm)
    r = evaluate(model, x, y, attack="pgd", norm=norm, eps_list=[eps], params=PAPER, labels="predicted",
                 keep_adv=len(y))
    ours = r["x_adv"][eps]
    assert ours.min() < 0 or ours.max() > 1 or norm == "l2"  # not clipped, as ART with clip_values=None
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    assert torch.equal(r["pred_adv"][eps], predict(model, ref))  # every image, same verdict


def test_paper_protocol_equals_art_on_an_ep_cnn_with_truncated_gradients(ep, data):
    x, y = data[1][:12], data[2][:12]
    ep.T, eps = 10, 8 / 255
    ep.grad_mode = "truncated:4"
    try:
        ref = _art_pgd(ep, x, eps, "linf", steps=5)
    finally:
        ep.grad_mode = "bptt"
    r = evaluate(ep, x, y, attack="pgd", norm="linf", eps_list=[eps], params={**PAPER, "steps": 5},
                 labels="predicted", grad_mode="truncated:4", keep_adv=len(y))
    torch.testing.assert_close(r["x_adv"][eps], ref, atol=2e-5, rtol=0)
    assert torch.equal(r["pred_adv"][eps], predict(ep, ref))
    ep.T = 8


# 5. checks that separate signal from noise ---------------------------------------------------------------------

def test_one_image_never_decides_a_paired_verdict():
    assert more_p(1, 0) == 0.5 and more_p(0, 0) == 1.0
    assert more_p(7, 0) == pytest.approx(1 / 128)
    # exact tail against scipy's binomial
    from scipy.stats import binom
    for k, o in [(9, 2), (5, 5), (12, 30)]:
        assert more_p(k, o) == pytest.approx(binom.sf(k - 1, k + o, 0.5))


def _res(name, robust, eps=0.03):
    r = torch.tensor(robust, dtype=torch.bool)
    return {"attack": name, "norm": "linf", "n": len(r), "y": torch.zeros(len(r), dtype=torch.long),
            "robust": {eps: r}, "robust_accuracy": {eps: float(r.float().mean())}}


def test_white_vs_black_says_weak_attack_or_masking():
    base = [True] * 40 + [False] * 24
    # Square breaks 2 more of 64 points: noise, not a verdict
    sq2 = list(base)
    sq2[0] = sq2[1] = False
    (c,) = white_vs_black(_res("pgd", base), _res("square", sq2))
    assert c["passed"] and c["verdict"] == "ok"
    # Square breaks 12 more
    sq = list(base)
    for i in range(12):
        sq[i] = False
    (c,) = white_vs_black(_res("pgd", base), _res("square", sq))
    assert not c["passed"] and c["verdict"] == "masking-suspected"
    # ... but APGD-CE already breaks them all: PGD is weak, the gradients are not masked
    (c,) = white_vs_black(_res("pgd", base), _res("square", sq), [_res("apgd-ce", sq)])
    assert not c["passed"] and c["verdict"] == "weak-attack" and "apgd-ce (12)" in c["reason"]
    # APGD breaks only 2 of them: still masking
    ap = list(base)
    ap[0] = ap[1] = False
    (c,) = white_vs_black(_res("pgd", base), _res("square", sq), [_res("apgd-ce", ap)])
    assert c["verdict"] == "masking-suspected"


def test_strength_check_paired(data):
    model, x, y = data
    kw = dict(norm="linf", eps=16 / 255, steps=5, seed=1)
    strong = evaluate(model, x, y, attack="pgd", norm="linf", eps_list=[16 / 255], seed=1,
                      params={"steps": 10, "restarts": 2, "random_start": True})["robust"][16 / 255]
    one_off = strong.clone()
    one_off[(~strong).nonzero()[0]] = True  # the base left one more point standing: never a verdict
    c = strength_check(model, x, y, base_robust=one_off, **kw)
    assert c["passed"] and c["only_strong"] == 1 and c["only_base"] == 0
    # a base attack that does nothing is caught
    none = predict(model, x) == y
    c = strength_check(model, x, y, base_robust=none, **kw)
    assert not c["passed"] and c["only_strong"] >= 7


# 6. implicit at a fixed point ------------------------------------------------------------------------------------

def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_implicit_relaxes_to_a_fixed_point_before_the_adjoint(data):
    torch.manual_seed(2)
    m = EPCNN.preset("ep-cnn-tiny").double().eval()
    x = data[1][:3].double()
    from epcli.ep import new_implicit_stats
    at_fixed_point = _input_grad(m, x, "implicit", T=400, linear=True)  # converged: residual ~1e-16
    m.implicit_max_steps = 0  # the old behaviour: the adjoint at s_T, whatever its residual
    m.implicit_stats = new_implicit_stats()
    at_T = _input_grad(m, x, "implicit", T=2, linear=True)
    assert m.implicit_stats["unconverged"] == 1 and m.implicit_stats["max_residual_at_T"] > 1e-2
    m.implicit_max_steps = None
    m.implicit_stats = new_implicit_stats()
    relaxed = _input_grad(m, x, "implicit", T=2, linear=True)
    st = m.implicit_stats
    assert st["unconverged"] == 0 and st["max_residual"] <= 1e-3 and st["max_extra_steps"] > 0
    assert _cos(relaxed, at_fixed_point) > 0.9999 > _cos(at_T, at_fixed_point) + 0.01
    # independent: the residual is one explicit step of the dynamics, per sample and layer ||F(s)-s|| / ||F(s)||
    with torch.no_grad():
        s, _ = m.relax(x, 2)
        s1, _ = m.relax(x, 1, states=s, update="sync")
    top = max(float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).max()) for a, b in zip(s1, s))
    assert m.fixed_point_residual(x, s) == pytest.approx(top, rel=1e-5)


# 7. input gradients in the input's layout: other libraries run on an epcli EP-CNN unchanged -----------------------

def test_input_gradient_layout_and_torchattacks_on_an_ep_cnn(ep, data):
    ta = pytest.importorskip("torchattacks")
    x, y = data[1][:4], data[2][:4]
    g = _input_grad(ep, x, "bptt", T=8)
    assert g.is_contiguous()
    g = _input_grad(ep, x.contiguous(memory_format=torch.channels_last), "bptt", T=8)
    assert g.is_contiguous(memory_format=torch.channels_last)
    ep.T = 8
    for atk in (ta.PGD(ep, eps=8 / 255, alpha=2 / 255, steps=2), ta.PGDL2(ep, eps=0.5, alpha=0.1, steps=2),
                ta.APGD(ep, eps=8 / 255, steps=2), ta.Square(ep, eps=8 / 255, n_queries=5)):
        xa = atk(x, y)
        assert xa.shape == x.shape and (xa - x).abs().max() <= 8 / 255 + 1e-6 or isinstance(atk, ta.PGDL2)


# 8. C&W once for every eps; APGD's schedule as the reference's -----------------------------------------------

def test_cw_runs_once_for_every_eps(data):
    model, x, y = data
    x, y = x[:16], y[:16]
    p = {"steps": 10, "binary_search_steps": 3}
    eps = [0.1, 0.3, 1.0]
    r = evaluate(model, x, y, attack="cw", norm="l2", eps_list=eps, params=p, keep_adv=16)
    one = evaluate(model, x, y, attack="cw", norm="l2", eps_list=[0.3], params=p)
    assert r["attack_forward_passes"] == one["attack_forward_passes"] > 0
    cc = r["clean_correct"]
    for e in eps:  # the same answer as running the attack at that eps alone
        xa = ATTACKS["cw"](model, x[cc], y[cc], eps=e, norm="l2", **p)
        torch.testing.assert_close(r["x_adv"][e][cc], xa, atol=1e-6, rtol=0)
    assert r["robust_accuracy"][0.1] >= r["robust_accuracy"][0.3] >= r["robust_accuracy"][1.0]


def _reference_checkpoints(n):
    """Written from the AutoAttack code's description: intervals of int(0.22n), shrinking by int(0.03n) down
    to int(0.06n) (each at least 1); a check fires when the iteration counter reaches the interval."""
    first, decr, least = max(int(0.22 * n), 1), max(int(0.03 * n), 1), max(int(0.06 * n), 1)
    out, counter, k = [], 0, first
    for i in range(n):
        counter += 1
        if counter == k:
            out.append(i + 1)
            counter, k = 0, max(k - decr, least)
    return out


def test_apgd_checkpoints_are_the_reference_schedule():
    for n in (1, 5, 10, 20, 33, 50, 100, 250, 1000):
        assert checkpoints(n) == _reference_checkpoints(n), n
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(20)[:3] == [4, 7, 9]


@pytest.mark.parametrize("steps", [20, 100])
def test_apgd_equals_torchattacks_port_image_by_image(data, steps):
    ta = pytest.importorskip("torchattacks")
    model, x, y = data
    x, y, eps = x[:16], y[:16], 8 / 255
    atk = ta.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0)
    torch.manual_seed(0)
    ref_best, ref_acc, ref_loss, _ = atk.attack_single_run(x, y)
    torch.manual_seed(0)  # the same start: torchattacks' L-inf draw, scaled to the ball's surface
    t = 2 * torch.rand(x.shape) - 1
    x0 = (x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    info = {}
    _, fooled = apgd_run(model, x, lambda z: F.cross_entropy(z, y, reduction="none"), lambda z: z.argmax(1) != y,
                         eps=eps, norm="linf", steps=steps, generator=None, x_init=x0, info=info)
    torch.testing.assert_close(info["x_best"], ref_best, atol=1e-6, rtol=0)
    torch.testing.assert_close(info["loss_best"], ref_loss, atol=1e-6, rtol=1e-6)
    assert torch.equal(fooled, ref_acc == 0)
