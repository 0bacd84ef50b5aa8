"""Fidelity of epcli's corruptions to the reference that made CIFAR-10-C, measured value by value.

For every corruption and severity, epcli's uint8 images (`corrupt_range_uint8`, the images `evaluate` and `export`
use) are compared with the reference definition applied to the same clean images with the same random draws:
tests/cifar_c_reference.py, an independent statement of make_cifar_c.py in numpy / scipy / OpenCV <= 4.10 / PIL
(ImageMagick's motion blur restated from its source). Prints one JSON line per cell, a summary line, and with
--markdown the table for docs/corruptions.md.

    python bench/corruption_fidelity.py                  # the 1,000 embedded CIFAR-10 test images, all 19 x 5
    python bench/corruption_fidelity.py --n 200 --names motion_blur,spatter --markdown
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import cifar_c_reference as R  # noqa: E402

from epcli import corruptions as C  # noqa: E402
from epcli.data import load_dataset  # noqa: E402


def versions() -> dict:
    import cv2
    import PIL
    import scipy
    return {"numpy": np.__version__, "scipy": scipy.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="dataset name or path (default: the embedded CIFAR-10 subset)")
    ap.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    ap.add_argument("--names", default=",".join(C.CORRUPTIONS))
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="also print the per-corruption table")
    args = ap.parse_args()
    torch.set_num_threads(1)

    names = [s for s in args.names.split(",") if s]
    sevs = [int(s) for s in args.severities.split(",")]
    d = load_dataset(args.data)
    x = d.test_x[:args.n]
    n = x.shape[0]
    common = {"n": n, "seed": args.seed, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(shlex.quote(a) for a in sys.argv), **versions()}
    per_name: dict[str, dict] = {}
    t_all = time.perf_counter()
    for name in names:
        agg = {"values": 0, "differ": 0, "max_diff": 0, "images_differ": 0, "cells": {}}
        for sev in sevs:
            values = differ = worst = img_differ = 0
            for s in range(0, n, C.CHUNK):
                e = min(s + C.CHUNK, n)
                ours = C.corrupt_range_uint8(x, name, sev, args.seed, s, e).numpy().astype(np.int64)
                theirs = R.reference_batch(name, sev, x[s:e], C.chunk_generator(args.seed, name, sev, s // C.CHUNK))
                diff = np.abs(ours - theirs.astype(np.int64))
                values += diff.size
                differ += int((diff > 0).sum())
                worst = max(worst, int(diff.max()))
                img_differ += int((diff.reshape(len(diff), -1) > 0).any(1).sum())
            cell = {"corruption": name, "severity": sev, "values": values, "differ": differ,
                    "fraction": differ / values, "max_diff": worst, "images_differ": img_differ}
            print(json.dumps({**cell, **common}), flush=True)
            agg["values"] += values
            agg["differ"] += differ
            agg["max_diff"] = max(agg["max_diff"], worst)
            agg["images_differ"] += img_differ
            agg["cells"][sev] = cell
        per_name[name] = agg
    summary = {"summary": "fidelity", "seconds": round(time.perf_counter() - t_all, 1),
               "worst_fraction": max(a["differ"] / a["values"] for a in per_name.values()),
               "worst_max_diff": max(a["max_diff"] for a in per_name.values()), **common}
    print(json.dumps(summary), flush=True)
    if args.markdown:
        print()
        print("| corruption | values compared | values that differ | largest difference (levels) |"
              + "".join(f" s{s} differ |" for s in sevs))
        print("|---|---|---|---|" + "---|" * len(sevs))
        for name, a in per_name.items():
            print(f"| {name} | {a['values']:,} | {a['differ']:,} ({100 * a['differ'] / a['values']:.4f}%) | "
                  f"{a['max_diff']} |" + "".join(f" {100 * a['cells'][s]['fraction']:.4f}% |" for s in sevs))


if __name__ == "__main__":
    main()
