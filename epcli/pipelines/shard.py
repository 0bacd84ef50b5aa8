"""Evaluation sharded over torchrun processes: attacks by whole chunks, corruptions by whole batches.

Outside torchrun (a world of 1) every entry point here is the plain one-process computation. Under torchrun,
rank 0 runs the pipeline as usual (store, model, data, checks, artifacts: it alone touches the store) and, at
each evaluation, broadcasts a job: the model's spec and weights, the selected images and the arguments. Every
rank evaluates its share of the job and rank 0 gathers the per-example outcomes in global order. A share is a
whole unit of the one-process computation (an attack chunk, a corruption batch) whose outcome depends only on
its images, the batch size and the run seed, never on the number of processes: the results are those of one
process. Ranks > 0 wait in `serve` for jobs until rank 0's `finish`. See docs/distributed.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from epcli import distributed as dist


def sharded() -> bool:
    """True inside a torchrun process group of several processes."""
    return dist.is_initialized() and dist.world_size() > 1


def worker(device: str) -> bool:
    """Join the torchrun process group (if launched by torchrun); True on ranks > 0, which then `serve`."""
    return dist.init(device) and not dist.is_main()


def serve(device: str):
    """Rank > 0: evaluate the share of every job rank 0 broadcasts; return rank 0's result (from `finish`)."""
    handlers = {"attack": _attack_job, "corrupt": _corrupt_job, "official": _official_job}
    while True:
        job = dist.broadcast_object(None)
        if job["kind"] == "done":
            return job["result"]
        handlers[job["kind"]](job, device)


def finish(result):
    """Rank 0: release the waiting ranks with the command's result (a no-op outside torchrun); returns it."""
    if sharded() and dist.is_main():
        dist.broadcast_object({"kind": "done", "result": result})
    return result


# --- models travel as spec + weights ----------------------------------------------------------------------

