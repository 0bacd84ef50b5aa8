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
- A leaderboard cell (model x attack x norm x eps) is the result on the largest n (ties: the strongest), then
  the exact per-image worst case over the other results on the same test images (per-example outcomes);
  results on other images are never mixed in. Failed and interrupted runs never contribute.
- A cell is flagged unreliable when a result it rests on was logged with unreliable=1 (reason from its
  detail, or from the run's failed checks).
- The comparability rule: a paper number stands beside epcli's only when model, dataset, threat model, n and
  gradient mode are comparable; otherwise the place says why (docs/report.md).
- The CIFAR-C numbers come from the latest corrupt run of a model; every mean says what it was taken over.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from epcli import paper
from epcli.errors import NotFoundError, UsageError

FORMATS = ("table", "csv", "json", "md", "html", "robustbench")
ATTACK_ORDER = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack", "worst")
ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "cw": "C&W", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
                "fab-t": "FAB-T", "square": "Square", "autoattack": "AutoAttack",
                "worst": "worst case over attacks"}
HEADLINE_ATTACKS = ("fgsm", "pgd", "cw", "square", "autoattack", "worst")
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
    forward_passes: int | None = None  # from the result's detail, when the attack logged it (whole attack)
    forward_passes_T: int | None = None  # the relaxation steps T the attacked model predicted with (detail "T")
    diff: float | None = None    # epcli - paper, percentage points
    reasons: list[str] = field(default_factory=list)  # protocol differences vs the paper
    not_compared: str | None = None  # why the paper's number is not set beside this one (comparability rule)
    worst_of: list[str] = field(default_factory=list)  # "run_id grad_mode" of each result the minimum is exact over
    attack_clean: float | None = None  # clean accuracy (percent) on the images this result attacked


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
    clean_n: int | None = None   # the images clean_acc was measured on (None: not recorded by older runs)
    clean_from: str = "test split"  # "test split": the training run's own test evaluation; else an attack's images
    cells: dict[str, Cell] = field(default_factory=dict)
    corruption: dict[str, Any] = field(default_factory=dict)  # mean, mean_all, mce, relative_mce, run_id, ...
    failed_checks: list[str] = field(default_factory=list)
    derived_running: int = 0     # attack/corrupt runs of this model still running
    seed: int | None = None
    name: str = ""               # unique display name (label, plus seed or run id when labels repeat)
    not_compared: str | None = None  # why no paper number is set beside this model's (model or data differ)
    equilibrium: dict[str, Any] = field(default_factory=dict)  # relax_residual at prediction (EP-CNNs)
    selection: str | None = None  # checkpoint selection: last, best-val, best-test

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
    paper: float | None          # None when not comparable (see not_compared)
    paper_std: float | None
    diff: float | None
    n_examples: int | None
    reasons: list[str]
    section: str | None
    not_compared: str | None = None


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


def _abs(store, path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else Path(store.root) / p)


def _selection(cfg: dict, summary: Any = None) -> str | None:
    """The training run's checkpoint selection (last | best-val | best-test, with the epoch), when recorded."""
    recipe = cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else {}
    summary = summary if isinstance(summary, dict) else {}
    sel = summary.get("select") or cfg.get("select") or recipe.get("select")
    if not sel:
        return None
    epoch = summary.get("selected_epoch")
    return f"{sel} (epoch {epoch})" if epoch is not None and sel != "last" else str(sel)


def _name_rows(rows: list["Row"]) -> None:
    """Unique display names: the label, plus the seed (or the run id) when several runs share a label."""
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    for label, rs in by_label.items():
        seeds = [r.seed for r in rs]
        for r in rs:
            if len(rs) == 1:
                r.name = label
            elif None not in seeds and len(set(seeds)) == len(seeds):
                r.name = f"{label} · seed {r.seed}"
            else:
                r.name = f"{label} · {_short(r.run_id)}"


def _eps_key(e: float) -> str:
    return f"{float(e):.9g}"


def _load_per_example(path: str | None) -> dict | None:
    """An attack run's per-example outcomes: test indices and robust flags per eps (numpy), or None."""
    if not path:
        return None
    try:
        from safetensors.numpy import load_file
        t = load_file(path)
    except Exception:  # a missing or unreadable file: that result cannot join an exact worst case
        return None
    if "index" not in t:
        return None
    robust = {}
    for name, v in t.items():
        if name.startswith("robust_"):
            try:
                robust[_eps_key(float(name[len("robust_"):]))] = v.astype(bool)
            except ValueError:
                continue
    return {"index": t["index"].astype("int64"), "robust": robust}


@functools.lru_cache(maxsize=65536)
def _detail(text: str) -> dict:
    """A metric's detail JSON as a dict (read-only: shared). The rows of one attack run mostly carry the same
    detail text, one per eps, so most are decoded once."""
    d = _json(text)
    return d if isinstance(d, dict) else {}


def _cell(ms: list[dict], k: float, eps: float, run_info: dict, per_example: dict, loaded: dict,
          failed_checks: dict, attack_clean_by_run: dict) -> "Cell":
    """One leaderboard cell from every result for it: the largest n (ties: the strongest result), then the
    exact per-image worst case over the other results on the same images (per-example outcomes)."""
    import numpy as np
    base = max(ms, key=lambda m: (m["n_examples"] or 0, -m["value"]))

    def outcome(m: dict):
        cfg = run_info.get(m["run_id"], {}).get("config", {})
        if (m["grad_mode"] or None) != (cfg.get("grad_mode") or m["grad_mode"] or None):
            return None  # an unroll-sweep result: the run stored per-example outcomes for its main mode only
        if m["run_id"] not in loaded:
            loaded[m["run_id"]] = _load_per_example(per_example.get(m["run_id"]))
        pe = loaded[m["run_id"]]
        if pe is None:
            return None
        v = pe["robust"].get(_eps_key(eps))
        return None if v is None else (pe["index"], v)

    members, value = [base], base["value"] * k
    b = outcome(base) if len(ms) > 1 else None
    if b is not None:
        robust = b[1].copy()
        for m in ms:
            if m is base:
                continue
            o = outcome(m)
            if o is not None and len(o[0]) == len(b[0]) and np.array_equal(o[0], b[0]):
                robust &= o[1]
                members.append(m)
        if len(members) > 1:
            value = float(robust.mean()) * 100.0
    def detail(m: dict) -> dict:
        return _detail(m["detail"]) if m["detail"] else {}
    first = detail(base)  # decoded only where read: a cell of thousands of results reads one or two
    flagged = [m for m in members if m["unreliable"]]
    reason = None
    if flagged:
        m = flagged[0]
        reason = detail(m).get("reason") or "; ".join(failed_checks.get(m["run_id"], [])) or "marked unreliable"
    modes = []
    for m in members:
        if m["grad_mode"] and m["grad_mode"] not in modes:
            modes.append(m["grad_mode"])
    return Cell(value=value, n_examples=base["n_examples"], grad_mode="+".join(modes) or None,
                unreliable=bool(flagged), reason=reason, run_id=base["run_id"], status=base["run_status"],
                n_results=len(members), forward_passes=first.get("forward_passes"),
                forward_passes_T=first.get("T"),
                worst_of=[f"{m['run_id']} {m['attack']} {m['grad_mode'] or '-'}" for m in members]
                if len(members) > 1 else [],
                attack_clean=attack_clean_by_run.get(base["run_id"]))


# --- comparability ------------------------------------------------------------------------------------------
# A number is set beside another (the paper's, or another run's) only when model, dataset, threat model, n and
# gradient mode are comparable; otherwise the place says why not. docs/report.md states the rule.

# The paper's models are epcli registry names: a differently sized net (ep-cnn-small, a demo) is not the
# paper's model, however its family.
PAPER_REGISTRY = {"ep-cnn": "ep-cnn", "cnn": "cnn", "vit": "vit"}
PAPER_DATASETS = ("cifar10", "cifar100")
PAPER_EP_CHANNELS = (128, 256, 512, 512)  # the paper's EP-CNN (paper_facts.json "architecture")
MIN_N = 1000  # below the paper's own n, at least this many examples (binomial std error <= 1.6 points)

# corrupt.py's names (report.py never imports torch); tests pin them to epcli.corruptions
BENCHMARK_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                         "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


def _paper_registry(paper_key: str | None) -> str | None:
    if not paper_key:
        return None
    return "cnn" if paper_key.startswith("cnn-at-") else PAPER_REGISTRY.get(paper_key)


