"""Docs cannot drift: every command, option and registry entry appears in docs/, and what the docs show (commands,
options, flags, signatures, the store schema, sqlite-utils queries, Python examples) exists and runs as written."""
import re
from pathlib import Path

import click
import typer

from epcli.cli import app

DOCS = Path(__file__).parent.parent / "docs"


def _is_option(param) -> bool:
    # not isinstance(param, click.Option): Typer >= 0.24 builds its commands with its own vendored Click
    return getattr(param, "param_type_name", None) == "option"


def test_cli_reference_covers_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    group = typer.main.get_command(app)
    checked = 0
    for name, cmd in group.commands.items():
        assert f"## epcli {name}" in text, f"docs/cli.md misses `epcli {name}`: run scripts/cli_reference.py"
        assert cmd.help, f"`epcli {name}` has no help text"
        for p in cmd.params:
            if _is_option(p):
                assert p.opts[0] in text, f"docs/cli.md misses {name} {p.opts[0]}: run scripts/cli_reference.py"
                checked += 1
    assert checked >= 100  # the options were seen at all


def test_every_model_is_documented():
    from epcli.models import list_models
    text = (DOCS / "models.md").read_text()
    for name in list_models():
        assert f"`{name}`" in text, f"docs/models.md does not mention `{name}`"


def test_every_attack_and_corruption_is_documented():
    from epcli.attacks import ATTACKS
    from epcli.corruptions import CORRUPTIONS
    attacks = (DOCS / "attacks.md").read_text()
    for name in ATTACKS:
        assert name in attacks, f"docs/attacks.md does not mention {name}"
    corr = (DOCS / "corruptions.md").read_text()
    for name in CORRUPTIONS:
        assert name in corr, f"docs/corruptions.md does not mention {name}"


def test_readme_report_commands_run_as_written(tmp_path):
    """Every `epcli report ...` the README shows runs on a store with results, and every format it lists exists."""
    import re
    import shlex

    from test_report import build_store
    from typer.testing import CliRunner

    from epcli import report
    readme = (DOCS.parent / "README.md").read_text()
    commands = set()
    for line in readme.splitlines():
        for m in re.finditer(r"(?:^|`|\.venv/bin/)(epcli report[^`#\n]*)", line):
            commands.add(m.group(1).strip())
        listed = re.search(r"epcli report.*#.*-f ([\w|]+)", line)
        if listed:
            for fmt in listed.group(1).split("|"):
                assert fmt in report.FORMATS, f"README lists report format {fmt!r}, which does not exist"
    assert len(commands) >= 3, commands
    store, _ = build_store(tmp_path / "store")
    store.close()
    runner = CliRunner()
    for cmd in sorted(commands):
        argv = shlex.split(cmd)[1:]
        argv = [str(tmp_path / a) if a.endswith("/") else a for a in argv]  # output folders under tmp
        r = runner.invoke(app, ["--store", str(tmp_path / "store")] + argv)
        assert r.exit_code == 0, f"README command `{cmd}` failed: {r.output[-500:]}"


try:  # Typer >= 0.24 vendors its own Click
    from typer._click.exceptions import UsageError as _VendoredUsageError
    USAGE_ERRORS: tuple = (click.UsageError, _VendoredUsageError)
except ImportError:
    USAGE_ERRORS = (click.UsageError,)


