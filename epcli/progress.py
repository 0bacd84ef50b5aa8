"""Progress on stderr for the CLI: the pipelines call `progress(task, done, total, info)`; this turns it into
a live display on a terminal, or into one plain line per finished stage when stderr is a file or a pipe (plus,
every EPCLI_PROGRESS_EVERY seconds, default 60, a line for each stage still running, with its ETA).

A task is a named stage ("load", "pgd 8/255", "check strength", "epoch 2/3", "save"). It appears on its
first call (pipelines call with done=0 when a stage starts, so nothing is ever silent) and is finished when
done reaches total: the display then prints one line with its count, elapsed time and the info of its last
call (metrics), never cut, and drops its bar. On a terminal the unfinished tasks show a bar with count,
elapsed time and ETA, refreshed several times a second. CLI side only: the science modules never see this.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


def format_info(info: dict | None) -> str:
    """key=value pairs of the scalar entries of `info` (floats to 4 significant digits); keys starting with
    an underscore and nested values are left out."""
    parts = []
    for k, v in (info or {}).items():
        if k.startswith("_") or isinstance(v, bool) or v is None:
            continue
        if isinstance(v, float):
            parts.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str)):
            parts.append(f"{k}={v}")
    return "  ".join(parts)


def format_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _count(done: float, total: float) -> str:
    return f"{int(done)}/{int(total)}"


class _Info(ProgressColumn):
    """The task's info, cut with an ellipsis to the width left on the line (live display only)."""

    def render(self, task) -> Text:
        return Text(task.fields.get("info", ""), no_wrap=True, overflow="ellipsis", style="dim")


