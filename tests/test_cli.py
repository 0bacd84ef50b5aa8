"""The CLI end to end on real images: train -> attack -> corrupt -> report, and every bad input."""
import json
import shutil
import subprocess
import signal
import sys
from pathlib import Path

import pytest
from conftest import write_imagefolder
from typer.testing import CliRunner

from epcli.cli import app
from epcli.store import Store

runner = CliRunner()


def invoke(*args, store=None):
    argv = (["--store", str(store)] if store else []) + [str(a) for a in args]
    return runner.invoke(app, argv, catch_exceptions=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mini):
    """A few hundred real CIFAR-10 images as an ImageFolder tree (PNG, lossless copies of the embedded JPEGs)."""
    return write_imagefolder(tmp_path_factory.mktemp("data") / "cifar-small", mini, 40, 20)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, small_data):
    store = tmp_path_factory.mktemp("store")
    r = invoke("train", "--model", "cnn-small", "--dataset", small_data, "--epochs", 2, "--json", "--device",
               "cpu", store=store)
    assert r.exit_code == 0, r.output
    train = json.loads(r.stdout)
    return store, small_data, train


def test_help_lists_every_command():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "attack", "corrupt", "report", "demo", "runs", "show", "trace", "models", "recipes"):
        assert cmd in r.stdout
        assert invoke(cmd, "--help").exit_code == 0


def test_train_records_run_and_checkpoint(pipeline):
    store, _, train = pipeline
    s = Store(store)
    run = s.get_run(train["run_id"])
    assert run["status"] == "finished" and run["kind"] == "train" and run["model"] == "cnn-small"
    assert len(s.metrics(run["id"], name="test_acc")) == 2  # one per epoch
    ck = s.artifacts_of(run["id"], role="output", kind="checkpoint")
    assert [a["name"] for a in ck] == ["final"]  # one checkpoint kept per run, the newest
    from epcli import checkpoint
    meta = checkpoint.read_metadata(s.artifact_path(ck[0]["sha256"]))
    assert meta["run_id"] == run["id"] and meta["spec"]["name"] == "cnn-small"
    assert meta["config_sha256"] == run["config_sha256"]


def test_attack_corrupt_report_and_lineage(pipeline):
    store, _, train = pipeline
    r = invoke("attack", "--model", "cnn-small", "--eps", "2/255,8/255", "--n", 60, "--steps", 5, "--json",
               store=store)
    assert r.exit_code == 0, r.output
    att = json.loads(r.stdout)
    robust = {r["eps_label"]: r["robust_acc"] for r in att["results"]}
    assert att["model_run_id"] == train["run_id"] and set(robust) == {"2/255", "8/255"}
    assert robust["8/255"] <= robust["2/255"] <= att["clean_acc"]
    from epcli.report import wilson95  # the table on stderr gives each accuracy's interval over the 60 images
    lo, hi = wilson95(100 * robust["8/255"], 60)
    assert f"{lo:.2f}–{hi:.2f}" in r.stderr and "95% CI: Wilson interval over the 60 images" in r.stderr
    r = invoke("corrupt", "--model", train["run_id"], "-c", "gaussian_noise,contrast", "-s", "1,2", "-s", "3,4,5",
               "--n", 60, "--json", store=store)  # comma lists and repeats mix
    assert r.exit_code == 0, r.output
    cor = json.loads(r.stdout)
    assert {(c["corruption"], c["severity"]) for c in cor["cells"]} == \
        {(c, s) for c in ("gaussian_noise", "contrast") for s in range(1, 6)}
    # the mean says what it was taken over; there is no all-19 mean from 2 corruptions
    assert cor["corruption_mean_over"] == "mean of 2/15 benchmark corruptions × 5 severities"
    assert cor["corruption_mean_acc"] == pytest.approx(sum(c["acc"] for c in cor["cells"]) / 10, abs=1e-3)
    assert cor["corruption_mean_acc_all"] is None and "mean of all 19 x 5: n/a" in r.stderr
    s = Store(store)
    # lineage: the attack read exactly the training run's checkpoint
    ck = s.artifacts_of(train["run_id"], role="output", kind="checkpoint")[0]["sha256"]
    assert [a["sha256"] for a in s.artifacts_of(att["run_id"], role="input")] == [ck]
    derived = {d["id"] for d in s.derived_runs(train["run_id"])}
    assert {att["run_id"], cor["run_id"]} <= derived
    # the stored numbers are the printed ones
    rows = s.metrics(att["run_id"], name="robust_acc")
    assert sorted(round(r["value"], 4) for r in rows) == sorted(robust.values())
    r = invoke("report", "--format", "csv", store=store)
    assert r.exit_code == 0, r.output
    assert "cnn-small" in r.stdout
    out = store / "html-report"
    r = invoke("report", "--format", "html", "--out", out, store=store)
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    for fig in ("robust-pgd-linf", "corruption-samples", "adversarial-examples"):
        assert (out / f"{fig}.png").exists() and fig in page
    assert 'src="http' not in page and "src=\"file" not in page  # self-contained
    assert any(a["kind"] == "report" for a in Store(store).artifacts_of(Store(store).runs(kind="report")[0]["id"]))
    r = invoke("trace", train["run_id"], store=store)
    assert r.exit_code == 0 and att["run_id"] in r.stdout
    assert invoke("show", att["run_id"], store=store).exit_code == 0
    r = invoke("runs", "--json", store=store)
    assert {x["run_id"] for x in json.loads(r.stdout)["runs"]} >= {train["run_id"], att["run_id"], cor["run_id"]}


