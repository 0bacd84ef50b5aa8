"""Reports over a real store: leaderboard numbers equal the store's, every format parses, figures and HTML."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from epcli import paper, report, schema
from epcli.errors import EpcliError, NotFoundError, UsageError
from epcli.report.image_grids import _load_adv_entry
from epcli.report.reader import _pick_adversarial
from epcli.report.tables import _rich_text
from epcli.store import Store

EPS_LINF = [1 / 255, 2 / 255, 8 / 255]
EPS_L2 = [0.25, 0.5, 1.0]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CORRS = ["gaussian_noise", "fog", "frost"]


def _train(store: Store, model: str, config: dict, accs: list[float], status: str = "finished",
           dataset: str = "cifar10-mini", seed: int = 0) -> tuple[str, str]:
    rid = store.start_run("train", {"model": model, **config}, model=model, dataset=dataset, seed=seed)
    store.log_metrics(rid, [{"name": "test_acc", "value": a, "step": i + 1, "dataset": dataset, "n_examples": 1000}
                            for i, a in enumerate(accs)])  # as the train pipeline logs it: the whole test split
    store.log_metrics(rid, [{"name": "train_loss", "value": 1.0 / (i + 1), "step": i + 1} for i in range(len(accs))])
    sha = store.write_artifact(rid, "checkpoint", lambda p: p.write_bytes(f"ckpt {rid}".encode()),
                               suffix=".safetensors")
    if status != "running":
        store.finish_run(rid, status, summary={"test_acc": accs[-1], "epochs": len(accs)})
    return rid, sha


def _attack(store: Store, model_run: str, ckpt: str, model: str, attack: str, norm: str, results: dict,
            grad_mode: str | None = None, n: int = 100, unreliable: dict | None = None,
            config: dict | None = None, status: str = "finished", dataset: str = "cifar10-mini",
            detail: dict | None = None) -> str:
    cfg = {"attack": attack, "norm": norm, "eps": list(results), **({"grad_mode": grad_mode} if grad_mode else {}),
           **(config or {})}
    rid = store.start_run("attack", cfg, model=model, dataset=dataset, model_run_id=model_run)
    store.link(rid, ckpt, "input", "checkpoint")
    rows = [{"name": "clean_acc", "value": 0.8, "attack": attack, "norm": norm, "n_examples": n,
             "grad_mode": grad_mode}]
    for eps, acc in results.items():
        bad = (unreliable or {}).get(eps)
        rows.append({"name": "robust_acc", "value": acc, "attack": attack, "norm": norm, "eps": eps,
                     "grad_mode": grad_mode, "n_examples": n, "unreliable": bool(bad),
                     "detail": {**({"reason": bad, "forward_passes": 250} if bad else {"steps": 20}),
                                **(detail or {})}})
    store.log_metrics(rid, rows)
    if status != "running":
        store.finish_run(rid, status, summary={"robust_acc": min(results.values())})
    return rid


def _corrupt(store: Store, model_run: str, ckpt: str, model: str, base: float, corrs=CORRS,
             dataset: str = "cifar10-mini", n: int = 100) -> str:
    rid = store.start_run("corrupt", {"corruptions": list(corrs)}, model=model, dataset=dataset,
                          model_run_id=model_run)
    store.link(rid, ckpt, "input", "checkpoint")
    rows = [{"name": "clean_acc", "value": base, "n_examples": n}]
    for i, c in enumerate(corrs):
        for s in range(1, 6):
            rows.append({"name": "corruption_acc", "value": base - 0.05 * s - 0.01 * (i % 3), "corruption": c,
                         "severity": s, "n_examples": n})
    rows += [{"name": "corruption_mean_acc", "value": base - 0.16, "n_examples": n},
             {"name": "corruption_mean_acc_all", "value": base - 0.16},
             {"name": "mce_unnormalized", "value": 1 - (base - 0.15)}]
    store.log_metrics(rid, rows)
    store.write_artifact(rid, "corruption-grid", lambda p: p.write_bytes(b"\x89PNG fake"), suffix=".png")
    store.finish_run(rid, summary={"corruption_mean_acc": base - 0.15})
    return rid


def _adv_artifact(store: Store, attack_run: str, eps: list[float], seed: int, index=(10, 11),
                  labels=(6, 1), pred_clean=(6, 1), robust: dict | None = None) -> str:
    """attack.py's two artifacts: per-example outcomes (test indices, robust flags) and the first images."""
    rng = np.random.default_rng(seed)
    k = len(index)
    x = rng.random((k, 3, 32, 32), dtype=np.float32)
    tensors = {"x": x, "labels": np.array(labels, dtype=np.int64), "pred_clean": np.array(pred_clean, dtype=np.int64)}
    outcome = {"index": np.array(index, dtype=np.int64), "label": np.array(labels, dtype=np.int64),
               "clean_correct": (np.array(pred_clean) == np.array(labels)).astype(np.uint8)}
    for i, e in enumerate(eps):
        tensors[f"x_adv_{e!r}"] = np.clip(x + rng.normal(0, 0.02 * (i + 1), x.shape).astype(np.float32), 0, 1)
        pred = np.array(labels, dtype=np.int64) if i == 0 else (np.array(labels, dtype=np.int64) + 3) % 10
        tensors[f"pred_{e!r}"] = pred
        r = (robust or {}).get(e)
        outcome[f"robust_{e!r}"] = (np.array(r, dtype=np.uint8) if r is not None else
                                    ((pred == np.array(labels)) & (outcome["clean_correct"] == 1)).astype(np.uint8))
    meta = {"eps": json.dumps(eps), "classes": json.dumps(CLASSES)}
    store.write_artifact(attack_run, "per-example", lambda p: save_file(outcome, str(p)), suffix=".safetensors")
    return store.write_artifact(attack_run, "adversarial-examples",
                                lambda p: save_file(tensors, str(p), metadata=meta), suffix=".safetensors",
                                meta={"eps": eps, "classes": CLASSES})


def build_store(root: Path) -> tuple[Store, dict]:
    """A small but complete store: 4 finished models + 1 still training, attacks, corruptions, artifacts."""
    store = Store(root)
    ids = {}
    ep, ep_ck = _train(store, "ep-cnn", {"label": "EP-CNN", "recipe": "ep-mini", "epochs": 3, "T": 250},
                       [0.6, 0.7, 0.75])
    store.log_metrics(ep, [{"name": "accuracy_vs_steps", "value": v, "detail": {"T": t}}
                           for t, v in [(5, 0.2), (10, 0.5), (30, 0.72), (100, 0.75)]])
    cnn, cnn_ck = _train(store, "cnn", {"recipe": "cnn-mini", "epochs": 5}, [0.7, 0.8])
    at, at_ck = _train(store, "cnn", {"label": "CNN (AT L2 ε=0.5)", "adv": {"norm": "l2", "eps": 0.5}},
                       [0.6, 0.65])
    vit, vit_ck = _train(store, "vit", {"label": "ViT"}, [0.5, 0.55])
    run, _ = _train(store, "ep-cnn", {"label": "EP-CNN (long)"}, [0.3], status="running")
    ids.update(ep=ep, cnn=cnn, at=at, vit=vit, running=run)

    # EP: PGD with two gradient modes (the leaderboard takes the worst case), an unroll sweep, AA (unreliable)
    a1 = _attack(store, ep, ep_ck, "ep-cnn", "pgd", "linf", dict(zip(EPS_LINF, [0.6, 0.5, 0.20])),
                 grad_mode="bptt", config={"labels": "predicted"})
    _attack(store, ep, ep_ck, "ep-cnn", "pgd", "linf", dict(zip(EPS_LINF, [0.62, 0.45, 0.25])),
            grad_mode="truncated:70")
    _attack(store, ep, ep_ck, "ep-cnn", "pgd", "l2", dict(zip(EPS_L2, [0.6, 0.4, 0.2])), grad_mode="bptt")
    for k, acc in [(10, 0.55), (30, 0.45), (70, 0.42)]:
        _attack(store, ep, ep_ck, "ep-cnn", "pgd", "l2", {0.5: acc}, grad_mode=f"truncated:{k}")
    ids["ep_aa"] = _attack(store, ep, ep_ck, "ep-cnn", "autoattack", "linf", {8 / 255: 0.15}, grad_mode="bptt",
                           unreliable={8 / 255: "square beat the white-box attacks"})
    _attack(store, ep, ep_ck, "ep-cnn", "square", "linf", {8 / 255: 0.45}, n=50)
    _adv_artifact(store, a1, EPS_LINF, 0)
    ids["ep_running_attack"] = _attack(store, ep, ep_ck, "ep-cnn", "fgsm", "linf", {8 / 255: 0.3},
                                       status="running")
    # baselines
    a2 = _attack(store, cnn, cnn_ck, "cnn", "pgd", "linf", dict(zip(EPS_LINF, [0.5, 0.3, 0.05])))
    _attack(store, cnn, cnn_ck, "cnn", "autoattack", "linf", {8 / 255: 0.03})
    _adv_artifact(store, a2, EPS_LINF, 1)
    _attack(store, at, at_ck, "cnn", "pgd", "linf", dict(zip(EPS_LINF, [0.6, 0.55, 0.3])))
    _attack(store, at, at_ck, "cnn", "pgd", "l2", dict(zip(EPS_L2, [0.6, 0.55, 0.4])))
    _attack(store, vit, vit_ck, "vit", "pgd", "linf", dict(zip(EPS_LINF, [0.4, 0.2, 0.1])))
    ids["ep_corrupt"] = _corrupt(store, ep, ep_ck, "ep-cnn", 0.75)
    _corrupt(store, at, at_ck, "cnn", 0.65)
    return store, ids


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    store, ids = build_store(tmp_path_factory.mktemp("store") / "s")
    yield store, ids
    store.close()


def _expected(store: Store, model_run: str, attack: str, norm: str, eps: float) -> float:
    """The cell policy without per-example data: the results on the most images, the strongest of them."""
    rows = list(store.db.query(
        "SELECT m.value, m.n_examples FROM metrics m JOIN runs r ON r.id = m.run_id WHERE r.model_run_id = ? "
        "AND m.name = 'robust_acc' AND m.attack = ? AND m.norm = ? AND ABS(m.eps - ?) < 1e-9 "
        "AND r.status IN ('finished', 'running')", [model_run, attack, norm, eps]))
    n_max = max(r["n_examples"] for r in rows)
    return min(r["value"] for r in rows if r["n_examples"] == n_max) * 100


