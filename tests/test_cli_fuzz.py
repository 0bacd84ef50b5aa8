"""Property-based fuzz of the whole CLI: every command, random subsets of its real options (read from the Typer
command objects, so a new option is fuzzed without touching this file), with valid and hostile values.

On every example, whatever the input:
  (a) no traceback: `Traceback` is in neither stream, and the command ended by SystemExit or returned; no
      terminal control character in either (user text shows them written out, `\x1b`);
  (b) the exit code is one of those `epcli --help` documents;
  (c) a failure (any code but 0, 7, 130, 143) prints exactly one `error: ...` line on stderr, as its last line,
      and it is an expected failure (not an internal error the CLI words as "... (rerun with --debug ...)");
      with --json, stdout is empty or one whole, strict JSON document (a success: always one);
  (d) the store still holds what it held: every row of every table of epcli.db and every artifact file
      (sha256) is as before. A usage / not-found / checkpoint error (2, 3, 4) adds nothing at all; another
      failure may add only runs marked failed (and their rows); a success may change the store, but never
      leaves a run `running`; and `Store.check_invariants()` holds after every command. A command that only
      reads (runs, show, trace, compare, models, recipes, rm/gc --dry-run, report writing no file) changes
      nothing, whatever its exit code.

Each example runs on a fresh copy of one small store built once per module (a trained cnn-small and
ep-cnn-tiny, an attack, a corrupt and a report run, a tag and a note, a diverged training run, interrupted
training and attack runs), so what one example removes or adds never shapes the next. Relative paths land in a
scratch folder (the working directory during the test), and so do the absolute ones a drawn value makes up.
The pipelines (train, attack, corrupt, demo) always get one value they must refuse before any work starts (last
on the line, so it wins over a duplicate; such a line must fail), so a fuzzed example stays cheap; two `slow`
variants run them for real, kept tiny: `test_fuzz_tiny_valid_pipelines` (valid lines) and
`test_fuzz_pipelines_unpoisoned` (valid values and at most one hostile one, reaching the checks behind the first);
`test_fuzz_sequences_of_store_commands` runs several store commands in a row on one store (also `slow`).

Found so far (each fixed, with a test in the file of its room): by the fuzz, `corrupt --export` taking a
--batch-size or --device no evaluation would take, and --json printing DEL and C1 control characters of a note
raw; by hand, then added to the values drawn here, `report --out` / `corrupt --export` inside the store's
artifacts/, tmp/ or cache/ (files with no row), `tag RUN --jsno` (removed a tag "-jsno") and terminal escape
sequences in notes, tags and labels reaching the terminal.
"""
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
import unicodedata
from pathlib import Path

import pytest
import typer
from conftest import write_imagefolder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from epcli.cli import app
from epcli.store import Store

runner = CliRunner()
GROUP = typer.main.get_command(app)
# the documented codes, read where users read them (the epilog of `epcli --help`)
EXIT_CODES = {int(c) for c in re.findall(r"(\d+) [a-z(]", app.info.epilog.split("Exit codes:", 1)[1])}
NO_ERROR_LINE = {0, 7, 130, 143}  # success, --strict's "unreliable", interrupted, terminated
# global options never fuzzed: --debug shows tracebacks by design; the completion ones edit the user's shell
SKIP_GLOBAL = {"debug", "install_completion", "show_completion", "store"}
PIPELINES = ("train", "attack", "corrupt", "demo")


def invoke(args, store=None, env=None):
    argv = (["--store", str(store)] if store else []) + [str(a) for a in args]
    return runner.invoke(app, argv, catch_exceptions=True, env=env)


