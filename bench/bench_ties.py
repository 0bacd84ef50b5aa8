"""How much does a trained EP-CNN's prediction move under an imperceptible input change? (docs/attacks.md)

The relaxation routes feedback through max-pool arg-maxes, and saturated states make exact ties on flat image
patches, so the prediction is only piecewise smooth. Two measurements, one JSON line each:
- `noise`: Gaussian noise of each --noise std on the first --n test images, the model as it predicts (its T and
  tol, fp32): how many predictions change, the largest and the median per-image largest logit change; the same
  for --baseline (a model without relaxation) when given.
- `jump`: one image (--image), fp64, a fixed number of steps (--steps, no tolerance stop): the largest state
  change per layer after 2 steps and after --steps when the image moves by 1e-14 along a random direction, and
  the one-sided difference quotient of the loss at h = 1e-4, 1e-6, 1e-8 against autograd's slope (a quotient
  that grows as 1/h is a jump, not a slope).

    python bench/bench_ties.py --store store --model ep-cnn-small --baseline cnn-small   # after `epcli demo`
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli.pipelines.common import dataset_for, load_model  # noqa: E402
from epcli.store import Store  # noqa: E402


def noise_line(net, x, noise: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = net(x)
        moved = net(x + noise * torch.randn(x.shape, generator=g))
    per_image = (moved - base).abs().amax(1)
    return {"changed": int((moved.argmax(1) != base.argmax(1)).sum()), "max_logit_change": float(per_image.max()),
            "median_logit_change": float(per_image.median())}


def jump_line(net, x, y, steps: int, seed: int) -> dict:
    net.double()
    net.T, net.tol = steps, None
    x = x.double()
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d /= d.norm()
    out = {}
    with torch.no_grad():
        for t in (net.min_steps(), steps):
            a, _ = net.relax(x, t)
            b, _ = net.relax(x + 1e-14 * d, t)
            out[f"state_change_after_{t}_steps"] = [float((p - q).abs().max()) for p, q in zip(a, b)]
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(xg), y), xg)
    with torch.no_grad():
        loss = float(F.cross_entropy(net(x), y))
        out["difference_quotients"] = {f"{h:g}": (float(F.cross_entropy(net(x + h * d), y)) - loss) / h
                                       for h in (1e-4, 1e-6, 1e-8)}
    out["autograd_slope"] = float((grad * d).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="store")
    p.add_argument("--model", default="ep-cnn-small", help="an EP-CNN: registry name, run id or checkpoint")
    p.add_argument("--baseline", default=None, help="a model without relaxation to compare with, e.g. cnn-small")
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--noise", type=float, nargs="+", default=[1e-7, 1e-4])
    p.add_argument("--image", type=int, default=2, help="test image for the jump measurement")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    store = Store(a.store)
    net, info = load_model(store, a.model, None, "cpu")
    if not callable(getattr(net, "relax", None)):
        p.error(f"{a.model} is not a relaxation model")
    ds = dataset_for(store, info, None, None)  # the data the model was trained on, as `epcli attack` reads it
    x = ds.test_x[:a.n].float() / 255
    common = {"model": a.model, "dataset": ds.name, "T": net.T, "tol": net.tol, "seed": a.seed,
              "date": _dt.date.today().isoformat(), "threads": torch.get_num_threads(),
              "command": " ".join(shlex.quote(s) for s in ["python", "bench/bench_ties.py", *(argv or sys.argv[1:])])}
    others = {a.baseline: load_model(store, a.baseline, None, "cpu")[0]} if a.baseline else {}
    for noise in a.noise:
        line = {"bench": "ties", "what": "noise", "noise_std": noise, "n": len(x), **common,
                **noise_line(net, x, noise, a.seed)}
        for name, other in others.items():
            line["baseline"] = {"model": name, **noise_line(other, x, noise, a.seed)}
        print(json.dumps(line), flush=True)
    i = a.image
    print(json.dumps({"bench": "ties", "what": "jump", "image": i, "steps": a.steps, "dtype": "fp64", **common,
                      "pixel_range": [int(ds.test_x[i].min()), int(ds.test_x[i].max())],
                      **jump_line(net, x[i:i + 1], ds.test_y[i:i + 1], a.steps, a.seed)}), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
