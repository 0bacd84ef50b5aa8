"""Equilibrium: residuals, Anderson mixing, warm starts, the cancellation-free EP update, checkpoint selection."""

import json

import pytest
import torch
import torch.nn.functional as F

from epcli.data import Dataset, load_dataset, subset
from epcli.ep import EQUILIBRIUM_TOL, EPCNN, prediction_residual, relative_residual
from epcli.errors import UsageError
from epcli.train import fit, resolve_recipe, validation_split


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cos(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def tiny(**kw):
    return EPCNN.preset("ep-cnn-tiny", image_size=8, **kw).double()


def data(B=4, C=10, size=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 3, size, size, generator=g, dtype=dtype), torch.arange(B) % C


# -- residuals ----------------------------------------------------------------------------------------------------

def test_relative_residual_is_the_last_step_relative_to_the_state():
    m = tiny()
    x, _ = data()
    s9, _ = m.relax(x, 9)
    s10, _ = m.relax(x, 10)
    r = m.last_residual
    # independent: per sample, per layer ‖s10 − s9‖ / ‖s10‖, then the largest layer
    want = torch.stack([torch.stack([(a[i] - b[i]).norm() / a[i].norm() for a, b in zip(s10, s9)]).max()
                        for i in range(x.shape[0])])
    assert r.shape == (4,) and torch.allclose(r.double(), want, rtol=1e-5)
    assert torch.allclose(relative_residual(s10, s9).double(), want, rtol=1e-5)
    assert float(r.max()) > 1e-6  # 10 steps are not converged here: the test would see a constant 0


def test_tol_stops_on_the_relative_residual_and_the_residual_shrinks():
    m = tiny()
    x, _ = data()
    _, n3 = m.relax(x, 500, tol=1e-3)
    assert float(m.last_residual.max()) < 1e-3
    _, n8 = m.relax(x, 500, tol=1e-8)
    assert float(m.last_residual.max()) < 1e-8 and n8 > n3
    s, _ = m.relax(x, n3 - 1)  # one step earlier it was not below tol
    assert float(m.last_residual.max()) >= 1e-3


def test_prediction_residual_flags_unconverged_predictions():
    m = tiny()
    x, _ = data(B=6)
    m.T = m.depth
    short = prediction_residual(m, x, batch_size=4)
    assert short["T"] == m.depth and not short["at_equilibrium"] and short["max"] > EQUILIBRIUM_TOL
    m.T, m.tol = 400, 1e-6
    long = prediction_residual(m, x, batch_size=4)
    assert long["at_equilibrium"] and long["max"] < 1e-6 and long["mean"] <= long["max"] and long["steps"] < 400


# -- per-sample stopping --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("update", ["sync", "alternate"])
@pytest.mark.parametrize("solver", ["plain", "anderson"])
def test_with_tol_each_sample_stops_on_its_own_and_ignores_the_batch(update, solver):
    m = tiny(init_gain=1.5)
    x, y = data(B=6)
    betas = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        s, n = m.relax(x, 500, beta=betas, y=y, tol=1e-6, update=update, solver=solver)
        res, steps = m.last_residual.clone(), m.last_sample_steps.clone()
        assert n == int(steps.max()) < 500 and float(res.max()) < 1e-6 and len(set(steps.tolist())) > 1
        for b in range(6):  # the same image relaxed alone: the same steps, the same state (to conv rounding)
            sb, nb = m.relax(x[b:b + 1], 500, beta=betas[b:b + 1], y=y[b:b + 1], tol=1e-6, update=update,
                             solver=solver)
            assert nb == int(steps[b]) and abs(float(m.last_residual[0]) - float(res[b])) < 1e-12
            assert all(float((a[b:b + 1] - c).abs().max()) < 1e-13 for a, c in zip(s, sb))


def test_a_sample_stops_at_its_first_step_below_tol():
    # independent count: run a fixed number of plain steps and find each sample's first residual below tol
    m = tiny(init_gain=1.5)
    x, _ = data(B=5)
    tol, first = 1e-5, [None] * 5
    with torch.no_grad():
        s = m.zero_states(5, dtype=torch.float64)
        for t in range(1, 300):
            new, _ = m.relax(x, 1, states=s)
            r = relative_residual(new, s)
            for b in range(5):
                if first[b] is None and t >= m.min_steps() and float(r[b]) < tol:
                    first[b] = t
            s = new
        m.relax(x, 300, tol=tol)
    assert m.last_sample_steps.tolist() == first


def test_bptt_through_per_sample_stopping_is_the_gradient_of_each_image_alone():
    m = tiny(init_gain=1.5)
    m.T, m.tol = 300, 1e-5
    x, y = data(B=4)
    x = x.clone().requires_grad_(True)
    F.cross_entropy(m(x), y, reduction="sum").backward()
    assert len(set(m.last_sample_steps.tolist())) > 1  # the images really stopped at different steps
    for b in range(4):
        xb = x[b:b + 1].detach().clone().requires_grad_(True)
        F.cross_entropy(m(xb), y[b:b + 1], reduction="sum").backward()
        assert torch.allclose(xb.grad, x.grad[b:b + 1], rtol=1e-10, atol=1e-13)


# -- Anderson and warm starts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("update", ["sync", "alternate"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_anderson_reaches_the_plain_fixed_point_in_fewer_steps(update, beta):
    # gain 1.5: slower plain convergence (at 2.0 some images have several fixed points; see docs/ep.md)
    m = EPCNN.preset("ep-cnn-tiny", image_size=8, init_gain=1.5).double()
    x, y = data()
    with torch.no_grad():
        s_p, n_p = m.relax(x, 2000, beta=beta, y=y, tol=1e-10, update=update)
        work_p = int(m.last_sample_steps.sum())
        s_a, n_a = m.relax(x, 2000, beta=beta, y=y, tol=1e-10, update=update, solver="anderson")
        work_a = int(m.last_sample_steps.sum())
    # each sample stops on its own: the work is the sum of the samples' steps
    assert n_a <= n_p < 2000 and work_a < work_p
    for a, b in zip(s_a, s_p):
        assert float((a - b).abs().max()) < 1e-7
    # the fixed point really is one: one more plain step does not move it
    s_next, _ = m.relax(x, 1, beta=beta, y=y, states=s_a, update=update)
    assert max(float((a - b).abs().max()) for a, b in zip(s_next, s_a)) < 1e-8


def test_solver_is_part_of_the_spec_and_checked():
    m = EPCNN.preset("ep-cnn-tiny", solver="anderson", tol=1e-4)
    spec = m.spec
    assert spec["solver"] == "anderson" and spec["tol"] == 1e-4
    assert EPCNN.from_spec(spec).solver == "anderson"
    with pytest.raises(UsageError):
        EPCNN.preset("ep-cnn-tiny", solver="newton")
    with pytest.raises(UsageError):
        EPCNN.preset("ep-cnn-tiny", tol=-1)


def test_warm_start_reaches_the_cold_fixed_point_in_fewer_steps():
    m = tiny()
    x, y = data()
    cold, n_cold = m.relax(x, 1000, tol=1e-9)
    # a nearby start (as the last epoch's fixed point of the same image after a small weight change)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.02)
    old_fp, _ = m.relax(x, 1000, tol=1e-9)
    with torch.no_grad():
        for p in m.parameters():
            p.div_(1.02)
    warm, n_warm = m.relax(x, 1000, tol=1e-9, states=old_fp)
    assert n_warm < n_cold
    for a, b in zip(warm, cold):
        assert float((a - b).abs().max()) < 1e-7


def test_ep_train_step_with_warm_start_and_tolerance():
    m = tiny()
    x, y = data()
    out = m.ep_train_step(x, y, 500, 500, 0.5, tol=1e-6, tol_nudged=1e-6)
    assert out["residual_free"] < 1e-6 and out["residual_nudged"] < 1e-6
    assert out["residual_free_mean"] <= out["residual_free"]
    m.zero_grad()
    again = m.ep_train_step(x, y, 500, 500, 0.5, tol=1e-6, tol_nudged=1e-6, states=out["states"])
    assert again["steps"] < out["steps"] / 3  # starts at the fixed point: a step or two
    m.zero_grad()
    short = m.ep_train_step(x, y, 3, 2, 0.5)
    assert short["residual_free"] > 1e-3 and (short["steps"], short["steps_nudged"]) == (3, 2)


# -- the cancellation-free symmetric update ----------------------------------------------------------------------

def _autograd_update(m, x, sa, ba, sb, bb, y, denom):
    """Reference: autograd of the difference of the two Φ values (what the update was before)."""
    params = [p for g in m.layer_param_groups() for p in g]
    d = (m.phi(x, sa, ba, y) - m.phi(x, sb, bb, y)).mean() / denom
    return torch.autograd.grad(-d, params)


def _nudged_states(m, x, y, T1, T2, beta):
    B = x.shape[0]
    with torch.no_grad():
        s0, _ = m.relax(x, T1)
        betas = torch.tensor([beta] * B + [-beta] * B, dtype=x.dtype)
        s2, _ = m.relax(torch.cat([x, x]), T2, beta=betas, y=torch.cat([y, y]),
                        states=[torch.cat([t, t]) for t in s0])
    return [t[:B] for t in s2], [t[B:] for t in s2]


@pytest.mark.parametrize("kw", [dict(), dict(pools="aa"), dict(pools="mi", fc=[12]), dict(readout="mse", fc=[12])])
@pytest.mark.parametrize("rule", ["symmetric", "one-sided"])
def test_ep_update_equals_autograd_of_phi_difference_in_float64(kw, rule):
    m = tiny(**kw)
    x, y = data()
    sa, sb = _nudged_states(m, x, y, 30, 10, 0.5)
    if rule == "one-sided":
        with torch.no_grad():
            sb = m.relax(x, 30)[0]
        args = (0.5, sb, 0.0, y, 0.5)
    else:
        args = (0.5, sb, -0.5, y, 1.0)
    ref = _autograd_update(m, x, sa, *args)
    new = m.ep_update(x, sa, *args)
    assert len(new) == len(ref)
    for a, b in zip(new, ref):
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < 1e-10


def test_ep_update_in_fp32_matches_float64_on_the_paper_net():
    """The paper net at init, fp32: the update from state differences keeps cosine >= 0.999 with float64 on
    every layer; the old difference of two Φ gradients does not (b1), which is what this guards against."""
    m = EPCNN.preset("ep-cnn")
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    sa, sb = _nudged_states(m, x, y, 30, 10, 0.5)
    args = (0.5, sb, -0.5, y, 1.0)
    new = m.ep_update(x, sa, *args)
    old = _autograd_update(m, x, sa, *args)
    md = EPCNN.preset("ep-cnn").double()
    md.load_state_dict(m.state_dict())
    ref = _autograd_update(md, x.double(), [t.double() for t in sa], 0.5, [t.double() for t in sb], -0.5, y, 1.0)
    cos_new = [cos(a, r) for a, r in zip(new, ref)]
    cos_old = [cos(a, r) for a, r in zip(old, ref)]
    assert min(cos_new) >= 0.999, cos_new
    assert min(cos_old) < 0.999  # the cancellation is real at this size: the test can tell the two apart


# -- checkpoint selection ----------------------------------------------------------------------------------------

def test_validation_split_is_seeded_disjoint_and_complete():
    tr, va = validation_split(50, seed=3)
    tr2, va2 = validation_split(50, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2) and len(va) == 5
    assert sorted(tr.tolist() + va.tolist()) == list(range(50))
    assert not torch.equal(validation_split(50, seed=4)[1], va)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return load_dataset(None, cache_dir=tmp_path_factory.mktemp("cache"))


def test_fit_best_val_holds_out_and_records_residuals(cifar):
    tx, ty, _ = subset(cifar.train_x, cifar.train_y, 40, seed=0)
    vx, vy, _ = subset(cifar.test_x, cifar.test_y, 20, seed=0)
    ds = Dataset("small", cifar.classes, tx, ty, vx, vy)
    m = EPCNN.preset("ep-cnn-tiny")
    seen, warm = [], []
    orig = m.ep_train_step

    def spy(x, y, *a, **k):
        seen.append(len(y))
        warm.append(sum(float(t.abs().sum()) for t in k["states"]))
        return orig(x, y, *a, **k)

    m.ep_train_step = spy
    rec = resolve_recipe("demo-ep", {"epochs": 2, "batch_size": 12, "optimizer": {"lrs": None},
                                     "ep": {"T1": 4, "T2": 2, "warm_start": True}})
    hist = fit(m, ds, rec, select="best-val")
    assert sum(seen) == 2 * 36  # 4 of the 40 images held out, every epoch
    assert all(w == 0 for w in warm[:3]) and all(w > 0 for w in warm[3:])  # epoch 2 starts from the bank
    for h in hist:
        assert 0.0 <= h["val_acc"] <= 1.0 and h["val_acc"] * 4 == round(h["val_acc"] * 4)
        assert h["residual_free"] > 0 and h["residual_nudged"] > 0
        assert h["residual_free_mean"] <= h["residual_free"] and h["mean_steps"] == 4
    with pytest.raises(UsageError):
        fit(m, ds, rec, select="best-train")
    # a tolerance stop in the free phase: T1 becomes a cap
    m2 = EPCNN.preset("ep-cnn-tiny")
    rec2 = resolve_recipe("demo-ep", {"epochs": 1, "batch_size": 20, "optimizer": {"lrs": None},
                                      "ep": {"T1": 300, "T2": 3, "tol": 1e-2}})
    h = fit(m2, ds, rec2)[0]
    assert h["residual_free"] < 1e-2 and h["mean_steps"] < 300


def test_train_pipeline_selects_the_best_epoch_and_resumes_from_the_newest(tmp_path, mini):
    from conftest import write_imagefolder

    from epcli import api
    from epcli.store import Store
    folder = str(write_imagefolder(tmp_path / "data", mini, 4, 3))
    store = Store(tmp_path / "store")
    over = {"epochs": 4, "batch_size": 8, "optimizer": {"lrs": [0.4, 0.2, 0.1]}, "ep": {"T1": 6, "T2": 3}}
    res = api.train(model="ep-cnn-tiny", dataset=folder, store=store, device="cpu", overrides=over,
                    select="best-val")
    seen: dict = {}
    for r in store.db["metrics"].rows_where("run_id = ?", [res["run_id"]]):
        seen.setdefault(r["step"], {})[r["name"]] = r["value"]
    assert set(seen) == {1, 2, 3, 4} and all("val_acc" in m and "residual_free" in m for m in seen.values())
    best = max(seen, key=lambda e: (seen[e]["val_acc"], -e))  # the first epoch with the best val_acc
    run = store.get_run(res["run_id"])
    assert run["config"]["select"] == "best-val" and res["selected_epoch"] == best
    arts = {a["name"]: a for a in store.artifacts_of(res["run_id"], role="output", kind="checkpoint")}
    assert arts["final"]["meta"]["epoch"] == best and res["test_acc"] == pytest.approx(seen[best]["test_acc"])
    if best != 4:
        assert arts["last"]["meta"]["epoch"] == 4
    names = {r["name"] for r in store.db["metrics"].rows_where("run_id = ?", [res["run_id"]])}
    assert {"residual_free", "residual_nudged", "val_acc"} <= names
    more = api.train(model="ep-cnn-tiny", dataset=folder, store=store, device="cpu", resume=res["run_id"],
                     overrides={"epochs": 5})
    assert more["epochs"] == 5 and store.get_run(more["run_id"])["config"]["select"] == "best-val"
    with pytest.raises(UsageError):
        api.train(model="ep-cnn-tiny", dataset=folder, store=store, device="cpu", select="best")
    # attack and corrupt runs record how far from equilibrium the model's predictions were
    a = api.attack(model=res["run_id"], attack="pgd", norm="linf", eps="1/255", n=6, store=store, device="cpu",
                   checks=False)
    c = api.corrupt(model=res["run_id"], names=["fog"], severities=[1], n=6, store=store, device="cpu")
    from epcli import checkpoint
    from epcli.pipelines.common import resolve_model
    net, _ = checkpoint.load(resolve_model(store, res["run_id"])["path"])
    ds = load_dataset(folder, cache_dir=tmp_path / "cache")
    x = subset(ds.test_x, ds.test_y, 6, seed=0)[0].float() / 255
    with torch.no_grad():  # independent: the last step's change, per image and layer, relative to the state
        s19, s20 = net.relax(x, 19)[0], net.relax(x, 20)[0]
    want = max(float((a_[i] - b_[i]).norm() / a_[i].norm()) for a_, b_ in zip(s20, s19) for i in range(6))
    for rid in (a["run_id"], c["run_id"]):
        rows = [r for r in store.db["metrics"].rows_where("run_id = ? AND name = 'relax_residual'", [rid])]
        assert len(rows) == 1 and rows[0]["value"] == pytest.approx(want, rel=1e-4)
        detail = json.loads(rows[0]["detail"]) if isinstance(rows[0]["detail"], str) else rows[0]["detail"]
        assert detail["T"] == 20 and 0 <= detail["mean"] <= rows[0]["value"]
        assert detail["at_equilibrium"] == (rows[0]["value"] <= EQUILIBRIUM_TOL)


@pytest.mark.parametrize("solver", ["plain", "anderson"])
def test_tolerance_never_stops_before_a_nudge_reaches_every_layer(solver):
    m = EPCNN.preset("ep-cnn-small", image_size=8, channels=[4, 6, 8], kernels=[3, 3, 3], paddings=[1, 1, 1],
                     pools="iii", update="sync").double()
    x, y = data()
    with torch.no_grad():
        s0, _ = m.relax(x, 400, tol=1e-12)
        s, n = m.relax(x, 50, beta=0.5, y=y, states=s0, tol=10.0, solver=solver)  # any residual passes tol
    assert n == m.depth == 3
    assert float((s[0] - s0[0]).abs().max()) > 0  # the nudge reached the first layer


def test_an_adjoint_stopped_by_its_budget_is_recorded():
    from epcli.ep import new_implicit_stats
    m = tiny(init_gain=1.5)
    m.T, m.grad_mode = 60, "implicit"
    x, y = data()
    for iters, expect in ((None, 0), (1, 1)):  # the default budget converges; one iteration cannot
        m.implicit_iters, m.implicit_stats = iters, new_implicit_stats()
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(m(xr), y).backward()
        assert m.implicit_stats["calls"] == 1 and m.implicit_stats["adjoint_unconverged"] == expect
    from epcli.pipelines.attack import _implicit_check
    c = _implicit_check(m.implicit_stats, 60)
    assert not c["passed"] and "1 adjoint solves stopped by their iteration budget" in c["detail"]
