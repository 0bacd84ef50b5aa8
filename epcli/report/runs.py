"""Views of single training runs: the lineage tree from a training run to every run derived from it (rich),
the per-epoch training history and curves, and two training runs side by side (config keys, final metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from epcli.errors import UsageError
from epcli.report.datamodel import _json, _label
from epcli.report.plotting import _colors, _plt, _save

# --- lineage -----------------------------------------------------------------------------------------------------

def _summary_text(summary: Any, limit: int = 4) -> str:
    s = _json(summary)
    if not isinstance(s, dict) or not s:
        return ""
    items = []
    for k, v in s.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)) or v is None or v == "":
            continue  # nested, or nothing to say: "reason=" alone tells a reader nothing
        items.append(f"{k}={v}")
        if len(items) >= limit:
            break
    return " · " + ", ".join(items) if items else ""


def _node_text(run: dict) -> str:
    cfg = run.get("config") if isinstance(run.get("config"), dict) else _json(run.get("config")) or {}
    bits = [f"[bold]{run['kind']}[/bold] {run['id']}"]
    if run["kind"] == "train":
        bits.append(f"{run.get('model')} on {run.get('dataset')}")
    elif isinstance(cfg, dict):
        what = " ".join(str(cfg[k]) for k in ("attack", "norm") if cfg.get(k))
        if cfg.get("eps") is not None:
            e = cfg["eps"]
            what += " ε=" + (",".join(f"{x:g}" for x in e) if isinstance(e, list) else f"{e}")
        if what:
            bits.append(what)
    status = run.get("status")
    color = {"finished": "green", "running": "yellow", "failed": "red", "interrupted": "magenta"}.get(status, "white")
    bits.append(f"[{color}]{status}[/{color}]")
    from rich.markup import escape

    from epcli.errors import printable  # control characters written out, as in every table
    return " ".join(bits[:1] + [escape(printable(b)) for b in bits[1:-1]] + bits[-1:]) + \
        escape(printable(_summary_text(run.get("summary"))))


def lineage_tree(store, run_id: str):
    """A rich Tree from a training run to every attack, corruption and report derived from it."""
    from rich.tree import Tree

    run = store.get_run(run_id)
    if run["kind"] != "train" and run.get("model_run_id"):
        run = store.get_run(run["model_run_id"])
    root = Tree(_node_text(run))
    for a in store.artifacts_of(run["id"], role="output"):
        root.add(f"[dim]{a['kind']} {a['name'] or ''} {a['sha256'][:12]}[/dim]")
    nodes = {run["id"]: root}
    derived = store.derived_runs(run["id"])
    for d in derived:
        parent = nodes.get(d["parent"], root)
        nodes[d["id"]] = parent.add(_node_text(d))
    # runs that name this model but read none of its artifacts (e.g. a report over the store)
    linked = {d["id"] for d in derived}
    for d in store.runs(model_run_id=run["id"]):
        if d["id"] != run["id"] and d["id"] not in linked:
            nodes[d["id"]] = root.add(_node_text(d))
    return root


# --- training runs: curves and comparison (run management, issue 15) ------------------------------------------

CURVE_METRICS = ("train_loss", "train_acc", "test_acc")


def training_history(store, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch metrics of a training run from the store: {name: [(epoch, value), ...]} (last write wins)."""
    out: dict[str, dict[int, float]] = {}
    for m in store.db.query("SELECT name, step, value FROM metrics WHERE run_id = ? AND step IS NOT NULL "
                            "ORDER BY id", [run_id]):
        out.setdefault(m["name"], {})[int(m["step"])] = m["value"]
    return {k: sorted(v.items()) for k, v in out.items()}


def training_curves(store, run_ids: list[str], out_dir: str | Path, option: str = "--out") -> list[Path]:
    """Training curves (train loss, train and test accuracy vs epoch), one line per training run, drawn from
    the per-epoch metrics in the store; PNG and SVG. Raises UsageError for a run that is not a training run
    or has no per-epoch metrics."""
    runs = [store.get_run(r) for r in run_ids]
    hist = {}
    for r in runs:
        if r["kind"] != "train":
            raise UsageError(f"run {r['id']} is {_a(r['kind'])} run; --curves draws training runs")
        hist[r["id"]] = training_history(store, r["id"])
        if not any(hist[r["id"]].get(k) for k in CURVE_METRICS):
            raise UsageError(f"training run {r['id']} has no per-epoch metrics")
    out_dir = output_folder(out_dir, option)  # after the checks: a refused request leaves no folder behind
    plt = _plt()
    labels = {r["id"]: f"{_label(r)} {r['id']}" for r in runs}  # the whole id: runs minutes apart share its head
    colors = _colors(list(labels.values()))
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.4))
    for ax, name in zip(axes, CURVE_METRICS):
        for r in runs:
            pts = hist[r["id"]].get(name) or []
            if pts:
                ax.plot([e for e, _ in pts], [v * 100 if name.endswith("_acc") else v for _, v in pts],
                        marker="o", ms=3, color=colors[labels[r["id"]]], label=labels[r["id"]])
        ax.set_xlabel("epoch")
        ax.set_title(name.replace("_", " ") + (" (%)" if name.endswith("_acc") else ""))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths: list[Path] = []
    _save(fig, out_dir, "training-curves", paths)
    return paths


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def output_folder(folder: str | Path, option: str) -> Path:
    """The folder a report writes into, created if needed; one it cannot create or write is a usage error
    (was a FileNotFoundError / NotADirectoryError / FileExistsError traceback line, exit 1)."""
    import os
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder} is a file; give a folder for the report and its figures")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {folder}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {folder}: no write permission on the folder")
    # a folder named report.csv or robust-pgd-linf.png there: the write failed inside the report run (exit 1)
    clash = sorted(p.name for p in folder.iterdir() if p.suffix in _REPORT_SUFFIXES and not p.is_file())
    if clash:
        raise UsageError(f"{option} {folder}: {clash[0]} there is not a file; the report writes files by such names "
                         "(move it, or choose another folder)")
    return folder


_REPORT_SUFFIXES = (".csv", ".json", ".md", ".html", ".png", ".svg")  # what a report writes into its folder


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys: {"recipe": {"lr": 0.1}} -> {"recipe.lr": 0.1}."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def training_diff(store, run_a: str, run_b: str) -> dict:
    """Two training runs side by side: every config key that differs, and the final value of every
    per-epoch metric (b - a as diff)."""
    a, b = store.get_run(run_a), store.get_run(run_b)
    for r in (a, b):
        if r["kind"] != "train":
            raise UsageError(f"run {r['id']} is {_a(r['kind'])} run; compare two training runs or two attack runs")
    fa, fb = flatten_config(a.get("config") or {}), flatten_config(b.get("config") or {})
    diff = [{"key": k, "a": fa.get(k), "b": fb.get(k)} for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)]
    ha, hb = training_history(store, a["id"]), training_history(store, b["id"])
    metrics = []
    for name in sorted((set(ha) | set(hb)) - {"epoch"}):
        va = ha[name][-1][1] if ha.get(name) else None
        vb = hb[name][-1][1] if hb.get(name) else None
        metrics.append({"name": name, "a": va, "b": vb,
                        "diff": None if va is None or vb is None else vb - va})
    side = lambda r: {"run_id": r["id"], "model": r.get("model"), "dataset": r.get("dataset"),  # noqa: E731
                      "status": r["status"]}
    return {"a": side(a), "b": side(b), "config_diff": diff, "metrics": metrics}
