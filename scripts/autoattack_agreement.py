"""epcli's AutoAttack (standard) against fra31's official AutoAttack, image by image, on a stored model.

Usage: python scripts/autoattack_agreement.py --store STORE --model RUN_OR_NAME [--n 50] [--eps 8/255]
       [--norm linf] [--seed 0]
Needs `pip install pyautoattack` (fra31/auto-attack on PyPI; the `test` extra). Both run on the CPU on the first n
test images as one batch, with the published budgets (100 steps, 9 targets, 5,000 Square queries) and the same
seed (epcli: a CPU generator seeded with it; official: `AutoAttack(seed=...)`). Prints one JSON line: the robust
accuracy each reports, how many images get the same verdict and the same adversarial prediction, and the largest
pixel difference between the two adversarial images, with each library's time.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from pyautoattack.autoattack import AutoAttack

    from epcli.attacks import autoattack
    from epcli.pipelines.common import model_and_first_test_images, parse_eps
    from epcli.store import Store

    net, info, ds, x, y = model_and_first_test_images(Store(a.store), a.model, a.n)
    (eps,) = parse_eps(a.eps)
    t0 = time.time()
    ours = autoattack(net, x, y, eps=eps, norm=a.norm, generator=torch.Generator().manual_seed(a.seed))
    t_ours = time.time() - t0
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    official = AutoAttack(net, norm={"linf": "Linf", "l2": "L2"}[a.norm], eps=eps, version="standard",
                          device="cpu", seed=a.seed)
    official.verbose = False
    t0 = time.time()
    ref = official.run_standard_evaluation(x, y, batch_size=len(y))
    ref = ref[0] if isinstance(ref, tuple) else ref
    t_ref = time.time() - t0
    with torch.no_grad():
        p_ours, p_ref, p_clean = net(ours).argmax(1), net(ref).argmax(1), net(x).argmax(1)
    diff = (ours - ref).flatten(1).abs().amax(1)
    print(json.dumps({
        "model": net.spec["name"], "model_run_id": (info["train_run"] or {}).get("id"), "n": len(y),
        "dataset": ds.name, "norm": a.norm, "eps": eps, "seed": a.seed, "T": getattr(net, "T", None),
        "clean_acc": float((p_clean == y).float().mean()),
        "robust_epcli": float((p_ours == y).float().mean()), "robust_official": float((p_ref == y).float().mean()),
        "same_verdict": int(((p_ours == y) == (p_ref == y)).sum()), "same_prediction": int((p_ours == p_ref).sum()),
        "images_within_1e-4": int((diff <= 1e-4).sum()), "max_abs_pixel_diff": float(diff.max()),
        "seconds_epcli": round(t_ours, 1), "seconds_official": round(t_ref, 1)}), flush=True)


if __name__ == "__main__":
    main()
