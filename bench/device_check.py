"""The device check: one command that installs epcli without a network, runs the CUDA tests, every benchmark
and the accuracy probe, each under a fixed time budget, and writes one JSON line per figure.

    bash bench/device_check.sh OUT           # a bare GPU machine: the checkout + .data/ (`make device-data`)
    python bench/device_check.py OUT --smoke # the same steps on the CPU, tiny sizes, <= 3 minutes on 2 cores

OUT/figures.jsonl gets one line per figure: what, value, unit, card, torch, date, command (+ details);
OUT/device_check.log the output of every step. --data names a folder with `wheels/*.whl` and
`cifar10-jpeg.tar.xz` (or `datasets/cifar10-jpeg.tar.xz`): `.data/` when present, else `../shared`.
Each step runs as its own process under min(its budget, what is left of --budget); a step that fails or runs
out of time gets a line with value null and the reason, and the next step runs. The smoke run prints the same
`what` lines with tiny sizes (and exits 1 when any step failed), so that CI keeps this script working.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = "cifar10-jpeg.tar.xz"

# (step, budget in seconds on one H100/H200, budget in the CPU smoke run); the run follows this order
# (smoke budgets are caps for a shared 2-core CI box; the smoke run as a whole must stay under its 170 s)
BUDGETS = {
    "install": (30, 30), "data": (60, 30), "cuda-tests": (75, 40),
    "ep-fp32-b128": (65, 30), "ep-fp32-b256": (35, 20), "ep-fp16-b128": (25, 20), "ep-fp16-b256": (35, 20),
    "fp16-cosine": (20, 20), "probe-fast-ep": (205, 40), "attack-pgd-bptt": (30, 20), "attack-pgd-implicit": (25, 20),
    "attack-square": (25, 20), "corruptions": (60, 30), "baselines": (70, 40), "probe-fast-cnn": (80, 40),
}


class Check:
    def __init__(self, out: Path, smoke: bool, budget: float, python: str, scale: float = 1.0):
        self.out, self.smoke, self.python, self.scale = out, smoke, python, scale
        self.figures = out / "figures.jsonl"
        self.log = out / "device_check.log"
        self.failed: list[str] = []
        for f in (self.figures, self.log):  # one run per folder: a rerun replaces it
            f.unlink(missing_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="epcli-device-check-"))
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "EPCLI_CACHE": str(self.work / "cache"),
                    "PYTHONUNBUFFERED": "1"}
        self.card, self.torch = _card()
        self.start = time.monotonic()  # the budget counts from here (importing torch above can take a while)
        self.deadline = self.start + budget
        self.date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # -- output ----------------------------------------------------------------------------------------------
    def figure(self, what: str, value, unit: str, command: str, **details) -> None:
        line = {"what": what, "value": value, "unit": unit, "card": self.card, "torch": self.torch,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
                "smoke": self.smoke, **details}
        text = json.dumps(line)
        print(text, flush=True)
        with open(self.figures, "a") as f:
            f.write(text + "\n")

    def note(self, text: str) -> None:
        with open(self.log, "a") as f:
            f.write(text + "\n")

    # -- running a step --------------------------------------------------------------------------------------
    def budget(self, step: str) -> float:
        return min(self.scale * BUDGETS[step][1 if self.smoke else 0], self.deadline - time.monotonic())

    def run(self, step: str, argv: list[str], unit_on_failure: str = "") -> tuple[list[dict], str, bool]:
        """Run argv under the step's budget: (JSON lines it printed, its whole output, finished in time and
        without error). A step that could not finish gets one figure line with value null and the reason."""
        limit = self.budget(step)
        command = " ".join(shlex.quote(a) for a in argv)
        if limit < 3:
            self.failed.append(step)
            self.figure(step, None, unit_on_failure, command, status="skipped",
                        reason="the run's total budget was spent before this step")
            return [], "", False
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit)
            out, err, ok, status = p.stdout, p.stderr, p.returncode == 0, f"exit {p.returncode}"
        except subprocess.TimeoutExpired as e:
            out, err, ok, status = _text(e.stdout), _text(e.stderr), False, f"timed out after {limit:.0f} s"
        text = out + err
        seconds = time.monotonic() - t0
        self.note(f"===== {step} ({status}, {seconds:.1f} s): {command}\n{text}")
        lines = [d for d in (_json(s) for s in out.splitlines()) if d is not None]
        if not ok:
            self.failed.append(step)
            tail = [s for s in (err or out).strip().splitlines() if s.strip()][-1:] or [""]
            self.figure(step, None, unit_on_failure, command, status=status, seconds=round(seconds, 1),
                        reason=tail[0][-300:])
        return lines, text, ok

    def py(self, *args) -> list[str]:
        return [self.python, *map(str, args)]


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")


def _json(s: str):
    s = s.strip()
    if not s.startswith("{"):
        return None
    try:
        return json.loads(s)
    except ValueError:
        return None


def _card() -> tuple[str, str]:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), torch.__version__
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", torch.__version__


def _find(data: Path | None, *names: str) -> Path | None:
    for base in [data] if data else []:
        for n in names:
            hits = sorted(glob.glob(str(base / n)))
            if hits:
                return Path(hits[0])
    return None


# -- the steps ---------------------------------------------------------------------------------------------------

def install(c: Check, data: Path | None) -> None:
    """pip install --no-index --no-deps the wheels the GPU image lacks (sqlite-utils and its two small
    dependencies, torchattacks) into a target folder, then put it and the checkout on PYTHONPATH."""
    wheels = sorted(glob.glob(str(data / "wheels" / "*.whl"))) if data else []
    site = c.work / "site"
    argv = c.py("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--disable-pip-version-check", "--target", site, *wheels)
    if not wheels:
        c.failed.append("install")
        c.figure("install", None, "s", " ".join(argv), status="no wheels", reason=f"no wheels/*.whl under {data}")
        return
    t0 = time.monotonic()
    _, _, ok = c.run("install", argv, "s")
    if not ok:
        return
    c.env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    probe = "import sqlite_utils, epcli.store, epcli.cli; print('ok')"  # what epcli itself needs
    _, _, ok = c.run("install", c.py("-c", probe), "s")
    # torchattacks only serves reference tests (they skip without it); it imports scipy, which the image may lack
    lines, _, _ = c.run("install", c.py("-c", "import json\ntry:\n    import torchattacks\n    r = None\n"
                                        "except Exception as e:\n    r = f'{type(e).__name__}: {e}'\n"
                                        "print(json.dumps({'torchattacks_error': r}))"), "s")
    ta_error = lines[-1].get("torchattacks_error") if lines else "the probe printed nothing"
    if ok:
        c.figure("install", round(time.monotonic() - t0, 1), "s", " ".join(argv),
                 wheels=[Path(w).name for w in wheels], status="ok", torchattacks="importable" if ta_error is None
                 else f"not importable ({ta_error}): its reference tests skip")


def prepare_data(c: Check, archive: Path | None) -> str | None:
    """Decode the dataset once into the cache every later step reads (EPCLI_CACHE)."""
    name = None if c.smoke else (str(archive) if archive else None)
    if not c.smoke and archive is None:  # go on with the embedded set: every step still runs, on 6,000 images
        c.failed.append("data")
        c.figure("dataset decode", None, "s", "", status="no archive",
                 reason=f"no {ARCHIVE} in the data folder: the later steps use the embedded 6,000-image set")
        return "cifar10-mini"
    code = ("import json, sys, time; t = time.perf_counter(); from epcli.data import load_dataset; "
            f"d = load_dataset({name!r}, cache_dir={str(c.work / 'cache')!r}); "
            "print(json.dumps(dict(seconds=round(time.perf_counter() - t, 2), name=d.name, n_train=len(d.train_y), "
            "n_test=len(d.test_y), sha256=d.sha256)))")
    lines, _, ok = c.run("data", c.py("-c", code), "s")
    if ok and lines:
        d = lines[-1]
        c.figure("dataset decode", d["seconds"], "s", f"load_dataset({name!r})", dataset=d["name"],
                 n_train=d["n_train"], n_test=d["n_test"], sha256=d["sha256"])
    return name


def cuda_tests(c: Check) -> None:
    """pytest -m cuda, one line per test (-v), so that a run cut by its budget still says what passed."""
    where = ["tests/test_cuda.py"] if c.smoke else ["tests"]  # smoke: they all skip; spare collecting the rest
    # a test file that cannot be imported on the image (a test extra it lacks) must not stop the others
    argv = c.py("-m", "pytest", "-v", "-m", "cuda", "-rfE", "--durations=15", "-p", "no:cacheprovider",
                "--continue-on-collection-errors", *where)
    c.env["EPCLI_TEST_THREADS"] = str(min(8, os.cpu_count() or 1))  # the CPU halves of the comparisons
    _, text, _ = c.run("cuda-tests", argv, "tests passed")
    results = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
    counts = {k: 0 for k in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")}
    for _, r in results:
        counts[r] += 1
    summary = [s for s in text.splitlines() if re.search(r"\b(passed|failed|skipped|errors?)\b.* in [\d.]+s", s)]
    if results or summary:
        c.figure("cuda tests", counts["PASSED"], "tests passed", " ".join(argv), failed=counts["FAILED"],
                 errors=counts["ERROR"], skipped=counts["SKIPPED"], complete=bool(summary),
                 failed_tests=[t for t, r in results if r in ("FAILED", "ERROR")][:40],
                 summary=summary[-1].strip("= ") if summary else "cut by its budget: counts of the tests that ran")


def ep_bench(c: Check) -> None:
    """bench_ep.py on the paper net (T1=250, T2=30, β=0.5): fp32 and fp16 at batch 128 and 256, the reference
    approach and the plain explicit baseline in the same run at batch 128 fp32; smoke: ep-cnn-tiny, T1=6, T2=2,
    tiny batches."""
    if c.smoke:
        size = ["--preset", "ep-cnn-tiny", "--T1", "6", "--T2", "2", "--iters", "1", "--epoch-images", "64",
                "--check-images", "4"]
        batches = {128: "8", 256: "16"}
    else:
        size = ["--iters", "20", "--check-images", "8"]
        batches = {128: "128", 256: "256"}
    runs = [("ep-fp32-b128", 128, "fp32", True), ("ep-fp32-b256", 256, "fp32", False),
            ("ep-fp16-b128", 128, "fp16", False), ("ep-fp16-b256", 256, "fp16", False)]
    for step, b, dtype, reference in runs:
        argv = c.py("bench/bench_ep.py", *size, "--batch", batches[b], "--dtype", dtype, "--update", "sync",
                    *(["--reference", "--baseline", "explicit"] if reference else []))
        lines, _, _ = c.run(step, argv, "s/epoch")
        cmd = " ".join(argv)
        for d in lines:
            what, impl = d.get("what"), d.get("impl")
            common = dict(preset=d.get("preset"), batch=d.get("batch"), dtype=d.get("dtype"),
                          update=d.get("update"))
            if c.card.startswith("cpu") and dtype == "fp16":
                common["note"] = "fp16 relaxation is CUDA only: on the CPU this ran in fp32"
            if what == "train":
                c.figure(f"EP training ({impl})", d["value"], "s/epoch", cmd, T1=d.get("T1"), T2=d.get("T2"),
                         beta=d.get("beta"), s_per_batch=d.get("s_per_batch"), epoch_images=d.get("epoch_images"),
                         timed_batches=d.get("iters"), **common)
                if d.get("peak_mib") is not None:
                    c.figure(f"EP peak memory ({impl})", d["peak_mib"], "MiB", cmd, measured=d.get("peak_memory"),
                             **{**common, "note": "over the training and inference timings of this "
                                "implementation" + (f"; {common['note']}" if "note" in common else "")})
            elif what == "inference":
                c.figure(f"EP inference ({impl}, {'converged T' if d.get('converged') else 'T=T1'})", d["value"],
                         "images/s", cmd, T=d.get("T"), **common)
            elif what in ("train ratio", "inference ratio"):
                c.figure(f"EP {what} {d.get('baseline', 'reference-style')} / epcli", d["value"], "x", cmd, **common)
            elif what == "agreement":
                against = {"explicit": "the plain explicit baseline"}.get(d.get("baseline"), "the reference approach")
                c.figure(f"EP agreement with {against} (fp64)", d.get("ok"), "ok", cmd,
                         **{k: v for k, v in d.items() if k.startswith(("fp64_", "T1_", "steps_"))}, **common)


def fp16_cosine(c: Check, data: str | None) -> None:
    """The fp16 relaxation's EP update against fp32 states, per layer, on the paper net at T1=250, T2=30."""
    size = ["--preset", "ep-cnn-tiny", "--T1", "8", "--T2", "3", "--batch", "8"] if c.smoke else ["--data", data]
    argv = c.py("bench/bench_fp16.py", *size)
    lines, _, _ = c.run("fp16-cosine", argv, "cosine")
    for d in lines:
        if d.get("bench") == "fp16":
            c.figure("fp16 EP update cosine vs fp32 (min over layers)", d["min_cosine"], "cosine", " ".join(argv),
                     per_layer=d["cosines"], passes_099=d["passes_0.99"], preset=d["preset"], T1=d["T1"], T2=d["T2"],
                     batch=d["batch"], relax_dtype=d["relax_dtype"],
                     **({"note": "fp16 relaxation is CUDA only: on the CPU both sides ran in fp32"}
                        if c.card.startswith("cpu") else {}))


