"""Checkpoints as safetensors files that say what they are.

Tensors: `model.<name>` for the model's state_dict, `train.<name>` for the resumable training state
(optimiser, scheduler, RNG). `__metadata__` (a string map) carries the format, the run id, the model spec
(JSON), the config hash, the epoch, the dataset and its classes, so a stray file can be rebuilt and traced.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

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
    """The decoded `__metadata__` of a checkpoint (JSON values parsed), checked for the fields epcli reads."""
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a .safetensors file") from None
    except Exception as e:  # safetensors raises several types for a damaged header
        raise CheckpointError(f"{path} is not a safetensors checkpoint ({_one_line(e)})") from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an epcli checkpoint (no '{FORMAT}' "
                              "metadata)")
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except ValueError:
            meta[k] = v
    _check_metadata(meta, path)
    return meta


def _check_metadata(meta: dict, path) -> None:
    """Metadata comes from a file anyone can write: the fields epcli uses must have their types."""
    spec = meta.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError(f"{path}: checkpoint metadata has no valid model spec (a JSON object with a "
                              "'name')")
    if len(json.dumps(spec)) > 100_000:
        raise CheckpointError(f"{path}: the model spec in the checkpoint metadata is implausibly large")
    for k in ("num_classes", "epoch"):
        for where, v in (("metadata", meta.get(k)), ("spec", spec.get(k))):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1_000_000):
                raise CheckpointError(f"{path}: {k} in the checkpoint {where} must be a small non-negative "
                                      f"integer, got {v!r:.60}")
    for k in ("config", "train_state"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            raise CheckpointError(f"{path}: {k} in the checkpoint metadata must be a JSON object")
    if meta.get("classes") is not None and not (isinstance(meta["classes"], list)
                                                and all(isinstance(c, str) for c in meta["classes"])):
        raise CheckpointError(f"{path}: classes in the checkpoint metadata must be a list of names")


def load(path: str | os.PathLike, *, expected_spec: dict | None = None, device: str = "cpu",
         with_train_state: bool = False):
    """Rebuild the model from the file's spec and load its weights.

    Returns (model, meta) or, with `with_train_state`, (model, meta, train_tensors). A spec or shapes that do
    not match `expected_spec` is a CheckpointError, never a silent partial load. The spec is untrusted: the
    model it describes may allocate at most about what the file's own tensors hold.
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
    model_sd, train = {}, {}
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            keys = list(f.keys())
            file_numel = sum(math.prod(f.get_slice(k).get_shape()) for k in keys if k.startswith("model."))
            budget = _AllocationBudget(2 * file_numel + (1 << 20), str(path))
            try:
                with budget:
                    model = build_from_spec(spec)
            except CheckpointError:
                raise
            except EpcliError as e:
                raise CheckpointError(f"checkpoint {path}: cannot rebuild its model: {e}") from None
            except Exception as e:  # a spec that the model constructors reject in their own way
                raise CheckpointError(f"checkpoint {path}: cannot rebuild its model from the spec in its "
                                      f"metadata ({type(e).__name__}: {_one_line(e)})") from None
            for k in keys:
                if k.startswith("model."):
                    model_sd[k[6:]] = f.get_tensor(k)
                elif k.startswith("train.") and with_train_state:
                    train[k[6:]] = f.get_tensor(k)
    except EpcliError:
        raise
    except Exception as e:  # damaged tensor data
        raise CheckpointError(f"{path}: cannot read the checkpoint's tensors ({_one_line(e)})") from None
    load_state(model, model_sd, str(path))
    model.to(device).eval()
    return (model, meta, train) if with_train_state else (model, meta)


class _AllocationBudget(TorchFunctionMode):
    """Counts the elements that tensor factories are asked for while a model is built from an untrusted spec,
    and stops the build (CheckpointError) before it asks for more than `limit`."""

    FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full, torch.empty_strided,
                 torch.randint)

    def __init__(self, limit: int, where: str):
        super().__init__()
        self.limit, self.where, self.total = limit, where, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES:
            size = kwargs.get("size")
            if size is None:
                if func is torch.randint:
                    size = next((a for a in args if isinstance(a, (tuple, list, torch.Size))), ())
                elif args and isinstance(args[0], (tuple, list, torch.Size)):
                    size = args[0]
                else:
                    size = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            try:
                self.total += math.prod(int(v) for v in size)
            except (TypeError, ValueError):
                pass
            if self.total > self.limit:
                raise CheckpointError(f"checkpoint {self.where}: the model spec in its metadata asks for more "
                                      f"than {self.limit:,} parameters, far more than the file holds; refusing "
                                      "to build it")
        return func(*args, **kwargs)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


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
