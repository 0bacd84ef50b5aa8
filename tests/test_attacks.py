"""Attacks: torchattacks as oracle, eps-ball property, errors, determinism, AutoAttack worst case.

CPU only, a tiny CNN trained a few steps on the embedded real CIFAR-10 images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from epcli.attacks import ATTACKS, autoattack, evaluate, check_reliability, get_attack, pgd, fgsm
from epcli.errors import UsageError

torchattacks = pytest.importorskip("torchattacks")


class Tiny(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4, padding=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from epcli.data import load_dataset
    d = load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = d.train_x[:2000].float() / 255, d.train_y[:2000]
    for i in range(60):
        j = torch.randint(0, len(yt), (64,))
        opt.zero_grad()
        F.cross_entropy(model(xt[j]), yt[j]).backward()
        opt.step()
    model.eval()
    x, y = d.test_x[:32].float() / 255, d.test_y[:32]
    return model, x, y, d


def acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def robust_at(model, x, xa, y, eps, norm):
    d = (xa - x).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    with torch.no_grad():
        ok = (model(xa).argmax(1) == y) | (n > eps * (1 + 1e-5))
    return float(ok.float().mean())


def test_trained_model_learns(data):
    model, x, y, _ = data
    assert acc(model, x, y) > 0.2


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_matches_torchattacks(data, norm):
    model, x, y, _ = data
    if norm == "linf":
        eps, a = 4 / 255, 1 / 255
        ref = torchattacks.PGD(model, eps=eps, alpha=a, steps=5, random_start=False)(x, y)
    else:
        eps, a = 0.3, 0.075
        ref = torchattacks.PGDL2(model, eps=eps, alpha=a, steps=5, random_start=False)(x, y)
    ours = pgd(model, x, y, eps=eps, norm=norm, steps=5, step_size=a)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_fgsm_matches_torchattacks(data):
    model, x, y, _ = data
    torch.testing.assert_close(fgsm(model, x, y, eps=2 / 255), torchattacks.FGSM(model, eps=2 / 255)(x, y),
                               atol=1e-6, rtol=0)


def test_pgd_default_step_is_paper_preset(data):
    model, x, y, _ = data
    a = pgd(model, x, y, eps=2 / 255, steps=4)
    b = pgd(model, x, y, eps=2 / 255, steps=4, step_size=2.5 * (2 / 255) / 4)
    assert torch.equal(a, b)


def test_apgd_cw_square_not_weaker_than_torchattacks(data):
    model, x, y, _ = data
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    eps = 2 / 255
    ours = robust_at(model, x, ATTACKS["apgd-ce"](model, x, y, eps=eps, norm="linf", steps=10, generator=g()),
                     y, eps, "linf")
    ref = robust_at(model, x, torchattacks.APGD(model, eps=eps, steps=10, loss="ce")(x, y), y, eps, "linf")
    assert ours <= ref + 1 / 16
    ours = robust_at(model, x, ATTACKS["apgd-t"](model, x, y, eps=eps, norm="linf", steps=5,
                                                 n_target_classes=3, generator=g()), y, eps, "linf")
    ref = robust_at(model, x, torchattacks.APGDT(model, eps=eps, steps=5, n_classes=10)(x, y), y, eps, "linf")
    assert ours <= ref + 1 / 16
    eps2 = 0.2
    ours = robust_at(model, x, ATTACKS["cw"](model, x, y, eps=eps2, norm="l2", steps=20, binary_search_steps=4),
                     y, eps2, "l2")
    ref = robust_at(model, x, torchattacks.CW(model, c=1, steps=20)(x, y), y, eps2, "l2")
    assert ours <= ref + 1 / 16
    ours = robust_at(model, x, ATTACKS["square"](model, x, y, eps=eps, norm="linf", n_queries=60, generator=g()),
                     y, eps, "linf")
    ref = robust_at(model, x, torchattacks.Square(model, eps=eps, n_queries=60)(x, y), y, eps, "linf")
    assert ours <= ref + 2 / 16


FAST = {"fgsm": {}, "pgd": {"steps": 2}, "cw": {"steps": 3, "binary_search_steps": 2},
        "apgd-ce": {"steps": 3}, "apgd-dlr": {"steps": 3}, "apgd-t": {"steps": 2, "n_target_classes": 1},
        "fab-t": {"steps": 2, "n_target_classes": 1}, "square": {"n_queries": 4},
        "autoattack": {"steps": 2, "n_target_classes": 1, "n_queries": 3},
        "art-autoattack": {"apgd_iter": 2, "restarts": 1, "deepfool_iter": 2, "square_iter": 3, "square_restarts": 1}}
FAST["art-square"] = {"max_iter": 3}


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(ATTACKS)), norm=st.sampled_from(["linf", "l2"]),
       eps=st.sampled_from([0.0, 1 / 255, 8 / 255, 0.25, 0.5, 1.5]))
def test_inside_ball_and_box(data, name, norm, eps):
    if name == "cw" and norm == "linf":
        return
    model, x, y, _ = data
    xs, ys = x[:4], y[:4]
    xa = ATTACKS[name](model, xs, ys, eps=eps, norm=norm, generator=torch.Generator().manual_seed(1),
                       **FAST[name])
    assert xa.shape == xs.shape and xa.dtype == xs.dtype
    assert float(xa.min()) >= 0 and float(xa.max()) <= 1
    d = (xa - xs).flatten(1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert bool((n <= eps * (1 + 1e-5) + 1e-6).all())


def test_errors(data):
    model, x, y, _ = data
    with pytest.raises(UsageError):
        get_attack("nope")
    with pytest.raises(UsageError):
        pgd(model, x[:2], y[:2], eps=0.1, norm="l3")
    with pytest.raises(UsageError):
        ATTACKS["cw"](model, x[:2], y[:2], eps=0.1, norm="linf")
    two = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))
    for name in ("apgd-t", "fab-t", "apgd-dlr"):
        with pytest.raises(UsageError, match="at least 3 classes"):
            ATTACKS[name](two, x[:2], torch.zeros(2, dtype=torch.long), eps=0.1, norm="linf", **FAST[name])
    with pytest.raises(UsageError):
        evaluate(model, x[:2], y[:2], attack="pgd", norm="linf", eps_list=[0.1], params={"bogus": 1})
    with pytest.raises(UsageError):
        evaluate(model, x[:2], y[:2], attack="pgd", norm="linf", eps_list=[0.1], grad_mode="truncated:5")
    with pytest.raises(UsageError):
        evaluate(model, x[:2], y[:2], attack="pgd", norm="linf", eps_list=[0.1], grad_mode="transfer:cnn")


@pytest.mark.parametrize("name", ["pgd", "square", "apgd-ce"])
def test_seeded_determinism(data, name):
    model, x, y, _ = data
    kw = dict(FAST[name], random_start=True, restarts=2) if name == "pgd" else FAST[name]
    a = ATTACKS[name](model, x[:8], y[:8], eps=4 / 255, norm="linf", generator=torch.Generator().manual_seed(3), **kw)
    b = ATTACKS[name](model, x[:8], y[:8], eps=4 / 255, norm="linf", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_eval_mode_restored(data):
    model, x, y, _ = data
    model.train()
    try:
        pgd(model, x[:4], y[:4], eps=1 / 255, steps=1)
        assert model.training and model.bn.training
    finally:
        model.eval()


def test_autoattack_worst_case(data):
    model, x, y, _ = data
    eps = 2 / 255
    kw = dict(steps=5, n_target_classes=2, n_queries=30)
    seen = {}
    xa = autoattack(model, x, y, eps=eps, norm="linf", generator=torch.Generator().manual_seed(0),
                    on_member=lambda name, r: seen.__setitem__(name, float(r.float().mean())), **kw)
    aa = robust_at(model, x, xa, y, eps, "linf")
    assert list(seen) == ["apgd-ce", "apgd-t", "fab-t", "square"][:len(seen)]
    assert aa == pytest.approx(list(seen.values())[-1])
    members = {"apgd-ce": dict(steps=5), "apgd-t": dict(steps=5, n_target_classes=2),
               "fab-t": dict(steps=5, n_target_classes=2), "square": dict(n_queries=30)}
    for name, p in members.items():
        r = robust_at(model, x, ATTACKS[name](model, x, y, eps=eps, norm="linf",
                                              generator=torch.Generator().manual_seed(0), **p), y, eps, "linf")
        assert aa <= r + 1 / 32, name


def test_evaluate_contract(data):
    model, _, _, d = data
    x, y = d.test_x[:24], d.test_y[:24]  # uint8
    calls = []
    r = evaluate(model, x, y, attack="pgd", norm="linf", eps_list=[0.0, 2 / 255, 0.5], batch_size=10,
                 params={"steps": 3}, keep_adv=4, on_batch=lambda done, total, info: calls.append(done))
    assert calls == [10, 20, 24]
    assert r["params"]["steps"] == 3 and r["params"]["step_size"] is None and r["grad_mode"] == "bptt"
    assert r["clean_correct"].dtype == torch.bool and len(r["clean_correct"]) == 24
    assert torch.equal(r["robust"][0.0], r["clean_correct"])
    for e in r["eps_list"]:
        assert r["x_adv"][e].shape == (4, 3, 32, 32) and r["pred_adv"][e].dtype == torch.long
        assert not bool((r["robust"][e] & ~r["clean_correct"]).any())
    assert r["robust_accuracy"][0.5] <= 0.1
    assert r["forward_passes"] > 0 and r["seconds"] > 0 and r["batch_size"] == 10
    checks = check_reliability([r])
    assert all(c["passed"] for c in checks), checks
    # transfer: generate on a surrogate, score on the target
    t = evaluate(model, x, y, attack="fgsm", norm="linf", eps_list=[4 / 255], surrogate=Tiny(),
                 grad_mode="transfer:tiny")
    assert t["grad_mode"] == "transfer:tiny"
    # predicted labels (the paper's ART setting)
    p = evaluate(model, x, y, attack="fgsm", norm="linf", eps_list=[4 / 255], labels="predicted")
    assert p["labels"] == "predicted"


def test_check_flags_square_beating_whitebox(data):
    model, x, y, _ = data
    wb = evaluate(model, x, y, attack="pgd", norm="linf", eps_list=[16 / 255], params={"steps": 1, "step_size": 0.0})
    bb = evaluate(model, x, y, attack="square", norm="linf", eps_list=[16 / 255], params={"n_queries": 300})
    checks = check_reliability([wb, bb])
    c = [c for c in checks if c["check"] == "white-vs-black"]
    assert c and not c[0]["passed"] and "unreliable" in wb


@pytest.mark.parametrize("name", sorted(FAST))
def test_forward_budget_bounds_what_each_attack_spends(data, name):
    """The progress bar's fraction and ETA divide by forward_budget: it must not be below what an attack spends
    (it was, for APGD, APGD-T and FAB-T after they matched the reference, and for Square's read-out passes)."""
    from epcli.attacks import resolve_params
    from epcli.attacks.evaluate import forward_budget
    model, x, y, _ = data
    params = {**FAST[name], **({"restarts": 2} if name in ("pgd", "square") else {})}
    for norm in ["l2"] if name == "cw" else ["linf", "l2"]:
        r = evaluate(model, x[:8], y[:8], attack=name, norm=norm, eps_list=[8 / 255 if norm == "linf" else 0.5],
                     params=params, labels="predicted", keep_adv=0)
        assert r["attack_forward_passes"] / 8 <= forward_budget(name, resolve_params(name, params)), norm


def test_autoattack_records_robustness_after_each_member(data):
    """The official code logs robust accuracy after each member; evaluate keeps it per example: it only falls from
    member to member, ends at the run's robust flags, and never counts an image the model gets wrong clean.
    With predicted labels it is not kept (an image can end 'robust' by being pushed onto its true label)."""
    from epcli.attacks.autoattack import MEMBERS
    model, x, y, _ = data
    r = evaluate(model, x, y, attack="autoattack", norm="linf", eps_list=[1 / 255, 4 / 255], batch_size=12,
                 params=FAST["autoattack"], keep_adv=0)
    for e, m in r["member_robust"].items():
        assert m.shape == (len(y), len(MEMBERS))
        assert torch.equal(m[:, -1], r["robust"][e])
        assert bool((m[:, 1:] <= m[:, :-1]).all())  # robust after member k+1 implies robust after member k
        assert not bool(m[~r["clean_correct"]].any())
    assert int(r["member_robust"][1 / 255][:, 0].sum()) > int(r["robust"][4 / 255].sum())  # not all zero
    assert evaluate(model, x[:4], y[:4], attack="autoattack", norm="linf", eps_list=[1 / 255], labels="predicted",
                    params=FAST["autoattack"], keep_adv=0)["member_robust"] == {}


@pytest.mark.parametrize("name, norm", [("pgd", "linf"), ("pgd", "l2"), ("fgsm", "linf")])
def test_targeted_attacks_match_torchattacks_targeted_mode(data, name, norm):
    """targeted=True with y the targets is torchattacks' set_mode_targeted_by_label: the same images."""
    model, x, y, _ = data
    t = (y + 3) % 10
    eps, alpha = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    if name == "fgsm":
        ref, ours = torchattacks.FGSM(model, eps=eps), fgsm(model, x, t, eps=eps, targeted=True)
    else:
        cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
        ref = cls(model, eps=eps, alpha=alpha, steps=5, random_start=False)
        ours = pgd(model, x, t, eps=eps, norm=norm, steps=5, step_size=alpha, targeted=True)
    ref.set_mode_targeted_by_label(quiet=True)
    torch.testing.assert_close(ours, ref(x, t), atol=1e-6, rtol=0)


def test_pgd_random_start_matches_torchattacks_draw_for_draw(data):
    """L-inf random start: a generator seeded s draws what torchattacks draws after torch.manual_seed(s). (L2
    differs by design: torchattacks draws the radius uniformly, epcli draws points uniformly in the ball.)"""
    model, x, y, _ = data
    torch.manual_seed(5)
    ref = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=True)(x, y)
    ours = pgd(model, x, y, eps=8 / 255, norm="linf", steps=5, step_size=2 / 255, random_start=True,
               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
