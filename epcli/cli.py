"""The `epcli` command: a thin Typer layer over `epcli.api`.

Human output (tables, progress bars, notes) goes to stderr; `--json` prints one JSON document on stdout,
so `RUN=$(epcli train --model cnn --json | jq -r .run_id)` works. Expected failures print one line
`error: ...` and exit with a documented code (docs/cli.md); `--debug` shows the full traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from rich.table import Table

from epcli import __version__
from epcli.errors import EpcliError

def _typer_click_exceptions() -> list[type]:
    try:  # Typer >= 0.24 vendors Click under typer._click
        from typer._click import exceptions as tce
        return [tce.ClickException, getattr(tce, "Abort", tce.ClickException)]
    except ImportError:
        return []


err = Console(stderr=True)
_PASS_THROUGH = tuple({typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException,
                       click.exceptions.Abort, *_typer_click_exceptions()})


class EpcliGroup(TyperGroup):
    """Maps expected failures to one line on stderr and a documented exit code (CliRunner sees it too)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EpcliError as e:
            if STATE.debug:
                raise
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.code)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/] (the run is marked interrupted; everything stored so far is kept)")
            raise typer.Exit(130)
        except _PASS_THROUGH:  # exits, help, usage errors: Typer/Click handle them
            raise
        except Exception as e:  # anything else is a bug: still one line unless --debug
            if STATE.debug or os.environ.get("EPCLI_DEBUG"):
                raise
            err.print(f"[red]error:[/] {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1)


app = typer.Typer(
    name="epcli", cls=EpcliGroup, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="How robust are energy-based models trained with Equilibrium Propagation? Train EP-CNNs and "
         "baselines, attack them, corrupt them, and report - every run recorded in a local artifact store.",
    epilog="Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 not found, 4 bad checkpoint, 5 store error, "
           "6 training diverged, 7 results flagged unreliable (--strict), 130 interrupted.",
)


class Ctx:
    store_path: Optional[str] = None
    debug: bool = False
    quiet: bool = False


STATE = Ctx()

StoreOpt = Annotated[Optional[str], typer.Option("--store", envvar="EPCLI_STORE",
                                                 help="Artifact-store folder (default: ./store).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable result on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", envvar="EPCLI_DEVICE", help="auto, cpu, cuda or cuda:N.")]
SeedOpt = Annotated[int, typer.Option("--seed", envvar="EPCLI_SEED", help="Random seed.")]
DataOpt = Annotated[Optional[str], typer.Option(
    "--dataset", "-d", help="cifar10-mini (embedded default), cifar10, cifar100, or an ImageFolder "
                            "folder/.tar/.tar.xz. Attack/corrupt default: the model's training dataset.")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", envvar="EPCLI_DATA_DIR",
                                                   help="Where cifar10/cifar100 live (torchvision layout).")]
ModelRefOpt = Annotated[str, typer.Option(
    "--model", "-m", help="A model name (the newest finished training run of it), a run id, or a "
                          "checkpoint .safetensors path.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"epcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    store: StoreOpt = None,
    debug: Annotated[bool, typer.Option("--debug", envvar="EPCLI_DEBUG", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    STATE.store_path = store
    STATE.debug = debug
    STATE.quiet = quiet


def _store(path: Optional[str] = None):
    from epcli.store import Store
    return Store(path or STATE.store_path)


def _emit(result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, default=_jsonable, indent=2))


def _jsonable(o):
    try:
        import torch
        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:
        pass
    if hasattr(o, "__dict__"):
        return {k: v for k, v in vars(o).items() if not k.startswith("_")}
    return str(o)


@contextmanager
def _progress(enabled: bool = True):
    """A rich progress bar on stderr; yields a callback(task, done, total, info)."""
    if STATE.quiet or not enabled:
        yield lambda *a: None
        return
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err, transient=False)
    tasks: dict[str, int] = {}

    def update(task: str, done: int, total: int, info: dict) -> None:
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                         (info or {}).items() if isinstance(v, (int, float, str)))
        if not tasks:
            bar.start()  # lazily: a command that fails early prints nothing but its error line
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total, info="")
        bar.update(tasks[task], completed=done, total=total, info=text[:80])

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def _note(msg: str) -> None:
    if not STATE.quiet:
        err.print(msg)


