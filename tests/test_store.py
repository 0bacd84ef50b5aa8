import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from epcli.errors import NotFoundError, StoreError
from epcli.store import SCHEMA_VERSION, Store, new_run_id


def test_round_trip(tmp_path):
    s = Store(tmp_path / "s")
    cfg = {"b": 1, "a": [1, 2]}
    with s.run("train", cfg, seed=3, model="cnn", dataset="mini") as rid:
        sha = s.write_artifact(rid, "checkpoint", lambda p: p.write_bytes(b"weights"), suffix=".bin")
        s.log_metric(rid, "test_acc", 0.75, step=2, dataset="mini", split="test")
    run = s.get_run(rid)
    assert run["status"] == "finished" and run["config"] == cfg and run["seed"] == 3
    assert run["config_sha256"] == s.get_run(rid[:12])["config_sha256"]  # prefix lookup
    assert run["ended_at"] >= run["started_at"]
    assert s.artifact_path(sha).read_bytes() == b"weights"
    import hashlib
    assert sha == hashlib.sha256(b"weights").hexdigest()
    assert [m["value"] for m in s.metrics(rid, name="test_acc")] == [0.75]
    s.close()
    # reopening is a no-op for the schema and keeps everything
    s2 = Store(tmp_path / "s")
    assert s2.get_run(rid)["status"] == "finished"
    assert [r["version"] for r in s2.db["schema_version"].rows] == [SCHEMA_VERSION]
    with pytest.raises(NotFoundError):
        s2.get_run("nope")


def test_run_ids_sort_by_time():
    a = new_run_id()
    time.sleep(0.002)
    b = new_run_id()
    assert a < b and len(a) == 16


def test_lineage(tmp_path):
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn") as t:
        ck = s.write_artifact(t, "checkpoint", lambda p: p.write_bytes(b"ck"))
    with s.run("attack", {}, model="cnn", model_run_id=t) as a:
        s.link(a, ck, "input", "checkpoint")
        adv = s.write_artifact(a, "adversarial-examples", lambda p: p.write_bytes(b"adv"))
    with s.run("report", {}) as r:
        s.link(r, adv, "input")
    # which checkpoint did this attack use?
    used = list(s.db.query("SELECT sha256, produced_by FROM lineage WHERE run_id = ? AND role = 'input'", [a]))
    assert used == [{"sha256": ck, "produced_by": t}]
    # everything derived from training run t
    tree = s.derived_runs(t)
    assert [(x["parent"], x["id"]) for x in tree] == [(t, a), (a, r)]


def test_failed_and_interrupted_runs_keep_earlier_ones(tmp_path):
    s = Store(tmp_path / "s")
    with s.run("train", {}) as ok:
        pass
    with pytest.raises(ValueError):
        with s.run("attack", {}) as bad:
            s.log_metric(bad, "x", 1.0)
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with s.run("attack", {}) as intr:
            raise KeyboardInterrupt
    assert s.get_run(ok)["status"] == "finished"
    assert s.get_run(bad)["status"] == "failed" and "boom" in s.get_run(bad)["error"]
    assert s.get_run(intr)["status"] == "interrupted"
    assert len(s.metrics(bad)) == 1  # what was stored before the failure stays


def test_killed_process_marked_interrupted(tmp_path):
    code = ("import time,sys; from epcli.store import Store; s=Store(sys.argv[1]); "
            "rid=s.start_run('train', {}); print(rid, flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    rid = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s = Store(tmp_path / "s")
    run = s.get_run(rid)
    assert run["status"] == "interrupted" and "process ended" in run["error"]


def _writer(root, tag, n):
    s = Store(root)
    for i in range(n):
        with s.run("attack", {"tag": tag, "i": i}) as rid:
            s.write_artifact(rid, "x", lambda p: p.write_bytes(f"{tag}{i}".encode()))
            s.log_metrics(rid, [{"name": "robust_acc", "value": i / n, "attack": "pgd"}] * 3)


def test_two_processes_write_one_store(tmp_path):
    root = str(tmp_path / "s")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, tag, 25)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    s = Store(root)
    assert s.db["runs"].count == 50 and s.db["metrics"].count == 150 and s.db["artifacts"].count == 50
    assert {r["status"] for r in s.runs()} == {"finished"}


def test_artifact_write_is_atomic(tmp_path):
    s = Store(tmp_path / "s")
    with s.run("train", {}) as rid:
        def half(p):
            p.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        with pytest.raises(StoreError, match="No space left"):  # exit code 5, not a crash
            s.write_artifact(rid, "checkpoint", half)
    assert s.db["artifacts"].count == 0
    assert not list((tmp_path / "s" / "artifacts").rglob("*.*")) if (tmp_path / "s" / "artifacts").exists() else True
    assert not list((tmp_path / "s" / "tmp").iterdir())


def test_corrupted_store_file_is_refused_and_untouched(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    garbage = b"this is not a database" * 100
    (root / "epcli.db").write_bytes(garbage)
    with pytest.raises(StoreError, match="not a readable SQLite database"):
        Store(root)
    assert (root / "epcli.db").read_bytes() == garbage


def test_foreign_sqlite_is_refused_and_untouched(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    con = sqlite3.connect(root / "epcli.db")
    con.execute("CREATE TABLE songs (title TEXT)")
    con.execute("INSERT INTO songs VALUES ('x')")
    con.commit()
    con.close()
    before = (root / "epcli.db").read_bytes()
    with pytest.raises(StoreError, match="not an epcli store"):
        Store(root)
    assert (root / "epcli.db").read_bytes() == before


def test_store_path_that_is_a_file_or_unwritable(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store(f)
    with pytest.raises(StoreError, match="cannot create"):
        Store(f / "sub")  # parent is a file: cannot be created


def test_sqlite_utils_reads_the_store_without_epcli(tmp_path):
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn", dataset="mini") as t:
        s.log_metric(t, "test_acc", 0.8, step=0)
    with s.run("attack", {}, model="cnn", model_run_id=t) as a:
        s.log_metric(a, "robust_acc", 0.1, attack="pgd", norm="linf", eps=8 / 255)
    out = subprocess.run([sys.executable, "-m", "sqlite_utils", "query", str(s.path),
                          "select model, clean_acc, pgd_linf_8_255 from leaderboard"],
                         capture_output=True, text=True, check=True).stdout
    import json
    assert json.loads(out) == [{"model": "cnn", "clean_acc": 0.8, "pgd_linf_8_255": 0.1}]
