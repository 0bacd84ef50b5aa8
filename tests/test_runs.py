"""Run management: filters and sort, tags and notes, rm with lineage (refuse / cascade) and gc, each leaving a
store whose every artifact row has its file and every file its row."""
import json
import os
import time

import pytest
from typer.testing import CliRunner

from epcli.cli import app
from epcli.errors import UsageError
from epcli.store import Store

runner = CliRunner()


def cli(store, *args):
    return runner.invoke(app, ["--store", str(store.root), *map(str, args)], catch_exceptions=False)


def invariant(store: Store) -> None:
    """Independently of Store.check_invariants: rows <-> files under artifacts/, links -> rows."""
    rows = {r["sha256"]: r["path"] for r in store.db.query("SELECT sha256, path FROM artifacts")}
    inside = {p for p in rows.values() if not os.path.isabs(p)}
    files = {str(f.relative_to(store.root)) for f in (store.root / "artifacts").rglob("*") if f.is_file()}
    assert inside == files, (inside ^ files)
    links = {r["sha256"] for r in store.db.query("SELECT sha256 FROM run_artifacts")}
    assert links <= set(rows)
    assert store.check_invariants() == []


def build(tmp_path):
    """train T1 -> attack A1 (reads T1's checkpoint) -> report R (reads A1's outcomes); train T2 alone."""
    s = Store(tmp_path / "s")
    with s.run("train", {"recipe": {"epochs": 2, "lr": 0.1}}, model="cnn", dataset="mini", seed=0) as t1:
        ck1 = s.write_artifact(t1, "checkpoint", lambda p: p.write_bytes(b"ck1"), suffix=".safetensors")
        for e, acc in ((1, 0.40), (2, 0.55)):
            s.log_metric(t1, "test_acc", acc, step=e)
        s.update_run(t1, summary={"test_acc": 0.55, "epochs": 2})
    time.sleep(0.002)
    with s.run("train", {"recipe": {"epochs": 3, "lr": 0.01}}, model="vit", dataset="mini", seed=1) as t2:
        s.write_artifact(t2, "checkpoint", lambda p: p.write_bytes(b"ck2"), suffix=".safetensors")
        s.log_metric(t2, "test_acc", 0.35, step=3)
        s.update_run(t2, summary={"test_acc": 0.35, "epochs": 3})
    time.sleep(0.002)
    with s.run("attack", {"attack": "pgd", "eps": [8 / 255]}, model="cnn", model_run_id=t1) as a1:
        s.link(a1, ck1, "input", "checkpoint")
        out = s.write_artifact(a1, "per-example", lambda p: p.write_bytes(b"outcomes"), suffix=".safetensors")
        s.log_metrics(a1, [{"name": "robust_acc", "value": 0.2, "eps": 2 / 255},
                           {"name": "robust_acc", "value": 0.05, "eps": 8 / 255}])
    time.sleep(0.002)
    with s.run("report", {}) as r:
        s.link(r, out, "input", "source")
        s.write_artifact(r, "report", lambda p: p.write_bytes(b"<html>"), suffix=".html")
    return s, {"t1": t1, "t2": t2, "a1": a1, "r": r, "ck1": ck1, "out": out}


