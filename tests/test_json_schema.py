"""Every command's --json validates against the documented schema (epcli/schema.py, printed in docs/cli.md),
and its numbers agree with the store's per-example outcomes, computed here independently."""
import json
from fractions import Fraction
from pathlib import Path

import pytest
from conftest import write_imagefolder
from typer.testing import CliRunner

from epcli.cli import app
from epcli.schema import SCHEMAS
from epcli.store import Store

jsonschema = pytest.importorskip("jsonschema")  # a test extra: the GPU image lacks it, and collects every file

runner = CliRunner()
DOCS = Path(__file__).parent.parent / "docs"


def run_json(store, *args):
    r = runner.invoke(app, ["--store", str(store), *[str(a) for a in args], "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # stdout holds exactly one JSON document
    jsonschema.validate(doc, SCHEMAS[doc["command"]])
    return doc


@pytest.fixture(scope="module")
def store(tmp_path_factory, mini):
    data = write_imagefolder(tmp_path_factory.mktemp("data") / "imgs", mini, 30, 10)
    root = tmp_path_factory.mktemp("store")
    a = run_json(root, "train", "-m", "cnn-small", "-d", data, "--epochs", 2, "--device", "cpu")
    b = run_json(root, "train", "-m", "cnn-small", "-d", data, "--epochs", 1, "--lr", 0.01, "--device", "cpu")
    return root, data, a, b


def test_schema_is_valid_and_documented():
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
    from epcli.schema import markdown
    assert markdown() in (DOCS / "cli.md").read_text(), "run scripts/cli_reference.py > docs/cli.md"


def _floats(doc):
    if isinstance(doc, float):
        yield doc
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from _floats(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _floats(v)


def test_train_json(store):
    root, _, a, b = store
    assert a["epochs"] == 2 and [h["epoch"] for h in a["history"]] == [1, 2]
    assert a["test_acc"] == a["history"][-1]["test_acc"]
    # 100 test images: accuracies are k/100, exactly representable at 4 decimals
    assert all(round(h["test_acc"] * 100, 6).is_integer() for h in a["history"])
    stored = Store(root).metrics(a["run_id"], name="test_acc")
    assert [round(m["value"], 4) for m in stored] == [h["test_acc"] for h in a["history"]]


def test_attack_json_matches_per_example_outcomes(store):
    root, _, a, _ = store
    doc = run_json(root, "attack", "-m", a["run_id"], "--eps", "2/255,0.03", "--n", 30, "--steps", 3)
    assert [r["eps_label"] for r in doc["results"]] == ["2/255", "0.03"]
    assert doc["results"][0]["eps"] == round(float(Fraction(2, 255)), 9) or \
        abs(doc["results"][0]["eps"] - 2 / 255) < 1e-9
    assert doc["params"]["steps"] == 3 and doc["attack_forward_passes"] > 0
    assert doc["forward_passes"] >= doc["attack_forward_passes"]
    assert {c["check"] for c in doc["checks"]} >= {"monotone"}
    # independent: the per-example artifact's robust flags, averaged here
    from safetensors.torch import load_file
    s = Store(root)
    art = s.artifacts_of(doc["run_id"], role="output", kind="per-example")[0]
    t = load_file(str(s.artifact_path(art["sha256"])))
    assert round(float(t["clean_correct"].float().mean()), 4) == doc["clean_acc"]
    for r in doc["results"]:
        key = next(k for k in t if k.startswith("robust_") and abs(float(k[7:]) - r["eps"]) < 1e-6)
        assert round(float(t[key].float().mean()), 4) == r["robust_acc"]
    assert all(len(repr(v).split(".")[-1]) <= 9 for v in _floats(doc))  # no float32 noise


def test_every_other_command_validates(store, tmp_path):
    root, data, a, b = store
    att = run_json(root, "attack", "-m", a["run_id"], "--eps", "8/255", "--n", 20, "--steps", 2, "--no-checks")
    fg = run_json(root, "attack", "-m", a["run_id"], "-a", "fgsm", "--eps", "8/255", "--n", 20, "--no-checks")
    cmp_ = run_json(root, "compare", att["run_id"], fg["run_id"])
    assert cmp_["kind"] == "attack" and cmp_["rows"][0]["eps_label"] == "8/255" and cmp_["rows"][0]["n"] == 20
    assert cmp_["rows"][0]["robust_acc_a"] == att["results"][0]["robust_acc"]
    ct = run_json(root, "compare", a["run_id"], b["run_id"])
    keys = {d["key"] for d in ct["config_diff"]}
    assert {"recipe.epochs", "recipe.optimizer.lr"} <= keys and "model" not in keys
    test = next(m for m in ct["metrics"] if m["name"] == "test_acc")
    assert test["a"] == a["test_acc"] and test["b"] == b["test_acc"]
    assert abs(test["diff"] - (b["test_acc"] - a["test_acc"])) < 1e-4
    cor = run_json(root, "corrupt", "-m", a["run_id"], "-c", "fog", "-s", 1, "-s", 5, "--n", 20)
    assert [(c["corruption"], c["severity"]) for c in cor["cells"]] == [("fog", 1), ("fog", 5)]
    run_json(root, "corrupt", "--export", tmp_path / "c10c", "-c", "fog", "--n", 5, "-d", data)
    rep = run_json(root, "report")
    row = next(r for r in rep["rows"] if r["run_id"] == a["run_id"])
    assert row["clean_acc"] == a["test_acc"]  # fractions here, percent only in the human tables
    assert all(c["robust_acc"] is None or 0 <= c["robust_acc"] <= 1 for c in row["results"])
    cur = run_json(root, "report", "--curves", "--run", a["run_id"], "--run", b["run_id"], "--out", tmp_path / "c")
    assert {Path(f).name for f in cur["files"]} == {"training-curves.png", "training-curves.svg"}
    runs = run_json(root, "runs", "--limit", 0)
    assert {a["run_id"], att["run_id"], cor["run_id"]} <= {r["run_id"] for r in runs["runs"]}
    for rid in (a["run_id"], att["run_id"], cor["run_id"]):
        shown = run_json(root, "show", rid)
        assert shown["run"]["run_id"] == rid and shown["run"]["git_commit"] is None or \
            isinstance(shown["run"]["git_commit"], str)
    tr = run_json(root, "trace", a["run_id"])
    assert {c["run_id"] for c in tr["tree"]["children"]} >= {att["run_id"], cor["run_id"]}
    run_json(root, "models")
    run_json(root, "recipes")
    run_json(root, "recipes", "fast-cnn")
    t = run_json(root, "tag", b["run_id"], "keep", "x")
    assert t["tags"] == ["keep", "x"]
    assert run_json(root, "note", b["run_id"], "lr 0.01")["note"] == "lr 0.01"
    rm = run_json(root, "rm", a["run_id"], "--cascade", "--dry-run")
    assert rm["dry_run"] and a["run_id"] in rm["removed"] and att["run_id"] in rm["removed"]
    assert Store(root).get_run(a["run_id"])["status"] == "finished"  # dry run: nothing removed
    run_json(root, "gc", "--dry-run")


def test_demo_json(store, monkeypatch, tmp_path):
    """The demo's document, with the demo shrunk to one tiny model (the real one takes minutes)."""
    _, data, _, _ = store
    from epcli.pipelines import demo
    monkeypatch.setitem(demo.DEMO, "models", [("cnn-small", "demo-cnn", "CNN (small)")])
    monkeypatch.setitem(demo.DEMO, "attacks", [("pgd", "linf", "8/255")])
    monkeypatch.setitem(demo.DEMO, "corruptions", ["fog"])
    monkeypatch.setitem(demo.DEMO, "n_attack", 10)
    monkeypatch.setitem(demo.DEMO, "n_corrupt", 10)
    monkeypatch.setitem(demo.DEMO, "dataset", str(data))
    monkeypatch.setitem(demo.DEMO, "overrides", {"epochs": 1})
    r = runner.invoke(app, ["demo", "--store", str(tmp_path / "d"), "--device", "cpu", "--json"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, SCHEMAS["demo"])
    assert [x["id"] for x in Store(tmp_path / "d").runs(kind="train")] == doc["run_ids"]


def test_autoattack_json_gives_robust_accuracy_after_each_member(store):
    """In chunks (the per-member flags go through the chunk files too): the members come in AutoAttack's order,
    their accuracies fall from member to member and end at the run's robust accuracy."""
    root, _, a, _ = store
    doc = run_json(root, "attack", "-m", a["run_id"], "-a", "autoattack", "--eps", "2/255,8/255", "--n", 30,
                   "--steps", 2, "--chunk", 10, "--no-checks")
    for r in doc["results"]:
        accs = [m["robust_acc"] for m in doc["members"] if m["eps_label"] == r["eps_label"]]
        assert [m["member"] for m in doc["members"] if m["eps_label"] == r["eps_label"]] == \
            ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert accs == sorted(accs, reverse=True) and accs[-1] == r["robust_acc"] and accs[0] <= doc["clean_acc"]


def test_art_autoattack_members_in_show_and_runs(store):
    """ART's ensemble: the robust accuracy after each member (apgd-ce, apgd-dlr, deepfool, square) that
    `attack` printed is kept with the run: in `show` (JSON and text) and `runs --json`, equal to attack's."""
    root, _, a, _ = store
    doc = run_json(root, "attack", "-m", a["run_id"], "-a", "art-autoattack", "--eps", "8/255", "--n", 12,
                   "--steps", 2, "--restarts", 1, "--queries", 3, "--no-checks")
    assert [m["member"] for m in doc["members"]] == ["apgd-ce", "apgd-dlr", "deepfool", "square"]
    shown = run_json(root, "show", doc["run_id"])
    assert shown["run"]["result"]["members"] == doc["members"]
    listed = run_json(root, "runs")
    assert next(r for r in listed["runs"] if r["run_id"] == doc["run_id"])["result"]["members"] == doc["members"]
    text = runner.invoke(app, ["--store", str(root), "show", doc["run_id"]], catch_exceptions=False).stdout
    line = "8/255: robust % after " + ", then ".join(f"{m['member']} {100 * m['robust_acc']:.2f}"
                                                    for m in doc["members"])
    assert line in " ".join(text.split()), text


def test_compare_names_black_box_and_labels(store):
    """compare says what each run was: ART's Square is black box (no gradient mode), and a run with predicted
    labels is named so, with a note that robustness was scored differently; the JSON carries the labels."""
    root, _, a, _ = store
    sq = run_json(root, "attack", "-m", a["run_id"], "-a", "art-square", "--n", 12, "--queries", 3, "--no-checks")
    pg = run_json(root, "attack", "-m", a["run_id"], "--n", 12, "--steps", 1, "--labels", "predicted",
                  "--no-checks")
    doc = run_json(root, "compare", sq["run_id"], pg["run_id"])
    assert (doc["a"]["labels"], doc["b"]["labels"]) == ("true", "predicted")
    text = " ".join(runner.invoke(app, ["--store", str(root), "compare", sq["run_id"], pg["run_id"]],
                                  catch_exceptions=False).stdout.split())
    assert f"A = {sq['run_id']} (cnn-small, art-square linf, black box, true labels)" in text, text
    assert f"B = {pg['run_id']} (cnn-small, pgd linf, gradients bptt, predicted labels)" in text, text
    assert "scored robustness differently" in text


def test_attack_header_says_how_the_attack_saw_the_model(store):
    """The attack's header line: ART's Square is black box (no gradient mode), on a transfer surrogate it says
    so; a white-box attack names its gradient mode."""
    root, _, a, b = store
    heads = {}
    for name, extra in {"sq": ["-a", "art-square", "--queries", 2], "tr": ["-a", "art-square", "--queries", 2,
                        "--grad-mode", f"transfer:{b['run_id']}"], "pgd": ["--steps", 1]}.items():
        r = runner.invoke(app, ["--store", str(root), "attack", "-m", a["run_id"], "--n", 8, "--no-checks",
                                *map(str, extra)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        heads[name] = " ".join(r.stderr.split())
    assert "art-square linf, cnn-small, 8 test images of imgs, black box, true labels" in heads["sq"], heads["sq"]
    assert f"black box on transfer:{b['run_id']}, true labels" in heads["tr"], heads["tr"]
    assert "grad bptt, true labels" in heads["pgd"], heads["pgd"]
