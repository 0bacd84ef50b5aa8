"""Docs cannot drift: every command, option and registry entry appears in docs/."""
from pathlib import Path

import click
import typer

from epcli.cli import app

DOCS = Path(__file__).parent.parent / "docs"


def test_cli_reference_covers_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert f"## epcli {name}" in text, f"docs/cli.md misses `epcli {name}`: run scripts/cli_reference.py"
        assert cmd.help, f"`epcli {name}` has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.opts[0] in text, f"docs/cli.md misses {name} {p.opts[0]}: run scripts/cli_reference.py"


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


def _documented_commands(text: str) -> list[list[str]]:
    """`epcli ...` invocations in fenced code blocks and in `backticks`, as argument lists after `epcli`
    (a shell line is split at ; && | and parentheses, quotes respected, comments dropped)."""
    import re
    import shlex
    chunks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S) + re.findall(r"`(epcli [^`\n]+)`", text)
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
                        out.append(part[part.index("epcli") + 1:])
                    part = []
                else:
                    part.append(tok)
    return out


def test_every_documented_command_parses():
    """Every epcli command line shown in README.md and docs/cli.md is accepted by the CLI's parser (options,
    types, arguments); placeholders like RUN stand for a run id, `...` for omitted options."""
    group = typer.main.get_command(app)
    texts = {"README.md": (DOCS.parent / "README.md").read_text(), "docs/cli.md": (DOCS / "cli.md").read_text()}
    seen = 0
    for where, text in texts.items():
        for args in _documented_commands(text):
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
    assert seen >= 25  # the README's and the help texts' examples
