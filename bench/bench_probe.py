"""Accuracy probe: train a recipe for a fixed wall-clock budget, report the test accuracy it reached.

    python bench/bench_probe.py --model ep-cnn --recipe fast-ep --budget 180 --data ../shared/datasets/cifar10-jpeg.tar.xz
    python bench/bench_probe.py --model cnn --recipe fast-cnn --budget 180 --data ...
    python bench/bench_probe.py --model ep-cnn-tiny --recipe fast-ep --budget 10 --train 512 --test 200 \
        --set epochs=3 batch_size=32 ep.T1=8 ep.T2=3 optimizer.lrs=null      # CPU-sized

How the budget is kept without cutting a schedule short: the recipe's warm-up epochs run first (their learning
rates do not depend on the number of epochs); the last of them times an epoch (test pass included); then the
run continues, resumed exactly from its state, as the same recipe with `epochs` = the warm-up epochs plus as many
epochs of that length as still fit in the budget (never more than the recipe's own). The result is the run that
recipe with that epoch count gives, start to end, so its accuracy is a real data point for the recipe.

Prints one JSON line (device, date, command, torch, recipe, epochs, seconds, epoch_seconds, test_acc per epoch,
the final test accuracy); --save writes the final weights as an epcli checkpoint (bench_attacks --checkpoint).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli.data import Dataset, load_dataset, subset  # noqa: E402
from epcli.models import create_model  # noqa: E402
from epcli.train import fit, resolve_recipe  # noqa: E402


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def plan_epochs(recipe_epochs: int, warmup: int, elapsed: float, last_epoch: float, budget: float) -> int:
    """Epochs of the whole run: the warm-up ones, plus as many of `last_epoch` seconds as fit in what is left."""
    more = math.floor(max(0.0, budget - elapsed) / max(last_epoch, 1e-9))
    return max(warmup, min(recipe_epochs, warmup + more))


def warmup_epochs(recipe: dict) -> int:
    """Epochs whose learning rates do not depend on the epoch count: the warm-up (at least the first epoch)."""
    return min(int(recipe["epochs"]), max(1, math.ceil(float(recipe["schedule"].get("warmup_epochs") or 0))))


def train_planned(model, ds, recipe: dict, device, seed: int, on_epoch, decide):
    """Train the warm-up epochs, then `decide(history, elapsed seconds)` -> the run's epoch count, and continue
    (resumed exactly) as `recipe` with that many epochs. Returns (history, epochs)."""
    warmup, states = warmup_epochs(recipe), {}

    def keep(epoch, metrics, state):
        states["last"] = state
        if on_epoch is not None:
            on_epoch(epoch, metrics, state)

    t0 = time.perf_counter()
    hist = fit(model, ds, recipe, device=device, seed=seed, on_epoch=keep, max_epochs=warmup)
    planned = int(decide(hist, time.perf_counter() - t0))
    if planned > warmup:
        hist = fit(model, ds, {**recipe, "epochs": planned}, device=device, seed=seed, state=states["last"],
                   on_epoch=keep)
    return hist, max(planned, warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--budget", type=float, required=True, help="training seconds (test passes included)")
    p.add_argument("--data", default=None, help="dataset name or ImageFolder path/tar (default: the embedded set)")
    p.add_argument("--cache-dir", default=os.environ.get("EPCLI_CACHE"))
    p.add_argument("--train", type=int, default=None, help="use a class-balanced subset of N training images")
    p.add_argument("--test", type=int, default=None, help="use a subset of N test images")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (JSON values)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write the final weights here (safetensors checkpoint)")
    a = p.parse_args(argv)

    over = {}
    for item in a.set:
        key, _, text = item.partition("=")
        over[key] = _value(text)
    recipe = resolve_recipe(a.recipe, over)
    device = torch.device(a.device)
    t_load = time.perf_counter()
    ds = load_dataset(a.data, cache_dir=a.cache_dir)
    if a.train or a.test:
        tx, ty, _ = subset(ds.train_x, ds.train_y, a.train, seed=0) if a.train else (ds.train_x, ds.train_y, None)
        vx, vy, _ = subset(ds.test_x, ds.test_y, a.test, seed=0) if a.test else (ds.test_x, ds.test_y, None)
        ds = Dataset(ds.name + "-subset", ds.classes, tx, ty, vx, vy, source=ds.source, sha256=ds.sha256)
    load_s = time.perf_counter() - t_load
    torch.manual_seed(a.seed)
    model = create_model(a.model, ds.num_classes)

    epochs = int(recipe["epochs"])
    warmup = warmup_epochs(recipe)

    def keep(epoch, metrics, state):
        print(f"{a.recipe} epoch {epoch}: test {metrics['test_acc']:.4f} {metrics['seconds']:.1f}s", file=sys.stderr,
              flush=True)

    t0 = time.perf_counter()
    hist, planned = train_planned(model, ds, recipe, device, a.seed, keep, lambda h, elapsed: plan_epochs(
        epochs, warmup, elapsed, h[-1]["seconds"], a.budget))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if a.save:
        from epcli import checkpoint
        checkpoint.save(a.save, model.to("cpu"), meta={"recipe": a.recipe, "epochs": planned,
                                                       "test_acc": hist[-1]["test_acc"]})
    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(json.dumps({
        "bench": "probe", "model": a.model, "recipe": a.recipe, "overrides": over, "budget_s": a.budget,
        "device": card, "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv]),
        "dataset": ds.name, "n_train": len(ds.train_y), "n_test": len(ds.test_y), "load_seconds": round(load_s, 2),
        "recipe_epochs": epochs, "warmup_epochs": warmup, "epochs": len(hist), "seconds": round(seconds, 2),
        "epoch_seconds": [round(h["seconds"], 2) for h in hist], "test_accs": [round(h["test_acc"], 4) for h in hist],
        "test_acc": hist[-1]["test_acc"], "amp": bool(recipe.get("amp")), "compile": bool(recipe.get("compile")),
        "ep": recipe.get("ep"),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
