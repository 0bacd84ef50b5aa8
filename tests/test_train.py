"""The training engine: recipes, the epoch loop, exact resume, EP and adversarial training, divergence."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import epcli.attacks
from epcli.data import Dataset, load_dataset, subset
from epcli.errors import Diverged, UsageError
from epcli.models import Normalize, create_model
from epcli.train import (PAPER_AT_EPS, RECIPES, check_adv_eps, default_recipe, evaluate, fit, lr_factor,
                         resolve_recipe, state_to_tensors, tensors_to_state)


try:
    import epcli.ep  # noqa: F401
    HAVE_EP = True
except ImportError:
    HAVE_EP = False


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))


def _small(d, n_train, n_test, seed=0):
    tx, ty, _ = subset(d.train_x, d.train_y, n_train, seed=seed)
    vx, vy, _ = subset(d.test_x, d.test_y, n_test, seed=seed)
    return Dataset("small", d.classes, tx, ty, vx, vy)


def _two_class(d, a=0, b=6):
    """airplane vs frog: a tiny binary problem on real images."""
    def pick(x, y):
        m = (y == a) | (y == b)
        return x[m], (y[m] == b).long()
    return Dataset("2c", [d.classes[a], d.classes[b]], *pick(d.train_x, d.train_y), *pick(d.test_x, d.test_y))


def _linear():
    return nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), nn.Flatten(), nn.Linear(3072, 2))


# --- recipes --------------------------------------------------------------------------------------------

def test_every_preset_resolves_to_a_full_recipe():
    for name in RECIPES:
        r = resolve_recipe(name, {})
        assert {"epochs", "batch_size", "optimizer", "schedule", "augment", "amp", "adv", "ep"} <= set(r)


def test_paper_recipes_match_the_paper():
    r = resolve_recipe("paper-cnn", {})
    assert (r["epochs"], r["batch_size"], r["augment"], r["pad_mode"]) == (45, 200, "crop-flip", "edge")
    assert r["optimizer"]["name"] == "sgd" and r["optimizer"]["lr"] == 0.1 and r["optimizer"]["momentum"] == 0.9
    assert r["optimizer"]["weight_decay"] == 0.0
    assert r["schedule"] == {**r["schedule"], "name": "step", "step_size": 8, "gamma": 0.3}
    at = resolve_recipe("paper-cnn-at", {"adv.eps": 0.5})
    assert at["adv"] == {"norm": "l2", "eps": 0.5, "steps": 20, "step_size": None, "random_start": False,
                         "labels": "predicted"}
    assert resolve_recipe("paper-cnn-at-linf", {})["adv"]["norm"] == "linf"
    vit = resolve_recipe("vit", {})
    assert vit["optimizer"]["name"] == "adamw" and vit["label_smoothing"] == 0.1
    assert vit["schedule"]["name"] == "warmup-cosine" and vit["augment"] in ("autoaugment", "randaugment")
    assert 0.5 in PAPER_AT_EPS


@pytest.mark.skipif(not HAVE_EP, reason="epcli.ep not available")
def test_ep_recipes_are_merged():
    from epcli.ep import EP_RECIPES
    assert set(EP_RECIPES) <= set(RECIPES)
    name = default_recipe("ep-cnn", "cifar10")
    assert resolve_recipe(name, {})["ep"]["T1"] >= 1


def test_overrides_deep_merge_and_reject_unknown_keys():
    r = resolve_recipe("paper-cnn", {"optimizer": {"lr": 0.05}, "schedule.gamma": 0.5, "epochs": 3})
    assert r["optimizer"]["lr"] == 0.05 and r["optimizer"]["momentum"] == 0.9
    assert r["schedule"]["gamma"] == 0.5 and r["schedule"]["step_size"] == 8 and r["epochs"] == 3
    assert RECIPES["paper-cnn"]["epochs"] == 45  # presets are never mutated
    with pytest.raises(UsageError, match="unknown recipe key 'optimizer.lrr'"):
        resolve_recipe("paper-cnn", {"optimizer.lrr": 1})
    with pytest.raises(UsageError, match="unknown recipe key 'epoch'"):
        resolve_recipe("paper-cnn", {"epoch": 3})
    with pytest.raises(UsageError, match="unknown recipe 'paper-cn'.*did you mean paper-cnn"):
        resolve_recipe("paper-cn", {})
    with pytest.raises(UsageError, match="unknown schedule"):
        resolve_recipe("paper-cnn", {"schedule.name": "linear"})
    with pytest.raises(UsageError, match="unknown optimizer"):
        resolve_recipe("paper-cnn", {"optimizer.name": "lion"})
    on = resolve_recipe("paper-cnn", {"adv": {"eps": 0.25}})  # switching AT on fills the paper's defaults
    assert on["adv"]["steps"] == 20 and on["adv"]["norm"] == "l2"


def test_eps_on_the_wrong_scale_is_caught():
    with pytest.raises(UsageError, match=r"did you mean 8/255"):
        resolve_recipe("paper-cnn-at-linf", {"adv.eps": 8})
    with pytest.raises(UsageError, match=r"L2 eps 8 .*did you mean 8/255"):
        resolve_recipe("paper-cnn-at", {"adv.eps": 8})
    with pytest.raises(UsageError, match="finite number > 0"):
        check_adv_eps(-0.1, "l2")
    with pytest.raises(UsageError, match="unknown norm"):
        resolve_recipe("paper-cnn-at", {"adv.norm": "l3", "adv.eps": 0.5})
    assert check_adv_eps(1.0, "l2") == 1.0 and check_adv_eps(8 / 255, "linf") == pytest.approx(0.0314, abs=1e-4)


def test_default_recipes():
    assert default_recipe("cnn", "cifar10") == "paper-cnn"
    assert default_recipe("cnn-small", None) == "demo-cnn"
    assert default_recipe("vit", "cifar10") == "vit"
    assert default_recipe("timm:resnet18", "cifar10") in RECIPES


def test_schedules():
    step = {"name": "step", "step_size": 8, "gamma": 0.3}
    assert [lr_factor(step, e, 0.5, 45, 0.1) for e in (0, 7, 8, 16)] == pytest.approx([1, 1, 0.3, 0.09])
    cos = {"name": "cosine", "t_max": 100, "eta_min": 1e-5}
    assert lr_factor(cos, 0, 0.0, 120, 0.1) == 1.0
    assert lr_factor(cos, 100, 0.0, 120, 0.1) * 0.1 == pytest.approx(1e-5)
    assert lr_factor(cos, 110, 0.0, 120, 0.1) == lr_factor(cos, 100, 0.0, 120, 0.1)  # flat after t_max
    wc = {"name": "warmup-cosine", "warmup_epochs": 5, "eta_min": 0.0}
    assert lr_factor(wc, 2, 0.5, 100, 1e-3) == pytest.approx(0.5)
    assert lr_factor(wc, 5, 0.0, 100, 1e-3) == pytest.approx(1.0)
    assert lr_factor(wc, 99, 0.999, 100, 1e-3) < 1e-3


# --- the loop -------------------------------------------------------------------------------------------

def test_fit_trains_reports_and_resumes_exactly(cifar, tmp_path, device, exact_cuda):
    ds = _small(cifar, 256, 200)
    recipe = resolve_recipe("demo-cnn", {"epochs": 3, "batch_size": 64})
    torch.manual_seed(0)
    init = copy.deepcopy(create_model("cnn-small", width=8).state_dict())

    def fresh():
        m = create_model("cnn-small", width=8)
        m.load_state_dict(init)
        return m

    calls, states, batches_seen = [], {}, []
    full = fresh()
    hist = fit(full, ds, recipe, seed=7, device=device,
               on_epoch=lambda e, m, s: (calls.append((e, m)), states.update({e: s})),
               on_batch=lambda done, total, info: batches_seen.append((done, total)))
    assert [e for e, _ in calls] == [1, 2, 3] and len(hist) == 3
    assert batches_seen[-1] == (4, 4)
    m = calls[-1][1]
    assert {"train_loss", "train_acc", "test_acc", "seconds", "lr"} <= set(m)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert 0.0 <= m["test_acc"] <= 1.0

    # stop after epoch 1 (max_epochs), write the state to safetensors, resume in a fresh process-like setup
    part = fresh()
    fit(part, ds, recipe, seed=7, max_epochs=1, device=device)
    tensors, meta = state_to_tensors(states[1])
    save_file(tensors, str(tmp_path / "state.safetensors"), metadata=meta)
    state = tensors_to_state(load_file(str(tmp_path / "state.safetensors")), meta)
    torch.manual_seed(12345)  # whatever the global RNG is now, the state restores it
    resumed = create_model("cnn-small", width=8)
    hist2 = fit(resumed, ds, recipe, seed=7, state=state, device=device)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["test_acc"] for h in hist2] == [h["test_acc"] for h in hist]
    acc = evaluate(resumed, ds.test_x, ds.test_y, batch_size=64, device=device)
    assert acc == pytest.approx(hist[-1]["test_acc"])


def test_state_round_trips_optimizer_internals():
    m = nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "epoch": 2, "history": [{"a": 1.5}], "x": None}
    back = tensors_to_state(*state_to_tensors(state))
    assert back["epoch"] == 2 and back["history"] == [{"a": 1.5}] and back["x"] is None
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt2 = torch.optim.AdamW(m.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    with pytest.raises(UsageError, match="not a training state"):
        tensors_to_state({}, {})


def test_nan_loss_raises_diverged(cifar):
    ds = _small(cifar, 64, 20)
    model = _linear_10()
    with torch.no_grad():
        model[2].weight.fill_(float("nan"))
    with pytest.raises(Diverged, match="diverged"):
        fit(model, ds, resolve_recipe("demo-cnn", {"epochs": 1, "batch_size": 32}))


def test_policy_augmentation_runs(cifar):
    ds = _small(cifar, 64, 20)
    r = resolve_recipe("vit", {"epochs": 1, "batch_size": 32, "amp": False})
    for aug in ("autoaugment", "randaugment"):
        r["augment"] = aug
        hist = fit(_linear_10(), ds, r)
        assert math.isfinite(hist[0]["train_loss"])


def _linear_10():
    return nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), nn.Flatten(), nn.Linear(3072, 10))


class _FakeEP(nn.Module):
    """Something with the EP contract: ep_train_step fills .grad, layer_param_groups gives the layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3072, 16), nn.Linear(16, 10)
        self.calls = []

    def forward(self, x):
        return self.b(torch.relu(self.a(x.flatten(1))))

    def layer_param_groups(self):
        return [list(self.a.parameters()), list(self.b.parameters())]

    def ep_train_step(self, x, y, T1, T2, beta, rule):
        self.calls.append((T1, T2, beta, rule))
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        return dict(loss=float(loss), logits=logits.detach(), steps=T1)