def model_not_comparable(row: "Row") -> str | None:
    """Why this training run cannot stand beside the paper's numbers at all (model or data), or None."""
    if not row.paper_key:
        return None
    why = []
    info = paper.load_facts()["models"].get(row.paper_key, {})
    what = f"{info.get('label', row.paper_key)}: {info.get('architecture', '?')}"
    want = _paper_registry(row.paper_key)
    recipe = str(row.config.get("recipe") or "") if not isinstance(row.config.get("recipe"), dict) else ""
    overrides = row.config.get("model_overrides") or row.config.get("model_set")
    if want and row.model != want:
        kind = "demo model" if recipe.startswith("demo") or row.model.endswith("-small") else "another model"
        why.append(f"{kind} {row.model}: the paper compares {what}")
    elif overrides:
        why.append(f"model {row.model} with changed architecture ({overrides}): the paper compares {what}")
    else:
        spec = row.config.get("spec") if isinstance(row.config.get("spec"), dict) else {}
        if want == "ep-cnn" and spec.get("channels") and list(spec["channels"]) != list(PAPER_EP_CHANNELS):
            why.append(f"model ep-cnn with channels {'-'.join(str(c) for c in spec['channels'])}: the paper "
                       f"compares {what}")
    ds = (row.dataset or "").lower()
    if ds not in PAPER_DATASETS:
        why.append(f"data {row.dataset or '?'}: the paper evaluates on the full "
                   f"{paper.paper_dataset(ds) or 'CIFAR-10'} test set")
    return "; ".join(why) or None


def cell_not_comparable(cell: "Cell", fact: dict, paper_key: str | None) -> str | None:
    """Why one result cannot stand beside the paper's number for the same threat (n, gradient mode), or None."""
    why = []
    n_fact, n = fact.get("n_examples"), cell.n_examples
    if n_fact and (n or 0) < min(n_fact, MIN_N):
        why.append(f"n={n or '?'}: the paper's number is over {n_fact:,} images (need ≥ {min(n_fact, MIN_N):,})")
    pg = fact.get("grad_mode")
    if paper_key == "ep-cnn" and fact.get("attack") in WHITE_BOX and pg and cell.grad_mode != pg:
        why.append(f"gradient {_grad(cell.grad_mode)}: the paper's attack used {pg}")
    return "; ".join(why) or None


def corruption_coverage(cells: dict[str, set]) -> dict:
    """Which corruptions x severities a corrupt run covered, and whether the 15-, 18- and 19-means exist."""
    def full(names) -> bool:
        return all(c in cells and set(SEVERITIES) <= set(cells[c]) for c in names)
    allc = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    bench = [c for c in BENCHMARK_CORRUPTIONS if c in cells]
    sevs = [set(cells[c]) for c in bench] or [set()]
    return {"benchmark": bench, "extra": [c for c in EXTRA_CORRUPTIONS if c in cells],
            "severities": sorted(set.intersection(*sevs)), "uniform": all(v == sevs[0] for v in sevs),
            "complete15": full(BENCHMARK_CORRUPTIONS), "complete19": full(allc),
            "complete18": full([c for c in allc if c != "frost"])}


def corruption_mean_label(cov: dict) -> str:
    """"mean of 5/15 benchmark corruptions × 5 severities" (the set a mean was taken over)."""
    sev = cov.get("severities") or []
    if not cov.get("uniform", True):
        s = "uneven severities"
    elif sev == list(SEVERITIES):
        s = "5 severities"
    else:
        s = f"severit{'y' if len(sev) == 1 else 'ies'} {','.join(str(x) for x in sev)}"
    return f"mean of {len(cov.get('benchmark') or [])}/15 benchmark corruptions × {s}"


# --- collect -----------------------------------------------------------------------------------------------

METRIC_COLUMNS = ("id", "run_id", "name", "value", "step", "attack", "norm", "eps", "grad_mode", "corruption",
                  "severity", "n_examples", "unreliable", "detail")


def _metric_rows(db, train_runs: list[dict], derived: list[dict]) -> list[dict]:
    """The accuracy metrics (ACC_METRICS) of the selected training runs and of every run derived from them that
    did not fail or get interrupted, in insertion order, each with its run's kind, status, model_run_id and
    started_at. Read by run id, without a join (the join's row lookups took most of the time at 10k runs), in
    chunks of run ids below SQLite's limit on query parameters."""
    owner = {}
    for r in list(train_runs) + list(derived):
        if r["status"] not in ("failed", "interrupted"):
            owner[r["id"]] = (r["kind"], r["status"], r.get("model_run_id") or r["id"], r["started_at"])
    ids, out = list(owner), []
    names = _placeholders(list(ACC_METRICS))
    for i in range(0, len(ids), 10_000):
        chunk = ids[i:i + 10_000]
        # +name: scan in id order rather than through the name index (every model's rows of these names)
        for t in db.execute(f"SELECT {', '.join(METRIC_COLUMNS)} FROM metrics WHERE run_id IN "
                            f"({_placeholders(chunk)}) AND +name IN ({names}) ORDER BY id",
                            chunk + list(ACC_METRICS)).fetchall():
            m = dict(zip(METRIC_COLUMNS, t))
            m["run_kind"], m["run_status"], m["model_run_id"], m["started_at"] = owner[m["run_id"]]
            out.append(m)
    if len(ids) > 10_000:
        out.sort(key=lambda m: m["id"])
    return out