def _count_runs(store):
    return Store(store).db["runs"].count


@pytest.mark.parametrize("args,code,needle", [
    (["train", "--model", "resnet-9000"], 3, "resnet-9000"),
    (["train", "--model", "cnn-small", "--dataset", "/nonexistent/data"], 3, "not found"),
    (["attack", "--model", "cnn-small", "--eps", "2"], 2, "outside [0, 1]"),
    (["attack", "--model", "cnn-small", "--norm", "l7"], 2, "norm"),
    (["attack", "--model", "cnn-small", "--attack", "deepfool9"], 2, "unknown attack"),
    (["attack", "--model", "vit"], 3, "no finished training run"),
    (["corrupt", "--model", "cnn-small", "-c", "lightning"], 2, "unknown corruption"),
    (["corrupt", "--model", "cnn-small", "-s", "6"], 2, "severity"),
    (["show", "zzzz"], 3, "no run"),
])
def test_bad_input_one_line_and_store_intact(pipeline, args, code, needle):
    store, data, train = pipeline
    before = _count_runs(store)
    if "--dataset" not in args and args[0] in ("train",):
        args = args + ["--dataset", str(data)]
    r = invoke(*args, store=store)
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output
    s = Store(store)
    assert s.get_run(train["run_id"])["status"] == "finished"
    assert s.db["runs"].count - before <= 1  # at most a failed run was recorded
    assert all(r["status"] != "running" for r in s.runs())


def test_wrong_checkpoint_shape(pipeline, tmp_path):
    store, data, train = pipeline
    s = Store(store)
    src = s.artifact_path(s.artifacts_of(train["run_id"], kind="checkpoint")[0]["sha256"])
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    k = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)
    tensors[k] = tensors[k][:1].contiguous()  # a layer of the wrong shape
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = invoke("attack", "--model", bad, "--n", 10, store=store)
    assert r.exit_code == 4 and "shape" in r.stderr and r.stderr.count("\n") == 1
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": tensors[k]}, str(foreign))
    r = invoke("attack", "--model", foreign, "--n", 10, store=store)
    assert r.exit_code == 4 and "not an epcli checkpoint" in r.stderr


