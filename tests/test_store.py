import json
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


@pytest.mark.parametrize("table", ["songs", "runs"])  # a `runs` table of its own must not fool the check
def test_foreign_sqlite_is_refused_and_not_touched(tmp_path, table):
    root = tmp_path / "s"
    root.mkdir()
    con = sqlite3.connect(root / "epcli.db")
    con.execute(f"CREATE TABLE {table} (id TEXT, km REAL)")
    con.execute(f"INSERT INTO {table} VALUES ('monday', 5.2)")
    con.commit()
    con.close()
    before = (root / "epcli.db").read_bytes()
    with pytest.raises(StoreError, match="not an epcli store"):
        Store(root)
    assert (root / "epcli.db").read_bytes() == before
    assert [p.name for p in root.iterdir()] == ["epcli.db"]  # no -wal, -shm or .lock either


def test_reading_never_creates_and_read_only_stores_read(tmp_path):
    with pytest.raises(StoreError, match="no epcli store"):
        Store(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    s = Store(tmp_path / "s")
    with s.run("train", {"lr": 0.1}, model="cnn") as rid:
        s.log_metric(rid, "test_acc", 0.5, step=1)
    s.close()
    ro = Store(tmp_path / "s", create=False, readonly=True)
    assert ro.readonly and ro.get_run(rid)["status"] == "finished"
    assert [r["clean_acc"] for r in ro.db.query("select * from leaderboard")] == [0.5]
    with pytest.raises(StoreError, match="read-only"):
        ro.start_run("attack", {})
    ro.close()


def test_prefix_lookup_is_literal(tmp_path):
    s = Store(tmp_path / "s")
    rid = s.start_run("train", {})
    for pattern in ("%", "_", rid[:3] + "%", "_" * len(rid)):
        with pytest.raises(NotFoundError):
            s.get_run(pattern)
    assert s.get_run(rid[:6])["id"] == rid
    with pytest.raises(NotFoundError):
        s.artifact("%")


def test_json_columns_never_hold_nan(tmp_path):
    s = Store(tmp_path / "s")
    rid = s.start_run("attack", {"step_size": float("nan"), "eps": [float("inf"), 0.5]})
    s.finish_run(rid, summary={"acc": float("nan"), "ok": 1.0})
    s.log_metrics(rid, [{"name": "robust_acc", "value": 0.1, "detail": {"x": float("-inf")}}])
    conn = sqlite3.connect(s.path)
    got = conn.execute("SELECT json_extract(config, '$.eps[1]'), json_extract(summary, '$.ok'), "
                       "json_valid(config), json_valid(summary) FROM runs").fetchone()
    assert got == (0.5, 1.0, 1, 1)
    assert conn.execute("SELECT json_extract(detail, '$.x') IS NULL, json_valid(detail) FROM metrics").fetchone() \
        == (1, 1)
    assert s.get_run(rid)["config"] == {"step_size": None, "eps": [None, 0.5]}


def test_leaderboard_matches_a_direct_computation(tmp_path):
    """The grouped view against the definition computed in Python from the raw rows."""
    import random
    rng = random.Random(1)
    s = Store(tmp_path / "s")
    trains = []
    for i in range(6):
        t = s.start_run("train", {"i": i}, model=f"m{i}")
        s.log_metrics(t, [{"name": "test_acc", "value": rng.random(), "step": e} for e in (1, 3, 2)])
        s.finish_run(t, "finished" if i != 5 else "failed")
        trains.append(t)
        for _ in range(rng.randint(0, 3)):
            a = s.start_run("attack", {}, model_run_id=t)
            s.log_metrics(a, [{"name": "robust_acc", "value": rng.random(), "attack": rng.choice(["pgd", "square"]),
                               "norm": rng.choice(["linf", "l2"]), "eps": rng.choice([8 / 255, 0.5, 0.1]),
                               "unreliable": rng.random() < 0.3} for _ in range(4)])
            s.finish_run(a)
        for _ in range(rng.randint(0, 2)):
            c = s.start_run("corrupt", {}, model_run_id=t)
            s.log_metric(c, "corruption_mean_acc", rng.random())
            s.finish_run(c)
            time.sleep(0.002)
    rows = {r["model_run_id"]: r for r in s.db.query("select * from leaderboard")}
    assert set(rows) == set(trains[:5])
    metrics = list(s.db.query("select m.*, r.model_run_id, r.started_at from metrics m join runs r on r.id = m.run_id"))
    for t in trains[:5]:
        mine = [m for m in metrics if m["model_run_id"] == t]
        clean = max((m for m in mine if m["name"] == "test_acc"), key=lambda m: m["step"])["value"]

        def worst(attack, norm, eps, tol):
            vals = [m["value"] for m in mine if m["name"] == "robust_acc" and m["attack"] == attack and
                    m["norm"] == norm and abs(m["eps"] - eps) < tol]
            return min(vals) if vals else None
        corr = [m for m in mine if m["name"] == "corruption_mean_acc"]
        want = {"clean_acc": clean, "pgd_linf_8_255": worst("pgd", "linf", 8 / 255, 1e-4),
                "pgd_l2_0_5": worst("pgd", "l2", 0.5, 1e-3),
                "square_linf_8_255": worst("square", "linf", 8 / 255, 1e-4),
                "autoattack_linf_8_255": None,
                "corruption_mean_acc": max(corr, key=lambda m: m["started_at"])["value"] if corr else None,
                "unreliable_results": sum(1 for m in mine if m["unreliable"] == 1)}
        assert {k: rows[t][k] for k in want} == want


def test_store_from_the_first_schema_is_migrated(tmp_path):
    import sqlite_utils

    from epcli.store import migrations
    root = tmp_path / "s"
    root.mkdir()
    db = sqlite_utils.Database(root / "epcli.db")
    migrations.apply(db, stop_before="m002_linear_leaderboard")
    db["schema_version"].insert({"version": 1, "applied_at": "then"})
    db.conn.close()
    s = Store(root)
    assert "m002_linear_leaderboard" in [m.name for m in migrations.applied(s.db)]
    assert "GROUP BY" in s.db.execute("select sql from sqlite_master where name = 'leaderboard'").fetchone()[0]


def test_a_kill_between_rename_and_row_leaves_no_orphan(tmp_path):
    """What a process killed right after renaming an artifact into place leaves behind, cleaned up when the
    store next opens (the run is dead, so nobody can still add the row)."""
    s = Store(tmp_path / "s")
    rid = s.start_run("train", {})
    s.db["runs"].update(rid, {"pid": 2 ** 22 + 12345})  # a pid that does not run
    sha = "ab" * 32
    (s.artifacts_dir / "ab").mkdir(parents=True)
    orphan = s.artifacts_dir / "ab" / f"{sha}.safetensors"
    orphan.write_bytes(b"weights")
    (s.root / "tmp").mkdir(exist_ok=True)
    (s.root / "tmp" / f"{rid}-0001.intent").write_text(sha)
    (s.root / "tmp" / f"{rid}-0002.safetensors").write_bytes(b"half")
    kept = s.write_artifact(s.start_run("train", {}), "checkpoint", lambda p: p.write_bytes(b"kept"))
    s.close()
    s = Store(tmp_path / "s")
    assert s.get_run(rid)["status"] == "interrupted"
    assert not orphan.exists() and not list((s.root / "tmp").iterdir())
    assert s.artifact_path(kept).read_bytes() == b"kept"


def test_a_store_in_a_folder_no_one_here_may_write_is_read(tmp_path):
    # a store on a read-only mount or in another user's folder: every command, even `runs`, was exit 5 "epcli.db is
    # not a readable SQLite database (attempt to write a readonly database)". SQLite cannot create a WAL database's
    # -shm file there, and the check of what the file holds opened it without the fallback the commands had.
    # Real permissions: as root (who ignores them) the commands run as nobody, in a folder nobody can reach.
    import shutil
    import tempfile
    from pathlib import Path
    root_user = os.geteuid() == 0
    if root_user and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot take write permission away")
    base = Path(tempfile.mkdtemp()) if root_user else tmp_path
    try:
        base.chmod(0o755)
        store = base / "shared store"
        s = Store(store)
        with s.run("train", {}, model="cnn") as rid:
            s.log_metric(rid, "test_acc", 0.5, step=1)
        s.close()
        assert not (store / "epcli.db-wal").exists()  # closed cleanly: nothing for a reader to create either
        before, listing = (store / "epcli.db").read_bytes(), sorted(p.name for p in store.iterdir())
        for p in [store, *store.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if root_user else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HOME": str(base)}

        def epcli(*args):
            return subprocess.run([*as_nobody, sys.executable, "-m", "epcli", "--store", str(store), *args],
                                  capture_output=True, text=True, env=env, cwd=base, timeout=120)
        r = epcli("runs", "--json")
        assert r.returncode == 0 and [x["run_id"] for x in json.loads(r.stdout)["runs"]] == [rid], r.stderr
        r = epcli("show", rid[:8], "--json")
        assert r.returncode == 0 and json.loads(r.stdout)["run"]["status"] == "finished", r.stderr
        r = epcli("tag", rid, "x")  # a write is still refused, with the store's own message
        assert r.returncode == 5 and r.stderr.startswith(f"error: the store {store} is read-only here"), r.stderr
        assert r.stderr.count("\n") == 1
        assert (store / "epcli.db").read_bytes() == before
        assert sorted(p.name for p in store.iterdir()) == listing  # no -wal, -shm
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if root_user:
            shutil.rmtree(base)


def test_run_management_on_a_read_only_store_says_so(tmp_path, monkeypatch):
    # tag, note, rm (even --dry-run, which deletes inside a rolled-back transaction) and gc were sqlite's
    # "OperationalError: attempt to write a readonly database"; now the store's own one-line StoreError
    import os

    from typer.testing import CliRunner

    from epcli.cli import app
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn") as rid:
        pass
    s.close()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode, **kw))
    before = (tmp_path / "s" / "epcli.db").read_bytes()
    for args in (["tag", rid, "x"], ["note", rid, "hello"], ["rm", rid], ["rm", rid, "--dry-run"], ["gc"]):
        r = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), *args], catch_exceptions=False)
        assert r.exit_code == 5 and r.stderr.startswith(f"error: the store {tmp_path / 's'} is read-only here"), \
            (args, r.output)
        assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "gc", "--dry-run"], catch_exceptions=False)
    assert r.exit_code == 0
    assert (tmp_path / "s" / "epcli.db").read_bytes() == before
    assert Store(tmp_path / "s", readonly=True).get_run(rid)["tags"] is None