def collect(store, models: Iterable[str] | None = None, runs: Iterable[str] | None = None,
            dataset: str | None = None) -> ReportData:
    """Gather every number a report shows, in a few queries. Raises NotFoundError with a one-line message."""
    db = store.db
    models = [m for m in (models or []) if m]
    runs = [r for r in (runs or []) if r]
    filters = {"models": models or None, "runs": runs or None, "dataset": dataset}

    all_train = [dict(r) for r in db.query(
        "SELECT id, kind, status, model, dataset, config, summary, started_at, seed FROM runs WHERE kind = 'train' "
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
        selected = [r for r in all_train if r["status"] not in ("failed", "interrupted")]
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
    metric_rows = _metric_rows(db, selected, derived)
    test_acc, test_n = {}, {}
    for r in db.query(f"SELECT run_id, value, n_examples, MAX(COALESCE(step, -1)) FROM metrics WHERE name = "
                      f"'test_acc' AND run_id IN ({ph}) GROUP BY run_id", ids):
        test_acc[r["run_id"]], test_n[r["run_id"]] = r["value"], r["n_examples"]
    failed_checks: dict[str, list[str]] = {}
    for c in db.query(f"SELECT c.run_id, c.name, c.detail, r.model_run_id FROM checks c JOIN runs r "
                      f"ON r.id = c.run_id WHERE c.passed = 0 AND r.model_run_id IN ({ph})", ids):
        failed_checks.setdefault(c["run_id"], []).append(c["name"] + (f": {c['detail']}" if c["detail"] else ""))
    adv_rows = [dict(a) for a in db.query(
        f"SELECT a.sha256, a.path, a.meta, ra.run_id, r.model_run_id, r.started_at FROM run_artifacts ra "
        f"JOIN artifacts a ON a.sha256 = ra.sha256 JOIN runs r ON r.id = ra.run_id "
        f"WHERE ra.role = 'output' AND a.kind = 'adversarial-examples' AND r.model_run_id IN ({ph}) "
        f"AND r.status = 'finished' ORDER BY r.started_at", ids)]
    # content-addressed: two runs with identical outcomes share one artifact, so go through run_artifacts
    per_example = {a["run_id"]: _abs(store, a["path"]) for a in db.query(
        f"SELECT a.path, ra.run_id FROM run_artifacts ra JOIN artifacts a ON a.sha256 = ra.sha256 JOIN runs r "
        f"ON r.id = ra.run_id WHERE ra.role = 'output' AND a.kind = 'per-example' AND r.kind = 'attack' "
        f"AND r.status = 'finished' AND r.model_run_id IN ({ph})", ids)}
    residuals = [dict(m) for m in db.query(
        f"SELECT m.value, m.detail, m.run_id, r.model_run_id, r.started_at FROM metrics m JOIN runs r "
        f"ON r.id = m.run_id WHERE m.name = 'relax_residual' AND r.model_run_id IN ({ph}) "
        f"AND r.status = 'finished' ORDER BY r.started_at, m.id", ids)]

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
                            epochs=_epochs(r["config"]), config=r["config"], clean_n=test_n.get(r["id"]),
                            failed_checks=list(failed_checks.get(r["id"], [])), seed=r.get("seed"),
                            selection=_selection(r["config"], _json(r.get("summary"))))
        summ = _json(r.get("summary"))
        if isinstance(summ, dict) and summ.get("select") and isinstance(summ.get("test_acc"), (int, float)):
            rows[r["id"]].clean_acc = summ["test_acc"] * k  # the selected epoch's, not the last epoch's
    _name_rows(list(rows.values()))
    for row in rows.values():
        row.not_compared = model_not_comparable(row)
    for m in residuals:  # the latest evaluation's residual at prediction; adversarial: the worst attack run's
        if m["model_run_id"] in rows and m["value"] is not None:
            d = _json(m["detail"]) if m["detail"] else {}
            d = d if isinstance(d, dict) else {}
            row = rows[m["model_run_id"]]
            adv = row.equilibrium.get("adversarial")
            if isinstance(d.get("adv_max"), (int, float)) and (adv is None or d["adv_max"] > adv["max"]):
                adv = {"max": d["adv_max"], "predictions": d.get("adv_predictions"),
                       "unconverged": d.get("adv_unconverged"), "run_id": m["run_id"]}
            row.equilibrium = {"residual": m["value"], "T": d.get("T"), "mean": d.get("mean"),
                               "steps_mean": d.get("steps_mean"), "tol": d.get("tol", d.get("tolerance")),
                               "run_id": m["run_id"], "at_equilibrium": d.get("at_equilibrium"),
                               **({"adversarial": adv} if adv else {})}
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
    attack_clean_by_run: dict[str, float] = {}
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
            attack_clean[mr] = (m["value"] * k, m["n_examples"], m["run_id"])
            attack_clean_by_run[m["run_id"]] = m["value"] * k
        if m["run_kind"] == "corrupt" and m["name"].startswith(("corruption", "mce", "relative")):
            if mr not in corr_latest or (m["started_at"], m["run_id"]) > corr_latest[mr]:
                corr_latest[mr] = (m["started_at"], m["run_id"])
    loaded: dict[str, dict | None] = {}
    for (mr, key), ms in groups.items():
        rows[mr].cells[key] = _cell(ms, k, columns[key].eps, run_info, per_example, loaded, failed_checks,
                                    attack_clean_by_run)
    # the worst case over attacks, per norm and eps: exact per image, over results on the same images only
    by_threat: dict[tuple, list[dict]] = {}
    for (mr, key), ms in groups.items():
        col = columns[key]
        by_threat.setdefault((mr, col.norm, eps_label(col.eps, col.norm), col.eps), []).extend(ms)
    for (mr, norm, el, eps), ms in by_threat.items():
        if len({m["attack"] for m in ms}) < 2:
            continue
        cell = _cell(ms, k, eps, run_info, per_example, loaded, failed_checks, attack_clean_by_run)
        if len({w.split()[1] for w in cell.worst_of}) < 2:
            continue  # no two attacks on the same images: nothing exact to show
        key = f"worst:{norm}:{el}"
        columns.setdefault(key, Column(key, "worst", norm, float(eps), f"worst case {NORM_NAMES.get(norm, norm)} {el}"))
        rows[mr].cells[key] = cell
    for row in rows.values():
        if row.clean_acc is None and row.run_id in attack_clean:  # no test evaluation: the latest attack's
            row.clean_acc, row.clean_n, aid = attack_clean[row.run_id]
            row.clean_from = f"attacked images (attack run {aid})"

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
                if m["corruption"] and m["severity"] is not None:
                    c.setdefault("_cells", {}).setdefault(m["corruption"], {})[int(m["severity"])] = m["value"] * k
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
                           "eps": float(m["eps"]), "K": kk, "value": m["value"] * k, "n": m["n_examples"]})
    for row in rows.values():
        _corruption_means(row.corruption)
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
                           "value": cell.value, "unreliable": cell.unreliable, "n": cell.n_examples,
                           "grad_mode": cell.grad_mode})

    candidates = []
    for a in reversed(adv_rows):  # latest first
        cfg = run_info.get(a["run_id"], {}).get("config", {})
        if a["model_run_id"] not in rows:
            continue
        eps = cfg.get("eps") if isinstance(cfg.get("eps"), list) else []
        candidates.append({"run_id": a["model_run_id"], "attack_run_id": a["run_id"],
                           "label": rows[a["model_run_id"]].label, "sha256": a["sha256"],
                           "path": _abs(store, a["path"]), "per_example": per_example.get(a["run_id"]),
                           "norm": cfg.get("norm") or "linf", "attack": cfg.get("attack"),
                           "grad_mode": cfg.get("grad_mode"), "n_eps": len(eps), "n": cfg.get("n_examples"),
                           "meta": _json(a["meta"]) or {}, "config": cfg})
    adversarial = _pick_adversarial(candidates)
    adversarial.sort(key=lambda a: (0 if a["norm"] == "linf" else 1, a["run_id"]))

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


def _pick_adversarial(candidates: list[dict]) -> list[dict]:
    """Per norm, one adversarial-examples artifact per model, all from the same attack where possible (the one
    most models have; PGD first), each the one with the most eps values, then the largest n, then the newest."""
    out = []
    for norm in sorted({c["norm"] for c in candidates}, key=lambda n: (n != "linf", n)):
        cs = [c for c in candidates if c["norm"] == norm]
        models = {c["run_id"] for c in cs}
        attacks = {c["attack"] for c in cs}
        attack = max(attacks, key=lambda at: (len({c["run_id"] for c in cs if c["attack"] == at}), at == "pgd",
                                              str(at)))
        for m in sorted(models):
            mine = [c for c in cs if c["run_id"] == m]
            same = [c for c in mine if c["attack"] == attack] or mine
            # candidates are newest first; max keeps the first of equals
            out.append(max(same, key=lambda c: (c["n_eps"], c["n"] or 0)))
    return out


def _corruption_means(c: dict) -> None:
    """Means over exactly the corruptions x severities that were run, each labelled with that set; the 15- and
    19-corruption means (and mCE) only when that set is complete, the paper's 18 (no frost) likewise."""
    cells = c.pop("_cells", None)
    if not cells:
        return
    cov = corruption_coverage({n: set(v) for n, v in cells.items()})
    bench = [a for n in cov["benchmark"] for a in cells[n].values()]
    c["coverage"] = {k: cov[k] for k in ("benchmark", "extra", "severities", "complete15", "complete19")}
    c["mean_label"] = corruption_mean_label(cov)
    c["mean"] = sum(bench) / len(bench) if bench else None
    everything = [a for v in cells.values() for a in v.values()]
    c["mean_all"] = sum(everything) / len(everything) if cov["complete19"] else None
    no_frost = [a for n, v in cells.items() if n != "frost" for a in v.values()]
    c["mean18"] = sum(no_frost) / len(no_frost) if cov["complete18"] else None
    if not cov["complete15"]:
        for key in ("mce", "relative_mce"):
            if c.get(key) is not None:
                c[key] = None
                c.setdefault("withheld", []).append(key)


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
        reasons.append("corruptions: epcli generates them (seeded) unless --source gave the official files")
    if fact.get("eps") is not None and eps is not None and not math.isclose(fact["eps"], eps, rel_tol=1e-3):
        reasons.append(f"eps: paper {fact['eps']:g}")
    return reasons


@functools.lru_cache(maxsize=4096)
def _paper_facts(model_key: str, dataset: str, metric: str, attack: str | None = None, norm: str | None = None,
                 eps: float | None = None, variant: bool | None = None) -> tuple[dict, ...]:
    """paper.paper_values, remembered: thousands of models ask for the same few (model, threat) cells, and each
    lookup scans the paper's 1,113 numbers. The facts are read-only here."""
    return tuple(paper.paper_values(model_key, dataset=dataset, metric=metric, attack=attack, norm=norm, eps=eps,
                                    variant=variant))


@functools.lru_cache(maxsize=4096)
def _paper_cell_fact(model_key: str, dataset: str, attack: str, norm: str, eps: float,
                     grad_mode: str | None) -> dict | None:
    """The paper's number a result is set beside: the one with the result's gradient mode, else the primary."""
    facts = _paper_facts(model_key, dataset, "robust_acc", attack, norm, eps)
    same_grad = [f for f in facts if f.get("grad_mode") and f.get("grad_mode") == grad_mode]
    primary = [f for f in facts if f.get("variant") is None]
    return (same_grad or primary or [None])[0]


