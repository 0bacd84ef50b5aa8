"""The `epcli` command: a thin Typer layer over `epcli.api`.

Human output (tables, progress bars, notes) goes to stderr; `--json` prints one JSON document on stdout,
so `RUN=$(epcli train --model cnn --json | jq -r .run_id)` works. Expected failures print one line
`error: ...` and exit with a documented code (docs/cli.md); `--debug` shows the full traceback.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.table import Table

from epcli import __version__
from epcli.errors import EpcliError, NotFoundError, Terminated, UsageError, printable

def _typer_click_exceptions() -> list[type]:
    try:  # Typer >= 0.24 vendors Click under typer._click
        from typer._click import exceptions as tce
        return [tce.ClickException, getattr(tce, "Abort", tce.ClickException)]
    except ImportError:
        return []


def _plain_click_exceptions() -> list[type]:
    try:  # older Typer builds on plain Click; newer ones vendor it, and Click itself may then be absent
        import click
        return [click.ClickException, click.exceptions.Abort, click.exceptions.Exit]
    except ImportError:
        return []


err = Console(stderr=True)
_PLAIN, _VENDORED = _plain_click_exceptions(), _typer_click_exceptions()
_CLICK_ERRORS = tuple({*_PLAIN[:1], *_VENDORED[:1]})
_ABORTS = tuple({*_PLAIN[1:2], *_VENDORED[1:]})
_PASS_THROUGH = tuple({typer.Exit, typer.Abort, *_PLAIN, *_VENDORED})


def _flag_metavars(params: list) -> list:
    """In --help a flag takes no value, so it gets no "<bool>" type."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


def _plain_flags(cmd) -> None:
    get_params = cmd.get_params
    cmd.get_params = lambda ctx: _flag_metavars(get_params(ctx))
def print_error(message: str, *, hint: str = "") -> None:
    """The one error printer: `error: <message>` on stderr, user text escaped so it is never read as markup."""
    line = " ".join(str(message).split())  # one line, whatever the message carried
    err.print(f"[red]error:[/] {_escape(line)}{hint}", highlight=False, soft_wrap=True, markup=True)


def _failure_code(e: BaseException) -> int | None:
    """Exit code for failures that are not EpcliErrors but have a documented code (disk full, database)."""
    import errno
    import sqlite3
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return 5
    if isinstance(e, sqlite3.Error):
        return 5
    if "No space left on device" in str(e) or "disk is full" in str(e):
        return 5  # safetensors and sqlite report a full disk as their own exception types
    return None


def _reader_left() -> None:
    """The reader of our output closed the pipe (`epcli runs --json | head -3`): end quietly, as Click does (exit
    1, no message: there is no one to tell, and what was stored is kept). Was `error: BrokenPipeError` (and
    Python's own complaint when it flushed stdout at exit). Stdout now goes to /dev/null for that last flush."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (CliRunner)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class EpcliGroup(TyperGroup):
    """Maps expected failures to one line on stderr and a documented exit code (CliRunner sees it too)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for cmd in self.commands.values():
            _plain_flags(cmd)

    def get_params(self, ctx):
        return _flag_metavars(super().get_params(ctx))

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage errors (unknown option, missing argument, bad choice) as one `error:` line too, exit 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _CLICK_ERRORS as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `epcli`: Typer has printed the help already
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            option = getattr(e, "option_name", None)
            own = {o: p for p in self.params for o in p.opts}
            if type(e).__name__ == "NoSuchOption" and option in own:
                # `epcli runs --store x`: was only "No such option: --store (Possible options: --json, --sort)"
                value = "" if getattr(own[option], "is_flag", False) else " VALUE"
                hint = f" ({option} is an option of epcli itself: give it before the command, 'epcli {option}{value} " \
                       f"{ctx.info_name if ctx else 'COMMAND'} ...')"
            print_error(e.format_message(), hint=_escape(hint))
            sys.exit(e.exit_code)
        except _ABORTS:
            print_error("aborted")
            sys.exit(1)
        except BrokenPipeError:
            _reader_left()
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EpcliError as e:
            if STATE.debug:
                raise
            print_error(str(e))
            raise typer.Exit(e.code)
        except KeyboardInterrupt as e:
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            err.print(f"[yellow]{what}[/] (the run is marked interrupted; everything stored so far is kept)")
            raise typer.Exit(e.code if isinstance(e, Terminated) else 130)
        except _PASS_THROUGH:  # exits, help, usage errors: Typer/Click handle them
            raise
        except BrokenPipeError:  # the reader of our output left: main() ends quietly
            raise
        except Exception as e:  # anything else is a bug: still one line unless --debug
            if STATE.debug:  # --debug or EPCLI_DEBUG as Click reads it (was any EPCLI_DEBUG at all: "0", "false")
                raise
            code = _failure_code(e)
            if code is not None:
                print_error(f"{e}" if isinstance(e, OSError) else f"{type(e).__name__}: {e}")
                raise typer.Exit(code)
            print_error(f"{type(e).__name__}: {e}", hint=" (rerun with --debug for the traceback)")
            raise typer.Exit(1)


app = typer.Typer(
    name="epcli", cls=EpcliGroup, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
    help="How robust are energy-based models trained with Equilibrium Propagation? Train EP-CNNs and "
         "baselines, attack them, corrupt them, and report - every run recorded in a local artifact store.",
    epilog="Exit codes: 0 ok, 1 runtime error, 2 usage error, 3 not found, 4 bad checkpoint, 5 store error, "
           "6 training diverged, 7 results flagged unreliable (--strict), 130 interrupted, 143 terminated "
           "(SIGTERM).",
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
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr (same as the "
                                                                  "global -q).")]
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


def _store(path: Optional[str] = None, write: bool = True):
    """The store. Commands that only read never create one (a typo in --store is an error, not a new empty
    store), and open a store they cannot write read-only."""
    from epcli.store import Store
    if (path or STATE.store_path) is not None and not str(path or STATE.store_path).strip():
        raise UsageError("--store is empty: give the store folder or leave the option out (default ./store)")
    store = Store(path or STATE.store_path, create=write)
    if store.created:
        _note(f"[dim]created a new store at {_escape(str(store.root))}[/]")
    return store


def _escape(text: str) -> str:
    """User text (notes, tags, labels, paths) as shown: never read as markup, and its terminal control characters
    written out (ESC as \\x1b), so that a note in a shared store cannot clear the screen or retitle the terminal."""
    from rich.markup import escape
    return escape(printable(text))


# DEL and the C1 controls, which JSON may carry raw (json.dumps does): as \u escapes, the same JSON value, and
# nothing a terminal obeys when the document is printed to one (a note holding "\x9b" was a CSI sequence)
_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}


def _emit(result, as_json: bool) -> None:
    """Print one JSON document on stdout (already shaped by epcli.schema: the documented contract)."""
    if as_json:
        typer.echo(json.dumps(result, default=_jsonable, indent=2, ensure_ascii=False).translate(_JSON_CONTROLS))


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
    """Named stages on stderr (epcli/progress.py): live bars on a terminal, one plain line per finished stage
    otherwise; yields the callback(task, done, total, info) the pipelines call."""
    if STATE.quiet or not enabled:
        yield lambda *a: None
        return
    from epcli.progress import StageProgress
    with StageProgress() as sink:
        yield sink


