"""Checkpoints as safetensors files that say what they are.

Tensors: `model.<name>` for the model's state_dict, `train.<name>` for the resumable training state
(optimiser, scheduler, RNG). `__metadata__` (a string map) carries the format, the run id, the model spec
(JSON), the config hash, the epoch, the dataset and its classes, so a stray file can be rebuilt and traced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from epcli.errors import CheckpointError, EpcliError

FORMAT = "epcli-checkpoint/1"


def save(path: str | os.PathLike, model: torch.nn.Module, *, meta: dict | None = None,
         train_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write model weights (+ optional training state) with self-describing metadata, atomically."""
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for k, v in (train_tensors or {}).items():
        tensors[f"train.{k}"] = v.detach().to("cpu").contiguous()
    info = {"format": FORMAT, "spec": json.dumps(model.spec, sort_keys=True)}
    for k, v in (meta or {}).items():
        info[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(_unshare(tensors), str(tmp), metadata=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded `__metadata__` of a checkpoint (JSON values parsed)."""
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({e})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an epcli checkpoint (no '{FORMAT}' "
                              "metadata)")
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    return meta


def load(path: str | os.PathLike, *, expected_spec: dict | None = None, device: str = "cpu",
         with_train_state: bool = False):
    """Rebuild the model from the file's spec and load its weights.

    Returns (model, meta) or, with `with_train_state`, (model, meta, train_tensors). A spec or shapes that do
    not match `expected_spec` is a CheckpointError, never a silent partial load.
    """
    from epcli.models import build_from_spec
    meta = read_metadata(path)
    spec = meta["spec"]
    if expected_spec is not None:
        diff = {k for k in set(spec) | set(expected_spec) if spec.get(k) != expected_spec.get(k)}
        if diff:
            k = sorted(diff)[0]
            raise CheckpointError(f"checkpoint {path} is a {spec.get('name')} with {k}={spec.get(k)!r}, but "
                                  f"the requested model has {k}={expected_spec.get(k)!r}")
    try:
        model = build_from_spec(spec)
    except EpcliError as e:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its model: {e}") from None
    model_sd, train = {}, {}
    with safe_open(str(path), "pt", device="cpu") as f:
        for k in f.keys():
            if k.startswith("model."):
                model_sd[k[6:]] = f.get_tensor(k)
            elif k.startswith("train.") and with_train_state:
                train[k[6:]] = f.get_tensor(k)
    load_state(model, model_sd, str(path))
    model.to(device).eval()
    return (model, meta, train) if with_train_state else (model, meta)


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with one-line errors naming the first mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{where} does not match the model ({what}; {len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{where} does not match the model: {k} has shape {tuple(v.shape)} in the "
                                  f"file but {tuple(own[k].shape)} in the model")
    model.load_state_dict(state)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own storage."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
