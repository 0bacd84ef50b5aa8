"""epcli's `--protocol paper` attacks against IBM ART's, image by image, on a stored model.

Usage: python scripts/art_agreement.py --store STORE --model RUN_OR_NAME [--attack pgd|square|autoattack]
       [--n 300] [--eps 2/255,8/255] [--norm linf] [--T T] [--grad-mode truncated:70] [--seed 0]
       [--max-iter N] (Square's iterations; AutoAttack's Square's)  [--apgd-iter N] (AutoAttack's APGD)
- pgd: epcli's pgd with the paper's settings vs ART's ProjectedGradientDescentPyTorch (clip_values=None);
- square: epcli's art-square (ART's algorithm) vs ART's SquareAttack on a BlackBoxClassifierNeuralNetwork whose
  closure returns the softmax, the paper's setting; both draw from numpy/Python streams seeded --seed;
- autoattack: epcli's art-autoattack vs ART's AutoAttack with its default members (budgets: ART's, unless
  --apgd-iter / --max-iter), the ensemble's streams seeded as epcli seeds them from --seed.
Labels: the model's predictions (ART's y=None), every image attacked, as the paper. Needs
`pip install adversarial-robustness-toolbox` (the `test` extra). Prints one JSON line per eps: the robust
accuracy each library reports, how many images get the same adversarial prediction, and the largest pixel
difference between the two adversarial images.
"""
from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
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
    ap.add_argument("--attack", default="pgd", choices=["pgd", "square", "autoattack"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--apgd-iter", type=int, default=None)
    a = ap.parse_args()

    from epcli.pipelines.attack import PAPER_PROTOCOLS
    from epcli.pipelines.common import model_and_first_test_images, parse_eps
    from epcli.store import Store

    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, info, ds, x, y = model_and_first_test_images(Store(a.store), a.model, a.n)
    protocol = PAPER_PROTOCOLS[a.attack]
    ep = hasattr(net, "grad_mode")
    grad_mode = a.grad_mode or (protocol.get("ep_grad_mode") if ep else None) or "bptt"
    if ep:
        net.T = a.T or protocol["ep_T"]
    run = {"pgd": _pgd, "square": _square, "autoattack": _autoattack}[a.attack]
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 100]).argmax(1) for i in range(0, len(y), 100)])
    for eps in sorted(parse_eps(a.eps)):
        ours, ref = run(net, x, pred, eps, a, int(ds.num_classes), grad_mode if ep else None)
        with torch.no_grad():
            p_ours = torch.cat([net(ours[i:i + 100]).argmax(1) for i in range(0, len(y), 100)])
            p_ref = torch.cat([net(ref[i:i + 100]).argmax(1) for i in range(0, len(y), 100)])
        d = (ref - ours).abs()
        print(json.dumps({"attack": a.attack, "model": net.spec["name"], "n": len(y), "norm": a.norm, "eps": eps,
                          "grad_mode": grad_mode if a.attack != "square" else None, "T": getattr(net, "T", None),
                          "robust_epcli": float((p_ours == y).float().mean()),
                          "robust_art": float((p_ref == y).float().mean()),
                          "same_prediction": int((p_ref == p_ours).sum()),
                          "max_abs_pixel_diff": float(d.max()),
                          "images_within_1e-4": int((d.flatten(1).amax(1) <= 1e-4).sum()),
                          "pixels_off_by_more_than_1e-4": int((d > 1e-4).sum()),
                          "pixels": int(ref.numel())}), flush=True)


def _art_norm(norm: str):
    return math.inf if norm == "linf" else 2


def _with_grad_mode(net, grad_mode):
    """ART differentiates the module as it is: set the EP gradient mode on it (None: a plain model)."""
    if grad_mode is not None:
        net.grad_mode = grad_mode