def _note(msg: str) -> None:
    if not STATE.quiet:
        err.print(msg)


def _parse_kv(pairs: list[str], option: str = "--set") -> dict:
    """--set key=value (dotted keys for nesting, values parsed as JSON when possible)."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(p.strip() for p in parts):
            raise UsageError(f"{option} expects key=value (dotted keys allowed), got {pair!r}")
        try:
            val = json.loads(raw)
        except ValueError:
            val = raw
        if isinstance(val, float) and not math.isfinite(val):
            raise UsageError(f"{option} {key}: {raw} is not a finite number")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"{option} {key}: {p!r} is already set to a value, not a group of keys")
        node[parts[-1]] = val
    return out


def _override(overrides: dict, path: str, value, option: str) -> None:
    """A dedicated option (--epochs, --lr, --T1...) into the --set overrides: the same key from both is refused
    (one of them would be silently dropped)."""
    *groups, key = path.split(".")
    node = overrides
    for g in groups:
        node = node.setdefault(g, {})
        if not isinstance(node, dict):
            raise UsageError(f"{option} sets {path}, but --set {g}={json.dumps(node)} gave {g} a single value")
    if key in node:
        raise UsageError(f"{option} and --set {path} both set {path}: give it once")
    node[key] = value


def _int_list(text: Optional[str], option: str, example: str = "10,15,20") -> Optional[list[int]]:
    """'10,15,20' -> [10, 15, 20]; anything else is a usage error naming the option."""
    if text is None:
        return None
    try:
        values = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{option} expects comma-separated integers, e.g. {example}; got {text!r}")
    return values


# --- commands -------------------------------------------------------------------------------------------

@app.command(rich_help_panel="Pipeline")
def train(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Registry name: ep-cnn, ep-cnn-cifar100, "
                                                 "ep-cnn-small (the default), cnn, cnn-small, resnet18, vit, "
                                                 "timm:<name>... (see `epcli models`).")] = None,
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
    teacher: Annotated[Optional[str], typer.Option(
        help="Distil this EP-CNN (run id, model name = its newest finished run, or .safetensors) into an "
             "ep-student (the model then defaults to ep-student, the data to the teacher's).")] = None,
    label: Annotated[Optional[str], typer.Option(help="Display name in reports.")] = None,
    select: Annotated[Optional[str], typer.Option(
        help="Which epoch the run hands on: last (default), best-val (best on a seeded 10% of the training "
             "set, held out) or best-test (the paper's: selected on the test set; labelled in reports).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", envvar="EPCLI_SEED", help="Random seed "
                                            "(default 0; a resume keeps its run's).")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a model (EP-CNN by Equilibrium Propagation, or a baseline by backprop) and checkpoint it.

    Examples: `epcli train --model ep-cnn --dataset cifar10 --data-dir ~/data`,
    `epcli train --model cnn --adv-train l2:0.5`, `epcli train --resume <run-id>`,
    `epcli train --model ep-student --teacher <ep-cnn run id>`.
    """
    from epcli import api
    STATE.quiet = STATE.quiet or quiet
    overrides = _parse_kv(set_ or [])
    for path, value, option in (("epochs", epochs, "--epochs"), ("batch_size", batch_size, "--batch-size"),
                                ("optimizer.lr", lr, "--lr"), ("ep.T1", T1, "--T1"), ("ep.T2", T2, "--T2"),
                                ("ep.beta", beta, "--beta"), ("ep.rule", rule, "--rule")):
        if value is not None:
            _override(overrides, path, value, option)
    if adv_train:
        if ":" not in adv_train:
            raise UsageError("--adv-train expects NORM:EPS, e.g. l2:0.5 or linf:8/255")
        norm, eps = adv_train.split(":", 1)
        eps_v = api.parse_eps(eps)[0]
        api.check_eps(norm, [eps_v])
        _override(overrides, "adv.norm", norm, "--adv-train")
        _override(overrides, "adv.eps", eps_v, "--adv-train")
    from epcli import distributed
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        api.train(model=model, dataset=dataset, data_dir=data_dir, recipe=recipe, overrides=overrides,
                  seed=seed, device=device, store=None, resume=resume, label=label, argv=sys.argv, select=select,
                  teacher=teacher)
        return
    with _store() as store, _progress() as progress:
        res = api.train(model=model, dataset=dataset, data_dir=data_dir, recipe=recipe, overrides=overrides,
                        model_options=_parse_kv(model_set or [], "--model-set"),
                        seed=seed, device=device, store=store, resume=resume, label=label, argv=sys.argv,
                        progress=progress, select=select, teacher=teacher)
    _note(f"[green]trained[/] {_escape(res['model'])} on {_escape(res['dataset'])}: test accuracy "
          f"{_pct(res['test_acc'])}% "
          f"(run {res['run_id']})")
    from epcli import schema
    _emit(schema.train(res, res.get("history")), as_json)


