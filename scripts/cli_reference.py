"""Regenerate docs/cli.md from the CLI's own --help (run: python scripts/cli_reference.py > docs/cli.md)."""
import os

os.environ["COLUMNS"] = "110"
os.environ["NO_COLOR"] = "1"
os.environ["TERM"] = "dumb"

from typer.testing import CliRunner  # noqa: E402

from epcli import schema  # noqa: E402
from epcli.cli import app  # noqa: E402

JSON_INTRO = """## JSON output

Every `--json` document is an object whose `command` names its shape below; the JSON Schema (draft 2020-12)
of each is `epcli.schema.SCHEMAS`, and the tests validate every command's output against it.
Conventions: a run is always `run_id` (16 characters); accuracies are **fractions** in [0, 1] (percent only in
the human tables), rounded to what their example count resolves (4 decimals up to 10,000 examples); every
eps comes as `eps` (a number) and `eps_label` (`8/255` for multiples of 1/255, else the number); attack
results carry the resolved attack `params` and forward-pass counts (`forward_passes`: every image through
the model; `attack_forward_passes`: those made by the attack itself). `null` means not measured.
A run's `result` (`runs`, `show`) is what matters for its kind: for an attack `attack`, `norm`, `clean_acc`,
`labels`, `results[]` and `unreliable`, and for an ensemble (`autoattack`, `art-autoattack`) attacked with true
labels `members[]`, the robust accuracy after each member in turn, as `attack` gave it. With predicted labels
(the paper's protocol) an image the model got wrong counts as robust when the attack moves it onto its true
label; `results[].from_clean_errors` (also in `attack`'s `results[]`; null with true labels) is that part of
`robust_acc`.
"""

INTRO = """# CLI reference

`epcli` is a thin layer over `epcli.api`.

**Where output goes.** With `--json`, stdout holds exactly one JSON document (schema below) and nothing else,
so commands compose in pipelines. Without it, the commands that show the store (`runs`, `show`, `trace`,
`compare`, `report`, `models`, `recipes`) print their tables on stdout; the pipeline commands (`train`,
`attack`, `corrupt`, `demo`) print progress, notes and their result table on stderr and nothing on stdout.
Errors are one line `error: ...` on stderr. A reader that closes the pipe early (`epcli runs --json | head -1`)
ends the command quietly with exit 1, as Click's own commands do; what the command stored is kept.

```bash
RUN=$(epcli train --model cnn-small --epochs 1 --json | jq -r .run_id)
epcli attack --model "$RUN" --eps 2/255,8/255 --n 500 --json | jq -c '.results[] | [.eps_label, .robust_acc]'
```

**Progress.** Every stage (loading, each attack and eps, each check, saving; each training epoch and the whole
training) is a named task. On a terminal it shows a bar with count, elapsed time and ETA, refreshed a few
times a second, also inside a long attack batch (counted by the attack's forward passes). When stderr is a
file or a pipe there are no bars: one plain line per finished stage or epoch, with its metrics, never cut
(an attack's `fwd`: the images its own forward passes took, the count its result gives as `attack_forward_passes`):

```
load  1/1  0.0s  model=cnn-small  dataset=cifar10-mini  images=300
pgd 2/255  300/300  1.7s  robust_acc=0.23  fwd=2640
pgd 8/255  300/300  1.1s  robust_acc=0.01  fwd=2640
check strength 2/255  80/80  2.6s  base=0.23  strong=0.23  passed=yes
checks  1/1  2.6s  passed=2  failed=0
save  1/1  0.0s  run_id=01m8p6bjrk9dddk3
```

A stage's time is its own work's: an attack opens every eps at once but runs them in turn.

A stage still running also writes a line every `EPCLI_PROGRESS_EVERY` seconds (default 60; 0: never), with
its ETA, so that the log of a long job (nohup, a batch scheduler) says where it is. The line comes with the
stage's first update after that time: updates come after every training batch and every attack forward pass,
so one slow step delays it (the first batch of `--model ep-cnn --recipe fast-ep` on 2 shared CPU cores: 1 min 50 s):
`autoattack 8/255  50/200  1:01  eta 3:03  robust_acc=0.5` (the ETA from the images done since the stage
began or resumed: the saved chunks a resumed attack loads do not count). "eta ≤" (also on the bars) marks an upper bound: an
attack that stops on the images it broke (all but FGSM and PGD without restarts) is counted at its full budget. An epoch's count is its batches plus one step for the
test evaluation. `-q`/`--quiet` (before or after the
command) silences progress and notes.

Global options (`--store`, `--debug`, `--quiet`) go before the command. Environment variables:
`EPCLI_STORE`, `EPCLI_DEVICE`, `EPCLI_SEED`, `EPCLI_DATA_DIR`, `EPCLI_DEBUG`; `EPCLI_DIST_TIMEOUT_S` (torchrun,
docs/distributed.md), `EPCLI_REPORT_FORK` (docs/report.md) and `EPCLI_PROGRESS_EVERY` (above).

## Exit codes

| code | meaning |
|---|---|
| 0 | success |
| 1 | runtime error (including unexpected internal errors, printed on one line; `--debug` for the traceback); also, with no message, the reader of stdout closed the pipe before the output was written |
| 2 | usage error: bad option value (eps out of range, unknown attack, norm, corruption, severity, device; a count, size or step that is NaN, infinite or below its minimum; a malformed `--set` / `--model-set` / `--adv-train` / `--unroll-sweep`; `report --out` naming a file, a folder that cannot be created, or one holding a folder where the report writes a file (`report.md/`); `report --out` or `corrupt --export` inside the store's own `artifacts/`, `tmp/`, `cache/` or `partial/`; a `runs --where` / `--since` that cannot be read (an operator typo, NaN, a date outside the calendar); a tag with whitespace or a control character, a `--label` with a control character or line break; a recipe value of the wrong type or range, or one the model cannot use; a dataset whose images or class names the model cannot take; options that contradict each other or that the command would ignore (`--resume` with `--lr`, `--resume` of a run that finished all its epochs without `--epochs` beyond them, `--export` with `--severity`, `report --out` with the table format and no `--figures`); an empty value; an unknown option or command, a missing argument or a value of the wrong type). Every usage error is raised before a run is opened: no run is recorded for it |
| 3 | not found: model name, run, dataset (missing or malformed, including a CIFAR batch that is not plain data), checkpoint file, a stored per-example outcomes file that is lost or damaged (`compare`) |
| 4 | bad checkpoint: not an epcli checkpoint, damaged, malformed metadata, a spec that asks for far more than the file holds, or spec/shapes that do not match |
| 5 | store error: corrupted or foreign database (left untouched), a store whose artifacts/, tmp/ or cache/ is a file or whose .lock cannot be opened, no store at `--store` for a command that only reads, a write to a read-only store, unwritable folder, disk full |
| 6 | training diverged (NaN or exploding states); the last good checkpoint is kept |
| 7 | `attack --strict`: a reliability check failed and the result is flagged unreliable |
| 130 | interrupted (Ctrl-C); the run is marked interrupted and everything stored so far is kept |
| 143 | terminated by SIGTERM (a batch scheduler's time limit or preemption, `kill`): as Ctrl-C, the run is marked interrupted ("terminated by SIGTERM") and everything stored so far is kept |

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
    out += [JSON_INTRO, schema.markdown()]
    print("\n".join(out))


if __name__ == "__main__":
    main()
