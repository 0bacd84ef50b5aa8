"""The one JSON schema of every `--json` output, and the functions that shape results into it (CLI side).

Conventions (docs/cli.md, "JSON output"): every document is an object with `"command"`; a run is named by
`run_id` everywhere; accuracies are fractions in [0, 1] rounded to the resolution their example count
supports (4 decimals up to 10,000 examples); every eps is given twice, `eps` (a number, 7 significant
digits) and `eps_label` (`8/255` when it is a multiple of 1/255, else the number as typed); float32 noise is
rounded away. `SCHEMAS` holds a JSON Schema (draft 2020-12) per command; tests validate every command's
output against it and docs/cli.md prints it (scripts/cli_reference.py).
"""

from __future__ import annotations

import math
from typing import Any

# --- rounding ---------------------------------------------------------------------------------------------


def acc(value: float | None, n: int | None = None) -> float | None:
    """An accuracy fraction rounded to what n examples can resolve (1/n), at least 4 decimals."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None  # also what a hand-written summary may hold instead of a number ("n/a")
    places = max(4, math.ceil(math.log10(n))) if n and n > 1 else 4
    return round(float(value), places)


def sig(value: float | None, digits: int = 6) -> float | None:
    """A float to `digits` significant digits (losses, learning rates, p-values, eps)."""
    if value is None:
        return None
    v = float(value)
    if v == 0 or not math.isfinite(v):
        return v if math.isfinite(v) else None
    return round(v, digits - 1 - math.floor(math.log10(abs(v))))


def eps_pair(eps: float) -> dict:
    from epcli.pipelines.common import eps_label
    return {"eps": sig(eps, 7), "eps_label": eps_label(float(eps))}


def duration(run: dict) -> float | None:
    from datetime import datetime
    try:
        a = datetime.fromisoformat(run["started_at"])
        b = datetime.fromisoformat(run["ended_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return round((b - a).total_seconds(), 2)


def clean_value(v: Any) -> Any:
    """Recursively round float noise out of free-form values (configs, summaries, params)."""
    if isinstance(v, float):
        return sig(v, 7)
    if isinstance(v, dict):
        return {str(k): clean_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean_value(x) for x in v]
    return v


# --- shaping each command's result --------------------------------------------------------------------------

def train(res: dict, history: list[dict] | None = None) -> dict:
    out = {"command": "train", "run_id": res["run_id"], "model": res["model"], "dataset": res["dataset"],
           "label": res.get("label"), "epochs": res.get("epochs"), "checkpoint": res.get("checkpoint"),
           "test_acc": acc(res.get("test_acc")), "history": []}
    for h in history or []:
        out["history"].append({"epoch": int(h["epoch"]), **{k: (acc(h[k]) if k.endswith(("_acc", "_agreement"))
                                                                else sig(h[k]))
                                                            for k in ("train_loss", "train_acc", "test_acc", "lr",
                                                                      "seconds", "mean_steps", "teacher_residual",
                                                                      "teacher_agreement") if k in h}})
    if res.get("world_size"):
        out["world_size"] = res["world_size"]
    if res.get("teacher"):  # a distilled student: the EP-CNN it learnt from
        t = res["teacher"]
        out["teacher"] = {"run_id": t.get("run_id"), "path": t.get("path"), "label": t.get("label")}
    return out


def attack(res: dict) -> dict:
    n = res["n_examples"]
    eps_values = res.get("eps") or []
    by_label = res.get("robust_acc") or {}
    from epcli.pipelines.common import eps_label
    errors = res.get("robust_from_clean_errors") or {}
    results = [{**eps_pair(e), "robust_acc": acc(by_label.get(eps_label(e)), n),
                "from_clean_errors": acc(errors.get(eps_label(e)), n) if errors else None} for e in eps_values]
    sweep = [{"grad_mode": gm, **eps_pair(e), "robust_acc": acc(accs.get(eps_label(e)), n)}
             for gm, accs in (res.get("unroll_sweep") or {}).items() for e in eps_values]
    return {"command": "attack", "run_id": res["run_id"], "model": res["model"],
            "model_run_id": res.get("model_run_id"), "dataset": res.get("dataset"), "split": "test",
            "attack": res["attack"], "norm": res["norm"],
            "grad_mode": res["grad_mode"], "labels": res.get("labels"), "params": clean_value(res.get("params") or {}),
            "n_examples": n, "clean_acc": acc(res["clean_acc"], n), "results": results, "unroll_sweep": sweep,
            "forward_passes": res.get("forward_passes"), "attack_forward_passes": res.get("attack_forward_passes"),
            "unreliable": bool(res["unreliable"]), "reason": res.get("reason") or "",
            "checks": [{"check": c["check"], "passed": bool(c["passed"]), "detail": c.get("detail", "")}
                       for c in res.get("checks") or []],
            "notes": list(res.get("notes") or []), "seconds": sig(res.get("seconds"), 4),
            "protocol": res.get("protocol", "epcli"), "select": res.get("select", "random"),
            "targeted": bool(res.get("targeted")), "T": res.get("T"),
            "target_hit": [{**eps_pair(e), "hit": acc((res.get("target_hit") or {}).get(eps_label(e)), n)}
                           for e in eps_values if res.get("target_hit")],
            "members": [{**eps_pair(e), "member": name, "robust_acc": acc(v, n)} for e in eps_values
                        for name, v in (res.get("members") or {}).get(eps_label(e), {}).items()]}


def corrupt(res: dict) -> dict:
    n = res["n_examples"]
    cells = []
    for key, v in (res.get("cells") or {}).items():
        name, sev = key.rsplit("/", 1)
        cells.append({"corruption": name, "severity": int(sev), "acc": acc(v, n)})
    return {"command": "corrupt", "run_id": res["run_id"], "model": res["model"],
            "model_run_id": res.get("model_run_id"), "dataset": res.get("dataset"), "split": "test", "n_examples": n,
            "clean_acc": acc(res.get("clean_acc"), n),
            "corruption_mean_acc": acc(res.get("corruption_mean_acc"), n),
            "corruption_mean_over": res.get("corruption_mean_over"),
            "corruption_mean_acc_all": acc(res.get("corruption_mean_acc_all"), n),
            "mce_unnormalized": acc(res.get("mce_unnormalized"), n),
            "relative_mce": sig(res.get("relative_mce"), 4), "mce_vs_reference": sig(res.get("mce_vs_reference"), 4),
            "source": res.get("source"), "clean_from": res.get("clean_from"), "cells": cells}


def corrupt_export(res: dict) -> dict:
    return {"command": "corrupt-export", "run_id": None, "directory": res["directory"],
            "corruptions": list(res["corruptions"]), "n_examples": res["n_examples"], "seed": res["seed"]}


def report(res: dict) -> dict:
    """The leaderboard as fractions (the report's own percent tables are for people)."""
    data = res["data"]
    scale = 100.0  # ReportData cells and clean accuracies are percent
    rows = []
    for row in data.rows:
        cells = []
        for key, c in row.cells.items():
            col = next((x for x in data.columns if x.key == key), None)
            cells.append({"attack": col.attack if col else key.split(":")[0], "norm": col.norm if col else None,
                          **(eps_pair(col.eps) if col else {"eps": None, "eps_label": key.rsplit(":", 1)[-1]}),
                          "robust_acc": acc(None if c.value is None else c.value / scale, c.n_examples),
                          "n_examples": c.n_examples, "grad_mode": c.grad_mode, "unreliable": bool(c.unreliable),
                          "attack_run_id": c.run_id, "forward_passes": c.forward_passes,
                          "paper_robust_acc": acc(None if c.paper is None else c.paper / scale),
                          "paper_not_compared": getattr(c, "not_compared", None),  # why no paper number
                          "worst_of": list(getattr(c, "worst_of", []) or []),
                          # one result: the labels it attacked away from, and with predicted labels the part of
                          # robust_acc that is clean errors moved onto their true label
                          "labels": c.labels, "from_clean_errors": acc(None if c.from_clean_errors is None
                                                                       else c.from_clean_errors / scale, c.n_examples),
                          "ci95": _ci(c.ci95, scale, c.n_examples),  # Wilson 95 % over its n images
                          # results for this cell its value is not exact over (other images or T), lowest first
                          "left_out": [{"attack_run_id": r["run_id"], "attack": r["attack"],
                                        "grad_mode": r["grad_mode"], "n_examples": r["n_examples"],
                                        "robust_acc": acc(r["value"] / scale, r["n_examples"]), "why": r["why"]}
                                       for r in getattr(c, "left_out", []) or []],
                          # AutoAttack, one result: robust accuracy after each member in turn
                          "members": [{"member": m, "robust_acc": acc(v / scale, c.n_examples)}
                                      for m, v in c.members or []]})
        corr = row.corruption or {}
        rows.append({"run_id": row.run_id, "model": row.model, "label": row.label, "dataset": row.dataset,
                     "status": row.status, "epochs": row.epochs,
                     "clean_acc": acc(None if row.clean_acc is None else row.clean_acc / scale,
                                      getattr(row, "clean_n", None)),
                     # what clean_acc was measured on: the training run's whole test split (its own n, not the
                     # attacked images') or, without a test evaluation, an attack's images
                     "clean_n_examples": getattr(row, "clean_n", None),
                     "clean_from": getattr(row, "clean_from", "test split"),
                     "clean_ci95": _ci(getattr(row, "clean_ci95", None), scale, getattr(row, "clean_n", None)),
                     "unreliable": bool(row.unreliable), "results": cells,
                     "name": getattr(row, "name", None) or row.label,
                     "paper_not_compared": getattr(row, "not_compared", None),
                     "corruption_mean_acc": acc(None if corr.get("mean") is None else corr["mean"] / scale),
                     "corruption_mean_over": corr.get("mean_label"),  # e.g. "mean of 5/15 ... x 5 severities"
                     "corruption_mean_acc_all": acc(None if corr.get("mean_all") is None
                                                    else corr["mean_all"] / scale)})
    return {"command": "report", "run_id": res.get("run_id"), "files": [str(f) for f in res.get("files") or []],
            "generated_at": data.generated_at, "rows": rows, "notes": list(data.notes)}


def _ci(interval: list[float] | None, scale: float, n: int | None) -> list[float] | None:
    return None if not interval else [acc(v / scale, n) for v in interval]


def run_row(run: dict) -> dict:
    return {"run_id": run["id"], "kind": run["kind"], "status": run["status"], "model": run.get("model"),
            "dataset": run.get("dataset"), "model_run_id": run.get("model_run_id"),
            "started_at": run.get("started_at"), "ended_at": run.get("ended_at"), "duration_s": duration(run),
            "tags": list(run.get("tags") or []), "note": run.get("note"), "result": run_result(run)}


def run_result(run: dict) -> dict:
    """The result that matters for a run's kind, from its stored summary, in this schema's conventions."""
    from epcli.pipelines.common import eps_label
    s = run.get("summary") if isinstance(run.get("summary"), dict) else {}
    cfg = run.get("config") if isinstance(run.get("config"), dict) else {}
    if not s:
        return {}
    if run["kind"] == "train":
        return {"test_acc": acc(s.get("test_acc")), "epochs": s.get("epochs")}
    if run["kind"] == "attack":
        n = cfg.get("n_examples")
        by_label = s.get("robust_acc") or {}
        errors = s.get("robust_from_clean_errors") or {}  # predicted labels: the part that is clean errors
        if not isinstance(by_label, dict):  # not the attack pipeline's eps -> accuracy map: one number, one eps
            by_label = {eps_label(cfg["eps"][0]): by_label} if len(cfg.get("eps") or []) == 1 else {}
        errors = errors if isinstance(errors, dict) else {}
        eps_values = cfg.get("eps") or []
        return {"attack": cfg.get("attack"), "norm": cfg.get("norm"), "clean_acc": acc(s.get("clean_acc"), n),
                "labels": cfg.get("labels") or "true",
                "results": [{**eps_pair(e), "robust_acc": acc(by_label.get(eps_label(e)), n),
                             **({"from_clean_errors": acc(errors.get(eps_label(e)), n)} if errors else {})}
                            for e in eps_values if eps_label(e) in by_label],
                "unreliable": bool(s.get("unreliable")),
                # an ensemble (autoattack, art-autoattack): robust accuracy after each member, as `attack` printed
                **({"members": [{**eps_pair(e), "member": name, "robust_acc": acc(v, n)} for e in eps_values
                                for name, v in (s.get("members") or {}).get(eps_label(e), {}).items()]}
                   if s.get("members") else {})}
    if run["kind"] == "corrupt":
        return {k: acc(s.get(k)) for k in ("clean_acc", "corruption_mean_acc", "corruption_mean_acc_all",
                                           "mce_unnormalized") if s.get(k) is not None}
    return clean_value(s)


def runs(rows: list[dict]) -> dict:
    return {"command": "runs", "runs": [run_row(r) for r in rows]}


def metric_row(m: dict) -> dict:
    name = m["name"]
    is_acc = name.endswith("_acc") or name in ("mce_unnormalized",)
    out = {"name": name, "value": acc(m["value"], m.get("n_examples")) if is_acc else sig(m["value"]),
           "step": m.get("step")}
    for k in ("attack", "norm", "grad_mode", "corruption", "severity", "n_examples"):
        if m.get(k) is not None:
            out[k] = m[k]
    if m.get("eps") is not None and m.get("attack") and name != "clean_acc":
        out.update(eps_pair(m["eps"]))
    out["unreliable"] = bool(m.get("unreliable"))
    return out


def show(run: dict, metrics: list[dict], checks: list[dict], artifacts: list[dict]) -> dict:
    return {"command": "show", "run": {**run_row(run), "argv": run.get("argv"),
                                       "config": clean_value(run.get("config")),
                                       "error": run.get("error"), "seed": run.get("seed"), "device": run.get("device"),
                                       "host": run.get("host"), "git_commit": run.get("git_commit"),
                                       "epcli_version": run.get("epcli_version"),
                                       "torch_version": run.get("torch_version"),
                                       "cuda_version": run.get("cuda_version")},
            "metrics": [metric_row(m) for m in metrics],
            "checks": [{"check": c["name"], "passed": bool(c["passed"]), "detail": c.get("detail") or ""}
                       for c in checks],
            "artifacts": [{"sha256": a["sha256"], "role": a["role"], "name": a.get("name"), "kind": a["kind"],
                           "size": a["size"], "path": a["path"]} for a in artifacts]}


def compare_attacks(res: dict) -> dict:
    side = lambda s: {"run_id": res[f"run_{s}"], "model": res[f"model_{s}"], "attack": res[f"attack_{s}"],  # noqa: E731
                      "norm": res[f"norm_{s}"], "grad_mode": res.get(f"grad_mode_{s}"),
                      "labels": res.get(f"labels_{s}") or "true"}
    rows = [{**eps_pair(r["eps"]), "n": r["n"], "robust_acc_a": acc(r["acc_a"], r["n"]),
             "robust_acc_b": acc(r["acc_b"], r["n"]), "both": r["both"], "only_a": r["only_a"],
             "only_b": r["only_b"], "mcnemar_p": sig(r["mcnemar_p"], 4)} for r in res["rows"]]
    return {"command": "compare", "kind": "attack", "dataset": res.get("dataset"), "split": "test",
            "a": side("a"), "b": side("b"), "rows": rows}


def compare_training(res: dict) -> dict:
    return {"command": "compare", "kind": "train", "a": res["a"], "b": res["b"],
            "config_diff": [{"key": d["key"], "a": clean_value(d["a"]), "b": clean_value(d["b"])}
                            for d in res["config_diff"]],
            "metrics": [{"name": m["name"], "a": _mval(m["name"], m["a"]), "b": _mval(m["name"], m["b"]),
                         "diff": _mval(m["name"], m["diff"])} for m in res["metrics"]]}


def _mval(name: str, v):
    return acc(v) if name.endswith("_acc") else sig(v)


# --- the schema ---------------------------------------------------------------------------------------------

_S = {"type": "string"}
_SN = {"type": ["string", "null"]}
_I = {"type": "integer"}
_IN = {"type": ["integer", "null"]}
_N = {"type": "number"}
_NN = {"type": ["number", "null"]}
_B = {"type": "boolean"}
_ACC = {"type": "number", "minimum": 0, "maximum": 1}
_ACCN = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_CIN = {"anyOf": [{"type": "array", "items": _ACC, "minItems": 2, "maxItems": 2}, {"type": "null"}]}
_RUN_ID = {"type": "string", "pattern": "^[0-9a-z]{16}$"}
_RUN_IDN = {"anyOf": [_RUN_ID, {"type": "null"}]}
_EPS = {"eps": {"type": "number", "minimum": 0}, "eps_label": _S}


def _obj(props: dict, required: list[str] | None = None, extra: bool = False) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


def _cmd(name: str, props: dict, optional: tuple = ()) -> dict:
    props = {"command": {"const": name}, **props}
    return _obj(props, [k for k in props if k not in optional])


_CHECK = _obj({"check": _S, "passed": _B, "detail": _S})
_RUN = _obj({"run_id": _RUN_ID, "kind": {"enum": ["train", "attack", "corrupt", "report"]},
             "status": {"enum": ["running", "finished", "failed", "interrupted"]}, "model": _SN, "dataset": _SN,
             "model_run_id": _RUN_IDN, "started_at": _S, "ended_at": _SN, "duration_s": _NN,
             "tags": {"type": "array", "items": _S}, "note": _SN, "result": {"type": "object"}})

SCHEMAS: dict[str, dict] = {
    "train": _cmd("train", {
        "run_id": _RUN_ID, "model": _S, "dataset": _S, "label": _SN, "epochs": _I, "checkpoint": _S,
        "test_acc": _ACCN, "world_size": _I,
        "history": {"type": "array", "items": _obj({
            "epoch": _I, "train_loss": _N, "train_acc": _ACC, "test_acc": _ACC, "lr": _N, "seconds": _N,
            "mean_steps": _N, "teacher_residual": _N, "teacher_agreement": _ACC},
            ["epoch", "train_loss", "train_acc", "test_acc"])},
        "teacher": _obj({"run_id": _RUN_IDN, "path": _SN, "label": _SN})}, optional=("world_size", "teacher")),
    "attack": _cmd("attack", {
        "run_id": _RUN_ID, "model": _S, "model_run_id": _RUN_IDN, "dataset": _S, "split": {"const": "test"},
        "attack": _S, "norm": {"enum": ["linf", "l2"]},
        "grad_mode": _S, "labels": {"enum": ["true", "predicted"]}, "params": {"type": "object"},
        "n_examples": _I, "clean_acc": _ACC,
        "results": {"type": "array", "items": _obj({**_EPS, "robust_acc": _ACC, "from_clean_errors": _ACCN})},
        "unroll_sweep": {"type": "array", "items": _obj({"grad_mode": _S, **_EPS, "robust_acc": _ACC})},
        "forward_passes": _IN, "attack_forward_passes": _IN, "unreliable": _B, "reason": _S,
        "checks": {"type": "array", "items": _CHECK}, "notes": {"type": "array", "items": _S}, "seconds": _NN,
        "protocol": {"enum": ["epcli", "paper"]}, "select": {"enum": ["random", "first"]}, "targeted": _B,
        "T": _IN, "target_hit": {"type": "array", "items": _obj({**_EPS, "hit": _ACC})},
        "members": {"type": "array", "items": _obj({**_EPS, "member": _S, "robust_acc": _ACC})}}),
    "corrupt": _cmd("corrupt", {
        "run_id": _RUN_ID, "model": _S, "model_run_id": _RUN_IDN, "dataset": _S, "split": {"const": "test"},
        "n_examples": _I, "clean_acc": _ACCN, "corruption_mean_acc": _ACCN, "corruption_mean_over": _SN,
        "corruption_mean_acc_all": _ACCN,
        "mce_unnormalized": _ACCN, "relative_mce": _NN, "mce_vs_reference": _NN, "source": _SN, "clean_from": _SN,
        "cells": {"type": "array", "items": _obj({"corruption": _S, "severity": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 5}, "acc": _ACC})}}),
    "corrupt-export": _cmd("corrupt-export", {
        "run_id": {"type": "null"}, "directory": _S, "corruptions": {"type": "array", "items": _S},
        "n_examples": _I, "seed": _I}),
    "report": _cmd("report", {
        "run_id": _RUN_IDN, "files": {"type": "array", "items": _S}, "generated_at": _S,
        "notes": {"type": "array", "items": _S},
        "rows": {"type": "array", "items": _obj({
            "run_id": _RUN_ID, "model": _S, "label": _SN, "dataset": _SN, "status": _S, "epochs": _IN,
            "clean_acc": _ACCN, "clean_n_examples": _IN, "clean_from": _S, "clean_ci95": _CIN, "unreliable": _B,
            "corruption_mean_acc": _ACCN, "corruption_mean_acc_all": _ACCN,
            "name": _S, "paper_not_compared": _SN, "corruption_mean_over": _SN,
            "results": {"type": "array", "items": _obj({
                "attack": _S, "norm": _SN, "eps": _NN, "eps_label": _S, "robust_acc": _ACCN, "n_examples": _IN,
                "grad_mode": _SN, "unreliable": _B, "attack_run_id": _RUN_IDN, "forward_passes": _IN,
                "paper_robust_acc": _ACCN, "paper_not_compared": _SN,
                "worst_of": {"type": "array", "items": _S}, "labels": {"enum": ["true", "predicted", None]},
                "from_clean_errors": _ACCN, "ci95": _CIN,
                "members": {"type": "array", "items": _obj({"member": _S, "robust_acc": _ACC})},
                "left_out": {"type": "array", "items": _obj({
                    "attack_run_id": _RUN_ID, "attack": _S, "grad_mode": _SN, "n_examples": _IN,
                    "robust_acc": _ACC, "why": {"enum": ["other images", "other relaxation steps T",
                                                         "no per-image outcomes"]}})}})}})}}),
    "demo": _cmd("demo", {"run_ids": {"type": "array", "items": _RUN_ID}, "store": _S}),
    "runs": _cmd("runs", {"runs": {"type": "array", "items": _RUN}}),
    "show": _cmd("show", {
        "run": {**_RUN, "properties": {**_RUN["properties"], "argv": {"type": ["array", "null"]},
                                       "config": {"type": ["object", "null"]}, "error": _SN, "seed": _IN,
                                       "device": _SN, "host": _SN, "git_commit": _SN, "epcli_version": _SN,
                                       "torch_version": _SN, "cuda_version": _SN},
                "required": _RUN["required"] + ["argv", "config", "git_commit"]},
        "metrics": {"type": "array", "items": _obj({
            "name": _S, "value": _NN, "step": _IN, "attack": _S, "norm": _S, "grad_mode": _S, "corruption": _S,
            "severity": _I, "n_examples": _I, **_EPS, "unreliable": _B}, ["name", "value", "unreliable"])},
        "checks": {"type": "array", "items": _CHECK},
        "artifacts": {"type": "array", "items": _obj({"sha256": _S, "role": {"enum": ["input", "output"]},
                                                      "name": _SN, "kind": _S, "size": _I, "path": _S})}}),
    "compare": {"oneOf": [
        _cmd("compare", {"kind": {"const": "attack"}, "dataset": _SN, "split": {"const": "test"},
                         "a": _obj({"run_id": _RUN_ID, "model": _SN, "attack": _S, "norm": _S, "grad_mode": _SN,
                                    "labels": {"enum": ["true", "predicted"]}}),
                         "b": _obj({"run_id": _RUN_ID, "model": _SN, "attack": _S, "norm": _S, "grad_mode": _SN,
                                    "labels": {"enum": ["true", "predicted"]}}),
                         "rows": {"type": "array", "items": _obj({
                             **_EPS, "n": _I, "robust_acc_a": _ACC, "robust_acc_b": _ACC, "both": _I, "only_a": _I,
                             "only_b": _I, "mcnemar_p": {"type": "number", "minimum": 0, "maximum": 1}})}}),
        _cmd("compare", {"kind": {"const": "train"},
                         "a": _obj({"run_id": _RUN_ID, "model": _SN, "dataset": _SN, "status": _S}),
                         "b": _obj({"run_id": _RUN_ID, "model": _SN, "dataset": _SN, "status": _S}),
                         "config_diff": {"type": "array", "items": _obj({"key": _S, "a": {}, "b": {}})},
                         "metrics": {"type": "array", "items": _obj({"name": _S, "a": _NN, "b": _NN,
                                                                     "diff": _NN})}})]},
    "trace": _cmd("trace", {"run_id": _RUN_ID, "tree": {"$ref": "#/$defs/node"}}),
    "models": _cmd("models", {"models": {"type": "array", "items": _S}, "details": {"type": "array", "items": _obj(
        {"name": _S, "help": _S, "tags": {"type": "array", "items": _S}})}}),
    "recipes": _cmd("recipes", {"recipes": {"type": "array", "items": _S}, "recipe": _S, "config": {"type": "object"}},
                    optional=("recipes", "recipe", "config")),
    "tag": _cmd("tag", {"run_id": _RUN_ID, "tags": {"type": "array", "items": _S}, "note": _SN}),
    "rm": _cmd("rm", {"removed": {"type": "array", "items": _RUN_ID}, "files_removed": _I, "bytes_freed": _I,
                      "dry_run": _B}),
    "gc": _cmd("gc", {"artifacts_removed": _I, "files_removed": _I, "bytes_freed": _I, "dry_run": _B}),
}