@app.command(rich_help_panel="Pipeline")
def attack(
    model: ModelRefOpt = "ep-cnn-small",
    attack_name: Annotated[str, typer.Option("--attack", "-a", help="fgsm, pgd, cw, apgd-ce, apgd-dlr, apgd-t, "
                                             "fab-t, square, autoattack (fra31's), art-square, art-autoattack "
                                             "(ART's, as the paper ran them).")] = "pgd",
    norm: Annotated[str, typer.Option(help="linf or l2.")] = "linf",
    eps: Annotated[str, typer.Option(help="Comma-separated list, fractions allowed: 1/255,2/255,8/255. "
                                     "Presets: paper-linf, paper-l2.")] = "8/255",
    n: Annotated[Optional[int], typer.Option("--n", help="Attack n test images: a seeded random subset, or the "
                                             "first n with --select first (default, or an n above the split's size: "
                                             "the whole test split; --protocol paper -a square or autoattack: the "
                                             "paper's 200).")] = None,
    select: Annotated[Optional[str], typer.Option(help="Which n test images: random (seeded, the default) or "
                                                  "first (the paper's first-N; a set stored class by class, "
                                                  "such as an ImageFolder copy, one class after another).")
                      ] = None,
    protocol: Annotated[str, typer.Option(help="epcli (defaults below) or paper: Mansingh et al.'s ART protocol "
                                          "for -a pgd (predicted labels, no clipping, 20 steps of 2.5*eps/20, no "
                                          "random start, the first n images; EP: truncated:70 gradient, T=250), "
                                          "-a square (ART's Square, 1000 iterations on the softmax) or -a "
                                          "autoattack (ART's ensemble); those two: the first 200 images in "
                                          "batches of 200.")] = "epcli",
    grad_mode: Annotated[Optional[str], typer.Option(
        help="Gradients through a relaxation: bptt (exact; the default), truncated:K (K >= T: all T steps), "
             "implicit, ep, or transfer:<model>. --protocol paper on EP models: truncated:70. Black-box "
             "square, art-square: bptt or transfer only.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Attack iterations (PGD/APGD/C&W; art-autoattack: its "
                                                 "APGD's).")] = None,
    step_size: Annotated[Optional[float], typer.Option(help="PGD step size (default 2.5*eps/steps).")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Random restarts (art-autoattack: its APGD's; its "
                                                    "Square keeps ART's 5).")] = None,
    random_start: Annotated[Optional[bool], typer.Option(help="PGD random start.")] = None,
    queries: Annotated[Optional[int], typer.Option(help="Square: query budget. art-square and art-autoattack's "
                                                   "Square: ART's max_iter, iterations of about 3 model calls "
                                                   "each, not queries.")] = None,
    targeted: Annotated[bool, typer.Option(help="Targeted variant (fgsm, pgd, cw, apgd-ce, apgd-dlr, square): a "
                                           "seeded random target class per image; robust accuracy is still "
                                           "against the true labels, and the target hit rate is recorded.")] = False,
    labels: Annotated[Optional[str], typer.Option(
        help="true (the default): attack the clean-correct images away from their label; predicted: attack every "
             "image away from the model's prediction (ART with y=None, the paper's setting; --protocol paper's).")
    ] = None,
    clip: Annotated[Optional[bool], typer.Option(help="FGSM/PGD: keep adversarial images in [0, 1] (default); "
                                                 "--no-clip as the paper's ART run (clip_values=None).")] = None,
    T: Annotated[Optional[int], typer.Option("--T", help="Relaxation steps for predictions.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (backs off on OOM).")] = None,
    dataset: DataOpt = None,
    data_dir: DataDirOpt = None,
    unroll_sweep: Annotated[Optional[str], typer.Option(
        help="EP only: also attack with gradients through K-step unrolls, e.g. 10,15,20,25,29,60,70 (the paper's "
             "obfuscation check); stored per K and checked. A K above --T runs with T = K (said in the notes).")
    ] = None,
    checks: Annotated[bool, typer.Option(help="Run the reliability checks (monotone, large eps, PGD strength, "
                                         "white- vs black-box on stored runs).")] = True,
    strength_check: Annotated[bool, typer.Option(help="PGD: re-run 2x steps and restarts on a subset.")] = True,
    strict: Annotated[bool, typer.Option(help="Exit 7 when a reliability check fails.")] = False,
    chunk: Annotated[Optional[int], typer.Option(
        help="Images per resumable chunk (saved as it finishes; the unit each torchrun process attacks). "
             "Default: about n/8, at most 1000, at least one batch, whole batches. Part of the result: chunk "
             "k is seeded from --seed and k.")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Attack a trained model on the test set for every eps; checks reliability and stores everything.

    Examples: `epcli attack --model vit`, `epcli attack -m ep-cnn --norm l2 --eps paper-l2`,
    `epcli attack -m ep-cnn -a autoattack --eps 8/255`, `epcli attack -m ep-cnn --grad-mode truncated:70`,
    `epcli attack -m ep-cnn --protocol paper --eps paper-linf --n 10000`,
    `epcli attack -m ep-cnn -a square --protocol paper --eps paper-linf`.
    """
    from epcli import api
    STATE.quiet = STATE.quiet or quiet
    presets = {"paper-linf": "0.0001,0.000215,0.000464,0.001,0.002154,0.004642,0.01,0.021544,8/255,0.046416,0.1",
               "paper-l2": "0.05,0.0788,0.1242,0.1957,0.3085,0.4862,0.7663,1.0,1.2077,1.9035,3.0"}
    if strict and not checks:
        raise UsageError("--strict exits 7 when a reliability check fails, but --no-checks runs none: drop one")
    preset_norm = {"paper-linf": "linf", "paper-l2": "l2"}.get(eps)
    if preset_norm and preset_norm != norm:
        raise UsageError(f"--eps {eps} is the paper's {preset_norm} grid: use it with --norm {preset_norm} (or "
                         f"--eps paper-{norm})")
    eps = presets.get(eps, eps)
    params = {k: v for k, v in {"steps": steps, "step_size": step_size, "restarts": restarts,
                                "random_start": random_start, "n_queries": queries,
                                "clip": clip}.items() if v is not None}
    from epcli import distributed
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        api.attack(model=model, device=device, store=None)
        return
    with _store() as store, _progress() as progress, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = api.attack(model=model, attack=attack_name, norm=norm, eps=eps, dataset=dataset,
                         data_dir=data_dir, n=n, seed=seed, grad_mode=grad_mode, batch_size=batch_size,
                         labels=labels, params=params, T=T, device=device, store=store, argv=sys.argv,
                         checks=checks, strength=strength_check, progress=progress, targeted=targeted,
                         protocol=protocol, select=select,
                         chunk=chunk, unroll_sweep=_int_list(unroll_sweep, "--unroll-sweep"))
    for w in caught:
        _note(f"[yellow]warning:[/] {_escape(str(w.message))}")
    from epcli import schema
    out = schema.attack(res)
    if not STATE.quiet:
        from epcli.attacks import BLACK_BOX
        sweep = res.get("unroll_sweep") or {}
        # title and caption as lines of their own: a table's title wraps to the (narrow) table's width
        err.print(_escape(f"{res['attack']} {norm}, {res['model']}, {res['n_examples']} test images of "
                          f"{res.get('dataset')}, "
                          f"{_how_attacked(res['attack'], res['grad_mode'], BLACK_BOX)}, "
                          f"{res['labels']} labels{', protocol paper' if res['protocol'] == 'paper' else ''}, "
                          f"run {res['run_id']}, {out['attack_forward_passes'] or 0:,} attack forward passes"),
                  highlight=False)
        from epcli.report.datamodel import wilson95
        n = res["n_examples"]

        def ci(fraction):  # how far the accuracy could move on other images of the same number
            bounds = wilson95(None if fraction is None else 100 * fraction, n)
            return f"{bounds[0]:.2f}–{bounds[1]:.2f}" if bounds else ""
        t = Table()
        t.add_column("eps", no_wrap=True)
        t.add_column("robust %", justify="right", no_wrap=True)
        t.add_column("95% CI", justify="right", no_wrap=True)
        errors = res.get("robust_from_clean_errors")
        if errors:  # predicted labels: robust includes misclassified images the attack moved onto their label
            t.add_column("of which clean errors %", justify="right", no_wrap=True)
        for gm in sweep:
            t.add_column(gm, justify="right")
        t.add_row("clean", _pct(res["clean_acc"]), ci(res["clean_acc"]), *([""] if errors else []),
                  *["" for _ in sweep])
        for r in out["results"]:
            e = r["eps_label"]
            t.add_row(e, _pct(r["robust_acc"]) + (" !" if res["unreliable"] else ""), ci(r["robust_acc"]),
                      *([_pct(r["from_clean_errors"])] if errors else []),
                      *[_pct(accs.get(e)) for accs in sweep.values()])
        err.print(t)
        err.print(f"95% CI: Wilson interval over the {n:,} images (their sampling only)", highlight=False)
        if errors:
            err.print("of which clean errors: images misclassified clean that the attack moved onto their true "
                      "label (predicted labels, the paper's protocol, count them as robust)", highlight=False)
        for e, accs in (res.get("members") or {}).items():  # AutoAttack, as the official code logs it
            err.print(_escape(f"{e}: robust % after " + ", then ".join(f"{m} {_pct(v)}" for m, v in accs.items())),
                      highlight=False)
        if res["unreliable"]:
            err.print(f"[red]unreliable:[/] {_escape(res['reason'])}", highlight=False)
    _emit(out, as_json)
    if strict and res["unreliable"]:
        raise typer.Exit(7)


@app.command(rich_help_panel="Pipeline")
def corrupt(
    model: ModelRefOpt = "ep-cnn-small",
    corruption: Annotated[Optional[list[str]], typer.Option(
        "--corruption", "-c", metavar="<name,...>",
        help="Corruption name (repeatable or comma-separated; default: all 19).")] = None,
    severity: Annotated[Optional[list[str]], typer.Option(
        "--severity", "-s", metavar="<int,...>", help="1-5 (repeatable or comma-separated; default all).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Seeded subset of n test images (default, or an n above "
                                             "the split's size: all of them).")] = None,
    source: Annotated[Optional[str], typer.Option(help="Evaluate the official CIFAR-10-C/100-C .npy files (or an "
                                                  "--export folder) in this folder instead of generating; "
                                                  "--n takes the first n of each severity.")] = None,
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
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a trained model under CIFAR-10-C natural corruptions (19 x 5 severities), seeded.

    Examples: `epcli corrupt --model ep-cnn`, `epcli corrupt -m cnn -c fog,contrast -s 5`,
    `epcli corrupt --export cifar10c/ --dataset cifar10`.
    """
    from epcli import api, distributed, schema
    if corruption is not None:  # -c fog,snow as -c fog -c snow
        corruption = [c.strip() for v in corruption for c in v.split(",")]
    if severity is not None:
        severity = [s for v in severity for s in _int_list(v, "--severity", "1,3,5")]
    if not distributed.is_main():  # a torchrun worker: rank 0 owns the store and the output
        if not export:
            api.corrupt(model=model, device=device, store=None)
        return
    STATE.quiet = STATE.quiet or quiet
    if export is not None:  # it writes images and evaluates nothing: the evaluation options would be ignored
        ignored = [o for o, v in (("--source", source), ("--reference", reference), ("--severity", severity),
                                  ("--T", T)) if v is not None]
        if ignored:
            raise UsageError(f"--export only writes corrupted images (no model is evaluated); drop "
                             f"{', '.join(ignored)}")
        # unused by an export, but a value no evaluation would take is still refused (was accepted, exit 0)
        from epcli.pipelines.common import check_numbers, resolve_device
        check_numbers(batch_size=batch_size)
        if device and not device.startswith("cuda"):  # an unknown name; a GPU is not needed here
            resolve_device(device)
    with _store() as store, _progress() as progress:
        if export is not None:
            res = api.export_corruptions(directory=export, names=corruption, dataset=dataset,
                                         data_dir=data_dir, n=n, seed=seed, store=store)
            _note(f"wrote {len(res['corruptions'])} corruptions x 5 severities to {_escape(export)}")
            _emit(schema.corrupt_export(res), as_json)
            return
        res = api.corrupt(model=model, names=corruption, severities=severity, dataset=dataset,
                          data_dir=data_dir, n=n, seed=seed, source=source, reference=reference,
                          batch_size=batch_size, T=T, device=device, store=store, argv=sys.argv,
                          progress=progress)
    clean = "n/a (no clean images for this source)" if res["clean_acc"] is None else f"{_pct(res['clean_acc'])}%"
    if not STATE.quiet:
        by: dict[str, dict[str, float]] = {}
        for cell, acc in res["cells"].items():
            c, sv = cell.rsplit("/", 1)
            by.setdefault(c, {})[sv] = acc
        sevs = sorted({sv for v in by.values() for sv in v})
        err.print(f"corruption accuracy (%), {_escape(res['model'])} ({res['n_examples']} test images of "
                  f"{_escape(str(res.get('dataset')))}"
                  + (f", from {_escape(str(res['source']))}" if res.get("source") else "") + f"; clean {clean})",
                  highlight=False)
        t = Table()
        t.add_column("corruption")
        for sv in sevs:
            t.add_column(f"s{sv}", justify="right")
        for c, v in by.items():
            t.add_row(c, *[_pct(v[sv]) if sv in v else "" for sv in sevs])
        err.print(t)
    all19 = (f"{_pct(res['corruption_mean_acc_all'])}%" if res.get("corruption_mean_acc_all") is not None
             else "n/a (not all 19 x 5 run)")
    _note(f"{_escape(res['model'])}: clean {clean}; {res.get('corruption_mean_over') or 'benchmark mean'}: "
          f"{_pct(res.get('corruption_mean_acc'))}% (mCE unnormalised {_pct(res.get('mce_unnormalized'))}%); "
          f"mean of all 19 x 5: {all19} (run {res['run_id']})")
    _emit(schema.corrupt(res), as_json)


def _how_attacked(attack: str, grad_mode: str, black_box) -> str:
    """How an attack saw the model: a black-box one only queries it (or a transfer surrogate), others take
    gradients in a mode."""
    if attack in black_box:
        return f"black box on {grad_mode}" if grad_mode.startswith("transfer") else "black box"
    return f"grad {grad_mode}"


def _pct(v) -> str:
    """An accuracy fraction as a percent for people (JSON keeps fractions)."""
    return f"{100 * v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


@app.command(rich_help_panel="Pipeline")
def report(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model names (repeatable).")] = None,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="Training run ids (repeatable).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Only this dataset.")] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table, csv, json, md, html or robustbench. md and html set the paper's numbers "
                               "beside comparable results; robustbench with --out writes RobustBench's "
                               "<dataset>/<threat_model>/<ModelID>.json files.")] = "table",
    out: Annotated[Optional[str], typer.Option(help=(
        "Write the report to this folder: report.<format> (html: the page with every figure; robustbench: "
        "RobustBench's files); with --figures also the figures and report.html."))] = None,
    figures: Annotated[bool, typer.Option(help="Also draw the figures (PNG + SVG).")] = False,
    curves: Annotated[bool, typer.Option(
        "--curves", help="Draw training curves (loss, train and test accuracy per epoch) of the --run ids, or "
                         "of the newest finished training run of each --model, to --out (default "
                         "store/reports).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compare every model under every threat, from the store alone (no recomputation).

    Examples: `epcli report`, `epcli report -f md`, `epcli report -f html --out reports/`,
    `epcli report --curves --run RUN_A --run RUN_B`.
    """
    from epcli import report as R
    from epcli import schema
    from epcli.pipelines.report import report as report_pipeline  # not epcli.api: a report never needs torch
    for option, values in (("--run", run), ("--model", model), ("--dataset", [dataset]), ("--out", [out])):
        if any(v is not None and not v.strip() for v in values or []):  # was "not given": the whole store
            raise UsageError(f"{option} is empty: give a value or leave the option out")
    if curves:
        with _store(write=False) as store:
            ids = list(run or []) + [store.latest_train_run(m, dataset)["id"] for m in model or []]
            if not ids:
                ids = [r["id"] for r in store.runs(kind="train", status="finished", dataset=dataset, limit=5)]
            if not ids:
                raise NotFoundError("no training run to draw (train one, or pass --run)")
            if out:
                store.refuse_inside(out, "--out")
            files = R.training_curves(store, ids, out or store.root / "reports",
                                      option="--out" if out else "the report folder")
        for f in files:
            _note(f"wrote {_escape(str(f))}")
        _emit({"command": "report", "run_id": None, "files": [str(f) for f in files], "generated_at":
               _now(), "rows": [], "notes": [f"training curves of {', '.join(ids)}"]}, as_json)
        return
    if out and fmt == "table" and not (figures or as_json):  # the table is a terminal view: --out had nothing to write
        raise UsageError(f"--out {out}: the table format writes no file; add -f md, csv, json, html or "
                         "robustbench, or --figures")
    with _store(write=bool(out or figures)) as store:
        res = report_pipeline(store=store, models=model, runs=run, dataset=dataset,
                              fmt="json" if as_json and fmt == "table" else fmt, out=out, figures=figures,
                              argv=sys.argv)
        if fmt == "table" and not as_json:
            Console().print(R.leaderboard_table(res["data"]))
        elif not as_json and res["text"] is not None and not out:
            typer.echo(res["text"])
        # --json always prints the JSON document of the schema, whatever --format wrote
    for f in res["files"]:
        _note(f"wrote {_escape(str(f))}")
    if as_json:
        _emit(schema.report(res), True)


def _now() -> str:
    from epcli.store import now
    return now()


@app.command(rich_help_panel="Pipeline")
def demo(
    device: DeviceOpt = "auto",
    store: StoreOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The whole study in miniature on the embedded real CIFAR-10 images: train a small EP-CNN and a small CNN,
    attack both (PGD L-inf and L2), corrupt both, and print the comparison (minutes on a laptop CPU)."""
    from epcli import api
    STATE.quiet = STATE.quiet or quiet
    with _store(store) as st, _progress() as progress:
        say = getattr(progress, "note", None) or _note  # notes go through the live display while it runs
        res = api.demo(store=st, device=device, progress=progress, note=say)
    from epcli import report as R
    if not STATE.quiet:
        err.print(R.leaderboard_table(res["data"]))
    _note(f"store: {_escape(str(st.root))}  -  try `epcli runs`, `epcli trace {res['runs'][0]}`, `epcli report -f md`")
    _emit({"command": "demo", "run_ids": list(res["runs"]), "store": str(res["store"])}, as_json)


# --- store inspection and run management --------------------------------------------------------------------

def _width() -> int:
    return Console().width


@app.command("runs", rich_help_panel="Runs")
def list_runs(
    kind: Annotated[Optional[str], typer.Option(help="train, attack, corrupt or report.")] = None,
    status: Annotated[Optional[str], typer.Option(help="running, finished, failed, interrupted.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model name.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Dataset name.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Started after a date (2026-11-29, 2026-11-29T14:00) or "
                                                 "within an age (30m, 12h, 7d).")] = None,
    tag: Annotated[Optional[str], typer.Option(help="Only runs with this tag.")] = None,
    where: Annotated[Optional[list[str]], typer.Option(
        help="NAME OP VALUE on a metric, summary value, run column or config key, e.g. 'test_acc>0.5', "
             "'robust_acc<0.2', seed=1, 'config.recipe.epochs>=20' (repeatable; all must hold; quote > and <).")
    ] = None,
    sort: Annotated[Optional[str], typer.Option(help="Sort by NAME (any --where name); -NAME for "
                                                "descending. Default: newest first.")] = None,
    limit: Annotated[int, typer.Option(help="At most N runs (0: all).")] = 30,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first, filtered and sorted.

    Examples: `epcli runs --kind train --where 'test_acc>0.5' --sort -test_acc`, `epcli runs --since 12h`
    (quote conditions with > or <: the shell reads them as redirections).
    """
    from epcli import schema
    from epcli.store import RUN_KINDS, STATUSES
    if kind and kind not in RUN_KINDS:
        raise UsageError(f"unknown run kind {kind!r}: use {', '.join(RUN_KINDS)}")
    if status and status not in STATUSES:
        raise UsageError(f"unknown status {status!r}: use {', '.join(STATUSES)}")
    unknown: list[str] = []
    with _store(write=False) as store:
        rows = store.find_runs(kind=kind, status=status, model=model, dataset=dataset, since=since, tag=tag,
                               where=where, sort=sort, limit=limit or None, unknown=unknown)
        sort_vals = {r["id"]: store.run_value(r, sort.lstrip("-")) for r in rows} if sort else {}
    for name in unknown:  # not an error: a store may simply have no run of that kind yet
        _note(f"[yellow]note:[/] no run of the selection has {_escape(repr(name))} (a run column, summary value, "
              "metric or config.KEY): it matched and sorted nothing")
    if as_json:
        _emit(schema.runs(rows), True)
        return
    # Fixed columns as wide as their widest value; the run id is never shortened, the result column takes
    # what is left (cut with an ellipsis), then the model column gives way.
    data = []
    for r in rows:
        extra = [_value_text(sort_vals.get(r["id"]))] if sort else []
        data.append([r["id"], r["kind"], r["status"], r["model"] or "",
                     (r["started_at"] or "")[5:16].replace("T", " "), *extra, _result_text(r)])
    heads = ["run id", "kind", "status", "model", "started"] + ([sort.lstrip("-")] if sort else []) + ["result"]
    widths = [max([len(h)] + [len(d[i]) for d in data]) for i, h in enumerate(heads)]
    width = _width()
    if not sys.stdout.isatty() and not os.environ.get("COLUMNS"):  # a file or a pipe: every line whole
        width = max(width, sum(widths) + 2 * (len(heads) - 1))
    fixed = sum(widths[:-1]) + 2 * (len(heads) - 1)
    if width - fixed < 20 and widths[3] > 10:  # the model column gives way before the result
        fixed -= widths[3] - 10
        widths[3] = 10
    t = Table(title=_escape(f"runs in {STATE.store_path or 'store'} ({len(rows)})"), title_justify="left", box=None,
              pad_edge=False, header_style="bold")
    for i, h in enumerate(heads):
        last = i == len(heads) - 1
        t.add_column(_escape(h), no_wrap=True, overflow="ellipsis", justify="right" if sort and i == 5 else "left",
                     width=max(8, width - fixed) if last else widths[i])
    colors = {"finished": "green", "failed": "red", "interrupted": "yellow"}
    for d in data:
        d = [_escape(str(x)) for x in d]  # models, datasets, errors and tags are user text, never markup
        d[2] = f"[{colors.get(d[2], 'cyan')}]{d[2]}[/]"
        t.add_row(*d)
    Console(width=width).print(t)


def _value_text(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _eps_key(item: tuple) -> float:
    """An eps label ("8/255", "0.1") as its value: the store keeps a summary's keys sorted as strings."""
    from fractions import Fraction
    try:
        return float(Fraction(str(item[0])))
    except (ValueError, ZeroDivisionError):
        return float("inf")


def _result_text(run: dict) -> str:
    """The result that matters for the run's kind, short: test accuracy, robust accuracy per eps, mCE."""
    s = run.get("summary") if isinstance(run.get("summary"), dict) else {}
    tags = " ".join(f"#{t}" for t in run.get("tags") or [])
    if run["status"] == "failed":
        text = (run.get("error") or "")[:60]
    elif run["kind"] == "train":
        text = f"test {_pct(s.get('test_acc'))}%, {s.get('epochs', '?')} ep" if s else ""
    elif run["kind"] == "attack":
        cfg = run.get("config") or {}
        robust = s.get("robust_acc") or {}
        if not isinstance(robust, dict):  # a summary not written by the attack pipeline (an eps -> accuracy map)
            robust = {"": robust} if isinstance(robust, (int, float)) else {}
        text = f"{cfg.get('attack', '')} {cfg.get('norm', '')}"
        # what robust means differs with these: said beside the numbers, as attack's header says it
        how = ["protocol paper" if cfg.get("protocol") == "paper" else
               ("predicted labels" if cfg.get("labels") == "predicted" else ""), "targeted" if cfg.get("targeted")
               else ""]
        if any(how):
            text += f" ({', '.join(h for h in how if h)})"
        if s:
            text += " robust " + ", ".join(f"{e} {_pct(a)}%" for e, a in sorted(robust.items(), key=_eps_key)) + \
                f" (clean {_pct(s.get('clean_acc'))}%)" + (" UNRELIABLE" if s.get("unreliable") else "")
    elif run["kind"] == "corrupt":
        text = f"mean {_pct(s.get('corruption_mean_acc'))}%, clean {_pct(s.get('clean_acc'))}%" if s else ""
    else:
        text = ""
    # tags first: they are short and chosen by the user; the note last, it may be long
    return ((tags + "  " if tags else "") + text + (f"  ({run['note']})" if run.get("note") else "")).strip()


@app.command(rich_help_panel="Runs")
def show(run_id: Annotated[str, typer.Argument(help="Run id or unique prefix.")], as_json: JsonOpt = False
         ) -> None:
    """Show one run: status, duration, command line, versions, config, metrics, checks and artifacts."""
    from epcli import schema
    with _store(write=False) as store:
        run = store.get_run(run_id)
        arts = store.artifacts_of(run["id"])
        mets = store.metrics(run["id"])
        checks = store.checks(run["id"])
    doc = schema.show(run, mets, checks, arts)
    if as_json:
        _emit(doc, True)
        return
    escape = _escape  # user text: no markup, no terminal control characters
    c = Console()
    r = doc["run"]
    color = {"finished": "green", "failed": "red", "interrupted": "yellow"}.get(r["status"], "cyan")
    c.print(f"[bold]{r['run_id']}[/]  {r['kind']}  [{color}]{r['status']}[/]")
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold", no_wrap=True)
    info.add_column(overflow="fold")
    argv = r.get("argv")
    rows = [("model", r["model"]), ("dataset", r["dataset"]), ("model run", r["model_run_id"]
                                                               if r["model_run_id"] != r["run_id"] else None),
            ("started", r["started_at"]), ("duration", None if r["duration_s"] is None else
                                           _secs(r["duration_s"])),
            ("command", " ".join(argv) if isinstance(argv, list) else argv),
            ("git commit", r["git_commit"]), ("versions", f"epcli {r['epcli_version']}, torch {r['torch_version']}"
                                              + (f", cuda {r['cuda_version']}" if r["cuda_version"] else "")),
            ("device", r["device"]), ("seed", r["seed"]), ("tags", " ".join(r["tags"]) or None),
            ("note", r["note"]), ("error", r["error"])]
    for k, v in rows:
        if v not in (None, ""):
            info.add_row(k, escape(str(v)))
    c.print(info)
    epochs = [row for row in doc["metrics"] if row.get("step") is not None and row["name"] != "epoch"]
    if epochs:
        c.print(_epoch_table(epochs, c.width))
        shown = {row["name"] for row in epochs}
        for keys, text in EPOCH_NOTES:
            if shown & set(keys):
                c.print(f"  [dim]{text}[/]", highlight=False)
    rest = [row for row in doc["metrics"] if row.get("step") is None]
    labels = (r.get("result") or {}).get("labels") if r["kind"] == "attack" else None
    errors = {x["eps_label"]: x["from_clean_errors"] for x in (r.get("result") or {}).get("results") or []
              if x.get("from_clean_errors") is not None}
    if rest:
        c.print("[bold]metrics[/]")
        m = Table.grid(padding=(0, 2))
        m.add_column(no_wrap=True)
        m.add_column(justify="right", no_wrap=True)
        m.add_column(overflow="fold")
        for row in rest[:SHOW_ROWS]:
            facets = " ".join(str(row[k]) for k in ("attack", "norm", "eps_label", "corruption", "severity")
                              if row.get(k) is not None)
            if row.get("step") is not None:
                facets = f"epoch {row['step']} {facets}".strip()
            if row.get("grad_mode") and row["grad_mode"] != "bptt":
                facets += f" grad {row['grad_mode']}"
            if row.get("n_examples"):
                facets += f" (n={row['n_examples']})"
            if row["name"] == "robust_acc" and labels == "predicted":  # robust includes clean errors moved on
                part = errors.get(row.get("eps_label"))
                facets += ", predicted labels" + (f", incl. {_pct(part)} clean errors" if part is not None else "")
            val = row["value"]
            shown = _metric_text(row["name"], val)
            m.add_row("  " + row["name"], shown + (" !" if row["unreliable"] else ""), escape(facets))
        c.print(m)
        if len(rest) > SHOW_ROWS:
            c.print(f"  ... and {len(rest) - SHOW_ROWS} more metrics (all of them: epcli show {r['run_id']} --json)")
    by_eps: dict[str, list] = {}
    for mem in (r.get("result") or {}).get("members") or []:  # an ensemble: as `attack` printed it
        by_eps.setdefault(mem["eps_label"], []).append(f"{mem['member']} {_pct(mem['robust_acc'])}")
    for e, accs in by_eps.items():
        c.print(escape(f"{e}: robust % after " + ", then ".join(accs)), highlight=False)
    for ch in doc["checks"]:
        c.print(f"check {ch['check']}: {'[green]passed' if ch['passed'] else '[red]FAILED'}[/] "
                f"{escape(ch['detail'])}")
    if run.get("config"):
        c.print("[bold]config[/]")
        cfg = Table.grid(padding=(0, 2))
        cfg.add_column(no_wrap=True, style="dim")
        cfg.add_column(overflow="fold")
        from epcli.report import flatten_config
        for k, v in flatten_config(schema.clean_value(run["config"])).items():
            cfg.add_row("  " + k, escape(json.dumps(v) if not isinstance(v, str) else v))
        c.print(cfg)
    if doc["artifacts"]:
        c.print("[bold]artifacts[/]")
        for a in doc["artifacts"]:
            c.print(f"  {a['role']:6} {a['kind']:20} {a['sha256'][:12]} {a['size']:>10,}  {escape(a['path'])}",
                    highlight=False, soft_wrap=True)


SHOW_ROWS = 200  # metric lines `show` prints; --json has them all
# what the EP training columns are taken over (epcli.train.fit records them)
EPOCH_NOTES = [
    (("mean_steps", "mean_steps_nudged"), "mean_steps / mean_steps_nudged: relaxation steps per training image in "
     "the free / each nudged phase, mean over the epoch"),
    (("residual_free", "residual_nudged"), "residual_free / residual_nudged: the largest relative residual of any "
     "training image at the end of that phase in the epoch; *_mean: the mean over the images (<= 1e-3 counts as "
     "at equilibrium)"),
]


def _metric_text(name: str, value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%" if name.endswith("_acc") else f"{value:.4g}"


def _epoch_table(rows: list[dict], width: int) -> Table:
    """Per-epoch metrics, one column per epoch; a run with more epochs than fit in `width` shows its first and
    last ones and says how many are left out."""
    names, by_epoch, n_of = [], {}, {}
    for row in rows:
        if row["name"] not in names:
            names.append(row["name"])
        by_epoch.setdefault(int(row["step"]), {})[row["name"]] = row
        if row.get("n_examples"):
            n_of.setdefault(row["name"], set()).add(row["n_examples"])
    label = {k: k + (f" (n={next(iter(n_of[k]))})" if len(n_of.get(k, ())) == 1 else "") for k in names}
    epochs = sorted(by_epoch)
    fit = max(3, (width - max(map(len, label.values())) - 4) // 11)
    if len(epochs) > fit:
        head = max(1, (fit - 1) // 3)
        epochs = epochs[:head] + [None] + epochs[-(fit - 1 - head):]
    t = Table(box=None, pad_edge=False, padding=(0, 1))
    t.add_column("per epoch", no_wrap=True)
    if None in epochs:
        i = epochs.index(None)
        gap = f"{epochs[i - 1] + 1}-{epochs[i + 1] - 1}"
    for e in epochs:
        t.add_column(str(e) if e is not None else f"({gap})", justify="right", no_wrap=True)
    for k in names:
        t.add_row("  " + label[k], *["..." if e is None else "" if k not in by_epoch[e] else
                                     _metric_text(k, by_epoch[e][k]["value"]) + (" !" if by_epoch[e][k]["unreliable"]
                                                                                  else "") for e in epochs])
    return t


def _secs(s: float) -> str:
    from epcli.progress import format_seconds
    return format_seconds(s)


@app.command(rich_help_panel="Runs")
def compare(
    run_a: Annotated[str, typer.Argument(help="An attack or training run id (or prefix).")],
    run_b: Annotated[str, typer.Argument(help="Another run of the same kind, e.g. of another model.")],
    as_json: JsonOpt = False,
) -> None:
    """Compare two runs. Attack runs: paired comparison on their common test points (who is robust where, exact
    McNemar p-value per eps). Training runs: the config keys that differ and the final metrics side by side."""
    from epcli import api, schema
    from epcli import report as R
    with _store(write=False) as store:
        ra, rb = store.get_run(run_a), store.get_run(run_b)
        kinds = {ra["kind"], rb["kind"]}
        if len(kinds) == 2:  # said "compare needs two finished attack runs" of a train run, which compare takes
            raise UsageError(f"runs {ra['id']} ({ra['kind']}) and {rb['id']} ({rb['kind']}) are of different kinds: "
                             "compare two training runs or two attack runs")
        if kinds == {"train"}:
            doc = schema.compare_training(R.training_diff(store, run_a, run_b))
        else:
            doc = schema.compare_attacks(api.compare(store=store, run_a=run_a, run_b=run_b))
    if as_json:
        _emit(doc, True)
        return
    a, b = doc["a"], doc["b"]
    c = Console()
    if doc["kind"] == "train":
        # models, datasets (a folder's name) and config values are user text: never markup ("d[red]" lost "[red]")
        c.print(_escape(f"A = {a['run_id']} ({a['model']} on {a['dataset']})\nB = {b['run_id']} ({b['model']} on "
                        f"{b['dataset']})"), highlight=False)
        t = Table(title="config differences", title_justify="left")
        for col in ("key", "A", "B"):
            t.add_column(col, overflow="fold")
        for d in doc["config_diff"]:
            t.add_row(*[_escape(v) for v in (d["key"], json.dumps(d["a"]), json.dumps(d["b"]))])
        if not doc["config_diff"]:
            t.add_row("(identical)", "", "")
        c.print(t)
        t = Table(title="final metrics", title_justify="left")
        for col in ("metric", "A", "B", "B - A"):
            t.add_column(col, justify="right" if col != "metric" else "left", no_wrap=True)
        for m in doc["metrics"]:
            pct = m["name"].endswith("_acc")
            t.add_row(m["name"], _metric_text(m["name"], m["a"]), _metric_text(m["name"], m["b"]),
                      "-" if m["diff"] is None else
                      (f"{100 * m['diff']:+.2f} pt" if pct else f"{m['diff']:+.4g}"))
        c.print(t)
        return
    from epcli.attacks import BLACK_BOX

    def who(s: dict) -> str:  # as attack's header says it: a black-box attack takes no gradient
        how = _how_attacked(s["attack"], s["grad_mode"] or "bptt", BLACK_BOX).replace("grad ", "gradients ")
        return f"{s['run_id']} ({s['model']}, {s['attack']} {s['norm']}, {how}, {s['labels']} labels)"
    c.print(_escape(f"A = {who(a)}\nB = {who(b)}"), highlight=False)
    if a["labels"] != b["labels"]:
        c.print("[yellow]note:[/] the runs scored robustness differently: with predicted labels every image was "
                "attacked, and a misclassified one pushed onto its true label counts as robust", highlight=False)
    t = Table(title=f"robust accuracy (%) on the test points both attacked ({_escape(str(doc['dataset']))}); "
                    "McNemar: exact, two-sided, on the points robust under only one", title_justify="left")
    for col in ("eps", "n", "A", "B", "both", "only A", "only B", "McNemar p"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in doc["rows"]:
        t.add_row(r["eps_label"], str(r["n"]), _pct(r["robust_acc_a"]), _pct(r["robust_acc_b"]), str(r["both"]),
                  str(r["only_a"]), str(r["only_b"]), f"{r['mcnemar_p']:.3g}")
    c.print(t)


@app.command(rich_help_panel="Runs")
def trace(run_id: Annotated[str, typer.Argument(help="A training run id (or any run id).")],
          as_json: JsonOpt = False) -> None:
    """Lineage: everything derived from a run (attacks, corruptions, reports) as a tree, each with its result."""
    with _store(write=False) as store:
        run = store.get_run(run_id)
        tree = _trace_tree(store, run["id"])
        if as_json:
            _emit({"command": "trace", "run_id": run["id"], "tree": _strip_private(tree)}, True)
            return
        Console().print(_trace_render(store, tree))


def _trace_tree(store, run_id: str) -> dict:
    from epcli import schema
    root = store.get_run(run_id)
    if root["kind"] != "train" and root.get("model_run_id"):
        try:
            root = store.get_run(root["model_run_id"])
        except NotFoundError:  # its training run is gone (a hand-edited store): the tree starts at the run itself
            pass

    def node(r: dict) -> dict:
        return {"run_id": r["id"], "kind": r["kind"], "status": r["status"], "model": r.get("model"),
                "result": schema.run_result(r), "children": [], "_run": r}

    nodes = {root["id"]: node(root)}
    for d in store.derived_runs(root["id"]):
        nodes[d["id"]] = node(d)
        nodes.get(d["parent"], nodes[root["id"]])["children"].append(nodes[d["id"]])
    for d in store.runs(model_run_id=root["id"]):
        if d["id"] not in nodes:
            nodes[d["id"]] = node(d)
            nodes[root["id"]]["children"].append(nodes[d["id"]])
    return nodes[root["id"]]


def _strip_private(node: dict) -> dict:
    return {k: ([_strip_private(c) for c in v] if k == "children" else v) for k, v in node.items()
            if not k.startswith("_")}


def _trace_render(store, tree: dict):
    """The lineage as a rich Tree; each node shows the result that matters for its kind."""
    escape = _escape  # user text: no markup, no terminal control characters
    from rich.tree import Tree

    def label(node: dict) -> str:
        r = node["_run"]
        color = {"finished": "green", "failed": "red", "interrupted": "yellow"}.get(r["status"], "cyan")
        what = f"{r.get('model')} on {r.get('dataset')}" if r["kind"] == "train" else ""
        return (f"[bold]{r['kind']}[/] {r['id']} [{color}]{r['status']}[/] {escape(what)} "
                f"{escape(_result_text(r))}").replace("  ", " ").strip()

    def grow(parent, node: dict) -> None:
        for child in node["children"]:
            grow(parent.add(label(child)), child)

    root = Tree(label(tree))
    for a in store.artifacts_of(tree["run_id"], role="input"):  # e.g. a distilled student's teacher
        if a["name"] == "teacher":
            root.add(f"[dim]input teacher {a['sha256'][:12]} of train {a['run_id'] or '(file)'}[/dim]")
    for a in store.artifacts_of(tree["run_id"], role="output"):
        root.add(f"[dim]{a['kind']} {a['name'] or ''} {a['sha256'][:12]}[/dim]")
    grow(root, tree)
    return root


@app.command(context_settings={"ignore_unknown_options": True}, rich_help_panel="Runs")
def tag(
    run_id: Annotated[str, typer.Argument(help="Run id or unique prefix.")],
    tags: Annotated[Optional[list[str]], typer.Argument(help="Tags to add; -TAG removes one.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add or remove tags of a run (`epcli runs --tag T` filters by them).

    Example: `epcli tag RUN baseline paper -draft`.
    """
    for t in tags or []:  # unknown options reach us as tags: `--jsno` removed a tag "-jsno" (exit 0, nothing done)
        if t.startswith("--"):
            raise UsageError(f"No such option: {t} (a tag to remove is written -TAG, e.g. -draft; see "
                             "'epcli tag --help')")
    add = [t for t in tags or [] if not t.startswith("-")]
    remove = [t[1:] for t in tags or [] if t.startswith("-")]
    with _store(write=False) as store:
        new = store.tag_run(run_id, add, remove)
        run = store.get_run(run_id)
    _note(f"{run['id']}: tags {_escape(' '.join(new)) or '(none)'}")  # user text, never markup
    _emit({"command": "tag", "run_id": run["id"], "tags": new, "note": run.get("note")}, as_json)


@app.command(rich_help_panel="Runs")
def note(
    run_id: Annotated[str, typer.Argument(help="Run id or unique prefix.")],
    text: Annotated[Optional[str], typer.Argument(help="The note; empty to clear it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Attach a note to a run (shown by `runs` and `show`).

    Example: `epcli note RUN "lr too high; rerun with 0.01"`.
    """
    with _store(write=False) as store:
        store.note_run(run_id, text)
        run = store.get_run(run_id)
    _note(f"{run['id']}: note {'set' if run.get('note') else 'cleared'}")
    _emit({"command": "tag", "run_id": run["id"], "tags": list(run.get("tags") or []), "note": run.get("note")},
          as_json)


@app.command(rich_help_panel="Runs")
def rm(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids (or unique prefixes).")],
    cascade: Annotated[bool, typer.Option("--cascade", help="Also remove every run that depends on them "
                                          "(attacks of a trained model, reports...).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove runs with their metrics, checks and the artifacts nothing else uses. A run that others depend on is
    refused unless --cascade.

    Example: `epcli rm RUN --cascade --dry-run`.
    """
    with _store(write=False) as store:
        res = store.remove_runs(run_ids, cascade=cascade, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    _note(f"{verb} {len(res['removed'])} run(s) ({' '.join(res['removed'])}) and {res['files_removed']} file(s), "
          f"{res['bytes_freed']:,} bytes")
    _emit({"command": "rm", **res}, as_json)


@app.command(rich_help_panel="Runs")
def gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Garbage-collect the store: artifacts no run uses, rows whose file is gone, and files without a row.

    Afterwards every artifact row has its file and every file its row.
    """
    with _store(write=False) as store:
        res = store.gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    _note(f"{verb} {res['artifacts_removed']} artifact row(s) and {res['files_removed']} file(s), "
          f"{res['bytes_freed']:,} bytes")
    _emit({"command": "gc", **res}, as_json)


LongOpt = Annotated[Optional[bool], typer.Option(
    "--long/--short", "-l", help="One row per entry with what it is (default on a terminal) or bare names "
                                 "(default in a pipe).")]


def _long(flag: Optional[bool]) -> bool:
    return sys.stdout.isatty() if flag is None else flag


def _listing(heads: list[str], rows: list[list[str]]) -> None:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for i, h in enumerate(heads):
        t.add_column(h, no_wrap=i == 0, overflow="fold")
    for r in rows:
        t.add_row(*[_escape(str(v)) for v in r])
    Console().print(t)


@app.command(rich_help_panel="Store")
def models(as_json: JsonOpt = False, long: LongOpt = None) -> None:
    """List the registered model names (on a terminal: with their tags and what they are)."""
    from epcli.models import list_models, model_info
    names = list_models()
    info = [model_info(n) for n in names]
    if as_json:
        _emit({"command": "models", "models": names,
               "details": [{"name": i["name"], "help": i["help"], "tags": list(i["tags"])} for i in info]}, True)
    elif _long(long):
        _listing(["model", "tags", "what it is"], [[i["name"], ",".join(i["tags"]), i["help"]] for i in info])
    else:
        typer.echo("\n".join(names))


@app.command(rich_help_panel="Store")
def recipes(name: Annotated[Optional[str], typer.Argument(help="Show one recipe in full.")] = None,
            as_json: JsonOpt = False, long: LongOpt = None) -> None:
    """List the training presets (on a terminal: with model, data, epochs and method), or show one (as JSON)."""
    from epcli.pipelines.common import eps_label
    from epcli.train import RECIPES, resolve_recipe
    if name is not None and not name.strip():
        raise UsageError("the recipe name is empty: `epcli recipes` lists them")
    if name:
        cfg = resolve_recipe(name, {})
        _emit({"command": "recipes", "recipe": name, "config": cfg} if as_json else cfg, True)
    elif as_json:
        _emit({"command": "recipes", "recipes": sorted(RECIPES)}, True)
    elif _long(long):
        rows = []
        for k in sorted(RECIPES):
            r = resolve_recipe(k, {})
            ep = r.get("ep") or {}
            adv = r.get("adv") or {}
            if ep:
                what = f"EP T1={ep['T1']} T2={ep['T2']} beta={ep['beta']}" + (f" tol={ep['tol']:g}" if ep.get("tol")
                                                                               else "")
            elif adv:
                what = (f"PGD-AT {adv['norm']} eps={eps_label(adv['eps'])}" if adv.get("eps") is not None
                        else "PGD-AT (give --adv-train NORM:EPS)")
            elif r.get("distill"):
                what = f"distill {r['distill']['target']} (give --teacher)"
            else:
                what = "backprop"
            rows.append([k, r.get("model") or "-", r.get("dataset") or "any", str(r["epochs"]), str(r["batch_size"]),
                         r["optimizer"]["name"], what])
        _listing(["recipe", "for model", "dataset", "epochs", "batch", "optimizer", "training"], rows)
    else:
        typer.echo("\n".join(sorted(RECIPES)))


def _unwrap(doc: str) -> str:
    """A docstring as help text: paragraphs kept, the source's line breaks inside a paragraph joined."""
    import inspect
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _c in app.registered_commands:
    if _c.help is None and _c.callback is not None and _c.callback.__doc__:
        _c.help = _unwrap(_c.callback.__doc__)


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    """Console-script entry point. SIGTERM closes the run as interrupted, as Ctrl-C does (the library itself
    installs no signal handler)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
