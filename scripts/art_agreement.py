"""epcli's `--protocol paper` PGD against IBM ART's ProjectedGradientDescentPyTorch, image by image.

Usage: python scripts/art_agreement.py --store STORE --model RUN_OR_NAME [--n 300] [--eps 2/255,8/255]
       [--norm linf] [--T T] [--grad-mode truncated:70]
Needs `pip install adversarial-robustness-toolbox` (the `test` extra). Prints one JSON line per eps: the
robust accuracy each library reports, how many images get the same adversarial prediction, and the largest
pixel difference between the two adversarial images.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn as nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--eps", default="2/255,8/255")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--T", type=int, default=None)
    ap.add_argument("--grad-mode", default=None)
    a = ap.parse_args()

    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    from epcli.attacks import evaluate
    from epcli.pipelines.attack import PAPER_PROTOCOL
    from epcli.pipelines.common import model_and_first_test_images, parse_eps
    from epcli.store import Store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, info, ds, x, y = model_and_first_test_images(Store(a.store), a.model, a.n)
    ep = hasattr(net, "grad_mode")
    grad_mode = a.grad_mode or (PAPER_PROTOCOL["ep_grad_mode"] if ep else "bptt")
    if ep:
        net.T = a.T or PAPER_PROTOCOL["ep_T"]
    for eps in sorted(parse_eps(a.eps)):
        r = evaluate(net, x, y, attack="pgd", norm=a.norm, eps_list=[eps], params=PAPER_PROTOCOL["params"],
                     labels="predicted", grad_mode=grad_mode, keep_adv=len(y), batch_size=100)
        if ep:
            net.grad_mode = grad_mode
        clf = PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                nb_classes=int(ds.num_classes), clip_values=None, device_type="cpu")
        atk = ProjectedGradientDescentPyTorch(clf, norm=math.inf if a.norm == "linf" else 2, eps=eps,
                                              eps_step=2.5 * eps / 20, max_iter=20, num_random_init=0,
                                              batch_size=100, verbose=False)
        ref = torch.from_numpy(atk.generate(x.numpy()))
        if ep:
            net.grad_mode = "bptt"
        with torch.no_grad():
            pred_ref = torch.cat([net(ref[i:i + 100]).argmax(1) for i in range(0, len(y), 100)])
        print(json.dumps({"model": net.spec["name"], "n": len(y), "norm": a.norm, "eps": eps, "grad_mode": grad_mode,
                          "T": getattr(net, "T", None), "robust_epcli": r["robust_accuracy"][eps],
                          "robust_art": float((pred_ref == y).float().mean()),
                          "same_prediction": int((pred_ref == r["pred_adv"][eps]).sum()),
                          "max_abs_pixel_diff": float((ref - r["x_adv"][eps]).abs().max()),
                          "images_within_1e-4": int(((ref - r["x_adv"][eps]).flatten(1).abs().amax(1) <= 1e-4).sum()),
                          "pixels_off_by_more_than_1e-4": int(((ref - r["x_adv"][eps]).abs() > 1e-4).sum()),
                          "pixels": int(ref.numel())}), flush=True)


if __name__ == "__main__":
    main()