# --- collect and the tabular formats --------------------------------------------------------------------------

def test_collect_numbers_equal_store(built):
    store, ids = built
    data = report.collect(store)
    rows = {r.run_id: r for r in data.rows}
    assert set(rows) == {ids["ep"], ids["cnn"], ids["at"], ids["vit"], ids["running"]}
    assert rows[ids["running"]].status == "running"
    assert rows[ids["ep"]].clean_acc == pytest.approx(75.0)  # the last epoch's test_acc
    assert data.scale == "fraction"
    n_checked = 0
    for row in data.rows:
        for key, cell in row.cells.items():
            col = next(c for c in data.columns if c.key == key)
            assert cell.value == pytest.approx(_expected(store, row.run_id, col.attack, col.norm, col.eps))
            n_checked += 1
    assert n_checked >= 15
    ep = rows[ids["ep"]]
    cell = ep.cells["pgd:linf:8/255"]
    assert cell.value == pytest.approx(20.0) and cell.grad_mode == "bptt" and cell.n_results == 1
    assert ep.cells["pgd:l2:0.5"].value == pytest.approx(40.0)   # worst case over bptt and the sweep
    aa = ep.cells["autoattack:linf:8/255"]
    assert aa.unreliable and "square beat" in aa.reason and aa.forward_passes == 250
    assert aa.attack_clean == pytest.approx(80.0)  # the clean accuracy on the images AutoAttack attacked
    assert ep.cells["fgsm:linf:8/255"].status == "running"
    # 3 of the 15 benchmark corruptions were run: the mean says so, and the 15/19-means and mCE do not exist
    assert ep.corruption["mean"] == pytest.approx(59.0) and ep.corruption["mce"] is None
    assert ep.corruption["mean_label"] == "mean of 3/15 benchmark corruptions × 5 severities"
    assert ep.corruption["mean_all"] is None and ep.corruption["mean18"] is None
    assert {c.key for c in data.headline_columns()} >= {"pgd:linf:8/255", "pgd:l2:0.5", "autoattack:linf:8/255"}
    assert any("still running" in n for n in data.notes)
    # unroll sweep and steps
    assert sorted({u["K"] for u in data.unroll}) == [10, 30, 70]
    assert sorted(s["T"] for s in data.steps) == [5, 10, 30, 100]


def test_selection(built):
    store, ids = built
    assert [r.run_id for r in report.collect(store, models=["vit"]).rows] == [ids["vit"]]
    assert {r.run_id for r in report.collect(store, models=["cnn"]).rows} == {ids["cnn"], ids["at"]}
    assert [r.run_id for r in report.collect(store, models=["CNN (AT L2 ε=0.5)"]).rows] == [ids["at"]]
    # an attack run id selects the model it evaluated; prefixes work
    assert [r.run_id for r in report.collect(store, runs=[ids["ep_aa"]]).rows] == [ids["ep"]]
    assert [r.run_id for r in report.collect(store, runs=[ids["vit"][:14]]).rows] == [ids["vit"]]
    with pytest.raises(NotFoundError, match="cifar100"):
        report.collect(store, dataset="cifar100")


def test_errors_are_messages(tmp_path, built):
    store, _ = built
    empty = Store(tmp_path / "empty")
    with pytest.raises(NotFoundError, match="no training runs yet"):
        report.collect(empty)
    with pytest.raises(NotFoundError, match=r"no training run of model 'resnet99'.*models there: cnn, ep-cnn, vit"):
        report.collect(store, models=["resnet99"])
    with pytest.raises(NotFoundError, match="no run"):
        report.collect(store, runs=["zzzzzzzzzzzz"])
    with pytest.raises(UsageError):
        report.render(report.collect(store), "xlsx")
    for exc in (NotFoundError, UsageError):
        assert issubclass(exc, EpcliError)


def test_csv_json_md_equal_store(built):
    store, ids = built
    data = report.collect(store)
    expect = {(r.run_id, k): c for r in data.rows for k, c in r.cells.items()}

    rows = list(csv.DictReader(io.StringIO(report.render(data, "csv"))))
    assert len(rows) == len(data.rows)
    seen = 0
    for line in rows:
        for col in data.columns:
            if line[col.key]:
                cell = expect[(line["run_id"], col.key)]
                assert float(line[col.key]) == pytest.approx(
                    _expected(store, line["run_id"], col.attack, col.norm, col.eps))
                assert line[f"{col.key}:unreliable"] == str(int(cell.unreliable))
                assert line[f"{col.key}:grad_mode"] == (cell.grad_mode or "")
                assert int(line[f"{col.key}:n"]) == cell.n_examples
                seen += 1
    assert seen == len(expect)
    ep_line = next(line for line in rows if line["run_id"] == ids["ep"])
    assert float(ep_line["clean_acc"]) == pytest.approx(75.0)
    assert ep_line["autoattack:linf:8/255:unreliable"] == "1"

    doc = json.loads(report.render(data, "json"))
    assert doc["unit"] == "percent"
    for r in doc["rows"]:
        for key, c in r["cells"].items():
            col = next(x for x in data.columns if x.key == key)
            assert c["value"] == pytest.approx(_expected(store, r["run_id"], col.attack, col.norm, col.eps))
    assert next(r for r in doc["rows"] if r["run_id"] == ids["ep"])["unreliable"] is True

    md = report.render(data, "md")
    head = [l for l in md.splitlines() if l.startswith("| model")][0]
    titles = [t.strip() for t in head.strip("|").split("|")]
    body = [l for l in md.splitlines() if l.startswith("| ") and f"`{ids['ep'][:10]}`" in l][0]
    cells = [t.strip() for t in body.strip("|").split("|")]
    for col in data.headline_columns():
        text = cells[titles.index(col.label)]
        if text == "—":
            continue
        value = float(re.match(r"([\d.]+)", text).group(1))
        assert value == pytest.approx(_expected(store, ids["ep"], col.attack, col.norm, col.eps), abs=0.005)
        assert "n=" in text
    assert "75.00" in body
    assert "⚠" in cells[titles.index("AutoAttack L∞ 8/255")]
    assert "square beat the white-box attacks" in md
    assert "running" in md


def test_table_render(built):
    store, ids = built
    data = report.collect(store)
    text = report.render(data, "table")
    assert "EP-CNN" in text and "⚠" in text and "running" in text and "bptt" in text
    from rich.table import Table
    assert isinstance(report.leaderboard_table(data, "all"), Table)


# Field names and value types of real RobustBench entries (RobustBench/robustbench, model_info/cifar10/...):
# Linf/Standard.json, Linf/Wang2023Better_WRN-70-16.json, Linf/Xiao2020Enhancing.json (external, unreliable),
# corruptions/Hendrycks2020AugMixWRN.json. Values are not copied, only which fields exist and their JSON types.
RB_LINF = {"link": str, "name": str, "authors": str, "additional_data": bool, "number_forward_passes": int,
           "dataset": str, "venue": str, "architecture": str, "eps": str, "clean_acc": str, "reported": str,
           "autoattack_acc": str}
RB_LINF_OPTIONAL = {"footnote": str, "unreliable": bool, "external": str}
RB_CORRUPTIONS = {"link": str, "name": str, "authors": str, "additional_data": bool, "number_forward_passes": int,
                  "dataset": str, "venue": str, "architecture": str, "eps": type(None), "clean_acc": str,
                  "reported": str, "corruptions_acc": str}


def _valid_robustbench(rel: str, rec: dict) -> None:
    dataset, threat, fname = rel.split("/")
    assert dataset in ("cifar10", "cifar100", "imagenet") and fname.endswith(".json")
    assert re.fullmatch(r"[A-Za-z0-9_\-]+\.json", fname), fname
    want = RB_CORRUPTIONS if threat == "corruptions" else RB_LINF
    assert threat in ("Linf", "L2", "corruptions")
    assert set(want) <= set(rec) <= set(want) | set(RB_LINF_OPTIONAL), set(rec) ^ set(want)
    for k, v in rec.items():
        assert isinstance(v, {**want, **RB_LINF_OPTIONAL}[k]), (k, v)
    assert rec["dataset"] == dataset
    for k in ("clean_acc", "autoattack_acc", "corruptions_acc", "external"):
        if k in rec:
            assert re.fullmatch(r"\d{1,3}\.\d{2}", rec[k]), (k, rec[k])


def test_robustbench_files(built, tmp_path):
    store, ids = built
    data = report.collect(store)
    files = report.robustbench_json(data)
    by = {rel.split("/")[-1]: (rel, rec) for rel, rec in files.items()}
    ep_rel, ep = by[f"{report.robustbench_id(next(r for r in data.rows if r.run_id == ids['ep']))}.json"]
    assert ep_rel.startswith("cifar10/Linf/") and ids["ep"] in ep_rel
    assert {rel.split("/")[1] for rel in files} == {"Linf"}  # no complete corruption run, no L2 AutoAttack
    assert len(files) == 2                                   # the EP-CNN and the CNN have AutoAttack at 8/255
    for rel, rec in files.items():
        _valid_robustbench(rel, rec)
    assert ep["eps"] == "8/255" and ep["dataset"] == "cifar10"
    assert ep["autoattack_acc"] == "15.00"
    assert ep["clean_acc"] == "80.00"          # on the images AutoAttack attacked, not the training run's 75.00
    assert ep["number_forward_passes"] == 250  # relaxation steps per prediction (config T), not the attack's cost
    assert ep["unreliable"] is True and "optimization loop" in ep["footnote"] and "mini CIFAR-10" in ep["footnote"]
    assert ep["reported"] == ""                # the paper's full-scale number is not comparable to this run
    cnn = next(rec for rel, rec in files.items() if ids["cnn"] in rel)
    assert cnn["number_forward_passes"] == 1 and cnn["unreliable"] is False and cnn["clean_acc"] == "80.00"
    assert ep["link"] == report.PAPER_LINK and "Mansingh" in ep["authors"]  # the paper's architecture, ep-cnn
    written = report.write_robustbench(data, tmp_path / "rb")
    assert sorted(str(p.relative_to(tmp_path / "rb")) for p in written) == sorted(files)
    for p in written:
        assert json.loads(p.read_text()) == files[str(p.relative_to(tmp_path / "rb"))]
    assert json.loads(report.render(data, "robustbench")) == files