def _documented_commands(text: str, *, plain_blocks: bool = True, inline: bool = True) -> list[list[str]]:
    """`epcli ...` invocations in fenced code blocks (bash, sh and, with plain_blocks, unlabelled ones) and in
    `backticks`, as argument lists after `epcli` (a shell line is split at ; && | and parentheses, quotes
    respected, comments dropped; a leading `$VAR`, as in `epcli $S attack`, stands for global options)."""
    import re
    import shlex
    chunks = re.findall(r"```(?:bash|sh)%s\n(.*?)```" % ("?" if plain_blocks else ""), text, re.S)
    chunks += re.findall(r"`(epcli [^`\n]+)`", text) if inline else []
    out = []
    for chunk in chunks:
        for line in chunk.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
            lexer.whitespace_split = True
            try:
                tokens = list(lexer)
            except ValueError:  # not a shell line (a help-text fragment)
                continue
            part: list[str] = []
            for tok in tokens + [";"]:
                if tok and set(tok) <= set(";&|()"):
                    if "epcli" in part:
                        args = part[part.index("epcli") + 1:]
                        while args and args[0].startswith("$"):
                            args = args[1:]
                        out.append(args)
                    part = []
                else:
                    part.append(tok)
    return out


def test_every_documented_command_parses():
    """Every epcli command line shown in README.md and docs/cli.md, and in a bash block of any other doc, is
    accepted by the CLI's parser (options, types, arguments); placeholders like RUN stand for a run id, `...`
    for omitted options."""
    group = typer.main.get_command(app)
    texts = {"README.md": (DOCS.parent / "README.md").read_text(), "docs/cli.md": (DOCS / "cli.md").read_text()}
    commands = [(where, args) for where, text in texts.items() for args in _documented_commands(text)]
    for doc in sorted(DOCS.glob("*.md")):
        if doc.name != "cli.md":
            commands += [(f"docs/{doc.name}", args)
                         for args in _documented_commands(doc.read_text(), plain_blocks=False, inline=False)]
    seen = 0
    for where, args in commands:
        line = " ".join(args)
        args = [a for a in args if a != "..."]
        if not args or args[0] in ("--help", "--version") or "[OPTIONS]" in line or args[0] == "[OPTIONS]":
            continue
        ctx = group.make_context("epcli", list(args), resilient_parsing=False)
        tail = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + ctx.args
        name, rest = tail[0], tail[1:]
        cmd = group.get_command(ctx, name)
        assert cmd is not None, f"{where}: `{line}`: no command {name!r}"
        try:
            cmd.make_context(name, list(rest), parent=ctx)
        except USAGE_ERRORS as e:
            raise AssertionError(f"{where}: `{line}` does not parse: {e}") from None
        seen += 1
    assert seen >= 60  # the README's, the help texts' and the other docs' examples


def _option_names(cmd) -> dict[str, bool]:
    """Every spelling of cmd's options -> whether it takes a value."""
    names = {}
    for p in cmd.params:
        if _is_option(p):
            for o in list(p.opts) + list(p.secondary_opts):
                names[o] = not p.is_flag and not p.count
    return names


def test_every_option_a_doc_names_exists():
    """Every `epcli CMD --option` in README.md and docs/*.md, in any code block or `backticks` (where a command
    is often named without its arguments, so no full parse), names a command and options that exist."""
    group = typer.main.get_command(app)
    top = _option_names(group)
    seen = 0
    for doc in [DOCS.parent / "README.md"] + sorted(DOCS.glob("*.md")):
        for args in _documented_commands(doc.read_text(), plain_blocks=False):
            line = " ".join(args)
            args = [a for a in args if a != "..."]
            while args and args[0] in top:  # global options before the command
                args = args[1 + top[args[0]]:]
            if not args or args[0] == "--" and len(args) == 1 or args[0] == "[OPTIONS]":
                continue
            args = args[1:] if args[0] == "--" else args  # torchrun ... -m epcli -- attack
            cmd = group.commands.get(args[0])
            assert cmd is not None, f"{doc.name}: `epcli {line}`: no command {args[0]!r}"
            options = _option_names(cmd)
            rest = args[1:]
            while rest:
                tok, rest = rest[0], rest[1:]
                if tok.startswith("-") and tok not in ("-", "--") and not tok[1:2].isdigit():
                    name = tok.split("=")[0]
                    if name not in options and (cmd.context_settings or {}).get("ignore_unknown_options"):
                        continue  # an argument (`epcli tag RUN -draft` removes a tag)
                    assert name in options, f"{doc.name}: `epcli {line}`: {args[0]} has no option {name}"
                    if options[name] and "=" not in tok:
                        rest = rest[1:]  # its value, which may start with '-' (--sort -test_acc)
                    seen += 1
    assert seen >= 150


