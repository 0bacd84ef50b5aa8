"""What every pipeline shares: devices, eps parsing, model references, datasets, progress."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from epcli import checkpoint
from epcli.data import Dataset, load_dataset
from epcli.errors import NotFoundError, UsageError
from epcli.store import Store

Progress = Callable[[str, int, int, dict], None]
NORMS = ("linf", "l2")


def no_progress(task: str, done: int, total: int, info: dict) -> None:
    pass


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def parse_eps(text: str | float | list) -> list[float]:
    """'8/255,0.5,1e-3' -> floats; fractions are allowed so that 8/255 stays exact."""
    if isinstance(text, (int, float)):
        return [float(text)]
    if isinstance(text, list):
        return [v for t in text for v in parse_eps(t)]
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            out.append(float(Fraction(part)) if "/" in part else float(part))
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"cannot read eps {part!r}: use numbers or fractions like 8/255") from None
    if not out:
        raise UsageError("no eps given")
    return out


def eps_label(eps: float) -> str:
    """8/255-style label when eps is a small multiple of 1/255, else the number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and 0 < round(k) <= 64:
        return f"{round(k)}/255"
    return f"{eps:g}"


def check_eps(norm: str, eps_list: list[float]) -> list[str]:
    """Refuse eps outside the norm's sensible range; return warnings for suspicious values."""
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}: use linf or l2")
    notes = []
    for e in eps_list:
        if not math.isfinite(e) or e < 0:
            raise UsageError(f"eps {e} must be a finite number >= 0")
        if norm == "linf" and e > 1:
            raise UsageError(f"L-inf eps {e} is outside [0, 1]: images are in [0, 1] (did you mean {e:g}/255?)")
        if norm == "linf" and abs(e - 0.3) < 1e-9:
            notes.append("eps 0.3 is the MNIST default; the CIFAR convention is 8/255")
        if norm == "l2" and e > 32:
            raise UsageError(f"L2 eps {e} is larger than the diameter of the image space (~55 for 3x32x32)")
    return notes


# --- model references -----------------------------------------------------------------------------------

def resolve_model(store: Store, ref: str, dataset: str | None = None) -> dict:
    """A model reference (registry name, run id or checkpoint path) -> its checkpoint and training run.

    Returns {path, sha256 (if in the store), train_run (dict or None), meta}.
    """
    p = Path(ref)
    if ref.endswith(".safetensors") or (p.exists() and p.is_file()):
        if not p.is_file():
            raise NotFoundError(f"checkpoint file {ref} does not exist")
        meta = checkpoint.read_metadata(p)
        run = None
        if meta.get("run_id"):
            try:
                run = store.get_run(str(meta["run_id"]))
            except NotFoundError:
                run = None
        return {"path": p, "sha256": None, "train_run": run, "meta": meta}
    try:
        run = store.get_run(ref)
    except NotFoundError:
        run = None
    if run is not None and run["kind"] != "train":
        raise UsageError(f"run {run['id']} is a {run['kind']} run, not a training run")
    if run is None:
        from epcli.models import list_models
        if ref not in list_models() and not ref.startswith("timm:"):
            raise NotFoundError(f"{ref!r} is neither a model name ({', '.join(list_models())}), a run id, "
                                "nor a checkpoint file")
        run = store.latest_train_run(ref, dataset)
    if run["status"] == "running":
        raise UsageError(f"training run {run['id']} is still running; wait for it or pass a checkpoint path")
    ckpts = store.artifacts_of(run["id"], role="output", kind="checkpoint")
    if not ckpts:
        raise NotFoundError(f"training run {run['id']} ({run['status']}) has no checkpoint")
    final = [a for a in ckpts if a["name"] == "final"] or ckpts
    art = final[-1]
    return {"path": store.artifact_path(art["sha256"]), "sha256": art["sha256"], "train_run": run,
            "meta": checkpoint.read_metadata(store.artifact_path(art["sha256"]))}


def load_model(store: Store, ref: str, dataset: str | None, device: str):
    info = resolve_model(store, ref, dataset)
    model, meta = checkpoint.load(info["path"], device=device)
    return model, info


def dataset_ref(dataset: str | None) -> str | None:
    """How to find the dataset again: a name, or an absolute path."""
    if dataset and Path(dataset).exists():
        return str(Path(dataset).resolve())
    return dataset


def dataset_for(store: Store, info: dict, dataset: str | None, data_dir: str | None) -> Dataset:
    """The dataset to evaluate on: the one given, else the one the model was trained on."""
    cfg = (info["train_run"] or {}).get("config") or info["meta"].get("config") or {}
    name = dataset or cfg.get("dataset_ref") or cfg.get("dataset")
    ds = load_dataset(name, data_dir=data_dir or cfg.get("data_dir"), cache_dir=store.cache_dir)
    want = info["meta"].get("num_classes") or info["meta"]["spec"].get("num_classes")
    if want and int(want) != ds.num_classes:
        raise UsageError(f"the model has {want} classes but dataset {ds.name} has {ds.num_classes}")
    return ds


def link_model_input(store: Store, run_id: str, info: dict) -> None:
    if info["sha256"]:
        store.link(run_id, info["sha256"], "input", "checkpoint")
    else:
        store.register_external(run_id, "checkpoint", info["path"], "input", "checkpoint")


def drop_artifact(store: Store, run_id: str, sha: str) -> None:
    users = list(store.db.query("SELECT COUNT(*) AS n FROM run_artifacts WHERE sha256 = ? AND run_id != ?",
                                [sha, run_id]))[0]["n"]
    if users:
        return
    path = store.artifact_path(sha)
    store.db.execute("DELETE FROM run_artifacts WHERE sha256 = ?", [sha])
    store.db.execute("DELETE FROM artifacts WHERE sha256 = ?", [sha])
    path.unlink(missing_ok=True)


def relax_residual_rows(net, x, device: str, facets: dict) -> list[dict]:
    """The metric row `relax_residual` for a relaxation model evaluated on images x (uint8 or [0,1] floats):
    value = the largest per-image relative residual of the last relaxation step at the prediction (T, tol,
    update and solver as the model predicts), detail {T, mean, steps, at_equilibrium, tol}. [] for other models."""
    if not callable(getattr(net, "relax", None)) or x is None or not len(x):
        return []
    from epcli.ep import EQUILIBRIUM_TOL, prediction_residual
    xf = x.to(device)
    xf = xf.float().div(255) if xf.dtype == torch.uint8 else xf.float()
    r = prediction_residual(net, xf)
    return [{"name": "relax_residual", "value": r["max"], **facets,
             "detail": {"T": r["T"], "mean": r["mean"], "steps": r["steps"], "at_equilibrium": r["at_equilibrium"],
                        "tol": EQUILIBRIUM_TOL}}]
