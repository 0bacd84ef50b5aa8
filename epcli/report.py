"""Reports over the store: leaderboard, exports, figures, the paper side by side, HTML, lineage tree.

Everything here reads the store only (no recomputation; no torch, no models, no attacks). The flow is

    data = collect(store, models=None, runs=None, dataset=None)   # a handful of queries -> ReportData
    render(data, "table" | "csv" | "json" | "md" | "html" | "robustbench") -> str
    figures(data, out_dir) -> [png, svg, ...]                       # matplotlib, Agg
    html_report(data, figures) -> str                               # one self-contained file
    lineage_tree(store, run_id) -> rich.tree.Tree

Conventions:
- Accuracies are shown in percent. The store's accuracy metrics are fractions in [0, 1]; a store whose
  accuracy values exceed 1 is taken to hold percent already (`ReportData.scale` records which).
- A leaderboard cell (model x attack x norm x eps) is the worst case (minimum) over every result the store
  holds for it: several gradient modes, unroll lengths, transfer sources or repeated runs. The cell keeps
  the gradient mode, example count and run of that minimum, and how many results it was taken over.
- A cell is flagged unreliable when the result it shows was logged with unreliable=1 (reason from its
  detail, or from the run's failed checks).
- The CIFAR-C numbers come from the latest corrupt run of a model.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from epcli import paper
from epcli.errors import NotFoundError, UsageError

FORMATS = ("table", "csv", "json", "md", "html", "robustbench")
ATTACK_ORDER = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack")
ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "cw": "C&W", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
                "fab-t": "FAB-T", "square": "Square", "autoattack": "AutoAttack"}
HEADLINE_ATTACKS = ("fgsm", "pgd", "cw", "square", "autoattack")
WHITE_BOX = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "autoattack")
NORM_NAMES = {"linf": "L∞", "l2": "L2"}
STANDARD_EPS = {"linf": 8 / 255, "l2": 0.5}
ACC_METRICS = ("clean_acc", "robust_acc", "corruption_acc", "corruption_mean_acc", "corruption_mean_acc_all",
               "mce_unnormalized", "relative_mce", "accuracy_vs_steps")
PAPER_EPOCHS = {"ep-cnn": 120, "cnn": 45, "vit": 200}


# --- data model --------------------------------------------------------------------------------------------

@dataclass
class Column:
    key: str            # "pgd:linf:8/255"
    attack: str
    norm: str
    eps: float
    label: str          # "PGD L∞ 8/255"
    headline: bool = False


@dataclass
class Cell:
    value: float | None          # percent
    n_examples: int | None = None
    grad_mode: str | None = None
    unreliable: bool = False
    reason: str | None = None
    run_id: str | None = None
    status: str = "finished"     # of the attack run that produced the value
    n_results: int = 1           # how many results the minimum was taken over
    paper: float | None = None   # the paper's number for this cell (percent)
    paper_std: float | None = None
    forward_passes: int | None = None  # from the result's detail, when the attack logged it
    diff: float | None = None    # epcli - paper, percentage points
    reasons: list[str] = field(default_factory=list)  # protocol differences vs the paper


@dataclass
class Row:
    run_id: str
    model: str
    label: str
    dataset: str | None
    status: str
    paper_key: str | None
    clean_acc: float | None
    epochs: int | None
    config: dict
    cells: dict[str, Cell] = field(default_factory=dict)
    corruption: dict[str, Any] = field(default_factory=dict)  # mean, mean_all, mce, relative_mce, run_id, ...
    failed_checks: list[str] = field(default_factory=list)
    derived_running: int = 0     # attack/corrupt runs of this model still running

    @property
    def unreliable(self) -> bool:
        return any(c.unreliable for c in self.cells.values())


@dataclass
class Comparison:
    run_id: str
    label: str
    paper_key: str
    what: str                    # "clean", "PGD L∞ 8/255", "CIFAR-C mean"
    epcli: float
    paper: float
    paper_std: float | None
    diff: float
    n_examples: int | None
    reasons: list[str]
    section: str | None


@dataclass
class ReportData:
    rows: list[Row]
    columns: list[Column]
    curves: list[dict]           # robust accuracy per model/attack/norm/eps (worst case), for the eps figures
    corruptions: list[dict]      # per model/corruption/severity accuracy (latest corrupt run)
    steps: list[dict]            # accuracy vs relaxation steps
    unroll: list[dict]           # robust accuracy vs truncated:K
    adversarial: list[dict]      # adversarial-examples artifacts: run ids, label, path
    comparisons: list[Comparison]
    store_root: str
    generated_at: str
    filters: dict
    scale: str                   # "fraction" or "percent": what the store held
    notes: list[str] = field(default_factory=list)

    def headline_columns(self) -> list[Column]:
        return [c for c in self.columns if c.headline]


# --- helpers -----------------------------------------------------------------------------------------------

def eps_label(eps: float, norm: str | None = None) -> str:
    """8/255-style for L-inf values that are k/255, else %g."""
    if norm != "l2":
        k = eps * 255
        if k >= 0.5 and abs(k - round(k)) < 1e-3 * max(1.0, k):
            return f"{int(round(k))}/255"
    return f"{eps:g}"


def _json(text: Any) -> Any:
    if text is None or isinstance(text, (dict, list)):
        return text
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _label(run: dict) -> str:
    cfg = run["config"] if isinstance(run.get("config"), dict) else {}
    if cfg.get("label"):
        return str(cfg["label"])
    name = run.get("model") or cfg.get("model") or "?"
    adv = cfg.get("adv") or ((cfg.get("recipe") or {}).get("adv") if isinstance(cfg.get("recipe"), dict) else None)
    if isinstance(adv, dict) and adv.get("eps") is not None:
        return f"{name} (AT {NORM_NAMES.get(str(adv.get('norm')), adv.get('norm'))} ε={float(adv['eps']):g})"
    return str(name)


def _epochs(cfg: dict) -> int | None:
    for d in (cfg, cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else {}):
        if isinstance(d, dict) and isinstance(d.get("epochs"), (int, float)):
            return int(d["epochs"])
    return None


def _short(run_id: str | None) -> str:
    return (run_id or "")[:10]


def _grad(g: str | None) -> str:
    if not g:
        return "-"
    if g.startswith("transfer:"):
        return "transfer:" + _short(g.split(":", 1)[1])
    return g


def _fmt(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _placeholders(values: list) -> str:
    return ",".join("?" * len(values))


# --- collect -----------------------------------------------------------------------------------------------

def collect(store, models: Iterable[str] | None = None, runs: Iterable[str] | None = None,
            dataset: str | None = None) -> ReportData:
    """Gather every number a report shows, in a few queries. Raises NotFoundError with a one-line message."""
    db = store.db
    models = [m for m in (models or []) if m]
    runs = [r for r in (runs or []) if r]
    filters = {"models": models or None, "runs": runs or None, "dataset": dataset}

    all_train = [dict(r) for r in db.query(
        "SELECT id, kind, status, model, dataset, config, summary, started_at FROM runs WHERE kind = 'train' "
        "ORDER BY id")]
    if not all_train:
        raise NotFoundError(f"the store {store.root} has no training runs yet (train one with `epcli train`)")
    for r in all_train:
        r["config"] = _json(r["config"]) or {}
        if not isinstance(r["config"], dict):
            r["config"] = {}

    selected: list[dict]
    if runs:
        wanted = set()
        for rid in runs:
            run = store.get_run(rid)  # NotFoundError for unknown / ambiguous ids
            wanted.add(run["id"] if run["kind"] == "train" else run.get("model_run_id"))
        selected = [r for r in all_train if r["id"] in wanted]
    else:
        selected = [r for r in all_train if r["status"] != "failed"]
    if models:
        known = {}
        for r in all_train:
            for name in (r["model"], _label(r)):
                if name:
                    known.setdefault(str(name).lower(), []).append(r["id"])
        missing = [m for m in models if m.lower() not in known]
        if missing:
            names = sorted({str(r["model"]) for r in all_train if r["model"]})
            raise NotFoundError(f"no training run of model {missing[0]!r} in the store {store.root} "
                                f"(models there: {', '.join(names) or 'none'})")
        ids = {i for m in models for i in known[m.lower()]}
        selected = [r for r in selected if r["id"] in ids]
    if dataset:
        selected = [r for r in selected if r["dataset"] == dataset]
    if not selected:
        what = ", ".join(f"{k}={v}" for k, v in filters.items() if v)
        raise NotFoundError(f"no training run matches {what or 'the selection'} in the store {store.root}")

    ids = [r["id"] for r in selected]
    ph = _placeholders(ids)
    derived = [dict(r) for r in db.query(
        f"SELECT id, kind, status, model_run_id, config, summary, dataset, started_at FROM runs "
        f"WHERE kind != 'train' AND model_run_id IN ({ph}) ORDER BY id", ids)]
    run_info = {r["id"]: r for r in derived}
    for r in derived:
        r["config"] = _json(r["config"]) or {}
        if not isinstance(r["config"], dict):
            r["config"] = {}
    names = _placeholders(list(ACC_METRICS))
    metric_rows = [dict(m) for m in db.query(
        f"SELECT m.*, r.kind AS run_kind, r.status AS run_status, r.model_run_id, r.started_at "
        f"FROM metrics m JOIN runs r ON r.id = m.run_id WHERE r.model_run_id IN ({ph}) AND m.name IN ({names}) "
        f"ORDER BY m.id", ids + list(ACC_METRICS))]
    test_acc = {r["run_id"]: r["value"] for r in db.query(
        f"SELECT run_id, value, MAX(COALESCE(step, -1)) FROM metrics WHERE name = 'test_acc' "
        f"AND run_id IN ({ph}) GROUP BY run_id", ids)}
    failed_checks: dict[str, list[str]] = {}
    for c in db.query(f"SELECT c.run_id, c.name, c.detail, r.model_run_id FROM checks c JOIN runs r "
                      f"ON r.id = c.run_id WHERE c.passed = 0 AND r.model_run_id IN ({ph})", ids):
        failed_checks.setdefault(c["run_id"], []).append(c["name"] + (f": {c['detail']}" if c["detail"] else ""))
    adv_rows = [dict(a) for a in db.query(
        f"SELECT a.sha256, a.path, a.meta, a.run_id, r.model_run_id, r.started_at FROM artifacts a JOIN runs r "
        f"ON r.id = a.run_id WHERE a.kind = 'adversarial-examples' AND r.model_run_id IN ({ph}) "
        f"ORDER BY r.started_at", ids)]

    # percent or fraction?
    acc_values = [m["value"] for m in metric_rows if m["name"] in ("clean_acc", "robust_acc", "corruption_acc")
                  and m["value"] is not None] + [v for v in test_acc.values() if v is not None]
    scale = "percent" if acc_values and max(acc_values) > 1.0 + 1e-9 else "fraction"
    k = 1.0 if scale == "percent" else 100.0

    rows: dict[str, Row] = {}
    for r in selected:
        rows[r["id"]] = Row(run_id=r["id"], model=r["model"] or "?", label=_label(r), dataset=r["dataset"],
                            status=r["status"], paper_key=paper.paper_key_for(r),
                            clean_acc=None if test_acc.get(r["id"]) is None else test_acc[r["id"]] * k,
                            epochs=_epochs(r["config"]), config=r["config"],
                            failed_checks=list(failed_checks.get(r["id"], [])))
    for d in derived:
        if d["status"] == "running" and d["model_run_id"] in rows:
            rows[d["model_run_id"]].derived_running += 1
        if d["id"] in failed_checks and d["model_run_id"] in rows:
            rows[d["model_run_id"]].failed_checks += [f"{d['kind']} {_short(d['id'])}: {c}"
                                                      for c in failed_checks[d["id"]]]

    # robust accuracy cells (worst case per model x attack x norm x eps)
    groups: dict[tuple, list[dict]] = {}
    columns: dict[str, Column] = {}
    attack_clean: dict[str, float] = {}
    corr_latest: dict[str, str] = {}
    for m in metric_rows:
        mr = m["model_run_id"]
        if m["name"] == "robust_acc" and m["attack"] and m["eps"] is not None and m["value"] is not None:
            norm = m["norm"] or "linf"
            key = f"{m['attack']}:{norm}:{eps_label(m['eps'], norm)}"
            if key not in columns:
                columns[key] = Column(key, m["attack"], norm, float(m["eps"]),
                                      f"{ATTACK_NAMES.get(m['attack'], m['attack'])} {NORM_NAMES.get(norm, norm)} "
                                      f"{eps_label(m['eps'], norm)}")
            groups.setdefault((mr, key), []).append(m)
        elif m["name"] == "clean_acc" and m["run_kind"] == "attack" and m["value"] is not None:
            attack_clean[mr] = m["value"] * k
        if m["run_kind"] == "corrupt" and m["name"].startswith(("corruption", "mce", "relative")):
            if mr not in corr_latest or (m["started_at"], m["run_id"]) > corr_latest[mr]:
                corr_latest[mr] = (m["started_at"], m["run_id"])
    for (mr, key), ms in groups.items():
        best = min(ms, key=lambda m: (m["value"], -(m["n_examples"] or 0)))
        detail = _json(best["detail"]) if best["detail"] else {}
        reason = None
        if best["unreliable"]:
            reason = (detail.get("reason") if isinstance(detail, dict) else None) or \
                "; ".join(failed_checks.get(best["run_id"], [])) or "marked unreliable"
        rows[mr].cells[key] = Cell(value=best["value"] * k, n_examples=best["n_examples"],
                                   grad_mode=best["grad_mode"], unreliable=bool(best["unreliable"]), reason=reason,
                                   run_id=best["run_id"], status=best["run_status"], n_results=len(ms),
                                   forward_passes=detail.get("forward_passes") if isinstance(detail, dict) else None)
    for row in rows.values():
        if row.clean_acc is None and row.run_id in attack_clean:
            row.clean_acc = attack_clean[row.run_id]

    # columns: order and headline choice
    cols = sorted(columns.values(), key=lambda c: (
        ATTACK_ORDER.index(c.attack) if c.attack in ATTACK_ORDER else len(ATTACK_ORDER), c.attack,
        0 if c.norm == "linf" else 1, c.eps))
    for attack_norm in {(c.attack, c.norm) for c in cols}:
        if attack_norm[0] not in HEADLINE_ATTACKS:
            continue
        cands = [c for c in cols if (c.attack, c.norm) == attack_norm]
        std = STANDARD_EPS.get(attack_norm[1], 8 / 255)
        min(cands, key=lambda c: abs(math.log(c.eps / std)) if c.eps > 0 else 1e9).headline = True

    # corruption summaries, per-corruption curves, steps, unroll sweep, curves
    corruptions, steps, unroll, curves = [], [], [], []
    for m in metric_rows:
        mr, row = m["model_run_id"], rows.get(m["model_run_id"])
        if row is None or m["value"] is None:
            continue
        if m["run_kind"] == "corrupt" and corr_latest.get(mr, (None, None))[1] == m["run_id"]:
            c = row.corruption
            c.setdefault("run_id", m["run_id"])
            c.setdefault("status", m["run_status"])
            if m["name"] == "corruption_acc":
                corruptions.append({"run_id": mr, "label": row.label, "corruption": m["corruption"],
                                    "severity": m["severity"], "value": m["value"] * k})
            elif m["name"] == "corruption_mean_acc":
                c["mean"] = m["value"] * k
                c["n_examples"] = m["n_examples"]
            elif m["name"] == "corruption_mean_acc_all":
                c["mean_all"] = m["value"] * k
            elif m["name"] == "mce_unnormalized":
                c["mce"] = m["value"] * k
            elif m["name"] == "relative_mce":
                c["relative_mce"] = m["value"] * k
                d = _json(m["detail"]) if m["detail"] else {}
                c["reference"] = d.get("reference") if isinstance(d, dict) else None
            elif m["name"] == "clean_acc":
                c["clean"] = m["value"] * k
            if m["unreliable"]:
                c["unreliable"] = True
        elif m["name"] == "accuracy_vs_steps":
            d = _json(m["detail"]) if m["detail"] else {}
            t = d.get("T") if isinstance(d, dict) and d.get("T") is not None else m["step"]
            if t is not None:
                steps.append({"run_id": mr, "label": row.label, "T": int(t), "value": m["value"] * k,
                              "paper_key": row.paper_key})
        if m["name"] == "robust_acc" and (m["grad_mode"] or "").startswith("truncated:") and m["eps"] is not None:
            try:
                kk = int(m["grad_mode"].split(":", 1)[1])
            except ValueError:
                continue
            unroll.append({"run_id": mr, "label": row.label, "attack": m["attack"], "norm": m["norm"] or "linf",
                           "eps": float(m["eps"]), "K": kk, "value": m["value"] * k})
    # keep only (model, attack, norm) groups with at least two unroll lengths
    ks: dict[tuple, set] = {}
    for u in unroll:
        ks.setdefault((u["run_id"], u["attack"], u["norm"]), set()).add(u["K"])
    unroll = [u for u in unroll if len(ks[(u["run_id"], u["attack"], u["norm"])]) >= 2]
    for row in rows.values():
        for key, cell in row.cells.items():
            col = columns[key]
            curves.append({"run_id": row.run_id, "label": row.label, "paper_key": row.paper_key,
                           "dataset": row.dataset, "attack": col.attack, "norm": col.norm, "eps": col.eps,
                           "value": cell.value, "unreliable": cell.unreliable})

    adversarial = []
    seen_adv = set()
    for a in reversed(adv_rows):  # latest first; one artifact per model
        if a["model_run_id"] in seen_adv or a["model_run_id"] not in rows:
            continue
        seen_adv.add(a["model_run_id"])
        p = Path(a["path"])
        adversarial.append({"run_id": a["model_run_id"], "attack_run_id": a["run_id"],
                            "label": rows[a["model_run_id"]].label, "sha256": a["sha256"],
                            "path": str(p if p.is_absolute() else Path(store.root) / p),
                            "meta": _json(a["meta"]) or {},
                            "config": run_info.get(a["run_id"], {}).get("config", {})})
    adversarial.sort(key=lambda a: a["run_id"])

    row_list = list(rows.values())
    comparisons = _compare(row_list, {c.key: c for c in cols}, run_info)
    notes = []
    if scale == "percent":
        notes.append("the store holds accuracies in percent (values above 1); shown as stored")
    for row in row_list:
        if row.status == "running":
            notes.append(f"{row.label} ({_short(row.run_id)}) is still training: numbers are provisional")
        if row.derived_running:
            notes.append(f"{row.label}: {row.derived_running} attack/corruption run(s) still running")
    return ReportData(rows=row_list, columns=cols, curves=curves, corruptions=corruptions, steps=steps,
                      unroll=unroll, adversarial=adversarial, comparisons=comparisons, store_root=str(store.root),
                      generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), filters=filters,
                      scale=scale, notes=notes)


# --- the paper beside the results -----------------------------------------------------------------------------

def _labels_mode(cfg: dict) -> str | None:
    for key in ("labels", "label_mode", "targets"):
        if isinstance(cfg.get(key), str):
            return cfg[key]
    if cfg.get("use_predictions") or cfg.get("predicted_labels"):
        return "predicted"
    return None


def protocol_reasons(row: Row, cell: Cell | None, fact: dict, attack_cfg: dict | None = None,
                     eps: float | None = None) -> list[str]:
    """Short reasons why epcli's number and the paper's were not measured the same way."""
    reasons = []
    ds = (row.dataset or "").lower()
    if ds in ("cifar10-mini", "embedded"):
        reasons.append("data: mini CIFAR-10, JPEG-recompressed (q75); paper: CIFAR-10")
    elif ds and paper.paper_dataset(ds) is None:
        reasons.append(f"data: {row.dataset}, paper: {fact.get('dataset')}")
    if row.status == "running":
        reasons.append("model still training")
    n_fact = fact.get("n_examples")
    n_ours = cell.n_examples if cell else None
    if fact.get("metric") in ("clean_acc",) and row.epochs and row.paper_key in PAPER_EPOCHS \
            and row.epochs != PAPER_EPOCHS[row.paper_key]:
        reasons.append(f"training: {row.epochs} epochs, paper {PAPER_EPOCHS[row.paper_key]}")
    if n_fact and n_ours and n_ours != n_fact:
        reasons.append(f"examples: {n_ours:,}, paper {n_fact:,}")
    attack = fact.get("attack")
    if attack and cell is not None:
        cfg = attack_cfg or {}
        if attack == "pgd":
            reasons.append("clipping: epcli clips to [0,1], paper PGD does not")
        lm = _labels_mode(cfg)
        if lm is None or not lm.startswith("pred"):
            reasons.append("labels: true labels, paper attacks the model's predictions")
        if row.paper_key == "ep-cnn" and attack in WHITE_BOX:
            pg = fact.get("grad_mode")
            if pg and cell.grad_mode != pg:
                reasons.append(f"gradient: {_grad(cell.grad_mode)}, paper {pg}")
            elif not pg and attack == "autoattack":
                reasons.append(f"gradient: {_grad(cell.grad_mode)}, paper's AutoAttack unroll not recorded")
        if attack == "autoattack":
            version = cfg.get("version") or "standard"
            reasons.append(f"AutoAttack: epcli {version}, paper ART's (APGD-CE, APGD-DLR, DeepFool, Square)")
        if attack == "square":
            q = cfg.get("n_queries") or cfg.get("queries") or cfg.get("max_iter") or cfg.get("steps")
            if q and int(q) != 1000:
                reasons.append(f"Square: {int(q)} iterations, paper 1000")
    if fact.get("metric") == "corruption_mean_acc":
        reasons.append("corruptions: epcli mean over the 15 benchmark corruptions, paper over 18 (no frost)")
    if fact.get("eps") is not None and eps is not None and not math.isclose(fact["eps"], eps, rel_tol=1e-3):
        reasons.append(f"eps: paper {fact['eps']:g}")
    return reasons


def _compare(rows: list[Row], columns: dict[str, Column], run_info: dict[str, dict]) -> list[Comparison]:
    out = []
    for row in rows:
        if not row.paper_key:
            continue
        ds = paper.paper_dataset(row.dataset) or ("cifar10" if row.dataset is None else None)
        if ds is None:
            continue
        fact = paper.paper_value(row.paper_key, dataset=ds, metric="clean_acc")
        if fact and row.clean_acc is not None:
            out.append(Comparison(row.run_id, row.label, row.paper_key, "clean", row.clean_acc, fact["value"],
                                  fact.get("std"), row.clean_acc - fact["value"], None,
                                  protocol_reasons(row, None, fact), fact.get("section")))
        for key, cell in row.cells.items():
            col = columns[key]
            facts = paper.paper_values(row.paper_key, dataset=ds, metric="robust_acc", attack=col.attack,
                                       norm=col.norm, eps=col.eps)
            if not facts or cell.value is None:
                continue
            same_grad = [f for f in facts if f.get("grad_mode") and f.get("grad_mode") == cell.grad_mode]
            primary = [f for f in facts if f.get("variant") is None]
            fact = (same_grad or primary or [None])[0]
            if fact is None:
                continue
            cfg = run_info.get(cell.run_id or "", {}).get("config", {})
            cell.paper, cell.paper_std = fact["value"], fact.get("std")
            cell.diff = cell.value - fact["value"]
            cell.reasons = protocol_reasons(row, cell, fact, cfg, eps=col.eps)
            if fact.get("variant"):
                cell.reasons.insert(0, f"paper run: {fact['variant']}")
            out.append(Comparison(row.run_id, row.label, row.paper_key, col.label, cell.value, fact["value"],
                                  fact.get("std"), cell.diff, cell.n_examples, cell.reasons, fact.get("section")))
        mean = row.corruption.get("mean")
        fact = paper.paper_value(row.paper_key, dataset=ds, metric="corruption_mean_acc")
        if fact and mean is not None:
            out.append(Comparison(row.run_id, row.label, row.paper_key, "CIFAR-C mean", mean, fact["value"],
                                  fact.get("std"), mean - fact["value"], row.corruption.get("n_examples"),
                                  protocol_reasons(row, None, fact), fact.get("section")))
    return out


# --- tabular renderers ---------------------------------------------------------------------------------------

def _columns(data: ReportData, which: str) -> list[Column]:
    if which == "all":
        return data.columns
    return data.headline_columns() or data.columns


def _sub(cell: Cell, sep: str) -> str:
    """The line under a value: example count, gradient mode (when the result has one), running."""
    bits = [f"n={cell.n_examples if cell.n_examples is not None else '?'}"]
    if cell.grad_mode:
        bits.append(_grad(cell.grad_mode))
    if cell.status == "running":
        bits.append("running")
    return sep.join(bits)


def _cell_text(cell: Cell | None, *, markup: str = "plain") -> str:
    if cell is None or cell.value is None:
        return "—"
    flag = "⚠" if cell.unreliable else ""
    sub = _sub(cell, ", ")
    if markup == "md":
        return f"{cell.value:.2f}{flag} ({sub})"
    return f"{cell.value:.2f}{flag}\n{sub}"


def leaderboard_table(data: ReportData, columns: str = "headline"):
    """A rich Table: one row per trained model; unreliable cells in red with ⚠."""
    from rich.table import Table
    from rich.text import Text

    cols = _columns(data, columns)
    t = Table(title=f"epcli leaderboard — accuracy % ({data.store_root})", show_lines=True,
              caption="cells: worst case over results; n = examples, then gradient mode. ⚠ = unreliable")
    t.add_column("model", style="bold")
    t.add_column("run")
    t.add_column("data")
    t.add_column("clean", justify="right")
    for c in cols:
        t.add_column(c.label, justify="right")
    t.add_column("CIFAR-C mean", justify="right")
    t.add_column("mCE", justify="right")
    for row in data.rows:
        status = "" if row.status == "finished" else f"\n{row.status}"
        cells = []
        for c in cols:
            cell = row.cells.get(c.key)
            txt = Text(_cell_text(cell))
            if cell is not None and cell.unreliable:
                txt.stylize("red")
            cells.append(txt)
        corr = row.corruption
        t.add_row(Text(row.label + status), _short(row.run_id), row.dataset or "—",
                  _fmt(row.clean_acc), *cells, _fmt(corr.get("mean")), _fmt(corr.get("mce")))
    return t


def _rich_text(renderable, width: int = 200) -> str:
    from rich.console import Console
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buf.getvalue()


def _csv(data: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["run_id", "model", "label", "dataset", "status", "paper_key", "clean_acc"]
    for c in data.columns:
        head += [c.key, f"{c.key}:n", f"{c.key}:grad_mode", f"{c.key}:unreliable", f"{c.key}:paper"]
    head += ["corruption_mean_acc", "corruption_mean_acc_all", "mce_unnormalized", "relative_mce"]
    w.writerow(head)
    for row in data.rows:
        line = [row.run_id, row.model, row.label, row.dataset or "", row.status, row.paper_key or "",
                "" if row.clean_acc is None else repr(row.clean_acc)]
        for c in data.columns:
            cell = row.cells.get(c.key)
            if cell is None:
                line += ["", "", "", "", ""]
            else:
                line += [repr(cell.value), cell.n_examples if cell.n_examples is not None else "",
                         cell.grad_mode or "", int(cell.unreliable), "" if cell.paper is None else cell.paper]
        for k in ("mean", "mean_all", "mce", "relative_mce"):
            v = row.corruption.get(k)
            line.append("" if v is None else repr(v))
        w.writerow(line)
    return buf.getvalue()


def to_dict(data: ReportData) -> dict:
    """A JSON-ready dict of the whole report (accuracies in percent)."""
    rows = []
    for row in data.rows:
        d = {k: v for k, v in asdict(row).items() if k not in ("cells", "config")}
        d["unreliable"] = row.unreliable
        d["cells"] = {k: asdict(c) for k, c in row.cells.items()}
        rows.append(d)
    return {"generated_at": data.generated_at, "store": data.store_root, "filters": data.filters,
            "unit": "percent", "store_scale": data.scale,
            "columns": [asdict(c) for c in data.columns], "rows": rows,
            "comparisons": [asdict(c) for c in data.comparisons], "notes": data.notes}


def _md(data: ReportData, columns: str = "headline") -> str:
    cols = _columns(data, columns)
    out = ["# epcli leaderboard", "",
           f"Accuracy in %. Store `{data.store_root}`, generated {data.generated_at}. Cells: worst case over "
           "results (n = examples, gradient mode); ⚠ = unreliable (see notes).", ""]
    head = ["model", "run", "data", "status", "clean"] + [c.label for c in cols] + ["CIFAR-C mean", "mCE"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    flags = []
    for row in data.rows:
        line = [row.label, f"`{_short(row.run_id)}`", row.dataset or "—", row.status, _fmt(row.clean_acc)]
        for c in cols:
            cell = row.cells.get(c.key)
            line.append(_cell_text(cell, markup="md"))
            if cell is not None and cell.unreliable:
                flags.append(f"- ⚠ {row.label}, {c.label}: {cell.reason}")
        line += [_fmt(row.corruption.get("mean")), _fmt(row.corruption.get("mce"))]
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in line) + " |")
    if flags:
        out += ["", "Unreliable results:", ""] + flags
    if data.comparisons:
        out += ["", "## The paper beside the results", "",
                "| model | metric | epcli | paper | diff | protocol differences |", "|---|---|---:|---:|---:|---|"]
        for c in data.comparisons:
            p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
            out.append(f"| {c.label} | {c.what} | {c.epcli:.2f} | {p} | {c.diff:+.2f} | "
                       f"{'; '.join(c.reasons) or '—'} |")
    if data.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in data.notes]
    return "\n".join(out) + "\n"


def robustbench_json(data: ReportData) -> list[dict]:
    """RobustBench-style records, one per (model, threat model) with an AutoAttack result."""
    out = []
    for row in data.rows:
        for norm in ("linf", "l2"):
            aa = [c for c in data.columns if c.attack == "autoattack" and c.norm == norm and c.key in row.cells]
            if not aa:
                continue
            std = STANDARD_EPS[norm]
            col = min(aa, key=lambda c: abs(math.log(c.eps / std)) if c.eps > 0 else 1e9)
            cell = row.cells[col.key]
            others = [row.cells[c.key] for c in data.columns if c.norm == norm and c.key in row.cells
                      and c.attack != "autoattack" and math.isclose(c.eps, col.eps, rel_tol=1e-6)]
            ext = min(others, key=lambda c: c.value) if others else None
            fp = cell.forward_passes or row.config.get("T")
            notes = [f"AutoAttack on {cell.n_examples or '?'} test examples, gradient mode {_grad(cell.grad_mode)}"]
            if row.paper_key == "ep-cnn" or str(row.model).startswith("ep"):
                notes.append("the EP-CNN relaxes to an energy minimum at inference (an optimization loop), so it "
                             "is outside RobustBench's standardized track")
            if cell.unreliable:
                notes.append(f"unreliable: {cell.reason}")
            if ext is not None and ext.value < cell.value:
                notes.append(f"external = worst other attack at this eps ({_grad(ext.grad_mode)}, "
                             f"n={ext.n_examples})")
            fact = paper.paper_value(row.paper_key, dataset=paper.paper_dataset(row.dataset) or "cifar10",
                                     metric="robust_acc", attack="autoattack", norm=norm, eps=col.eps) \
                if row.paper_key else None
            rec = {
                "link": "", "name": row.label, "authors": "", "venue": "epcli",
                "architecture": row.model, "dataset": row.dataset, "threat_model": "Linf" if norm == "linf" else "L2",
                "eps": eps_label(col.eps, norm), "additional_data": False,
                "number_forward_passes": int(fp) if isinstance(fp, (int, float)) else 1,
                "clean_acc": _fmt(row.clean_acc), "reported": _fmt(fact["value"]) if fact else "",
                "autoattack_acc": _fmt(cell.value),
                "unreliable": bool(cell.unreliable), "footnote": "; ".join(notes), "run_id": row.run_id,
                "n_examples": cell.n_examples,
            }
            if ext is not None and ext.value < cell.value:
                rec["external"] = _fmt(ext.value)
            out.append(rec)
    return out


def render(data: ReportData, fmt: str = "table", columns: str | None = None) -> str:
    """The leaderboard as text. columns: "headline" (default for table/md) or "all" (default for csv/json)."""
    if fmt == "table":
        return _rich_text(leaderboard_table(data, columns or "headline"))
    if fmt == "csv":
        return _csv(data)
    if fmt == "json":
        return json.dumps(to_dict(data), indent=2, ensure_ascii=False, default=str) + "\n"
    if fmt == "md":
        return _md(data, columns or "headline")
    if fmt == "html":
        return html_report(data, [])
    if fmt == "robustbench":
        return json.dumps(robustbench_json(data), indent=2, ensure_ascii=False) + "\n"
    raise UsageError(f"unknown report format {fmt!r}: use one of {', '.join(FORMATS)}")


# --- figures ---------------------------------------------------------------------------------------------------

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
    """Unique display labels per training run (label + short id when two runs share a label)."""
    counts: dict[str, int] = {}
    for r in data.rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    return {r.run_id: r.label if counts[r.label] == 1 else f"{r.label} {_short(r.run_id)[:6]}" for r in data.rows}


def figures(data: ReportData, out_dir: str | Path, paper_curves: bool = True) -> list[Path]:
    """Write every figure the data supports as PNG and SVG; skip a figure whose data is absent."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    paths: list[Path] = []
    names = _row_labels(data)
    colors = _colors(list(names.values()))
    rows = {r.run_id: r for r in data.rows}

    # robust accuracy vs eps, one panel per attack x norm
    for attack, norm in sorted({(c["attack"], c["norm"]) for c in data.curves},
                               key=lambda an: (ATTACK_ORDER.index(an[0]) if an[0] in ATTACK_ORDER else 99, an[1])):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for rid in names:
            pts = sorted((c["eps"], c["value"], c["unreliable"]) for c in data.curves
                         if c["run_id"] == rid and c["attack"] == attack and c["norm"] == norm)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.plot(xs, ys, "o-", color=colors[names[rid]], label=names[rid])
            bad = [(p[0], p[1]) for p in pts if p[2]]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", markersize=10, mew=2)
            row = rows[rid]
            if paper_curves and row.paper_key:
                facts = paper.paper_values(row.paper_key, dataset=paper.paper_dataset(row.dataset) or "cifar10",
                                           metric="robust_acc", attack=attack, norm=norm, variant=False)
                if facts:
                    fx = sorted((f["eps"], f["value"]) for f in facts)
                    ax.plot(*zip(*fx), "--", color=colors[names[rid]], alpha=0.5, lw=1,
                            label=f"paper: {row.paper_key}")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"ε ({NORM_NAMES.get(norm, norm)})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"{ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)}: accuracy vs ε")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, f"robust-{attack}-{norm}", paths)

    # accuracy vs severity per corruption
    if data.corruptions:
        cnames = sorted({c["corruption"] for c in data.corruptions})
        ncol = min(5, len(cnames))
        nrow = math.ceil(len(cnames) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.2 * nrow), squeeze=False, sharey=True)
        for ax, cn in zip(axes.flat, cnames):
            for rid in names:
                pts = sorted((c["severity"], c["value"]) for c in data.corruptions
                             if c["run_id"] == rid and c["corruption"] == cn and c["severity"] is not None)
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=names[rid])
            ax.set_title(cn.replace("_", " "), fontsize=9)
            ax.set_xticks([1, 2, 3, 4, 5])
            ax.set_ylim(0, 100)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(cnames):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.supxlabel("severity")
        fig.supylabel("accuracy (%)")
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.2 * nrow)))
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
        _save(fig, out_dir, "corruptions", paths)

    # accuracy vs relaxation steps
    if data.steps:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        keys = set()
        for rid in names:
            pts = sorted((s["T"], s["value"]) for s in data.steps if s["run_id"] == rid)
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=names[rid])
                if rows[rid].paper_key:
                    keys.add(rows[rid].paper_key)
        for key in sorted(keys):
            facts = paper.paper_values(key, metric="accuracy_vs_steps")
            if facts and paper_curves:
                ax.plot(*zip(*sorted((f["T"], f["value"]) for f in facts)), "--", color="gray",
                        label=f"paper ({paper.load_facts()['models'][key]['label']}, CIFAR-10)")
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlabel("relaxation steps T")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("EP convergence: accuracy vs relaxation steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "steps", paths)

    # unroll-length sweep
    if data.unroll:
        groups = sorted({(u["run_id"], u["attack"], u["norm"]) for u in data.unroll})
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
        for ax, (rid, attack, norm) in zip(axes.flat, groups):
            us = [u for u in data.unroll if (u["run_id"], u["attack"], u["norm"]) == (rid, attack, norm)]
            epss = sorted({u["eps"] for u in us})
            cmap = plt.get_cmap("viridis")
            for i, e in enumerate(epss):
                pts = sorted((u["K"], u["value"]) for u in us if u["eps"] == e)
                color = cmap(i / max(1, len(epss) - 1))
                ax.plot(*zip(*pts), "o-", ms=3, color=color, label=f"ε={eps_label(e, norm)}")
                key = rows[rid].paper_key
                facts = paper.paper_values(key, dataset=paper.paper_dataset(rows[rid].dataset) or "cifar10",
                                           attack=attack, norm=norm, eps=e, variant="unroll-sweep") \
                    if key and paper_curves else []
                if facts:
                    fx = sorted((int(f["grad_mode"].split(":")[1]), f["value"]) for f in facts)
                    ax.plot(*zip(*fx), "--", color=color, alpha=0.5, lw=1, label=f"ε={eps_label(e, norm)} (paper)")
            ax.set_xlabel("attack unroll length K (truncated:K)")
            ax.set_ylabel("robust accuracy (%)")
            ax.set_ylim(0, 100)
            ax.set_title(f"{names[rid]}: {ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)}",
                         fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        _save(fig, out_dir, "unroll", paths)

    # adversarial-example grid
    grid = _adversarial_grid(data, names)
    if grid is not None:
        _save(grid, out_dir, "adversarial-examples", paths)
    return paths


def _load_adv(path: str) -> tuple[dict, dict] | None:
    try:
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, meta
    except Exception:  # a missing or unreadable file: skip the figure row, never crash a report
        return None


def _to_img(a):
    import numpy as np
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    return np.clip(a, 0, 1).squeeze()


def _first_correct_everywhere(loaded, default: int) -> int:
    """The first test image every model classifies correctly when clean (an attack has something to do)."""
    import numpy as np
    ok = None
    for _, t, _, _, _, _ in loaded:
        if "pred_clean" not in t or "labels" not in t:
            return default
        good = np.asarray(t["pred_clean"]).reshape(-1) == np.asarray(t["labels"]).reshape(-1)
        ok = good if ok is None else ok[: len(good)] & good[: len(ok)]
    hits = np.flatnonzero(ok) if ok is not None else []
    return int(hits[0]) if len(hits) else default


def _adversarial_grid(data: ReportData, names: dict[str, str], image: int = 0):
    import numpy as np
    loaded = []
    for a in data.adversarial:
        got = _load_adv(a["path"])
        if got is None:
            continue
        tensors, meta = got
        if "x" not in tensors:
            continue
        eps_meta = _json(meta.get("eps")) or a["meta"].get("eps") or []
        classes = _json(meta.get("classes")) or a["meta"].get("classes") or []
        labels = _json(meta.get("labels")) or a["meta"].get("labels")
        pairs = []
        for k in tensors:
            if not k.startswith("x_adv_"):
                continue
            suffix = k[len("x_adv_"):]
            try:
                e = float(suffix)
            except ValueError:
                e = None
                if "/" in suffix:
                    try:
                        num, den = suffix.split("/")
                        e = float(num) / float(den)
                    except ValueError:
                        pass
            pairs.append((e if e is not None else float("nan"), k, "pred_" + suffix))
        if not pairs:
            continue
        pairs.sort(key=lambda p: (math.isnan(p[0]), p[0]))
        loaded.append((a, tensors, pairs, classes, labels, eps_meta))
    if not loaded:
        return None
    image = _first_correct_everywhere(loaded, image)
    plt = _plt()
    ncols = 1 + max(len(p) for _, _, p, _, _, _ in loaded)
    nrows = 2 * len(loaded)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.6 * ncols, 1.75 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    norm = (data.adversarial[0]["config"] or {}).get("norm")
    for i, (a, t, pairs, classes, labels, _) in enumerate(loaded):
        x = t["x"][image] if t["x"].ndim == 4 else t["x"]
        truth = None
        if isinstance(labels, list) and len(labels) > image:
            truth = labels[image]
        elif "labels" in t:
            truth = int(np.asarray(t["labels"]).reshape(-1)[image])
        cname = lambda c: classes[int(c)] if isinstance(classes, list) and 0 <= int(c) < len(classes) else str(c)
        ax = axes[2 * i][0]
        ax.imshow(_to_img(x))
        ax.set_title(f"{names.get(a['run_id'], a['label'])}\noriginal" + (f": {cname(truth)}" if truth is not None
                                                                            else ""), fontsize=7)
        axes[2 * i + 1][0].text(0.5, 0.5, "perturbation\n(amplified)", ha="center", va="center", fontsize=7)
        for j, (e, kx, kp) in enumerate(pairs, start=1):
            xa = t[kx][image] if t[kx].ndim == 4 else t[kx]
            pred = ""
            if kp in t:
                pv = np.asarray(t[kp]).reshape(-1)
                if pv.size > image:
                    pred = cname(pv[image])
            wrong = truth is not None and pred != "" and pred != cname(truth)
            ax = axes[2 * i][j]
            ax.imshow(_to_img(xa))
            ax.set_title(f"ε={eps_label(e, norm) if not math.isnan(e) else kx[6:]}\n→ {pred}", fontsize=7,
                         color="crimson" if wrong else "black")
            d = np.asarray(xa, dtype=np.float32) - np.asarray(x, dtype=np.float32)
            m = float(np.abs(d).max()) or 1.0
            axes[2 * i + 1][j].imshow(_to_img(0.5 + d / (2 * m)))
    fig.suptitle("Adversarial examples: the same test image under each model's attack at growing ε "
                 "(red = prediction changed)", fontsize=9)
    fig.tight_layout()
    return fig


# --- HTML ------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;white-space:nowrap}
td .sub{display:block;color:#57606a;font-size:11px}
td.unreliable{background:#ffebe9;color:#a40e26}.status{color:#9a6700;font-size:11px}
.pos{color:#1a7f37}.neg{color:#cf222e}.muted{color:#57606a;font-size:12px}
figure{margin:16px 0}figure svg,figure img{max-width:100%;height:auto}
figcaption{color:#57606a;font-size:12px}code{font-size:12px}
"""


def _h(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _html_cell(cell: Cell | None) -> str:
    if cell is None or cell.value is None:
        return '<td class="num">—</td>'
    cls = "num unreliable" if cell.unreliable else "num"
    title = f' title="unreliable: {_h(cell.reason)}"' if cell.unreliable else ""
    flag = " ⚠" if cell.unreliable else ""
    paper_line = ""
    if cell.paper is not None:
        paper_line = f'<span class="sub">paper {cell.paper:.2f} ({cell.diff:+.2f})</span>'
    return f'<td class="{cls}"{title}>{cell.value:.2f}{flag}<span class="sub">{_h(_sub(cell, " · "))}</span>{paper_line}</td>'


def _html_leaderboard(data: ReportData, cols: list[Column], id_: str) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in ["model", "run", "data", "clean"] + [c.label for c in cols]
                   + ["CIFAR-C mean", "mCE (unnorm.)", "rel. mCE"])
    body = []
    for row in data.rows:
        status = "" if row.status == "finished" else f' <span class="status">{_h(row.status)}</span>'
        corr = row.corruption
        cc = "".join(f'<td class="num">{_fmt(corr.get(k))}</td>' for k in ("mean", "mce", "relative_mce"))
        body.append(f"<tr><td>{_h(row.label)}{status}</td><td><code>{_h(_short(row.run_id))}</code></td>"
                    f"<td>{_h(row.dataset)}</td><td class=\"num\">{_fmt(row.clean_acc)}</td>"
                    + "".join(_html_cell(row.cells.get(c.key)) for c in cols) + cc + "</tr>")
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _inline_figure(path: Path) -> str:
    if path.suffix == ".svg":
        text = path.read_text()
        start = text.find("<svg")
        if start < 0:
            return ""
        # drop the RDF metadata block (namespace URLs only, but no external reference should remain)
        svg = re.sub(r"<metadata>.*?</metadata>\s*", "", text[start:], flags=re.S)
        # several figures share one page: make every element id (and every reference to one) unique
        pre = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem) + "-"
        svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{pre}{m.group(1)}"', svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{pre}{m.group(1)}"', svg)
        return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{pre}{m.group(1)})", svg)
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_h(path.stem)}" src="data:image/png;base64,{data}">'


_CAPTIONS = {
    "robust": "Robust accuracy vs ε (log scale), one line per model; dashed: the paper's curve for the matching "
              "model; red ×: result marked unreliable.",
    "corruptions": "Accuracy vs corruption severity (latest corrupt run per model).",
    "steps": "Accuracy vs number of relaxation steps T (EP convergence, 'characteristic time'); dashed: paper.",
    "unroll": "Robust accuracy vs the unroll length K of the attack gradient (truncated:K): a plateau for large "
              "K means the truncation does not mask the gradient.",
    "corruption-samples": "Test images under each evaluated corruption, clean then severities 1-5 (seeded; the "
                          "exact images the models were scored on).",
    "adversarial-examples": "The same test image attacked at growing ε: adversarial image (top, predicted class) "
                            "and amplified perturbation (bottom), per model.",
}


def html_report(data: ReportData, figures: Iterable[str | Path] | None = None) -> str:
    """One self-contained HTML page: tables, the paper comparison, figures inlined (SVG, or base64 PNG)."""
    figs = [Path(f) for f in (figures or [])]
    chosen: dict[str, Path] = {}
    for f in figs:  # prefer SVG for line charts, PNG for the image grid (smaller, crisp enough)
        want_svg = f.stem != "adversarial-examples"
        cur = chosen.get(f.stem)
        if cur is None or (f.suffix == ".svg") == want_svg:
            chosen[f.stem] = f
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>epcli report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>epcli report: how robust are EP-trained energy-based models?</h1>",
             f'<p class="muted">Store <code>{_h(data.store_root)}</code> · generated {_h(data.generated_at)} · '
             f'{len(data.rows)} model(s) · accuracies in %. Each cell is the worst case over the results stored '
             f'for it; below the value: example count and gradient mode.</p>']
    if data.notes:
        parts.append("<ul>" + "".join(f"<li>{_h(n)}</li>" for n in data.notes) + "</ul>")
    parts.append("<h2>Leaderboard</h2>")
    parts.append(_html_leaderboard(data, data.headline_columns() or data.columns, "leaderboard"))
    if len(data.columns) > len(data.headline_columns()):
        parts.append("<details><summary>every attack, norm and ε</summary>"
                     + _html_leaderboard(data, data.columns, "leaderboard-all") + "</details>")
    flagged = [(r, c, r.cells[c.key]) for r in data.rows for c in data.columns
               if c.key in r.cells and r.cells[c.key].unreliable]
    if flagged:
        parts.append("<h2>Unreliable results</h2><ul>" + "".join(
            f"<li>{_h(r.label)} · {_h(c.label)}: {_h(cell.reason)} (run <code>{_h(_short(cell.run_id))}"
            f"</code>)</li>" for r, c, cell in flagged) + "</ul>")
    if data.comparisons:
        rows = []
        for c in data.comparisons:
            p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
            cls = "pos" if c.diff >= 0 else "neg"
            rows.append(f"<tr><td>{_h(c.label)}</td><td>{_h(c.what)}</td><td class=\"num\">{c.epcli:.2f}</td>"
                        f"<td class=\"num\">{p}</td><td class=\"num {cls}\">{c.diff:+.2f}</td>"
                        f"<td>{_h('; '.join(c.reasons) or '—')}</td><td>{_h(c.section)}</td></tr>")
        parts.append("<h2>The paper beside the results</h2><p class=\"muted\">Paper: Mansingh et al. 2024, numbers "
                     "from the authors' logs (mean ± std over seeds). diff = epcli − paper, in points.</p>"
                     "<table id=\"paper\"><thead><tr><th>model</th><th>metric</th><th>epcli</th><th>paper</th>"
                     "<th>diff</th><th>protocol differences</th><th>paper §</th></tr></thead><tbody>"
                     + "".join(rows) + "</tbody></table>")
    corr_rows = [r for r in data.rows if r.corruption]
    if corr_rows:
        parts.append("<h2>Natural corruptions (CIFAR-10-C)</h2><table id=\"corruptions\"><thead><tr><th>model</th>"
                     "<th>clean (corrupt run)</th><th>mean, 15 benchmark</th><th>mean, all 19</th>"
                     "<th>mCE (unnormalized)</th><th>relative mCE</th><th>run</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{_h(r.label)}</td>" + "".join(
                             f'<td class="num">{_fmt(r.corruption.get(k))}</td>'
                             for k in ("clean", "mean", "mean_all", "mce", "relative_mce"))
                         + f"<td><code>{_h(_short(r.corruption.get('run_id')))}</code></td></tr>"
                         for r in corr_rows) + "</tbody></table>")
    if chosen:
        parts.append("<h2>Figures</h2>")
        for stem, f in chosen.items():  # in the order figures() wrote them
            cap = _CAPTIONS.get(stem.split("-")[0] if stem.startswith("robust") else stem, "")
            parts.append(f'<figure id="fig-{_h(stem)}">{_inline_figure(f)}<figcaption>{_h(stem)}: {_h(cap)}'
                         f"</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- lineage -----------------------------------------------------------------------------------------------------

def _summary_text(summary: Any, limit: int = 4) -> str:
    s = _json(summary)
    if not isinstance(s, dict) or not s:
        return ""
    items = []
    for k, v in s.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            continue
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
    return " ".join(bits[:1] + [escape(b) for b in bits[1:-1]] + bits[-1:]) + escape(_summary_text(run.get("summary")))


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


def training_curves(store, run_ids: list[str], out_dir: str | Path) -> list[Path]:
    """Training curves (train loss, train and test accuracy vs epoch), one line per training run, drawn from
    the per-epoch metrics in the store; PNG and SVG. Raises UsageError for a run that is not a training run
    or has no per-epoch metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    runs = [store.get_run(r) for r in run_ids]
    hist = {}
    for r in runs:
        if r["kind"] != "train":
            raise UsageError(f"run {r['id']} is a {r['kind']} run; --curves draws training runs")
        hist[r["id"]] = training_history(store, r["id"])
        if not any(hist[r["id"]].get(k) for k in CURVE_METRICS):
            raise UsageError(f"training run {r['id']} has no per-epoch metrics")
    labels = {r["id"]: f"{_label(r)} {_short(r['id'])[:6]}" for r in runs}
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def training_diff(store, run_a: str, run_b: str) -> dict:
    """Two training runs side by side: every config key that differs, and the final value of every
    per-epoch metric (b - a as diff)."""
    a, b = store.get_run(run_a), store.get_run(run_b)
    for r in (a, b):
        if r["kind"] != "train":
            raise UsageError(f"run {r['id']} is a {r['kind']} run; compare two training runs or two attack runs")
    fa, fb = _flatten(a.get("config") or {}), _flatten(b.get("config") or {})
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

__all__ = ["Cell", "Column", "Comparison", "ReportData", "Row", "FORMATS", "collect", "eps_label", "figures",
           "html_report", "leaderboard_table", "lineage_tree", "protocol_reasons", "render", "robustbench_json",
           "to_dict"]
