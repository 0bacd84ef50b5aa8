"""The Python API: resumable attacks, the unroll sweep, cross-run reliability checks, the demo pipeline."""
import pytest
from conftest import write_imagefolder

from epcli import api
from epcli.store import Store


@pytest.fixture(scope="module")
def folder(tmp_path_factory, mini):
    return str(write_imagefolder(tmp_path_factory.mktemp("api-data") / "small", mini, 40, 12))


@pytest.fixture(scope="module")
def store(tmp_path_factory, folder):
    s = Store(tmp_path_factory.mktemp("api-store"))
    s.cnn = api.train(model="cnn-small", dataset=folder, overrides={"epochs": 2}, store=s, device="cpu")
    s.ep = api.train(model="ep-cnn-tiny", dataset=folder, store=s, device="cpu",
                     overrides={"epochs": 1, "optimizer": {"lrs": [0.2, 0.1, 0.05]}})
    return s


def test_interrupted_attack_resumes_where_it_stopped(store, monkeypatch):
    import epcli.attacks as A
    real = A.evaluate
    calls, fail = [], [True]

    def flaky(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 2 and fail[0]:
            fail[0] = False
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(A, "evaluate", flaky)
    kw = dict(model=store.cnn["run_id"], eps="4/255,8/255", n=60, chunk=20, store=store, device="cpu",
              params={"steps": 3}, strength=False)
    with pytest.raises(KeyboardInterrupt):
        api.attack(**kw)
    assert store.runs(kind="attack", limit=1)[0]["status"] == "interrupted"
    calls.clear()
    resumed = api.attack(**kw)
    assert len(calls) == 2  # chunk 0 came from disk, chunks 1 and 2 were attacked
    monkeypatch.setattr(A, "evaluate", real)
    fresh = api.attack(**kw)  # the partial files were removed on success: a full recomputation
    assert fresh["robust_acc"] == resumed["robust_acc"] and fresh["clean_acc"] == resumed["clean_acc"]
    assert not list((store.root / "partial").rglob("*.safetensors"))


def test_unroll_sweep_is_stored_per_unroll(store):
    res = api.attack(model=store.ep["run_id"], eps="8/255", n=24, unroll_sweep=[2, 6], store=store,
                     device="cpu", params={"steps": 2}, strength=False)
    modes = {m["grad_mode"] for m in store.metrics(res["run_id"], name="robust_acc")}
    assert modes == {"bptt", "truncated:2", "truncated:6"}
    assert set(res["unroll_sweep"]) == {"truncated:2", "truncated:6"}
    assert [c["name"] for c in store.checks(res["run_id"])].count("unroll-sweep") == 1


def test_square_beating_a_weak_pgd_flags_the_pgd_run(store):
    weak = api.attack(model=store.cnn["run_id"], eps="8/255", n=60, store=store, device="cpu",
                      params={"steps": 1, "step_size": 1e-4}, strength=False)
    assert not weak["unreliable"]
    sq = api.attack(model=store.cnn["run_id"], attack="square", eps="8/255", n=60, store=store, device="cpu",
                    params={"n_queries": 300})
    assert sq["robust_acc"]["8/255"] < weak["robust_acc"]["8/255"]
    flagged = store.metrics(weak["run_id"], name="robust_acc")
    assert all(m["unreliable"] == 1 for m in flagged)
    assert any(c["name"] == "white-vs-black" and not c["passed"] for c in store.checks(weak["run_id"]))
    from epcli import report
    data = report.collect(store)
    assert "⚠" in report.render(data, "md")


def test_pgd_strength_check_is_stored(store):
    res = api.attack(model=store.cnn["run_id"], eps="2/255,8/255", n=60, store=store, device="cpu",
                     params={"steps": 5})
    names = [c["name"] for c in store.checks(res["run_id"])]
    assert "strength" in names and "monotone" in names


def test_demo_pipeline_records_everything(tmp_path, folder, monkeypatch):
    monkeypatch.setitem(api.DEMO, "dataset", folder)
    monkeypatch.setitem(api.DEMO, "overrides", {"epochs": 1})
    monkeypatch.setitem(api.DEMO, "n_attack", 20)
    monkeypatch.setitem(api.DEMO, "n_corrupt", 20)
    monkeypatch.setitem(api.DEMO, "corruptions", ["gaussian_noise", "fog", "contrast"])
    s = Store(tmp_path / "demo")
    res = api.demo(store=s, device="cpu")
    kinds = [r["kind"] for r in s.runs()]
    assert kinds.count("train") == 2 and kinds.count("attack") == 4 and kinds.count("corrupt") == 2
    assert {r["status"] for r in s.runs()} == {"finished"}
    assert len(res["data"].rows) == 2
    # the demo's EP-CNN is an equilibrium model: every evaluation recorded its residual at prediction, below tol
    import json

    from epcli.ep import EQUILIBRIUM_TOL
    ep_id = next(r["id"] for r in s.runs() if r["kind"] == "train" and r["model"] == "ep-cnn-small")
    evals = [r for r in s.runs() if r["model_run_id"] == ep_id and r["kind"] != "train"]
    assert len(evals) == 3
    for r in evals:
        (m,) = s.metrics(r["id"], name="relax_residual")
        detail = json.loads(m["detail"])
        assert 0 < m["value"] < EQUILIBRIUM_TOL and detail["at_equilibrium"] and detail["T"] == 250
        assert detail["steps_mean"] <= detail["steps"] < 250
        if r["kind"] == "attack":  # ... and so did every adversarial prediction
            assert detail["adv_at_equilibrium"] and detail["adv_predictions"] == 4 * 20
        else:  # ... and a sample of the corrupted images: the 20 images x 3 corruptions at severity 5
            assert detail["corrupted_at_equilibrium"] and detail["corrupted_checked"] == 3 * 20
            assert detail["corrupted_sample"] == "the first 20 images of each of 3 corruptions at severity 5"


def test_mcnemar_exact_values():
    assert api.mcnemar_p(0, 0) == 1.0
    assert api.mcnemar_p(5, 5) == 1.0
    assert api.mcnemar_p(0, 6) == pytest.approx(2 / 64)  # both tails of Binomial(6, 1/2)
    assert api.mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)


