"""Benchmark the EP core: training s/epoch (T1, T2, β, batch) and inference images/s (T and converged T).

Prints first a "run" line (the exact command, the device, torch and thread count), then one JSON line per
measurement: device, date, command, what, value, unit and the settings.
GPU: `python bench/bench_ep.py` (the paper net, batch 128, T1=250, T2=30, β=0.5; add --dtype fp16 --compile).
CPU: `python bench/bench_ep.py --small` (ep-cnn-small, short phases, a few batches).
Random weights and random images: the step cost does not depend on them, but the *converged* T does
(a trained net needs more steps than a random one), so that line is a lower bound on steps.
"""

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epcli.ep import EPCNN  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized run: ep-cnn-small, T1=30, T2=10, batch 64")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--T1", type=int, default=None)
    p.add_argument("--T2", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--rule", default="symmetric")
    p.add_argument("--update", choices=["sync", "alternate"], default=None,
                   help="relaxation: synchronous (the paper) or alternating even/odd sweeps (default: the preset's)")
    p.add_argument("--iters", type=int, default=None, help="timed training batches (after 1 warm-up)")
    p.add_argument("--epoch-images", type=int, default=None, help="images per epoch (50k; 5k with --small)")
    p.add_argument("--tol", type=float, default=1e-3, help="convergence tolerance for the converged-T line")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="relaxation precision (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the relaxation step (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a shared box)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    small = a.small
    preset = a.preset or ("ep-cnn-small" if small else "ep-cnn")
    B = a.batch or (64 if small else 128)
    T1, T2 = a.T1 or (30 if small else 250), a.T2 or (10 if small else 30)
    iters = a.iters or (3 if small else 20)
    epoch_images = a.epoch_images or (5000 if small else 50000)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = EPCNN.preset(preset, **({"update": a.update} if a.update else {})).to(dev)
    model.accelerate(DTYPES[a.dtype], channels_last=True, compile=a.compile)  # no-op on CPU
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    command = " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv])
    base = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=command, torch=torch.__version__, preset=preset, batch=B,
                dtype=a.dtype, compile=a.compile, update=model.update)

    def emit(**kw):
        print(json.dumps({**base, **kw}), flush=True)

    emit(what="run", cuda=torch.version.cuda, threads=torch.get_num_threads(), cpu=platform.processor() or None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    x = torch.rand(B, 3, 32, 32, device=dev)
    y = torch.randint(0, model.num_classes, (B,), device=dev)
    model.ep_train_step(x, y, T1, T2, a.beta, a.rule)  # warm-up (cudnn autotune, compile)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        model.ep_train_step(x, y, T1, T2, a.beta, a.rule)
    sync()
    per_batch = (time.perf_counter() - t) / iters
    emit(what="train", value=round(per_batch * math.ceil(epoch_images / B), 2), unit="s/epoch",
         s_per_batch=round(per_batch, 4), T1=T1, T2=T2, beta=a.beta, rule=a.rule, epoch_images=epoch_images,
         note="training only (no test pass, no data loading)")

    with torch.no_grad():
        _, conv_T = model.relax(x, max(T1, 250), tol=a.tol)
        for T in (T1, conv_T):
            model(x, T=T)
            sync()
            t = time.perf_counter()
            for _ in range(max(1, iters // 2)):
                model(x, T=T)
            sync()
            dt = (time.perf_counter() - t) / max(1, iters // 2)
            emit(what="inference", value=round(B / dt, 1), unit="images/s", T=T,
                 converged=(T == conv_T), tol=a.tol if T == conv_T else None)


if __name__ == "__main__":
    main()
