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

from epcli import paper, report
from epcli.errors import EpcliError, NotFoundError, UsageError
from epcli.store import Store

EPS_LINF = [1 / 255, 2 / 255, 8 / 255]
EPS_L2 = [0.25, 0.5, 1.0]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CORRS = ["gaussian_noise", "fog", "frost"]


def _train(store: Store, model: str, config: dict, accs: list[float], status: str = "finished",
           dataset: str = "cifar10-mini") -> tuple[str, str]:
    rid = store.start_run("train", {"model": model, **config}, model=model, dataset=dataset, seed=0)
    store.log_metrics(rid, [{"name": "test_acc", "value": a, "step": i + 1, "dataset": dataset}
                            for i, a in enumerate(accs)])
    store.log_metrics(rid, [{"name": "train_loss", "value": 1.0 / (i + 1), "step": i + 1} for i in range(len(accs))])
    sha = store.write_artifact(rid, "checkpoint", lambda p: p.write_bytes(f"ckpt {rid}".encode()),
                               suffix=".safetensors")
    if status != "running":
        store.finish_run(rid, status, summary={"test_acc": accs[-1], "epochs": len(accs)})
    return rid, sha


def _attack(store: Store, model_run: str, ckpt: str, model: str, attack: str, norm: str, results: dict,
            grad_mode: str | None = None, n: int = 100, unreliable: dict | None = None,
            config: dict | None = None, status: str = "finished") -> str:
    cfg = {"attack": attack, "norm": norm, "eps": list(results), **(config or {})}
    rid = store.start_run("attack", cfg, model=model, dataset="cifar10-mini", model_run_id=model_run)
    store.link(rid, ckpt, "input", "checkpoint")
    rows = [{"name": "clean_acc", "value": 0.8, "attack": attack, "norm": norm, "n_examples": n,
             "grad_mode": grad_mode}]
    for eps, acc in results.items():
        bad = (unreliable or {}).get(eps)
        rows.append({"name": "robust_acc", "value": acc, "attack": attack, "norm": norm, "eps": eps,
                     "grad_mode": grad_mode, "n_examples": n, "unreliable": bool(bad),
                     "detail": {"reason": bad, "forward_passes": 250} if bad else {"steps": 20}})
    store.log_metrics(rid, rows)
    if status != "running":
        store.finish_run(rid, summary={"robust_acc": min(results.values())})
    return rid


def _corrupt(store: Store, model_run: str, ckpt: str, model: str, base: float) -> str:
    rid = store.start_run("corrupt", {"corruptions": CORRS}, model=model, dataset="cifar10-mini",
                          model_run_id=model_run)
    store.link(rid, ckpt, "input", "checkpoint")
    rows = [{"name": "clean_acc", "value": base, "n_examples": 100}]
    for c in CORRS:
        for s in range(1, 6):
            rows.append({"name": "corruption_acc", "value": base - 0.05 * s, "corruption": c, "severity": s,
                         "n_examples": 100})
    rows += [{"name": "corruption_mean_acc", "value": base - 0.15, "n_examples": 100},
             {"name": "corruption_mean_acc_all", "value": base - 0.16},
             {"name": "mce_unnormalized", "value": 1 - (base - 0.15)}]
    store.log_metrics(rid, rows)
    store.write_artifact(rid, "corruption-grid", lambda p: p.write_bytes(b"\x89PNG fake"), suffix=".png")
    store.finish_run(rid, summary={"corruption_mean_acc": base - 0.15})
    return rid


def _adv_artifact(store: Store, attack_run: str, eps: list[float], seed: int) -> str:
    rng = np.random.default_rng(seed)
    x = rng.random((2, 3, 32, 32), dtype=np.float32)
    tensors = {"x": x}
    for i, e in enumerate(eps):
        tensors[f"x_adv_{e}"] = np.clip(x + rng.normal(0, 0.02 * (i + 1), x.shape).astype(np.float32), 0, 1)
        tensors[f"pred_{e}"] = np.array([6 if i == 0 else 4, 1], dtype=np.int64)
    meta = {"eps": json.dumps(eps), "labels": json.dumps([6, 1]), "classes": json.dumps(CLASSES)}
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
    rows = list(store.db.query(
        "SELECT MIN(value) AS v FROM results WHERE model_run_id = ? AND name = 'robust_acc' AND attack = ? "
        "AND norm = ? AND ABS(eps - ?) < 1e-9", [model_run, attack, norm, eps]))
    return rows[0]["v"] * 100


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
    assert cell.value == pytest.approx(20.0) and cell.grad_mode == "bptt" and cell.n_results == 2
    assert ep.cells["pgd:l2:0.5"].value == pytest.approx(40.0)   # worst case over bptt and the sweep
    aa = ep.cells["autoattack:linf:8/255"]
    assert aa.unreliable and "square beat" in aa.reason and aa.forward_passes == 250
    assert ep.cells["fgsm:linf:8/255"].status == "running"
    assert ep.corruption["mean"] == pytest.approx(60.0) and ep.corruption["mce"] == pytest.approx(40.0)
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