def _model_message(net: torch.nn.Module | None) -> dict | None:
    if net is None:
        return None
    return {"spec": net.spec, "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "T": getattr(net, "T", None)}


def _rebuild(message: dict | None, device: str) -> torch.nn.Module | None:
    """The model rank 0 sent, on this rank's device, in eval mode (as checkpoint.load leaves it)."""
    if message is None:
        return None
    from epcli.checkpoint import load_state
    from epcli.models import build_from_spec
    net = build_from_spec(message["spec"])
    load_state(net, message["state"], "the model rank 0 sent")
    if message["T"] is not None:
        net.T = int(message["T"])
    return net.to(device).eval()


# --- attacks: whole chunks, in rounds of one chunk per rank ----------------------------------------------

def attack_in_chunks(net, x, y, *, chunk: int, partial: Path, progress, task: str, seed: int, **kw) -> dict:
    """Rank 0's side of pipelines.attack._attack_in_chunks under torchrun.

    Chunks already in `partial` (an interrupted run) are loaded; the others are handed out in rounds, chunk
    pending[i] to rank i % world, and after each round rank 0 gathers the outcomes and writes their chunk
    files, so an interruption loses at most the round in flight. Returns the merged one-process result plus
    "shards": how many chunks and forward passes each rank did.
    """
    from safetensors.torch import load_file, save_file

    from epcli.pipelines.attack import _chunk_file, _chunks, _load_chunk, _merge_chunks, _save_chunk
    from epcli.pipelines.common import eps_label
    partial.mkdir(parents=True, exist_ok=True)
    bounds = _chunks(len(y), chunk)
    parts: dict[int, dict] = {}
    for k in range(len(bounds)):
        if _chunk_file(partial, k).exists():
            parts[k] = _load_chunk(_chunk_file(partial, k), load_file)
    pending = [k for k in range(len(bounds)) if k not in parts]
    surrogate, device = kw.pop("surrogate", None), kw.pop("device")
    job = {"kind": "attack", "chunk": chunk, "seed": seed, "pending": pending, "kw": kw, "n": len(y)}
    if pending:
        job.update(model=_model_message(net), surrogate=_model_message(surrogate), x=x.cpu(), y=y.cpu())
    dist.broadcast_object(job)
    world = dist.world_size()
    work = {"world_size": world, "chunks": [0] * world, "forward_passes": [0] * world, "resumed_chunks": len(parts)}
    # progress: one task per eps in images, as in one process; it moves when a round's outcomes arrive, and in
    # between with rank 0's own chunk, scaled by the world size (the ranks advance at about the same pace)
    names = {e: task.format(eps=eps_label(e)) for e in kw["eps_list"]}
    robust = {e: sum(int(r["robust"][e].sum()) for r in parts.values()) for e in kw["eps_list"]}
    total, done = len(y), sum(bounds[k][1] - bounds[k][0] for k in parts)
    shown = {e: done for e in kw["eps_list"]}  # counts shown: they never go back (a stage would restart)

    def show(e: float, count: float, info: dict) -> None:
        shown[e] = max(shown[e], count)
        progress(names[e], shown[e], total, info)

    for e in kw["eps_list"]:
        show(e, done, {"robust_acc": robust[e] / done if done else None})

    def on_step(info: dict) -> None:
        ahead = world * (info["lo"] + info["fraction"] * (info["hi"] - info["lo"]))
        # an estimate, kept below the end of the round in flight (the last round may have fewer chunks than
        # ranks, a chunk fewer images): only the round's outcomes, gathered, complete it
        in_flight = [k for k in pending if k not in parts][:world]
        end = done + sum(bounds[k][1] - bounds[k][0] for k in in_flight)
        show(info["eps"], min(done + ahead, end - 1), {"ranks": world, "_eta_bound": not info.get("exact", True)})

    def on_result(rank: int, k: int, r: dict) -> None:
        nonlocal done
        _save_chunk(_chunk_file(partial, k), r, save_file)
        parts[k] = r
        work["chunks"][rank] += 1
        work["forward_passes"][rank] += int(r.get("forward_passes") or 0)
        done += bounds[k][1] - bounds[k][0]
        for e in kw["eps_list"]:
            robust[e] += int(r["robust"][e].sum())
            show(e, done, {"robust_acc": robust[e] / done if done else None, "ranks": world})

    _attack_rounds(net, surrogate, x, y, job, device, on_step=on_step, on_result=on_result)
    merged = _merge_chunks([parts[k] for k in range(len(bounds))])
    merged["shards"] = work
    return merged


def _attack_job(job: dict, device: str) -> None:
    if not job["pending"]:
        return
    net, surrogate = _rebuild(job["model"], device), _rebuild(job["surrogate"], device)
    _attack_rounds(net, surrogate, job["x"], job["y"], job, device)


def _attack_rounds(net, surrogate, x, y, job: dict, device: str, on_step=None, on_result=None) -> None:
    """Every rank: attack chunk pending[i] when i % world is this rank; rank 0 gets each round's outcomes."""
    from epcli.pipelines.attack import _attack_chunk, _chunks
    bounds = _chunks(job["n"], job["chunk"])
    world, me, pending = dist.world_size(), dist.rank(), job["pending"]
    kw = {**job["kw"], "device": device, "surrogate": surrogate}
    for i in range(0, len(pending), world):
        turn = pending[i:i + world]
        k = turn[me] if me < len(turn) else None
        out = None
        if k is not None:
            out = _attack_chunk(net, x, y, k, bounds[k], seed=job["seed"], on_step=on_step, **kw)
            out = {key: _to_cpu(v) for key, v in out.items()}
        gathered = dist.gather_object((k, out))
        if gathered is not None and on_result is not None:
            for rank, (k_r, out_r) in enumerate(gathered):
                if k_r is not None:
                    on_result(rank, k_r, out_r)


def _to_cpu(v):
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(t) for k, t in v.items()}
    return v


# --- corruptions: whole batches of the set (generated), whole corruptions (official files) ---------------