class StageProgress:
    """A callable progress sink `(task, done, total, info)`; use as a context manager.

    live: a rich display (stderr is a terminal); otherwise plain lines on `stream` (default sys.stderr).
    """

    def __init__(self, *, live: bool | None = None, stream: TextIO | None = None, console: Console | None = None,
                 every: float | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        # plain lines only: a stage still running says where it is every `every` seconds (a log of a long job
        # under nohup or a batch scheduler is otherwise silent for hours); EPCLI_PROGRESS_EVERY, 0 = never
        self.every = _every_from_env() if every is None else float(every)
        self.console = console or Console(file=self.stream, stderr=self.stream is sys.stderr)
        self._bar: Progress | None = None
        self._tasks: dict[str, dict[str, Any]] = {}  # name -> {id, start, done, total, info}
        self._finished: set[str] = set()  # a repeated final call for these is not a new stage
        self.lines: list[str] = []  # every finished-stage line, in order (also for tests)

    # the callback
    def __call__(self, task: str, done: float, total: float, info: dict | None = None) -> None:
        now = time.monotonic()
        t = self._tasks.get(task)
        total = max(float(total or 0), 0.0)
        if task in self._finished:
            if total and done >= total:
                return
            self._finished.discard(task)
        if t is not None and done < t["done"]:  # the same name again from the start: a new stage
            self._drop(task)
            t = None
        if t is None:
            # base: when and where this process's own work began (the ETA's rate): a stage may open with work
            # already done, or jump to it (an attack's saved chunks, info "resumed")
            t = {"start": now, "done": 0.0, "total": total, "info": "", "id": None, "said": now,
                 "base": (now, float(done))}
            self._tasks[task] = t
            if self.live:
                self._ensure_bar()
                t["id"] = self._bar.add_task(task, total=total or None, info="", eta=_eta_word(False))
        elif t["done"] == 0 and done == 0:  # opened ahead of its work (an attack's later eps): its clock starts now
            t["start"] = t["said"] = now
            t["base"] = (now, 0.0)
            if self.live and t["id"] is not None:
                self._bar.reset(t["id"], total=total or None, completed=0)
        t["done"], t["total"] = float(done), total
        if info and info.get("resumed"):
            t["base"] = (now, float(done))
            if self.live and t["id"] is not None:  # the jump to the saved work is no speed: restart the bar's rate
                self._bar.reset(t["id"], total=total or None, completed=done)
        text = format_info(info)
        if text:
            t["info"] = text
        if info and info.get("_eta_bound") is not None:  # the stage may end early: its ETA is an upper bound
            t["bound"] = bool(info["_eta_bound"])
        if self.live and t["id"] is not None:
            self._bar.update(t["id"], completed=done, total=total or None, info=t["info"],
                             eta=_eta_word(t.get("bound", False)))
        if total and done >= total:
            self._finish(task, now)
        elif not self.live and self.every > 0 and now - t["said"] >= self.every:
            t["said"] = now
            self._write(self._running_line(task, t, now))

    def note(self, markup: str) -> None:
        """A message between stages (rich markup), printed above the live bars or as a plain line."""
        if self.live and self._bar is not None:
            self._bar.console.print(markup, highlight=False, soft_wrap=True)
        elif self.live:
            self.console.print(markup, highlight=False, soft_wrap=True)
        else:
            self.stream.write(Text.from_markup(markup).plain + "\n")
            self.stream.flush()

    # context manager
    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        now = time.monotonic()
        for name in list(self._tasks):  # stages cut short: say where they stopped, unless it was at once
            t = self._tasks[name]        # (a bad argument's one-line error then stands alone)
            if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt) and now - t["start"] < 2.0:
                self._drop(name)
                continue
            self._emit(f"{name}  stopped at {_count(t['done'], t['total'])} after "
                       f"{format_seconds(now - t['start'])}" + (f"  {t['info']}" if t["info"] else ""))
            self._drop(name)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # internals
    def _ensure_bar(self) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=12), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), TimeRemainingColumn(), _Info(),
                console=self.console, transient=True, refresh_per_second=4, redirect_stdout=False,
                redirect_stderr=False)
            self._bar.start()

    def _finish(self, name: str, now: float) -> None:
        t = self._tasks[name]
        self._finished.add(name)
        self._emit(f"{name}  {_count(t['done'], t['total'])}  {format_seconds(now - t['start'])}"
                   + (f"  {t['info']}" if t["info"] else ""))
        self._drop(name)

    def _drop(self, name: str) -> None:
        t = self._tasks.pop(name, None)
        if t is not None and t["id"] is not None and self._bar is not None:
            self._bar.remove_task(t["id"])

    @staticmethod
    def _running_line(name: str, t: dict, now: float) -> str:
        """"pgd 8/255  120/1000  1:05  eta 7:57  robust_acc=0.3": a stage still running, in a plain log."""
        elapsed = now - t["start"]
        since, base = t["base"]
        left = ((now - since) * (t["total"] - t["done"]) / (t["done"] - base)
                if t["total"] and t["done"] > base and now > since else None)
        eta = f"  {_eta_word(t.get('bound', False))} {format_seconds(left)}" if left is not None else ""
        return (f"{name}  {_count(t['done'], t['total'])}  {format_seconds(elapsed)}{eta}"
                + (f"  {t['info']}" if t["info"] else ""))

    def _emit(self, line: str) -> None:
        self.lines.append(line)
        if self.live and self._bar is not None:
            self._bar.console.print(Text(line), soft_wrap=True)  # above the live bars; wraps, never cut
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


def _eta_word(bound: bool) -> str:
    """"eta", or "eta ≤" for a stage whose count is an upper bound (an attack that stops on broken images)."""
    return "eta ≤" if bound else "eta"


def _every_from_env() -> float:
    """EPCLI_PROGRESS_EVERY: seconds between a running stage's plain lines (default 60; 0 = only finished
    stages). A bad value is the default, not an error: progress must never stop a run."""
    import os
    try:
        value = float(os.environ.get("EPCLI_PROGRESS_EVERY", "60"))
    except ValueError:
        return 60.0
    return value if value >= 0 and value == value else 60.0