# --- the store built once, and its digest ----------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, mini):
    root = tmp_path_factory.mktemp("fuzz")
    data = write_imagefolder(root / "data", mini, 8, 4)
    store = root / "store"

    def ok(*args):
        r = invoke([*args, "--json"], store=store)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    cnn = ok("train", "--model", "cnn-small", "--dataset", data, "--epochs", 1, "--device", "cpu")["run_id"]
    ep = ok("train", "--model", "ep-cnn-tiny", "--dataset", data, "--epochs", 1, "--set", "optimizer.lrs=null",
            "--T1", 3, "--T2", 2, "--device", "cpu")["run_id"]
    att = ok("attack", "--model", cnn, "--n", 8, "--steps", 1, "--eps", "2/255,8/255", "--device", "cpu")["run_id"]
    cor = ok("corrupt", "--model", cnn, "-c", "fog", "-s", 1, "--n", 4, "--device", "cpu")["run_id"]
    rep = ok("report", "-f", "md", "--out", root / "report")["run_id"]
    ok("tag", cnn, "base")
    ok("note", att, "a note")
    r = invoke(["train", "--model", "cnn-small", "--dataset", data, "--epochs", 3, "--lr", "1e10", "--device", "cpu"],
               store=store)
    assert r.exit_code == 6, r.output  # diverged: a failed training run
    s = Store(store)
    (failed,) = [x["id"] for x in s.runs(status="failed")]
    # runs whose process died (what Ctrl-C, SIGTERM or a kill leaves): a training run and an attack of the model
    stopped = [s.start_run("train", {}, model="cnn-small", dataset=data.name),
               s.start_run("attack", {"attack": "pgd", "norm": "linf"}, model="cnn-small", dataset=data.name,
                           model_run_id=cnn)]
    for rid in stopped:
        s.finish_run(rid, status="interrupted", error="terminated by SIGTERM")
    ckpt = s.artifact_path(s.artifacts_of(cnn, kind="checkpoint")[0]["sha256"])
    ids = [r["id"] for r in s.runs()]
    s.close()
    files = root / "files"
    (files / "folder").mkdir(parents=True)
    (files / "afile.txt").write_text("not what any option wants\n")
    (files / "garbage.safetensors").write_bytes(b"\x00garbage" * 40)
    shutil.copy(ckpt, files / "model.safetensors")
    (root / "cwd" / "a" / "b" / "c").mkdir(parents=True)  # the working directory: ../.. stays inside
    common = os.path.commonprefix(ids)
    assert len(set(ids)) == len(ids) >= 8 and len(common) < 16
    return {"root": root, "store": store, "data": data, "files": files, "cnn": cnn, "ep": ep, "attack": att,
            "corrupt": cor, "report": rep, "failed": failed, "stopped": stopped, "ids": ids, "ambiguous": common}


def fresh_store(world) -> Path:
    """A copy of the module's store for one example (its decoded-dataset cache left out: a command rebuilds what
    it needs)."""
    dst = world["root"] / "examples" / "store"
    shutil.rmtree(dst.parent, ignore_errors=True)  # the previous example's copy and what it wrote beside it
    shutil.copytree(world["store"], dst, ignore=shutil.ignore_patterns("cache", "tmp", ".lock"))
    return dst


def rows(root: Path) -> dict[str, list[dict]]:
    """Every row of every table (through a fresh read-only connection, so the WAL is included)."""
    conn = sqlite3.connect(f"{(root / 'epcli.db').resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {}
        for t in names:
            cur = conn.execute(f'SELECT * FROM "{t}"')
            cols = [d[0] for d in cur.description]
            out[t] = [dict(zip(cols, r)) for r in cur]
        return out
    finally:
        conn.close()


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "artifacts").rglob("*")) if p.is_file()}


def key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=repr)


def owner(table: str, row: dict):
    """The run a row belongs to (None: a row of no run, such as an artifact or the schema version)."""
    return row.get("id") if table == "runs" else row.get("run_id")


def store_changes(before: dict, after: dict) -> tuple[list[str], set[str]]:
    """What changed between two `rows` snapshots: (rows lost or altered, ids of the runs added)."""
    lost = []
    for t, old in before.items():
        now = {key(r) for r in after.get(t, [])}
        lost += [f"{t}: {key(r)[:160]}" for r in old if key(r) not in now]
    added = {r["id"] for r in after.get("runs", [])} - {r["id"] for r in before.get("runs", [])}
    return lost, added


# --- values ---------------------------------------------------------------------------------------------

HOSTILE = ["", " ", "\t", "-", "--", "%", "_", "ünï©ødé ✓ 日本", "[bold red]x[/]", "a\nb", "null", "x" * 3000,
           "../..", "~", "=", "a=b=c", "$HOME", "\x1b]0;title\x07\x1b[2J", "a\rb\x9b"]  # terminal control codes
INTS = ["0", "-1", "1", "2", "3", "-0", "99999999999999999999999", "1e3", "2.5", "nan", "0x10", "+4", "abc"]
FLOATS = ["0", "-0.1", "0.5", "1", "nan", "inf", "-inf", "1e309", "1e-320", "1/255", "-0", "abc"]
EPS = ["8/255", "8/255,,", "1/0", "-1", "1e309", "0", "0.5", ",", "nan", "8/255/2", "1/255,2/255", "paper-linf",
       "paper-l2", "1e-400", "2/255 ,8/255", "0x1", "1_0"]


def paths(w, new: Path) -> list[str]:
    """Paths that do not exist, are folders, or are files of the wrong kind; `new` a fresh, unused one."""
    f = w["files"]
    return [str(new), str(new.parent / "nowhere" / "x"), str(f / "folder"), str(f / "afile.txt"),
            str(f / "afile.txt" / "sub"), str(f / "garbage.safetensors"), str(f / "model.safetensors"),
            str(w["data"]), str(f / "näme with spaces")]