def test_robustbench_nothing_qualifies(tmp_path):
    store = Store(tmp_path / "s")
    rid, ck = _train(store, "cnn", {}, [0.5])
    _attack(store, rid, ck, "cnn", "autoattack", "linf", {4 / 255: 0.2})  # not RobustBench's eps
    with pytest.raises(NotFoundError, match="nothing to export for RobustBench.*cnn: no AutoAttack result at L∞ 8/255"):
        report.robustbench_json(report.collect(store))
    # ART's ensemble at RobustBench's eps is not RobustBench's AutoAttack: the message says why it does not count
    _attack(store, rid, ck, "cnn", "art-autoattack", "linf", {8 / 255: 0.1})
    with pytest.raises(NotFoundError, match=r"cnn: no AutoAttack result at L∞ 8/255 or L2 0.5 \(AutoAttack \(ART\) "
                                            r"is ART's ensemble, not RobustBench's standard one: -a autoattack\)"):
        report.robustbench_json(report.collect(store))
    store.close()


# --- the paper -----------------------------------------------------------------------------------------------------

def test_paper_lookups():
    f = paper.paper_value("ep-cnn", dataset="cifar10", attack="pgd", norm="linf", eps=8 / 255)
    assert f["value"] == 11.96 and f["n_examples"] == 10000 and f["grad_mode"] == "truncated:70"
    assert paper.paper_value("cnn-at-l2-0.5", dataset="cifar10-mini", attack="square", norm="linf",
                             eps=0.031373)["value"] == 49.6
    assert paper.paper_value("ep-cnn", dataset="cifar10", attack="pgd", norm="l2", eps=0.5) is None  # 0.486 != 0.5
    assert paper.paper_value("ep-cnn", attack="pgd", norm="l2", eps=0.4862)["value"] == 44.03
    sweep = paper.paper_values("ep-cnn", metric="robust_acc", variant="unroll-sweep", eps=1.0)
    assert {f["grad_mode"] for f in sweep} == {f"truncated:{t}" for t in (10, 15, 20, 25, 29, 60, 70)}
    assert paper.paper_value("ep-cnn", metric="clean_acc")["value"] == 88.11
    assert paper.paper_value("ep-cnn", dataset="cifar100", metric="clean_acc")["value"] == 64.05
    assert paper.paper_value("ep-cnn", metric="corruption_mean_acc")["value"] == 76.11
    assert paper.paper_value("vit", attack="pgd", norm="l2", eps=0.486219)["value"] == 31.63
    assert paper.paper_value("ep-cnn", metric="accuracy_vs_steps", T=30)["value"] == 87.3
    assert paper.paper_value("ep-cnn", dataset="imagenet", metric="clean_acc") is None


def test_paper_key_for():
    assert paper.paper_key_for({"model": "ep-cnn", "config": {}}) == "ep-cnn"
    assert paper.paper_key_for({"model": "cnn", "config": json.dumps({"model": "cnn"})}) == "cnn"
    assert paper.paper_key_for({"model": "cnn", "config": {"adv": {"norm": "l2", "eps": 0.5}}}) == "cnn-at-l2-0.5"
    assert paper.paper_key_for({"model": "cnn", "config": {"adv": {"norm": "l2", "eps": 1.0}}}) == "cnn-at-l2-1"
    assert paper.paper_key_for({"model": "cnn", "config": {"adv": {"norm": "linf", "eps": 0.03}}}) is None
    assert paper.paper_key_for({"model": "vit", "config": {}}) == "vit"
    assert paper.paper_key_for({"model": "resnet18", "config": {}}) is None


def test_paper_asset_matches_fact_sheet():
    sheet = Path("/work/shared/reference/paper-facts.md")
    if not sheet.exists():
        pytest.skip("fact sheet not available")
    assert paper.build_facts(sheet.read_text())["facts"] == [
        {**{k: None for k in ("attack", "norm", "eps", "std", "n_seeds", "n_examples", "grad_mode", "corruption",
                              "severity", "T", "variant", "section", "protocol", "note")}, **f}
        for f in paper.load_facts()["facts"]]


def test_comparisons_need_comparable_models(built):
    """The fixture's models were trained on the mini set: no paper number, and the reason is stated."""
    store, ids = built
    data = report.collect(store)
    assert data.comparisons and all(c.paper is None and c.diff is None for c in data.comparisons)
    comp = {(c.run_id, c.what): c for c in data.comparisons}
    assert "data cifar10-mini" in comp[(ids["ep"], "PGD L∞ 8/255")].not_compared
    ep = next(r for r in data.rows if r.run_id == ids["ep"])
    assert ep.cells["pgd:linf:8/255"].paper is None and "cifar10-mini" in ep.cells["pgd:linf:8/255"].not_compared
    md = report.render(data, "md")
    assert "not compared with the paper (data cifar10-mini" in md and "11.96" not in md


def _full_corrupt(store, rid, ck, model, base, dataset="cifar10"):
    return _corrupt(store, rid, ck, model, base, corrs=report.BENCHMARK_CORRUPTIONS + report.EXTRA_CORRUPTIONS,
                    dataset=dataset)


def test_comparability_rule(tmp_path):
    """A paper number stands beside epcli's only for the paper's model, on the paper's data, at the paper's
    threat, with enough images and the paper's gradient; otherwise the reason is given and no diff."""
    store = Store(tmp_path / "s")
    ep, ck = _train(store, "ep-cnn", {"label": "EP full", "T": 250}, [0.85, 0.87], dataset="cifar10")
    _attack(store, ep, ck, "ep-cnn", "pgd", "linf", {8 / 255: 0.10}, grad_mode="truncated:70", n=10000,
            dataset="cifar10")
    ep_b, ck_b = _train(store, "ep-cnn", {"label": "EP full", "T": 250}, [0.86], dataset="cifar10", seed=1)
    _attack(store, ep_b, ck_b, "ep-cnn", "pgd", "linf", {8 / 255: 0.07}, grad_mode="bptt", n=10000,
            dataset="cifar10")
    ep_c, ck_c = _train(store, "ep-cnn", {"label": "EP full", "T": 250}, [0.86], dataset="cifar10", seed=2)
    _attack(store, ep_c, ck_c, "ep-cnn", "pgd", "linf", {8 / 255: 0.09}, grad_mode="truncated:70", n=200,
            dataset="cifar10")
    _full_corrupt(store, ep, ck, "ep-cnn", 0.85)
    small, ck2 = _train(store, "ep-cnn-small", {"label": "EP small", "recipe": "demo-ep"}, [0.45], dataset="cifar10")
    _attack(store, small, ck2, "ep-cnn-small", "pgd", "linf", {8 / 255: 0.05}, grad_mode="truncated:70", n=10000,
            dataset="cifar10")
    narrow, ck4 = _train(store, "ep-cnn", {"label": "EP narrow", "spec": {"name": "ep-cnn", "channels": [64, 128]}},
                         [0.8], dataset="cifar10")
    # Square and AutoAttack: the paper ran ART's algorithms; only epcli's ports of them stand beside its numbers
    paper_cfg = {"labels": "predicted", "select": "first", "batch_size": 200, "protocol": "paper"}
    _attack(store, ep, ck, "ep-cnn", "square", "linf", {8 / 255: 0.30}, n=200, dataset="cifar10",
            config={**paper_cfg, "params": {"n_queries": 5000}})
    _attack(store, ep, ck, "ep-cnn", "art-square", "linf", {8 / 255: 0.45}, n=200, dataset="cifar10",
            config={**paper_cfg, "params": {"max_iter": 1000, "scores": "softmax", "restarts": 1}},
            detail={"labels": "predicted", "from_clean_errors": 0.035})
    _attack(store, ep_b, ck_b, "ep-cnn", "art-square", "linf", {8 / 255: 0.40}, n=200, dataset="cifar10",
            config={**paper_cfg, "batch_size": 50, "select": "random",
                    "params": {"max_iter": 300, "scores": "logits", "restarts": 1}})
    _attack(store, ep_c, ck_c, "ep-cnn", "art-square", "l2", {1.0: 0.40}, n=200, dataset="cifar10",
            config={**paper_cfg, "first_order": "class-interleaved",
                    "params": {"max_iter": 1000, "scores": "softmax", "restarts": 1}})
    # a --protocol paper PGD does not clip: no clipping difference is listed beside it
    _attack(store, ep_c, ck_c, "ep-cnn", "pgd", "l2", {0.486219: 0.40}, grad_mode="truncated:70", n=10000,
            dataset="cifar10", config={**paper_cfg, "params": {"clip": False}})
    data = report.collect(store)
    comp = {(c.run_id, c.what): c for c in data.comparisons}
    fra31 = comp[(ep, "Square L∞ 8/255")]
    assert fra31.paper is None and "a different algorithm from the paper's ART square" in fra31.not_compared
    art = comp[(ep, "Square (ART) L∞ 8/255")]
    assert art.not_compared is None and art.paper == 47.12 and art.diff == pytest.approx(45.0 - 47.12)
    assert not any(r.startswith(("Square", "batch", "images")) for r in art.reasons), art.reasons
    # predicted labels: the part of the number that is images misclassified clean is said beside it
    assert any(r.startswith("of which 3.50 points: images misclassified clean") for r in art.reasons), art.reasons
    assert "predicted labels, incl. 3.50 clean errors" in report.render(data, "md")  # in the cell itself too
    off = comp[(ep_b, "Square (ART) L∞ 8/255")].reasons
    assert "Square: 300 iterations, paper 1000" in off and "Square: margin of the logits, paper of the softmax" in off
    assert any(r.startswith("batch: 50, paper 200") for r in off)
    assert "images: a random subset, paper the first 200 test images" in off
    interleaved = comp[(ep_c, "Square (ART) L2 1")].reasons
    assert any(r.startswith("images: the first of each class in turn") for r in interleaved), interleaved
    (unclipped,) = [c for (r, w), c in comp.items() if r == ep_c and w.startswith("PGD L2")]
    assert unclipped.not_compared is None and not any("clip" in r for r in unclipped.reasons), unclipped.reasons
    assert any("clip" in r for r in comp[(ep, "PGD L∞ 8/255")].reasons)
    assert "channels 64-128" in comp[(narrow, "clean")].not_compared
    ok = comp[(ep, "PGD L∞ 8/255")]
    assert ok.not_compared is None and ok.paper == 11.96 and ok.diff == pytest.approx(10.0 - 11.96)
    assert comp[(ep, "clean")].paper == 88.11 and comp[(ep, "clean")].diff == pytest.approx(87.0 - 88.11)
    grad = comp[(ep_b, "PGD L∞ 8/255")]
    assert grad.paper is None and grad.diff is None and "gradient bptt" in grad.not_compared
    few = comp[(ep_c, "PGD L∞ 8/255")]
    assert few.paper is None and "n=200" in few.not_compared
    demo = comp[(small, "PGD L∞ 8/255")]
    assert demo.paper is None and "demo model ep-cnn-small" in demo.not_compared
    # the corruption mean: the paper's is over 18 corruptions (no frost) x 5 severities; epcli's 18-mean exactly
    corr = next(c for c in data.comparisons if c.run_id == ep and c.what.startswith("CIFAR-C"))
    cells = [r["value"] for r in store.db.query(
        "SELECT m.value FROM metrics m JOIN runs r ON r.id = m.run_id WHERE r.model_run_id = ? AND "
        "m.name = 'corruption_acc' AND m.corruption != 'frost'", [ep])]
    assert len(cells) == 18 * 5
    assert corr.not_compared is None and corr.paper == 76.11
    assert corr.epcli == pytest.approx(100 * sum(cells) / len(cells))
    row = next(r for r in data.rows if r.run_id == ep)
    assert row.corruption["mean_label"] == "mean of 15/15 benchmark corruptions × 5 severities"
    assert row.corruption["mean_all"] is not None and row.corruption["mce"] is not None
    md = report.render(data, "md")
    assert "| EP full · seed 0 | PGD L∞ 8/255 | 10.00 | 9.43–10.60 (n=10,000) | 11.96 ± 0.55 | -1.96 |" in md
    (corr_line,) = [ln for ln in md.splitlines() if ln.startswith("| EP full · seed 0 | CIFAR-C mean")]
    assert corr_line.split(" | ")[3] == "—"  # a mean over corruptions is no one proportion: no interval
    assert "EP small: not compared with the paper (demo model ep-cnn-small" in md
    page = report.html_report(data, [])
    assert "paper 11.96 (-1.96)" in page and "paper 11.96" not in page.split("EP small")[1].split("</tr>")[0]
    # a complete corruption run on RobustBench's data is exported as a corruptions entry
    files = report.robustbench_json(data)
    rel = next(r for r in files if r.startswith("cifar10/corruptions/"))
    _valid_robustbench(rel, files[rel])
    assert float(files[rel]["corruptions_acc"]) == pytest.approx(row.corruption["mean"], abs=0.005)
    store.close()


