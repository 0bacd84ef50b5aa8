"""Benchmark: `epcli report` (html with figures, md, json) on a store with many runs.

Fills a fresh store through the store's own API (start_run, log_metrics, log_checks, write_artifact,
finish_run: the rows and files the train, attack and corrupt pipelines write) with N runs in groups of six per
trained model: the training run (10 epochs of test_acc and train_loss, a checkpoint file), PGD L-inf and L2
attacks over the paper's 11 eps each, an AutoAttack and a Square run at 8/255 (each with its per-example
outcomes on the same seeded test images, clean accuracy, checks, and for EP-CNNs the equilibrium residual), and
a corruption run over all 19 corruptions x 5 severities (per-example outcomes and the sample grid). One model in
`--adv-every` also stores adversarial examples for its PGD runs (attack.py keeps 16 images per eps; the bench
keeps 4 so the store stays small). About 1 % of the training runs failed.

Then times each command as a separate process, the way a user runs it, and prints one JSON line per figure
(`value`: wall seconds, best of --repeat; `cpu_s`: the process's user + system CPU seconds, which a shared machine's
load inflates far less than wall time; `load_avg_1m` says how shared it was):

    python bench/bench_report.py                       # 10,000 runs: html (with figures), md, json
    python bench/bench_report.py --runs 600 --formats html --profile prof.out   # + a cProfile of html
    python bench/bench_report.py --store S --keep      # reuse / keep the store folder S
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.numpy import save_file  # noqa: E402

from epcli import report as R  # noqa: E402
from epcli import store as S  # noqa: E402

PAPER_LINF = [0.0001, 0.000215, 0.000464, 0.001, 0.002154, 0.004642, 0.01, 0.021544, 8 / 255, 0.046416, 0.1]
PAPER_L2 = [0.05, 0.0788, 0.1242, 0.1957, 0.3085, 0.4862, 0.7663, 1.0, 1.2077, 1.9035, 3.0]
MODELS = [("ep-cnn", "EP-CNN"), ("cnn", "CNN"), ("vit", "ViT"), ("resnet18", "ResNet-18"),
          ("ep-cnn-small", "EP-CNN (small)"), ("cnn-small", "CNN (small)")]
CORRUPTIONS = R.BENCHMARK_CORRUPTIONS + R.EXTRA_CORRUPTIONS
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RUNS_PER_MODEL = 6


def _grid_png(n_images: int = 4) -> bytes:
    """A corruption sample grid of corrupt.py's geometry (rows: image x corruption; columns: clean + 5 severities;
    32-pixel tiles with 2-pixel gaps)."""
    from PIL import Image
    rows, cols, h, pad = n_images * len(CORRUPTIONS), 6, 32, 2
    rng = np.random.default_rng(0)
    a = np.full((pad + rows * (h + pad), pad + cols * (h + pad), 3), 255, dtype=np.uint8)  # white gaps
    for r in range(rows):
        for c in range(cols):
            a[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (h + pad):pad + c * (h + pad) + h] = \
                rng.integers(0, 256, (h, h, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _save(tensors: dict, metadata: dict | None = None):
    return lambda p: save_file(tensors, str(p), metadata=metadata)


def fill(store: S.Store, n_runs: int, n_examples: int, adv_every: int, rng: random.Random) -> dict:
    """n_runs runs as the pipelines write them; returns counts."""
    store.db.execute("PRAGMA synchronous = OFF")  # filling only: the timed commands open the store afresh
    nrng = np.random.default_rng(rng.randrange(2**32))
    grid = _grid_png()
    counts = {"runs": 0, "train_runs": 0, "metric_rows": 0, "artifacts": 0}

    def metrics(rid, rows):
        store.log_metrics(rid, rows)
        counts["metric_rows"] += len(rows)

    def artifact(rid, kind, write, suffix=".safetensors", meta=None):
        store.write_artifact(rid, kind, write, suffix=suffix, meta=meta)
        counts["artifacts"] += 1

    # one seeded subset of the test set, as every attack with the same --n and --seed evaluates
    index = np.sort(nrng.choice(10_000, n_examples, replace=False)).astype(np.int64)
    labels = nrng.integers(0, 10, n_examples).astype(np.int64)
    difficulty = nrng.random(n_examples)
    g = 0
    while counts["runs"] < n_runs:
        model, label = MODELS[g % len(MODELS)]
        seed = g // len(MODELS)
        g += 1
        ep = model.startswith("ep-")
        cfg = {"model": model, "label": label, "recipe": "paper" if model in ("ep-cnn", "cnn", "vit") else "demo",
               "epochs": 10, "seed": seed, **({"T": 250} if ep else {})}
        tid = store.start_run("train", cfg, model=model, dataset="cifar10", seed=seed, argv=["bench"])
        counts["runs"] += 1
        counts["train_runs"] += 1
        level = 0.45 + 0.4 * rng.random()
        accs = [level * (1 - 0.5 ** (e + 1)) for e in range(10)]
        metrics(tid, [{"name": "test_acc", "value": a, "step": e + 1, "split": "test", "dataset": "cifar10"}
                      for e, a in enumerate(accs)] +
                [{"name": "train_loss", "value": 2.0 / (e + 1), "step": e + 1} for e in range(10)])
        artifact(tid, "checkpoint", lambda p, t=tid: p.write_bytes(f"checkpoint of {t}".encode()))
        if rng.random() < 0.01:
            store.finish_run(tid, "failed", "RuntimeError: diverged (bench)")
            continue
        store.finish_run(tid, summary={"test_acc": accs[-1], "epochs": 10})
        if n_runs - counts["runs"] < RUNS_PER_MODEL - 1:  # no room for its evaluations: training runs only
            continue
        clean = difficulty < level  # a model gets the easy images right: models agree on which those are
        keep_adv = (g - 1) % adv_every == 0
        for attack, norm, eps_list in (("pgd", "linf", PAPER_LINF), ("pgd", "l2", PAPER_L2),
                                       ("autoattack", "linf", [8 / 255]), ("square", "linf", [8 / 255])):
            grad = ("bptt" if attack != "square" else None) if ep else None
            acfg = {"attack": attack, "norm": norm, "eps": eps_list, "n_examples": n_examples, "seed": 0,
                    **({"grad_mode": grad} if grad else {})}
            aid = store.start_run("attack", acfg, model=model, dataset="cifar10", model_run_id=tid, argv=["bench"])
            counts["runs"] += 1
            base = {"dataset": "cifar10", "split": "test", "model": model, "attack": attack, "norm": norm,
                    "n_examples": n_examples}
            rows = [{"name": "clean_acc", "value": float(clean.mean()), **base, "grad_mode": grad, "eps": 0.0}]
            outcome = {"index": index, "label": labels, "clean_correct": clean.astype(np.uint8)}
            alive = clean.copy()
            bad = attack == "autoattack" and ep and rng.random() < 0.3
            for i, e in enumerate(eps_list):
                alive = alive & (nrng.random(n_examples) > 0.12 * (i + 1) / len(eps_list) * 4)
                outcome[f"robust_{e!r}"] = alive.astype(np.uint8)
                rows.append({"name": "robust_acc", "value": float(alive.mean()), **base, "grad_mode": grad,
                             "eps": e, "unreliable": bad,
                             "detail": {"reason": "square beat the white-box attacks" if bad else "",
                                        "forward_passes": 20 * n_examples, "T": 250 if ep else None}})
            if ep:
                rows.append({"name": "relax_residual", "value": 10 ** rng.uniform(-5, -1), **base,
                             "detail": {"T": 250, "mean": 1e-4, "steps": 250, "at_equilibrium": True, "tol": 1e-3}})
            metrics(aid, rows)
            store.log_checks(aid, [{"check": "clean-accuracy", "passed": True, "detail": ""},
                                   {"check": "white-vs-black", "passed": not bad,
                                    "detail": "masking-suspected" if bad else ""}])
            store.link(aid, store.artifacts_of(tid, role="output")[0]["sha256"], "input", "checkpoint")
            artifact(aid, "per-example", _save(outcome, {"eps": str(eps_list)}), meta={"eps": eps_list})
            if keep_adv and attack == "pgd":
                k = 4
                x = nrng.random((k, 3, 32, 32), dtype=np.float32)
                ex = {"x": x, "labels": labels[:k],
                      "pred_clean": np.where(clean[:k], labels[:k], (labels[:k] + 1) % 10)}
                for e in eps_list:
                    ex[f"x_adv_{e!r}"] = np.clip(x + nrng.normal(0, min(e, 0.1), x.shape), 0, 1).astype(np.float32)
                    ex[f"pred_{e!r}"] = np.where(outcome[f"robust_{e!r}"][:k] == 1, labels[:k], (labels[:k] + 3) % 10)
                artifact(aid, "adversarial-examples",
                         _save(ex, {"eps": str(eps_list), "classes": json.dumps(CLASSES)}),
                         meta={"eps": eps_list, "classes": CLASSES})
            store.finish_run(aid, summary={"robust_acc": float(alive.mean())})
        cid = store.start_run("corrupt", {"corruptions": list(CORRUPTIONS), "severities": [1, 2, 3, 4, 5],
                                          "n_examples": n_examples}, model=model, dataset="cifar10",
                              model_run_id=tid, argv=["bench"])
        counts["runs"] += 1
        facets = {"dataset": "cifar10", "split": "test", "model": model, "n_examples": n_examples}
        rows = [{"name": "clean_acc", "value": float(clean.mean()), **facets}]
        outcome = {"clean_correct": clean.astype(np.uint8)}
        accs = []
        for c in CORRUPTIONS:
            for s in range(1, 6):
                ok = clean & (nrng.random(n_examples) > 0.08 * s)
                outcome[f"{c}/{s}"] = ok.astype(np.uint8)
                accs.append(float(ok.mean()))
                rows.append({"name": "corruption_acc", "value": accs[-1], "corruption": c, "severity": s, **facets})
        bench_accs = accs[:15 * 5]
        rows += [{"name": "corruption_mean_acc", "value": sum(bench_accs) / len(bench_accs), **facets,
                  "detail": {"over": "mean of 15/15 benchmark corruptions × 5 severities"}},
                 {"name": "corruption_mean_acc_all", "value": sum(accs) / len(accs), **facets},
                 {"name": "mce_unnormalized", "value": 1 - sum(bench_accs) / len(bench_accs), **facets}]
        metrics(cid, rows)
        artifact(cid, "per-example", _save(outcome))
        artifact(cid, "corruption-grid", lambda p: p.write_bytes(grid), suffix=".png",
                 meta={"corruptions": list(CORRUPTIONS), "severities": [1, 2, 3, 4, 5]})
        store.finish_run(cid, summary={"corruption_mean_acc": sum(bench_accs) / len(bench_accs)})
    return counts


def _line(what: str, value, unit: str, **more) -> dict:
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    return {"what": what, "value": value, "unit": unit, **more, "device": "cpu",
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": int(threads),
            "load_avg_1m": round(os.getloadavg()[0], 2), "torch": metadata.version("torch"),
            "matplotlib": metadata.version("matplotlib"), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000, help="runs in the store (six per trained model)")
    ap.add_argument("--n-examples", type=int, default=200, help="test images per attack / corrupt run")
    ap.add_argument("--adv-every", type=int, default=10, help="every k-th model stores adversarial examples")
    ap.add_argument("--formats", nargs="+", default=["html", "md", "json"], choices=["html", "md", "json", "table"])
    ap.add_argument("--repeat", type=int, default=1, help="best of this many runs of each command")
    ap.add_argument("--store", help="store folder (default: a temporary one); filled only when it has no runs")
    ap.add_argument("--keep", action="store_true", help="keep the store and the report folders")
    ap.add_argument("--profile", help="also run `report -f html --out` under cProfile, writing this file")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    root = Path(args.store) if args.store else tmp / "store"
    try:
        store = S.Store(root)
        have = next(iter(store.db.query("SELECT count(*) AS n FROM runs")))["n"]
        if not have:
            t0 = time.perf_counter()
            counts = fill(store, args.runs, args.n_examples, max(1, args.adv_every), random.Random(args.seed))
            print(json.dumps(_line("fill store", round(time.perf_counter() - t0, 2), "s", **counts)), flush=True)
        store.close()
        n_runs = next(iter(S.Store(root, create=False).db.query("SELECT count(*) AS n FROM runs")))["n"]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for fmt in args.formats:
            out = tmp / f"report-{fmt}"
            cmd = [sys.executable, "-m", "epcli", "--store", str(root), "report", "-f", fmt] + \
                  (["--out", str(out)] if fmt != "table" else [])
            best, cpu, timed_out = float("inf"), float("inf"), False
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                                       check=False)
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
                best = min(best, time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = min(cpu, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
                if p.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
            files = sorted(out.rglob("*")) if out.exists() and not timed_out else []
            print(json.dumps(_line(f"epcli report -f {fmt}" + (" --out DIR" if fmt != "table" else ""),
                                   None if timed_out else round(best, 2), "s", n_runs=n_runs, files=len(files),
                                   cpu_s=None if timed_out else round(cpu, 2),  # user + system: less load-bound
                                   **({"timed_out_after_s": args.timeout} if timed_out else {}),
                                   bytes=sum(f.stat().st_size for f in files if f.is_file()),
                                   timed=" ".join(shlex.quote(a) for a in ["python", "-m", "epcli", "--store",
                                                                          "STORE"] + cmd[5:]))), flush=True)
        if args.profile:
            out = tmp / "report-profile"
            cmd = [sys.executable, "-m", "cProfile", "-o", args.profile, "-m", "epcli", "--store", str(root),
                   "report", "-f", "html", "--out", str(out)]
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=args.timeout)
            print(json.dumps(_line("profile written", args.profile, "path", n_runs=n_runs)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(json.dumps({"kept": str(tmp), "store": str(root)}), flush=True)


if __name__ == "__main__":
    main()