def test_robustbench_json(built):
    store, ids = built
    recs = report.robustbench_json(report.collect(store))
    by = {r["run_id"]: r for r in recs}
    assert set(by) == {ids["ep"], ids["cnn"]}
    ep = by[ids["ep"]]
    assert ep["eps"] == "8/255" and ep["threat_model"] == "Linf"
    assert float(ep["autoattack_acc"]) == pytest.approx(15.0) and float(ep["clean_acc"]) == pytest.approx(75.0)
    assert ep["unreliable"] is True and "optimization loop" in ep["footnote"]
    assert ep["number_forward_passes"] == 250
    assert float(ep["reported"]) == pytest.approx(8.0)          # the paper's EP AA at 8/255
    assert "external" not in ep or float(ep["external"]) < 15.0
    for k in ("name", "architecture", "dataset", "clean_acc", "autoattack_acc", "footnote", "additional_data"):
        assert k in ep
    assert by[ids["cnn"]]["unreliable"] is False
    assert json.loads(report.render(report.collect(store), "robustbench")) == recs


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


def test_comparisons(built):
    store, ids = built
    data = report.collect(store)
    comp = {(c.run_id, c.what): c for c in data.comparisons}
    c = comp[(ids["ep"], "PGD L∞ 8/255")]
    assert c.epcli == pytest.approx(20.0) and c.paper == 11.96 and c.diff == pytest.approx(20.0 - 11.96)
    text = "; ".join(c.reasons)
    assert "JPEG" in text and "examples: 100, paper 10,000" in text and "gradient: bptt, paper truncated:70" in text
    assert "clipping" in text and "labels" not in text  # this attack run used predicted labels
    assert (ids["ep"], "clean") in comp and comp[(ids["ep"], "clean")].paper == 88.11
    assert "training: 3 epochs, paper 120" in comp[(ids["ep"], "clean")].reasons
    assert comp[(ids["ep"], "CIFAR-C mean")].paper == 76.11
    assert comp[(ids["at"], "PGD L∞ 8/255")].paper == 26.71      # CNN-AT 0.5, 8/255 = 0.031373
    assert ("labels: true labels, paper attacks the model's predictions"
            in comp[(ids["at"], "PGD L∞ 8/255")].reasons)


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
    for stem in ("robust-pgd-linf", "robust-pgd-l2", "robust-autoattack-linf", "corruptions", "steps", "unroll",
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
    assert "The paper beside the results" in page and "11.96" in page
    # the svg ids of different figures do not collide
    ids_ = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids_) == len(set(ids_))


def test_figures_skip_absent_data(tmp_path):
    store = Store(tmp_path / "s")
    rid, ck = _train(store, "cnn", {}, [0.5])
    assert report.figures(report.collect(store), tmp_path / "f0") == []  # no results at all: nothing to draw
    _attack(store, rid, ck, "cnn", "pgd", "linf", {8 / 255: 0.1})
    data = report.collect(store)
    assert {p.stem for p in report.figures(data, tmp_path / "f")} == {"robust-pgd-linf"}
    page = report.html_report(data, [])
    HTMLParser().feed(page)
    for fmt in report.FORMATS:
        assert report.render(data, fmt)
    store.close()


# --- lineage and scale ---------------------------------------------------------------------------------------------

def test_lineage_tree(built):
    store, ids = built
    tree = report.lineage_tree(store, ids["ep"])
    text = report._rich_text(tree)
    assert ids["ep"] in text and ids["ep_aa"] in text and ids["ep_corrupt"] in text
    assert "checkpoint" in text and "running" in text and "autoattack" in text
    # from an attack run, the tree starts at its training run
    assert ids["ep"] in report._rich_text(report.lineage_tree(store, ids["ep_aa"])).splitlines()[0]
    with pytest.raises(NotFoundError):
        report.lineage_tree(store, "nope-nope")


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
    store.close()
