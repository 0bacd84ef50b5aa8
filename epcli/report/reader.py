"""collect(): every number a report shows, read from the store in a handful of queries into a ReportData.

A leaderboard cell (model x attack x norm x eps) is the result on the largest n, then the exact per-image worst
case over the other results on the same images (_cell, from the attack runs' per-example outcomes). The worst
case over attacks, the clean accuracy, the corruption summaries, the steps and unroll sweeps and the
adversarial examples to draw are gathered here too. Reads only: no torch, no models."""

from __future__ import annotations

import functools
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from epcli import paper
from epcli.errors import NotFoundError
from epcli.report.comparison import _compare, model_not_comparable
from epcli.report.coverage import _corruption_means
from epcli.report.datamodel import (
    ACC_METRICS,
    ATTACK_NAMES,
    ATTACK_ORDER,
    ENSEMBLES,
    HEADLINE_ATTACKS,
    NORM_NAMES,
    STANDARD_EPS,
    Cell,
    Column,
    ReportData,
    Row,
    _json,
    _label,
    _short,
    eps_label,
    result_grad_mode,
    wilson95,
)


def _epochs(cfg: dict) -> int | None:
    for d in (cfg, cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else {}):
        if isinstance(d, dict) and isinstance(d.get("epochs"), (int, float)):
            return int(d["epochs"])
    return None


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


def _is_sweep(m: dict, run_info: dict) -> bool:
    """An unroll-sweep result: another gradient mode than its run's main one (the run stored per-example outcomes
    for its main mode only; the unroll figure shows the sweep and its own check judges it)."""
    cfg = run_info.get(m["run_id"], {}).get("config", {})
    return (m["grad_mode"] or None) != (cfg.get("grad_mode") or m["grad_mode"] or None)


def _outcome(m: dict, eps: float, run_info: dict, per_example: dict, loaded: dict):
    """A result's per-example outcomes at eps: (test indices, robust flags), or None."""
    if _is_sweep(m, run_info):
        return None
    if m["run_id"] not in loaded:
        loaded[m["run_id"]] = _load_per_example(per_example.get(m["run_id"]))
    pe = loaded[m["run_id"]]
    if pe is None:
        return None
    v = pe["robust"].get(_eps_key(eps))
    return None if v is None else (pe["index"], v)


def _worst_on_common(ms: list[dict], eps: float, run_info: dict, per_example: dict, loaded: dict,
                     failed_checks: dict) -> "Cell | None":
    """The worst case over attacks run on different but nested image sets (seeded subsets are the first n of one
    order: PGD on 2,000 images, Square on 500 of them, AutoAttack on 100): exact per image on the images of one
    result (the anchor) that every joined result also attacked, with the same classifier (relaxation steps T).
    Chosen: the most attacks, then the most images. None when no two attacks share an anchor's images."""
    import numpy as np
    outs = []
    for m in ms:
        o = _outcome(m, eps, run_info, per_example, loaded)
        if o is not None:
            outs.append((m, _detail(m["detail"]).get("T") if m["detail"] else None,
                         dict(zip(o[0].tolist(), o[1].tolist()))))
    best = None
    for anchor, T, images in outs:
        joined = [(m, flags) for m, t, flags in outs if t == T and all(i in flags for i in images)]
        attacks = {m["attack"] for m, _ in joined}
        key = (len(attacks), len(images), -anchor["value"])
        if len(attacks) >= 2 and (best is None or key > best[0]):
            best = (key, anchor, joined, sorted(images))
    if best is None:
        return None
    _, anchor, joined, idx = best
    robust = np.ones(len(idx), dtype=bool)
    for _, flags in joined:
        robust &= np.array([bool(flags[i]) for i in idx])
    value = float(robust.mean()) * 100.0
    flagged = [m for m, _ in joined if m["unreliable"]]
    reason = None
    if flagged:
        m = flagged[0]
        reason = (_detail(m["detail"]).get("reason") if m["detail"] else None) or \
            "; ".join(failed_checks.get(m["run_id"], [])) or "marked unreliable"
    modes = list(dict.fromkeys(g for g in (result_grad_mode(m["attack"], m["grad_mode"]) for m, _ in joined) if g))
    return Cell(value=value, n_examples=len(idx), grad_mode="+".join(modes) or None, unreliable=bool(flagged),
                reason=reason, run_id=anchor["run_id"], status=anchor["run_status"], n_results=len(joined),
                worst_of=[f"{m['run_id']} {m['attack']} {result_grad_mode(m['attack'], m['grad_mode']) or '-'}"
                          for m, _ in joined],
                ci95=wilson95(value, len(idx)))