def _compare(rows: list[Row], columns: dict[str, Column], run_info: dict[str, dict]) -> list[Comparison]:
    """Every (model, metric) the paper also logged. The paper's number is set beside epcli's only under the
    comparability rule; otherwise the comparison carries `not_compared` (why) and no paper number or diff."""
    out = []

    def add(row, what, value, fact, n, reasons, why):
        ok = why is None
        out.append(Comparison(row.run_id, row.name or row.label, row.paper_key, what, value,
                              fact["value"] if ok else None, fact.get("std") if ok else None,
                              value - fact["value"] if ok else None, n, reasons if ok else [],
                              fact.get("section"), why))

    for row in rows:
        if not row.paper_key:
            continue
        ds = paper.paper_dataset(row.dataset) or ("cifar10" if row.dataset is None else None)
        if ds is None:
            continue
        fact = next(iter(_paper_facts(row.paper_key, ds, "clean_acc", variant=False)), None)
        if fact and row.clean_acc is not None:
            add(row, "clean", row.clean_acc, fact, row.clean_n, protocol_reasons(row, None, fact), row.not_compared)
        for key, cell in row.cells.items():
            col = columns[key]
            if cell.value is None:
                continue
            fact = _paper_cell_fact(row.paper_key, ds, col.attack, col.norm, col.eps, cell.grad_mode)
            if fact is None:
                continue
            why = row.not_compared or cell_not_comparable(cell, fact, row.paper_key)
            reasons = []
            if why is None:  # the protocol differences are listed only beside a number that is compared
                cfg = run_info.get(cell.run_id or "", {}).get("config", {})
                reasons = protocol_reasons(row, cell, fact, cfg, eps=col.eps)
                if fact.get("variant"):
                    reasons.insert(0, f"paper run: {fact['variant']}")
            if why is None:
                cell.paper, cell.paper_std = fact["value"], fact.get("std")
                cell.diff = cell.value - fact["value"]
                cell.reasons = reasons
            else:
                cell.not_compared = why
            add(row, col.label, cell.value, fact, cell.n_examples, reasons, why)
        fact = next(iter(_paper_facts(row.paper_key, ds, "corruption_mean_acc", variant=False)), None)
        corr = row.corruption
        if fact and corr.get("mean") is not None:
            # the paper's mean is over 18 corruptions (all but frost) x 5 severities: only that mean compares
            mean18 = corr.get("mean18")
            why = row.not_compared or (None if mean18 is not None else
                                       f"corruptions: epcli ran {corr.get('mean_label', '?')}; the paper's mean "
                                       f"is over 18 corruptions (all but frost) × 5 severities")
            value = mean18 if mean18 is not None else corr["mean"]
            add(row, "CIFAR-C mean (18 corruptions × 5 severities)" if mean18 is not None else
                f"CIFAR-C {corr.get('mean_label', 'mean')}", value, fact, corr.get("n_examples"),
                protocol_reasons(row, None, fact), why)
    return out


# --- tabular renderers ---------------------------------------------------------------------------------------

def _columns(data: ReportData, which: str) -> list[Column]:
    if which == "all":
        return data.columns
    return data.headline_columns() or data.columns


def _sub(cell: Cell, sep: str) -> str:
    """The line under a value: example count, gradient mode (when the result has one), running."""
    bits = [f"n={cell.n_examples if cell.n_examples is not None else '?'}"]
    attacks = list(dict.fromkeys(w.split()[1] for w in cell.worst_of if len(w.split()) > 2))
    if len(attacks) > 1:
        bits.append("worst of " + "+".join(ATTACK_NAMES.get(x, x) for x in attacks))
    elif cell.grad_mode:
        bits.append(_grad(cell.grad_mode) if "+" not in cell.grad_mode else
                    "worst of " + "+".join(_grad(g) for g in cell.grad_mode.split("+")))
    elif cell.n_results > 1:
        bits.append(f"worst of {cell.n_results}")
    if cell.status == "running":
        bits.append("running")
    return sep.join(bits)


def _corr_text(corr: dict, unit: str = "") -> str:
    """The CIFAR-C mean with the set it was taken over ("40.00 (5/15 × 5 sev.)"), or — ."""
    if corr.get("mean") is None:
        return "—"
    cov = corr.get("coverage")
    if not cov:
        return f"{corr['mean']:.2f}"
    if cov.get("complete15"):
        return f"{corr['mean']:.2f} (15 × 5 sev.)"
    sev = cov.get("severities") or []
    return f"{corr['mean']:.2f} ({len(cov['benchmark'])}/15 × {len(sev)} sev.)"


def _residual_tol(eq: dict) -> float | None:
    if eq.get("tol") is not None:
        return float(eq["tol"])
    import sys
    ep = sys.modules.get("epcli.ep")  # only when already loaded: a report never imports torch itself
    for name in ("EQUILIBRIUM_TOL",):
        if ep is not None and isinstance(getattr(ep, name, None), (int, float)):
            return float(getattr(ep, name))
    return None


def model_notes(row: Row) -> list[str]:
    """What a reader must know beside a model's numbers: equilibrium residual, checkpoint selection."""
    notes = []
    eq = row.equilibrium
    if eq.get("residual") is not None:
        t = f" at T={eq['T']}" if eq.get("T") is not None else ""
        sm = eq.get("steps_mean")
        if isinstance(sm, (int, float)) and eq.get("T") is not None and sm < eq["T"]:  # each image stopped on its own
            t = f", {sm:.0f} steps per image on average (cap T={eq['T']})"
        tol = _residual_tol(eq)
        if eq.get("at_equilibrium") is False or (tol is not None and eq["residual"] > tol):
            notes.append(f"NOT converged: residual {eq['residual']:.3g}{t}" + (f" (tolerance {tol:g})" if tol else ""))
        else:
            notes.append(f"at equilibrium: residual {eq['residual']:.3g}{t}")
        adv = eq.get("adversarial")
        if adv:
            over = f" over {adv['predictions']} predictions" if adv.get("predictions") else ""
            if adv.get("unconverged") or (tol is not None and adv["max"] > tol):
                k = f"{adv['unconverged']} " if adv.get("unconverged") is not None else ""
                notes.append(f"adversarial predictions NOT converged: {k}above tolerance, residual up to "
                             f"{adv['max']:.3g}{over} (run {adv['run_id']})")
            else:
                notes.append(f"adversarial predictions at equilibrium: residual up to {adv['max']:.3g}{over}")
    if row.selection:
        notes.append(f"checkpoint: {row.selection}" + (" chosen on the test set"
                                                        if row.selection.startswith("best-test") else ""))
    return notes


def clean_note(row: Row) -> str:
    """What the clean accuracy was measured on: "n=1000, test split" (the training run's own evaluation of the
    whole test split, not the attack cells' images) or "n=200, attacked images" when it comes from an attack."""
    where = "test split" if row.clean_from == "test split" else "attacked images"
    return (f"n={row.clean_n}, " if row.clean_n else "") + where


def _clean_text(row: Row, markup: str = "plain") -> str:
    if row.clean_acc is None:
        return "—"
    return f"{row.clean_acc:.2f} ({clean_note(row)})" if markup == "md" else f"{row.clean_acc:.2f}\n{clean_note(row)}"


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
    t = Table(title=f"epcli leaderboard — accuracy % ({data.store_root})", show_lines=True, caption_justify="left",
              caption="cells: the result on the most images (n), then the exact worst case over other results on "
                      "those images; n = examples, then gradient mode. ⚠ = unreliable. clean: the training run's "
                      "accuracy on its whole test split (its own n). CIFAR-C: mean of k/15 benchmark corruptions × "
                      "severities run")
    t.add_column("model", style="bold")
    t.add_column("run")
    t.add_column("data")
    t.add_column("clean", justify="right")
    for c in cols:
        t.add_column(c.label, justify="right")
    t.add_column("CIFAR-C", justify="right")
    t.add_column("mCE", justify="right")
    footnotes = []  # a model's notes go under the table: in an 80-column model cell they wrap word by word
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
        notes, mark = model_notes(row), ""
        if notes:
            footnotes.append(f"[{len(footnotes) + 1}] {row.name or row.label}: " + "; ".join(notes))
            mark = f" [{len(footnotes)}]"
        t.add_row(Text((row.name or row.label) + mark + status), _short(row.run_id), row.dataset or "—",
                  _clean_text(row), *cells, _corr_text(corr), _fmt(corr.get("mce")))
    if footnotes:
        t.caption += "\n" + "\n".join(footnotes)
    return t


def _rich_text(renderable, width: int = 200) -> str:
    from rich.console import Console
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buf.getvalue()


