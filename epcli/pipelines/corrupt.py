"""`epcli corrupt`: a model on the CIFAR-10-C corruptions (generated or the official files)."""

from __future__ import annotations

import torch

from epcli.data import load_dataset, subset
from epcli.errors import EpcliError, NotFoundError, UsageError
from epcli.pipelines.common import (
    Progress,
    check_model_takes,
    check_not_blank,
    check_numbers,
    dataset_for,
    link_model_input,
    load_model,
    no_progress,
    resolve_device,
)
from epcli.pipelines.common import relax_residual_rows
from epcli.store import Store, describe_device


def corrupt(*, model: str, names: list[str] | None = None, severities: list[int] | None = None,
            dataset: str | None = None, data_dir: str | None = None, n: int | None = None, seed: int = 0,
            source: str | None = None, reference: str | None = None, batch_size: int = 500,
            T: int | None = None, device: str | None = None, store: Store, argv: list[str] | None = None,
            progress: Progress = no_progress) -> dict:
    """Evaluate a stored model on corruptions x severities (generated, or the official .npy files)."""
    from epcli import corruptions as C
    from epcli import distributed as dist
    from epcli.pipelines import shard

    check_numbers(n=n, seed=seed, batch_size=batch_size, T=T)
    device = dist.device_for(resolve_device(device))
    if shard.worker(device):  # a torchrun rank > 0: evaluates the share rank 0 hands out (docs/distributed.md)
        return shard.serve(device)
    check_not_blank(**{"--model": model, "--dataset": dataset, "--data-dir": data_dir, "--source": source,
                       "--reference": reference})
    if source and not names:  # every corruption file the folder has
        names = _source_names(source)
    names = list(dict.fromkeys(names or C.CORRUPTIONS))  # a repeated -c/-s is evaluated (and stored) once
    severities = list(dict.fromkeys(severities or [1, 2, 3, 4, 5]))
    unknown = [c for c in names if c not in C.CORRUPTIONS]
    if unknown:
        raise UsageError(f"unknown corruption {unknown[0]!r}: choose from {', '.join(C.CORRUPTIONS)}")
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad:
        raise UsageError(f"severity {bad[0]} is outside 1-5")
    if source:
        for c in names:  # fail before the run starts, not after the clean pass
            C.open_official(source, c)  # the headers only (memory-mapped): a broken file is a DatasetError
    progress("load", 0, 1, {"model": model})
    net, info = load_model(store, model, dataset, device)
    if T is not None:
        if not hasattr(net, "T"):
            raise UsageError(f"--T applies to relaxation models; {net.spec['name']} has no relaxation")
        net.T = int(T)
    train_run = info["train_run"] or {}
    ref_result = None
    if reference:
        ref_result = _corruption_result_of(store, reference)
        if not set(ref_result["correct"]) & {(c, s) for c in names for s in severities}:
            raise UsageError(f"reference {reference!r} has none of the requested corruption x severity cells "
                             "(relative mCE compares the same cells)")
    if source:
        _check_source_fits(net, source, names)
    ds = None if source else dataset_for(store, info, dataset, data_dir)
    if ds is not None:
        check_model_takes(net, ds.test_x, ds.name)
    clean, clean_from = (_source_clean(store, info, source, dataset, data_dir) if source else (None, None))
    progress("load", 1, 1, {"model": net.spec["name"], "dataset": ds.name if ds else f"official:{source}"})
    config = {"model": net.spec["name"], "model_run_id": train_run.get("id"), "corruptions": names,
              "severities": severities, "seed": seed, "n_examples": n, "source": source,
              "dataset": ds.name if ds else f"official:{source}", "reference": reference,
              "T": getattr(net, "T", None)}
    with store.run("corrupt", config, argv=argv, seed=seed, model=net.spec["name"],
                   dataset=config["dataset"], model_run_id=train_run.get("id"),
                   device=describe_device(device)) as run_id:
        link_model_input(store, run_id, info)
        def cb(info: dict) -> None:  # one task per corruption, over its severities, counted in images
            if not info.get("name"):
                progress("clean", info["done"], info["total"], {})
                return
            k = severities.index(info["severity"]) if info["severity"] in severities else 0
            progress(info["name"], k * info["total"] + info["done"], len(severities) * info["total"],
                     {"severity": info["severity"]})

        if source:
            res = shard.evaluate_official(net, source, names=names, severities=severities, batch_size=batch_size,
                                          device=device, on_batch=cb, clean=clean, n=n)
            x_grid = None
        else:
            x, y, _ = subset(ds.test_x, ds.test_y, n, seed)
            res = shard.evaluate_corruptions(net, x, y, names=names, severities=severities, seed=seed,
                                             batch_size=batch_size, device=device, on_batch=cb)
            x_grid = x[:4]
        summ = C.summarize(res, reference=ref_result, reference_label=reference or "reference")
        pct = lambda v: None if v is None else v / 100.0  # noqa: E731  (the store keeps fractions)
        n_ex = int(next(iter(res["correct"].values())).numel())
        facets = {"dataset": config["dataset"], "split": "test", "model": net.spec["name"], "n_examples": n_ex}
        rows = []
        if summ.get("clean_accuracy") is not None:
            rows.append({"name": "clean_acc", "value": pct(summ["clean_accuracy"]), **facets})
        cells = {(c, int(sv)): pct(a) for c, by_sev in summ["cells"].items() for sv, a in by_sev.items()}
        for (c, sv), acc in cells.items():
            rows.append({"name": "corruption_acc", "value": acc, "corruption": c, "severity": sv, **facets})
        from epcli.report import corruption_coverage, corruption_mean_label
        coverage = corruption_coverage(summ["cells"])
        over, complete_all = corruption_mean_label(coverage), coverage["complete19"]
        headline = {"clean_acc": pct(summ.get("clean_accuracy")),
                    "corruption_mean_acc": pct(summ.get("mean_accuracy_benchmark")),
                    # the all-19 mean exists only when all 19 x 5 were run (else it would mislabel a subset)
                    "corruption_mean_acc_all": pct(summ.get("mean_accuracy_all")) if complete_all else None,
                    "mce_unnormalized": pct(summ.get("mce_unnormalized")),
                    "relative_mce": pct(summ.get("relative_mce_vs_reference")),
                    "mce_vs_reference": pct(summ.get("mce_vs_reference"))}
        for key, val in headline.items():
            if key != "clean_acc" and val is not None:
                rows.append({"name": key, "value": val, **facets,
                             "detail": {"reference": reference} if "reference" in key or key == "relative_mce"
                             else {"over": over} if key in ("corruption_mean_acc", "mce_unnormalized") else None})
        if not source:  # how far from equilibrium the predictions are: clean, and a sample of corrupted images
            rows += relax_residual_rows(net, x, device, facets,
                                        corrupted=_corrupted_residuals(net, x, names, severities, seed, device))
        progress("save", 0, 1, {})
        store.log_metrics(run_id, rows)
        _save_corruption_artifacts(store, run_id, res, names, severities, x_grid, seed)
        progress("save", 1, 1, {"run_id": run_id, "mean_acc": headline["corruption_mean_acc"]})
        summary = {k: v for k, v in headline.items() if v is not None}
        if summary.get("corruption_mean_acc") is not None:
            summary["corruption_mean_over"] = over
        if "shards" in res:  # torchrun: who evaluated what
            summary["shards"] = res["shards"]
        store.update_run(run_id, summary=summary)
    out = {"run_id": run_id, "model": net.spec["name"], "model_run_id": train_run.get("id"),
           "dataset": config["dataset"], "n_examples": n_ex, "clean_acc": headline["clean_acc"], **summary,
           "cells": {f"{c}/{sv}": v for (c, sv), v in cells.items()}}
    if source:
        out.update({"source": str(source), "clean_from": clean_from})
    return shard.finish(out)


