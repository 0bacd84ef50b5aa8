"""Atomic file writes, and the removal of the temporary files a killed writer leaves behind.

A file is written under a temporary name in its own folder and renamed into place (os.replace), so a reader
sees the old file or the complete new one, never half of one. A SIGKILL cannot be caught, so a kill between
the two leaves the temporary file; its name says which process wrote it:

    .<name>.<host>.<pid>-<token>.tmp        e.g. .fog.npy.box1.4242-9f3a0c1d.tmp

`remove_stale_temps(folder)` (run before writing into a folder) deletes the temporaries of processes on this
host that no longer run. Asked to (`legacy=`), it also knows the namings of earlier epcli versions:
`<name>.tmp<pid>` (the data cache, checkpoints), removed when that process is gone, and tempfile's
`.<name>.<8 chars>.tmp` (corruption exports), which carries no process id and is removed when it was last
written before this process started. `targets=` limits it to the temporaries of the given final names, so that
a folder of the user's (an export folder) loses nothing but epcli's own leftovers. Temporaries of other hosts
(a shared folder) are left alone: their process cannot be checked from here.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Callable

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_OURS = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_PID_SUFFIX = re.compile(r"^(?P<target>.+)\.tmp(?P<pid>\d+)$")  # earlier data-cache and checkpoint temporaries
_MKSTEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")  # tempfile.mkstemp: earlier corruption exports


def _process_start() -> float:
    """This process's start time (epoch seconds), from /proc where there is one."""
    try:
        ticks = int(Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()
PROCESS_START = _process_start()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a process we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under before its rename: same folder, hidden, owned by this process."""
    p = Path(path)
    return p.with_name(f".{p.name}.{_HOST}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], mode: int | None = None) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it to `path` (atomic on one file
    system). On any error the temporary is removed and the error raised; `path` is then untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_stale_temp(name: str, mtime: float | None = None, targets=None, legacy: tuple[str, ...] = ()) -> bool:
    """Whether a file name is an epcli temporary whose writer is gone (see the module docstring). `targets`:
    only temporaries of these final names; `legacy`: also the earlier namings "pid" and/or "mkstemp"."""
    for kind, rx in (("ours", _OURS), ("pid", _PID_SUFFIX), ("mkstemp", _MKSTEMP)):
        m = rx.match(name)
        if m is None or (kind != "ours" and kind not in legacy):
            continue
        if targets is not None and m["target"] not in targets:
            return False
        if kind == "mkstemp":
            return mtime is not None and mtime < PROCESS_START
        pid = int(m["pid"])
        return (kind == "pid" or m["host"] == _HOST) and pid != os.getpid() and not pid_alive(pid)
    return False


def remove_stale_temps(folder: str | os.PathLike, targets=None, legacy: tuple[str, ...] = ()) -> list[Path]:
    """Delete the temporaries of dead writers directly in `folder` (not below); returns what was removed.
    Never raises: a file that vanished or cannot be removed is skipped."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if ".tmp" not in e.name:
            continue
        try:
            if not e.is_file(follow_symlinks=False) or not is_stale_temp(
                    e.name, e.stat(follow_symlinks=False).st_mtime, targets, legacy):
                continue
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            continue
    return removed
