"""What every pipeline shares: devices, eps parsing, model references, datasets, progress."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from epcli import checkpoint
from epcli.data import Dataset, first_order, load_dataset
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


# --- numeric options: one validation layer every pipeline calls ------------------------------------------

# name -> (integer?, lowest allowed, highest allowed, option as the CLI spells it). Floats must be finite.
NUMERIC_OPTIONS: dict[str, tuple[bool, float | None, float | None, str]] = {
    "n": (True, 1, None, "--n"),
    "batch_size": (True, 1, 1 << 20, "--batch-size"),
    "eval_batch_size": (True, 1, 1 << 20, "eval_batch_size"),
    "steps": (True, 1, 1_000_000, "--steps"),
    "restarts": (True, 1, 10_000, "--restarts"),
    "n_queries": (True, 1, 10**9, "--queries"),
    "T": (True, 1, 100_000, "--T"),
    "T1": (True, 1, 100_000, "--T1"),
    "T2": (True, 1, 100_000, "--T2"),
    "epochs": (True, 1, 100_000, "--epochs"),
    "seed": (True, 0, 2**31 - 1, "--seed"),
    "chunk": (True, 1, None, "chunk"),
    "unroll": (True, 1, 100_000, "--unroll-sweep"),
    "step_size": (False, 0, None, "--step-size"),
    "lr": (False, 0, None, "--lr"),
    "beta": (False, None, None, "--beta"),
}


def check_numbers(**values) -> None:
    """Refuse numeric options that are NaN, infinite, of the wrong type or out of range (UsageError, exit 2).

    None means "not given". Lower bounds of floats are exclusive (a step size or learning rate of 0 does
    nothing); the rest are inclusive. Unknown names are a bug, not user input.
    """
    for name, v in values.items():
        if v is None:
            continue
        integer, low, high, label = NUMERIC_OPTIONS[name]
        if isinstance(v, (list, tuple)):
            for item in v:
                check_numbers(**{name: item})
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"{label} must be a number, got {v!r}")
        if integer and (isinstance(v, float) and not v.is_integer()):
            raise UsageError(f"{label} must be an integer, got {v!r}")
        if not math.isfinite(v):
            raise UsageError(f"{label} must be a finite number, got {v}")
        if low is not None and (v < low if integer else v <= low):
            raise UsageError(f"{label} must be {'>=' if integer else '>'} {low}, got {v:g}")
        if high is not None and v > high:
            raise UsageError(f"{label} must be <= {high}, got {v:g}")


def check_not_blank(**options) -> None:
    """An option given as an empty string (`--dataset ""`, an empty variable in a script) is a usage error: left
    alone it would read as "not given" and silently fall back to the default. Keys: the option as spelled."""
    for option, value in options.items():
        if value is not None and not str(value).strip():
            raise UsageError(f"{option} is empty: give a value or leave the option out")


def check_model_takes(net: torch.nn.Module, x_uint8: torch.Tensor, dataset: str) -> None:
    """One image through the model before a run opens, so that a model that cannot take the dataset's images (a
    conv stack that shrinks 2x2 images to nothing, a patch size that does not divide them) is a usage error rather
    than a failed run. A relaxation model relaxes only the steps that reach its read-out: shapes are checked
    here, not the fixed point."""
    if not len(x_uint8):
        return
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    old_T, was_training = getattr(net, "T", None), net.training
    try:
        if old_T is not None:  # the fewest steps that reach the read-out
            net.T = min(old_T, net.min_steps()) if callable(getattr(net, "min_steps", None)) else old_T
        net.eval()
        with torch.no_grad():
            out = net(x_uint8[:1].to(device).float().div(255))
    except (RuntimeError, ValueError, AssertionError) as e:
        h, w = x_uint8.shape[-2:]
        raise UsageError(f"model {net.spec.get('name')} cannot take {dataset}'s {h}x{w} images "
                         f"({' '.join(str(e).split())[:200]})") from None
    finally:
        if old_T is not None:
            net.T = old_T
        net.train(was_training)
    n = net.spec.get("num_classes")
    if n is not None and tuple(out.shape) != (1, n):
        raise UsageError(f"model {net.spec.get('name')} gives outputs of shape {tuple(out.shape)} on {dataset}'s "
                         f"images, not (1, {n})")


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
        raise UsageError(f"run {run['id']} is {'an' if run['kind'] == 'attack' else 'a'} {run['kind']} run, not a "
                         "training run")
    if run is None:
        from epcli.models import list_models
        if ref not in list_models() and not ref.startswith("timm:"):
            raise NotFoundError(f"{ref!r} is neither a model name ({', '.join(list_models())}), a run id, "
                                "nor a checkpoint file")
        run = _latest_on(store, ref, dataset)
    if run["status"] == "running":
        raise UsageError(f"training run {run['id']} is still running; wait for it or pass a checkpoint path")
    ckpts = store.artifacts_of(run["id"], role="output", kind="checkpoint")
    if not ckpts:
        raise NotFoundError(f"training run {run['id']} ({run['status']}) has no checkpoint")
    final = [a for a in ckpts if a["name"] == "final"] or ckpts
    art = final[-1]
    return {"path": store.artifact_path(art["sha256"]), "sha256": art["sha256"], "train_run": run,
            "meta": checkpoint.read_metadata(store.artifact_path(art["sha256"]))}


def _latest_on(store: Store, model: str, dataset: str | None) -> dict:
    """The newest finished training run of `model` on `dataset`, where a dataset given as a path (an
    ImageFolder) matches the runs trained on that same folder, whatever its short name."""
    if dataset and Path(dataset).exists():
        want = str(Path(dataset).resolve())
        for run in store.runs(kind="train", status="finished", model=model):
            if (run.get("config") or {}).get("dataset_ref") == want:
                return run
        raise NotFoundError(f"no finished training run of model {model!r} on {dataset} in the store "
                            f"{store.root} (train one with `epcli train --model {model} --dataset {dataset}`)")
    return store.latest_train_run(model, dataset)


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
    have = info["meta"].get("classes")  # what each output means: label k must name the same class in both
    if have and list(have) != list(ds.classes):
        k = next(i for i, (a, b) in enumerate(zip(have, ds.classes)) if a != b)
        raise UsageError(f"the model's class {k} is {have[k]!r} but dataset {ds.name}'s is {ds.classes[k]!r}"
                         + (" (the same classes in another order)" if sorted(have) == sorted(ds.classes) else ""))
    return ds


def model_and_first_test_images(store: Store, ref: str, n: int, device: str = "cpu"):
    """For scripts and benchmarks: a stored model in eval mode, the dataset it was trained on (as `epcli attack`
    reads it) and that dataset's first n test images (as `epcli attack --select first` takes them:
    data.first_order) as floats in [0, 1]. Returns (net, info, ds, x, y)."""
    net, info = load_model(store, ref, None, device)
    ds = dataset_for(store, info, None, None)
    idx = first_order(ds.test_y)[0][:n].sort().values
    return net.eval(), info, ds, ds.test_x[idx].float() / 255, ds.test_y[idx]


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


def relax_residual_rows(net, x, device: str, facets: dict, adversarial: dict | None = None,
                        corrupted: dict | None = None) -> list[dict]:
    """The metric row `relax_residual` for a relaxation model evaluated on images x (uint8 or [0,1] floats):
    value = the largest per-image relative residual of the last relaxation step at the prediction (T, tol,
    update and solver as the model predicts), detail {T, mean, steps (the slowest image's), steps_mean,
    at_equilibrium, tol}; with `adversarial` ({eps: per-image residuals of an attack's final predictions}) also
    adv_max, adv_mean, adv_predictions, adv_unconverged (how many were above EQUILIBRIUM_TOL), adv_at_equilibrium;
    with `corrupted` ({"residuals", "sample"}: a corrupt run's sample of corrupted images) likewise corrupted_max,
    corrupted_mean, corrupted_checked, corrupted_unconverged, corrupted_sample, corrupted_at_equilibrium.
    [] for other models."""
    if not callable(getattr(net, "relax", None)) or x is None or not len(x):
        return []
    from epcli.ep import EQUILIBRIUM_TOL, prediction_residual
    xf = x.to(device)
    xf = xf.float().div(255) if xf.dtype == torch.uint8 else xf.float()
    r = prediction_residual(net, xf)
    detail = {"T": r["T"], "mean": r["mean"], "steps": r["steps"], "steps_mean": r["steps_mean"],
              "at_equilibrium": r["at_equilibrium"], "tol": EQUILIBRIUM_TOL}
    adv = torch.cat([v.flatten() for v in (adversarial or {}).values()]) if adversarial else torch.zeros(0)
    adv = adv[~adv.isnan()]
    if adv.numel():  # the attack's final predictions on its adversarial images, every eps
        detail.update(adv_max=float(adv.max()), adv_mean=float(adv.mean()), adv_predictions=int(adv.numel()),
                      adv_unconverged=int((adv > EQUILIBRIUM_TOL).sum()),
                      adv_at_equilibrium=bool(float(adv.max()) <= EQUILIBRIUM_TOL))
    if corrupted and corrupted["residuals"].numel():  # a corrupt run's sample of corrupted images
        c = corrupted["residuals"]
        detail.update(corrupted_max=float(c.max()), corrupted_mean=float(c.mean()), corrupted_checked=int(c.numel()),
                      corrupted_unconverged=int((c > EQUILIBRIUM_TOL).sum()), corrupted_sample=corrupted["sample"],
                      corrupted_at_equilibrium=bool(float(c.max()) <= EQUILIBRIUM_TOL))
    return [{"name": "relax_residual", "value": r["max"], **facets, "detail": detail}]
