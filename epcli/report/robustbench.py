"""RobustBench export: one model_info record per model with an AutoAttack result at RobustBench's eps
(L∞ 8/255, L2 0.5) or a complete 15-corruption run, in RobustBench's <dataset>/<threat_model>/<ModelID>.json
layout; and why each other model is left out."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from epcli.errors import NotFoundError
from epcli.report.comparison import _paper_registry
from epcli.report.datamodel import Cell, ReportData, Row, _fmt, _grad, eps_label

# RobustBench's model_info/<dataset>/<threat_model>/<ModelID>.json: field names and meanings as in its repository
# (strings for accuracies in percent, eps as "8/255" or "0.5", null for corruptions).
ROBUSTBENCH_DATASETS = {"cifar10": "cifar10", "cifar10-mini": "cifar10", "cifar100": "cifar100",
                        "imagenet": "imagenet"}
ROBUSTBENCH_EPS = {"linf": 8 / 255, "l2": 0.5}
PAPER_LINK = "https://arxiv.org/abs/2401.11543"
PAPER_AUTHORS = "Siddharth Mansingh, Michal Kucer, Garrett Kenyon, Juston Moore, Michael Teti"


def robustbench_id(row: Row) -> str:
    """A RobustBench-style model id: epcli_<label>_<run id>, with only letters, digits, - and _."""
    label = re.sub(r"[^A-Za-z0-9]+", "_", row.label).strip("_") or row.model
    return f"epcli_{label}_{row.run_id}"


def _forward_passes(row: Row, cell: Cell | None = None) -> int:
    """RobustBench's number_forward_passes: network evaluations per prediction (an EP-CNN relaxes T steps)."""
    t = None
    if cell is not None and isinstance(cell.forward_passes_T, (int, float)):
        t = cell.forward_passes_T
    for d in (row.config, row.config.get("recipe") if isinstance(row.config.get("recipe"), dict) else {},
              row.config.get("spec") if isinstance(row.config.get("spec"), dict) else {}):
        if t is None and isinstance(d, dict) and isinstance(d.get("T"), (int, float)):
            t = d["T"]
    if t is None and row.equilibrium.get("T") is not None:
        t = row.equilibrium["T"]
    return int(t) if t else 1


def robustbench_files(data: ReportData) -> tuple[dict[str, dict], list[str]]:
    """{"<dataset>/<threat_model>/<ModelID>.json": record} for every model with an AutoAttack result at
    RobustBench's eps (Linf 8/255, L2 0.5) or a complete 15-corruption run; and why each other model is absent."""
    files, skipped = {}, []
    for row in data.rows:
        ds = ROBUSTBENCH_DATASETS.get(str(row.dataset).lower())
        name = row.name or row.label
        if ds is None:
            skipped.append(f"{name}: dataset {row.dataset} is not one of RobustBench's")
            continue
        papers_model = bool(row.paper_key) and _paper_registry(row.paper_key) == row.model  # not a demo net
        common = {"link": PAPER_LINK if papers_model else "",
                  "name": f"{row.label} (epcli run {row.run_id})",
                  "authors": PAPER_AUTHORS if papers_model else "",
                  "additional_data": False, "number_forward_passes": _forward_passes(row), "dataset": ds,
                  "venue": "epcli", "architecture": row.model}
        data_note = ("data: the embedded mini CIFAR-10 (real CIFAR-10 test images, JPEG q75), not the full test "
                     "set" if str(row.dataset).lower() == "cifar10-mini" else "")
        relax = ("the EP-CNN relaxes to an energy minimum at inference (an optimization loop), so it is outside "
                 "RobustBench's standardized track" if str(row.model).startswith("ep-cnn") else "")
        found = False
        for norm, threat in (("linf", "Linf"), ("l2", "L2")):
            col = next((c for c in data.columns if c.attack == "autoattack" and c.norm == norm and c.key in row.cells
                        and math.isclose(c.eps, ROBUSTBENCH_EPS[norm], rel_tol=1e-3)), None)
            if col is None:
                continue
            found = True
            cell = row.cells[col.key]
            others = [row.cells[c.key] for c in data.columns if c.norm == norm and c.key in row.cells
                      and c.attack != "autoattack" and math.isclose(c.eps, col.eps, rel_tol=1e-6)
                      and row.cells[c.key].n_examples == cell.n_examples]
            ext = min(others, key=lambda c: c.value) if others else None
            notes = [f"AutoAttack on {cell.n_examples or '?'} test images (clean accuracy on the same images), "
                     f"gradient mode {_grad(cell.grad_mode)}", data_note, relax]
            if cell.unreliable:
                notes.append(f"unreliable: {cell.reason}")
            if ext is not None and ext.value < cell.value:
                notes.append(f"external: a stronger attack on the same number of images ({_grad(ext.grad_mode)})")
            rec = {**common, "number_forward_passes": _forward_passes(row, cell),
                   "eps": eps_label(col.eps, norm),
                   "clean_acc": _fmt(cell.attack_clean if cell.attack_clean is not None else row.clean_acc),
                   "reported": _fmt(cell.paper) if cell.paper is not None else "",
                   "autoattack_acc": _fmt(cell.value), "footnote": ". ".join(n for n in notes if n) + ".",
                   "unreliable": bool(cell.unreliable)}
            if ext is not None and ext.value < cell.value:
                rec["external"] = _fmt(ext.value)
            files[f"{ds}/{threat}/{robustbench_id(row)}.json"] = rec
        corr = row.corruption
        cov = corr.get("coverage") or {}
        if cov.get("complete15") and corr.get("mean") is not None:
            found = True
            notes = [f"mean of the 15 CIFAR-10-C benchmark corruptions × 5 severities on "
                     f"{corr.get('n_examples') or '?'} test images", data_note, relax]
            files[f"{ds}/corruptions/{robustbench_id(row)}.json"] = {
                **common, "eps": None, "clean_acc": _fmt(corr.get("clean", row.clean_acc)), "reported": "",
                "corruptions_acc": _fmt(corr["mean"]), "footnote": ". ".join(n for n in notes if n) + "."}
        if not found:
            why = "no AutoAttack result at L∞ 8/255 or L2 0.5"
            if any(c.attack == "art-autoattack" and c.key in row.cells for c in data.columns):
                why += " (AutoAttack (ART) is ART's ensemble, not RobustBench's standard one: -a autoattack)"
            if corr.get("mean") is not None:
                why += f", corruptions only a {corr.get('mean_label')}"
            skipped.append(f"{name}: {why}")
        elif corr.get("mean") is not None and not cov.get("complete15"):
            skipped.append(f"{name}: no corruptions file ({corr.get('mean_label')}; RobustBench's is 15 × 5)")
    return files, skipped


def robustbench_json(data: ReportData) -> dict[str, dict]:
    """The RobustBench files as one JSON object {relative path: record}; NotFoundError when none qualifies."""
    files, skipped = robustbench_files(data)
    if not files:
        raise NotFoundError("nothing to export for RobustBench, which needs an AutoAttack result at L∞ 8/255 or L2 "
                            "0.5 (`epcli attack -a autoattack --eps 8/255`) or a corruption run over all 15 "
                            f"benchmark corruptions × 5 severities. {'; '.join(skipped) or 'No models'}.")
    return files


def write_robustbench(data: ReportData, out_dir: str | Path) -> list[Path]:
    """Write RobustBench's layout under out_dir: <dataset>/<threat_model>/<ModelID>.json, one per record."""
    paths = []
    for rel, rec in robustbench_json(data).items():
        p = Path(out_dir) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
        paths.append(p)
    return paths