def test_ep_models_train_with_their_own_step_and_per_layer_lrs(cifar):
    ds = _small(cifar, 64, 20)
    model = _FakeEP()
    r = resolve_recipe("demo-cnn", {"epochs": 1, "batch_size": 32, "ep": {"T1": 7, "T2": 3, "beta": 0.25},
                                    "optimizer": {"lrs": [0.1, 0.01]}})
    hist = fit(model, ds, r)
    assert model.calls == [(7, 3, 0.25, "symmetric")] * 2
    assert hist[0]["mean_steps"] == 7
    with pytest.raises(UsageError, match="2 layers"):
        fit(_FakeEP(), ds, {**r, "optimizer": {**r["optimizer"], "lrs": [0.1]}})


@pytest.mark.skipif(not HAVE_EP, reason="epcli.ep not available")
def test_real_ep_cnn_trains(cifar):
    ds = _small(cifar, 64, 32)
    model = create_model("ep-cnn-tiny")
    name = default_recipe("ep-cnn-tiny", None)
    r = resolve_recipe(name, {"epochs": 1, "batch_size": 32, "ep.T1": 6, "ep.T2": 3})
    r["optimizer"]["lrs"] = r["optimizer"]["lrs"][:len(model.layer_param_groups())] if r["optimizer"]["lrs"] \
        else None
    before = copy.deepcopy(model.state_dict())
    hist = fit(model, ds, r)
    assert hist[0]["mean_steps"] > 0 and math.isfinite(hist[0]["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- adversarial training -------------------------------------------------------------------------------

def test_adversarial_training_trains_on_pgd_outputs(cifar, monkeypatch):
    """Every training batch is replaced by pgd's output, computed in eval mode on the predicted labels."""
    ds = _small(cifar, 64, 20)
    model = create_model("cnn-small", width=8)
    real_pgd = epcli.attacks.pgd
    attacks, train_inputs = [], []

    def spy(m, x, y, **kw):
        x_adv = real_pgd(m, x, y, **kw)
        with torch.no_grad():
            m.eval()
            pred = m(x).argmax(1)
        attacks.append((x.clone(), x_adv.clone(), y.clone(), pred, kw))
        return x_adv

    monkeypatch.setattr(epcli.attacks, "pgd", spy)
    modes = []

    def hook(mod, inp):
        modes.append(mod.training)
        if mod.training:
            train_inputs.append(inp[0].clone())

    model.register_forward_pre_hook(hook)
    r = resolve_recipe("paper-cnn-at", {"epochs": 1, "batch_size": 32, "adv.eps": 0.5, "adv.steps": 3,
                                        "augment": None})
    fit(model, ds, r)
    assert len(attacks) == 2 and len(train_inputs) == 2
    for (x, x_adv, y, pred, kw), seen in zip(attacks, train_inputs):
        assert torch.equal(y, pred)  # attack labels = the model's predictions (ART default)
        assert kw["eps"] == 0.5 and kw["norm"] == "l2" and kw["steps"] == 3 and kw["random_start"] is False
        assert torch.equal(seen, x_adv)  # the training forward sees the adversarial batch, not the clean one
        delta = (x_adv - x).flatten(1).norm(dim=1)
        assert (delta > 0.1).all() and (delta <= 0.5 + 1e-4).all()
    assert sum(modes) == 2  # all other forwards (prediction, PGD steps, test) ran in eval mode


def test_adversarial_training_buys_robustness(cifar):
    """Tiny binary problem, linear model: PGD-AT (L2, eps 0.5) beats clean training under PGD at that eps."""
    ds = _two_class(cifar)
    eps = 0.5
    base = {"epochs": 2, "batch_size": 50, "augment": None, "optimizer.lr": 0.01, "schedule.name": "constant"}
    x, y = ds.test_x.float() / 255, ds.test_y
    robust = {}
    for name, adv in (("clean", None), ("at", {"eps": eps, "steps": 5})):
        torch.manual_seed(0)
        model = _linear()
        fit(model, ds, resolve_recipe("paper-cnn", {**base, "adv": adv}), seed=0)
        model.eval()
        x_adv = epcli.attacks.pgd(model, x, y, eps=eps, norm="l2", steps=10)
        with torch.no_grad():
            robust[name] = (model(x_adv).argmax(1) == y).float().mean().item()
    assert robust["at"] > robust["clean"] + 0.05, robust  # measured: 0.775 vs 0.645


def test_adversarial_training_needs_an_eps_and_a_backprop_model(cifar):
    ds = _small(cifar, 32, 10)
    with pytest.raises(UsageError, match="needs an eps"):
        fit(create_model("cnn-small", width=4), ds, resolve_recipe("paper-cnn-at", {"epochs": 1}))
    r = resolve_recipe("paper-cnn-at", {"epochs": 1, "adv.eps": 0.5, "ep": {"T1": 3}})
    with pytest.raises(UsageError, match="not the EP-CNN"):
        fit(_FakeEP(), ds, r)


def test_resume_is_exact_with_random_start_pgd_and_policy_augmentation(cifar):
    """The PGD generator and the global RNG (torchvision's policies) are part of the state too."""
    ds = _small(cifar, 64, 20)
    r = resolve_recipe("paper-cnn-at-linf", {"epochs": 2, "batch_size": 32, "adv.steps": 2,
                                             "augment": "randaugment"})
    torch.manual_seed(0)
    init = copy.deepcopy(_linear_10().state_dict())
    states = {}
    full = _linear_10()
    full.load_state_dict(init)
    fit(full, ds, r, seed=3, on_epoch=lambda e, m, s: states.update({e: s}))
    torch.manual_seed(99)
    resumed = _linear_10()
    fit(resumed, ds, r, seed=3, state=tensors_to_state(*state_to_tensors(states[1])))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAVE_EP, reason="epcli.ep not available")
def test_recipe_ep_update_reaches_the_relaxation(cifar, monkeypatch):
    """ep.update in a recipe (e.g. `--set ep.update=alternate`) is what ep_train_step receives."""
    ds = _small(cifar, 32, 16)
    model = create_model("ep-cnn-tiny")
    seen = []
    real = model.ep_train_step

    def spy(*a, **kw):
        seen.append(kw.get("update"))
        return real(*a, **kw)
    monkeypatch.setattr(model, "ep_train_step", spy)
    r = resolve_recipe(default_recipe("ep-cnn-tiny", None), {"epochs": 1, "batch_size": 32, "ep.T1": 6,
                                                             "ep.T2": 3, "ep.update": "alternate"})
    r["optimizer"]["lrs"] = None
    fit(model, ds, r)
    assert seen == ["alternate"]
    with pytest.raises(UsageError, match="ep.update"):
        resolve_recipe("demo-ep", {"ep.update": "sideways"})


@pytest.mark.parametrize("dataset", ["cifar10-mini", "cifar10", "cifar100"])
def test_every_model_default_recipe_fits_it(dataset):
    """`epcli train --model M` without --recipe: the default recipe's per-layer learning rates fit M's layers
    (the paper net on the embedded set once got demo-ep's 4 rates for its 5 layers: refused)."""
    from epcli.models import create_model, list_models
    from epcli.train import check_plan, default_recipe, resolve_recipe
    classes = 100 if dataset == "cifar100" else 10
    for name in list_models():
        recipe = resolve_recipe(default_recipe(name, dataset), {})
        check_plan(create_model(name, num_classes=classes), recipe, 1000)
