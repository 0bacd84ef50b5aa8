"""Benchmark: `select * from leaderboard` on a store with many training runs (the view must stay linear).

Fills a fresh store with N finished training runs, each with its per-epoch metrics, PGD L-inf and L2 attack
runs (11 eps each, like --eps paper-linf), an AutoAttack and a Square run and a corruption run, written
into a store opened by Store (its schema, views and indexes), then times the documented query through plain sqlite3,
the way `sqlite-utils store/epcli.db "select * from leaderboard"` runs it. With --old it also times m001's
per-row-subquery view on the same data, for comparison. Prints one JSON line per size.

    python bench/bench_store.py                     # 2,500 training runs (the target: under 1 s)
    python bench/bench_store.py --runs 625 1250 2500 --old
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import shlex
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epcli import store as S  # noqa: E402

PAPER_LINF = [0.0001, 0.000215, 0.000464, 0.001, 0.002154, 0.004642, 0.01, 0.021544, 8 / 255, 0.046416, 0.1]
PAPER_L2 = [0.05, 0.0788, 0.1242, 0.1957, 0.3085, 0.4862, 0.7663, 1.0, 1.2077, 1.9035, 3.0]


def fill(store: S.Store, n_train: int, epochs: int, rng: random.Random) -> int:
    """n_train finished training runs with their evaluations, as Store writes them (bulk-inserted so that
    filling is quick); returns the number of metric rows."""
    runs, metrics = [], []
    clock = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def run(kind: str, model: str, model_run_id: str | None) -> str:
        nonlocal clock
        clock += dt.timedelta(seconds=1)
        rid = S.new_run_id()
        runs.append({"id": rid, "kind": kind, "status": "finished", "config": "{}", "model": model,
                     "dataset": "cifar10", "model_run_id": model_run_id or rid,
                     "started_at": clock.isoformat(), "ended_at": clock.isoformat()})
        return rid

    for _ in range(n_train):
        model = rng.choice(["ep-cnn", "cnn", "vit", "resnet18"])
        tid = run("train", model, None)
        metrics += [{"run_id": tid, "name": "test_acc", "value": rng.random(), "step": e, "split": "test"}
                    for e in range(1, epochs + 1)]
        for attack, norm, eps in (("pgd", "linf", PAPER_LINF), ("pgd", "l2", PAPER_L2),
                                  ("autoattack", "linf", [8 / 255]), ("square", "linf", [8 / 255])):
            aid = run("attack", model, tid)
            metrics += [{"run_id": aid, "name": "robust_acc", "value": rng.random(), "attack": attack,
                         "norm": norm, "eps": e, "unreliable": int(rng.random() < 0.05)} for e in eps]
        cid = run("corrupt", model, tid)
        metrics.append({"run_id": cid, "name": "corruption_mean_acc", "value": rng.random()})
    with store.db.atomic():
        store.db["runs"].insert_all(runs, batch_size=1000)
        store.db["metrics"].insert_all(metrics, batch_size=1000)
    return len(metrics)


OLD_LEADERBOARD = S.LEADERBOARD_V1  # the first schema's view, exactly as the store created it


def timed(path: Path, sql: str, repeat: int) -> tuple[float, list]:
    conn = sqlite3.connect(path)  # plain sqlite3, no epcli: what an outside reader pays
    best, rows = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        best = min(best, time.perf_counter() - t0)
    conn.close()
    return best, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, nargs="+", default=[2500], help="training runs per store")
    ap.add_argument("--epochs", type=int, default=10, help="test_acc rows per training run")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many queries")
    ap.add_argument("--old", action="store_true", help="also time the m001 (quadratic) view")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for n in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            store = S.Store(Path(tmp) / "store")
            t0 = time.perf_counter()
            metric_rows = fill(store, n, args.epochs, random.Random(args.seed))
            fill_s = time.perf_counter() - t0
            store.close()
            seconds, rows = timed(store.path, "select * from leaderboard", args.repeat)
            out = {"train_runs": n, "all_runs": n * 6, "metric_rows": metric_rows, "leaderboard_rows": len(rows),
                   "leaderboard_s": round(seconds, 4), "fill_s": round(fill_s, 2)}
            if args.old:
                old_s, old_rows = timed(store.path, OLD_LEADERBOARD, 1)
                out["old_view_s"] = round(old_s, 3)
                out["same_result"] = sorted(map(tuple, old_rows)) == sorted(map(tuple, rows))
            out.update({"sqlite": sqlite3.sqlite_version, "cpu": platform.processor() or platform.machine(),
                        "date": dt.date.today().isoformat(),
                        "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv)})
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