def confine(line: list[str], env: dict, w) -> tuple[list[str], dict]:
    """Absolute paths a drawn value makes up (`/x...`) moved under the scratch folder: commands write where they
    are told (`--out`, `--export`, `demo --store`), and tests run as root on some machines."""
    root = str(w["root"])

    def inside(v: str) -> str:
        return v if not v.startswith("/") or v.startswith(root) else str(w["root"] / "cwd" / v.lstrip("/"))
    return [inside(v) for v in line], {k: inside(v) for k, v in env.items()}


def inside(new: Path) -> list[str]:
    """The store an example runs on (`new` lies beside it) and folders inside it, some that epcli manages."""
    return [str(new.with_name("store") / sub) for sub in ("", "reports", "artifacts", "artifacts/ab", "tmp", "cache/x",
                                                        "partial")]


def run_refs(w) -> list[str]:
    """Run ids of every kind and state, a unique prefix, an ambiguous one, unknown ones and LIKE wildcards."""
    return [w["cnn"], w["ep"], w["attack"], w["corrupt"], w["report"], w["failed"], *w["stopped"], w["cnn"][:10],
            w["ambiguous"], "zzzz", w["cnn"].upper(), w["cnn"] + "x", "%", "_"]


def valid_values(name: str, cmd: str, w, new: Path) -> list[str]:
    """Values that mean something to option `name` of command `cmd` (besides the hostile ones)."""
    from epcli.attacks import ATTACKS
    from epcli.corruptions import CORRUPTIONS
    from epcli.train import RECIPES
    ckpt, data = str(w["files"] / "model.safetensors"), str(w["data"])
    v = {
        "model": (["cnn-small", "ep-cnn-tiny", "vit", "timm:nope", "resnet-9000"] +
                  ([w["cnn"], w["ep"], ckpt] if cmd in ("attack", "corrupt") else [])),
        "dataset": [data, "cifar10-mini", "nope-data"],
        "data_dir": [data],
        "recipe": sorted(RECIPES), "name": sorted(RECIPES),
        "attack_name": list(ATTACKS), "norm": ["linf", "l2", "L2", "l7"], "eps": EPS,
        "select": ["random", "first", "last", "best-val", "best-test"],
        "protocol": ["epcli", "paper"], "labels": ["true", "predicted"],
        "grad_mode": ["bptt", "truncated:3", "truncated:0", "implicit", "ep", "transfer:cnn-small", "transfer:",
                      f"transfer:{w['cnn']}"],
        "unroll_sweep": ["3,5", "0", ",", "1,x", "99999999999"],
        "corruption": ["fog", "fog,contrast", "lightning", "fog,,", ","],
        "severity": ["1", "1,2", "6", "0", "1,x", ","],
        "adv_train": ["l2:0.5", "linf:8/255", "l2", "l7:0.5", "linf:2", ":"],
        "rule": ["symmetric", "one-sided", "bptt", "nope"],
        "set_": ["epochs=1", "optimizer.lr=0.1", "garbage", "a..b=1", "optimizer.lrs=null", "ep.T1=[1]",
                 "epochs=1e309"],
        "model_set": ["width=4", "T=3", "nosuch=1", "oops", "width=-1"],
        "resume": [w["cnn"], w["ep"], w["attack"], w["failed"], w["stopped"][0]],
        "teacher": [w["ep"], w["cnn"], "ep-cnn-tiny"],
        "reference": [w["cnn"], w["corrupt"], "cnn-small"],
        "source": paths(w, new), "export": [str(new)] + inside(new), "out": [str(new)] + inside(new),
        "device": ["cpu", "auto", "cuda", "cuda:7", "tpu", "CPU"],
        "kind": ["train", "attack", "corrupt", "report", "nope"],
        "status": ["running", "finished", "failed", "interrupted", "weird"],
        "since": ["12h", "30m", "7d", "2026-11-29", "2026-11-29T14:00", "99999999999999d", "0d", "-1d", "yesterday"],
        "tag": ["base", "none"], "tags": ["base", "-base", "new", "-", "two words"],
        "where": ["test_acc>0.5", "seed=0", "config.recipe.epochs>=1", "test_acc>>1", "tags=x", "x<nan",
                  "robust_acc<2"],
        "sort": ["-test_acc", "seed", "-", "config", "started_at", "nope"],
        "limit": ["0", "1", "-1", "1000000000000000000000"],
        "fmt": ["table", "csv", "json", "md", "html", "robustbench", "pdf"],
        "run": [w["cnn"], w["ep"], w["attack"], w["failed"], w["stopped"][0]], "run_id": run_refs(w),
        "run_a": run_refs(w), "run_b": run_refs(w), "run_ids": run_refs(w), "text": ["a note", ""],
        "label": ["mine", "[x]"],
        "store": [str(new), str(w["files"] / "afile.txt")],
        "n": ["1", "4", "8", "100000"], "chunk": ["1", "4", "0"], "steps": ["1", "2"], "restarts": ["1"],
        "queries": ["5"], "T": ["3", "1"], "batch_size": ["1", "4"], "epochs": ["1"], "T1": ["3"], "T2": ["2"],
        "seed": ["0", "1", "-1", str(2 ** 64)], "lr": ["0.01"], "beta": ["0.5", "0"],
    }
    return v.get(name, [])