def _parse_kv(pairs: list[str]) -> dict:
    """--set key=value (dotted keys for nesting, values parsed as JSON when possible)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise EpcliError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            val = json.loads(raw)
        except ValueError:
            val = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


# --- commands -------------------------------------------------------------------------------------------

@app.command(rich_help_panel="Pipeline")
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Registry name: ep-cnn, ep-cnn-cifar100, "
                                       "ep-cnn-small, cnn, cnn-small, resnet18, vit, timm:<name>... "
                                       "(see `epcli models`).")] = "ep-cnn-small",
    dataset: DataOpt = None,
    data_dir: DataDirOpt = None,
    recipe: Annotated[Optional[str], typer.Option(help="Training preset (see `epcli recipes`); default "
                                                  "depends on the model.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Override the recipe's epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Override the recipe's batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Override the base learning rate.")] = None,
    adv_train: Annotated[Optional[str], typer.Option(
        "--adv-train", help="Adversarial training threat model NORM:EPS, e.g. l2:0.5 or linf:8/255 "
                            "(Madry PGD; the paper's preset: L2, 20 steps, step 2.5*eps/20).")] = None,
    T1: Annotated[Optional[int], typer.Option("--T1", help="EP free-phase steps.")] = None,
    T2: Annotated[Optional[int], typer.Option("--T2", help="EP nudged-phase steps.")] = None,
    beta: Annotated[Optional[float], typer.Option(help="EP nudging strength.")] = None,
    rule: Annotated[Optional[str], typer.Option(help="EP learning rule: symmetric, one-sided, bptt.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any recipe key: --set "
                                                      "optimizer.weight_decay=5e-4 (repeatable).")] = None,
    model_set: Annotated[Optional[list[str]], typer.Option(
        "--model-set", help="Any model option: --model-set update=alternate, --model-set T=60, "
                            "--model-set channels=[64,128,256,256] (repeatable; see docs/models.md).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Resume exactly from a run id or checkpoint.")] = None,
    label: Annotated[Optional[str], typer.Option(help="Display name in reports.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a model (EP-CNN by Equilibrium Propagation, or a baseline by backprop) and checkpoint it.

    Examples: `epcli train --model ep-cnn --dataset cifar10 --data-dir ~/data`,
    `epcli train --model cnn --adv-train l2:0.5`, `epcli train --resume <run-id>`.
    """
    from epcli import api
    overrides = _parse_kv(set_ or [])
    if epochs is not None:
        overrides["epochs"] = epochs
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    if lr is not None:
        overrides.setdefault("optimizer", {})["lr"] = lr
    ep = {k: v for k, v in {"T1": T1, "T2": T2, "beta": beta, "rule": rule}.items() if v is not None}
    if ep:
        overrides["ep"] = {**overrides.get("ep", {}), **ep}
    if adv_train:
        if ":" not in adv_train:
            raise EpcliError("--adv-train expects NORM:EPS, e.g. l2:0.5 or linf:8/255")
        norm, eps = adv_train.split(":", 1)
        eps_v = api.parse_eps(eps)[0]
        api.check_eps(norm, [eps_v])
        overrides["adv"] = {**overrides.get("adv", {}), "norm": norm, "eps": eps_v}
    from epcli import distributed
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        api.train(model=model, dataset=dataset, data_dir=data_dir, recipe=recipe, overrides=overrides,
                  seed=seed, device=device, store=None, resume=resume, label=label, argv=sys.argv)
        return
    with _store() as store, _progress() as progress:
        res = api.train(model=model, dataset=dataset, data_dir=data_dir, recipe=recipe, overrides=overrides,
                        model_options=_parse_kv(model_set or []),
                        seed=seed, device=device, store=store, resume=resume, label=label, argv=sys.argv,
                        progress=progress)
    _note(f"[green]trained[/] {res['model']} on {res['dataset']}: test accuracy {res['test_acc']:.4f} "
          f"(run {res['run_id']})")
    _emit(res, as_json)


