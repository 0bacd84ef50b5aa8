"""Attack benchmarks: PGD-20 L-inf 8/255 on the test set (exact gradients), Square 5000 queries on 1,000
images, AutoAttack standard at 8/255. One JSON line per benchmark on stdout (device, date, command,
seconds, robust accuracy, forward passes).

    python bench/bench_attacks.py --checkpoint path.safetensors [--dataset cifar10] [--device cuda]
    python bench/bench_attacks.py --model cnn [--dataset cifar10]   # untrained architecture (timing only)
    python bench/bench_attacks.py --smoke                             # tiny CPU run on the embedded set

Runs unchanged on GPU; --smoke shrinks the sets and budgets so it finishes in about a minute on CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from epcli.attacks import evaluate
from epcli.data import load_dataset


class _SmokeCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 5, stride=4, padding=2)
        self.fc = nn.Linear(16 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def _load_model(args, num_classes):
    if args.checkpoint:
        from epcli import checkpoint as ck  # owned by another room; imported only when asked
        loader = getattr(ck, "load_model", None) or getattr(ck, "load")
        out = loader(args.checkpoint)
        return out[0] if isinstance(out, tuple) else out
    if args.model:
        from epcli.models import create_model
        return create_model(args.model, num_classes=num_classes)
    return _SmokeCNN(num_classes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint")
    p.add_argument("--model")
    p.add_argument("--dataset", default=None, help="cifar10, cifar100, a path, or the embedded mini set")
    p.add_argument("--data-dir")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--grad-mode", default="bptt")
    p.add_argument("--only", nargs="*", choices=["pgd", "square", "autoattack"])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n", type=int, default=None, help="images per benchmark (default: 10k PGD/AA, 1k Square)")
    p.add_argument("--square-queries", type=int, default=None, help="Square's query budget (default 5000)")
    args = p.parse_args(argv)

    d = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=os.environ.get("EPCLI_CACHE"))
    x, y = d.test_x, d.test_y
    model = _load_model(args, d.num_classes)
    device = torch.device(args.device)
    plan = [
        ("pgd", dict(attack="pgd", norm="linf", eps_list=[8 / 255], params={"steps": 20}), len(y)),
        ("square", dict(attack="square", norm="linf", eps_list=[8 / 255], params={"n_queries": 5000}), 1000),
        ("autoattack", dict(attack="autoattack", norm="linf", eps_list=[8 / 255], params={}), len(y)),
    ]
    if args.smoke:
        if not (args.checkpoint or args.model):  # train the tiny model a little so attacks have work
            torch.manual_seed(0)
            opt = torch.optim.Adam(model.parameters(), 3e-3)
            for _ in range(50):
                j = torch.randint(0, len(d.train_y), (128,))
                opt.zero_grad()
                F.cross_entropy(model(d.train_x[j].float() / 255), d.train_y[j]).backward()
                opt.step()
        plan = [("pgd", plan[0][1], 64),
                ("square", dict(plan[1][1], params={"n_queries": 50}), 16),
                ("autoattack", dict(plan[2][1], params={"steps": 5, "n_target_classes": 2, "n_queries": 20}), 16)]
    if args.square_queries:
        plan = [(nm, dict(kw, params={**kw["params"], "n_queries": args.square_queries}) if nm == "square" else kw,
                 n) for nm, kw, n in plan]
    if args.n:
        plan = [(nm, kw, min(args.n, len(y))) for nm, kw, _ in plan]
    model = model.to(device).eval()
    for name, kw, n in plan:
        if args.only and name not in args.only:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = evaluate(model, x[:n], y[:n], batch_size=args.batch_size, device=device, seed=0,
                     grad_mode=args.grad_mode, keep_adv=0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rec = {
            "bench": name, "n": n, "norm": kw["norm"], "eps": kw["eps_list"][0], "params": r["params"],
            "grad_mode": r["grad_mode"], "clean_accuracy": r["clean_accuracy"],
            "robust_accuracy": r["robust_accuracy"][kw["eps_list"][0]], "forward_passes": r["forward_passes"],
            "batch_size": r["batch_size"], "seconds": round(time.perf_counter() - t0, 3),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "smoke": args.smoke,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        }
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
