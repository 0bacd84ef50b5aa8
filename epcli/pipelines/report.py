"""`epcli report`: the store's results rendered, with figures and exports."""

from __future__ import annotations

import contextlib
from pathlib import Path

from epcli.store import Store


def report(*, store: Store, models: list[str] | None = None, runs: list[str] | None = None,
           dataset: str | None = None, fmt: str = "table", out: str | None = None, figures: bool = False,
           argv: list[str] | None = None) -> dict:
    """Collect the store's results; render them; optionally write figures and a self-contained HTML file."""
    from epcli import report as R
    from epcli.errors import UsageError
    if out and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report and its figures")
    if out:
        store.refuse_inside(out, "--out")
    data = R.collect(store, models=models, runs=runs, dataset=dataset)
    # with --out the html page (with figures) is written below; rendering it here too would be thrown away
    text = None if fmt == "table" or (fmt == "html" and out) else R.render(data, fmt)
    written = []
    if out or figures:
        out_dir = R.output_folder(out or store.root / "reports", "--out" if out else "the report folder")
        config = {"models": models, "runs": runs, "dataset": dataset, "format": fmt, "out": str(out_dir)}
        with store.run("report", config, argv=argv) as run_id:
            figs = _draw_figures(store, data, out_dir) if figures or fmt == "html" else []
            files = list(figs)
            if fmt == "robustbench":  # RobustBench's layout: <dataset>/<threat_model>/<ModelID>.json
                files += R.write_robustbench(data, out_dir)
            elif text is not None and fmt != "html":  # the html page is written once, below, with figures
                f = out_dir / f"report.{fmt}"
                f.write_text(text)
                files.append(f)
            if fmt == "html" or figures:
                f = out_dir / "report.html"
                f.write_text(R.html_report(data, figs))
                files.append(f)
            for f in files:
                store.add_file(run_id, "report", f, name=f.name)
            _link_sources(store, run_id, _source_run_ids(data))
            written = [str(f) for f in files]
        return {"run_id": run_id, "files": written, "data": data, "text": text}
    return {"run_id": None, "files": [], "data": data, "text": text}


# the figures drawn by a second process (the corruption figure and the sample grid: about half the drawing time)
_CHILD_KINDS = ("corruptions",)


def _draw_figures(store: Store, data, out_dir: Path) -> list[Path]:
    """Every figure (report.figures) and, when there are any, the corruption sample grid. On Linux with two or
    more CPUs, from a single-threaded process, the corruption figures are drawn by a forked child while this
    process draws the others (figures are independent; the child never touches the store: its queries run here
    first). If the child fails, this process draws them itself. The paths come in the order report.figures
    gives, then the sample grid."""
    import os
    import sys
    import threading

    from epcli import report as R
    sample = _corruption_sample_args(store, data, out_dir)

    def child_work() -> dict:
        figs = [str(p) for p in R.figures(data, out_dir, only=_CHILD_KINDS)]
        # the grid goes with the other figures (as before: none without any); a corrupt run makes a corruption figure
        anything = figs or data.curves or data.steps or data.unroll or data.adversarial
        return {"figures": figs,
                "samples": [str(p) for p in R.corruption_samples(*sample[0], **sample[1])] if sample and anything
                else []}

    forked = None
    # only from a single-threaded process: a child forked while another thread holds a lock could wait forever
    if (sys.platform.startswith("linux") and (os.cpu_count() or 1) > 1 and threading.active_count() == 1
            and os.environ.get("EPCLI_REPORT_FORK", "1") != "0"):
        forked = _fork(child_work)
    try:
        mine = R.figures(data, out_dir, only=[k for k in R.FIGURE_KINDS if k not in _CHILD_KINDS])
    except BaseException:  # an error, Ctrl-C or SIGTERM here: the child must not draw on after this process
        if forked is not None and hasattr(forked, "cancel"):
            forked.cancel()
        raise
    theirs = forked() if forked is not None else None
    if theirs is None:  # no child, or it failed: draw its part here
        theirs = child_work()
    figs = [Path(p) for p in theirs["figures"]]
    if not mine and not figs:
        return []  # nothing to draw: no sample grid either
    by_kind = {k: [] for k in R.FIGURE_KINDS}
    for f in mine + figs:
        stem = f.stem
        kind = ("robust" if stem.startswith("robust-") else "adversarial" if stem == "adversarial-examples"
                else "spectrum" if stem == "perturbation-spectrum" else stem)
        by_kind.setdefault(kind, []).append(f)
    return [f for k in by_kind for f in by_kind[k]] + [Path(p) for p in theirs["samples"]]