def _source_names(source: str) -> list[str]:
    from pathlib import Path

    from epcli import corruptions as C
    from epcli.errors import DatasetError
    d = Path(source)
    if not d.is_dir():
        raise DatasetError(f"corruption directory {d} not found (expected CIFAR-10-C's <name>.npy + labels.npy)")
    found = [c for c in C.CORRUPTIONS if (d / f"{c}.npy").is_file()]
    if not found:
        raise DatasetError(f"no CIFAR-10-C files (<name>.npy) in {d}")
    return found


def _check_source_fits(net, source: str, names: list[str]) -> None:
    """The official files' labels are the model's classes and their images a size it takes (read from the memory
    map: one image per file), before the run opens."""
    from pathlib import Path

    import numpy as np

    from epcli import corruptions as C
    from epcli.errors import DatasetError
    d = Path(source)
    labels = np.asarray(C.open_official(source, names[0])[1]) if names else np.zeros(0)
    k = net.spec.get("num_classes")
    if k and len(labels) and (not np.issubdtype(labels.dtype, np.number) or labels.min() < 0 or labels.max() >= k
                              or not np.array_equal(labels, np.round(labels))):
        raise DatasetError(f"{d / 'labels.npy'} holds {labels.dtype} labels in [{labels.min()}, {labels.max()}]; the "
                           f"model has {k} classes (labels 0..{k - 1})")
    for name in names:
        first = C.open_official(source, name)[0][:1]
        check_model_takes(net, torch.from_numpy(np.array(first)).permute(0, 3, 1, 2), f"{name}.npy")