def _csv(data: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["run_id", "model", "label", "dataset", "status", "paper_key", "clean_acc", "clean_acc:n", "clean_acc:from"]
    for c in data.columns:
        head += [c.key, f"{c.key}:n", f"{c.key}:grad_mode", f"{c.key}:unreliable", f"{c.key}:paper"]
    head += ["corruption_mean_acc", "corruption_mean_over", "corruption_mean_acc_all", "mce_unnormalized",
             "relative_mce"]
    w.writerow(head)
    for row in data.rows:
        line = [row.run_id, row.model, row.label, row.dataset or "", row.status, row.paper_key or "",
                "" if row.clean_acc is None else repr(row.clean_acc), row.clean_n or "",
                "" if row.clean_acc is None else row.clean_from]
        for c in data.columns:
            cell = row.cells.get(c.key)
            if cell is None:
                line += ["", "", "", "", ""]
            else:
                line += [repr(cell.value), cell.n_examples if cell.n_examples is not None else "",
                         cell.grad_mode or "", int(cell.unreliable),
                         cell.paper if cell.paper is not None else (f"not compared: {cell.not_compared}"
                                                                    if cell.not_compared else "")]
        for k in ("mean", "mean_label", "mean_all", "mce", "relative_mce"):
            v = row.corruption.get(k)
            line.append("" if v is None else (v if isinstance(v, str) else repr(v)))
        w.writerow(line)
    return buf.getvalue()


def _fields(obj, skip: tuple[str, ...] = ()) -> dict:
    """A flat dataclass as a dict of its fields, without asdict's deep copy (the values are only serialised)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}


def to_dict(data: ReportData) -> dict:
    """A JSON-ready dict of the whole report (accuracies in percent)."""
    rows = []
    for row in data.rows:
        d = _fields(row, skip=("cells", "config"))
        d["unreliable"] = row.unreliable
        d["cells"] = {k: _fields(c) for k, c in row.cells.items()}
        rows.append(d)
    return {"generated_at": data.generated_at, "store": data.store_root, "filters": data.filters,
            "unit": "percent", "store_scale": data.scale,
            "columns": [_fields(c) for c in data.columns], "rows": rows,
            "comparisons": [_fields(c) for c in data.comparisons], "notes": data.notes}


def _json_text(doc: dict) -> str:
    """The report document with one line per column, row, comparison and note: as easy to read and grep as an
    indented dump, and written by json's C encoder (an indented dump runs the pure-Python one over every value,
    seconds at thousands of models)."""
    enc = json.JSONEncoder(ensure_ascii=False, default=str)
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            items = ",\n".join("    " + enc.encode(x) for x in value)
            parts.append(f"  {enc.encode(key)}: [\n{items}\n  ]")
        else:
            parts.append(f"  {enc.encode(key)}: {enc.encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _md(data: ReportData, columns: str = "headline") -> str:
    cols = _columns(data, columns)
    out = ["# epcli leaderboard", "",
           f"Accuracy in %. Store `{data.store_root}`, generated {data.generated_at}. Cells: the result on the most "
           "images, then the exact worst case over the other results on the same images (n = examples, gradient "
           "mode); ⚠ = unreliable (see notes). clean: the training run's accuracy on its whole test split (its own "
           "n, not the attacked images'). CIFAR-C: mean over the corruptions × severities that were run.", ""]
    head = ["model", "run", "data", "status", "clean"] + [c.label for c in cols] + ["CIFAR-C", "mCE"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    flags = []
    for row in data.rows:
        name = row.name or row.label
        notes = model_notes(row)
        line = [name + (f" ({'; '.join(notes)})" if notes else ""), f"`{_short(row.run_id)}`", row.dataset or "—",
                row.status, _clean_text(row, "md")]
        for c in cols:
            cell = row.cells.get(c.key)
            line.append(_cell_text(cell, markup="md"))
            if cell is not None and cell.unreliable:
                flags.append(f"- ⚠ {name}, {c.label}: {cell.reason}")
        line += [_corr_text(row.corruption), _fmt(row.corruption.get("mce"))]
        out.append("| " + " | ".join(_md_safe(x).replace("|", "\\|") for x in line) + " |")
    if flags:
        out += ["", "Unreliable results:", ""] + [_md_safe(f) for f in flags]
    if data.comparisons:
        out += ["", "## The paper beside the results", "", _PAPER_NOTE]
        shown = [c for c in data.comparisons if c.not_compared is None]
        if shown:
            out += ["", "| model | metric | epcli | paper | diff | protocol differences |", "|---|---|---:|---:|---:|---|"]
            for c in shown:
                p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
                out.append(f"| {_md_safe(c.label)} | {c.what} | {c.epcli:.2f} | {p} | {c.diff:+.2f} | "
                           f"{'; '.join(c.reasons) or '—'} |")
        out += [""] + [f"- {line}" for line in _not_compared_lines(data)]
    if data.notes:
        out += ["", "Notes:", ""] + [f"- {_md_safe(n)}" for n in data.notes]
    return "\n".join(out) + "\n"


def _md_safe(text: str) -> str:
    """Store text (labels, model and dataset names, reasons) as inert Markdown: no raw HTML (<script>,
    <img onerror>) and no link or image syntax (javascript: URLs) reaches a renderer."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]")


_PAPER_NOTE = ("A paper number (Mansingh et al. 2024, from the authors' logs, mean ± std over seeds) stands beside "
               "epcli's only when model, dataset, threat model, n and gradient mode are comparable; diff = epcli − "
               "paper, in points.")


def _not_compared_lines(data: ReportData) -> list[str]:
    """One line per model that cannot be compared at all, one per other result that cannot."""
    lines, done = [], set()
    rows = {r.run_id: r for r in data.rows}
    for c in data.comparisons:
        if c.not_compared is None:
            continue
        row = rows.get(c.run_id)
        if row is not None and row.not_compared and c.not_compared == row.not_compared:
            if c.run_id not in done:
                done.add(c.run_id)
                lines.append(f"{c.label}: not compared with the paper ({c.not_compared})")
        else:
            lines.append(f"{c.label}, {c.what}: not compared ({c.not_compared})")
    return lines


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
                 "RobustBench's standardized track" if str(row.model).startswith("ep") else "")
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


def render(data: ReportData, fmt: str = "table", columns: str | None = None) -> str:
    """The leaderboard as text. columns: "headline" (default for table/md) or "all" (default for csv/json)."""
    if fmt == "table":
        return _rich_text(leaderboard_table(data, columns or "headline"))
    if fmt == "csv":
        return _csv(data)
    if fmt == "json":
        return _json_text(to_dict(data))
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


FIGURE_KINDS = ("robust", "corruptions", "steps", "unroll", "adversarial")


