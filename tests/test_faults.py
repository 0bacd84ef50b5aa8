"""Fault injection: real `epcli` processes killed with SIGKILL at seeded random moments of train / attack /
corrupt, then the store's invariants checked and the work resumed.

After every kill: no run is left `running`, every artifact row has its file and every file its row, every
produced artifact is linked to its run, no temp file of a dead process is left; and resuming (or re-running)
reaches exactly the result of an uninterrupted run. The number of kills is bounded (EPCLI_FAULT_KILLS per
pipeline, default 2) and seeded (EPCLI_FAULT_SEED), so the suite stays within the CI budget; raise them
for a deeper local probe.
"""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_imagefolder

from epcli.store import Store

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("EPCLI_FAULT_KILLS", "2"))
SEED = int(os.environ.get("EPCLI_FAULT_SEED", "0"))
ROOT = Path(__file__).resolve().parents[1]


def epcli(store, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "EPCLI_DEVICE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "epcli", "--quiet", "--store", str(store), *map(str, args),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return json.loads(out)


def run_started(store: Path, pid: int, timeout: float = 120) -> float:
    """Wait until process `pid` has opened its run (the interesting part begins); returns that time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (store / "epcli.db").exists():
            try:
                conn = sqlite3.connect(f"{(store / 'epcli.db').resolve().as_uri()}?mode=ro", uri=True, timeout=5)
                row = conn.execute("SELECT 1 FROM runs WHERE pid = ? LIMIT 1", [pid]).fetchone()
                conn.close()
                if row:
                    return time.time()
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    raise AssertionError(f"process {pid} opened no run within {timeout} s")


def kill_after(p: subprocess.Popen, store: Path, delay: float) -> bool:
    """SIGKILL `p` `delay` seconds after its run opened. True if it was killed (not already finished)."""
    run_started(store, p.pid)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.communicate()
        return True
    p.communicate()
    return False


def moment(rng: random.Random, k: int, window: float) -> float:
    """The k-th kill's delay: a seeded random point in the k-th of KILLS equal slices of the run's window, so
    that even two kills land early and late (before and after the first checkpoints)."""
    return window * (k + rng.random()) / KILLS


def timed_run(store, *args) -> tuple[dict, float]:
    """An uninterrupted run and the seconds from its run opening to its exit (the window kills aim at)."""
    p = epcli(store, *args)
    t0 = run_started(store, p.pid)
    res = finish(p)
    return res, time.time() - t0


def assert_consistent(root: Path) -> None:
    """The store's invariants, checked after the next process opened it (which marks dead runs)."""
    s = Store(root)
    try:
        assert [r["id"] for r in s.runs(status="running")] == []
        rows = {a["sha256"]: a for a in s.db["artifacts"].rows}
        for sha, a in rows.items():
            p = Path(a["path"])
            p = p if p.is_absolute() else root / p
            assert p.is_file(), f"artifact row {sha[:12]} has no file"
            if a["run_id"]:
                links = list(s.db.query("SELECT 1 FROM run_artifacts WHERE sha256 = ? AND run_id = ? AND "
                                        "role = 'output'", [sha, a["run_id"]]))
                assert links, f"artifact {sha[:12]} is not linked to the run that produced it"
        files = [f for f in (root / "artifacts").rglob("*") if f.is_file()] if (root / "artifacts").exists() \
            else []
        for f in files:
            assert f.name.split(".")[0] in rows, f"orphan artifact file {f.relative_to(root)}"
        assert not list((root / "tmp").glob("*")) if (root / "tmp").exists() else True
        if (root / "partial").exists():
            for d in (root / "partial").iterdir():  # only folders an unfinished attack can resume from
                rid = d.name.rsplit("-", 1)[-1]
                assert s.get_run(rid)["status"] in ("interrupted", "failed")
    finally:
        s.close()


def model_tensors(store: Path, train: dict) -> dict:
    from safetensors.torch import load_file
    s = Store(store)
    path = s.artifact_path(train["checkpoint"])
    s.close()
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def data(tmp_path_factory, mini):
    return write_imagefolder(tmp_path_factory.mktemp("fault-data") / "small", mini, 10, 6)


def test_train_killed_at_random_moments_resumes_bit_exact(tmp_path, data):
    rng = random.Random(SEED)
    args = ["train", "--model", "cnn-small", "--dataset", data, "--epochs", 4, "--batch-size", 25]
    ref, window = timed_run(tmp_path / "ref", *args)
    ref_w = model_tensors(tmp_path / "ref", ref)
    for k in range(KILLS):
        store = tmp_path / f"kill{k}"
        killed = kill_after(epcli(store, *args), store, moment(rng, k, window))
        assert_consistent(store)
        s = Store(store)
        run = s.runs(kind="train")[0]
        ckpt = s.artifacts_of(run["id"], role="output", kind="checkpoint")
        s.close()
        if run["status"] == "finished":  # the kill came after the run closed (or never: it had ended)
            res = {"test_acc": run["summary"]["test_acc"], "checkpoint": ckpt[-1]["sha256"]}
        else:
            assert killed and run["status"] == "interrupted"
            again = ["train", "--resume", run["id"], "--dataset", data] if ckpt else args
            res = finish(epcli(store, *again))
            assert_consistent(store)
        assert res["test_acc"] == ref["test_acc"]
        w = model_tensors(store, res)
        assert w.keys() == ref_w.keys() and all((w[n] == ref_w[n]).all() for n in w)  # bit-exact


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    store = tmp_path_factory.mktemp("fault-store")
    finish(epcli(store, "train", "--model", "cnn-small", "--dataset", data, "--epochs", 1))
    return store


def test_attack_killed_at_random_moments_resumes_to_the_same_result(trained):
    rng = random.Random(SEED + 1)
    args = ["attack", "--model", "cnn-small", "--n", 60, "--batch-size", 10, "--steps", 3, "--eps",
            "2/255,8/255", "--no-strength-check", "--no-checks"]
    ref, window = timed_run(trained, *args)
    for k in range(KILLS):
        killed = kill_after(epcli(trained, *args), trained, moment(rng, k, window))
        assert_consistent(trained)
        if killed:
            res = finish(epcli(trained, *args))  # the same arguments: takes over the partial chunks
            assert_consistent(trained)
            assert (res["clean_acc"], res["results"]) == (ref["clean_acc"], ref["results"])
    assert not (trained / "partial").exists()  # every attack ended: nothing left to resume


def test_corrupt_killed_then_rerun(trained):
    rng = random.Random(SEED + 2)
    args = ["corrupt", "--model", "cnn-small", "--n", 30, "-c", "fog", "-c", "gaussian_noise", "-s", 1, "-s", 5]
    ref, window = timed_run(trained, *args)
    for k in range(max(1, KILLS // 2)):
        kill_after(epcli(trained, *args), trained, moment(rng, k, window))
        assert_consistent(trained)
    res = finish(epcli(trained, *args))
    assert len(res["cells"]) == 4 and (res["clean_acc"], res["cells"]) == (ref["clean_acc"], ref["cells"])
    assert_consistent(trained)


def test_two_identical_attacks_at_once_both_finish(trained):
    args = ["attack", "--model", "cnn-small", "--n", 40, "--batch-size", 10, "--steps", 2, "--seed", 5,
            "--no-strength-check", "--no-checks"]
    procs = [epcli(trained, *args) for _ in range(2)]
    a, b = [finish(p) for p in procs]
    assert a["run_id"] != b["run_id"] and a["results"] == b["results"]
    assert_consistent(trained)


def test_kill_after_the_last_checkpoint_resumes_to_a_finished_run(tmp_path, data):
    """The exact state a kill leaves between the last epoch's checkpoint and closing the run: resuming
    records that checkpoint as final (not "ran no epoch", not a failed run)."""
    from epcli import api
    s = Store(tmp_path / "s")
    done = api.train(model="cnn-small", dataset=str(data), overrides={"epochs": 2}, store=s, device="cpu")
    s.db.execute("UPDATE runs SET status = 'interrupted', summary = NULL WHERE id = ?", [done["run_id"]])
    s.db.execute("UPDATE run_artifacts SET name = 'last' WHERE run_id = ? AND role = 'output'", [done["run_id"]])
    res = api.train(model="cnn-small", dataset=str(data), resume=done["run_id"], store=s, device="cpu")
    run = s.get_run(res["run_id"])
    assert run["status"] == "finished" and res["checkpoint"] == done["checkpoint"]
    assert res["test_acc"] == done["test_acc"]
    assert api.resolve_model(s, res["run_id"])["sha256"] == done["checkpoint"]
    s.close()
    assert_consistent(tmp_path / "s")


def _temps(folder: Path) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if ".tmp" in f.name) if folder.exists() else []


def test_export_killed_while_writing_leaves_no_temp_after_the_next_export(tmp_path):
    """SIGKILL an export at the moment a temporary file exists (polled), then export again into the same folder:
    exactly the expected files, no temporary left, and bytes identical to an uninterrupted export."""
    store = tmp_path / "store"
    args = ["corrupt", "--export", None, "--n", 1000, "-c", "brightness", "-c", "contrast", "-c", "saturate"]
    expected = sorted(["brightness.npy", "contrast.npy", "saturate.npy", "labels.npy", "clean.npy"])
    ref_dir = tmp_path / "ref"
    finish(epcli(store, *[ref_dir if a is None else a for a in args]))
    assert sorted(f.name for f in ref_dir.iterdir()) == expected

    out = tmp_path / "out"
    caught = []
    for _ in range(3):  # a temporary lives for the few milliseconds np.save takes: poll until one is seen
        p = epcli(store, *[out if a is None else a for a in args])
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if _temps(out):
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
        p.communicate()
        if p.returncode == -signal.SIGKILL:
            caught = _temps(out)
            break
    assert caught, "no export was caught writing a temporary file (3 tries)"
    res = finish(epcli(store, *[out if a is None else a for a in args]))
    assert res["n_examples"] == 1000
    assert sorted(f.name for f in out.iterdir()) == expected  # the killed export's temporary is gone
    for name in expected:
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name
