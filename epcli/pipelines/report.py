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
    text = None if fmt == "table" else R.render(data, fmt)
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
            for rid in _source_run_ids(data):
                for a in store.artifacts_of(rid, role="output")[:1]:
                    store.link(run_id, a["sha256"], "input", "source")
            written = [str(f) for f in files]
        return {"run_id": run_id, "files": written, "data": data, "text": text}
    return {"run_id": None, "files": [], "data": data, "text": text}


def _corruption_samples(store: Store, data, out_dir: Path) -> list[Path]:
    """The newest corruption sample grid among the reported models, redrawn with (corruption, severity) labels."""
    import json

    from epcli import report as R
    for row in getattr(data, "rows", []) or []:
        for run in store.runs(kind="corrupt", status="finished", model_run_id=row.run_id, limit=1):
            arts = store.artifacts_of(run["id"], role="output", kind="corruption-grid")
            if arts:
                meta = arts[-1].get("meta") or {}
                meta = json.loads(meta) if isinstance(meta, str) else meta
                cfg = run.get("config") or {}
                names = meta.get("corruptions") or cfg.get("corruptions") or []
                sev = meta.get("severities") or cfg.get("severities") or [1, 2, 3, 4, 5]
                return R.corruption_samples(store.artifact_path(arts[-1]["sha256"]), names, sev, out_dir,
                                            label=f"{row.name or row.label}, run {run['id']}")
    return []


def _source_run_ids(data) -> list[str]:
    ids = []
    for row in getattr(data, "rows", []) or []:
        rid = getattr(row, "run_id", None)
        if rid:
            ids.append(rid)
    return ids