def _pgd(net, x, pred, eps, a, classes, grad_mode):
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    from epcli.attacks import evaluate
    from epcli.pipelines.attack import PAPER_PROTOCOLS
    r = evaluate(net, x, pred, attack="pgd", norm=a.norm, eps_list=[eps], params=PAPER_PROTOCOLS["pgd"]["params"],
                 labels="predicted", grad_mode=grad_mode or "bptt", keep_adv=len(pred), batch_size=100)
    _with_grad_mode(net, grad_mode)
    clf = PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=classes, clip_values=None, device_type="cpu")
    atk = ProjectedGradientDescentPyTorch(clf, norm=_art_norm(a.norm), eps=eps, eps_step=2.5 * eps / 20,
                                          max_iter=20, num_random_init=0, batch_size=100, verbose=False)
    ref = torch.from_numpy(atk.generate(x.numpy()))
    _with_grad_mode(net, "bptt" if grad_mode else None)
    return r["x_adv"][eps], ref


def _square(net, x, pred, eps, a, classes, grad_mode):
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    from epcli.attacks.art_square import art_square_run
    from epcli.pipelines.attack import PAPER_PROTOCOLS
    p = {**PAPER_PROTOCOLS["square"]["params"], **({"max_iter": a.max_iter} if a.max_iter else {})}
    ours = art_square_run(net, x, pred, eps=eps, norm=a.norm, rng=np.random.RandomState(a.seed),
                          py_rng=random.Random(a.seed), **p)

    def softmax_of(images: np.ndarray) -> np.ndarray:  # the paper's black-box closure
        with torch.no_grad():
            return torch.softmax(net(torch.from_numpy(images)), 1).numpy()

    est = BlackBoxClassifierNeuralNetwork(softmax_of, tuple(x.shape[1:]), classes, clip_values=(0, 1))
    atk = SquareAttack(est, norm=_art_norm(a.norm), max_iter=p["max_iter"], eps=eps, p_init=p["p_init"],
                       nb_restarts=p["restarts"], verbose=False)
    np.random.seed(a.seed)
    random.seed(a.seed)
    ref = torch.from_numpy(atk.generate(x.numpy()))
    return ours, ref


def _autoattack(net, x, pred, eps, a, classes, grad_mode):
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, DeepFool, SquareAttack
    from art.estimators.classification import PyTorchClassifier

    from epcli.attacks.art_autoattack import art_autoattack, ensemble_seed
    from epcli.attacks.evaluate import _gradient_mode
    from epcli.pipelines.attack import PAPER_PROTOCOLS
    p = dict(PAPER_PROTOCOLS["autoattack"]["params"])
    p.update({k: v for k, v in {"apgd_iter": a.apgd_iter, "square_iter": a.max_iter}.items() if v})
    with _gradient_mode(net, grad_mode or "bptt"):
        ours = art_autoattack(net, x, pred, eps=eps, norm=a.norm, generator=torch.Generator().manual_seed(a.seed),
                              **p)
    _with_grad_mode(net, grad_mode)
    clf = PyTorchClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=classes, clip_values=(0, 1), device_type="cpu")
    norm, bs = _art_norm(a.norm), p["batch_size"]
    members = [AutoProjectedGradientDescent(clf, norm=norm, eps=eps, eps_step=p["eps_step"], max_iter=p["apgd_iter"],
                                            targeted=False, nb_random_init=p["restarts"], batch_size=bs,
                                            loss_type=loss, verbose=False)
               for loss in ("cross_entropy", "difference_logits_ratio")]
    members += [DeepFool(clf, max_iter=p["deepfool_iter"], epsilon=p["overshoot"], nb_grads=p["nb_grads"],
                         batch_size=bs, verbose=False),
                SquareAttack(clf, norm=norm, max_iter=p["square_iter"], eps=eps, p_init=p["p_init"],
                             nb_restarts=p["square_restarts"], verbose=False)]
    atk = AutoAttack(clf, norm=norm, eps=eps, eps_step=p["eps_step"], attacks=members, batch_size=bs)
    seed = ensemble_seed(torch.Generator().manual_seed(a.seed))
    np.random.seed(seed)
    random.seed(seed)
    ref = torch.from_numpy(atk.generate(x.numpy()))
    _with_grad_mode(net, "bptt" if grad_mode else None)
    return ours, ref


if __name__ == "__main__":
    main()