def test_paired_comparison_of_two_models(store):
    kw = dict(eps="2/255,8/255", n=48, store=store, device="cpu", params={"steps": 3}, strength=False)
    a = api.attack(model=store.cnn["run_id"], **kw)
    b = api.attack(model=store.ep["run_id"], **kw)
    res = api.compare(store=store, run_a=a["run_id"], run_b=b["run_id"])
    assert [r["eps_label"] for r in res["rows"]] == ["2/255", "8/255"]
    for r in res["rows"]:
        assert r["n"] == 48 and r["both"] + r["only_a"] == round(r["acc_a"] * 48)
        assert r["acc_a"] == pytest.approx(a["robust_acc"][r["eps_label"]])
        assert r["acc_b"] == pytest.approx(b["robust_acc"][r["eps_label"]])
    assert res["grad_mode_a"] == res["grad_mode_b"] == "bptt" and res["dataset"] == a_dataset(store, a)
    from epcli.errors import UsageError
    with pytest.raises(UsageError):
        api.compare(store=store, run_a=a["run_id"], run_b=store.cnn["run_id"])
    # an eps means nothing across norms: L2 0.5 is no L-inf 0.5
    c = api.attack(model=store.ep["run_id"], **{**kw, "eps": "0.5", "n": 8}, norm="l2")
    d = api.attack(model=store.cnn["run_id"], **{**kw, "eps": "0.5", "n": 8})
    with pytest.raises(UsageError, match="different norms"):
        api.compare(store=store, run_a=c["run_id"], run_b=d["run_id"])


def a_dataset(store, res):
    return store.get_run(res["run_id"])["dataset"]