def figures(data: ReportData, out_dir: str | Path, paper_curves: bool = True,
            only: Iterable[str] | None = None) -> list[Path]:
    """Write every figure the data supports as PNG and SVG; skip a figure whose data is absent. `only`: these
    kinds (FIGURE_KINDS) of figure, e.g. to draw some in another process; the paths come in FIGURE_KINDS order."""
    only = set(FIGURE_KINDS if only is None else only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    paths: list[Path] = []
    names = _row_labels(data)
    rows = {r.run_id: r for r in data.rows}
    # every figure's points, grouped once by model (a figure then reads only its own models' points)
    curves: dict[tuple, list[dict]] = {}
    for c in data.curves:
        curves.setdefault((c["attack"], c["norm"]), []).append(c)
    corr_by: dict[str, list[dict]] = {}
    for c in data.corruptions:
        corr_by.setdefault(c["run_id"], []).append(c)
    steps_by: dict[str, list[dict]] = {}
    for st in data.steps:
        steps_by.setdefault(st["run_id"], []).append(st)

    # robust accuracy vs eps, one panel per attack x norm
    for attack, norm in sorted(curves if "robust" in only else [],
                               key=lambda an: (ATTACK_ORDER.index(an[0]) if an[0] in ATTACK_ORDER else 99, an[1])):
        if len({c["eps"] for c in curves[(attack, norm)]}) < 2:
            continue  # a single eps is no curve: the number is in the tables
        by_run: dict[str, list[dict]] = {}
        for c in curves[(attack, norm)]:
            by_run.setdefault(c["run_id"], []).append(c)
        shown, colors, left_out = _figure_models(data, names, by_run)
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        all_eps, drawn_paper, datasets = set(), set(), set()
        for rid in shown:
            pts = sorted((c["eps"], c["value"], c["unreliable"], c.get("n"), c.get("grad_mode")) for c in by_run[rid])
            row = rows[rid]
            datasets.add(row.dataset or "?")
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            all_eps.update(xs)
            ns = sorted({p[3] for p in pts if p[3]})
            modes = sorted({_grad(p[4]) for p in pts if p[4]})
            n_txt = "n=?" if not ns else (f"n={ns[0]:,}" if len(ns) == 1 else f"n={ns[0]:,}–{ns[-1]:,}")
            ax.plot(xs, ys, "o-", color=colors[names[rid]],
                    label=f"{names[rid]} ({n_txt}" + (f", {'/'.join(modes)}" if modes else "") + ")")
            bad = [(p[0], p[1]) for p in pts if p[2]]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", markersize=10, mew=2,
                        label="unreliable (flagged)" if "unreliable" not in drawn_paper else None)
                drawn_paper.add("unreliable")
            # the paper's curve only for a comparable model (same architecture and data), once per paper model
            if paper_curves and row.paper_key and row.not_compared is None and row.paper_key not in drawn_paper:
                facts = paper.paper_values(row.paper_key, dataset=paper.paper_dataset(row.dataset) or "cifar10",
                                           metric="robust_acc", attack=attack, norm=norm, variant=False)
                if facts:
                    drawn_paper.add(row.paper_key)
                    fx = sorted((f["eps"], f["value"]) for f in facts)
                    nf = sorted({f.get("n_examples") for f in facts if f.get("n_examples")})
                    info = paper.load_facts()["models"].get(row.paper_key, {})
                    ax.plot(*zip(*fx), "--", color=colors[names[rid]], alpha=0.6, lw=1,
                            label=f"paper: {info.get('label', row.paper_key)}"
                                  + (f" (n={nf[-1]:,})" if nf else ""))
        ticks = sorted(all_eps)
        ax.set_xlim(0, max(ticks) * 1.06 if ticks else 1)
        if norm == "linf" and ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([eps_label(e, "linf") for e in ticks], fontsize=8)
        ax.set_ylim(-2, 100)  # a point at 0 % stays visible
        ax.set_xlabel(f"ε ({NORM_NAMES.get(norm, norm)}" + (", pixel scale /255" if norm == "linf" else "") + ")")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"{ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)} on {', '.join(sorted(datasets))}:"
                     f" robust accuracy vs ε" + left_out, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, f"robust-{attack}-{norm}", paths)

    # accuracy vs severity per corruption, the clean accuracy as a dotted reference line
    if data.corruptions and "corruptions" in only:
        shown, colors, left_out = _figure_models(data, names, corr_by)
        shown_rows = data.rows if not left_out else [rows[rid] for rid in shown]
        points = [c for rid in shown for c in corr_by[rid]]
        by_panel: dict[tuple, list[tuple]] = {}
        for c in points:
            if c["severity"] is not None:
                by_panel.setdefault((c["run_id"], c["corruption"]), []).append((c["severity"], c["value"]))
        cnames = sorted({c["corruption"] for c in points})
        ncol = min(5, len(cnames))
        nrow = math.ceil(len(cnames) / ncol)
        vals = [c["value"] for c in points] + [r.corruption["clean"] for r in shown_rows
                                               if r.corruption.get("clean") is not None]
        lo, hi = min(vals), max(vals)
        pad = max(2.0, 0.08 * (hi - lo))
        legend_rows = max(1, math.ceil(2 * len(shown) / 4))  # a line and a clean line per model, 4 a row
        header = 0.75 + 0.2 * (legend_rows - 1)  # inches for the title and the legend
        height = 2.5 * nrow + header
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.7 * ncol, height), squeeze=False, sharey=True)
        for ax, cn in zip(axes.flat, cnames):
            for rid in shown:
                pts = sorted(by_panel.get((rid, cn), []))
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=names[rid])
                    clean = rows[rid].corruption.get("clean")
                    if clean is not None:
                        ax.axhline(clean, ls=":", lw=1, color=colors[names[rid]],
                                   label=f"{names[rid]}: clean")
            ax.set_title(cn.replace("_", " "), fontsize=9)
            ax.set_xticks([1, 2, 3, 4, 5])
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(cnames):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        n_ex = sorted({r.corruption.get("n_examples") for r in shown_rows if r.corruption.get("n_examples")})
        for i, ax in enumerate(axes.flat):
            if i % ncol == 0:
                ax.set_ylabel("accuracy (%)")
            if i >= len(cnames) - ncol:
                ax.set_xlabel("severity")
        fig.suptitle("Accuracy under each corruption vs severity; dotted: the model's clean accuracy"
                     + (f" (n={n_ex[-1]:,} test images)" if len(n_ex) == 1 else "") + left_out, fontsize=9,
                     y=1 - 0.05 / height, va="top")
        fig.tight_layout(rect=(0, 0, 1, 1 - (header - 0.25) / height))
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, 1 - 0.25 / height), frameon=False)
        _save(fig, out_dir, "corruptions", paths)

    # accuracy vs relaxation steps
    if data.steps and "steps" in only:
        shown, colors, left_out = _figure_models(data, names, steps_by)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        keys = set()
        for rid in shown:
            pts = sorted((s["T"], s["value"]) for s in steps_by[rid])
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=names[rid])
                if rows[rid].paper_key and rows[rid].not_compared is None:  # comparability rule
                    keys.add(rows[rid].paper_key)
        for key in sorted(keys):
            facts = paper.paper_values(key, metric="accuracy_vs_steps")
            if facts and paper_curves:
                ax.plot(*zip(*sorted((f["T"], f["value"]) for f in facts)), "--", color="gray",
                        label=f"paper ({paper.load_facts()['models'][key]['label']}, CIFAR-10)")
        ax.set_xscale("log")
        ts = sorted({s["T"] for rid in shown for s in steps_by[rid]})
        ax.set_xticks(ts)
        ax.set_xticklabels([str(t) for t in ts], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel("relaxation steps T (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("EP convergence: test accuracy vs relaxation steps T ("
                     + ", ".join(sorted({rows[rid].dataset or "?" for rid in shown})) + ")" + left_out)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "steps", paths)

    # unroll-length sweep
    if data.unroll and "unroll" in only:
        unroll_by: dict[str, list[dict]] = {}
        for u in data.unroll:
            unroll_by.setdefault(u["run_id"], []).append(u)
        shown, _, left_out = _figure_models(data, names, unroll_by)
        groups = sorted({(u["run_id"], u["attack"], u["norm"]) for rid in shown for u in unroll_by[rid]})
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
        for ax, (rid, attack, norm) in zip(axes.flat, groups):
            us = [u for u in unroll_by[rid] if (u["attack"], u["norm"]) == (attack, norm)]
            epss = sorted({u["eps"] for u in us})
            cmap = plt.get_cmap("viridis")
            for i, e in enumerate(epss):
                pts = sorted((u["K"], u["value"]) for u in us if u["eps"] == e)
                color = cmap(i / max(1, len(epss) - 1))
                ax.plot(*zip(*pts), "o-", ms=3, color=color, label=f"ε={eps_label(e, norm)}")
                key = rows[rid].paper_key
                facts = paper.paper_values(key, dataset=paper.paper_dataset(rows[rid].dataset) or "cifar10",
                                           attack=attack, norm=norm, eps=e, variant="unroll-sweep") \
                    if key and paper_curves and rows[rid].not_compared is None else []
                if facts:
                    fx = sorted((int(f["grad_mode"].split(":")[1]), f["value"]) for f in facts)
                    ax.plot(*zip(*fx), "--", color=color, alpha=0.5, lw=1, label=f"ε={eps_label(e, norm)} (paper)")
            ax.set_xlabel("attack unroll length K (truncated:K)")
            ax.set_ylabel("robust accuracy (%)")
            ax.set_ylim(0, 100)
            ns = sorted({u.get("n") for u in us if u.get("n")})
            ax.set_title(f"{names[rid]}: {ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)} on "
                         f"{rows[rid].dataset}" + (f", n={ns[-1]:,}" if len(ns) == 1 else ""), fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        if left_out:
            fig.suptitle(left_out.strip(" ()"), fontsize=9)
        fig.tight_layout()
        _save(fig, out_dir, "unroll", paths)

    # adversarial-example grid
    grid = _adversarial_grid(data, names) if "adversarial" in only else None
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


def _eps_of(suffix: str) -> float | None:
    try:
        return float(suffix)
    except ValueError:
        if "/" in suffix:
            try:
                num, den = suffix.split("/")
                return float(num) / float(den)
            except ValueError:
                return None
    return None


def _load_adv_entry(a: dict) -> dict | None:
    """One adversarial-examples artifact: images, predictions per eps, labels, and the test indices (from the
    same attack run's per-example outcomes, whose first entries are these images)."""
    import numpy as np
    got = _load_adv(a["path"])
    if got is None:
        return None
    t, meta = got
    if "x" not in t:
        return None
    n = t["x"].shape[0] if t["x"].ndim == 4 else 1
    classes = _json(meta.get("classes")) or a["meta"].get("classes") or []
    labels = t.get("labels")
    if labels is None:
        lab = _json(meta.get("labels"))
        labels = np.asarray(lab) if isinstance(lab, list) else None
    eps = []
    for k in t:
        if k.startswith("x_adv_"):
            e = _eps_of(k[len("x_adv_"):])
            if e is not None:
                eps.append((e, k, "pred_" + k[len("x_adv_"):]))
    if not eps:
        return None
    eps.sort()
    index = None
    if a.get("per_example"):
        pe = _load_per_example(a["per_example"])
        if pe is not None and len(pe["index"]) >= n:
            index = pe["index"][:n]
    return {"a": a, "t": t, "n": n, "eps": eps, "classes": classes,
            "labels": None if labels is None else np.asarray(labels).reshape(-1)[:n],
            "index": index if index is not None else np.arange(n), "indexed": index is not None}


def choose_image(entries: list[dict]) -> tuple[int | None, list[int | None]]:
    """A test image every shown model classifies correctly when clean (the attack had something to do), by
    test-set index when the artifacts carry it; preferring one whose prediction some attack changed.
    Returns (test index or None, the row of that image in each entry)."""
    import numpy as np
    candidates = None
    for e in entries:
        if e["labels"] is None or "pred_clean" not in e["t"]:
            return None, [None] * len(entries)
        ok = np.asarray(e["t"]["pred_clean"]).reshape(-1)[: e["n"]] == e["labels"]
        good = {int(i) for i, g in zip(e["index"], ok) if g}
        candidates = good if candidates is None else candidates & good
    if not candidates:
        return None, [None] * len(entries)

    def fooled(idx: int) -> int:  # how many models some eps fooled on this image
        total = 0
        for e in entries:
            r = int(np.flatnonzero(e["index"] == idx)[0])
            preds = [np.asarray(e["t"][kp]).reshape(-1)[r] for _, _, kp in e["eps"] if kp in e["t"]]
            total += any(int(p) != int(e["labels"][r]) for p in preds)
        return total

    best = max(sorted(candidates), key=lambda i: (fooled(i), -i))
    return best, [int(np.flatnonzero(e["index"] == best)[0]) for e in entries]


def _draw_strip(ax, tiles: list, ncols: int, gap: int = 4) -> list[float]:
    """Images (H, W[, 3], values in [0, 1]; None = blank) side by side in one image with white gaps, drawn on
    `ax`, `ncols` tiles wide; returns the x centre of each tile (data coordinates)."""
    import numpy as np
    shape = next(tl.shape for tl in tiles if tl is not None)
    h, w = shape[0], shape[1]
    strip = np.ones((h, ncols * (w + gap) - gap, 3), dtype=np.float32)
    for j, tl in enumerate(tiles):
        if tl is not None:
            strip[:, j * (w + gap):j * (w + gap) + w] = tl if tl.ndim == 3 else tl[..., None]
    ax.imshow(strip, interpolation="nearest")
    return [j * (w + gap) + (w - 1) / 2 for j in range(len(tiles))]


def _adversarial_grid(data: ReportData, names: dict[str, str]):
    """Per norm, one row group per model: the chosen clean image and its adversarial versions per eps (prediction
    above, red when it changed), and below the perturbation amplified by a factor written on each panel (one
    factor per eps, shared by the models so their perturbations compare)."""
    import numpy as np
    adv_by: dict[str, list[dict]] = {}
    for a in data.adversarial:
        adv_by.setdefault(a["run_id"], []).append(a)
    # before reading any file: only the shown models' (an image grid holds fewer models than a line chart)
    shown, _, left_out = _figure_models(data, names, adv_by, limit=ADVERSARIAL_MODELS)
    shown_set = set(shown)
    entries = [e for e in (_load_adv_entry(a) for a in data.adversarial if a["run_id"] in shown_set)
               if e is not None]
    if not entries:
        return None
    norms = [n for n in ("linf", "l2") if any(e["a"]["norm"] == n for e in entries)]
    norms += sorted({e["a"]["norm"] for e in entries} - set(norms))
    groups = [(n, [e for e in entries if e["a"]["norm"] == n]) for n in norms]
    ncols = 1 + max(len(e["eps"]) for e in entries)
    nrows = sum(2 * len(g) for _, g in groups)
    plt = _plt()
    height = 1.85 * nrows + 0.6
    # one panel per row: the row's tiles side by side in one image, labels written above each tile (an axes per
    # tile, 2 x 12 per model and norm at 11 eps, took most of a 10k-run report's time)
    fig, axes = plt.subplots(nrows, 1, figsize=(1.7 * ncols, height), squeeze=False)
    axes = axes[:, 0]
    for ax in axes:
        ax.axis("off")
    r0 = 0
    for norm, group in groups:
        idx, pos = choose_image(group)
        nname = NORM_NAMES.get(norm, norm)
        # one amplification per eps, shared across models
        amp = {}
        if idx is not None:
            for e, p in zip(group, pos):
                x = e["t"]["x"][p]
                for ev, kx, _ in e["eps"]:
                    d = float(np.abs(np.asarray(e["t"][kx][p], dtype=np.float32) - x).max())
                    amp[round(ev, 9)] = max(amp.get(round(ev, 9), 0.0), d)
        for gi, (e, p) in enumerate(zip(group, pos)):
            a, t = e["a"], e["t"]
            top, bottom = axes[r0], axes[r0 + 1]
            who = names.get(a["run_id"], a["label"])
            if p is None:
                if gi == 0:
                    top.text(0.0, 0.5, f"{nname}: no test image that every shown model classifies correctly when "
                             f"clean among the {e['n']} stored examples, so none is shown", fontsize=7, va="center",
                             transform=top.transAxes)
                r0 += 2
                continue
            cname = (lambda c: e["classes"][int(c)] if isinstance(e["classes"], list)
                     and 0 <= int(c) < len(e["classes"]) else str(int(c)))
            truth = int(e["labels"][p])
            x = np.asarray(t["x"][p], dtype=np.float32)
            images, perturbations, above, under = [_to_img(x)], [None], [], []
            above.append((f"{who}\n{nname} {ATTACK_NAMES.get(a.get('attack') or '', a.get('attack') or '')}"
                          f"{' · ' + _grad(a.get('grad_mode')) if a.get('grad_mode') else ''}\n"
                          f"clean → {cname(truth)}", 6.5, "black"))
            for ev, kx, kp in e["eps"]:
                xa = np.asarray(t[kx][p], dtype=np.float32)
                pred = cname(np.asarray(t[kp]).reshape(-1)[p]) if kp in t else "?"
                images.append(_to_img(xa))
                above.append((f"ε={eps_label(ev, norm)}\n→ {pred}", 7,
                              "crimson" if pred != cname(truth) else "black"))
                m = amp.get(round(ev, 9)) or 0.0
                k = 0.5 / m if m > 0 else 1.0
                perturbations.append(_to_img(0.5 + (xa - x) * k))
                under.append(f"×{k:.0f}" if m > 0 else "no change")
            centres = _draw_strip(top, images, ncols)
            for cx, (text, size, color) in zip(centres, above):
                top.text(cx, -2, text, ha="center", va="bottom", fontsize=size, color=color)
            _draw_strip(bottom, perturbations, ncols)
            bottom.text(centres[0], x.shape[-1] / 2, "perturbation\n(amplified ×k,\ngrey = 0)", ha="center",
                        va="center", fontsize=7)
            for cx, text in zip(centres[1:], under):
                bottom.text(cx, -2, text, ha="center", va="bottom", fontsize=6.5)
            r0 += 2
    fig.suptitle("Adversarial examples: one test image every shown model classifies correctly when clean, attacked "
                 "at growing ε (red: the prediction changed)" + left_out, fontsize=8.5, y=1 - 0.1 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    return fig


def corruption_samples(grid_png: str | Path, corruptions: list[str], severities: list[int], out_dir: str | Path,
                       label: str | None = None, images: int = 2) -> list[Path]:
    """The corrupt run's sample grid (rows: image x corruption, columns: clean then each severity; 2-pixel
    gaps) redrawn with its labels: one row per corruption for the first `images` test images."""
    import matplotlib.image as mpimg
    import numpy as np
    try:
        grid = mpimg.imread(str(grid_png))
    except (OSError, ValueError, SyntaxError):  # an unreadable grid: no figure, never a failed report
        return []
    if grid.dtype != np.float32 or grid.max() > 1.0:
        grid = grid.astype(np.float32) / 255.0
    pad, cols, rows_total = 2, 1 + len(severities), None
    per_image = len(corruptions)
    h = None
    for k in range(1, 65):  # the number of images k: rows = k * corruptions
        rows_total = k * per_image
        hh = (grid.shape[0] - pad) / rows_total - pad
        if hh == int(hh) and hh > 0 and (grid.shape[1] - pad) / cols - pad == hh:
            h = int(hh)
            break
    if h is None or not corruptions:
        return []
    k_images = rows_total // per_image
    shown = min(images, k_images)
    plt = _plt()
    # one panel per image (its rows of the grid, whose 2-pixel white gaps already frame the tiles), labelled by
    # ticks: a panel per tile drew shown x corruptions x columns axes (228 for 19 corruptions), seconds each report
    fig, axes = plt.subplots(shown, 1, figsize=(1.15 * cols + 1.4, 1.15 * shown * per_image + 0.5), squeeze=False)
    centre = [pad + k * (h + pad) + (h - 1) / 2 for k in range(max(cols, per_image))]
    for i in range(shown):
        ax = axes[i][0]
        y0 = i * per_image * (h + pad)
        tile = grid[y0:y0 + per_image * (h + pad) + pad, :, :3]
        ax.imshow(np.round(tile * 255).astype(np.uint8), interpolation="nearest")  # 8-bit: no float rescaling
        ax.xaxis.tick_top()
        ax.set_xticks(centre[:cols])
        ax.set_xticklabels(["clean"] + [f"severity {sv}" for sv in severities], fontsize=7)
        ax.set_yticks(centre[:per_image])
        ax.set_yticklabels([f"image {i + 1}\n{name.replace('_', ' ')}" for name in corruptions], fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle("Corruption samples" + (f" ({label})" if label else "") + ": the seeded images the model was "
                 "scored on", fontsize=8.5)
    fig.tight_layout()
    paths: list[Path] = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(fig, out, "corruption-samples", paths)
    return [p for p in paths if p.suffix == ".png"] + [p for p in paths if p.suffix != ".png"]


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
    elif cell.not_compared:
        title = title or f' title="not compared with the paper: {_h(cell.not_compared)}"'
    return f'<td class="{cls}"{title}>{cell.value:.2f}{flag}<span class="sub">{_h(_sub(cell, " · "))}</span>{paper_line}</td>'


def _html_leaderboard(data: ReportData, cols: list[Column], id_: str) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in ["model", "run", "data", "clean"] + [c.label for c in cols]
                   + ["CIFAR-C", "mCE (unnorm.)", "rel. mCE"])
    body = []
    for row in data.rows:
        status = "" if row.status == "finished" else f' <span class="status">{_h(row.status)}</span>'
        corr = row.corruption
        cc = f'<td class="num">{_h(_corr_text(corr))}</td>' + "".join(
            f'<td class="num">{_fmt(corr.get(k))}</td>' for k in ("mce", "relative_mce"))
        notes = "".join(f'<span class="sub">{_h(n)}</span>' for n in model_notes(row))
        body.append(f"<tr><td>{_h(row.name or row.label)}{status}{notes}</td>"
                    f"<td><code>{_h(_short(row.run_id))}</code></td>"
                    f"<td>{_h(row.dataset)}</td><td class=\"num\">{_fmt(row.clean_acc)}"
                    + (f'<span class="sub">{_h(clean_note(row))}</span>' if row.clean_acc is not None else "")
                    + "</td>"
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
    "robust": "Robust accuracy vs ε (linear axis; L∞ ticks at the measured k/255), one line per model with its n "
              "and gradient mode; dashed: the paper's curve, only for a model comparable with the paper's; red ×: "
              "result flagged unreliable.",
    "corruptions": "Accuracy vs corruption severity (latest corrupt run per model); dotted: the model's clean "
                   "accuracy on the same images. The y axis is fitted to the data.",
    "steps": "Accuracy vs number of relaxation steps T (EP convergence, 'characteristic time'); dashed: paper "
             "(comparable models only).",
    "unroll": "Robust accuracy vs the unroll length K of the attack gradient (truncated:K): a plateau for large "
              "K means the truncation does not mask the gradient.",
    "corruption-samples": "Test images under each evaluated corruption (rows), clean then severities (columns); "
                          "seeded: the exact images the model was scored on.",
    "adversarial-examples": "Per norm, one test image every shown model classifies correctly when clean, attacked at "
                            "growing ε: adversarial image with the predicted class (red: changed) and the "
                            "perturbation amplified by the factor written above it.",
}


def html_report(data: ReportData, figures: Iterable[str | Path] | None = None) -> str:
    """One self-contained HTML page: tables, the paper comparison, figures inlined (SVG, or base64 PNG)."""
    figs = [Path(f) for f in (figures or [])]
    chosen: dict[str, Path] = {}
    for f in figs:  # prefer SVG for line charts, PNG for the image grid (smaller, crisp enough)
        want_svg = f.stem not in ("adversarial-examples", "corruption-samples")  # image grids: PNG
        cur = chosen.get(f.stem)
        if cur is None or (f.suffix == ".svg") == want_svg:
            chosen[f.stem] = f
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>epcli report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>epcli report: how robust are EP-trained energy-based models?</h1>",
             f'<p class="muted">Store <code>{_h(data.store_root)}</code> · generated {_h(data.generated_at)} · '
             f'{len(data.rows)} model(s) · accuracies in %. Each cell is the result on the most images (n), then '
             f'the exact worst case over the other results on those same images; below the value: example count '
             f'and gradient mode. The clean column is the training run\'s accuracy on its whole test split (its '
             f'own n, not the attacked images\'). A paper number stands beside a result only when model, dataset, '
             f'threat model, n and gradient mode are comparable.</p>']
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
            f"<li>{_h(r.name or r.label)} · {_h(c.label)}: {_h(cell.reason)} (run <code>{_h(_short(cell.run_id))}"
            f"</code>)</li>" for r, c, cell in flagged) + "</ul>")
    if data.comparisons:
        rows = []
        for c in data.comparisons:
            if c.not_compared is not None:
                continue
            p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
            cls = "pos" if c.diff >= 0 else "neg"
            rows.append(f"<tr><td>{_h(c.label)}</td><td>{_h(c.what)}</td><td class=\"num\">{c.epcli:.2f}</td>"
                        f"<td class=\"num\">{p}</td><td class=\"num {cls}\">{c.diff:+.2f}</td>"
                        f"<td>{_h('; '.join(c.reasons) or '—')}</td><td>{_h(c.section)}</td></tr>")
        parts.append(f"<h2>The paper beside the results</h2><p class=\"muted\">{_h(_PAPER_NOTE)}</p>")
        if rows:
            parts.append("<table id=\"paper\"><thead><tr><th>model</th><th>metric</th><th>epcli</th><th>paper</th>"
                         "<th>diff</th><th>protocol differences</th><th>paper §</th></tr></thead><tbody>"
                         + "".join(rows) + "</tbody></table>")
        lines = _not_compared_lines(data)
        if lines:
            parts.append('<ul id="not-compared">' + "".join(f"<li>{_h(x)}</li>" for x in lines) + "</ul>")
    corr_rows = [r for r in data.rows if r.corruption]
    if corr_rows:
        parts.append("<h2>Natural corruptions (CIFAR-10-C)</h2><table id=\"corruptions\"><thead><tr><th>model</th>"
                     "<th>clean (corrupt run)</th><th>benchmark mean</th><th>taken over</th><th>mean, all 19</th>"
                     "<th>mCE (unnormalized)</th><th>relative mCE</th><th>run</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{_h(r.name or r.label)}</td>" + "".join(
                             f'<td class="num">{_fmt(r.corruption.get(k))}</td>' for k in ("clean", "mean"))
                         + f"<td>{_h(r.corruption.get('mean_label', '—'))}</td>" + "".join(
                             f'<td class="num">{_fmt(r.corruption.get(k))}</td>'
                             for k in ("mean_all", "mce", "relative_mce"))
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


__all__ = ["Cell", "Column", "Comparison", "ReportData", "Row", "FORMATS", "cell_not_comparable", "choose_image",
           "collect", "corruption_coverage", "corruption_mean_label", "corruption_samples", "eps_label", "figures",
           "html_report", "leaderboard_table", "lineage_tree", "model_not_comparable", "model_notes",
           "protocol_reasons", "render", "robustbench_files", "robustbench_id", "robustbench_json", "to_dict",
           "training_curves", "training_diff", "training_history", "write_robustbench"]
