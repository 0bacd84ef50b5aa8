"""Data-parallel glue over torch.distributed, for runs launched by `torchrun` (one process per GPU or CPU slot).

Outside torchrun (no WORLD_SIZE > 1 in the environment) every helper is a cheap no-op: rank 0 of a world of 1.
Under torchrun, `init(device)` joins the process group once (NCCL for a CUDA device, gloo otherwise), pins
the process to `cuda:LOCAL_RANK`, and leaves the group again at exit. See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys

import torch
import torch.distributed as dist

__all__ = ["launched", "init", "is_initialized", "rank", "world_size", "local_rank", "is_main", "device_for",
           "shard_range", "all_reduce_mean_", "all_reduce_sum_", "broadcast_", "broadcast_object",
           "all_gather_object", "gather_object", "barrier", "cleanup", "timeout_s"]

BUCKET_ELEMENTS = 1 << 24  # at most 16M elements (64 MB of fp32) flattened per all_reduce
DEFAULT_TIMEOUT_S = 6 * 3600  # a collective may wait this long for the slowest rank (one attack chunk can take an hour)


def timeout_s() -> float:
    """How long a collective waits for the other ranks: EPCLI_DIST_TIMEOUT_S, default 6 hours.

    Sharded evaluation gathers after each round of chunks, and a rank with nothing left to do in the last
    round waits there for the others; PyTorch's default (10-30 minutes) is shorter than one AutoAttack chunk of
    a full-size EP-CNN. A rank that dies does not make the others wait: torchrun stops them.
    """
    raw = os.environ.get("EPCLI_DIST_TIMEOUT_S", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def launched() -> bool:
    """True when torchrun started this process as one of several (RANK and WORLD_SIZE > 1 are set)."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """Under torchrun every CUDA request means this process's own GPU, cuda:LOCAL_RANK; cpu stays cpu."""
    if launched() and str(device).startswith("cuda"):
        return f"cuda:{local_rank()}"
    return str(device)


def init(device: str | torch.device | None = None) -> bool:
    """Join the torchrun process group (once); False when not launched by torchrun with several processes.

    The backend follows the training device: NCCL for CUDA (after `torch.cuda.set_device(LOCAL_RANK)`),
    gloo for the CPU.
    """
    if not launched():
        return False
    if is_initialized():
        return True
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device_for(str(device)))
    kwargs = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds NCCL to this GPU (no guessing in barrier)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s()), **kwargs)
    atexit.register(cleanup)
    if sys.platform != "win32":
        try:  # torchrun stops the other workers with SIGTERM when one fails: unwind so the store marks the run
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            pass
    return True


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum} (another rank failed or torchrun was stopped)")


def cleanup() -> None:
    """Leave the process group (idempotent)."""
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group at exit must not mask the real error
            pass


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous share of n items: disjoint, covering, sizes differ by at most 1."""
    r = rank() if rank_ is None else int(rank_)
    w = world_size() if world is None else int(world)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    return n * r // w, n * (r + 1) // w


def _buckets(tensors: list[torch.Tensor]):
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        bucket, size = [], 0
        for t in ts:
            if bucket and size + t.numel() > BUCKET_ELEMENTS:
                yield bucket
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            yield bucket


def _all_reduce_(tensors: list[torch.Tensor], mean: bool) -> list[torch.Tensor]:
    if not is_initialized() or world_size() == 1:
        return tensors
    for bucket in _buckets([t for t in tensors if t.numel()]):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if mean:
            flat.div_(world_size())
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return tensors


def all_reduce_mean_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Replace every tensor by its mean over the ranks, in place, one flattened all_reduce per bucket."""
    return _all_reduce_(list(tensors), mean=True)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Replace every tensor by its sum over the ranks, in place."""
    return _all_reduce_(list(tensors), mean=False)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor with rank `src`'s values, in place."""
    if not is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for bucket in _buckets([t for t in tensors if t.numel()]):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast_object(obj=None, src: int = 0):
    """Rank `src`'s picklable object, on every rank (tensors inside should be on the CPU)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list | None:
    """Every rank's picklable object, in rank order, on rank `dst` (None on the others)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()