def test_store_subfolders_that_are_files(tmp_path):
    # tmp/ a file: a write's cleanup raised NotADirectoryError over the StoreError (exit 1, a failed report run);
    # artifacts/ a file: a failed report run; .lock a folder: IsADirectoryError, exit 1, for every command
    import shutil

    from typer.testing import CliRunner

    from epcli.cli import app
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn", dataset="mini") as rid:
        s.log_metric(rid, "test_acc", 0.5, step=1)
    s.close()
    for name, args, needle in (("tmp", ["report", "--figures"], "tmp is a file, not a folder"),
                               ("artifacts", ["report", "--figures"], "artifacts is a file, not a folder"),
                               ("cache", ["report", "-f", "md", "--out", str(tmp_path / "out")], "cache is a file, not a folder"),
                               (".lock", ["runs"], "cannot open the store's lock file")):
        root = tmp_path / name.strip(".")
        shutil.copytree(tmp_path / "s", root)
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        target.unlink(missing_ok=True)
        target.mkdir() if name == ".lock" else target.write_text("x")
        r = CliRunner().invoke(app, ["--store", str(root), *args], catch_exceptions=False)
        assert r.exit_code == 5 and r.stderr.startswith("error: ") and needle in r.stderr, (name, r.output)
        assert r.stderr.count("\n") == 1
        assert [x["id"] for x in Store(root, readonly=True).find_runs()] == [rid]  # no run opened
