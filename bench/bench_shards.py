"""Sharded evaluation benchmark: `epcli attack` / `epcli corrupt` under torchrun with 1, 2, ... processes.

One JSON line per (command, process count) on stdout: images/s, the run's seconds (from its start to its end in
the store: evaluation, checks and store writes, without process start-up), wall seconds including torchrun's
start-up, the work each rank did (chunks and forward passes, from the run), and whether the per-example outcomes
are identical to the 1-process run's (they must be).

    python bench/bench_shards.py --smoke                                  # CPU: trains a cnn-small first
    python bench/bench_shards.py --store runs/ --model ep-cnn --nproc 1,2,4,8 --device cuda --n 2000
    python bench/bench_shards.py --store runs/ --model cnn --corrupt --nproc 1,2 --device cpu

On the CPU every process is one thread (torchrun's OMP_NUM_THREADS=1, also for 1 process), so N processes use
N cores: run it on a machine with at least max(--nproc) idle cores, or the numbers measure contention. On CUDA,
process i uses GPU i: --nproc must not exceed the number of GPUs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def _launch(nproc: int, store: str, command: list[str], device: str) -> tuple[dict, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "epcli", "--quiet", "--store", store, "--", *command, "--device", device, "--json"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout), wall


def _outcome_digest(store: str, run_id: str) -> str:
    from safetensors.torch import load_file

    from epcli.store import Store
    s = Store(store)
    arts = s.artifacts_of(run_id, role="output", kind="per-example")
    tensors = load_file(str(s.artifact_path(arts[0]["sha256"])))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _smoke_store() -> tuple[str, str]:
    from epcli import api
    from epcli.store import Store
    root = tempfile.mkdtemp(prefix="epcli-bench-shards-")
    store = Store(root)
    run = api.train(model="cnn-small", store=store, device="cpu", overrides={"epochs": 1})
    return root, run["run_id"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", help="a store holding the model (with --model)")
    p.add_argument("--model", help="model reference: name, run id or checkpoint path")
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts (first one is the baseline)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--n", type=int, default=256, help="test images")
    p.add_argument("--attack", default="pgd")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eps", default="8/255")
    p.add_argument("--chunk", type=int, default=32, help="images per chunk (the unit a process attacks)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--corrupt", action="store_true", help="benchmark `epcli corrupt` instead of `epcli attack`")
    p.add_argument("--corruptions", default="gaussian_noise,fog,contrast,jpeg_compression")
    p.add_argument("--smoke", action="store_true", help="train a cnn-small in a temporary store first (CPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.store, args.model = _smoke_store()
        args.steps = args.steps or 5
    if not (args.store and args.model):
        p.error("give --store and --model, or --smoke")
    counts = [int(v) for v in args.nproc.split(",") if v.strip()]
    if args.corrupt:
        command = ["corrupt", "-m", args.model, "--n", str(args.n), "-s", "3", "-s", "5"]
        for c in args.corruptions.split(","):
            command += ["-c", c]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
    else:
        command = ["attack", "-m", args.model, "-a", args.attack, "--n", str(args.n), "--eps", args.eps,
                   "--chunk", str(args.chunk), "--no-strength-check"]
        if args.steps:
            command += ["--steps", str(args.steps)]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
    base_digest, base_seconds = None, None
    for nproc in counts:
        res, wall = _launch(nproc, args.store, command, args.device)
        from epcli.store import Store
        run = Store(args.store).get_run(res["run_id"])
        seconds = (_dt.datetime.fromisoformat(run["ended_at"]) -
                   _dt.datetime.fromisoformat(run["started_at"])).total_seconds()
        digest = _outcome_digest(args.store, res["run_id"])
        base_digest = base_digest or digest
        base_seconds = base_seconds or seconds
        line = {"bench": "shards", "command": " ".join(command), "device": args.device, "nproc": nproc,
                "n_images": res.get("n_examples"), "seconds": round(seconds, 3), "wall_seconds": round(wall, 3),
                "images_per_s": round(res.get("n_examples", args.n) / seconds, 2) if seconds else None,
                # corrupt: every image is evaluated clean and in every cell
                **({"cells": len(res.get("cells") or []), "image_evaluations_per_s": round(
                    res.get("n_examples", args.n) * (1 + len(res.get("cells") or [])) / seconds, 2)}
                   if args.corrupt and seconds else {}),
                "speedup_vs_first": round(base_seconds / seconds, 3) if seconds else None,
                "shards": (run.get("summary") or {}).get("shards"), "identical_to_first": digest == base_digest,
                "run_id": res["run_id"], "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
