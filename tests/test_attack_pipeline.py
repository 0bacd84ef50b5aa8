"""`epcli attack` flags end to end on stored models: --protocol paper, --select first, --targeted, unroll sweeps
past T, the implicit fixed-point check, labels recorded per example."""
import json

import pytest
from conftest import write_imagefolder
from safetensors.torch import load_file
from typer.testing import CliRunner

from epcli import api
from epcli.cli import app
from epcli.errors import UsageError
from epcli.store import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory, mini):
    folder = str(write_imagefolder(tmp_path_factory.mktemp("atk-data") / "small", mini, 30, 10))
    s = Store(tmp_path_factory.mktemp("atk-store"))
    s.cnn = api.train(model="cnn-small", dataset=folder, overrides={"epochs": 1}, store=s, device="cpu")
    s.ep = api.train(model="ep-cnn-tiny", dataset=folder, store=s, device="cpu",
                     overrides={"epochs": 1, "optimizer": {"lrs": [0.2, 0.1, 0.05]}})
    return s


def _outcome(store, run_id):
    (art,) = store.artifacts_of(run_id, role="output", kind="per-example")
    return load_file(str(store.artifact_path(art["sha256"])))


def test_paper_protocol_on_an_ep_cnn(store):
    res = api.attack(model=store.ep["run_id"], protocol="paper", eps="8/255", n=12, T=20, store=store,
                     device="cpu", strength=False)
    assert res["protocol"] == "paper" and res["labels"] == "predicted" and res["select"] == "first"
    assert res["grad_mode"] == "truncated:70" and res["T"] == 20  # an explicit --T wins over the paper's 250
    run = store.get_run(res["run_id"])
    p = run["config"]["params"]
    assert (p["clip"], p["random_start"], p["steps"], p["restarts"], p["step_size"]) == (False, False, 20, 1, None)
    t = _outcome(store, res["run_id"])
    # the first 12 test images: these files are sorted by class (10 per class), so one of each class in turn
    assert t["index"].tolist() == [0, 1, 10, 11, 20, 30, 40, 50, 60, 70, 80, 90]
    assert sorted(t["label"].tolist()) == [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert run["config"]["first_order"] == "class-interleaved"
    assert "attack_label" in t  # the labels the attack used: the clean predictions
    with pytest.raises(UsageError, match="covers the attacks the paper ran: pgd, square and autoattack"):
        api.attack(model=store.ep["run_id"], protocol="paper", attack="apgd-ce", n=4, store=store, device="cpu")
    with pytest.raises(UsageError, match="fixes these settings"):
        api.attack(model=store.cnn["run_id"], protocol="paper", params={"steps": 5}, n=4, store=store, device="cpu")


def test_paper_protocol_square_is_arts_on_the_first_images_in_one_batch(store):
    """-a square --protocol paper runs ART's Square (art-square) with the paper's settings: the model's own
    predictions, the first images, batches of 200, 1000 iterations on the softmax; explicit clashes refused."""
    res = api.attack(model=store.cnn["run_id"], attack="square", protocol="paper", eps="8/255", n=8, store=store,
                     device="cpu")
    assert res["attack"] == "art-square" and res["labels"] == "predicted" and res["select"] == "first"
    cfg = store.get_run(res["run_id"])["config"]
    assert cfg["batch_size"] == 200 and cfg["attack"] == "art-square"
    assert {k: cfg["params"][k] for k in ("max_iter", "scores", "restarts", "p_init")} == \
        {"max_iter": 1000, "scores": "softmax", "restarts": 1, "p_init": 0.8}
    t = _outcome(store, res["run_id"])
    assert t["index"].tolist() == [0, 10, 20, 30, 40, 50, 60, 70]  # the first image of 8 classes
    # predicted labels: robust counts misclassified images moved onto their true label; the run says how many
    (robust,) = [v.bool() for k, v in t.items() if k.startswith("robust_")]
    wrong = ~t["clean_correct"].bool()
    assert wrong.any()  # the small model gets some of the first 8 wrong: the split is tested
    assert res["robust_from_clean_errors"] == {"8/255": pytest.approx(float((robust & wrong).float().mean()))}
    assert res["robust_acc"]["8/255"] == pytest.approx(float(robust.float().mean()))
    (m,) = store.metrics(res["run_id"], name="robust_acc")  # the report reads it from the metric's detail
    d = json.loads(m["detail"]) if isinstance(m["detail"], str) else m["detail"]
    assert d["from_clean_errors"] == pytest.approx(float((robust & wrong).float().mean()))
    shown = CliRunner().invoke(app, ["--store", str(store.root), "show", res["run_id"], "--json"])
    (r,) = json.loads(shown.stdout)["run"]["result"]["results"]
    assert r["from_clean_errors"] == pytest.approx(res["robust_from_clean_errors"]["8/255"], abs=1e-4)
    text = CliRunner().invoke(app, ["--store", str(store.root), "show", res["run_id"]], env={"COLUMNS": "200"})
    assert "predicted labels, incl." in text.output and "clean errors" in text.output
    # ART's count: per iteration a prediction on every image, then the loss before and after on those still
    # robust (the paper's "about 3004 calls per batch")
    assert 1000 * 8 < res["attack_forward_passes"] <= 3 * 1001 * 8
    for kw, why in [({"batch_size": 50}, "--batch-size 50"),
                    ({"params": {"n_queries": 10}}, r"--queries 10 \(max_iter\)"),
                    ({"labels": "true"}, "--labels true")]:
        with pytest.raises(UsageError, match=f"fixes these settings; drop {why}"):
            api.attack(model=store.cnn["run_id"], attack="square", protocol="paper", n=4, store=store, device="cpu",
                       **kw)
    with pytest.raises(UsageError, match="art-square is untargeted"):
        api.attack(model=store.cnn["run_id"], attack="art-square", targeted=True, n=4, store=store, device="cpu")
    # outside the paper protocol, --queries is ART's max_iter
    res = api.attack(model=store.cnn["run_id"], attack="art-square", eps="8/255", n=4, store=store, device="cpu",
                     params={"n_queries": 5})
    assert res["params"]["max_iter"] == 5 and "n_queries" not in res["params"]


def test_paper_protocol_autoattack_is_arts_with_arts_defaults(store):
    """-a autoattack --protocol paper runs ART's ensemble (art-autoattack) with ART's defaults, as the paper
    did; outside the protocol the CLI's budget flags reach ART's members under their names."""
    from epcli.pipelines.attack import _check_attack  # the settings only: ART's full budgets take minutes
    attack, labels, select, p, n, batch_size = _check_attack("autoattack", "linf", None, None, {}, None, False,
                                                             "paper")
    assert (attack, labels, select, n, batch_size) == ("art-autoattack", "predicted", "first", 200, 200)
    assert (p["eps_step"], p["apgd_iter"], p["restarts"], p["deepfool_iter"], p["square_iter"],
            p["square_restarts"], p["batch_size"], p["nb_grads"]) == (0.1, 100, 5, 100, 5000, 5, 200, 10)
    # named as the user gave it (--steps), with the ART parameter it set
    with pytest.raises(UsageError, match=r"fixes these settings; drop --steps 5 \(apgd_iter\)"):
        api.attack(model=store.cnn["run_id"], attack="autoattack", protocol="paper", n=4, store=store,
                   device="cpu", params={"steps": 5})
    res = api.attack(model=store.cnn["run_id"], attack="art-autoattack", eps="8/255", n=6, store=store,
                     device="cpu", params={"steps": 3, "restarts": 1, "n_queries": 4})
    assert (res["params"]["apgd_iter"], res["params"]["restarts"], res["params"]["square_iter"]) == (3, 1, 4)
    assert set(res["members"]["8/255"]) == {"apgd-ce", "apgd-dlr", "deepfool", "square"}  # true labels: per member


def test_unroll_sweep_past_T_raises_T_and_says_so(store):
    res = api.attack(model=store.ep["run_id"], eps="8/255", n=8, T=6, unroll_sweep=[3, 6, 9], store=store,
                     device="cpu", params={"steps": 2}, strength=False)
    assert set(res["unroll_sweep"]) == {"truncated:3", "truncated:6", "truncated:9"}
    assert res["unroll_sweep_T"] == {"truncated:9": 9}
    assert any("truncated:9" in n and "T = K" in n for n in res["notes"])
    Ts = {m["grad_mode"]: json.loads(m["detail"])["T"] if isinstance(m["detail"], str) else m["detail"]["T"]
          for m in store.metrics(res["run_id"], name="robust_acc")}
    assert Ts == {"bptt": 6, "truncated:3": 6, "truncated:6": 6, "truncated:9": 9}
    # K = T is the exact gradient: the same outcome as bptt
    assert res["unroll_sweep"]["truncated:6"] == res["robust_acc"]


def test_targeted_from_the_cli(store):
    r = CliRunner().invoke(app, ["--store", str(store.root), "attack", "-m", store.cnn["run_id"], "--targeted",
                                 "--eps", "8/255", "--n", "20", "--steps", "5", "--no-strength-check", "--json",
                                 "--device", "cpu"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["targeted"] and [h["eps_label"] for h in out["target_hit"]] == ["8/255"]
    from epcli.schema import SCHEMAS
    import jsonschema
    jsonschema.validate(out, SCHEMAS["attack"])
    r = CliRunner().invoke(app, ["--store", str(store.root), "attack", "-m", store.cnn["run_id"], "-a", "apgd-t",
                                 "--targeted", "--n", "4", "--device", "cpu"])
    assert r.exit_code == 2 and "picks its own target" in r.output


def test_implicit_fixed_point_check_is_recorded(store):
    res = api.attack(model=store.ep["run_id"], eps="8/255", n=6, T=2, grad_mode="implicit", store=store, labels="predicted",
                     device="cpu", params={"steps": 2}, strength=False)
    (c,) = [c for c in res["checks"] if c["check"] == "implicit-fixed-point"]
    assert "relative residual" in c["detail"] and "relaxed up to" in c["detail"]


def test_adversarial_predictions_record_how_far_from_equilibrium_they_were(store):
    kw = dict(model=store.ep["run_id"], eps="2/255,8/255", n=8, store=store, device="cpu", labels="predicted",
              params={"steps": 2}, strength=False)
    for T, at_equilibrium in ((3, False), (400, True)):  # 3 steps: far from a fixed point; 400: there
        res = api.attack(T=T, **kw)
        (m,) = store.metrics(res["run_id"], name="relax_residual")
        d = json.loads(m["detail"])
        assert d["adv_predictions"] == 16 and d["adv_at_equilibrium"] is at_equilibrium  # 8 images x 2 eps
        assert (d["adv_unconverged"] > 0) is (not at_equilibrium) and d["adv_max"] >= d["adv_mean"] > 0


def test_corrupted_predictions_record_how_far_from_equilibrium_they_were(store):
    for T, at_equilibrium in ((3, False), (400, True)):
        res = api.corrupt(model=store.ep["run_id"], names=["fog", "contrast"], severities=[2, 4], n=10, T=T,
                          store=store, device="cpu")
        (m,) = store.metrics(res["run_id"], name="relax_residual")
        d = json.loads(m["detail"])
        assert d["corrupted_checked"] == 2 * 10 and d["corrupted_at_equilibrium"] is at_equilibrium
        assert d["corrupted_sample"] == "the first 10 images of each of 2 corruptions at severity 4"
        assert (d["corrupted_unconverged"] > 0) is (not at_equilibrium)


def test_chunks_from_an_older_epcli_merge_without_the_groups_they_lack():
    """Resuming an attack interrupted under an older epcli: its chunk files lack newer per-example groups
    (member_robust); the merge keeps the groups every chunk has instead of failing at the end of the run."""
    import torch

    from epcli.pipelines.attack import _merge_chunks
    e = 0.5
    old = {"clean_correct": torch.tensor([True, False]), "robust": {e: torch.tensor([True, False])}}
    new = {"clean_correct": torch.tensor([True]), "robust": {e: torch.tensor([False])},
           "member_robust": {e: torch.tensor([[True, True, False, False]])}}
    for parts, robust in (([old, new], [True, False, False]), ([new, old], [False, True, False])):
        out = _merge_chunks(parts)
        assert "member_robust" not in out and out["robust"][e].tolist() == robust and out["n"] == 3
    both = _merge_chunks([new, new])
    assert both["member_robust"][e].shape == (2, 4)


def test_report_shows_autoattack_member_by_member(store):
    """The report carries an ensemble cell's robust accuracy after each member, matched to its eps: the last
    member equals the cell (computed from the per-example robust mask), members never rise, and each export says
    it (terminal footnote, md list, csv column, html sub-line, json field)."""
    import csv
    import io

    from epcli import report
    res = api.attack(model=store.cnn["run_id"], attack="autoattack", eps="1/255,8/255", n=16, store=store,
                     device="cpu", params={"steps": 3, "n_queries": 8})
    data = report.collect(store, runs=[store.cnn["run_id"]])
    (row,) = data.rows
    for label, key in (("1/255", "autoattack:linf:1/255"), ("8/255", "autoattack:linf:8/255")):
        cell = row.cells[key]
        assert [m for m, _ in cell.members] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert [v for _, v in cell.members] == pytest.approx([100 * res["members"][label][m]
                                                              for m in ("apgd-ce", "apgd-t", "fab-t", "square")])
        values = [v for _, v in cell.members]
        assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(cell.value)
    assert row.cells["autoattack:linf:1/255"].members != row.cells["autoattack:linf:8/255"].members
    after = ", ".join(f"{n} {100 * res['members']['8/255'][m]:.2f}" for n, m in
                      (("APGD-CE", "apgd-ce"), ("APGD-T", "apgd-t"), ("FAB-T", "fab-t"), ("Square", "square")))
    line = f"AutoAttack L∞ 8/255, robust % after each member in turn (n=16): {after}"
    assert line in report.render(data, "md")
    assert line in " ".join(report.render(data, "table").split())
    (r,) = csv.DictReader(io.StringIO(report.render(data, "csv")))
    assert r["autoattack:linf:8/255:members"] == ";".join(f"{m}={v!r}" for m, v in
                                                         row.cells["autoattack:linf:8/255"].members)
    assert "after APGD-CE" in report.render(data, "html")
    doc = json.loads(report.render(data, "json"))
    assert doc["rows"][0]["cells"]["autoattack:linf:8/255"]["members"][-1][0] == "square"
    # the `report --json` document (docs/cli.md's schema) carries them too, as fractions
    import jsonschema

    from epcli import schema
    out = schema.report({"data": data})
    jsonschema.validate(out, schema.SCHEMAS["report"])
    (res8,) = [c for c in out["rows"][0]["results"] if c["attack"] == "autoattack" and c["eps_label"] == "8/255"]
    assert [m["robust_acc"] for m in res8["members"]] == pytest.approx(
        [res["members"]["8/255"][m] for m in ("apgd-ce", "apgd-t", "fab-t", "square")])
    assert res8["labels"] == "true" and res8["from_clean_errors"] is None
    assert res8["ci95"][0] <= res8["robust_acc"] <= res8["ci95"][1] and res8["ci95"][1] - res8["ci95"][0] > 0.2
    # a non-ensemble cell carries none
    assert all(c.members is None for k, c in row.cells.items()
               if k.split(":")[0] not in ("autoattack", "art-autoattack", "worst"))


def test_paper_protocol_square_takes_the_papers_second_budget():
    """The paper ran ART's Square L2 also at 20,000 iterations: --protocol paper takes --queries 20000 (ART's
    max_iter) under L2, and refuses it under L∞ and any other budget."""
    from epcli.pipelines.attack import _check_attack
    attack, labels, select, p, n, batch = _check_attack("square", "l2", None, None, {"n_queries": 20000}, None,
                                                        False, "paper")
    assert (attack, labels, select, p["max_iter"], p["restarts"], n, batch) == \
        ("art-square", "predicted", "first", 20000, 1, 200, 200)
    assert _check_attack("square", "l2", None, None, {}, None, False, "paper")[3]["max_iter"] == 1000
    # ART's Square named directly: --queries is its max_iter as well, under the same rules
    assert _check_attack("art-square", "l2", None, None, {"n_queries": 20000}, None, False, "paper")[3] == p
    with pytest.raises(UsageError, match=r"only under L2; drop --queries 20000 \(max_iter\)"):
        _check_attack("art-square", "linf", None, None, {"n_queries": 20000}, None, False, "paper")
    with pytest.raises(UsageError, match=r"only under L2; drop --queries 20000 \(max_iter\)"):
        _check_attack("square", "linf", None, None, {"n_queries": 20000}, None, False, "paper")
    with pytest.raises(UsageError, match=r"fixes these settings; drop --queries 5000 \(max_iter\)"):
        _check_attack("square", "l2", None, None, {"n_queries": 5000}, None, False, "paper")


def test_report_draws_the_perturbation_spectrum_of_real_attacks(store, tmp_path):
    """Real L2 PGD runs (predicted labels: every image attacked) on the CNN and the EP-CNN: the report's spectrum of each kept perturbation set sums to
    1 over its rings, counts the images the attack changed, and is drawn as perturbation-spectrum.png/svg."""
    import numpy as np
    from safetensors.numpy import load_file

    from epcli import report
    runs = [api.attack(model=m["run_id"], norm="l2", eps="0.25,0.5", n=8, store=store, device="cpu",
                       labels="predicted", params={"steps": 3}, strength=False) for m in (store.cnn, store.ep)]
    data = report.collect(store, runs=[store.cnn["run_id"], store.ep["run_id"]])
    found = report.spectra(data, {r.run_id: r.name for r in data.rows})
    for res in runs:
        mine = {s["eps"]: s for s in found if s["norm"] == "l2" and s["run_id"] == res["model_run_id"]}
        assert set(mine) == {0.25, 0.5}
        (art,) = store.artifacts_of(res["run_id"], role="output", kind="adversarial-examples")
        t = load_file(str(store.artifact_path(art["sha256"])))
        for eps, s in mine.items():
            changed = int((np.abs(t[f"x_adv_{eps!r}"] - t["x"]).reshape(len(t["x"]), -1).max(axis=1) > 0).sum())
            assert s["n"] == changed > 0 and s["fraction"].sum() == pytest.approx(1.0)
            assert 0 < s["low"] < 1
    paths = report.figures(data, tmp_path / "fig", only=["spectrum"])
    assert {p.name for p in paths} == {"perturbation-spectrum.png", "perturbation-spectrum.svg"}
    svg = (tmp_path / "fig" / "perturbation-spectrum.svg").read_text()
    assert "Perturbation spectrum, L2" in svg and "cycles per image" in svg


@pytest.mark.parametrize("eps", [0.0001, 1 / 255, 0.031, 8 / 255, 0.5, 3.0, 0.123456789, 1 / 3, 1.23456789e-5])
def test_report_finds_each_eps_members_under_the_attack_pipelines_label(eps):
    """The summary keys members by pipelines.common.eps_label (k/255 or %g, six digits); the report matches them
    to the metric's exact eps, each eps to its own members, however many digits it has."""
    from epcli.pipelines.common import eps_label as run_label
    from epcli.report.reader import _members
    others = [e for e in (0.0001, 1 / 255, 0.031, 8 / 255, 0.5, 3.0, 0.123456789, 1 / 3, 1.23456789e-5) if e != eps]
    summary = {"members": {run_label(e): {"apgd-ce": 0.5, "square": round(e, 12) % 1} for e in [eps, *others]}}
    run = {"config": {"attack": "autoattack"}, "summary": json.dumps(summary)}
    assert _members(run, eps) == [["apgd-ce", 50.0], ["square", 100.0 * (round(eps, 12) % 1)]]
    assert _members(run, 0.25) is None  # an eps the run did not attack