def _built_store(root):
    """A store with results (tests/test_report.py's build_store: cifar10-mini) plus an EP-CNN and a CNN trained on
    cifar10 with PGD results, the runs the docs' Python examples look up."""
    from test_report import _attack, _train, build_store
    store, _ = build_store(root)
    for model in ("ep-cnn", "cnn"):
        rid, ck = _train(store, model, {"label": model}, [0.5], dataset="cifar10")
        _attack(store, rid, ck, model, "pgd", "linf", {8 / 255: 0.2}, dataset="cifar10")
    return store


def _python_blocks(doc: str) -> list[str]:
    import re
    return re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)


def test_store_and_report_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The Python examples of docs/store.md and docs/report.md run verbatim on a store at ./store."""
    _built_store(tmp_path / "store").close()
    monkeypatch.chdir(tmp_path)
    for doc in ("store.md", "report.md"):
        (block,) = _python_blocks(doc)
        exec(compile(block, doc, "exec"), {})
    out = capsys.readouterr().out
    assert "pgd linf 0.03137" in out  # store.md prints the EP-CNN's robust accuracy
    assert "epcli leaderboard" in out and "train " in out  # report.md: the table, then the lineage tree
    assert (tmp_path / "out/report.html").is_file() and list((tmp_path / "out/rb/cifar10").glob("*/*.json"))


def test_store_tables_are_the_documented_ones(tmp_path):
    """docs/store.md's table of tables lists every table of a new store with exactly its columns, and the
    leaderboard view's columns."""
    import re

    from epcli.store import Store
    text = (DOCS / "store.md").read_text()
    documented = {}
    for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| (.*) \|$", text, re.M):
        cols = m.group(2)
        while re.search(r"\([^()]*\)", cols):  # drop explanations: (JSON), (`epcli tag`), ...
            cols = re.sub(r"\([^()]*\)", "", cols)
        documented[m.group(1)] = re.findall(r"`(\w+)`", cols)
    store = Store(tmp_path / "s")
    actual = {t.name: [c.name for c in t.columns] for t in store.db.tables}
    assert set(documented) == set(actual), (set(documented) ^ set(actual))
    for table, cols in actual.items():
        assert sorted(documented[table]) == sorted(cols), table
    board = re.search(r"- `leaderboard`: one row per finished training run: (.*?)\n  \(", text, re.S).group(1)
    assert re.findall(r"`(\w+)`", board) == [c.name for c in store.db["leaderboard"].columns]
    store.close()


