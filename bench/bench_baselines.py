"""Baseline training benchmarks: the paper's CNN, the ViT and the L2 PGD-AT CNN (eps 0.5) on full CIFAR-10.

One JSON line per job on stdout (device, date, command, recipe, epochs, seconds, clean test accuracy);
per-epoch progress on stderr.

    python bench/bench_baselines.py                                  # paper recipes, the shared CIFAR-10 tar
    python bench/bench_baselines.py --preset fast                    # fast-cnn / fast-vit (10-minute guesses)
    python bench/bench_baselines.py --jobs cnn --epochs 5 --data /path/to/cifar10-jpeg.tar.xz
    python bench/bench_baselines.py --smoke                          # tiny CPU run on the embedded set

Runs unchanged on a GPU (it picks cuda when there is one); --smoke trains a few hundred embedded images for
one short epoch with the same code path. Timings include the per-epoch test pass.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time

import torch

from epcli.data import Dataset, load_dataset, subset
from epcli.models import create_model
from epcli.train import fit, resolve_recipe

DEFAULT_DATA = "/work/shared/datasets/cifar10-jpeg.tar.xz"

# job -> (model, recipe for --preset paper, recipe for --preset fast, recipe overrides)
JOBS = {
    "cnn": ("cnn", "paper-cnn", "fast-cnn", {}),
    "vit": ("vit", "vit", "fast-vit", {}),
    "cnn-at": ("cnn", "paper-cnn-at", "paper-cnn-at", {"adv": {"eps": 0.5}}),
}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help=f"dataset name or ImageFolder path/tar (default {DEFAULT_DATA})")
    p.add_argument("--cache-dir", default=os.environ.get("EPCLI_CACHE", os.path.expanduser("~/.cache/epcli")),
                   help="where the decoded dataset is cached (decoding the 60k-JPEG tar takes a while)")
    p.add_argument("--jobs", nargs="*", choices=list(JOBS), default=list(JOBS))
    p.add_argument("--preset", choices=["paper", "fast"], default="paper")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epoch count")
    p.add_argument("--adv-eps", type=float, default=0.5, help="L2 budget of the cnn-at job")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run: embedded set, 256 images, one epoch")
    p.add_argument("--smoke-images", type=int, nargs=2, default=[256, 200], metavar=("TRAIN", "TEST"),
                   help="--smoke: how many train and test images")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    data_arg = args.data or (None if args.smoke else DEFAULT_DATA)
    t_load = time.perf_counter()
    ds = load_dataset(data_arg, cache_dir=args.cache_dir)
    if args.smoke:
        tx, ty, _ = subset(ds.train_x, ds.train_y, args.smoke_images[0], seed=0)
        vx, vy, _ = subset(ds.test_x, ds.test_y, args.smoke_images[1], seed=0)
        ds = Dataset(ds.name + "-smoke", ds.classes, tx, ty, vx, vy, source=ds.source, sha256=ds.sha256)
    print(f"data {ds.name}: {len(ds.train_y)} train / {len(ds.test_y)} test, loaded in "
          f"{time.perf_counter() - t_load:.1f}s", file=sys.stderr)

    for job in args.jobs:
        model_name, paper, fast, over = JOBS[job]
        recipe_name = paper if args.preset == "paper" else fast
        over = json.loads(json.dumps(over))
        if job == "cnn-at":
            over["adv"]["eps"] = args.adv_eps
        if args.epochs is not None:
            over["epochs"] = args.epochs
        if args.smoke:
            over.update({"epochs": 1, "batch_size": 64, "compile": False})
            if job == "cnn-at":
                over["adv"]["steps"] = 2
        recipe = resolve_recipe(recipe_name, over)
        torch.manual_seed(args.seed)
        model = create_model(model_name, ds.num_classes)

        def on_epoch(epoch, m, state, job=job):
            print(f"{job} epoch {epoch}/{recipe['epochs']}: loss {m['train_loss']:.4f} train {m['train_acc']:.4f} "
                  f"test {m['test_acc']:.4f} lr {m['lr']:.3g} {m['seconds']:.1f}s", file=sys.stderr, flush=True)

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        hist = fit(model, ds, recipe, device=device, seed=args.seed, on_epoch=on_epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        print(json.dumps({
            "bench": "baselines", "job": job, "model": model_name, "recipe": recipe_name,
            "device": _device_name(device), "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "dataset": ds.name, "n_train": len(ds.train_y), "n_test": len(ds.test_y),
            "epochs": len(hist), "seconds": round(seconds, 2),
            "train_seconds": round(sum(h["seconds"] for h in hist), 2),
            "clean_acc": hist[-1]["test_acc"], "best_acc": max(h["test_acc"] for h in hist),
            "adv": recipe["adv"], "smoke": args.smoke,
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