def generic_values(param, w, new: Path) -> list[str]:
    t = getattr(param, "bare_type", None)
    t = t() if callable(t) else type(getattr(param, "type", None))
    if t is int:
        return INTS
    if t is float:
        return FLOATS
    return HOSTILE + paths(w, new) + run_refs(w)[:3]


# any text a shell can pass (no NUL, no lone surrogate)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


def value(param, cmd: str, w, new: Path):
    """A value for one option or argument: one it takes, a hostile one of its type, or any text or number."""
    valid = valid_values(param.name, cmd, w, new)
    generic = generic_values(param, w, new)
    t = getattr(param, "bare_type", None)
    t = t() if callable(t) else None
    anything = (st.integers(-2 ** 70, 2 ** 70).map(str) if t is int else
                st.floats(allow_nan=True, allow_infinity=True).map(repr) if t is float else TEXT)
    mixed = st.tuples(st.sampled_from(valid or generic), st.sampled_from([",", ":", "=", "/", " ", ",,", ""]),
                      TEXT).map("".join)  # a valid value with something after it
    choices = [st.sampled_from(generic), anything, mixed] + ([st.sampled_from(valid)] * 3 if valid else [])
    return st.one_of(*choices)


def flag_names(param) -> list[str]:
    return list(param.opts) + list(param.secondary_opts)


@st.composite
def command_line(draw, w, new: Path, commands=None):
    """A command and a random subset of its options (each maybe duplicated) with valid or hostile values."""
    name = draw(st.sampled_from(commands or sorted(GROUP.commands)))
    cmd = GROUP.commands[name]
    line = []
    for p in GROUP.params:  # global options, before the command
        if p.name not in SKIP_GLOBAL and draw(st.integers(0, 9)) == 0:
            line.append(draw(st.sampled_from(flag_names(p))))
    line.append(name)
    positional = []
    for p in cmd.params:
        if p.param_type_name == "argument":
            if p.nargs == -1:
                positional += draw(st.lists(value(p, name, w, new), min_size=0 if not p.required else 1, max_size=3))
            elif p.required or draw(st.booleans()):
                if draw(st.integers(0, 19)) or not p.required:  # a required one left out, now and then
                    positional.append(draw(value(p, name, w, new)))
            continue
        if draw(st.integers(0, 3)):  # each option with probability 1/4
            continue
        times = draw(st.sampled_from([1, 1, 1, 2])) if not getattr(p, "multiple", False) else draw(st.integers(1, 3))
        for _ in range(times):
            if getattr(p, "is_flag", False):
                line.append(draw(st.sampled_from(flag_names(p))))
                continue
            line += [draw(st.sampled_from(p.opts)), draw(value(p, name, w, new))]
    # positional arguments after the options (a value starting with "-" there still reads as an option)
    line += positional
    env = {}  # the options' environment variables (EPCLI_SEED, EPCLI_DEVICE, EPCLI_DATA_DIR...), now and then
    for p in cmd.params:
        names = [p.envvar] if isinstance(p.envvar, str) else list(p.envvar or [])
        for var in names:
            if var not in ("EPCLI_STORE", "EPCLI_DEBUG") and draw(st.integers(0, 5)) == 0:
                env[var] = draw(value(p, name, w, new))
    return (name, *confine(line, env, w))


# a value each pipeline must refuse before it reads data or opens a run: it comes last, so it wins
POISON = {
    "train": [["--epochs", "0"], ["--batch-size", "-1"], ["--seed", "-1"], ["--device", "tpu"], ["--lr", "nan"],
              ["--T1", "0"]],
    "attack": [["--n", "0"], ["--steps", "0"], ["--batch-size", "0"], ["--device", "tpu"], ["--seed", "-1"],
               ["--step-size", "inf"]],
    "corrupt": [["--n", "0"], ["--batch-size", "0"], ["--device", "tpu"], ["--seed", "-1"]],
    "demo": [["--device", "tpu"]],
}


