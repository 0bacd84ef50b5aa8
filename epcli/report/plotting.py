"""What every figure shares: matplotlib on the Agg backend, PNG + SVG saved reproducibly (no dates,
fixed SVG ids), one colour per model, and which models a figure draws when there are more than it can tell
apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from epcli.report.datamodel import ReportData


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out_dir: Path, name: str, paths: list[Path]) -> None:
    plt = _plt()
    import matplotlib
    for ext in ("png", "svg"):
        p = out_dir / f"{name}.{ext}"
        with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
            fig.savefig(p, dpi=110, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        paths.append(p)
    plt.close(fig)


def _colors(labels: list[str]) -> dict[str, Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _row_labels(data: ReportData) -> dict[str, str]:
    """Unique display labels per training run: the tables' names (the label, plus the seed or the run id when
    labels repeat; six characters of the id were the same for runs minutes apart, and equal labels shared a
    colour)."""
    return {r.run_id: r.name or r.label for r in data.rows}


FIGURE_MODELS = 10  # lines one figure can tell apart (ten colours) and a legend can hold
ADVERSARIAL_MODELS = 4  # row pairs (per norm) of the adversarial-example grid: 2 x 12 panels each at 11 eps


def _figure_models(data: ReportData, names: dict[str, str], have: dict[str, Any],
                   limit: int = FIGURE_MODELS) -> tuple[list[str], dict, str]:
    """The models a figure draws, in report order: every model with data for it, or, when more than `limit`
    have some, the `limit` newest (run ids sort by time). Returns their run ids, their colours, and a note for
    the title saying how many were left out ("" when none)."""
    with_data = [r.run_id for r in data.rows if have.get(r.run_id)]
    if len(with_data) <= limit:
        return with_data, _colors(list(names.values())), ""
    keep = set(sorted(with_data)[-limit:])
    shown = [rid for rid in with_data if rid in keep]
    return shown, _colors([names[rid] for rid in shown]), (
        f" ({limit} newest of {len(with_data):,} models; pick others with --model/--run)")
