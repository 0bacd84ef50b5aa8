"""Regenerate docs/cli.md from the CLI's own --help (run: python scripts/cli_reference.py > docs/cli.md)."""
import os

os.environ["COLUMNS"] = "110"
os.environ["NO_COLOR"] = "1"
os.environ["TERM"] = "dumb"

from typer.testing import CliRunner  # noqa: E402

from epcli.cli import app  # noqa: E402

INTRO = """# CLI reference

`epcli` is a thin layer over `epcli.api`. Human output (tables, progress bars, notes) goes to **stderr**;
`--json` prints one JSON document on **stdout**, so commands compose in pipelines:

```bash
RUN=$(epcli train --model cnn-small --epochs 1 --json | jq -r .run_id)
epcli attack --model "$RUN" --eps 2/255,8/255 --n 500 --json | jq .robust_acc
```

Global options (`--store`, `--debug`, `--quiet`) go before the command. Environment variables:
`EPCLI_STORE`, `EPCLI_DEVICE`, `EPCLI_SEED`, `EPCLI_DATA_DIR`, `EPCLI_DEBUG`.

## Exit codes

| code | meaning |
|---|---|
| 0 | success |
| 1 | runtime error (including unexpected internal errors, printed on one line; `--debug` for the traceback) |
| 2 | usage error: bad option value (eps out of range, unknown attack, norm, corruption, severity, device; a count, size or step that is NaN, infinite or below its minimum; a malformed `--set` / `--model-set` / `--adv-train` / `--unroll-sweep`; `report --out` naming a file) |
| 3 | not found: model name, run, dataset (missing or malformed, including a CIFAR batch that is not plain data), checkpoint file |
| 4 | bad checkpoint: not an epcli checkpoint, damaged, malformed metadata, a spec that asks for far more than the file holds, or spec/shapes that do not match |
| 5 | store error: corrupted or foreign database (left untouched), no store at `--store` for a command that only reads, a write to a read-only store, unwritable folder, disk full |
| 6 | training diverged (NaN or exploding states); the last good checkpoint is kept |
| 7 | `attack --strict`: a reliability check failed and the result is flagged unreliable |
| 130 | interrupted (Ctrl-C); the run is marked interrupted and everything stored so far is kept |

"""

runner = CliRunner()


def help_of(args):
    text = runner.invoke(app, args + ["--help"], terminal_width=110).stdout
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def main():
    out = [INTRO, "## epcli", "", "```", help_of([]), "```", ""]
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        out += [f"## epcli {name}", "", "```", help_of([name]), "```", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