# --- the properties ----------------------------------------------------------------------------------------

def strict_json(text: str):
    """JSON as jq and other strict readers take it: NaN and Infinity (which json.loads accepts) are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def reads_only(args: list[str]) -> bool:
    """Commands that only read the store: the store commands that show it, and rm / gc --dry-run, and a report
    that writes no file (no --out, --figures or --curves)."""
    name = next((a for a in args if a in GROUP.commands), None)
    return (name in ("runs", "show", "trace", "compare", "models", "recipes") or
            (name in ("rm", "gc") and "--dry-run" in args) or
            (name == "report" and not {"--out", "--figures", "--curves"} & set(args)))


def check(args, store: Path, slow: list, env=None, via_env=False):
    before_rows, before_files = rows(store), files(store)
    t0 = time.perf_counter()
    r = invoke(args, store=None if via_env else store, env=env)
    slow.append((time.perf_counter() - t0, args, r.exit_code))
    text = f"argv: {args}\nenv: {env}\nexit {r.exit_code}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
    if os.environ.get("EPCLI_FUZZ_VERBOSE"):  # what the examples were and how each ended
        print(f"{code if (code := r.exit_code) is not None else '?'}  {' '.join(map(str, args))[:150]}\n    "
              f"{(r.stderr.strip().splitlines() or [''])[-1][:150]}")
    # (a) no traceback
    assert "Traceback" not in r.stdout + r.stderr, text
    assert r.exception is None or isinstance(r.exception, SystemExit), f"{r.exception!r}\n{text}"
    # (a') nothing a terminal would obey: user text is shown with its control characters written out (CliRunner
    # is no terminal, so rich adds no styles of its own)
    controls = {c for c in r.stdout + r.stderr if c not in "\n\t" and unicodedata.category(c) == "Cc"}
    assert not controls, f"control characters {sorted(controls)} reached the terminal\n{text}"
    # (b) a documented exit code
    code = r.exit_code
    assert code in EXIT_CODES, text
    # (c) one error line; --json gives one whole document or nothing
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if code not in NO_ERROR_LINE:
        errors = [ln for ln in lines if ln.startswith("error")]
        assert len(errors) == 1 and errors == lines[-1:] and errors[0].startswith("error: "), text
        # (c') and an expected one: the CLI words an unexpected exception as "TypeName: ... (rerun with --debug)"
        assert "rerun with --debug" not in errors[0], f"an internal error, not a refusal\n{text}"
    if "--json" in args and not {"--version", "--help"} & set(args):
        if code == 0 or r.stdout.strip():
            try:
                strict_json(r.stdout)
            except ValueError as e:
                pytest.fail(f"--json printed no whole, strict JSON document ({e})\n{text}")
    # (d) the store
    after_rows = rows(store)
    lost, added = store_changes(before_rows, after_rows)
    status = {r["id"]: r["status"] for r in after_rows.get("runs", [])}
    with Store(store, create=False) as s:
        problems = s.check_invariants()
    assert not problems, f"{problems}\n{text}"
    assert "running" not in status.values(), text
    if reads_only(args):  # whatever its exit code, a command that only reads changed nothing
        assert after_rows == before_rows and files(store) == before_files, f"a reading command wrote\n{text}"
    if code == 0:
        return r
    assert not lost, f"rows lost or changed by a failing command: {lost[:5]}\n{text}"
    if code in (2, 3, 4):  # refused: checked before any run opened
        assert not added, f"a refused command opened runs {added}\n{text}"
        assert files(store) == before_files, text
        for t, new_rows in after_rows.items():
            assert len(new_rows) == len(before_rows.get(t, [])), f"table {t} grew\n{text}"
    else:
        assert all(status[i] == "failed" for i in added), text
        after_files = files(store)
        assert all(after_files.get(k) == v for k, v in before_files.items()), text
        for t, new_rows in after_rows.items():  # rows added only for the failed runs (and their artifacts)
            old = {key(x) for x in before_rows.get(t, [])}
            extra = [x for x in new_rows if key(x) not in old]
            assert t == "artifacts" or all(owner(t, x) in added for x in extra), f"table {t}: {extra[:3]}\n{text}"
    return r


FUZZ = settings(derandomize=not os.environ.get("EPCLI_FUZZ_RANDOM"), deadline=None, database=None,
                max_examples=int(os.environ.get("EPCLI_FUZZ_EXAMPLES", "120")),
                suppress_health_check=list(HealthCheck))


def _report(slow: list, label: str) -> None:
    from collections import Counter
    total = sum(t for t, _, _ in slow)
    print(f"\n{label}: exit codes {dict(Counter(c for _, _, c in slow))}, commands "
          f"{dict(Counter(a[a.index(n)] for _, a, _ in slow for n in GROUP.commands if n in a[:3]))}")
    worst = sorted(slow, key=lambda x: -x[0])[:3]
    print(f"\n{label}: {len(slow)} commands, {total:.1f} s; slowest: " +
          "; ".join(f"{t:.2f} s {' '.join(map(str, a))[:100]}" for t, a, _ in worst))


def test_fuzz_every_command(world, monkeypatch):
    """Random command lines over every command; the pipelines always carry one value refused up front."""
    assert {0, 1, 2, 3, 4, 5, 130} <= EXIT_CODES  # the epilog was read
    slow: list = []

    @FUZZ
    @given(data=st.data())
    def example(data):
        store = fresh_store(world)
        new = store.parent / "new place"
        name, line, env = data.draw(command_line(world, new))
        if name in POISON:
            line += data.draw(st.sampled_from(POISON[name]))
            if "--device" not in line and name != "demo":
                line = line[:1 + line.index(name)] + ["--device", "cpu"] + line[1 + line.index(name):]
        r = check(line, store, slow, env=env)
        if name in POISON and "--help" not in line and "--version" not in line:
            assert r.exit_code != 0, f"{line} did its work despite {line[-2:]}\n{r.output[-2000:]}"

    monkeypatch.chdir(world["root"] / "cwd" / "a" / "b" / "c")  # relative paths among the values land here
    example()
    _report(slow, "fuzz")


def test_store_locations(world, tmp_path, monkeypatch):
    """--store and EPCLI_STORE at a file, a missing or empty folder, and a real store under a name with spaces and
    unicode: the same properties on every command that takes a store. Reading commands never create a store (an
    empty folder stays empty: a store appears only when a command writes a run, docs/store.md); a store under any
    name works."""
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "my stores" / "ünï ✓ [x]"
    shutil.copytree(world["store"], odd, ignore=shutil.ignore_patterns("cache", "tmp", ".lock"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    reading = [["runs", "--json"], ["show", world["cnn"], "--json"], ["trace", world["cnn"]], ["report", "-f", "csv"],
               ["compare", world["attack"], world["attack"], "--json"], ["gc", "--dry-run", "--json"]]
    writing = [["tag", world["cnn"], "x", "--json"], ["note", world["cnn"], "n"], ["rm", world["attack"], "--json"],
               ["gc", "--json"]]
    pipelines = [["attack", "-m", "nosuch", "--device", "cpu"], ["corrupt", "--n", "0", "--device", "cpu"]]
    for where in ("afile", "missing", "empty"):
        for args in reading + writing + pipelines:
            for how in ("option", "env"):
                path = str(tmp_path / where)
                r = invoke(args, store=path) if how == "option" else invoke(args, env={"EPCLI_STORE": path})
                lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
                assert r.exception is None or isinstance(r.exception, SystemExit), (where, args, r.output)
                assert "Traceback" not in r.output and r.exit_code in EXIT_CODES - {0}, (where, args, r.output)
                assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, r.stderr
                assert r.stdout == "", (where, args, r.stdout)
                if where == "afile":
                    assert r.exit_code == 5 and "is a file, not a store folder" in r.stderr, r.stderr
                elif args[0] not in ("attack", "corrupt"):  # reading and run management: no store is created
                    assert r.exit_code == 5 and "no epcli store at" in r.stderr, r.stderr
                    assert not (tmp_path / "missing").exists() and not list((tmp_path / "empty").iterdir())
                else:  # a pipeline creates its store and says so, then refuses the bad value
                    assert "created a new store" in r.stderr and r.exit_code in (2, 3), r.stderr
                    shutil.rmtree(path)  # back to missing or empty for the next command
                    if where == "empty":
                        Path(path).mkdir()
    slow: list = []
    for args in reading + writing:
        for how in ("option", "env"):
            fresh = odd.parent / "copy of ünï ✓ [x]"
            shutil.rmtree(fresh, ignore_errors=True)
            shutil.copytree(odd, fresh)
            r = check(args, fresh, slow) if how == "option" else \
                check(args, fresh, slow, env={"EPCLI_STORE": str(fresh)}, via_env=True)
            assert r.exit_code == 0, r.output
            if "--json" in args:
                strict_json(r.stdout)


def test_refusals_name_the_run_kind(world):
    # found while probing by hand: "run ... is a attack run, not a training run"
    store = fresh_store(world)
    for args in (["attack", "-m", world["attack"], "--n", "2"], ["train", "--resume", world["attack"]],
                 ["attack", "--grad-mode", f"transfer:{world['attack']}", "-m", world["cnn"], "--n", "2"]):
        r = check([*args, "--device", "cpu"], store, [])
        assert r.exit_code == 2 and f"run {world['attack']} is an attack run, not a training run" in r.stderr, \
            r.output
    r = check(["attack", "-m", world["corrupt"], "--device", "cpu"], store, [])
    assert r.exit_code == 2 and f"run {world['corrupt']} is a corrupt run, not a training run" in r.stderr


@st.composite
def tiny_pipeline(draw, w):
    """A pipeline command line that does real work, kept tiny: a few images, one step, one epoch."""
    pick = lambda *xs: draw(st.sampled_from(xs))  # noqa: E731
    maybe = lambda *opt: list(opt) if draw(st.booleans()) else []  # noqa: E731
    name = pick("train", "attack", "corrupt")
    if name == "train":
        line = ["train", "--model", pick("cnn-small", "ep-cnn-tiny"), "--dataset", str(w["data"]), "--epochs", "1",
                *maybe("--batch-size", pick("8", "32")), *maybe("--lr", pick("0.01", "0.001")),
                *maybe("--select", pick("last", "best-val", "best-test")), *maybe("--label", pick("tiny", "ünï ✓")),
                *maybe("--seed", pick("0", "3")), *maybe("--set", "optimizer.weight_decay=0.0001")]
        if "ep-cnn-tiny" in line:
            line += ["--set", "optimizer.lrs=null", "--T1", "3", "--T2", "2"]
        if draw(st.booleans()):
            line = ["train", "--resume", pick(w["cnn"], w["ep"]), "--epochs", "2"]
    elif name == "attack":
        attack = pick("fgsm", "pgd", "apgd-ce", "square", "cw")
        norm = "l2" if attack == "cw" else pick("linf", "l2")
        line = ["attack", "--model", pick(w["cnn"], "cnn-small", str(w["files"] / "model.safetensors"), w["ep"]),
                "--attack", attack, "--norm", norm, "--n", pick("2", "4"),
                "--eps", pick("8/255", "1/255,,2/255", "0") if norm == "linf" else pick("0.5", "0.1,0.25"),
                *maybe("--select", pick("random", "first")), *maybe("--labels", pick("true", "predicted")),
                *maybe("--targeted"), *maybe(pick("--no-checks", "--no-strength-check")), *maybe("--chunk", "2"),
                *maybe("--batch-size", pick("1", "3"))]
        line += ["--queries", "5"] if attack == "square" else ["--steps", "1"] if attack != "fgsm" else []
    else:
        line = ["corrupt", "--model", pick(w["cnn"], "cnn-small"), "-c", pick("fog", "contrast,gaussian_noise"),
                "-s", pick("1", "2,5"), "--n", pick("2", "4"), *maybe("--batch-size", pick("1", "3"))]
        if draw(st.booleans()):  # relative mCE: the reference has fog at severity 1
            line[3:7] = ["-c", "fog", "-s", "1"]
            line += ["--reference", w["corrupt"]]
    return line + ["--device", "cpu"] + maybe("--json")


@pytest.mark.slow
def test_fuzz_tiny_valid_pipelines(world, monkeypatch):
    """Valid but tiny train / attack / corrupt command lines that do their work: the same properties (a refusal is
    still allowed: some combinations are meaningless), and with --json one whole document."""
    slow: list = []
    monkeypatch.chdir(world["root"] / "cwd" / "a" / "b" / "c")

    @settings(FUZZ, max_examples=int(os.environ.get("EPCLI_FUZZ_PIPELINES", "20")))
    @given(data=st.data())
    def example(data):
        check(data.draw(tiny_pipeline(world)), fresh_store(world), slow)

    example()
    _report(slow, "tiny pipelines")


# appended last to an unpoisoned pipeline line: small enough to run (they win over a drawn duplicate)
CAPS = {"train": ["--epochs", "1"], "attack": ["--n", "2"], "corrupt": ["--n", "2", "-c", "fog,contrast"]}
COSTLY = {"cifar10-mini", "vit", "resnet18", "ep-cnn", "ep-cnn-small", "cifar10", "cifar100", "paper-ep-cifar10",
          "paper-ep-cifar100", "autoattack", "art-autoattack"}  # minutes on a CPU, even for one epoch or 2 images


@st.composite
def mostly_valid_line(draw, w, new: Path, name: str):
    """A pipeline line of options with values they take (or meaningful near-misses), and at most one hostile value:
    the checks behind the first one are reached (a line full of bad values stops at the first check)."""
    cmd = GROUP.commands[name]
    options = [p for p in cmd.params if p.param_type_name == "option" and p.name not in ("quiet",)]
    models = ["cnn-small", "ep-cnn-tiny"] + ([w["cnn"], w["ep"], str(w["files"] / "model.safetensors")]
                                             if name != "train" else [])
    line = [name, "--model", draw(st.sampled_from(models))] + (["--dataset", str(w["data"])] if name == "train" else [])
    for p in draw(st.lists(st.sampled_from(options), unique_by=lambda p: p.name, max_size=6)):
        if getattr(p, "is_flag", False):
            line.append(draw(st.sampled_from(flag_names(p))))
            continue
        valid = [v for v in valid_values(p.name, name, w, new) if v not in COSTLY]
        if valid:
            line += [draw(st.sampled_from(p.opts)), draw(st.sampled_from(valid))]
    fault = draw(st.one_of(st.none(), st.sampled_from([p for p in options if not getattr(p, "is_flag", False)])))
    if fault is not None:
        line += [draw(st.sampled_from(fault.opts)), draw(value(fault, name, w, new))]
    return confine(line, {}, w)[0]


@pytest.mark.slow
def test_fuzz_pipelines_unpoisoned(world, monkeypatch):
    """Train / attack / corrupt lines with valid values and at most one hostile one, and no value refused up front:
    they run when they are valid, kept small (one epoch, two images, two corruptions; no costly model or dataset)."""
    from hypothesis import assume
    slow: list = []
    monkeypatch.chdir(world["root"] / "cwd" / "a" / "b" / "c")

    @settings(FUZZ, max_examples=int(os.environ.get("EPCLI_FUZZ_UNPOISONED", "30")))
    @given(data=st.data())
    def example(data):
        store = fresh_store(world)
        name = data.draw(st.sampled_from(PIPELINES[:3]))
        line = data.draw(mostly_valid_line(world, store.parent / "new place", name))
        assume(not COSTLY & set(line))
        line += CAPS[name]
        if "--device" not in line:
            line += ["--device", "cpu"]
        check(line, store, slow)

    example()
    _report(slow, "unpoisoned pipelines")


def test_json_of_every_failing_command_is_nothing(world, tmp_path, monkeypatch):
    """`--json` with a command that fails, each command (a new one must be added here): stdout stays empty, not half
    a document, and the one error line is on stderr. Among them failures after work began: a training run that
    diverges (exit 6, after an epoch's progress) and a corrupt run refused late."""
    monkeypatch.chdir(tmp_path)
    w = world
    failing = {
        "train": ["--model", "cnn-small", "--dataset", str(w["data"]), "--epochs", "3", "--lr", "1e10"],
        "attack": ["--model", w["cnn"], "--eps", "1/0"],
        "corrupt": ["--model", w["cnn"], "--n", "2", "--source", str(w["files"] / "folder")],
        "report": ["-f", "md", "--out", str(w["files"] / "afile.txt")],
        "demo": ["--device", "tpu", "--store", str(tmp_path / "demo")],
        "runs": ["--where", "test_acc>>1"], "show": ["zzzz"], "trace": [w["ambiguous"]],
        "compare": [w["attack"], w["cnn"]], "tag": [w["cnn"], "two words"], "note": ["zzzz", "x"],
        "rm": [w["cnn"]], "gc": ["--no-such-option"], "models": ["--long", "--no-such-option"], "recipes": ["nope"],
    }
    assert set(failing) == set(GROUP.commands)
    for name, args in failing.items():
        store = fresh_store(w)
        r = check([name, *args, "--json"] + (["--device", "cpu"] if name in PIPELINES[:3] else []), store, [])
        assert r.exit_code not in (0, 1) and r.stdout == "", (name, r.exit_code, r.stdout[:300])
        assert name != "train" or (r.exit_code == 6 and "epoch 1/3" in r.stderr), r.stderr


@pytest.mark.slow
def test_fuzz_sequences_of_store_commands(world, monkeypatch):
    """Two to five store commands in a row on one store (tag, note, rm --cascade, gc, report --out, then runs,
    show, trace, compare...): what one leaves behind must suit the next; the properties hold after each."""
    slow: list = []
    monkeypatch.chdir(world["root"] / "cwd" / "a" / "b" / "c")
    store_commands = sorted(set(GROUP.commands) - set(PIPELINES))

    @settings(FUZZ, max_examples=int(os.environ.get("EPCLI_FUZZ_SEQUENCES", "25")))
    @given(data=st.data())
    def example(data):
        store = fresh_store(world)
        for _ in range(data.draw(st.integers(2, 5))):
            _, line, env = data.draw(command_line(world, store.parent / "new place", store_commands))
            check(line, store, slow, env=env)

    example()
    _report(slow, "sequences")