def test_cell_policy(tmp_path):
    """Largest n first (ties: the strongest); the worst case only over results on the same images, exact per
    image from the per-example outcomes; failed and interrupted runs are never used; repeated runs named."""
    store = Store(tmp_path / "s")
    m1, ck = _train(store, "cnn", {"label": "CNN"}, [0.8], seed=1)
    m2, _ = _train(store, "cnn", {"label": "CNN"}, [0.7], seed=2)
    dead, _ = _train(store, "cnn", {"label": "CNN"}, [0.1], status="interrupted", seed=3)
    e = 8 / 255
    a = np.array([1, 1, 0, 1], dtype=bool)
    c = np.array([1, 0, 1, 1], dtype=bool)
    ra = _attack(store, m1, ck, "cnn", "pgd", "linf", {e: a.mean()}, grad_mode="bptt", n=4)
    _adv_artifact(store, ra, [e], 0, index=(3, 5, 7, 9), labels=(1, 2, 3, 4), pred_clean=(1, 2, 3, 4),
                  robust={e: a})
    rc = _attack(store, m1, ck, "cnn", "pgd", "linf", {e: c.mean()}, grad_mode="bptt", n=4, config={"seed": 0})
    _adv_artifact(store, rc, [e], 1, index=(3, 5, 7, 9), labels=(1, 2, 3, 4), pred_clean=(1, 2, 3, 4),
                  robust={e: c})
    rd = _attack(store, m1, ck, "cnn", "pgd", "linf", {e: 0.8}, grad_mode="bptt", n=4)     # other images, weaker
    _adv_artifact(store, rd, [e], 2, index=(0, 1, 2, 4), labels=(1, 2, 3, 4), pred_clean=(1, 2, 3, 4),
                  robust={e: np.array([1, 1, 1, 0], dtype=bool)})
    sq = np.array([1, 1, 1, 0], dtype=bool)
    rs = _attack(store, m1, ck, "cnn", "square", "linf", {e: sq.mean()}, n=4)                # same images
    _adv_artifact(store, rs, [e], 3, index=(3, 5, 7, 9), labels=(1, 2, 3, 4), pred_clean=(1, 2, 3, 4),
                  robust={e: sq})
    tiny = _attack(store, m1, ck, "cnn", "pgd", "linf", {e: 0.0}, n=2)                   # a tiny run
    _attack(store, m1, ck, "cnn", "pgd", "linf", {e: 0.0}, n=1000, status="interrupted")  # never used
    _attack(store, m1, ck, "cnn", "pgd", "linf", {e: 0.0}, n=1000, status="failed")
    data = report.collect(store)
    assert {r.run_id for r in data.rows} == {m1, m2}           # the interrupted training run is not a row
    assert dead not in {r.run_id for r in data.rows}
    names = {r.run_id: r.name for r in data.rows}
    assert names == {m1: "CNN · seed 1", m2: "CNN · seed 2"}
    cell = next(r for r in data.rows if r.run_id == m1).cells["pgd:linf:8/255"]
    assert cell.n_examples == 4 and cell.n_results == 2
    assert cell.value == pytest.approx(100 * np.logical_and(a, c).mean())  # 50.0, lower than either run
    assert {w.split()[0] for w in cell.worst_of} == {ra, rc}
    assert "n=4" in report.render(data, "md") and "CNN · seed 2" in report.render(data, "md")
    # the results the value is not exact over are named, lowest first; a lower one is shown beside the table
    assert [(r["run_id"], r["n_examples"], r["value"], r["why"]) for r in cell.left_out] == [
        (tiny, 2, 0.0, "no per-image outcomes"), (rd, 4, pytest.approx(80.0), "other images")]
    md = report.render(data, "md")
    assert f"PGD L∞ 8/255, lower results not in the cell: 0.00 (n=2, no per-image outcomes, run {tiny[:10]})" in md
    assert "80.00 (n=4" not in md  # a higher result on other images does not put the value in doubt
    assert "lower results not in the cell: 0.00" in report.render(data, "table")
    assert "lower, not in the cell: 0.00 (n=2, no per-image outcomes)" in report.render(data, "html")
    js = schema.report({"data": data, "run_id": None, "files": []})
    row = next(r for r in js["rows"] if r["run_id"] == m1)
    res = next(r for r in row["results"] if r["attack"] == "pgd" and r["eps_label"] == "8/255")
    assert [(r["attack_run_id"], r["robust_acc"], r["why"]) for r in res["left_out"]] == [
        (tiny, 0.0, "no per-image outcomes"), (rd, pytest.approx(0.8), "other images")]
    # the worst case over attacks (PGD x2 and Square on the same four images), exact per image
    worst = next(r for r in data.rows if r.run_id == m1).cells["worst:linf:8/255"]
    assert worst.value == pytest.approx(100 * (a & c & sq).mean()) and worst.n_results == 3
    assert "worst of PGD+Square" in report.render(data, "md")
    assert "worst:linf:8/255" not in next(r for r in data.rows if r.run_id == m2).cells
    store.close()


def test_worst_case_over_nested_image_sets(tmp_path):
    """PGD on 8 images, Square on 4 of them, AutoAttack on 2 of those (seeded subsets nest): the worst case is
    exact on the images every joined result attacked, preferring more attacks, then more images."""
    store = Store(tmp_path / "s")
    m, ck = _train(store, "cnn", {"label": "CNN"}, [0.8])
    e = 8 / 255
    idx = tuple(range(20, 28))
    pgd = np.array([1, 1, 1, 0, 1, 1, 0, 1], dtype=bool)
    sq = np.array([1, 0, 1, 1], dtype=bool)     # on idx[:4]
    aa = np.array([0, 1], dtype=bool)           # on idx[:2]

    def run(attack, flags, index):
        rid = _attack(store, m, ck, "cnn", attack, "linf", {e: flags.mean()}, n=len(index),
                      grad_mode=None if attack == "square" else "bptt")
        _adv_artifact(store, rid, [e], len(index), index=index, labels=(1,) * len(index),
                      pred_clean=(1,) * len(index), robust={e: flags})
        return rid

    r_pgd, r_sq = run("pgd", pgd, idx), run("square", sq, idx[:4])
    worst = next(r for r in report.collect(store).rows if r.run_id == m).cells["worst:linf:8/255"]
    assert worst.n_examples == 4 and worst.value == pytest.approx(100 * (pgd[:4] & sq).mean())  # 50.0
    assert {w.split()[0] for w in worst.worst_of} == {r_pgd, r_sq} and worst.run_id == r_sq
    r_aa = run("autoattack", aa, idx[:2])
    worst = next(r for r in report.collect(store).rows if r.run_id == m).cells["worst:linf:8/255"]
    assert worst.n_examples == 2 and worst.value == pytest.approx(100 * (pgd[:2] & sq[:2] & aa).mean())  # 0.0
    assert {w.split()[0] for w in worst.worst_of} == {r_pgd, r_sq, r_aa} and worst.n_results == 3
    assert worst.ci95 == report.wilson95(0.0, 2)
    # an attack on images no other result covers joins nothing
    run("fgsm", np.array([0, 0], dtype=bool), (90, 91))
    again = next(r for r in report.collect(store).rows if r.run_id == m).cells["worst:linf:8/255"]
    assert again.value == worst.value and len(again.worst_of) == 3
    store.close()


def test_corruption_labels_and_names():
    from epcli import corruptions
    assert report.BENCHMARK_CORRUPTIONS == tuple(corruptions.BENCHMARK_CORRUPTIONS)
    assert report.EXTRA_CORRUPTIONS == tuple(corruptions.EXTRA_CORRUPTIONS)
    cov = report.corruption_coverage({"gaussian_noise": {1}, "fog": {1}, "saturate": {1, 2}})
    assert not cov["complete15"] and not cov["complete19"]
    assert report.corruption_mean_label(cov) == "mean of 2/15 benchmark corruptions × severity 1"
    full = {c: set(range(1, 6)) for c in report.BENCHMARK_CORRUPTIONS}
    cov = report.corruption_coverage(full)
    assert cov["complete15"] and not cov["complete19"] and not cov["complete18"]
    assert report.corruption_mean_label(cov) == "mean of 15/15 benchmark corruptions × 5 severities"


# --- figures and HTML ------------------------------------------------------------------------------------------------

class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "xlink:href") and v is not None:
                self.refs.append(v)