def batch_span(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous run of whole batches (the batches one process would form)."""
    n_batches = -(-n // batch_size)
    b_lo, b_hi = dist.shard_range(n_batches, rank, world)
    return min(b_lo * batch_size, n), min(b_hi * batch_size, n)


def evaluate_corruptions(net, x, y, *, names, severities, seed: int, batch_size: int, device: str,
                         on_batch=None) -> dict:
    """corruptions.evaluate; under torchrun every rank evaluates every cell on its span of whole batches."""
    from epcli import corruptions as C
    if not sharded():
        return C.evaluate(net, x, y, names=names, severities=severities, seed=seed, batch_size=batch_size,
                          device=device, on_batch=on_batch)
    t0 = time.perf_counter()
    job = {"kind": "corrupt", "model": _model_message(net), "x": x.cpu(), "y": torch.as_tensor(y).cpu(),
           "names": list(names), "severities": list(severities), "seed": seed, "batch_size": batch_size}
    dist.broadcast_object(job)
    gathered = _corrupt_share(net, job, device, on_batch)
    n = len(job["y"])
    out = {"clean_correct": torch.zeros(n, dtype=torch.bool), "correct": {}}
    for name in job["names"]:
        for sev in job["severities"]:
            out["correct"][(name, sev)] = torch.zeros(n, dtype=torch.bool)
    for (lo, hi), clean, correct in gathered:
        out["clean_correct"][lo:hi] = clean
        for cell, ok in correct.items():
            out["correct"][cell][lo:hi] = ok
    out["seconds"] = time.perf_counter() - t0
    out["shards"] = {"world_size": dist.world_size(), "examples": [hi - lo for (lo, hi), _, _ in gathered]}
    return out


def _corrupt_job(job: dict, device: str) -> None:
    _corrupt_share(_rebuild(job["model"], device), job, device, None)


def _corrupt_share(net, job: dict, device: str, on_batch):
    from epcli import corruptions as C
    lo, hi = batch_span(len(job["y"]), job["batch_size"], dist.rank(), dist.world_size())
    res = C.evaluate(net, job["x"], job["y"], names=job["names"], severities=job["severities"], seed=job["seed"],
                     batch_size=job["batch_size"], device=device, on_batch=on_batch, span=(lo, hi))
    mine = ((lo, hi), res["clean_correct"][lo:hi].clone(), {c: v[lo:hi].clone() for c, v in res["correct"].items()})
    return dist.gather_object(mine)


def evaluate_official(net, source, *, names, severities, batch_size: int, device: str, on_batch=None,
                      clean=None, n: int | None = None) -> dict:
    """corruptions.evaluate_official; under torchrun corruption i is read and evaluated by rank i % world
    (each file's batches are those of one process), rank 0 also scores the clean images."""
    from epcli import corruptions as C
    if not sharded():
        return C.evaluate_official(net, source, names=names, severities=severities, batch_size=batch_size,
                                   device=device, on_batch=on_batch, clean=clean, n=n)
    t0 = time.perf_counter()
    job = {"kind": "official", "model": _model_message(net), "source": str(Path(source).resolve()),
           "names": list(names), "severities": list(severities), "batch_size": batch_size, "n": n}
    dist.broadcast_object(job)
    gathered = _official_share(net, job, device, on_batch, clean)
    by_cell = {}
    for part in gathered:
        by_cell.update(part["correct"])
    out = dict(gathered[0])
    out["correct"] = {(c, s): by_cell[(c, s)] for c in job["names"] for s in job["severities"] if (c, s) in by_cell}
    out["seconds"] = time.perf_counter() - t0
    per_rank = [len(part["correct"]) // max(len(job["severities"]), 1) for part in gathered]
    out["shards"] = {"world_size": dist.world_size(), "corruptions": per_rank}
    return out


def _official_job(job: dict, device: str) -> None:
    _official_share(_rebuild(job["model"], device), job, device, None, None)


def _official_share(net, job: dict, device: str, on_batch, clean):
    from epcli import corruptions as C
    mine = job["names"][dist.rank()::dist.world_size()]  # may be empty: more ranks than corruptions
    res = C.evaluate_official(net, job["source"], names=mine, severities=job["severities"],
                              batch_size=job["batch_size"], device=device, on_batch=on_batch, clean=clean,
                              n=job["n"])
    return dist.gather_object(res)