def test_filters_sort_and_where(tmp_path):
    s, ids = build(tmp_path)
    ids_of = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids_of(s.find_runs(kind="train", sort="-test_acc")) == [ids["t1"], ids["t2"]]
    assert ids_of(s.find_runs(kind="train", sort="test_acc")) == [ids["t2"], ids["t1"]]
    assert ids_of(s.find_runs(where=["test_acc>0.5"])) == [ids["t1"]]
    assert ids_of(s.find_runs(where=["test_acc>=0.35", "seed=1"])) == [ids["t2"]]
    assert ids_of(s.find_runs(where=["config.recipe.epochs>2"])) == [ids["t2"]]
    assert ids_of(s.find_runs(where=["model=vit"])) == [ids["t2"]]
    # robust_acc is the worst value over eps: 0.05 < 0.1 although the 2/255 value is not
    assert ids_of(s.find_runs(where=["robust_acc<0.1"])) == [ids["a1"]]
    assert len(s.find_runs(since="1h")) == 4 and s.find_runs(since="2999-01-01") == []
    assert len(s.find_runs(since="2000-01-01T00:00")) == 4
    with pytest.raises(UsageError):
        s.find_runs(since="yesterday")
    with pytest.raises(UsageError):
        s.find_runs(where=["test_acc"])
    r = cli(s, "runs", "--kind", "train", "--where", "test_acc>0.5", "--json")
    assert [x["run_id"] for x in json.loads(r.stdout)["runs"]] == [ids["t1"]]
    r = cli(s, "runs", "--since", "soon")
    assert r.exit_code == 2 and r.stderr.startswith("error:")
    # a NAME no run of the selection has (a typo; attack metrics asked of train runs) is said, not an error
    unknown = []
    assert s.find_runs(kind="train", where=["test_ac>0.5"], sort="-robust_acc", unknown=unknown) == []
    assert unknown == ["robust_acc", "test_ac"]
    unknown = []
    s.find_runs(where=["test_acc>0.5"], unknown=unknown)
    assert unknown == []  # some runs have it
    r = cli(s, "runs", "--where", "test_ac>0.5", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["runs"] == [] and "no run of the selection has 'test_ac'" in \
        " ".join(r.stderr.split())


def test_tags_and_notes(tmp_path):
    s, ids = build(tmp_path)
    assert s.tag_run(ids["t1"], ["paper", "baseline"]) == ["baseline", "paper"]
    assert s.tag_run(ids["t1"][:12], ["x"], ["paper"]) == ["baseline", "x"]
    s.note_run(ids["t2"], "lr too low")
    assert [r["id"] for r in s.find_runs(tag="x")] == [ids["t1"]]
    assert s.get_run(ids["t2"])["note"] == "lr too low"
    r = cli(s, "tag", ids["t2"], "keep", "-nothing")
    assert r.exit_code == 0 and s.get_run(ids["t2"])["tags"] == ["keep"]
    r = cli(s, "tag", ids["t2"], "-keep")
    assert s.get_run(ids["t2"])["tags"] == []
    r = cli(s, "note", ids["t2"])
    assert r.exit_code == 0 and s.get_run(ids["t2"])["note"] is None
    r = cli(s, "runs")
    assert ids["t1"] in r.stdout and "#baseline" in r.stdout


def test_rm_refuses_dependents_then_cascades(tmp_path):
    s, ids = build(tmp_path)
    invariant(s)
    before = s.db["runs"].count
    with pytest.raises(UsageError, match="depend"):
        s.remove_runs([ids["t1"]])
    assert s.db["runs"].count == before
    r = cli(s, "rm", ids["t1"])
    assert r.exit_code == 2 and "--cascade" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    dry = s.remove_runs([ids["t1"]], cascade=True, dry_run=True)
    assert set(dry["removed"]) == {ids["t1"], ids["a1"], ids["r"]} and dry["files_removed"] == 3
    assert s.db["runs"].count == before and s.artifact_path(ids["ck1"]).exists()
    res = s.remove_runs([ids["t1"]], cascade=True)
    assert set(res["removed"]) == {ids["t1"], ids["a1"], ids["r"]}
    assert res["files_removed"] == 3 and res["bytes_freed"] == len(b"ck1") + len(b"outcomes") + len(b"<html>")
    assert [r["id"] for r in s.runs()] == [ids["t2"]]
    assert s.db["metrics"].count == 1 and s.db["checks"].count == 0
    invariant(s)
    # a leaf run goes without --cascade and takes only its own files
    with s.run("attack", {}, model="vit", model_run_id=ids["t2"]) as a2:
        ck2 = s.artifacts_of(ids["t2"], kind="checkpoint")[0]["sha256"]
        s.link(a2, ck2, "input")
        s.write_artifact(a2, "per-example", lambda p: p.write_bytes(b"a2"))
    r = cli(s, "rm", a2, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["removed"] == [a2]
    assert s.artifact_path(ck2).exists()
    invariant(s)


def test_rm_keeps_a_file_another_run_also_produced(tmp_path):
    s, ids = build(tmp_path)
    with s.run("train", {}, model="cnn") as t3:  # byte-identical checkpoint: one artifact, two producers
        s.write_artifact(t3, "checkpoint", lambda p: p.write_bytes(b"ck2"), suffix=".safetensors")
    s.remove_runs([ids["t2"]])
    ck = s.artifacts_of(t3, kind="checkpoint")[0]
    assert ck["run_id"] == t3 and s.artifact_path(ck["sha256"]).read_bytes() == b"ck2"
    invariant(s)


def test_rm_is_atomic(tmp_path, monkeypatch):
    s, ids = build(tmp_path)
    counts = {t: s.db[t].count for t in ("runs", "artifacts", "run_artifacts", "metrics")}
    real = s.db.execute

    def failing(sql, *a, **k):
        if sql.startswith("DELETE FROM runs"):
            raise RuntimeError("disk gone")
        return real(sql, *a, **k)
    monkeypatch.setattr(s.db, "execute", failing)
    with pytest.raises(RuntimeError):
        s.remove_runs([ids["t1"]], cascade=True)
    monkeypatch.undo()
    assert {t: s.db[t].count for t in counts} == counts  # rolled back
    invariant(s)  # and no file was deleted


def test_gc_restores_the_invariant(tmp_path):
    s, ids = build(tmp_path)
    # an orphan file, an unlinked row with its file, and a row whose file was deleted by hand
    orphan = s.artifacts_dir / "zz" / ("f" * 64 + ".bin")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    sha = s.write_artifact(ids["t2"], "extra", lambda p: p.write_bytes(b"unlinked"))
    s.db.execute("DELETE FROM run_artifacts WHERE sha256 = ?", [sha])
    gone = s.write_artifact(ids["t2"], "extra", lambda p: p.write_bytes(b"gone"))
    s.artifact_path(gone).unlink()
    (s.root / "tmp").mkdir(exist_ok=True)
    (s.root / "tmp" / "half-written").write_bytes(b"x")
    assert len(s.check_invariants()) == 2  # orphan file, missing file
    dry = s.gc(dry_run=True)
    assert dry["files_removed"] == 3 and dry["artifacts_removed"] == 2 and orphan.exists()
    res = s.gc()
    assert res == {"artifacts_removed": 2, "files_removed": 3, "bytes_freed": len(b"orphan") + len(b"unlinked") + 1,
                   "dry_run": False}
    assert not orphan.exists() and not (s.root / "tmp" / "half-written").exists()
    invariant(s)
    assert s.artifact_path(ids["ck1"]).read_bytes() == b"ck1"  # used artifacts untouched
    assert s.gc()["files_removed"] == 0  # idempotent


def test_gc_spares_fresh_files_while_a_run_writes(tmp_path):
    s, ids = build(tmp_path)
    with s.run("attack", {}, model="cnn") as rid:
        fresh = s.artifacts_dir / "ab" / ("a" * 64)
        fresh.parent.mkdir(parents=True)
        fresh.write_bytes(b"being written")  # renamed into place, row not inserted yet
        assert s.gc()["files_removed"] == 0 and fresh.exists()
        assert s.get_run(rid)["status"] == "running"
    assert s.gc()["files_removed"] == 1 and not fresh.exists()
    invariant(s)


def test_tag_output_shows_markup_as_text(tmp_path):
    # the tags line printed "[bold]x[/]" as a bold "x": the stored tag was not what the user saw
    s, ids = build(tmp_path)
    r = cli(s, "tag", ids["t1"], "[bold]x[/]")
    assert r.exit_code == 0 and f"{ids['t1']}: tags [bold]x[/]" in r.stderr
    assert s.get_run(ids["t1"])["tags"] == ["[bold]x[/]"]
    with pytest.raises(UsageError, match="has whitespace"):
        s.tag_run(ids["t1"], ["a\tb"])
    with pytest.raises(UsageError, match="outside the calendar"):
        s.find_runs(since="1000000000w")


def test_refused_curves_leave_no_reports_folder(tmp_path):
    # the reports/ folder was created in the store before the run kinds were checked
    s, ids = build(tmp_path)
    r = cli(s, "report", "--curves", "--run", ids["a1"])
    assert r.exit_code == 2 and r.stderr == f"error: run {ids['a1']} is an attack run; --curves draws training runs\n"
    assert not (s.root / "reports").exists()


def test_compare_with_a_lost_or_damaged_outcomes_file(tmp_path):
    # was exit 1 (SafetensorError / FileNotFoundError); the attack pipeline's cross-run checks read the same files
    from epcli.pipelines.attack import _stored_outcomes
    s, ids = build(tmp_path)
    path = s.artifact_path(ids["out"])  # build() wrote b"outcomes": not a safetensors file
    r = cli(s, "compare", ids["a1"], ids["a1"])
    assert r.exit_code == 3 and f"run {ids['a1']}'s per-example outcomes" in r.stderr and "cannot be read" in r.stderr
    assert _stored_outcomes(s, s.get_run(ids["a1"])) is None  # another attack's checks skip it
    path.unlink()
    r = cli(s, "compare", ids["a1"], ids["a1"])
    assert r.exit_code == 3 and "are missing from the store (`epcli gc` forgets lost files)" in r.stderr
    assert r.stderr.count("\n") == 1
    assert _stored_outcomes(s, s.get_run(ids["a1"])) is None


def test_hand_edited_rows(tmp_path):
    # a tags cell that is not a JSON list was read per character (tag added "y" -> tags "j n o s t y"); trace of a
    # run whose training run is gone said "no run '<that id>'" about a run the user never named
    s, ids = build(tmp_path)
    s.db.execute("UPDATE runs SET tags = 'notjson' WHERE id = ?", [ids["t1"]])
    s.db.execute("UPDATE runs SET model_run_id = 'ghost' WHERE id = ?", [ids["a1"]])
    assert s.tag_run(ids["t1"], ["y"]) == ["notjson", "y"]
    assert [r["id"] for r in s.find_runs(tag="o")] == []
    r = cli(s, "trace", ids["a1"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tree"]["run_id"] == ids["a1"], r.output


def test_compare_of_runs_of_two_kinds(tmp_path):
    s, ids = build(tmp_path)
    r = cli(s, "compare", ids["t1"], ids["a1"])
    want = (f"error: runs {ids['t1']} (train) and {ids['a1']} (attack) are of different kinds: compare two training "
            "runs or two attack runs\n")
    assert r.exit_code == 2 and r.stderr == want, r.output


def test_a_file_where_the_report_folder_goes(tmp_path):
    # store/reports a file: FileExistsError, exit 1 (and no --out was given, so the message names the folder)
    s, ids = build(tmp_path)
    (s.root / "reports").write_text("not a folder")
    for args in (["report", "--figures"], ["report", "--curves", "--run", ids["t1"]]):
        r = cli(s, *args)
        assert r.exit_code == 2 and r.stderr == f"error: the report folder {s.root / 'reports'} is a file; give a " \
            "folder for the report and its figures\n", (args, r.output)
    assert [r["kind"] for r in s.find_runs(kind="report")] == ["report"]  # build()'s own: no report run added


def test_runs_line_says_how_an_attack_scored_robustness(tmp_path):
    """The same attack with predicted labels (every image attacked; a misclassified one pushed onto its label
    counts), under the paper's protocol or targeted gives numbers that mean something else: the line says so."""
    s = Store(tmp_path / "s")
    kinds = {"true": {"labels": "true"}, "pred": {"labels": "predicted"},
             "paper": {"labels": "predicted", "protocol": "paper"}, "tgt": {"labels": "true", "targeted": True}}
    ids = {}
    for k, extra in kinds.items():
        with s.run("attack", {"attack": "art-square", "norm": "linf", "eps": [8 / 255], **extra}, model="cnn") as a:
            s.update_run(a, summary={"robust_acc": {"8/255": 0.25}, "clean_acc": 0.5})
        ids[k] = a
    out = cli(s, "runs", "--json").stdout
    assert len(json.loads(out)["runs"]) == 4
    lines = {k: next(ln for ln in runner.invoke(app, ["--store", str(s.root), "runs"], catch_exceptions=False,
                                                env={"COLUMNS": "200"}).stdout.splitlines() if ln.startswith(a))
             for k, a in ids.items()}
    assert "art-square linf robust 8/255 25.00% (clean 50.00%)" in lines["true"]
    assert "art-square linf (predicted labels) robust 8/255" in lines["pred"]
    assert "art-square linf (protocol paper) robust 8/255" in lines["paper"]
    assert "art-square linf (targeted) robust 8/255" in lines["tgt"]
    s.close()


def test_runs_and_trace_list_an_attacks_eps_in_increasing_order(tmp_path):
    """The stored summary's keys come back sorted as strings ("0.1" before "8/255"); the runs and trace lines
    order the eps by value, as attack printed them (the paper's L-inf grid mixes decimals and /255)."""
    s = Store(tmp_path / "s")
    with s.run("train", {"model": "cnn"}, model="cnn") as t:
        pass
    with s.run("attack", {"attack": "pgd", "norm": "linf", "eps": [0.01, 8 / 255, 0.1]}, model="cnn",
               model_run_id=t) as a:
        s.update_run(a, summary={"robust_acc": {"0.01": 0.5, "8/255": 0.25, "0.1": 0.125}, "clean_acc": 0.5})
    want = "robust 0.01 50.00%, 8/255 25.00%, 0.1 12.50% (clean 50.00%)"
    for args in (["runs"], ["trace", t]):
        out = runner.invoke(app, ["--store", str(s.root), *args], catch_exceptions=False, env={"COLUMNS": "200"})
        assert want in " ".join(out.stdout.split()), (args, out.stdout)
    s.close()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, "Terminated", RuntimeError])
def test_a_run_stopped_while_an_artifact_lands_leaves_a_consistent_store(tmp_path, monkeypatch, stop):
    """Ctrl-C / SIGTERM (errors.Terminated) / an error between an artifact's rename into place and its row: the
    run closes, and the file it renamed in is removed at once (not left for gc: no stale-run cleanup follows an
    orderly close)."""
    from epcli.errors import Terminated
    stop = Terminated if stop == "Terminated" else stop
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn", dataset="mini", seed=0) as kept:
        s.write_artifact(kept, "checkpoint", lambda p: p.write_bytes(b"kept"))
    real_link = Store.link

    def link(self, *a, **k):  # the signal lands after the rename, inside the row's transaction
        raise stop("stopped")

    monkeypatch.setattr(Store, "link", link)
    with pytest.raises(stop):
        with s.run("train", {}, model="cnn", dataset="mini", seed=1) as rid:
            s.write_artifact(rid, "checkpoint", lambda p: p.write_bytes(b"half"))
    monkeypatch.setattr(Store, "link", real_link)
    assert s.get_run(rid)["status"] == ("failed" if stop is RuntimeError else "interrupted")
    invariant(s)
    assert not list((s.root / "tmp").glob(f"{rid}-*"))
    assert s.db["artifacts"].count == 1 and s.artifact_path(s.artifacts_of(kept)[0]["sha256"]).read_bytes() == b"kept"


def test_runs_and_trace_read_summaries_other_tools_wrote(tmp_path):
    """A summary not in the attack pipeline's shape (robust_acc a number, not an eps map; a value that is not a
    number; an empty reason) is shown as far as it goes, never a traceback; empty fields are left out of trace."""
    s = Store(tmp_path / "s")
    with s.run("train", {"recipe": {"epochs": 1}}, model="cnn", dataset="mini", seed=0) as t:
        s.update_run(t, summary={"test_acc": "n/a", "epochs": 1})
    with s.run("attack", {"attack": "pgd", "norm": "linf", "eps": [8 / 255]}, model="cnn", model_run_id=t) as a:
        s.update_run(a, summary={"robust_acc": 0.25, "clean_acc": 0.5, "reason": "", "unreliable": False})
    out = cli(s, "runs")
    assert out.exit_code == 0, out.output
    assert "robust  25.00% (clean 50.00%)" in out.output and "test -%" in out.output
    tr = cli(s, "trace", t)
    assert tr.exit_code == 0, tr.output
    assert "robust 25.00% (clean 50.00%)" in tr.output and "test -%" in tr.output
    from epcli import report
    from epcli.report.tables import _rich_text
    tree = _rich_text(report.lineage_tree(s, t))
    assert "robust_acc=0.25" in tree and "reason=" not in tree
    s.close()