def test_figures_and_html(built, tmp_path):
    store, ids = built
    data = report.collect(store)
    paths = report.figures(data, tmp_path / "fig")
    names = {p.name for p in paths}
    assert "robust-autoattack-linf.png" not in {p.name for p in paths}  # one eps only: no curve to draw
    for stem in ("robust-pgd-linf", "robust-pgd-l2", "corruptions", "steps", "unroll",
                 "adversarial-examples"):
        assert f"{stem}.png" in names and f"{stem}.svg" in names, stem
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report.html_report(data, paths)
    out = tmp_path / "report.html"
    out.write_text(page)
    parser = _Refs()
    parser.feed(page)
    parser.close()
    assert "svg" in parser.tags and "img" in parser.tags and "table" in parser.tags
    for ref in parser.refs:  # everything inlined: data URIs or in-page anchors only
        assert ref.startswith(("data:", "#")), ref[:80]
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert 'class="num unreliable"' in page and "square beat the white-box attacks" in page
    # the mini-set models are not the paper's: no paper number or diff anywhere on the page, the reason instead
    assert "The paper beside the results" in page and "11.96" not in page and 'id="paper"' not in page
    assert "not compared with the paper (data cifar10-mini" in page
    # the svg ids of different figures do not collide
    ids_ = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids_) == len(set(ids_))


def test_figures_skip_absent_data(tmp_path):
    store = Store(tmp_path / "s")
    rid, ck = _train(store, "cnn", {}, [0.5])
    assert report.figures(report.collect(store), tmp_path / "f0") == []  # no results at all: nothing to draw
    _attack(store, rid, ck, "cnn", "pgd", "linf", {8 / 255: 0.1})
    assert report.figures(report.collect(store), tmp_path / "f1") == []  # a single eps is no curve
    _attack(store, rid, ck, "cnn", "pgd", "linf", {4 / 255: 0.3})
    data = report.collect(store)
    assert {p.stem for p in report.figures(data, tmp_path / "f")} == {"robust-pgd-linf"}
    page = report.html_report(data, [])
    HTMLParser().feed(page)
    for fmt in report.FORMATS:
        if fmt == "robustbench":  # no AutoAttack result: a message, not an empty list
            with pytest.raises(NotFoundError, match="nothing to export"):
                report.render(data, fmt)
        else:
            assert report.render(data, fmt)
    store.close()


# --- lineage and scale ---------------------------------------------------------------------------------------------

def test_lineage_tree(built):
    store, ids = built
    tree = report.lineage_tree(store, ids["ep"])
    text = _rich_text(tree)
    assert ids["ep"] in text and ids["ep_aa"] in text and ids["ep_corrupt"] in text
    assert "checkpoint" in text and "running" in text and "autoattack" in text
    # from an attack run, the tree starts at its training run
    assert ids["ep"] in _rich_text(report.lineage_tree(store, ids["ep_aa"])).splitlines()[0]
    with pytest.raises(NotFoundError):
        report.lineage_tree(store, "nope-nope")


def test_training_curves_tell_apart_runs_with_one_label(tmp_path, monkeypatch):
    """Two seeds of one model started minutes apart: their run ids share the first characters (a millisecond
    clock), yet each gets its own legend entry and colour."""
    from epcli import store as store_module
    ids = iter(["01abcdef00aaaaaa", "01abcdef11bbbbbb"])
    monkeypatch.setattr(store_module, "new_run_id", lambda: next(ids))
    store = Store(tmp_path / "s")
    a, _ = _train(store, "ep-cnn", {"label": "EP-CNN"}, [0.5, 0.6], seed=0)
    b, _ = _train(store, "ep-cnn", {"label": "EP-CNN"}, [0.4, 0.7], seed=1)
    paths = report.training_curves(store, [a, b], tmp_path / "c")
    svg = next(p for p in paths if p.suffix == ".svg").read_text()
    legend = [x for x in re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S) if "EP-CNN" in x]
    assert len(legend) == 2 and legend[0] != legend[1] and a in legend[0] + legend[1], legend
    # one line per run in each of the 2 panels with data (train loss, test accuracy), each in its own colour
    colours = re.findall(r'clip-path="[^"]*" style="fill: none; stroke: (#[0-9a-f]{6})', svg)
    assert sorted(c for c in colours if c != "#b0b0b0") == ["#1f77b4"] * 2 + ["#ff7f0e"] * 2, colours
    store.close()


def test_many_runs_fast(tmp_path):
    store = Store(tmp_path / "big")
    db = store.db
    # 60 training runs x 4 attack runs: 300 runs, ~3000 metric rows, written through the store's API
    for i in range(60):
        rid, ck = _train(store, ["ep-cnn", "cnn", "vit"][i % 3], {"epochs": 2}, [0.5, 0.6])
        for attack, norm in [("pgd", "linf"), ("pgd", "l2"), ("autoattack", "linf"), ("square", "linf")]:
            eps = EPS_LINF if norm == "linf" else EPS_L2
            _attack(store, rid, ck, "m", attack, norm, {e: 0.5 - 0.1 * j for j, e in enumerate(eps)})
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 300
    t0 = time.perf_counter()
    data = report.collect(store)
    text = report.render(data, "md") + report.render(data, "csv")
    dt = time.perf_counter() - t0
    assert len(data.rows) == 60 and text
    assert dt < 2.0, f"collect + render took {dt:.2f}s"
    store.close()


def test_percent_store(tmp_path):
    store = Store(tmp_path / "pct")
    rid, ck = _train(store, "cnn", {}, [55.0, 70.5])
    _attack(store, rid, ck, "cnn", "pgd", "linf", {8 / 255: 12.5})
    data = report.collect(store)
    assert data.scale == "percent" and data.rows[0].clean_acc == 70.5
    assert data.rows[0].cells["pgd:linf:8/255"].value == 12.5
    # the interval is on the value's scale (percent) whatever the store's: each bound p of a Wilson interval
    # solves the score equation (p̂ - p)² = z² p (1 - p) / n, here p̂ = 0.125 of n = 100 images
    cell = data.rows[0].cells["pgd:linf:8/255"]
    assert cell.n_examples == 100 and cell.ci95[0] < cell.value < cell.ci95[1]
    for bound in cell.ci95:
        p = bound / 100
        assert (0.125 - p) ** 2 == pytest.approx(1.959964 ** 2 * p * (1 - p) / 100, rel=1e-3)
    row = data.rows[0]  # clean: 70.5 % of the 1,000 test images
    assert row.clean_n == 1000 and row.clean_ci95[0] < 70.5 < row.clean_ci95[1] < 70.5 + 3
    store.close()


def test_adversarial_image_choice(tmp_path):
    """The grid shows a test image every shown model classifies correctly when clean, matched by test index
    across artifacts stored in different orders; and says so when there is none."""
    import numpy as np

    def entry(index, labels, pred_clean, fooled_at_2):
        t = {"x": np.zeros((len(index), 3, 4, 4), np.float32), "labels": np.array(labels),
             "pred_clean": np.array(pred_clean), "x_adv_0.1": np.zeros((len(index), 3, 4, 4), np.float32),
             "pred_0.1": np.where(np.arange(len(index)) == fooled_at_2, 9, np.array(labels))}
        return {"t": t, "n": len(index), "labels": np.array(labels), "index": np.array(index),
                "eps": [(0.1, "x_adv_0.1", "pred_0.1")]}

    a = entry([10, 11, 12, 13], [1, 2, 3, 4], [0, 2, 3, 4], fooled_at_2=3)   # 10 misclassified clean
    b = entry([13, 12, 11, 10], [4, 3, 2, 1], [4, 3, 9, 1], fooled_at_2=0)   # 11 misclassified clean
    idx, pos = report.choose_image([a, b])
    assert idx == 13 and pos == [3, 0]          # 12 and 13 qualify; 13 is the one both attacks changed
    assert a["labels"][pos[0]] == a["t"]["pred_clean"][pos[0]] and b["labels"][pos[1]] == b["t"]["pred_clean"][pos[1]]
    c = entry([10, 11], [1, 2], [0, 0], fooled_at_2=0)                         # nothing correct
    assert report.choose_image([a, c]) == (None, [None, None])

    # drawn from a store: the figure picks the test image both models got right (index 11 of the stored 10, 11)
    store = Store(tmp_path / "s")
    m1, k1 = _train(store, "cnn", {"label": "A"}, [0.8])
    m2, k2 = _train(store, "cnn", {"label": "B"}, [0.8], seed=1)
    r1 = _attack(store, m1, k1, "cnn", "pgd", "linf", {2 / 255: 0.5, 8 / 255: 0.0})
    _adv_artifact(store, r1, [2 / 255, 8 / 255], 0, index=(10, 11), labels=(6, 1), pred_clean=(3, 1))
    r2 = _attack(store, m2, k2, "cnn", "pgd", "l2", {0.5: 0.5})
    _adv_artifact(store, r2, [0.5], 1, index=(11, 10), labels=(1, 6), pred_clean=(1, 6))
    data = report.collect(store)
    assert [a["norm"] for a in data.adversarial] == ["linf", "l2"]   # one row group per norm
    entries = [_load_adv_entry(a) for a in data.adversarial]
    for e in entries:
        idx, pos = report.choose_image([e])
        assert idx == 11 if e["a"]["norm"] == "linf" else idx in (10, 11)
    paths = report.figures(data, tmp_path / "fig")
    assert any(p.name == "adversarial-examples.png" for p in paths)
    store.close()