def test_corrupted_and_unwritable_store(tmp_path):
    bad = tmp_path / "s"
    bad.mkdir()
    (bad / "epcli.db").write_bytes(b"\x00garbage" * 64)
    r = invoke("runs", store=bad)
    assert r.exit_code == 5 and "not a readable SQLite database" in r.stderr
    assert (bad / "epcli.db").read_bytes() == b"\x00garbage" * 64
    f = tmp_path / "afile"
    f.write_text("x")
    r = invoke("runs", store=f / "sub")
    assert r.exit_code == 5 and r.stderr.startswith("error:")


def test_interrupted_training_is_marked_and_keeps_the_store(pipeline, monkeypatch):
    store, data, train = pipeline
    import epcli.train as T

    def interrupted_fit(model, dataset, recipe, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(T, "fit", interrupted_fit)
    r = invoke("train", "--model", "cnn-small", "--dataset", data, "--epochs", 1, store=store)
    assert r.exit_code == 130
    s = Store(store)
    assert s.runs(kind="train", limit=1)[0]["status"] == "interrupted"
    assert s.get_run(train["run_id"])["status"] == "finished"


def test_sigterm_closes_the_run_as_interrupted(tmp_path, small_data):
    """A batch scheduler's SIGTERM (time limit, preemption) closes the run at once as interrupted, says so, and
    exits 143; without the handler the run stayed 'running' until another epcli process found the pid gone."""
    import time
    store = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "epcli", "--store", str(store), "train", "--model", "cnn-small",
                          "--dataset", str(small_data), "--epochs", "500", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first epoch's line: the run is open and training
            line = p.stderr.readline()
            if line.startswith("epoch 1/500") or not line:
                break
        p.send_signal(signal.SIGTERM)
        _, stderr = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    (run,) = Store(store).runs(kind="train")
    assert run["status"] == "interrupted" and run["error"] == "terminated by SIGTERM"


def test_terminal_control_characters_in_user_text_are_shown_inert(tmp_path):
    # a note (or a model name) in a shared store holding escape sequences was written raw to the terminal by runs,
    # show and trace: it could clear the screen, retitle the window or fake other output
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn\x1b[2J", dataset="d\x9b31m") as rid:
        pass
    s.note_run(rid, "evil\x1b]0;TITLE\x07 and\x1b[1A\rfake")
    s.close()
    for args in (["runs"], ["show", rid], ["trace", rid]):
        r = invoke(*args, store=tmp_path / "s")
        assert r.exit_code == 0, r.output
        shown = r.stdout + r.stderr
        assert not any(c in shown for c in "\x1b\x07\x9b\r"), (args, shown)
        assert "\\x1b" in shown, (args, shown)
    assert "evil\\x1b]0;TITLE\\x07 and\\x1b[1A\\x0dfake" in invoke("show", rid, store=tmp_path / "s").stdout
    # --json: JSON escapes C0 itself; DEL and the C1 controls (CSI is \x9b) were printed raw (found by the fuzz)
    s = Store(tmp_path / "s")
    s.note_run(rid, "del\x7f csi\x9b2J esc\x1b")
    s.close()
    r = invoke("show", rid, "--json", store=tmp_path / "s")
    assert not any(c in r.stdout for c in "\x7f\x9b\x1b") and "\\u009b" in r.stdout, r.stdout
    assert json.loads(r.stdout)["run"]["note"] == "del\x7f csi\x9b2J esc\x1b"


def test_compare_shows_user_text_as_written(tmp_path):
    # a dataset folder named "d[red]" was read as rich markup by compare: shown as "d" (and styled)
    s = Store(tmp_path / "s")
    ids = []
    for lr in (0.1, 0.2):
        with s.run("train", {"label": "[bold]x[/]", "lr": lr}, model="cnn", dataset="d[red]") as rid:
            s.log_metric(rid, "test_acc", lr, step=1)
        ids.append(rid)
    s.close()
    r = invoke("compare", *ids, store=tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert f"A = {ids[0]} (cnn on d[red])" in r.stdout and "0.1" in r.stdout, r.stdout


def test_debug_env_is_read_as_a_flag(tmp_path, monkeypatch):
    # EPCLI_DEBUG=0 or false turned debugging on for unexpected errors (a traceback instead of one line)
    s = Store(tmp_path / "s")
    s.close()

    def broken(self, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(Store, "find_runs", broken)
    for value, debug in (("0", False), ("false", False), ("no", False), ("", False), ("1", True), ("true", True)):
        r = runner.invoke(app, ["--store", str(tmp_path / "s"), "runs"], env={"EPCLI_DEBUG": value})
        assert r.exit_code == 1, (value, r.output)
        if debug:
            assert isinstance(r.exception, RuntimeError) and r.stderr == "", value
        else:
            assert isinstance(r.exception, SystemExit) and \
                r.stderr == "error: RuntimeError: boom (rerun with --debug for the traceback)\n", (value, r.stderr)


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    # `epcli show RUN --json | true`, `epcli runs --json | head -1` on a large store: the reader closed the pipe
    # before epcli wrote, and epcli said "error: BrokenPipeError: [Errno 32] Broken pipe (rerun with --debug ...)"
    # as if it had failed. Now it ends as Click does: no message, exit 1; what it stored is kept.
    s = Store(tmp_path / "s")
    with s.run("train", {}, model="cnn") as rid:
        pass
    s.close()
    for args in (["show", rid, "--json"], ["runs"], ["models", "--json"], ["--help"]):
        p = subprocess.Popen([sys.executable, "-m", "epcli", "--store", str(tmp_path / "s"), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()  # before epcli has imported itself, let alone written
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 1 and stderr == "", (args, stderr)
    assert Store(tmp_path / "s").get_run(rid)["status"] == "finished"


def test_installed_console_script(pipeline):
    store, _, train = pipeline
    exe = shutil.which("epcli", path=str(Path(sys.executable).parent))
    assert exe, "the epcli console script is not installed next to this python"
    out = subprocess.run([exe, "--store", str(store), "runs", "--kind", "train", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert train["run_id"] in {r["run_id"] for r in json.loads(out.stdout)["runs"]}
    out = subprocess.run([exe, "--store", str(store), "attack", "--model", "nope-model"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


# --- progress -------------------------------------------------------------------------------------------

def test_stage_progress_plain_lines_are_whole_and_one_per_stage():
    import io

    from epcli.progress import StageProgress
    buf = io.StringIO()
    long_info = {f"metric_{i}": 0.123456789 * i for i in range(12)}  # far wider than 80 columns
    with StageProgress(live=False, stream=buf) as p:
        p("load", 0, 1, {})
        p("load", 1, 1, {"images": 300})
        for k in range(4):
            p("epoch 1/2", k, 4, {"loss": 1.0 / (k + 1)})
        p("epoch 1/2", 4, 4, long_info)
        p("epoch 1/2", 4, 4, {})  # a repeated final call is not a new stage
        p("epoch 2/2", 0, 4, {})
        p("epoch 2/2", 2, 4, {"loss": 0.5})  # cut short: reported on exit, as stopped
    lines = buf.getvalue().splitlines()
    assert [ln.split("  ")[0] for ln in lines] == ["load", "epoch 1/2", "epoch 2/2"]
    assert lines[0].startswith("load  1/1  ") and lines[0].endswith("images=300")
    assert lines[1].startswith("epoch 1/2  4/4  ") and "metric_11=1.358" in lines[1] and len(lines[1]) > 120
    assert "stopped at 2/4" in lines[2] and "loss=0.5" in lines[2]
    assert "\r" not in buf.getvalue() and "\x1b" not in buf.getvalue()


def test_stage_progress_plain_says_where_a_long_stage_is(monkeypatch):
    """In a plain log (nohup, a batch scheduler) a running stage writes a line with its ETA every `every`
    seconds, then its finished line; quicker calls write nothing; every=0 writes only the finished line."""
    import io
    from types import SimpleNamespace

    from epcli import progress
    clock = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    for every, expected in ((60, 3), (0, 1)):
        buf = io.StringIO()
        with progress.StageProgress(live=False, stream=buf, every=every) as p:
            clock[0] = 0.0
            p("autoattack 8/255", 0, 200, {})
            for t, done in ((10, 10), (61, 50), (90, 60), (125, 100), (130, 120)):
                clock[0] = t
                p("autoattack 8/255", done, 200, {"robust_acc": 0.5})
            clock[0] = 200.0
            p("autoattack 8/255", 200, 200, {"robust_acc": 0.25})
        lines = buf.getvalue().splitlines()
        assert len(lines) == expected and lines[-1].startswith("autoattack 8/255  200/200  3:20")
        assert p.lines == [lines[-1]]  # the finished lines only, as before
        if every:  # at 61 s (50 of 200 done: eta 3:03) and at 125 s (the next call 60 s after that line)
            assert lines[0] == "autoattack 8/255  50/200  1:01  eta 3:03  robust_acc=0.5"
            assert lines[1].startswith("autoattack 8/255  100/200  2:05  eta 2:05")
    buf = io.StringIO()  # an attack that stops on broken images: its count, so its ETA, is an upper bound
    with progress.StageProgress(live=False, stream=buf, every=60) as p:
        clock[0] = 0.0
        p("square 8/255", 0, 100, {})
        clock[0] = 70.0
        p("square 8/255", 10, 100, {"robust_acc": 0.5, "_eta_bound": True})
    assert buf.getvalue().splitlines()[0] == "square 8/255  10/100  1:10  eta ≤ 10:30  robust_acc=0.5"
    monkeypatch.setenv("EPCLI_PROGRESS_EVERY", "nope")
    assert progress._every_from_env() == 60.0


def test_stage_progress_eta_of_a_resumed_stage_counts_only_this_process_work(monkeypatch):
    """A resumed attack starts with chunks already done (loaded in a second, or the first call's done under
    torchrun): the plain line's ETA is from the images attacked since, not from the resumed ones."""
    import io
    from types import SimpleNamespace

    from epcli import progress
    clock = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    buf = io.StringIO()
    with progress.StageProgress(live=False, stream=buf, every=60) as p:
        p("pgd 8/255", 0, 1000, {})  # one process: the stage opens at 0, then the saved chunks load
        clock[0] = 1.0
        p("pgd 8/255", 900, 1000, {"robust_acc": 0.5, "resumed": "yes"})
        p("torchrun 8/255", 900, 1000, {"robust_acc": 0.5})  # torchrun: the first call counts the saved ones
        clock[0] = 61.0
        p("pgd 8/255", 910, 1000, {"robust_acc": 0.5})  # 10 images in 60 s: 90 more take 9 minutes
        p("torchrun 8/255", 905, 1000, {"robust_acc": 0.5})  # 5 in 60 s: 95 more take 19 minutes
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("pgd 8/255  910/1000  1:01  eta 9:00")
    assert lines[1].startswith("torchrun 8/255  905/1000  1:00  eta 19:00")


def test_a_stage_opened_ahead_of_its_work_times_only_its_work(monkeypatch):
    """An attack opens every eps's stage at once (none is silent) but runs them in turn: a stage's time starts
    when its own work does (its next call at 0), so "pgd 8/255 ... 10.0s" is the time 8/255 took, not the time
    since the attack began."""
    import io
    from types import SimpleNamespace

    from epcli import progress
    clock = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    buf = io.StringIO()
    with progress.StageProgress(live=False, stream=buf, every=0) as p:
        p("pgd 2/255", 0, 100, {})
        p("pgd 8/255", 0, 100, {})
        clock[0] = 5.0
        p("pgd 2/255", 100, 100, {"robust_acc": 0.3})
        p("pgd 8/255", 0, 100, {})  # its own work begins
        clock[0] = 15.0
        p("pgd 8/255", 100, 100, {"robust_acc": 0.1})
    assert buf.getvalue().splitlines() == ["pgd 2/255  100/100  5.0s  robust_acc=0.3",
                                           "pgd 8/255  100/100  10.0s  robust_acc=0.1"]


def test_live_bar_rate_ignores_the_jump_to_resumed_work():
    """A resumed attack jumps to its saved chunks at once: the live bar's speed (hence its ETA) must come from
    the work done after the resume, not from that jump (it read as thousands of images a second)."""
    import io

    from rich.console import Console

    from epcli.progress import StageProgress
    con = Console(file=io.StringIO(), force_terminal=True, width=100)
    with StageProgress(live=True, console=con) as p:
        p("pgd 8/255", 0, 1000, {})
        clock = [p._bar.get_time()]
        p._bar.get_time = lambda: clock[0]  # the bar's own clock, stepped by hand
        for done in (450, 900):  # two saved chunks loaded at once
            clock[0] += 0.5
            p("pgd 8/255", done, 1000, {"robust_acc": 0.1, "resumed": "yes"})
        for done in (905, 910):  # then 5 images every 5 s: 1 image/s
            clock[0] += 5
            p("pgd 8/255", done, 1000, {"robust_acc": 0.1})
        task = p._bar.tasks[0]
        assert task.completed == 910 and task.speed < 5  # was 44/s: a saved chunk counted as done in 10 s


def test_stage_progress_live_shows_bars_then_lines():
    import io

    from rich.console import Console

    from epcli.progress import StageProgress
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=80)
    with StageProgress(live=True, console=con) as p:
        p("pgd 8/255", 0, 32, {})
        p("pgd 8/255", 16.5, 32, {"robust_acc": 0.25})
        p._bar.refresh()
        during = buf.getvalue()
        p("square 8/255", 3, 32, {"_eta_bound": True})
        p._bar.refresh()
        assert "eta ≤" in buf.getvalue()[len(during):]
        p("pgd 8/255", 32, 32, {"robust_acc": 0.25, "fwd": 640})
    assert "pgd 8/255" in during and "16/32" in during and "eta" in during and "eta ≤" not in during
    assert p.lines[0].startswith("pgd 8/255  32/32  ") and "square 8/255  stopped at 3/32" in p.lines[1]
    assert p.lines[0].endswith("robust_acc=0.25  fwd=640")


def test_attack_inside_a_batch_reports_progress(mini):
    from epcli.attacks import evaluate
    from epcli.models import create_model
    net = create_model("cnn-small").eval()
    steps = []
    r = evaluate(net, mini.test_x[:8], mini.test_y[:8], attack="pgd", norm="linf", eps_list=[2 / 255, 8 / 255],
                 params={"steps": 3}, batch_size=8, keep_adv=0, on_step=steps.append, labels="predicted")
    todo_eps = [s["eps"] for s in steps if s["fraction"] == 0.0]
    ends = [s for s in steps if "robust" in s]
    assert todo_eps == [2 / 255, 8 / 255] and [s["eps"] for s in ends] == [2 / 255, 8 / 255]
    assert all(s["fraction"] == 1.0 and s["hi"] == 8 for s in ends)
    assert all(0 <= s["robust"] <= 8 for s in ends)
    # the progress line's fwd= and the header's "attack forward passes" are one count (it had the scoring pass)
    assert sum(s["forward_passes"] for s in ends) == r["attack_forward_passes"] >= 2 * 8 * 3
    assert all(s["exact"] for s in steps)  # PGD without restarts makes its budget exactly: a true ETA
    squares = []
    evaluate(net, mini.test_x[:8], mini.test_y[:8], attack="square", norm="linf", eps_list=[8 / 255],
             params={"n_queries": 5}, batch_size=8, keep_adv=0, on_step=squares.append)
    assert squares and not any(s["exact"] for s in squares)  # stops on broken images: an upper bound


def test_cw_progress_moves_during_its_one_run_on_the_first_eps_line(mini, monkeypatch):
    """C&W runs once per batch for every eps (before the eps loop): its bar is the first eps's, and its forward
    passes are counted there, not lost (the bar stood still at 0 for the whole run, then showed 1 pass/image)."""
    import sys

    from epcli.attacks import evaluate
    from epcli.models import create_model
    ev = sys.modules["epcli.attacks.evaluate"]  # the module (the package re-exports the function by its name)
    monkeypatch.setattr(ev.time, "perf_counter", iter(range(10**7)).__next__)  # every beat passes the throttle
    net = create_model("cnn-small").eval()
    steps = []
    r = evaluate(net, mini.test_x[:8], mini.test_y[:8], attack="cw", norm="l2", eps_list=[0.25, 0.5],
                 params={"steps": 4, "binary_search_steps": 2}, labels="predicted", batch_size=8, keep_adv=0,
                 on_step=steps.append)
    ends = {s["eps"]: s for s in steps if "robust" in s}
    first_end = next(i for i, s in enumerate(steps) if "robust" in s)
    during = steps[:first_end]
    assert all(s["eps"] == 0.25 for s in during) and sum(s["forward_passes"] > 8 for s in during) >= 3
    # the attack's own passes, as the run's attack_forward_passes counts them (not the pass scoring x_adv)
    assert ends[0.5]["forward_passes"] == 0
    assert ends[0.25]["forward_passes"] == r["attack_forward_passes"]


def test_redirected_logs_hold_one_line_per_stage_and_epoch(pipeline):
    store, data, train = pipeline
    r = invoke("train", "--model", "cnn-small", "--dataset", data, "--epochs", 2, "--device", "cpu", store=store)
    assert r.exit_code == 0, r.output
    names = [ln.split("  ")[0] for ln in r.stderr.splitlines()]
    assert names[:4] == ["load", "epoch 1/2", "epoch 2/2", "training"], r.stderr
    epoch_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert all("test_acc=" in ln and "train_loss=" in ln for ln in epoch_lines)
    assert r.stdout == ""  # without --json a pipeline command prints nothing on stdout
    r = invoke("attack", "--model", "cnn-small", "--eps", "2/255,8/255", "--n", 40, "--steps", 3, store=store)
    assert r.exit_code == 0, r.output
    names = [ln.split("  ")[0] for ln in r.stderr.splitlines() if "  " in ln and not ln.startswith(("│", "┃"))]
    stages = [n for n in names if n in ("load", "pgd 2/255", "pgd 8/255", "checks", "save")
              or n.startswith("check strength")]
    assert stages[:3] == ["load", "pgd 2/255", "pgd 8/255"] and stages[-2:] == ["checks", "save"]
    assert len(stages) == 6 and stages[3].startswith("check strength")
    assert "robust_acc=" in next(ln for ln in r.stderr.splitlines() if ln.startswith("pgd 8/255"))
    r = invoke("attack", "--model", "cnn-small", "--eps", "8/255", "--n", 10, "--steps", 1, "--quiet",
               store=store)
    assert r.exit_code == 0 and r.stderr == ""  # -q after the command works too


def test_tables_fit_80_columns(pipeline):
    store, _, train = pipeline
    r = invoke("attack", "--model", train["run_id"], "--eps", "8/255", "--n", 20, "--steps", 2, "--json",
               store=store)
    att = json.loads(r.stdout)
    narrow = {"COLUMNS": "80"}
    r = runner.invoke(app, ["--store", str(store), "runs", "--limit", 0], env=narrow, catch_exceptions=False)
    lines = r.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    for rid in (train["run_id"], att["run_id"]):  # run ids are never shortened
        assert any(ln.startswith(rid + " ") for ln in lines), r.stdout
    r = runner.invoke(app, ["--store", str(store), "show", att["run_id"]], env=narrow, catch_exceptions=False)
    head = r.stdout.split("config")[0]
    for field in ("finished", "duration", "command", "git commit", "versions", "epcli"):
        assert field in head, head
    assert "robust_acc" in r.stdout and "8/255" in r.stdout and "…" not in r.stdout.split("artifacts")[0]
    r = runner.invoke(app, ["--store", str(store), "trace", train["run_id"]], env=narrow, catch_exceptions=False)
    node = " ".join(ln.strip(" │├└─") for ln in r.stdout.split(att["run_id"])[1].splitlines()[:2])
    acc = att["results"][0]["robust_acc"]
    assert f"8/255 {100 * acc:.2f}%" in node, r.stdout  # the attack node shows its robust accuracy


def test_show_prints_epochs_as_columns_and_says_which_it_leaves_out():
    """A 120-epoch run on 80 columns: the first and last epochs, the gap named, every metric a row."""
    import io

    from rich.console import Console

    from epcli.cli import _epoch_table
    rows = [{"name": k, "step": e, "value": v, "unreliable": False, "n_examples": 1000 if k == "test_acc" else None}
            for e in range(1, 121) for k, v in (("train_loss", 1 / e), ("test_acc", e / 200))]
    buf = io.StringIO()
    Console(file=buf, width=80, color_system=None).print(_epoch_table(rows, 80))
    lines = buf.getvalue().splitlines()
    header = lines[0].split()
    assert header[:3] == ["per", "epoch", "1"] and header[-1] == "120"
    gap = next(h for h in header if h.startswith("("))
    first, last = map(int, gap.strip("()").split("-"))
    shown = [int(h) for h in header[2:] if h.isdigit()]
    assert first == max(e for e in shown if e < first) + 1 and last == min(e for e in shown if e > last) - 1
    assert len(shown) + (last - first + 1) == 120 and max(map(len, lines)) <= 80
    assert lines[2].split()[:3] == ["test_acc", "(n=1000)", "0.50%"] and lines[2].split()[-1] == "60.00%"
    short = io.StringIO()
    Console(file=short, width=200, color_system=None).print(_epoch_table(rows[:8], 200))
    assert short.getvalue().splitlines()[0].split() == ["per", "epoch", "1", "2", "3", "4"]


def test_show_says_what_the_ep_columns_are_taken_over(tmp_path):
    from epcli.store import Store
    s = Store(tmp_path / "s")
    ep = s.start_run("train", {"model": "ep-cnn-tiny"}, model="ep-cnn-tiny", dataset="cifar10-mini")
    s.log_metrics(ep, [{"name": k, "value": v, "step": 1} for k, v in
                       (("train_loss", 2.0), ("mean_steps", 12.5), ("residual_free", 1e-3))])
    s.finish_run(ep)
    cnn = s.start_run("train", {"model": "cnn-small"}, model="cnn-small", dataset="cifar10-mini")
    s.log_metrics(cnn, [{"name": "train_loss", "value": 2.0, "step": 1}])
    s.finish_run(cnn)
    s.close()
    out = " ".join(invoke("show", ep, store=tmp_path / "s").stdout.split())
    assert "mean_steps / mean_steps_nudged: relaxation steps per training image" in out
    assert "largest relative residual of any training image at the end of that phase" in out
    assert "relaxation steps" not in invoke("show", cnn, store=tmp_path / "s").stdout


def test_models_and_recipes_list_names_in_a_pipe_and_describe_them_with_long():
    from epcli.models import list_models
    from epcli.train import RECIPES
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and r.stdout.split() == list_models()  # CliRunner is a pipe: bare names
    r = runner.invoke(app, ["models", "--long"], env={"COLUMNS": "200"})
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ep-cnn "))
    assert "ep" in line.split() and "T=250" in line
    r = runner.invoke(app, ["recipes", "-l"], env={"COLUMNS": "200"})
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert set(rows) == set(RECIPES)
    assert rows["paper-ep-cifar10"][1:5] == ["ep-cnn", "cifar10", "120", "128"] and "T2=30" in rows["paper-ep-cifar10"]
    assert "eps=8/255" in rows["paper-cnn-at-linf"]
    doc = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert [d["name"] for d in doc["details"]] == doc["models"]
