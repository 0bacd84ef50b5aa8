"""scripts/reproduce_paper.sh cannot rot: run with a launcher that records each epcli command line instead of
running it, every recorded command must parse against the real CLI (commands, options, value types) and every
eps list must be valid for its norm."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from epcli.cli import app
from epcli.pipelines.common import check_eps, parse_eps

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "--json" in sys.argv:
    print(json.dumps({{"run_id": "RUN%d" % sum(1 for _ in open({log!r}))}}))
"""


def _recorded(tmp_path, **env) -> list[list[str]]:
    log = tmp_path / "commands.jsonl"
    rec = tmp_path / "recorder.py"
    rec.write_text(RECORDER.format(log=str(log)))
    launcher = f"{sys.executable} {rec}"
    subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_paper.sh")], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "EPCLI": launcher, "STORE": str(tmp_path / "store"), **env})
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    return _recorded(tmp_path_factory.mktemp("reproduce"), SEEDS="11 13")


def test_the_study_is_all_there(commands):
    subs = [c[c.index("--store") + 2] for c in commands]
    trains = [c for c, s in zip(commands, subs) if s == "train"]
    # per seed: EP-CNN, CNN, 4 adversarially trained CNNs, the EP-CNN's distilled student; one ViT
    assert len(trains) == 2 * 7 + 1
    students = [c for c in trains if "--teacher" in c]
    eps_cnns = [c for c in trains if "--model" in c and c[c.index("--model") + 1] == "ep-cnn"]
    assert len(students) == len(eps_cnns) == 2
    attacks = [c for c, s in zip(commands, subs) if s == "attack"]
    assert len(attacks) == 15 * 10 + 1 + 2 * 5  # per model: paper protocol 2 PGD, 2 Square, AutoAttack; 2 PGD,
    # 2 Square, AutoAttack (fra31); + the sweep; + the paper's 20,000-iteration Square L2 on its 5 CNNs per seed
    long_square = [c for c in attacks if "20000" in c]
    assert len(long_square) == 10 and all("--protocol" in c and "l2" in c for c in long_square)
    assert subs.count("corrupt") == 15 and subs.count("report") == 2
    # each attack and corruption names a model the script trained (a run id the recorder handed out)
    handed = {f"RUN{i}" for i in range(1, len(commands) + 1)}
    # each student learns from an EP-CNN the script trained (the run id handed out for it)
    ep_ids = {f"RUN{commands.index(c) + 1}" for c in eps_cnns}
    assert {c[c.index("--teacher") + 1] for c in students} == ep_ids
    for c in attacks + [c for c, s in zip(commands, subs) if s == "corrupt"]:
        assert c[c.index("-m") + 1] in handed


def test_every_command_parses_against_the_cli(commands, monkeypatch):
    """Click parses each command for real (unknown options, missing values and bad types fail); the command
    bodies are replaced by a recorder so nothing runs. Eps lists go through the CLI's own eps checks."""
    group = typer.main.get_command(app)
    seen = []
    for name, cmd in group.commands.items():
        monkeypatch.setattr(cmd, "callback", lambda _n=name, **kw: seen.append((_n, kw)))
    for c in commands:
        group.main(args=c, prog_name="epcli", standalone_mode=False)  # a usage error raises here
        name, kw = seen[-1]
        assert name == c[c.index("--store") + 2]
        if name == "attack":
            check_eps(kw["norm"], parse_eps(kw["eps"]))
    assert len(seen) == len(commands)


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    from typer.testing import CliRunner
    store = tmp_path_factory.mktemp("agreement") / "store"
    r = CliRunner().invoke(app, ["--store", str(store), "train", "--model", "cnn-small", "--epochs", "1", "-q"])
    assert r.exit_code == 0, r.output
    return store


@pytest.mark.parametrize("script, args", [
    ("autoattack_agreement.py", ["--eps", "8/255"]),  # needs pyautoattack
    ("art_agreement.py", ["--eps", "8/255"]),  # needs adversarial-robustness-toolbox
    ("art_agreement.py", ["--eps", "8/255", "--attack", "square", "--max-iter", "40"]),
    ("art_agreement.py", ["--eps", "2/255", "--attack", "autoattack", "--max-iter", "20", "--apgd-iter", "5"]),
])
def test_agreement_scripts_run_and_agree_on_a_small_cnn(trained_store, script, args):
    pytest.importorskip("pyautoattack" if script.startswith("autoattack") else "art")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--store", str(trained_store), "--model",
                          "cnn-small", "--n", "16", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
    assert line["n"] == 16 and line["same_prediction"] == 16, line
    if "--attack" in args:  # ART's own algorithms, ported: bit for bit
        assert line["max_abs_pixel_diff"] == 0.0 and line["robust_epcli"] == line["robust_art"], line
