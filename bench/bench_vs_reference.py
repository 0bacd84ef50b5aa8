"""One attack by epcli or by fra31's official code (`pyautoattack`), same model, images, budget and seed: for timing
the two against each other with farm-bench (whole processes, A B A B ...).

    python bench/bench_vs_reference.py --impl epcli|official --attack apgd-ce|apgd-t|fab-t|square|autoattack \
        --store STORE --model RUN_OR_NAME [--n 100] [--eps 8/255] [--norm linf] [--steps 100] [--queries 5000]
    farm-bench --vs 'python bench/bench_vs_reference.py --impl official ...' -- python bench/bench_vs_reference.py \
        --impl epcli ...

Prints one JSON line: impl, attack, n, the attack's own seconds and the robust accuracy (which the two should
share: tests/test_attack_references.py). CPU, one batch, seed 0; the published budgets unless given.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", required=True, choices=["epcli", "official"])
    ap.add_argument("--attack", required=True, choices=["apgd-ce", "apgd-t", "fab-t", "square", "autoattack"])
    ap.add_argument("--store", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--queries", type=int, default=5000)
    a = ap.parse_args()

    from epcli.pipelines.common import model_and_first_test_images, parse_eps
    from epcli.store import Store
    net, _, _, x, y = model_and_first_test_images(Store(a.store), a.model, a.n)
    (eps,) = parse_eps(a.eps)
    t0 = time.perf_counter()
    if a.impl == "epcli":
        from epcli.attacks import ATTACKS
        kw = {"steps": a.steps} if a.attack != "square" else {}
        if a.attack in ("square", "autoattack"):
            kw["n_queries"] = a.queries
        if a.attack == "square":
            kw["rescale_schedule"] = False
        adv = ATTACKS[a.attack](net, x, y, eps=eps, norm=a.norm, generator=torch.Generator().manual_seed(0), **kw)
    else:
        adv = _official(a, net, x, y, eps)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        robust = float((net(adv).argmax(1) == y).float().mean())
    print(json.dumps({"impl": a.impl, "attack": a.attack, "model": net.spec["name"], "n": a.n, "norm": a.norm,
                      "eps": eps, "steps": a.steps, "queries": a.queries, "seconds": round(seconds, 2),
                      "robust_acc": robust, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "date": _dt.date.today().isoformat()}), flush=True)


def _official(a, net, x, y, eps):
    norm = {"linf": "Linf", "l2": "L2"}[a.norm]
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    if a.attack == "autoattack":
        from pyautoattack.autoattack import AutoAttack
        aa = AutoAttack(net, norm=norm, eps=eps, version="standard", device="cpu", seed=0)
        aa.verbose = False
        for atk in (aa.apgd, aa.apgd_targeted):  # its step schedule is set from n_iter in __init__
            atk.n_iter, atk.n_iter_2 = a.steps, max(int(0.22 * a.steps), 1)
            atk.n_iter_min, atk.size_decr = max(int(0.06 * a.steps), 1), max(int(0.03 * a.steps), 1)
        aa.fab.n_iter, aa.square.n_queries = a.steps, a.queries
        out = aa.run_standard_evaluation(x, y, batch_size=len(y))
        return out[0] if isinstance(out, tuple) else out
    if a.attack == "square":
        from pyautoattack.square import SquareAttack
        return SquareAttack(net, norm=norm, eps=eps, n_queries=a.queries, seed=0, resc_schedule=False).perturb(x, y)
    if a.attack == "fab-t":
        from pyautoattack.fab_pt import FABAttack_PT
        return FABAttack_PT(net, norm=norm, eps=eps, n_iter=a.steps, targeted=True, n_target_classes=9, seed=0,
                            n_restarts=1, device="cpu").perturb(x, y)
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    cls = APGDAttack if a.attack == "apgd-ce" else APGDAttack_targeted
    kw = {"loss": "ce"} if a.attack == "apgd-ce" else {"n_target_classes": 9}
    return cls(net, norm=norm, eps=eps, n_iter=a.steps, seed=0, device="cpu", **kw).perturb(x, y)


if __name__ == "__main__":
    main()
