"""epcli.atomic: files appear whole or not at all, and the temporaries of killed writers are removed (only
those, only epcli's)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from epcli import atomic


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (the ids are not reused this quickly)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "a.npy"
    atomic.atomic_write(target, lambda p: p.write_bytes(b"one"), mode=0o644)
    assert target.read_bytes() == b"one" and (target.stat().st_mode & 0o777) == 0o644

    def fails(p):
        p.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        atomic.atomic_write(target, fails)
    assert target.read_bytes() == b"one"  # untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.npy"]  # and no temporary left


def test_temporary_names_say_whose_they_are(tmp_path):
    t = atomic.temp_path(tmp_path / "fog.npy")
    assert t.parent == tmp_path and t.name.startswith(".fog.npy.") and t.name.endswith(".tmp")
    assert f".{os.getpid()}-" in t.name
    assert not atomic.is_stale_temp(t.name)  # this process runs


def test_remove_stale_temps_removes_only_dead_writers_temporaries(tmp_path, dead_pid):
    host = atomic._HOST
    files = {
        f".fog.npy.{host}.{dead_pid}-0123abcd.tmp": True,          # ours, writer gone
        f".fog.npy.{host}.{os.getpid()}-0123abcd.tmp": False,      # ours, this process
        f".fog.npy.{host}.{os.getppid()}-0123abcd.tmp": False,     # ours, a running process
        f".fog.npy.otherhost.{dead_pid}-0123abcd.tmp": False,      # another host's: cannot tell
        ".labels.npy.a1b2c3d_.tmp": True,                          # an earlier export's (mkstemp), old
        ".notes.txt.a1b2c3d_.tmp": False,                          # mkstemp-like, not a file export writes
        f"cifar10-0123.tmp{dead_pid}": False,                      # earlier data-cache naming: not asked for
        "fog.npy": False, "mine.tmp": False, "labels.npy": False,  # the user's files
    }
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    old = atomic.PROCESS_START - 60
    os.utime(tmp_path / ".labels.npy.a1b2c3d_.tmp", (old, old))
    os.utime(tmp_path / ".notes.txt.a1b2c3d_.tmp", (old, old))
    removed = atomic.remove_stale_temps(tmp_path, targets={"fog.npy", "labels.npy"}, legacy=("mkstemp",))
    assert sorted(p.name for p in removed) == sorted(n for n, stale in files.items() if stale)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(n for n, stale in files.items() if not stale)
    # without targets, any name; the earlier data-cache naming when asked for; an mkstemp temporary written after
    # this process started may belong to a live export of an earlier version: kept
    fresh = tmp_path / ".fog.npy.zzzzzzzz.tmp"
    fresh.write_bytes(b"x")
    os.utime(fresh, (time.time(), time.time()))
    removed = atomic.remove_stale_temps(tmp_path, legacy=("pid", "mkstemp"))
    assert sorted(p.name for p in removed) == [".notes.txt.a1b2c3d_.tmp", f"cifar10-0123.tmp{dead_pid}"]
    assert fresh.exists()


def test_export_removes_a_killed_exports_temporaries_and_nothing_else(tmp_path, dead_pid):
    import torch

    from epcli import corruptions as C
    out = tmp_path / "export"
    out.mkdir()
    stale = out / f".fog.npy.{atomic._HOST}.{dead_pid}-0123abcd.tmp"
    stale.write_bytes(b"half a file")
    keep = out / "README.txt"
    keep.write_text("the user's")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    C.export(out, x, torch.arange(4), names=["brightness"])
    assert sorted(f.name for f in out.iterdir()) == ["README.txt", "brightness.npy", "clean.npy", "labels.npy"]