@app.command(rich_help_panel="Pipeline")
def attack(
    model: ModelRefOpt = "ep-cnn-small",
    attack_name: Annotated[str, typer.Option("--attack", "-a", help="fgsm, pgd, cw, apgd-ce, apgd-dlr, apgd-t, "
                                             "fab-t, square, autoattack.")] = "pgd",
    norm: Annotated[str, typer.Option(help="linf or l2.")] = "linf",
    eps: Annotated[str, typer.Option(help="Comma-separated list, fractions allowed: 1/255,2/255,8/255. "
                                     "Presets: paper-linf, paper-l2.")] = "8/255",
    n: Annotated[Optional[int], typer.Option("--n", help="Attack a seeded random subset of n test images "
                                             "(default: the whole test split).")] = None,
    grad_mode: Annotated[str, typer.Option(help="Gradients through a relaxation: bptt (exact), truncated:K, "
                                           "implicit, ep, or transfer:<model>.")] = "bptt",
    steps: Annotated[Optional[int], typer.Option(help="Attack iterations (PGD/APGD/C&W).")] = None,
    step_size: Annotated[Optional[float], typer.Option(help="PGD step size (default 2.5*eps/steps).")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Random restarts.")] = None,
    random_start: Annotated[Optional[bool], typer.Option(help="PGD random start.")] = None,
    queries: Annotated[Optional[int], typer.Option(help="Square: query budget.")] = None,
    targeted: Annotated[bool, typer.Option(help="Targeted variant where the attack has one.")] = False,
    labels: Annotated[str, typer.Option(help="true, or predicted (the paper's ART default).")] = "true",
    T: Annotated[Optional[int], typer.Option("--T", help="Relaxation steps for predictions.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (backs off on OOM).")] = None,
    dataset: DataOpt = None,
    data_dir: DataDirOpt = None,
    unroll_sweep: Annotated[Optional[str], typer.Option(
        help="EP only: also attack with gradients through K-step unrolls, e.g. 10,15,20,25,29,60,70 (the paper's "
             "obfuscation check); stored per K and checked.")] = None,
    checks: Annotated[bool, typer.Option(help="Run the reliability checks (monotone, large eps, PGD strength, "
                                         "white- vs black-box on stored runs).")] = True,
    strength_check: Annotated[bool, typer.Option(help="PGD: re-run 2x steps and restarts on a subset.")] = True,
    strict: Annotated[bool, typer.Option(help="Exit 7 when a reliability check fails.")] = False,
    chunk: Annotated[Optional[int], typer.Option(
        help="Images per resumable chunk (saved as it finishes; the unit each torchrun process attacks). "
             "Part of the result: chunk k is seeded from --seed and k.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Attack a trained model on the test set for every eps; checks reliability and stores everything.

    Examples: `epcli attack --model vit`, `epcli attack -m ep-cnn --norm l2 --eps paper-l2`,
    `epcli attack -m ep-cnn -a autoattack --eps 8/255`, `epcli attack -m ep-cnn --grad-mode truncated:70`.
    """
    from epcli import api
    presets = {"paper-linf": "0.0001,0.000215,0.000464,0.001,0.002154,0.004642,0.01,0.021544,8/255,0.046416,0.1",
               "paper-l2": "0.05,0.0788,0.1242,0.1957,0.3085,0.4862,0.7663,1.0,1.2077,1.9035,3.0"}
    eps = presets.get(eps, eps)
    params = {k: v for k, v in {"steps": steps, "step_size": step_size, "restarts": restarts,
                                "random_start": random_start, "n_queries": queries,
                                "targeted": targeted or None}.items() if v is not None}
    from epcli import distributed
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        api.attack(model=model, device=device, store=None)
        return
    with _store() as store, _progress() as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = api.attack(model=model, attack=attack_name, norm=norm, eps=eps, dataset=dataset,
                         data_dir=data_dir, n=n, seed=seed, grad_mode=grad_mode, batch_size=batch_size,
                         labels=labels, params=params, T=T, device=device, store=store, argv=sys.argv,
                         checks=checks, strength=strength_check, progress=progress,
                         **({"chunk": chunk} if chunk is not None else {}),
                         unroll_sweep=[int(k) for k in unroll_sweep.split(",") if k.strip()] if unroll_sweep
                         else None)
    for w in caught:
        _note(f"[yellow]warning:[/] {w.message}")
    if not STATE.quiet:
        t = Table(title=f"{attack_name} {norm} on {res['model']} ({res['n_examples']} images, "
                        f"grad {grad_mode})")
        t.add_column("eps")
        t.add_column("robust acc", justify="right")
        for gm in res.get("unroll_sweep") or {}:
            t.add_column(gm, justify="right")
        t.add_row("clean", f"{res['clean_acc']:.4f}", *["" for _ in res.get("unroll_sweep") or {}])
        for e, a in res["robust_acc"].items():
            t.add_row(e, f"{a:.4f}" + (" !" if res["unreliable"] else ""),
                      *[f"{accs[e]:.4f}" for accs in (res.get("unroll_sweep") or {}).values()])
        err.print(t)
        if res["unreliable"]:
            err.print(f"[red]unreliable:[/] {res['reason']}")
    _emit(res, as_json)
    if strict and res["unreliable"]:
        raise typer.Exit(7)


@app.command(rich_help_panel="Pipeline")
def corrupt(
    model: ModelRefOpt = "ep-cnn-small",
    corruption: Annotated[Optional[list[str]], typer.Option(
        "--corruption", "-c", help="Corruption name (repeatable; default: all 19).")] = None,
    severity: Annotated[Optional[list[int]], typer.Option("--severity", "-s",
                                                          help="1-5 (repeatable; default all).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Seeded subset of n test images.")] = None,
    source: Annotated[Optional[str], typer.Option(help="Evaluate the official CIFAR-10-C/100-C .npy files in "
                                                  "this folder instead of generating.")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Model/run for relative mCE.")] = None,
    export: Annotated[Optional[str], typer.Option(help="Only write a generated set in the official .npy "
                                                 "layout to this folder (no model needed).")] = None,
    T: Annotated[Optional[int], typer.Option("--T", help="Relaxation steps for predictions.")] = None,
    batch_size: Annotated[int, typer.Option(help="Evaluation batch size.")] = 500,
    dataset: DataOpt = None,
    data_dir: DataDirOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a trained model under CIFAR-10-C natural corruptions (19 x 5 severities), seeded.

    Examples: `epcli corrupt --model ep-cnn`, `epcli corrupt -m cnn -c fog -c contrast -s 5`,
    `epcli corrupt --export cifar10c/ --dataset cifar10`.
    """
    from epcli import api, distributed
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        if not export:
            api.corrupt(model=model, device=device, store=None)
        return
    with _store() as store, _progress() as progress:
        if export:
            res = api.export_corruptions(directory=export, names=corruption, dataset=dataset,
                                         data_dir=data_dir, n=n, seed=seed, store=store)
            _note(f"wrote {len(res['corruptions'])} corruptions x 5 severities to {export}")
            _emit(res, as_json)
            return
        res = api.corrupt(model=model, names=corruption, severities=severity, dataset=dataset,
                          data_dir=data_dir, n=n, seed=seed, source=source, reference=reference,
                          batch_size=batch_size, T=T, device=device, store=store, argv=sys.argv,
                          progress=progress)
    _note(f"{res['model']}: clean {res['clean_acc']:.4f}, corruption mean (15) "
          f"{_fmt(res.get('corruption_mean_acc'))}, all 19 {_fmt(res.get('corruption_mean_acc_all'))}, "
          f"mCE (unnormalised) {_fmt(res.get('mce_unnormalized'))} (run {res['run_id']})")
    _emit(res, as_json)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


@app.command(rich_help_panel="Pipeline")
def report(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model names (repeatable).")] = None,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Training run ids (repeatable).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Only this dataset.")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table, csv, json, md, html or robustbench. md and html include epcli beside the "
                               "paper's numbers.")] = "table",
    out: Annotated[Optional[str], typer.Option(help="Write files (and figures) to this folder.")] = None,
    figures: Annotated[bool, typer.Option(help="Also draw the figures (PNG + SVG).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare every model under every threat, from the store alone (no recomputation).

    Examples: `epcli report`, `epcli report -f md`, `epcli report -f html --out reports/`.
    """
    from epcli import api
    from epcli import report as R
    with _store() as store:
        res = api.report(store=store, models=model, runs=run, dataset=dataset,
                         fmt="json" if as_json and fmt == "table" else fmt, out=out, figures=figures,
                         argv=sys.argv)
        if fmt == "table" and not as_json:
            Console().print(R.leaderboard_table(res["data"]))
        elif not as_json and res["text"] is not None and not out:
            typer.echo(res["text"])
    for f in res["files"]:
        _note(f"wrote {f}")
    if as_json:
        typer.echo(res["text"] if not out else json.dumps({"run_id": res["run_id"], "files": res["files"]}))


@app.command(rich_help_panel="Pipeline")
def demo(
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole study in miniature on the embedded real CIFAR-10 images: train a small EP-CNN and a small
    CNN, attack both (PGD L-inf and L2), corrupt both, and print the comparison (minutes on a laptop CPU)."""
    from epcli import api
    with _store(store) as st, _progress() as progress:
        res = api.demo(store=st, device=device, progress=progress, note=_note)
    from epcli import report as R
    err.print(R.leaderboard_table(res["data"]))
    _note(f"store: {st.root}  -  try `epcli runs`, `epcli trace {res['runs'][0]}`, `epcli report -f md`")
    res.pop("data", None)
    _emit(res, as_json)


# --- store inspection -----------------------------------------------------------------------------------

@app.command("runs", rich_help_panel="Store")
def list_runs(
    kind: Annotated[Optional[str], typer.Option(help="train, attack, corrupt or report.")] = None,
    status: Annotated[Optional[str], typer.Option(help="running, finished, failed, interrupted.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m")] = None,
    limit: Annotated[int, typer.Option(help="Newest N.")] = 30,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    with _store() as store:
        rows = store.runs(kind=kind, status=status, model=model, limit=limit)
    if as_json:
        _emit(rows, True)
        return
    t = Table(title=f"runs in {STATE.store_path or 'store'}")
    for c in ("id", "kind", "status", "model", "dataset", "started", "summary"):
        t.add_column(c)
    for r in rows:
        summ = r.get("summary") or {}
        brief = ", ".join(f"{k}={v:.4g}" for k, v in summ.items() if isinstance(v, float))[:60] \
            if isinstance(summ, dict) else ""
        color = {"finished": "green", "failed": "red", "interrupted": "yellow"}.get(r["status"], "cyan")
        t.add_row(r["id"], r["kind"], f"[{color}]{r['status']}[/]", r["model"] or "", r["dataset"] or "",
                  (r["started_at"] or "")[:19], brief)
    Console().print(t)


@app.command(rich_help_panel="Store")
def show(run_id: Annotated[str, typer.Argument(help="Run id or unique prefix.")], as_json: JsonOpt = False
         ) -> None:
    """Show one run: config, status, metrics, checks and artifacts."""
    with _store() as store:
        run = store.get_run(run_id)
        arts = store.artifacts_of(run["id"])
        mets = store.metrics(run["id"])
        checks = store.checks(run["id"])
    if as_json:
        _emit({"run": run, "artifacts": arts, "metrics": mets, "checks": checks}, True)
        return
    c = Console()
    c.print(f"[bold]{run['id']}[/] {run['kind']} [{run['status']}] {run['model'] or ''} {run['dataset'] or ''}")
    if run.get("error"):
        c.print(f"[red]error:[/] {run['error']}")
    c.print_json(json.dumps(run["config"], default=str))
    if mets:
        t = Table(title="metrics")
        for col in ("name", "value", "step", "attack", "norm", "eps", "grad_mode", "corruption", "severity",
                    "n_examples", "unreliable"):
            t.add_column(col)
        for m in mets[:200]:
            t.add_row(*["" if m.get(k) is None else (f"{m[k]:.4g}" if isinstance(m[k], float) else str(m[k]))
                        for k in ("name", "value", "step", "attack", "norm", "eps", "grad_mode", "corruption",
                                  "severity", "n_examples", "unreliable")])
        c.print(t)
    for ch in checks:
        c.print(f"check {ch['name']}: {'[green]passed' if ch['passed'] else '[red]FAILED'}[/] {ch['detail']}")
    for a in arts:
        c.print(f"{a['role']:6} {a['kind']:22} {a['sha256'][:12]} {a['size']:>10} {a['path']}")


@app.command(rich_help_panel="Store")
def compare(
    run_a: Annotated[str, typer.Argument(help="An attack run id (or prefix).")],
    run_b: Annotated[str, typer.Argument(help="Another attack run id, e.g. of another model.")],
    as_json: JsonOpt = False,
) -> None:
    """Paired comparison of two attack runs on their common test points: who is robust where, and the exact
    McNemar p-value per eps."""
    from epcli import api
    with _store() as store:
        res = api.compare(store=store, run_a=run_a, run_b=run_b)
    if as_json:
        _emit(res, True)
        return
    t = Table(title=f"A = {res['model_a']} ({res['attack_a']} {res['norm_a']}, {res['run_a']})  vs  "
                    f"B = {res['model_b']} ({res['attack_b']} {res['norm_b']}, {res['run_b']})")
    for col in ("eps", "n", "robust A", "robust B", "both", "only A", "only B", "McNemar p"):
        t.add_column(col, justify="right")
    for r in res["rows"]:
        t.add_row(r["eps_label"], str(r["n"]), f"{r['acc_a']:.4f}", f"{r['acc_b']:.4f}", str(r["both"]),
                  str(r["only_a"]), str(r["only_b"]), f"{r['mcnemar_p']:.3g}")
    Console().print(t)


@app.command(rich_help_panel="Store")
def trace(run_id: Annotated[str, typer.Argument(help="A training run id (or any run id).")]) -> None:
    """Lineage: everything derived from a run (attacks, corruptions, reports) as a tree."""
    from epcli import report as R
    with _store() as store:
        run = store.get_run(run_id)
        Console().print(R.lineage_tree(store, run["id"]))


@app.command(rich_help_panel="Store")
def models(as_json: JsonOpt = False) -> None:
    """List the registered model names."""
    from epcli.models import list_models
    names = list_models()
    if as_json:
        _emit(names, True)
    else:
        typer.echo("\n".join(names))


@app.command(rich_help_panel="Store")
def recipes(name: Annotated[Optional[str], typer.Argument(help="Show one recipe in full.")] = None,
            as_json: JsonOpt = False) -> None:
    """List the training presets, or show one."""
    from epcli.train import RECIPES, resolve_recipe
    if name:
        _emit(resolve_recipe(name, {}), True)
    elif as_json:
        _emit(sorted(RECIPES), True)
    else:
        typer.echo("\n".join(sorted(RECIPES)))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
