"""Benchmark: generate all 19 corruptions x 5 severities over the CIFAR-10 test set; optionally evaluate a model.

Prints one JSON line per (corruption, severity) and a summary line: seconds, images/s, device, date, command.
Runs unchanged on a GPU (--device cuda) or the CPU.

    python bench/bench_corruptions.py                       # all 19 x 5 on the 10,000 test images, CPU
    python bench/bench_corruptions.py --n 1000 --device cuda
    python bench/bench_corruptions.py --model cnn           # also evaluate an (untrained) registry model
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli import corruptions as C  # noqa: E402
from epcli.data import load_dataset  # noqa: E402

DEFAULT_DATA = "/work/shared/datasets/cifar10-jpeg.tar.xz"


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset name or path (load_dataset)")
    ap.add_argument("--n", type=int, default=None, help="use the first N test images (default: all)")
    ap.add_argument("--names", default=",".join(C.CORRUPTIONS))
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="also evaluate this models.create_model name (untrained)")
    args = ap.parse_args()

    names = [s for s in args.names.split(",") if s]
    sevs = [int(s) for s in args.severities.split(",")]
    d = load_dataset(args.data, cache_dir=os.environ.get("EPCLI_CACHE"))  # decoded once per machine
    x, y = d.test_x, d.test_y
    if args.n:
        x, y = x[:args.n], y[:args.n]
    n = x.shape[0]
    common = {"device": device_name(args.device), "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in sys.argv), "torch": torch.__version__, "n": n}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # warm-up: caches (zoom operators, frost bank, kernels) and the device
    for name in names:
        C.corrupt_range(x, name, 1, args.seed, 0, min(n, C.CHUNK), args.device)
    sync()
    total_t, total_imgs = 0.0, 0
    per_name = {}
    for name in names:
        for sev in sevs:
            t0 = time.perf_counter()
            for s in range(0, n, args.batch_size):
                out = C.corrupt_range(x, name, sev, args.seed, s, min(s + args.batch_size, n), args.device)
            sync()
            dt_s = time.perf_counter() - t0
            total_t += dt_s
            total_imgs += n
            per_name[name] = per_name.get(name, 0.0) + dt_s
            print(json.dumps({"corruption": name, "severity": sev, "seconds": round(dt_s, 3),
                              "images_per_s": round(n / dt_s, 1), **common}), flush=True)
            del out
    summary = {"summary": "generate", "cells": len(names) * len(sevs), "images": total_imgs,
               "seconds": round(total_t, 2), "images_per_s": round(total_imgs / total_t, 1),
               "seconds_per_corruption": {k: round(v, 2) for k, v in per_name.items()}, **common}
    print(json.dumps(summary), flush=True)

    if args.model:
        from epcli.models import create_model

        model = create_model(args.model, num_classes=d.num_classes).to(args.device).eval()
        res = C.evaluate(model, x, y, names=names, severities=sevs, seed=args.seed, batch_size=args.batch_size,
                         device=args.device)
        s = C.summarize(res)
        print(json.dumps({"summary": "evaluate", "model": args.model, "seconds": round(res["seconds"], 2),
                          "images_per_s": round(n * (1 + len(names) * len(sevs)) / res["seconds"], 1),
                          "clean_accuracy": s["clean_accuracy"], "mean_accuracy_all": s["mean_accuracy_all"],
                          **common}), flush=True)


if __name__ == "__main__":
    main()