def _cell(ms: list[dict], k: float, eps: float, run_info: dict, per_example: dict, loaded: dict,
          failed_checks: dict, attack_clean_by_run: dict) -> "Cell":
    """One leaderboard cell from every result for it: the largest n (ties: the strongest result), then the
    exact per-image worst case over the other results on the same images (per-example outcomes)."""
    import numpy as np
    base = max(ms, key=lambda m: (m["n_examples"] or 0, -m["value"]))

    def outcome(m: dict):
        return _outcome(m, eps, run_info, per_example, loaded)

    members, value = [base], base["value"] * k
    b = outcome(base) if len(ms) > 1 else None
    base_T = _detail(base["detail"]).get("T") if base["detail"] else None
    left_out = []  # (result, why): results for this cell that its value is not exact over
    if b is not None:
        robust = b[1].copy()
    for m in ms:
        if m is base:
            continue
        if _is_sweep(m, run_info):
            continue
        o = outcome(m) if b is not None else None
        m_T = _detail(m["detail"]).get("T") if m["detail"] else None
        # the same images and the same classifier: an EP-CNN relaxed for other steps T predicts otherwise
        if o is not None and len(o[0]) == len(b[0]) and np.array_equal(o[0], b[0]) and m_T == base_T:
            robust &= o[1]
            members.append(m)
        else:
            left_out.append((m, "other relaxation steps T" if m_T != base_T else
                             "no per-image outcomes" if o is None or b is None else "other images"))
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
        g = result_grad_mode(m["attack"], m["grad_mode"])
        if g and g not in modes:
            modes.append(g)
    return Cell(value=value, n_examples=base["n_examples"], grad_mode="+".join(modes) or None,
                unreliable=bool(flagged), reason=reason, run_id=base["run_id"], status=base["run_status"],
                n_results=len(members), forward_passes=first.get("forward_passes"),
                forward_passes_T=first.get("T"),
                worst_of=[f"{m['run_id']} {m['attack']} {result_grad_mode(m['attack'], m['grad_mode']) or '-'}"
                          for m in members]
                if len(members) > 1 else [],
                attack_clean=attack_clean_by_run.get(base["run_id"]),
                from_clean_errors=(first["from_clean_errors"] * k if len(members) == 1 and
                                   isinstance(first.get("from_clean_errors"), (int, float)) else None),
                labels=(run_info.get(base["run_id"], {}).get("config", {}).get("labels") or "true"
                        if len(members) == 1 else None),
                members=_members(run_info.get(base["run_id"], {}), eps) if len(members) == 1 else None,
                ci95=wilson95(value, base["n_examples"]),
                left_out=[{"run_id": m["run_id"], "attack": m["attack"],
                           "grad_mode": result_grad_mode(m["attack"], m["grad_mode"]), "n_examples": m["n_examples"],
                           "value": m["value"] * k, "why": why}
                          for m, why in sorted(left_out, key=lambda mw: (mw[0]["value"], mw[0]["run_id"]))])


def _members(run: dict, eps: float) -> list[list] | None:
    """An ensemble run's robust accuracy (percent) after each member at eps, from the run's summary (which keys
    it by eps label: matched by value, as labels are written by the attack pipeline's own rule)."""
    if run.get("config", {}).get("attack") not in ENSEMBLES:
        return None
    summary = _json(run.get("summary"))
    best = None  # the nearest label: %g keeps six significant digits, so a label is within 5e-6 (relative)
    for label, accs in ((summary or {}).get("members") or {}).items() if isinstance(summary, dict) else ():
        num, _, den = str(label).partition("/")
        try:
            value = float(num) / float(den or 1)
        except (ValueError, ZeroDivisionError):
            continue
        off = abs(value - eps)
        if math.isclose(value, eps, rel_tol=1e-5) and isinstance(accs, dict) and (best is None or off < best[0]):
            best = (off, accs)
    if best is None:
        return None
    return [[name, 100.0 * acc] for name, acc in best[1].items() if isinstance(acc, (int, float))]


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
        if len({w.split()[1] for w in cell.worst_of}) < 2:  # no two attacks on the very same images
            cell = _worst_on_common(ms, eps, run_info, per_example, loaded, failed_checks)
            if cell is None:
                continue  # nor on images one attack's set shares with another's: nothing exact to show
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
                           "grad_mode": result_grad_mode(cfg.get("attack"), cfg.get("grad_mode")), "n_eps": len(eps),
                           "n": cfg.get("n_examples"),
                           "meta": _json(a["meta"]) or {}, "config": cfg})
    adversarial = _pick_adversarial(candidates)
    adversarial.sort(key=lambda a: (0 if a["norm"] == "linf" else 1, a["run_id"]))

    row_list = list(rows.values())
    for row in row_list:
        row.clean_ci95 = wilson95(row.clean_acc, row.clean_n)
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
