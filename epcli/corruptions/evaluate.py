"""Accuracy of a model on corrupted images: generated on the fly (`evaluate`) or read from CIFAR-10-C .npy files
(`evaluate_official`), both as per-example outcomes, and the accuracy tables and corruption errors (`summarize`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from epcli.corruptions.core import _check_names, _check_severities, corrupt_range
from epcli.corruptions.files import load_official
from epcli.corruptions.params import BENCHMARK_CORRUPTIONS, CORRUPTIONS
from epcli.errors import DatasetError, UsageError


def _predict(model, xb: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(xb).argmax(dim=1)


def evaluate(model, x_uint8: torch.Tensor, y: torch.Tensor, *, names: Iterable[str] = CORRUPTIONS,
             severities: Iterable[int] = (1, 2, 3, 4, 5), seed: int = 0, batch_size: int = 500,
             device="cpu", on_batch: Callable[[dict], None] | None = None,
             span: tuple[int, int] | None = None) -> dict:
    """Accuracy of `model` on generated corruptions of a uint8 set (N, 3, H, W) with labels y.

    Returns {"clean_correct": bool (N,), "correct": {(name, severity): bool (N,)}, "seconds": float}. The model
    is called under torch.no_grad on float batches in [0, 1]; its train/eval mode is left as given. on_batch, if
    given, gets {"name", "severity", "done", "total"} after every batch ("name" is None for the clean pass).
    span=(lo, hi), lo a multiple of batch_size: evaluate only examples [lo, hi) (one process's share under
    torchrun), in the batches the whole set has there; outcomes outside the span are left False.
    """
    names, severities = _check_names(names), _check_severities(severities)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise UsageError(f"evaluate expects uint8 images (N, 3, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    n = x_uint8.shape[0]
    lo, hi = (0, n) if span is None else (int(span[0]), min(int(span[1]), n))
    if lo % batch_size:
        raise UsageError(f"span must start on a batch boundary (a multiple of {batch_size}), got {lo}")
    y = torch.as_tensor(y).long()
    t0 = time.perf_counter()
    clean = torch.zeros(n, dtype=torch.bool)
    for s in range(lo, hi, batch_size):
        e = min(s + batch_size, hi)
        xb = x_uint8[s:e].to(device).float().div_(255)
        clean[s:e] = (_predict(model, xb).cpu() == y[s:e])
        if on_batch:
            on_batch({"name": None, "severity": None, "done": e, "total": n})
    correct = {}
    for name in names:
        for sev in severities:
            ok = torch.zeros(n, dtype=torch.bool)
            for s in range(lo, hi, batch_size):
                e = min(s + batch_size, hi)
                xb = corrupt_range(x_uint8, name, sev, seed, s, e, device)
                ok[s:e] = _predict(model, xb).cpu() == y[s:e]
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
            correct[(name, sev)] = ok
    return {"clean_correct": clean, "correct": correct, "seconds": time.perf_counter() - t0}


def _acc(t: torch.Tensor) -> float:
    return 100.0 * float(t.double().mean()) if t.numel() else float("nan")


def _mean(vals):
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def summarize(result: dict, reference: dict | None = None, reference_label: str = "reference") -> dict:
    """Accuracy tables and corruption errors (all in %) from an `evaluate` result.

    - "cells": {name: {severity: accuracy}}, "per_corruption": mean over severities, "per_severity": mean over
      the benchmark corruptions present;
    - "mean_accuracy_benchmark" (the 15, whichever were evaluated), "mean_accuracy_all" (every corruption
      evaluated), "mean_accuracy_extra";
    - "mce_unnormalized" = 100 - mean_accuracy_benchmark (AugMix / RobustBench CIFAR convention), and
      "mce_unnormalized_all" over all evaluated corruptions;
    - with `reference` (another model's result on the same cells): "mce_vs_reference" (sum of errors over
      severities divided by the reference's, averaged over benchmark corruptions, x100) and
      "relative_mce_vs_reference" (the same with clean error subtracted), labelled with reference_label. No
      ImageNet AlexNet constants are ever used.
    """
    clean = result.get("clean_correct")
    clean_acc = _acc(clean) if clean is not None and clean.numel() else None
    cells: dict[str, dict[int, float]] = {}
    for (name, sev), ok in result["correct"].items():
        cells.setdefault(name, {})[int(sev)] = _acc(ok)
    ordered = [n for n in CORRUPTIONS if n in cells] + [n for n in cells if n not in CORRUPTIONS]
    cells = {n: dict(sorted(cells[n].items())) for n in ordered}
    per_corr = {n: _mean(v.values()) for n, v in cells.items()}
    bench = [n for n in cells if n in BENCHMARK_CORRUPTIONS]
    extra = [n for n in cells if n not in BENCHMARK_CORRUPTIONS]
    sevs = sorted({s for v in cells.values() for s in v})
    per_sev = {s: _mean(cells[n].get(s) for n in bench) for s in sevs}
    all_cells = [a for n in cells for a in cells[n].values()]
    bench_cells = [a for n in bench for a in cells[n].values()]
    mb = _mean(bench_cells)
    ma = _mean(all_cells)
    out = {
        "clean_accuracy": clean_acc,
        "cells": cells,
        "per_corruption": per_corr,
        "per_severity": per_sev,
        "benchmark_corruptions": bench,
        "extra_corruptions": extra,
        "mean_accuracy_benchmark": mb,
        "mean_accuracy_extra": _mean(a for n in extra for a in cells[n].values()),
        "mean_accuracy_all": ma,
        "mce_unnormalized": None if mb is None else 100.0 - mb,
        "mce_unnormalized_all": None if ma is None else 100.0 - ma,
        "seconds": result.get("seconds"),
    }
    if reference is not None:
        ref = summarize(reference)
        ces, rces = {}, {}
        for n in bench:
            common = [s for s in cells[n] if s in ref["cells"].get(n, {})]
            if not common:
                continue
            err = sum(100 - cells[n][s] for s in common)
            rerr = sum(100 - ref["cells"][n][s] for s in common)
            ces[n] = 100.0 * err / rerr if rerr > 0 else None
            if clean_acc is not None and ref["clean_accuracy"] is not None:
                d = sum(clean_acc - cells[n][s] for s in common)
                rd = sum(ref["clean_accuracy"] - ref["cells"][n][s] for s in common)
                rces[n] = 100.0 * d / rd if rd > 0 else None
        out.update({
            "reference_label": reference_label,
            "ce_vs_reference": ces,
            "mce_vs_reference": _mean(ces.values()),
            "relative_ce_vs_reference": rces,
            "relative_mce_vs_reference": _mean(rces.values()),
            "note": f"CE normalised by {reference_label!r} (a CIFAR model), not by ImageNet AlexNet",
        })
    return out


def evaluate_official(model, directory, names: Iterable[str] | None = None, *,
                      severities: Iterable[int] = (1, 2, 3, 4, 5), batch_size: int = 500, device="cpu",
                      clean: tuple[torch.Tensor, torch.Tensor] | None = None, n: int | None = None,
                      on_batch: Callable[[dict], None] | None = None) -> dict:
    """Like `evaluate`, on the published (or exported) .npy files. names=None: every corruption file present.

    clean: optional (x_uint8, y) of the same clean images, in the files' order; without it "clean_correct" is an
    empty tensor. n: only the first n examples of each severity (and of `clean`).
    """
    d = Path(directory)
    if names is None:
        names = [nm for nm in CORRUPTIONS if (d / f"{nm}.npy").is_file()]
        if not names:
            raise DatasetError(f"no CIFAR-10-C files (<name>.npy) in {d}")
    names, severities = _check_names(names), _check_severities(severities)
    if batch_size < 1:
        raise UsageError(f"batch_size must be positive, got {batch_size}")
    t0 = time.perf_counter()
    clean_ok = torch.zeros(0, dtype=torch.bool)
    if clean is not None:
        cx, cy = clean[0][:n], torch.as_tensor(clean[1])[:n].long()
        clean_ok = torch.cat([_predict(model, cx[s:s + batch_size].to(device).float().div_(255)).cpu()
                              == cy[s:s + batch_size] for s in range(0, len(cy), batch_size)]) if len(cy) else clean_ok
        if on_batch:
            on_batch({"name": None, "severity": None, "done": len(cy), "total": len(cy)})
    correct = {}
    for name in names:
        x, y = load_official(d, name)
        rows = x.shape[0] // 5
        m = rows if n is None else min(n, rows)
        for sev in severities:
            ok = torch.zeros(m, dtype=torch.bool)
            base = (sev - 1) * rows
            for s in range(0, m, batch_size):
                e = min(s + batch_size, m)
                xb = x[base + s:base + e].to(device).float().div_(255)
                ok[s:e] = _predict(model, xb).cpu() == y[base + s:base + e]
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": m})
            correct[(name, sev)] = ok
    return {"clean_correct": clean_ok, "correct": correct, "seconds": time.perf_counter() - t0}