def test_diverged_training_is_failed_and_keeps_the_last_good_checkpoint(store, folder, monkeypatch):
    import epcli.train as T
    from epcli.errors import Diverged
    real_fit = T.fit

    def fit_then_diverge(model, dataset, recipe, **kw):
        real_fit(model, dataset, {**recipe, "epochs": 1}, **kw)  # one good epoch, checkpointed
        raise Diverged("loss became NaN at epoch 2")
    monkeypatch.setattr(T, "fit", fit_then_diverge)
    with pytest.raises(Diverged):
        api.train(model="cnn-small", dataset=folder, overrides={"epochs": 3}, store=store, device="cpu")
    run = store.runs(kind="train", limit=1)[0]
    assert run["status"] == "failed" and "NaN" in run["error"]
    ck = store.artifacts_of(run["id"], role="output", kind="checkpoint")
    assert len(ck) == 1 and ck[0]["meta"]["epoch"] == 1 and store.artifact_path(ck[0]["sha256"]).exists()
    monkeypatch.setattr(T, "fit", real_fit)
    resumed = api.train(model="cnn-small", dataset=folder, resume=run["id"], store=store, device="cpu",
                        overrides={"epochs": 2})
    assert store.get_run(resumed["run_id"])["status"] == "finished" and resumed["epochs"] == 2


def test_resume_without_dataset_uses_the_checkpoints_dataset(tmp_path, folder):
    """--resume RUN alone continues on the folder the run was trained on (not the embedded default set)."""
    store = Store(tmp_path / "store")
    first = api.train(model="cnn-small", dataset=folder, store=store, device="cpu", overrides={"epochs": 1})
    more = api.train(model="cnn-small", resume=first["run_id"], store=store, device="cpu", overrides={"epochs": 2})
    assert more["dataset"] == first["dataset"] and more["epochs"] == 2
    cfg = store.get_run(more["run_id"])["config"]
    assert cfg["dataset_sha256"] == store.get_run(first["run_id"])["config"]["dataset_sha256"]


def test_training_records_the_size_of_the_test_split(store, folder):
    """test_acc is logged with its n (the whole test split): the report's clean column states it."""
    from epcli.data import load_dataset
    n = len(load_dataset(folder).test_y)
    rows = store.metrics(store.cnn["run_id"], name="test_acc")
    assert len(rows) == 2 and {m["n_examples"] for m in rows} == {n}


def test_bench_ties_measures_the_relaxation_against_a_baseline(store, capsys):
    """bench/bench_ties.py (docs/attacks.md's numbers) runs on stored models and reports what it says."""
    import importlib.util
    import json
    import math
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_ties", Path(__file__).parents[1] / "bench" / "bench_ties.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--store", str(store.root), "--model", store.ep["run_id"], "--baseline", store.cnn["run_id"],
                     "--n", "16", "--steps", "10", "--image", "3", "--noise", "1e-7"]) == 0
    noise, jump = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert noise["n"] == 16 and 0 <= noise["changed"] <= 16 and noise["baseline"]["max_logit_change"] < 1e-3
    assert jump["steps"] == 10 and len(jump["state_change_after_10_steps"]) == 2  # ep-cnn-tiny: two conv layers
    assert set(jump["difference_quotients"]) == {"0.0001", "1e-06", "1e-08"} and math.isfinite(jump["autograd_slope"])
    assert jump["pixel_range"][0] >= 0 and jump["pixel_range"][1] <= 255 and jump["dataset"] == noise["dataset"]


def test_white_vs_black_pairs_runs_of_one_classifier(store):
    """The cross-run check sets ART's Square (black box) against a stored PGD only on the same classifier: an
    EP-CNN relaxed for other steps (--T) predicts otherwise, so those runs are not paired."""
    kw = dict(model=store.ep["run_id"], eps="8/255", n=12, store=store, device="cpu")
    pgd = api.attack(**kw, T=6, params={"steps": 1}, strength=False)
    other_T = api.attack(**kw, T=9, attack="art-square", params={"n_queries": 2})
    same_T = api.attack(**kw, T=6, attack="art-square", params={"n_queries": 2})
    paired = lambda r: [c["detail"] for c in r["checks"] if c["check"] == "white-vs-black"  # noqa: E731
                        and pgd["run_id"] in c["detail"]]
    assert paired(other_T) == [] and len(paired(same_T)) == 1
    # nor on another test set: the same indices name other images
    kw = dict(model=store.cnn["run_id"], eps="8/255", n=12, store=store, device="cpu")
    mini = api.attack(**kw, dataset="cifar10-mini", params={"steps": 1}, strength=False)
    sq = api.attack(**kw, attack="art-square", params={"n_queries": 2})
    assert not any(mini["run_id"] in c["detail"] for c in sq["checks"]), sq["checks"]