def probe(c: Check, step: str, data: str | None, model: str, recipe: str, save: Path | None) -> None:
    real = {"probe-fast-ep": 180, "probe-fast-cnn": 60}[step]
    if c.smoke:
        sizes = {"probe-fast-ep": ["--model", "ep-cnn-tiny", "--set", "epochs=2", "batch_size=32", "ep.T1=8",
                                   "ep.T2=3", "optimizer.lrs=null"],
                 "probe-fast-cnn": ["--model", "cnn-small", "--set", "epochs=3", "batch_size=64", "compile=false"]}
        argv = c.py("bench/bench_probe.py", "--recipe", recipe, *sizes[step], "--budget", 5,
                    "--train", 200, "--test", 100)
    else:
        argv = c.py("bench/bench_probe.py", "--model", model, "--recipe", recipe, "--budget", real,
                    "--data", data)
    if save is not None:
        argv += ["--save", str(save)]
    lines, _, _ = c.run(step, argv, "% test accuracy")
    for d in lines:
        if d.get("bench") == "probe":
            c.figure(f"accuracy probe {recipe}", round(100 * d["test_acc"], 2), "% test accuracy", " ".join(argv),
                     model=d["model"], budget_s=d["budget_s"], epochs=d["epochs"], recipe_epochs=d["recipe_epochs"],
                     seconds=d["seconds"], test_accs=d["test_accs"], n_train=d["n_train"], n_test=d["n_test"],
                     amp=d["amp"], compile=d["compile"], ep=d["ep"])
            later = d["epoch_seconds"][1:] or d["epoch_seconds"]
            c.figure(f"training {d['model']} ({recipe})", round(sorted(later)[len(later) // 2], 2), "s/epoch",
                     " ".join(argv), epoch_seconds=d["epoch_seconds"], n_train=d["n_train"],
                     note=("median epoch after the first (which holds compilation / warm-up)" if len(later) <
                           len(d["epoch_seconds"]) else "the only epoch (compilation / warm-up inside)")
                     + "; test pass included")


def attacks(c: Check, data: str | None, ckpt: Path | None) -> None:
    """PGD-20 L-inf 8/255 with exact gradients (bptt) and with `implicit`, Square at 1,000 queries, on the
    paper EP-CNN: the probe's briefly trained weights when they exist, else random ones (speed only)."""
    net = ["--checkpoint", str(ckpt)] if ckpt and ckpt.exists() else ["--model", "ep-cnn-tiny" if c.smoke else "ep-cnn"]
    where = [] if c.smoke else ["--dataset", data]
    n_pgd, n_imp, n_sq, q = (16, 16, 8, 20) if c.smoke else (100, 200, 64, 1000)
    plan = [("attack-pgd-bptt", "pgd", "bptt", n_pgd), ("attack-pgd-implicit", "pgd", "implicit", n_imp),
            ("attack-square", "square", "bptt", n_sq)]
    for step, only, mode, n in plan:
        argv = c.py("bench/bench_attacks.py", *net, *where, "--only", only, "--grad-mode", mode, "--n", n,
                    "--batch-size", n, "--square-queries", q)
        lines, _, _ = c.run(step, argv, "s per 1,000 images")
        for d in lines:
            attacked = max(1, round(d["n"] * d["clean_accuracy"]))
            detail = dict(n=d["n"], attacked=attacked, seconds=d["seconds"], grad_mode=d["grad_mode"],
                          clean_accuracy=d["clean_accuracy"], robust_accuracy=d["robust_accuracy"],
                          forward_passes=d["forward_passes"], batch_size=d["batch_size"], model=net[-1],
                          note="only clean-correct images are attacked")
            if only == "pgd":
                c.figure(f"PGD-20 Linf 8/255 ({mode})", round(d["seconds"] * 1000 / d["n"], 2),
                         "s per 1,000 images", " ".join(argv),
                         extrapolated_10k_s=round(d["seconds"] * 10000 / d["n"], 1), **detail)
            else:
                c.figure(f"Square Linf 8/255 ({q} queries)", round(d["seconds"] * 1000 / d["n"] * 1000 / q, 2),
                         "s per 1,000 queries per 1,000 images", " ".join(argv), queries=q, **detail)


def corruptions(c: Check, data: str | None) -> None:
    argv = c.py("bench/bench_corruptions.py", "--data", data or "cifar10-mini", *(["--n", "10"] if c.smoke else []))
    lines, _, _ = c.run("corruptions", argv, "images/s")
    cells = [d for d in lines if "corruption" in d]
    summary = [d for d in lines if d.get("summary") == "generate"]
    if summary:
        s = summary[-1]
        c.figure("corruptions 19x5 generation", s["images_per_s"], "images/s", " ".join(argv), seconds=s["seconds"],
                 images=s["images"], cells=s["cells"], n=s["n"], seconds_per_corruption=s["seconds_per_corruption"])
    elif cells:  # ran out of time: what the finished cells say
        seconds = sum(d["seconds"] for d in cells)
        c.figure("corruptions 19x5 generation", round(sum(d["n"] for d in cells) / seconds, 1), "images/s",
                 " ".join(argv), seconds=round(seconds, 2), cells=len(cells), n=cells[0]["n"], partial=True)


def baselines(c: Check, data: str | None) -> None:
    extra = ["--smoke", "--smoke-images", "64", "50"] if c.smoke else ["--data", data, "--preset", "paper",
                                                                        "--epochs", "1"]
    argv = c.py("bench/bench_baselines.py", "--jobs", "cnn", "vit", "cnn-at", *extra)
    lines, _, _ = c.run("baselines", argv, "s/epoch")
    for d in lines:
        if d.get("bench") == "baselines":
            c.figure(f"training {d['job']} ({d['recipe']})", round(d["seconds"] / max(1, d["epochs"]), 2), "s/epoch",
                     " ".join(argv), epochs=d["epochs"], n_train=d["n_train"], clean_acc=d["clean_acc"],
                     note="one epoch, test pass included, first epoch (cuDNN autotune inside)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for figures.jsonl and device_check.log (created)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with wheels/ and the CIFAR-10 archive (default: .data, else ../shared)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (570; smoke 170)")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply every step's budget and the total by this (a slower or shared machine)")
    p.add_argument("--only", nargs="*", default=None, choices=list(BUDGETS) + ["ep", "probes", "attacks"],
                   help="run only these steps (install and data always run)")
    a = p.parse_args(argv)
    data = a.data or next((d for d in (REPO / ".data", REPO.parent / "shared") if d.is_dir()), None)
    a.out.mkdir(parents=True, exist_ok=True)
    c = Check(a.out, a.smoke, a.time_scale * (a.budget or (170 if a.smoke else 570)), sys.executable, a.time_scale)
    want = lambda *steps: a.only is None or any(s in a.only for s in steps)  # noqa: E731
    c.figure("device check", None, "", " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv]),
             python=platform.python_version(), host=platform.node(), data=str(data), budget_s=round(c.deadline
             - time.monotonic()))
    try:
        install(c, data)
        archive = _find(data, ARCHIVE, f"datasets/{ARCHIVE}")
        name = prepare_data(c, archive)
        if want("cuda-tests"):
            cuda_tests(c)
        if want("ep", "ep-fp32-b128", "ep-fp32-b256", "ep-fp16-b128", "ep-fp16-b256"):
            ep_bench(c)
        if want("fp16-cosine"):
            fp16_cosine(c, name)
        ckpt = c.work / "probe-fast-ep.safetensors"
        if want("probes", "probe-fast-ep"):
            probe(c, "probe-fast-ep", name, "ep-cnn", "fast-ep", ckpt)
        if want("attacks", "attack-pgd-bptt", "attack-pgd-implicit", "attack-square"):
            attacks(c, name, ckpt)
        if want("corruptions"):
            corruptions(c, name)
        if want("baselines"):
            baselines(c, name)
        if want("probes", "probe-fast-cnn"):
            probe(c, "probe-fast-cnn", name, "cnn", "fast-cnn", None)
    finally:
        shutil.rmtree(c.work, ignore_errors=True)
    c.figure("device check done", round(time.monotonic() - c.start, 1), "s", "", failed_steps=c.failed)
    return 1 if c.failed and a.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