def _fork(work):
    """Run work() (returning JSON-able data) in a forked child; returns a function that waits for it and gives
    its result, or None when the child failed; its .cancel() ends and reaps the child (this process stopping).
    The child leaves with os._exit: no atexit handlers, no flushing of this process's buffers, no store access."""
    import json
    import os
    r, w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child
        code = 1
        try:
            os.close(r)
            with os.fdopen(w, "w") as f:
                json.dump(work(), f)
            code = 0
        finally:
            os._exit(code)
    os.close(w)

    reading = []  # the pipe's end is the file's once read() opens it (closed with it)

    def result():
        try:
            with os.fdopen(r) as f:
                reading.append(f)
                text = f.read()
        except BaseException:  # stopped while waiting (Ctrl-C, SIGTERM): end the child too
            cancel()
            raise
        _, status = os.waitpid(pid, 0)
        try:
            return json.loads(text) if status == 0 else None
        except ValueError:
            return None

    def cancel():
        """End the child now and reap it (this process is stopping: nothing more is drawn)."""
        import signal
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        if not reading:
            with contextlib.suppress(OSError):
                os.close(r)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    result.pid, result.cancel = pid, cancel
    return result


def _corruption_sample_args(store: Store, data, out_dir: Path) -> tuple[tuple, dict] | None:
    """The arguments of report.corruption_samples for the newest corruption sample grid among the reported models
    (the first model in report order whose newest finished corrupt run stored one), or None. Two queries,
    whatever the number of models."""
    import json

    rows = list(getattr(data, "rows", []) or [])
    ids = [row.run_id for row in rows]
    if not ids:
        return None
    ph = ",".join("?" * len(ids))
    newest: dict[str, str] = {}  # model run id -> its newest finished corrupt run (ids sort by time)
    for r in store.db.query(f"SELECT id, model_run_id FROM runs WHERE kind = 'corrupt' AND status = 'finished' "
                            f"AND model_run_id IN ({ph})", ids):
        if r["id"] > newest.get(r["model_run_id"], ""):
            newest[r["model_run_id"]] = r["id"]
    grids: dict[str, dict] = {}
    if newest:
        runs = list(newest.values())
        for a in store.db.query(
                f"SELECT a.sha256, a.meta, ra.run_id FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256 "
                f"WHERE ra.role = 'output' AND a.kind = 'corruption-grid' AND ra.run_id IN "
                f"({','.join('?' * len(runs))}) ORDER BY a.created_at", runs):
            grids[a["run_id"]] = a  # the last one of a run wins
    for row in rows:
        art = grids.get(newest.get(row.run_id, ""))
        if art is None:
            continue
        run = store.get_run(newest[row.run_id])
        meta = json.loads(art["meta"] or "{}") if isinstance(art["meta"], str) else (art["meta"] or {})
        cfg = run.get("config") or {}
        names = meta.get("corruptions") or cfg.get("corruptions") or []
        sev = meta.get("severities") or cfg.get("severities") or [1, 2, 3, 4, 5]
        return ((store.artifact_path(art["sha256"]), names, sev, out_dir),
                {"label": f"{row.name or row.label}, run {run['id']}"})
    return None


def _link_sources(store: Store, report_run: str, run_ids: list[str]) -> None:
    """Record each reported training run's first output artifact as an input of the report run: one query and
    one transaction (a link per model, each its own commit, took seconds at thousands of models)."""
    if not run_ids:
        return
    first: dict[str, str] = {}
    for a in store.db.query(
            f"SELECT ra.run_id, a.sha256 FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256 WHERE "
            f"ra.role = 'output' AND ra.run_id IN ({','.join('?' * len(run_ids))}) ORDER BY a.created_at", run_ids):
        first.setdefault(a["run_id"], a["sha256"])
    links = [{"run_id": report_run, "sha256": first[rid], "role": "input", "name": "source"}
             for rid in run_ids if rid in first]
    with store.write_transaction():
        store.db["run_artifacts"].insert_all(links, replace=True)


def _source_run_ids(data) -> list[str]:
    ids = []
    for row in getattr(data, "rows", []) or []:
        rid = getattr(row, "run_id", None)
        if rid:
            ids.append(rid)
    return ids