def test_store_example_queries_run(tmp_path):
    """Every `sqlite-utils store/epcli.db "..."` query in docs/store.md and README.md runs with the sqlite-utils
    CLI on a store with results (no epcli code), and the ones that filter on a run id find rows for a real one."""
    import shlex
    import subprocess
    import sys
    _built_store(tmp_path / "store").close()
    commands = []
    for text in ((DOCS / "store.md").read_text(), (DOCS.parent / "README.md").read_text()):
        for chunk in re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`([^`]*sqlite-utils [^`]+)`", text):
            tokens = shlex.split(chunk, comments=True)
            starts = [i for i, t in enumerate(tokens) if t.endswith("sqlite-utils")]
            commands += [tokens[i + 1:j] for i, j in zip(starts, starts[1:] + [len(tokens)])]
    assert len(commands) >= 6, commands
    db = str(tmp_path / "store" / "epcli.db")
    import sqlite3
    con = sqlite3.connect(db)
    attack, train = con.execute("select id, model_run_id from runs where kind = 'attack' limit 1").fetchone()
    con.close()
    for args in commands:
        assert args[0] == "store/epcli.db", args
        if "-p" in args:  # a placeholder run id: use a real one of the right kind
            i = args.index("-p")
            args[i + 2] = attack if args[i + 1] == "run" else train
        r = subprocess.run([sys.executable, "-m", "sqlite_utils", "query", db, *args[1:]], capture_output=True,
                           text=True)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout.strip() not in ("", "[]"), (args, "no rows")


def _doc_signatures(text: str) -> list[tuple[str, list[str] | None]]:
    """(name, parameter names) of every signature a doc shows, `name(params) -> result` at the start of a code line
    or in `backticks`, plus the EPCNN constructor; None for `name(...)` (parameters not listed)."""
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for m in re.finditer(r"(?:^|`)([A-Za-z_][\w.]*)\(", text, re.M):
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        if depth or not (re.match(r"\s*->", text[j:]) or m.group(1) == "EPCNN"):
            continue
        parts, level, cur = [], 0, ""
        for ch in text[m.end():j - 1]:
            level += (ch in "([{") - (ch in ")]}")
            if ch == "," and level == 0:
                parts, cur = parts + [cur], ""
            else:
                cur += ch
        names = [p.split("=")[0].strip().lstrip("*") for p in parts + [cur] if p.strip() and p.strip() != "*"]
        if names == ["..."]:
            out.append((m.group(1), None))
        elif all(re.fullmatch(r"[A-Za-z_]\w*", n) for n in names):  # a signature, not a call with values
            out.append((m.group(1), names))
    return out


def test_documented_signatures_match_the_code():
    """Every Python signature the docs show (docs/ep.md's API, attacks.md's evaluate(), architecture.md's contracts,
    report.md's paper lookups...) names a function that exists, with exactly those parameters in that order; the
    attack contract `fn(model, x, y, *, eps, norm, ...)` holds for every registered attack."""
    import importlib
    import inspect

    from epcli.attacks import ATTACKS
    from epcli.ep import EPCNN
    modules = ["epcli.models", "epcli.data", "epcli.train", "epcli.attacks", "epcli.corruptions", "epcli.ep",
               "epcli.paper", "epcli.report", "epcli.store"]
    checked = 0
    for doc in sorted(DOCS.glob("*.md")):
        if doc.name == "cli.md":
            continue
        own = f"epcli.{doc.stem}"  # a bare name in attacks.md is epcli.attacks' evaluate, not epcli.train's
        order = ([own] if own in modules else []) + (["epcli.paper"] if doc.stem == "report" else []) + modules
        for name, params in _doc_signatures(doc.read_text()):
            where = f"docs/{doc.name}: {name}({', '.join(params or ['...'])})"
            if name == "fn":  # the contract every attack follows; its other parameters are **params
                for attack, fn in ATTACKS.items():
                    real = list(inspect.signature(fn).parameters)
                    assert [p for p in real if p in params] == params[:-1], (where, attack, real)
                continue
            head, _, attr = name.rpartition(".")
            if head in ("model", "EPCNN") or name in ("model", "EPCNN"):
                fn = {"model": EPCNN.forward, "EPCNN": EPCNN.__init__}.get(name) or getattr(EPCNN, attr, None)
            else:
                fn = None
                for module in order:
                    fn = importlib.import_module(module)
                    for part in name.split("."):
                        fn = getattr(fn, part, None)
                    if callable(fn):
                        break
            assert callable(fn), f"{where}: no such function"
            real = [p for p in inspect.signature(fn).parameters if p != "self"]
            assert params is None or params == real, f"{where}: the code has ({', '.join(real)})"
            checked += 1
    assert checked >= 20


def test_ep_api_results_have_the_documented_keys():
    """docs/ep.md: the dicts ep_train_step and prediction_residual return have exactly the keys it lists, and every
    `model.<attribute>` it names exists on an EP-CNN that has relaxed."""
    import torch

    from epcli.ep import EPCNN, prediction_residual
    text = (DOCS / "ep.md").read_text()
    model = EPCNN.preset("ep-cnn-tiny")
    x, y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    results = {"model.ep_train_step": model.ep_train_step(x, y, 3, 2, 0.5),
               "prediction_residual": prediction_residual(model, x)}
    for name, result in results.items():
        listed = re.search(re.escape(name) + r"\([^)]*\) -> dict\(([^)]*)\)", text).group(1)
        assert sorted(k.strip() for k in listed.split(",")) == sorted(result), name
    for attr in set(re.findall(r"^model\.(\w+)|, model\.(\w+)", text, re.M)):
        assert hasattr(model, attr[0] or attr[1]), f"docs/ep.md names model.{attr[0] or attr[1]}"


def test_documented_script_commands_name_real_flags():
    """Every `python bench/X.py --flag` / `python scripts/X.py --flag` the docs show names a script that exists and
    flags it defines (read from its source: no torch import, no subprocess)."""
    uses = 0
    for doc in [DOCS.parent / "README.md"] + sorted(DOCS.glob("*.md")):
        for m in re.finditer(r"python (?:-m )?((?:bench|scripts)/\w+\.py)([^`\n|#]*)", doc.read_text()):
            script = DOCS.parent / m.group(1)
            assert script.is_file(), f"{doc.name}: {m.group(1)} does not exist"
            source = script.read_text()
            for flag in re.findall(r"(?<![\w-])(--[\w-]+)", m.group(2)):
                assert f'"{flag}"' in source, f"{doc.name}: {m.group(1)} has no flag {flag}: {m.group(0)}"
                uses += 1
    assert uses >= 40


def test_report_json_cells_are_documented():
    """docs/report.md's json row lists every field a cell of `report -f json` carries."""
    import dataclasses

    from epcli.report.datamodel import Cell
    text = (DOCS / "report.md").read_text()
    listed = re.search(r"rows with every cell \(every `Cell` field: (.*?)\), (?:rows'|comparisons)", text)
    names = {re.sub(r"\s*\(.*", "", n).strip() for n in re.sub(r"\([^()]*\)", "", listed.group(1)).split(",")}
    assert names == {f.name for f in dataclasses.fields(Cell)}


# Every ```python block of README.md and docs/*.md, keyed by its file and first line (a moved, changed or new block
# fails test_every_python_example_is_accounted_for): how a test runs it, or why nothing runs it.
PYTHON_EXAMPLES = {
    ("store.md", "from epcli.store import Store"): "run: test_store_and_report_python_examples_run_as_written",
    ("report.md", "import rich"): "run: test_store_and_report_python_examples_run_as_written",
    ("models.md", "from epcli.models import create_model, build_from_spec, list_models"):
        "run: test_models_python_examples_run",
    ("models.md", "from epcli.train import fit, evaluate, resolve_recipe, state_to_tensors, tensors_to_state"):
        "run: test_models_python_examples_run",
    ("corruptions.md", ("from epcli.corruptions import (CORRUPTIONS, BENCHMARK_CORRUPTIONS, corrupt, corrupt_uint8, "
                        "evaluate, summarize,")): "run: test_corruptions_python_example_runs",
    ("ep.md", ("from epcli.ep import (EPCNN, EP_RECIPES, PRESETS, ACTIVATIONS, gradient_mode, parse_grad_mode, "
               "EQUILIBRIUM_TOL,")): "signatures: test_documented_signatures_match_the_code",
    ("attacks.md", ("evaluate(model, x, y, *, attack, norm, eps_list, batch_size=256, device=\"cpu\", seed=0, "
                    "params=None,")): "signature: test_documented_signatures_match_the_code",
}


def _all_python_blocks() -> dict[tuple[str, str], str]:
    out = {}
    for doc in [DOCS.parent / "README.md"] + sorted(DOCS.glob("*.md")):
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            out[(doc.name, block.splitlines()[0].rstrip())] = block
    return out


def test_every_python_example_is_accounted_for():
    """No Python example in the docs is left unchecked: each is run by a test below (or above), or is a list of
    signatures that test_documented_signatures_match_the_code compares with the code."""
    assert set(_all_python_blocks()) == set(PYTHON_EXAMPLES), set(_all_python_blocks()) ^ set(PYTHON_EXAMPLES)


def _run_example(doc: str, first_line: str, namespace: dict) -> dict:
    """Execute the doc's block as written, except `device="cuda"` -> "cpu" (the tests run on the CPU; the inputs
    they check against stay there)."""
    block = _all_python_blocks()[(doc, first_line)].replace('device="cuda"', 'device="cpu"')
    exec(compile(block, f"docs/{doc}", "exec"), namespace)
    return namespace


def _small_dataset(n_train: int, n_test: int):
    """The embedded CIFAR-10 cut to seeded random subsets (all classes, unlike its first images: one class)."""
    import dataclasses

    from epcli.data import load_dataset, subset
    ds = load_dataset()
    train_x, train_y, _ = subset(ds.train_x, ds.train_y, n_train, seed=0)
    test_x, test_y, _ = subset(ds.test_x, ds.test_y, n_test, seed=1)
    return dataclasses.replace(ds, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def test_models_python_examples_run():
    """docs/models.md: the registry example runs as written (the rebuilt architecture takes the weights and gives the
    same logits); the training-loop example runs on a cnn-small and 64 images, and its numbers mean what it says:
    one history entry per epoch of the recipe, and `acc` the fraction of test images the model gets right."""
    import torch

    from epcli.models import create_model
    ns = _run_example("models.md", "from epcli.models import create_model, build_from_spec, list_models", {})
    assert ns["model"].spec["name"] == "timm:convnext_atto"
    ns["again"].load_state_dict(ns["model"].state_dict())  # strict: the same architecture
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ns["model"].eval()(x), ns["again"].eval()(x))
    assert ns["list_models"]() == sorted(ns["list_models"]()) and "ep-cnn" in ns["list_models"]()
    assert set(ns["list_models"]("ep-*")) == {m for m in ns["list_models"]() if m.startswith("ep-")}

    torch.manual_seed(0)
    dataset = _small_dataset(64, 40)
    ns = _run_example("models.md", "from epcli.train import fit, evaluate, resolve_recipe, state_to_tensors, "
                      "tensors_to_state", {"model": create_model("cnn-small"), "dataset": dataset})
    assert [h["epoch"] for h in ns["history"]] == [1, 2, 3, 4, 5]  # {"epochs": 5}
    model = ns["model"].eval()
    with torch.no_grad():
        right = (model(dataset.test_x.float() / 255).argmax(1) == dataset.test_y).sum().item()
    assert ns["acc"] == right / 40
    assert ns["history"][-1]["test_acc"] == ns["acc"]  # the last epoch's test accuracy is the same measure


def test_corruptions_python_example_runs(tmp_path, monkeypatch):
    """docs/corruptions.md's public-API example runs as written on 4 embedded test images, a cnn-small, and a
    CIFAR-10-C folder written by `export` (the published files are not here), and each line gives what its comment
    says: y == y8 / 255, the result's keys, the severity rows of load_official, the files export writes."""
    import numpy as np
    import torch

    from epcli.corruptions import CORRUPTIONS, corrupt_range_uint8, evaluate, export
    from epcli.data import load_dataset
    from epcli.models import create_model
    ds = load_dataset()
    x_uint8, labels = ds.test_x[:4], ds.test_y[:4]
    torch.manual_seed(0)
    model, other = create_model("cnn-small").eval(), create_model("cnn-small").eval()
    monkeypatch.chdir(tmp_path)
    export("CIFAR-10-C", x_uint8, labels, names=["fog"], seed=1)  # the published folder's layout
    ns = _run_example("corruptions.md", next(k for d, k in PYTHON_EXAMPLES if d == "corruptions.md"), {
        "torch": torch, "x_uint8": x_uint8, "labels": labels, "x": x_uint8.float() / 255, "model": model,
        "res_resnet": evaluate(other, x_uint8, labels, seed=0), "x_test": x_uint8, "y_test": labels})
    assert ns["y8"].dtype == torch.uint8 and ns["y8"].shape == x_uint8.shape
    assert torch.equal(ns["y"], ns["y8"].float() / 255)
    res = ns["res"]  # the last one: evaluate_official's on the folder (fog only), "same result shape"
    assert set(res) == {"clean_correct", "correct", "seconds"} and set(res["correct"]) == {
        ("fog", s) for s in range(1, 6)}
    assert all(v.dtype == torch.bool and v.shape == (4,) for v in res["correct"].values())
    x5, y5 = ns["x5"], ns["y5"]
    assert x5.shape == (20, 3, 32, 32) and torch.equal(y5, labels.repeat(5))
    for s in (1, 5):  # severity s = rows (s-1)N..sN
        assert torch.equal(x5[(s - 1) * 4:s * 4], corrupt_range_uint8(x_uint8, "fog", s, 1, 0, 4))
    assert sorted(p.name for p in (tmp_path / "my-cifar10-c").iterdir()) == sorted(
        [f"{c}.npy" for c in CORRUPTIONS] + ["labels.npy", "clean.npy"])
    assert ((tmp_path / "my-cifar10-c" / "fog.npy").stat().st_mode & 0o777) == 0o644
    assert np.load(tmp_path / "my-cifar10-c" / "fog.npy").shape == (20, 32, 32, 3)
    clean_x, clean_y = ns["clean"]
    assert torch.equal(clean_x, x_uint8) and torch.equal(clean_y, labels)
    table = ns["table"]  # the last summarize: the generated sweep against res_resnet, accuracies in %
    clean = evaluate(model, x_uint8, labels, names=["fog"], severities=(1,), seed=0)["clean_correct"]
    assert table["clean_accuracy"] == 100 * clean.float().mean().item() and len(table["cells"]) == 19
    assert table["reference_label"] == "resnet18" and table["mce_vs_reference"] is not None
    assert ns["grid"].dtype == torch.uint8 and ns["grid"].shape[0] == 3


def test_store_and_report_python_examples_on_a_demo_store(tmp_path, monkeypatch, capsys):
    """What docs/store.md and docs/report.md say around their Python examples: on a store without the paper's models
    (the `make demo` store) the examples as written raise NotFoundError, and with the demo's names the text gives
    they run (store.md's prints the demo EP-CNN's robust accuracy)."""
    import pytest
    from test_report import _attack, _train

    from epcli.errors import NotFoundError
    from epcli.store import Store
    store = Store(tmp_path / "store")
    for model in ("ep-cnn-small", "cnn-small"):  # what `epcli demo` trains, on the embedded data
        rid, ck = _train(store, model, {"label": model}, [0.45])
        _attack(store, rid, ck, model, "pgd", "linf", {8 / 255: 0.055 if model == "ep-cnn-small" else 0.015})
    store.close()
    monkeypatch.chdir(tmp_path)
    store_block, report_block = _python_blocks("store.md")[0], _python_blocks("report.md")[0]
    for doc, block in (("store.md", store_block), ("report.md", report_block)):
        with pytest.raises(NotFoundError):
            exec(compile(block, doc, "exec"), {})
    text = (DOCS / "store.md").read_text()
    demo_call = re.search(r"`make demo` store.*?`s\.(latest_train_run\([^`]*\))`", text, re.S).group(1)
    exec(compile(re.sub(r"latest_train_run\([^)]*\)", demo_call, store_block), "store.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["pgd", "linf", str(8 / 255), "0.055"]
    demo_models = re.search(r"on the `make demo` store: `(models=\[[^\]]*\])`", (DOCS / "report.md").read_text()).group(1)
    collect_line = next(line for line in report_block.splitlines() if "report.collect(" in line)
    ns = {}
    exec(compile("from epcli.store import Store\nfrom epcli import report\nstore = Store('store')\n"
                 + re.sub(r"models=\[[^\]]*\]", demo_models, collect_line), "report.md", "exec"), ns)
    assert sorted(r.model for r in ns["data"].rows) == ["cnn-small", "ep-cnn-small"]


def test_readme_and_cli_store_commands_run_as_written(tmp_path):
    """Every `epcli` command of README.md and docs/cli.md that reads or labels the store (runs, show, trace, compare,
    tag, note, rm, gc, models, recipes; the report commands have their own test) runs with exit 0 on a store with
    results, placeholders filled with real runs of the kind the text names (RUN: a training run; README's RUN_A /
    RUN_B: two attack runs on the same points; TRAIN_A / TRAIN_B: two training runs), and does what its comment says."""
    import json
    import shlex

    from typer.testing import CliRunner

    from epcli.pipelines.common import eps_label
    store = _built_store(tmp_path / "store")
    for run in store.find_runs(kind="attack"):  # the attack pipeline's summary: robust accuracy per eps label
        rows = store.metrics(run["id"], name="robust_acc")
        store.db["runs"].update(run["id"], {"summary": json.dumps(
            {**(run.get("summary") or {}), "robust_acc": {eps_label(m["eps"]): m["value"] for m in rows}})})
    attacks = [r["id"] for r in store.db.query(
        "select r.id from runs r join run_artifacts ra on ra.run_id = r.id join artifacts a on a.sha256 = ra.sha256 "
        "where r.kind = 'attack' and a.kind = 'per-example' and r.config like '%\"norm\":\"linf\"%' order by r.id")]
    trains = [r["id"] for r in store.find_runs(kind="train", status="finished")]
    n_runs = store.db["runs"].count
    store.close()
    assert len(attacks) >= 2 and len(trains) >= 2
    fill = {"RUN": trains[0], "RUN_A": attacks[0], "RUN_B": attacks[1], "TRAIN_A": trains[0], "TRAIN_B": trains[1]}
    reading = {"runs", "show", "trace", "compare", "tag", "note", "rm", "gc", "models", "recipes"}
    seen, runner = [], CliRunner()
    for doc in (DOCS.parent / "README.md", DOCS / "cli.md"):
        for args in _documented_commands(doc.read_text()):
            if not args or args[0] not in reading or any(a in ("...", "T") or a[:1] in "<[" for a in args):
                continue  # usage lines ([OPTIONS], <run-id>) and `epcli runs --tag T` in a help sentence
            if doc.name == "cli.md" and {"RUN_A", "RUN_B"} & set(args):
                continue
            argv = [fill.get(a, a) for a in args]
            r = runner.invoke(app, ["--store", str(tmp_path / "store")] + argv, env={"COLUMNS": "200"})
            assert r.exit_code == 0, f"{doc.name}: `epcli {shlex.join(args)}` failed: {r.output[-500:]}"
            seen.append((args[0], r.output))
    kinds = [k for k, _ in seen]
    assert len(kinds) >= 15, kinds  # README's 12 and cli.md's help examples (19 on 2026-11-30)
    assert {"runs", "show", "trace", "compare", "tag", "note", "rm", "gc", "models", "recipes"} <= set(kinds), kinds
    compare_out = [out for k, out in seen if k == "compare"]
    assert any("McNemar" in out for out in compare_out)  # README: "paired: ... McNemar per eps"
    assert any("config" in out for out in compare_out)  # README: "two training runs: config diff, final metrics"
    from epcli.store import Store
    store = Store(tmp_path / "store")
    assert store.db["runs"].count == n_runs  # `rm --dry-run` removed nothing
    assert "baseline" in store.get_run(trains[0])["tags"] and store.get_run(trains[0])["note"]  # tag, note
    store.close()