def test_cli_report_json_and_robustbench(built, tmp_path):
    import jsonschema
    from typer.testing import CliRunner

    from epcli.cli import app
    from epcli.schema import SCHEMAS
    store, ids = built
    runner = CliRunner()
    for fmt in ("md", "html", "csv", "table", "json"):
        r = runner.invoke(app, ["--store", str(store.root), "report", "-f", fmt, "--json"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)                       # --json always prints JSON, the schema's report
        jsonschema.validate(doc, SCHEMAS["report"])
        assert {row["run_id"] for row in doc["rows"]} >= {ids["ep"], ids["cnn"]}
        ep = next(row for row in doc["rows"] if row["run_id"] == ids["ep"])
        assert ep["corruption_mean_over"] == "mean of 3/15 benchmark corruptions × 5 severities"
        assert "cifar10-mini" in ep["paper_not_compared"]
    out = tmp_path / "rb"
    r = runner.invoke(app, ["--store", str(store.root), "report", "-f", "robustbench", "--out", str(out)],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert len(files) == 2 and all(f.startswith("cifar10/Linf/epcli_") for f in files)
    for f in files:
        _valid_robustbench(f, json.loads((out / f).read_text()))
    empty = Store(tmp_path / "e")
    rid, ck = _train(empty, "cnn", {}, [0.5])
    empty.close()
    r = runner.invoke(app, ["--store", str(tmp_path / "e"), "report", "-f", "robustbench"])
    assert r.exit_code == NotFoundError.code
    assert "nothing to export for RobustBench" in r.output and "Traceback" not in r.output


def test_equilibrium_and_selection_beside_the_model(tmp_path):
    """EP-CNN rows carry the residual at prediction (issue 11's relax_residual rows) and the checkpoint
    selection; runs without them show nothing."""
    store = Store(tmp_path / "s")
    ok, ck = _train(store, "ep-cnn-small", {"label": "EP ok", "select": "best-val"}, [0.5])
    bad, ck2 = _train(store, "ep-cnn-small", {"label": "EP bad", "select": "best-test"}, [0.5], seed=1)
    old, ck3 = _train(store, "ep-cnn-small", {"label": "EP old"}, [0.5], seed=2)
    for rid, c, res in ((ok, ck, 2e-4), (bad, ck2, 0.05)):
        a = _attack(store, rid, c, "ep-cnn-small", "pgd", "linf", {8 / 255: 0.1})
        store.log_metrics(a, [{"name": "relax_residual", "value": res, "detail": {"T": 20, "mean": res / 2,
                                                                                  "tol": 1e-3}}])
    _attack(store, old, ck3, "ep-cnn-small", "pgd", "linf", {8 / 255: 0.1})
    data = report.collect(store)
    notes = {r.label: report.model_notes(r) for r in data.rows}
    assert notes["EP ok"] == ["at equilibrium: residual 0.0002 at T=20", "checkpoint: best-val"]
    assert notes["EP bad"][0] == "NOT converged: residual 0.05 at T=20 (tolerance 0.001)"
    assert "chosen on the test set" in notes["EP bad"][1]
    # the training pipeline's summary names the selected epoch; its test accuracy is the clean one shown
    store.update_run(ok, summary={"test_acc": 0.42, "select": "best-val", "selected_epoch": 1})
    row = next(r for r in report.collect(store).rows if r.run_id == ok)
    assert row.clean_acc == pytest.approx(42.0) and report.model_notes(row)[1] == "checkpoint: best-val (epoch 1)"
    assert notes["EP old"] == []
    assert "NOT converged" in report.render(data, "md") and "at equilibrium" in report.html_report(data, [])
    store.close()


def test_per_image_steps_and_adversarial_equilibrium_beside_the_model(tmp_path):
    """An equilibrium model (each image stops at tol) says its mean steps and cap; the worst attack run's
    adversarial predictions say whether they converged too."""
    store = Store(tmp_path / "s")
    m, ck = _train(store, "ep-cnn-small", {"label": "EP eq"}, [0.5])
    runs = []
    for adv_max, unconv in ((4e-4, 0), (0.02, 3), (9e-4, 0)):
        a = _attack(store, m, ck, "ep-cnn-small", "pgd", "linf", {8 / 255: 0.1})
        store.log_metrics(a, [{"name": "relax_residual", "value": 9e-4, "detail": {
            "T": 250, "mean": 5e-4, "steps": 77, "steps_mean": 33.8, "at_equilibrium": True, "tol": 1e-3,
            "adv_max": adv_max, "adv_mean": adv_max / 2, "adv_predictions": 800, "adv_unconverged": unconv,
            "adv_at_equilibrium": unconv == 0}}])
        runs.append(a)
    (row,) = report.collect(store).rows
    notes = report.model_notes(row)
    assert notes[0] == "at equilibrium: residual 0.0009, 34 steps per image on average (cap T=250)"
    assert notes[1] == (f"adversarial predictions NOT converged: 3 above tolerance, residual up to 0.02 over 800 "
                        f"predictions (run {runs[1]})")
    # the terminal table marks the model and prints its notes under the table (an 80-column cell wraps them)
    text = _rich_text(report.leaderboard_table(report.collect(store)), width=80)
    assert "EP eq [1]" in text and "[1] EP eq: at equilibrium: residual 0.0009" in text
    store.close()


def test_terminal_table_names_one_dataset_in_its_title(tmp_path):
    """One dataset: said once in the title, no data column (80 columns are scarce); two: a column per row."""
    store = Store(tmp_path / "s")
    _train(store, "cnn", {"label": "A"}, [0.5])
    _train(store, "cnn", {"label": "B"}, [0.6])
    text = _rich_text(report.leaderboard_table(report.collect(store)), width=80)
    title, header = text.splitlines()[0], text.splitlines()[3]
    assert "on cifar10-mini" in title and "data" not in header
    _train(store, "cnn", {"label": "C"}, [0.7], dataset="cifar100")
    text = _rich_text(report.leaderboard_table(report.collect(store)), width=80)
    assert "on cifar" not in text.splitlines()[0] and "data" in text and "cifar100" in text
    store.close()


def test_store_text_is_shown_as_written_never_as_markup_or_terminal_codes(tmp_path):
    """Labels and dataset folders come from users (and older stores): '[red]' stays literal and control characters
    are written out, in the terminal table (title, cells, notes) and in Markdown."""
    store = Store(tmp_path / "s")
    _train(store, "cnn", {"label": "A[red]x\x1b[2J"}, [0.5], dataset="d[red]")
    text = _rich_text(report.leaderboard_table(report.collect(store)), width=200)
    assert "on d[red]" in text and "A[red]x\\x1b[2J" in text and "\x1b" not in text
    md = report.render(report.collect(store), "md")
    assert "\x1b" not in md and "\\x1b" in md
    _train(store, "cnn", {"label": "B"}, [0.6], dataset="e[bold]")
    text = _rich_text(report.leaderboard_table(report.collect(store)), width=200)
    assert "d[red]" in text and "e[bold]" in text
    store.close()


def test_adversarial_grid_uses_one_attack_per_norm():
    """Per norm the grid shows the same attack for every model (the most eps, then n, then newest)."""
    def cand(model, attack, n_eps, n, tag):
        return {"run_id": model, "norm": "linf", "attack": attack, "n_eps": n_eps, "n": n, "tag": tag}
    newest_first = [cand("ep", "pgd", 1, 32, "ep-tiny"), cand("cnn", "autoattack", 1, 100, "cnn-aa"),
                    cand("ep", "pgd", 4, 200, "ep-demo"), cand("cnn", "pgd", 4, 200, "cnn-demo"),
                    cand("cnn", "pgd", 4, 200, "cnn-older")]
    assert [c["tag"] for c in _pick_adversarial(newest_first)] == ["cnn-demo", "ep-demo"]


# --- scale: figures draw a bounded number of models; the report run's bookkeeping is set-based -----------------

def test_figures_draw_the_newest_models_when_there_are_many(tmp_path):
    from test_report_golden import svg_text
    store = Store(tmp_path / "s")
    n = report.FIGURE_MODELS + 2
    runs = []
    for i in range(n):
        rid, ck = _train(store, "cnn", {"label": f"model {i:02d}"}, [0.5])
        _attack(store, rid, ck, "cnn", "pgd", "linf", dict(zip(EPS_LINF, [0.5, 0.4, 0.3 - i / 100])))
        runs.append(rid)
    data = report.collect(store)
    assert len(data.rows) == n  # the tables keep every model
    paths = report.figures(data, tmp_path / "fig")
    text = svg_text(next(p for p in paths if p.name == "robust-pgd-linf.svg"))
    legend = [t for t in text if t.startswith("model ")]
    # the 10 newest (run ids sort by creation), in report order; the title says how many were left out
    assert legend == [f"model {i:02d} (n=100)" for i in range(2, n)]
    assert any(f"10 newest of {n} models" in t for t in text)
    store.close()


def test_corruption_figure_names_n_per_model_when_it_differs_and_every_model_in_its_legend(tmp_path):
    from test_report_golden import svg_text
    store = Store(tmp_path / "s")
    a, a_ck = _train(store, "cnn", {"label": "A"}, [0.5])
    b, b_ck = _train(store, "vit", {"label": "B"}, [0.6])
    _corrupt(store, a, a_ck, "cnn", 0.5, n=100)
    _corrupt(store, b, b_ck, "vit", 0.6, corrs=["gaussian_noise"], n=40)  # B is not in the first panel (fog)
    paths = report.figures(report.collect(store), tmp_path / "fig")
    text = svg_text(next(p for p in paths if p.name == "corruptions.svg"))
    assert "A (n=100)" in text and "B (n=40)" in text and "B (n=40): clean" not in text
    assert any("on cifar10-mini" in t for t in text) and not any("test images)" in t for t in text)
    store.close()


def test_report_run_links_its_sources_and_picks_the_sample_grid(tmp_path):
    """The report run records each reported model's first output (its checkpoint) as an input, and redraws the
    grid of the first model (report order) whose newest finished corrupt run stored one."""
    from PIL import Image

    from epcli.pipelines.report import report as report_pipeline
    store = Store(tmp_path / "s")
    a, a_ck = _train(store, "cnn", {"label": "A"}, [0.5])
    b, b_ck = _train(store, "vit", {"label": "B"}, [0.6])
    _corrupt(store, a, a_ck, "cnn", 0.5)  # has a grid, but A's newest corrupt run (below) has none
    newest_a = store.start_run("corrupt", {"corruptions": ["fog"]}, model="cnn", dataset="cifar10-mini",
                               model_run_id=a)
    store.finish_run(newest_a)
    grid = np.full((2 + 2 * 34, 2 + 6 * 34, 3), 255, dtype=np.uint8)  # 2 images x 1 corruption
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    b_corr = store.start_run("corrupt", {"corruptions": ["fog"]}, model="vit", dataset="cifar10-mini",
                             model_run_id=b)
    store.write_artifact(b_corr, "corruption-grid", lambda p: p.write_bytes(buf.getvalue()), suffix=".png",
                         meta={"corruptions": ["fog"], "severities": [1, 2, 3, 4, 5]})
    store.finish_run(b_corr)
    res = report_pipeline(store=store, fmt="html", out=str(tmp_path / "out"))
    sources = {r["sha256"] for r in store.db.query(
        "SELECT sha256 FROM run_artifacts WHERE run_id = ? AND role = 'input' AND name = 'source'", [res["run_id"]])}
    assert sources == {store.artifacts_of(a, role="output")[0]["sha256"],
                       store.artifacts_of(b, role="output")[0]["sha256"]} == {a_ck, b_ck}
    assert any(f.endswith("corruption-samples.png") for f in res["files"])
    from test_report_golden import svg_text
    title = [t for t in svg_text(tmp_path / "out" / "corruption-samples.svg") if t.startswith("Corruption samples")]
    assert title == [f"Corruption samples (B, run {b_corr}): the seeded images the model was scored on"]
    store.close()


def test_clean_column_says_what_it_was_measured_on(tmp_path):
    """clean = the training run's accuracy on its whole test split, with that n (not the attack cells' n); a model
    without a test evaluation shows an attack's clean accuracy, labelled as on the attacked images, with their n;
    a run logged before n was recorded says "test split" without an n. In every format and in --json."""
    import jsonschema

    from epcli.schema import SCHEMAS
    from epcli.schema import report as report_doc
    store = Store(tmp_path / "s")
    a, a_ck = _train(store, "cnn", {"label": "A"}, [0.5, 0.7])
    _attack(store, a, a_ck, "cnn", "pgd", "linf", {8 / 255: 0.2}, n=200)
    b = store.start_run("train", {"model": "vit", "label": "B"}, model="vit", dataset="cifar10-mini")
    b_ck = store.write_artifact(b, "checkpoint", lambda p: p.write_bytes(b"b"), suffix=".safetensors")
    store.finish_run(b)
    _attack(store, b, b_ck, "vit", "pgd", "linf", {8 / 255: 0.1}, n=40)  # its clean_acc: 0.8 on 40 images
    c = store.start_run("train", {"model": "cnn", "label": "C"}, model="cnn", dataset="cifar10-mini")
    store.log_metrics(c, [{"name": "test_acc", "value": 0.6, "step": 1}])  # an older run: no n recorded
    store.finish_run(c)
    data = report.collect(store)
    rows = {r.label: r for r in data.rows}
    assert (rows["A"].clean_acc, rows["A"].clean_n, rows["A"].clean_from) == (pytest.approx(70.0), 1000,
                                                                              "test split")
    assert rows["A"].cells["pgd:linf:8/255"].n_examples == 200
    assert (rows["B"].clean_acc, rows["B"].clean_n) == (pytest.approx(80.0), 40)
    assert rows["B"].clean_from.startswith("attacked images (attack run ")
    assert (rows["C"].clean_n, report.clean_note(rows["C"])) == (None, "test split")
    md = report.render(data, "md")
    assert "| 70.00 (n=1000, test split) |" in md and "| 80.00 (n=40, attacked images) |" in md
    assert "| 60.00 (test split) |" in md
    table = report.render(data, "table")
    assert "n=1000, test split" in table and "n=40, attacked" in table
    assert "n=1000, test split</span>" in report.html_report(data, [])
    line = next(r for r in csv.DictReader(io.StringIO(report.render(data, "csv"))) if r["label"] == "B")
    assert (line["clean_acc"], line["clean_acc:n"]) == ("80.0", "40")
    assert line["clean_acc:from"].startswith("attacked images")
    doc = report_doc({"data": data, "run_id": None, "files": []})
    jsonschema.validate(doc, SCHEMAS["report"])
    by = {r["label"]: r for r in doc["rows"]}
    assert (by["A"]["clean_acc"], by["A"]["clean_n_examples"], by["A"]["clean_from"]) == (0.7, 1000, "test split")
    assert (by["B"]["clean_acc"], by["B"]["clean_n_examples"]) == (0.8, 40)
    assert by["C"]["clean_n_examples"] is None
    store.close()


def test_a_report_stopped_while_drawing_takes_its_drawing_child_down(tmp_path, monkeypatch):
    """SIGTERM or Ctrl-C (a KeyboardInterrupt) in the report while the forked child draws: the child is ended and
    reaped at once, not left drawing into the output folder after the command has exited."""
    import os
    import threading
    from types import SimpleNamespace

    import epcli.pipelines.report as pipeline
    from epcli.errors import Terminated
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setenv("EPCLI_REPORT_FORK", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)

    def figures(data, out_dir, only=None, **kw):
        if list(only) == list(pipeline._CHILD_KINDS):  # the child: a long drawing
            time.sleep(30)
            return []
        raise Terminated()  # the parent is stopped meanwhile

    monkeypatch.setattr(report, "figures", figures)
    children, real_fork = [], pipeline._fork
    monkeypatch.setattr(pipeline, "_fork", lambda work: children.append(real_fork(work)) or children[-1])
    t0 = time.monotonic()
    with pytest.raises(Terminated):
        pipeline._draw_figures(None, SimpleNamespace(rows=[]), tmp_path)
    assert len(children) == 1 and children[0] is not None
    with pytest.raises(ChildProcessError):  # already reaped: no orphan, no zombie
        os.waitpid(children[0].pid, os.WNOHANG)
    assert time.monotonic() - t0 < 10


def test_figures_drawn_in_a_child_process_equal_the_sequential_ones(built, tmp_path, monkeypatch):
    """report -f html --out forks a child for the corruption figures: the same files, in the same order, with
    the same text as drawing everything in this process (EPCLI_REPORT_FORK=0); and the page lists them all."""
    from test_report_golden import svg_text

    import epcli.pipelines.report as pipeline
    import threading

    from epcli.corruptions import digital  # the JPEG pool's module
    # The report forks only from a single-threaded process. Earlier tests leave idle helper threads (the JPEG
    # worker pool, which is stopped here; tqdm's monitor from ART): this test counts as single-threaded.
    if digital._POOL is not None:
        digital._POOL.shutdown(wait=True)
        monkeypatch.setattr(digital, "_POOL", None)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    store, _ = built
    data = report.collect(store)
    forks, real_fork = [], pipeline._fork
    monkeypatch.setattr(pipeline, "_fork", lambda work: forks.append(1) or real_fork(work))
    out = {}
    for fork in ("1", "0"):
        monkeypatch.setenv("EPCLI_REPORT_FORK", fork)
        out[fork] = pipeline._draw_figures(store, data, tmp_path / fork)
    assert forks == [1]  # the first really drew in a child
    monkeypatch.setenv("EPCLI_REPORT_FORK", "1")
    monkeypatch.setattr(pipeline, "_fork", lambda work: (lambda: None))  # a child that failed: drawn here instead
    out["failed"] = pipeline._draw_figures(store, data, tmp_path / "failed")
    assert [p.name for p in out["failed"]] == [p.name for p in out["0"]]
    assert [p.name for p in out["1"]] == [p.name for p in out["0"]]
    assert {"corruptions.svg", "robust-pgd-linf.svg", "adversarial-examples.png"} <= {p.name for p in out["1"]}
    for a, b in zip(out["1"], out["0"]):
        assert a.parent == tmp_path / "1" and a.exists()
        if a.suffix == ".svg":
            assert svg_text(a) == svg_text(b), a.name


def test_black_box_results_show_no_gradient_mode(tmp_path):
    """Square (fra31's or ART's) only queries the model: the bptt its run records as the default gradient mode
    is not shown beside its numbers (table, csv, json, legend, worst-case names); a transfer surrogate is."""
    store = Store(tmp_path / "s")
    m, ck = _train(store, "cnn", {"label": "CNN"}, [0.8])
    e = 8 / 255
    _attack(store, m, ck, "cnn", "art-square", "linf", {4 / 255: 0.5, e: 0.4}, grad_mode="bptt", n=4)
    _attack(store, m, ck, "cnn", "square", "linf", {e: 0.3}, grad_mode="transfer:vit", n=4)
    _attack(store, m, ck, "cnn", "art-autoattack", "linf", {e: 0.2}, grad_mode="bptt", n=4)
    data = report.collect(store)
    cells = data.rows[0].cells
    assert cells["art-square:linf:8/255"].grad_mode is None
    assert cells["square:linf:8/255"].grad_mode == "transfer:vit"
    assert cells["art-autoattack:linf:8/255"].grad_mode == "bptt"
    md = report.render(data, "md")
    assert "40.00 (n=4) |" in md and "20.00 (n=4, bptt)" in md
    row = next(csv.DictReader(io.StringIO(report.render(data, "csv"))))
    assert row["art-square:linf:8/255:grad_mode"] == "" and row["art-autoattack:linf:8/255:grad_mode"] == "bptt"
    assert {c["grad_mode"] for c in data.curves if c["attack"] == "art-square"} == {None}
    store.close()


def test_art_autoattack_beside_the_paper_names_its_budgets(tmp_path):
    """ART's AutoAttack stands beside the paper's number; a run with budgets other than ART's defaults (which
    the paper ran) lists each difference, and a run with the defaults lists none."""
    from epcli.pipelines.attack import PAPER_PROTOCOLS
    from epcli.report.comparison import ART_AUTOATTACK_BUDGET
    defaults = PAPER_PROTOCOLS["autoattack"]["params"]
    assert {k: v[1] for k, v in ART_AUTOATTACK_BUDGET.items()} == {k: defaults[k] for k in ART_AUTOATTACK_BUDGET}
    store = Store(tmp_path / "s")
    ep, ck = _train(store, "ep-cnn", {"label": "EP", "T": 250}, [0.87], dataset="cifar10")
    ep_b, ck_b = _train(store, "ep-cnn", {"label": "EP", "T": 250}, [0.87], dataset="cifar10", seed=1)
    cfg = {"labels": "predicted", "select": "first", "batch_size": 200, "protocol": "paper"}
    _attack(store, ep, ck, "ep-cnn", "art-autoattack", "linf", {8 / 255: 0.08}, grad_mode="truncated:70", n=200,
            dataset="cifar10", config={**cfg, "params": dict(defaults)})
    _attack(store, ep_b, ck_b, "ep-cnn", "art-autoattack", "linf", {8 / 255: 0.30}, grad_mode="truncated:70",
            n=200, dataset="cifar10", config={**cfg, "protocol": "epcli", "params": {
                **defaults, "apgd_iter": 3, "restarts": 1, "square_iter": 20}})
    comp = {c.run_id: c for c in report.collect(store).comparisons if c.what == "AutoAttack (ART) L∞ 8/255"}
    assert comp[ep].not_compared is None and not any("AutoAttack:" in r for r in comp[ep].reasons), comp[ep].reasons
    weak = comp[ep_b].reasons
    assert comp[ep_b].paper == 8.0
    assert {"AutoAttack: APGD iterations 3, paper ART's default 100", "AutoAttack: APGD restarts 1, paper ART's "
            "default 5", "AutoAttack: Square iterations 20, paper ART's default 5000"} <= set(weak), weak
    assert not any("DeepFool" in r for r in weak)
    store.close()


def test_square_batch_difference_counts_the_chunk(tmp_path):
    """ART's Square shares its windows across a batch: a run on the paper's 200 first images whose --chunk (or
    --batch-size) split them is said to differ in batch, even when --batch-size was left to its default."""
    store = Store(tmp_path / "s")
    ep, ck = _train(store, "ep-cnn", {"label": "EP", "T": 250}, [0.87], dataset="cifar10")
    ep_b, ck_b = _train(store, "ep-cnn", {"label": "EP", "T": 250}, [0.87], dataset="cifar10", seed=1)
    cfg = {"labels": "predicted", "select": "first", "n_examples": 200,
           "params": {"max_iter": 1000, "scores": "softmax", "restarts": 1}}
    _attack(store, ep, ck, "ep-cnn", "art-square", "linf", {8 / 255: 0.45}, n=200, dataset="cifar10",
            config={**cfg, "batch_size": None, "chunk": 200})
    _attack(store, ep_b, ck_b, "ep-cnn", "art-square", "linf", {8 / 255: 0.40}, n=200, dataset="cifar10",
            config={**cfg, "batch_size": None, "chunk": 50})
    comp = {c.run_id: c for c in report.collect(store).comparisons if c.what == "Square (ART) L∞ 8/255"}
    assert comp[ep].not_compared is None and not any("batch" in r for r in comp[ep].reasons), comp[ep].reasons
    assert any(r.startswith("batch: 50, paper 200") for r in comp[ep_b].reasons), comp[ep_b].reasons
    store.close()


def test_worst_case_joins_only_results_of_one_classifier(tmp_path):
    """An EP-CNN attacked at another relaxation length T is another classifier: its result on the same images
    does not join the cell's (or the worst case over attacks'); a result at the same T does."""
    store = Store(tmp_path / "s")
    m, ck = _train(store, "ep-cnn-small", {"label": "EP"}, [0.8])
    e = 8 / 255
    # a (T=250) is the strongest PGD result, so the cells rest on it; b (T=20) would lower them (AND: 25%)
    flags = {"a": np.array([1, 1, 0, 0], dtype=bool), "b": np.array([0, 1, 1, 1], dtype=bool),
             "c": np.array([1, 0, 1, 1], dtype=bool)}
    runs = {}
    for i, (name, attack, T) in enumerate([("a", "pgd", 250), ("b", "pgd", 20), ("c", "art-square", 250)]):
        rid = store.start_run("attack", {"attack": attack, "norm": "linf", "eps": [e], "T": T}, model="ep-cnn-small",
                              dataset="cifar10-mini", model_run_id=m)
        store.link(rid, ck, "input", "checkpoint")
        store.log_metrics(rid, [{"name": "robust_acc", "value": float(flags[name].mean()), "attack": attack,
                                 "norm": "linf", "eps": e, "grad_mode": "bptt", "n_examples": 4,
                                 "detail": {"T": T}}])
        _adv_artifact(store, rid, [e], i, index=(3, 5, 7, 9), labels=(1, 2, 3, 4), pred_clean=(1, 2, 3, 4),
                      robust={e: flags[name]})
        store.finish_run(rid, "finished", summary={})
        runs[name] = rid
    cells = report.collect(store).rows[0].cells
    pgd = cells["pgd:linf:8/255"]
    assert pgd.n_results == 1 and pgd.value == 50.0 and pgd.run_id == runs["a"]  # not a AND b (25%)
    worst = cells["worst:linf:8/255"]
    assert {w.split()[0] for w in worst.worst_of} == {runs["a"], runs["c"]}
    assert worst.value == pytest.approx(100 * (flags["a"] & flags["c"]).mean())
    store.close()


def test_square_at_20000_iterations_stands_beside_the_papers_20000_table(tmp_path):
    """The paper ran Square L2 twice: 1,000 iterations (its main table) and 20,000 (CNNs only). A result with
    max_iter 20000 is set beside the 20,000 table, one with 1,000 beside the main one; neither lists an
    iteration difference; a third budget is compared with the main table and says so; a standard CNN, which
    the main table lacks, is compared only at 20,000."""
    store = Store(tmp_path / "s")
    at = {"label": "CNN-AT", "adv": {"norm": "l2", "eps": 0.5}}
    runs = [_train(store, "cnn", at, [0.85], dataset="cifar10", seed=s) for s in range(3)]
    runs += [_train(store, "cnn", {"label": "CNN"}, [0.88], dataset="cifar10", seed=s) for s in range(2)]
    cfg = {"labels": "predicted", "select": "first", "n_examples": 200, "batch_size": 200}
    for (m, ck), it in zip(runs, (20000, 1000, 5000, 20000, 1000)):
        _attack(store, m, ck, "cnn", "art-square", "l2", {1.0: 0.2}, n=200, dataset="cifar10",
                config={**cfg, "params": {"max_iter": it, "scores": "softmax", "restarts": 1}})
    comp = {c.run_id: c for c in report.collect(store).comparisons if c.what == "Square (ART) L2 1"}
    at20k, at1k, at5k, cnn20k, cnn1k = (comp.get(m) for m, _ in runs)
    assert (at20k.paper, at1k.paper, at5k.paper, cnn20k.paper) == (41.7, 82.2, 82.2, 19.0)  # paper-facts §6
    assert at20k.reasons[0] == cnn20k.reasons[0] == "paper run: max_iter-20000"
    assert not any("iterations" in r for r in at20k.reasons + at1k.reasons + cnn20k.reasons)
    assert "Square: 5000 iterations, paper 1000" in at5k.reasons
    assert cnn1k is None  # the main table has no standard CNN
    assert not any("worst case" in r for r in at20k.reasons + at1k.reasons)
    # both budgets on one model's same images make a cell that is their worst case: it says so beside the paper's
    data = report.collect(store)
    row = next(r for r in data.rows if r.run_id == runs[0][0])
    cell = row.cells["art-square:l2:1"]
    fact = {"attack": "square", "n_examples": 200, "variant": "max_iter-20000", "metric": "robust_acc"}
    assert not any("worst case" in r for r in report.protocol_reasons(row, cell, fact))
    cell.n_results = 2
    assert any(r.startswith("epcli: the worst case over 2 results on the same images")
               for r in report.protocol_reasons(row, cell, fact))
    store.close()


def test_square_worst_case_with_a_20000_run_stands_beside_the_20000_table(tmp_path):
    """reproduce_paper.sh attacks a CNN with Square L2 at 1,000 and at 20,000 iterations on the same 200 images.
    Where the 20,000 run breaks nothing more (a tie: the 1,000 run then carries the cell), the cell, their worst
    case, is still set beside the paper's 20,000 table, with no iteration difference listed: a standard CNN was
    left without any comparison, a CNN-AT set beside the 1,000 table."""
    store = Store(tmp_path / "s")
    models = [_train(store, "cnn", {"label": "CNN"}, [0.88], dataset="cifar10"),
              _train(store, "cnn", {"label": "CNN-AT", "adv": {"norm": "l2", "eps": 0.5}}, [0.85], dataset="cifar10")]
    cfg = {"labels": "predicted", "select": "first", "n_examples": 200, "batch_size": 200}
    flags = np.arange(200) < 100
    for m, ck in models:
        for i, it in enumerate((1000, 20000)):  # the 1,000 run first: it wins the tie
            rid = store.start_run("attack", {"attack": "art-square", "norm": "l2", "eps": [1.0], **cfg,
                                             "params": {"max_iter": it, "scores": "softmax", "restarts": 1}},
                                  model="cnn", dataset="cifar10", model_run_id=m)
            store.link(rid, ck, "input", "checkpoint")
            store.log_metrics(rid, [{"name": "robust_acc", "value": 0.5, "attack": "art-square", "norm": "l2",
                                     "eps": 1.0, "n_examples": 200, "detail": {"steps": 20}}])
            labels = tuple(np.arange(200) % 10)
            _adv_artifact(store, rid, [1.0], i, index=tuple(range(200)), labels=labels, pred_clean=labels,
                          robust={1.0: flags})
            store.finish_run(rid, "finished", summary={})
    data = report.collect(store)
    comp = {c.run_id: c for c in data.comparisons if c.what == "Square (ART) L2 1"}
    cnn, cnn_at = (comp.get(m) for m, _ in models)
    for c, paper_value in ((cnn, 19.0), (cnn_at, 41.7)):  # paper-facts §6, the 20,000 table
        assert c is not None and c.n_examples == 200 and c.epcli == 50.0 and c.not_compared is None
        assert c.paper == paper_value and c.reasons[0] == "paper run: max_iter-20000", c.reasons
        assert not any("iterations" in r for r in c.reasons), c.reasons
        assert any(r.startswith("epcli: the worst case over 2 results") for r in c.reasons)
    store.close()


def test_wilson_interval_against_an_independent_solution():
    """The report's 95 % interval of an accuracy on n images is Wilson's: the two roots of
    (p̂ − q)² = z² q (1 − q) / n, solved here as a quadratic; and the textbook case 81 of 263: 25.53–36.62 %."""
    import numpy as np

    from epcli.report import wilson95
    z = 1.959963984540054
    for p, n in ((0.1, 10000), (0.25, 200), (0.5, 16), (0.03, 1000), (0.0, 200), (1.0, 200)):
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
        want = sorted(np.roots([a, b, c]).real) if p not in (0.0, 1.0) else ([0.0, z * z / n / a] if p == 0.0
                                                                             else [1 - z * z / n / a, 1.0])
        assert wilson95(100 * p, n) == pytest.approx([100 * w for w in want], abs=1e-3)
    assert wilson95(100 * 81 / 263, 263) == pytest.approx([25.53, 36.62], abs=0.01)
    assert wilson95(50.0, 0) is None and wilson95(None, 10) is None and wilson95(120.0, 10) is None


def test_eps_labels_say_k_over_255_only_for_k_over_255():
    """A column is labelled k/255 only when its eps is k/255 to rounding: 0.0314 is not 8/255 (the label said
    so, 0.09 % off), 8/255 typed to seven digits is."""
    from epcli.report import eps_label
    assert eps_label(8 / 255) == eps_label(0.0313725) == "8/255"
    assert eps_label(0.0314) == "0.0314" and eps_label(0.031) == "0.031"
    assert eps_label(0.5, "l2") == "0.5" and eps_label(1e-4) == "0.0001"
