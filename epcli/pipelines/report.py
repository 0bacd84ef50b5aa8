"""`epcli report`: the store's results rendered, with figures and exports."""

from __future__ import annotations

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
    data = R.collect(store, models=models, runs=runs, dataset=dataset)
    # with --out the html page (with figures) is written below; rendering it here too would be thrown away
    text = None if fmt == "table" or (fmt == "html" and out) else R.render(data, fmt)
    written = []
    if out or figures:
        out_dir = Path(out or store.root / "reports")
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"models": models, "runs": runs, "dataset": dataset, "format": fmt, "out": str(out_dir)}
        with store.run("report", config, argv=argv) as run_id:
            figs = R.figures(data, out_dir) if figures or fmt == "html" else []
            if figs:
                figs += _corruption_samples(store, data, out_dir)
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


def _corruption_samples(store: Store, data, out_dir: Path) -> list[Path]:
    """The newest corruption sample grid among the reported models (the first model in report order whose newest
    finished corrupt run stored one), redrawn with (corruption, severity) labels. Two queries, whatever the
    number of models."""
    import json

    from epcli import report as R
    rows = list(getattr(data, "rows", []) or [])
    ids = [row.run_id for row in rows]
    if not ids:
        return []
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
        return R.corruption_samples(store.artifact_path(art["sha256"]), names, sev, out_dir,
                                    label=f"{row.name or row.label}, run {run['id']}")
    return []


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