_NODE = _obj({"run_id": _RUN_ID, "kind": _S, "status": _S, "model": _SN, "result": {"type": "object"},
              "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}})
SCHEMAS["trace"]["$defs"] = {"node": _NODE}
SCHEMAS["tag"]["description"] = "epcli tag and epcli note"


# --- the schema as documentation (docs/cli.md, written by scripts/cli_reference.py) --------------------------

def _type_text(s: dict) -> str:
    if "const" in s:
        return f'`"{s["const"]}"`'
    if "enum" in s:
        return " \\| ".join("`null`" if v is None else f"`{v}`" for v in s["enum"])
    if "$ref" in s:
        return "node (the same fields, recursively)"
    if "anyOf" in s:
        return " or ".join(_type_text(x) for x in s["anyOf"])
    if s.get("pattern") == _RUN_ID["pattern"]:
        return "run id"
    t = s.get("type")
    types = t if isinstance(t, list) else [t] if t else ["any"]
    if s.get("minimum") == 0 and s.get("maximum") == 1 and "number" in types:
        types = ["fraction" if x == "number" else x for x in types]
    return " or ".join(types)


def _fields(s: dict, prefix: str = "") -> list[tuple[str, str, bool]]:
    out = []
    req = set(s.get("required", []))
    for k, v in s.get("properties", {}).items():
        name = prefix + k
        if v.get("type") == "array" and isinstance(v.get("items"), dict) and v["items"].get("properties"):
            out.append((name + "[]", "list of objects", k in req))
            out += _fields(v["items"], name + "[].")
        elif v.get("type") == "object" and v.get("properties"):
            out.append((name, "object", k in req))
            out += _fields(v, name + ".")
        elif v.get("type") == "array":
            out.append((name, "list of " + _type_text(v.get("items") or {}), k in req))
        else:
            out.append((name, _type_text(v), k in req))
    return out


def markdown() -> str:
    """The schema as Markdown tables, one per command (the JSON Schema itself: `epcli.schema.SCHEMAS`)."""
    lines = []
    for name, s in SCHEMAS.items():
        variants = s.get("oneOf", [s])
        for i, v in enumerate(variants):
            kind = v["properties"].get("kind", {}).get("const")
            title = f"`{name}`" + (f" ({kind} runs)" if kind and len(variants) > 1 else "")
            lines += [f"#### {title}", "", "| field | type |", "|---|---|"]
            for field, typ, required in _fields(v):
                lines.append(f"| `{field}` | {typ}{'' if required else ' (optional)'} |")
            lines.append("")
    return "\n".join(lines)
