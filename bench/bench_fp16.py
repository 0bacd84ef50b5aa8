"""Does the fp16 relaxation keep the EP update? Cosine, per layer, of the symmetric EP weight update computed with
fp16 states (`EPCNN.accelerate`) against the same update with fp32 states (TF32 off), same weights and images.

The bar (issue 16): >= 0.99 on every layer, or fp16 must be refused for that layer/preset. One JSON line per
preset: the cosines per layer (conv1 ... read-out) and their minimum.

    python bench/bench_fp16.py                                   # the paper net, T1=250, T2=30, β=0.5, batch 32
    python bench/bench_fp16.py --preset ep-cnn-tiny --T1 8 --T2 3 --batch 8   # CPU-sized (fp16 is CUDA only:
                                                                              # on the CPU both sides are fp32)
Random weights at initialisation on real test images (the embedded set unless --data).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli.data import load_dataset  # noqa: E402
from epcli.ep import EPCNN  # noqa: E402


def layer_updates(model, x, y, T1, T2, beta):
    model.zero_grad(set_to_none=True)
    model.ep_train_step(x, y, T1, T2, beta, "symmetric")
    return [torch.cat([p.grad.flatten() for p in g]).double() for g in model.layer_param_groups()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="*", default=["ep-cnn"])
    p.add_argument("--T1", type=int, default=250)
    p.add_argument("--T2", type=int, default=30)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    d = load_dataset(a.data, cache_dir=os.environ.get("EPCLI_CACHE"))
    x, y = (d.test_x[:a.batch].float() / 255).to(dev), d.test_y[:a.batch].to(dev)
    b = torch.backends
    for preset in a.preset:
        torch.manual_seed(0)
        ref = EPCNN.preset(preset, update="sync").to(dev)
        half = copy.deepcopy(ref).accelerate(torch.float16, channels_last=True)  # no-op on the CPU
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False  # the fp32 side in true fp32
        g32 = layer_updates(ref, x, y, a.T1, a.T2, a.beta)
        g16 = layer_updates(half, x, y, a.T1, a.T2, a.beta)
        cos = [round(float(F.cosine_similarity(u, v, 0)), 5) for u, v in zip(g16, g32)]
        print(json.dumps({
            "bench": "fp16", "preset": preset, "T1": a.T1, "T2": a.T2, "beta": a.beta, "batch": a.batch,
            "relax_dtype": str(half.relax_dtype), "cosines": cos, "min_cosine": min(cos), "passes_0.99": min(cos) >= 0.99,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv]),
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