def _source_clean(store: Store, info: dict, source: str, dataset: str | None, data_dir: str | None):
    """The clean images behind an official-layout folder, in its order, and where they came from.

    An exported folder carries them (clean.npy). For the published CIFAR-10-C / -100-C folders they are the test
    set of the dataset (given, or the model's), recognised by its labels equalling labels.npy's first rows.
    Otherwise (None, None): clean accuracy is reported as n/a.
    """
    from pathlib import Path

    import numpy as np

    from epcli import corruptions as C
    got = C.load_clean(source)
    if got is not None:
        return got, "clean.npy"
    lab_path = Path(source) / "labels.npy"
    if not lab_path.is_file():
        return None, None
    try:
        ds = dataset_for(store, info, dataset, data_dir)
        labels = np.load(lab_path, mmap_mode="r", allow_pickle=False)
    except (EpcliError, OSError, ValueError):
        return None, None
    n = len(ds.test_y)
    if labels.ndim == 1 and labels.shape[0] == 5 * n and torch.equal(
            torch.from_numpy(np.array(labels[:n], dtype=np.int64)), torch.as_tensor(ds.test_y).long()):
        return (ds.test_x, ds.test_y), f"{ds.name} test set (labels match)"
    return None, None


def _corruption_result_of(store: Store, ref: str) -> dict:
    """The newest corrupt run of a run id or model name, as per-example outcomes (for relative mCE)."""
    from safetensors.torch import load_file
    try:
        run = store.get_run(ref)
        runs = [run] if run["kind"] == "corrupt" else store.runs(kind="corrupt", status="finished",
                                                                  model_run_id=run["id"], limit=1)
    except NotFoundError:
        runs = store.runs(kind="corrupt", status="finished", model=ref, limit=1)
    if not runs:
        raise NotFoundError(f"no finished corruption run for reference {ref!r} (run `epcli corrupt` on it first)")
    arts = store.artifacts_of(runs[0]["id"], role="output", kind="per-example")
    if not arts:
        raise NotFoundError(f"corruption run {runs[0]['id']} has no per-example outcomes")
    t = load_file(str(store.artifact_path(arts[0]["sha256"])))
    correct = {}
    for k, v in t.items():
        if "/" in k:
            c, sv = k.rsplit("/", 1)
            correct[(c, int(sv))] = v.bool()
    return {"clean_correct": t["clean_correct"].bool(), "correct": correct}


def _corrupted_residuals(net, x, names, severities, seed, device, k: int = 64) -> dict | None:
    """A relaxation model's per-image residuals at prediction on the first k evaluated images of every corruption at
    the highest severity run (the same images the evaluation saw): a sample, said so in the record."""
    if not callable(getattr(net, "relax", None)) or not len(x):
        return None
    from epcli import corruptions as C
    sev, k = max(severities), min(k, len(x))
    res = []
    with torch.no_grad():
        for name in names:
            xb = C.corrupt_range(x, name, sev, seed, 0, k, device)
            net.relax(xb, net.T, tol=net.tol)  # as the evaluation's forward relaxed (T, tol, update, solver)
            res.append(net.last_residual.float().cpu())
    return {"residuals": torch.cat(res), "sample": f"the first {k} images of each of {len(names)} corruptions at "
                                                   f"severity {sev}"}


def _save_corruption_artifacts(store: Store, run_id, res, names, severities, x_grid, seed) -> None:
    from safetensors.torch import save_file
    outcome = {"clean_correct": res["clean_correct"].to(torch.uint8).cpu()}
    for (c, s), v in res["correct"].items():
        outcome[f"{c}/{s}"] = v.to(torch.uint8).cpu()
    store.write_artifact(run_id, "per-example", lambda p: save_file(outcome, str(p)), suffix=".safetensors")
    if x_grid is not None:
        from torchvision.utils import save_image

        from epcli import corruptions as C
        grid = C.sample_grid(x_grid, names, severities, seed)
        store.write_artifact(run_id, "corruption-grid",
                             lambda p: save_image(grid.float() / 255 if grid.dtype == torch.uint8 else grid,
                                                  str(p)),
                             suffix=".png", meta={"corruptions": names, "severities": severities})


def export_corruptions(*, directory: str, names: list[str] | None = None, dataset: str | None = None,
                       data_dir: str | None = None, n: int | None = None, seed: int = 0,
                       store: Store) -> dict:
    """Write a generated CIFAR-10-C-style set (.npy per corruption + labels.npy) to `directory`."""
    import contextlib
    import os
    from pathlib import Path

    from epcli import corruptions as C
    check_numbers(n=n, seed=seed)
    check_not_blank(**{"--export": directory, "--dataset": dataset, "--data-dir": data_dir})
    store.refuse_inside(directory, "--export")
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--export {directory} is a file, not a folder")
    created = not folder.exists()
    try:  # before the dataset is read: a path that cannot be a folder is the user's to fix
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--export {directory}: cannot create the folder ({e.strerror or e})") from None
    try:
        if not os.access(folder, os.W_OK):
            raise UsageError(f"--export {directory}: the folder is not writable")
        names = list(dict.fromkeys(names or C.CORRUPTIONS))
        ds = load_dataset(dataset, data_dir=data_dir, cache_dir=store.cache_dir)
        x, y, _ = subset(ds.test_x, ds.test_y, n, seed)
        C.export(directory, x, y, names=names, seed=seed)
    except BaseException:
        if created:  # a refused export leaves no empty folder behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return {"directory": str(directory), "corruptions": names, "n_examples": len(y), "seed": seed,
            "dataset": ds.name}


