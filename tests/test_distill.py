"""Distillation of an EP-CNN into a feed-forward student: the model (epcli.student), the recipe section `distill`
in the training loop, and `epcli train --teacher` with its lineage, on real CIFAR-10 images (the embedded set)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_imagefolder
from safetensors.torch import load_file
from typer.testing import CliRunner

from epcli import checkpoint
from epcli.cli import app
from epcli.data import Dataset, subset
from epcli.ep import EPCNN, relative_residual
from epcli.errors import UsageError
from epcli.models import build_from_spec, create_model
from epcli.paper import paper_key_for
from epcli.store import Store
from epcli.student import init_from_teacher
from epcli.train import default_recipe, distill_loss, evaluate, fit, resolve_recipe

runner = CliRunner()


def _small(d, n_train, n_test, seed=0):
    tx, ty, _ = subset(d.train_x, d.train_y, n_train, seed=seed)
    vx, vy, _ = subset(d.test_x, d.test_y, n_test, seed=seed)
    return Dataset("small", d.classes, tx, ty, vx, vy)


@pytest.fixture(scope="module")
def teacher(mini):
    """ep-cnn-tiny trained 3 epochs (exact BPTT rule, T=10) on 2,000 real images: ~35% test accuracy, so its
    predictions spread over the classes (an untrained one answers one class for almost every image)."""
    torch.manual_seed(0)
    net = create_model("ep-cnn-tiny")
    fit(net, _small(mini, 2000, 100, seed=3), resolve_recipe("tiny-ep", {
        "epochs": 3, "ep.rule": "bptt", "ep.T1": 10, "ep.T2": 10, "augment": None}))
    return net.eval()


@pytest.fixture(scope="module")
def heldout(mini, teacher):
    """500 test images in [0, 1] and the teacher's predictions on them (its forward: T = 20 steps)."""
    _, _, idx = subset(mini.test_x, mini.test_y, 500, seed=0)
    x = mini.test_x[idx].float() / 255
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def _agreement(student, heldout) -> float:
    x, pred = heldout
    with torch.no_grad():
        return float((student.eval()(x).argmax(1) == pred).float().mean())


# --- the model ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,over", [("ep-cnn-tiny", {}), ("ep-cnn-small", {}), ("ep-cnn", {}),
                                         ("ep-cnn-tiny", {"fc": [12], "readout": "mse", "pools": "ai"})])
def test_student_layers_have_the_teacher_state_shapes(mini, preset, over):
    t = EPCNN.preset(preset, **over)
    s = create_model("ep-student", teacher_spec=t.spec)
    x = mini.test_x[:2].float() / 255
    with torch.no_grad():
        t_states, _ = t.relax(x, t.depth)
        s_states = s.states(x)
    assert [tuple(v.shape) for v in s_states] == [tuple(v.shape) for v in t_states] == [(2, *sh) for sh in t.shapes]
    assert s.shapes == t.shapes and s(x).shape == (2, 10)
    clone = build_from_spec(json.loads(json.dumps(s.spec)))  # the spec is explicit: no teacher needed
    assert clone.spec == s.spec and "teacher_spec" not in s.spec


@pytest.mark.parametrize("pool", ["m", "a", "i"])
def test_one_layer_teacher_fixed_point_is_the_students_pass(mini, pool):
    """With one state layer and the read-out outside the energy there is no feedback: the teacher's fixed point is
    s* = σ(P(W ⋆ x + b)), so the student initialised from it reproduces s* and the logits, whatever the pooling."""
    torch.manual_seed(0)
    t = EPCNN.preset("ep-cnn-tiny", channels=[6], kernels=[3], paddings=[1], pools=pool, T=5)
    x = mini.test_x[:16].float() / 255
    s = create_model("ep-student", teacher_spec=t.spec)
    with torch.no_grad():
        s_star, _ = t.relax(x, 5)
        assert float(t.last_residual.max()) == 0.0  # a fixed point after one step
        assert not torch.allclose(s.states(x)[0], s_star[0], atol=1e-3)  # random init: another net
        init_from_teacher(s, t)
        assert torch.allclose(s.states(x)[0], s_star[0], atol=1e-6)
        assert torch.allclose(s(x), t(x), atol=1e-5)


def test_feedback_is_what_the_student_must_learn(mini, teacher):
    """Two layers: the student (teacher's weights) equals the teacher's first step from zero states (no feedback
    has arrived yet), but not its fixed point, where layer 2 feeds back into layer 1."""
    x = mini.test_x[:16].float() / 255
    s = create_model("ep-student", teacher_spec=teacher.spec)
    init_from_teacher(s, teacher)
    with torch.no_grad():
        first, _ = teacher.relax(x, 1, states=teacher.zero_states(16))
        s_star, _ = teacher.relax(x, teacher.T)
        mine = s.states(x)
    assert torch.allclose(mine[0], first[0], atol=1e-6)
    assert (mine[0] - s_star[0]).abs().max() > 1e-2


def test_default_builds_the_papers_architecture_and_refuses_mixed_specs():
    s = create_model("ep-student")
    assert s.spec["channels"] == [128, 256, 512, 512] and s.spec["paddings"] == [1, 1, 1, 0]
    assert s.shapes[-1] == (512, 1, 1)
    assert create_model("ep-student", num_classes=100).spec["channels"][-1] == 1024
    t = EPCNN.preset("ep-cnn-tiny")
    with pytest.raises(UsageError, match="not both"):
        create_model("ep-student", teacher_spec=t.spec, channels=[4, 8])
    with pytest.raises(UsageError, match="teacher has 10 classes"):
        create_model("ep-student", num_classes=5, teacher_spec=t.spec)


# --- the loss and the loop ------------------------------------------------------------------------------------

def test_distill_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = [torch.rand(4, 3, 2, 2, generator=g), torch.rand(4, 5, generator=g)]
    t = [torch.rand(4, 3, 2, 2, generator=g), torch.rand(4, 5, generator=g)]
    sl, tl, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.tensor([0, 3, 9, 1])
    cfg = {"target": "states", "logit_weight": 0.5, "temperature": 2.0, "label_weight": 0.25}
    mse = sum(float(((a - b) ** 2).sum()) / a.numel() for a, b in zip(s, t))
    pt, ps = torch.softmax(tl / 2, 1), torch.softmax(sl / 2, 1)
    kl = float((pt * (pt.log() - ps.log())).sum(1).mean())
    ce = float(-torch.log_softmax(sl, 1)[torch.arange(4), y].mean())
    assert math.isclose(float(distill_loss(s, sl, t, tl, y, cfg)), mse + 0.5 * 4 * kl + 0.25 * ce, rel_tol=1e-5)
    logits_only = float(distill_loss(s, sl, t, tl, y, {**cfg, "target": "logits", "label_weight": 0.0}))
    assert math.isclose(logits_only, 0.5 * 4 * kl, rel_tol=1e-5)


def _shuffled(teacher):
    """The same teacher with every target paired with another image of the batch (rolled by one)."""
    class Shuffled(torch.nn.Module):
        T, tol, shapes = teacher.T, None, teacher.shapes

        def relax(self, x, T, tol=None):
            states, n = teacher.relax(x, T, tol=tol)
            self.last_residual, self.last_sample_steps = teacher.last_residual, teacher.last_sample_steps
            return [v.roll(1, 0) for v in states], n

        def logits(self, states):
            return teacher.logits(states)

        def _couplings(self):
            return teacher._couplings()
    return Shuffled()


@pytest.mark.parametrize("init,lr,floor", [("random", 1e-2, 0.6), ("teacher", 1e-3, 0.8)])
def test_distillation_learns_the_teachers_predictions(mini, teacher, heldout, init, lr, floor):
    """On held-out images the distilled student agrees with the teacher far more than a student trained on the
    same targets paired with the wrong images, and its distillation loss there went down."""
    ds = _small(mini, 1000, 50)
    recipe = resolve_recipe("distill-ep", {"epochs": 3, "batch_size": 32, "optimizer.lr": lr, "distill.init": init})
    x = heldout[0][:200]
    with torch.no_grad():
        t_states, _ = teacher.relax(x, teacher.T)
        t_logits = teacher.logits(t_states)

    def heldout_loss(st):
        with torch.no_grad():
            states = st.states(x)
            return float(distill_loss(states, st.logits(states), t_states, t_logits, None,
                                      {**recipe["distill"], "label_weight": 0}))

    results = {}
    for name, tch in (("real", teacher), ("shuffled", _shuffled(teacher))):
        torch.manual_seed(1)
        st = create_model("ep-student", teacher_spec=teacher.spec)
        if init == "teacher":  # what fit does at the start: measured here before it
            init_from_teacher(st, teacher)
        before = (_agreement(st, heldout), heldout_loss(st))
        hist = fit(st, ds, recipe, teacher=tch)
        results[name] = (before, (_agreement(st, heldout), heldout_loss(st)), hist)
    (a0, l0), (a1, l1), hist = results["real"]
    shuffled_agreement = results["shuffled"][1][0]
    assert a1 > floor and a1 > a0 and l1 < l0
    assert a1 > shuffled_agreement + 0.3, results
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["teacher_steps"] == teacher.T and 0 < hist[-1]["teacher_agreement"] <= 1


def test_epoch_history_records_how_close_the_teacher_got(mini, teacher):
    """One batch per epoch (no augmentation): the recorded residual is the teacher's last-step relative residual
    on those images, recomputed here from two separate relaxations; the agreement is the starting student's."""
    ds = _small(mini, 64, 20)
    recipe = resolve_recipe("distill-ep", {"epochs": 1, "batch_size": 64, "augment": None})
    st = create_model("ep-student", teacher_spec=teacher.spec)
    init_from_teacher(st, teacher)
    x = ds.train_x.float() / 255
    with torch.no_grad():
        a, _ = teacher.relax(x, teacher.T)
        b, _ = teacher.relax(x, teacher.T - 1)
        res = relative_residual(a, b)
        agree = float((st(x).argmax(1) == teacher.logits(a).argmax(1)).float().mean())
    before = copy.deepcopy(teacher.state_dict())
    h = fit(st, ds, recipe, teacher=teacher)[0]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # the teacher never learns
    assert math.isclose(h["teacher_residual"], float(res.max()), rel_tol=1e-4)
    assert math.isclose(h["teacher_residual_mean"], float(res.mean()), rel_tol=1e-4)
    assert math.isclose(h["teacher_agreement"], agree) and h["teacher_steps"] == teacher.T


def test_resume_is_exact_and_the_teacher_is_not_in_the_state(mini, teacher):
    ds = _small(mini, 128, 20)
    recipe = resolve_recipe("distill-ep", {"epochs": 2, "batch_size": 32})
    torch.manual_seed(0)
    full = create_model("ep-student", teacher_spec=teacher.spec)
    fit(full, ds, recipe, seed=5, teacher=teacher)
    saved = {}
    torch.manual_seed(0)
    half = create_model("ep-student", teacher_spec=teacher.spec)
    fit(half, ds, recipe, seed=5, teacher=teacher, max_epochs=1, on_epoch=lambda e, m, s: saved.update(s=s))
    assert not any(k.startswith("teacher") for k in saved["s"]["model"])
    torch.manual_seed(123)  # a fresh student with other random weights: the state decides
    again = create_model("ep-student", teacher_spec=teacher.spec)
    fit(again, ds, recipe, seed=5, teacher=teacher, state=copy.deepcopy(saved["s"]))
    for k, v in full.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_recipe_and_plan_refusals(mini, teacher):
    assert default_recipe("ep-student", "cifar10") == "distill-ep"
    for over, needle in (({"distill.target": "all"}, "distill.target must be one of"),
                         ({"distill.init": "zeros"}, "distill.init must be one of"),
                         ({"distill.temperature": 0}, "distill.temperature must be a number > 0"),
                         ({"distill.logit_weight": -1}, "distill.logit_weight must be a number >= 0"),
                         ({"distill.label_weight": "x"}, "distill.label_weight must be a number"),
                         ({"distill.teacher": 3}, "distill.teacher must be a run id"),
                         ({"distill.target": "logits", "distill.logit_weight": 0}, "needs a distill.logit_weight"),
                         ({"distill.target": "logits", "distill.logit_weight": 0, "distill.label_weight": 1.0},
                          None),
                         ({"distill.nope": 1}, "unknown recipe key 'distill.nope'")):
        if needle is None:  # labels only: the control, the same student trained by backprop on the same batches
            assert resolve_recipe("distill-ep", over)["distill"]["label_weight"] == 1.0
            continue
        with pytest.raises(UsageError, match=needle):
            resolve_recipe("distill-ep", over)
    assert resolve_recipe("demo-cnn", {"distill.temperature": 3.0})["distill"]["target"] == "states"
    ds = _small(mini, 32, 8)
    recipe = resolve_recipe("distill-ep", {"epochs": 1})
    student = create_model("ep-student", teacher_spec=teacher.spec)
    with pytest.raises(UsageError, match="needs the teacher model"):
        fit(student, ds, recipe)
    with pytest.raises(UsageError, match="trains an ep-student"):
        fit(create_model("cnn-small"), ds, recipe, teacher=teacher)
    with pytest.raises(UsageError, match="do not match the teacher's states"):
        fit(create_model("ep-student", teacher_spec=EPCNN.preset("ep-cnn-tiny", channels=[4, 6]).spec), ds,
            recipe, teacher=teacher)
    with pytest.raises(UsageError, match="only used by a recipe with a distill section"):
        fit(create_model("cnn-small"), ds, resolve_recipe("demo-cnn", {"epochs": 1}), teacher=teacher)


# --- the command line and the store -----------------------------------------------------------------------------

def _cli(store, *args):
    r = runner.invoke(app, ["--store", str(store), *[str(a) for a in args]], catch_exceptions=False)
    return r


def test_store_round_trip_teacher_student_attack(mini, tmp_path):
    data = write_imagefolder(tmp_path / "data", mini, 20, 10)
    store = tmp_path / "store"
    r = _cli(store, "train", "--model", "ep-cnn-tiny", "--dataset", data, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    t_run = json.loads(r.stdout)["run_id"]
    # the data defaults to the teacher's; the model to ep-student
    r = _cli(store, "train", "--teacher", t_run, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    s_run = doc["run_id"]
    # --json says whom it learnt from and how the teacher did (docs/cli.md's schema)
    import jsonschema

    from epcli.schema import SCHEMAS
    jsonschema.validate(doc, SCHEMAS["train"])
    assert doc["teacher"]["run_id"] == t_run and doc["teacher"]["label"]
    (h,) = doc["history"]
    assert 0 <= h["teacher_agreement"] <= 1 and 0 <= h["teacher_residual"]
    stored = {m["name"]: m["value"] for m in Store(store).metrics(s_run) if m["name"].startswith("teacher_")}
    assert h["teacher_agreement"] == pytest.approx(stored["teacher_agreement"], abs=1e-3)
    r = _cli(store, "attack", "--model", s_run, "--n", 20, "--steps", 2, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    a_run = json.loads(r.stdout)["run_id"]
    r = _cli(store, "train", "--teacher", "ep-cnn-tiny", "--dataset", data, "--epochs", 1, "--device", "cpu",
             "--set", "distill.target=logits", "--json")  # by name: the newest finished ep-cnn-tiny run
    assert r.exit_code == 0, r.output
    by_name = json.loads(r.stdout)["run_id"]

    s = Store(store)
    t_ckpt = next(a for a in s.artifacts_of(t_run, role="output", kind="checkpoint") if a["name"] == "final")
    for rid in (s_run, by_name):
        run = s.get_run(rid)
        assert run["model"] == "ep-student" and run["dataset"] == "data"
        assert run["config"]["teacher"]["run_id"] == t_run and run["config"]["teacher"]["sha256"] == t_ckpt["sha256"]
        assert run["config"]["recipe"]["distill"]["teacher"] == t_run
        assert run["config"]["label"].startswith("EP-student (distilled from ep-cnn-tiny")
        inputs = s.artifacts_of(rid, role="input")
        assert [(a["sha256"], a["name"], a["run_id"]) for a in inputs] == [(t_ckpt["sha256"], "teacher", t_run)]
    assert s.get_run(by_name)["config"]["recipe"]["distill"]["target"] == "logits"
    # the student's checkpoint rebuilds from its spec alone and gives the run's own test accuracy
    ckpt = s.artifact_path(next(a for a in s.artifacts_of(s_run, role="output", kind="checkpoint")
                                if a["name"] == "final")["sha256"])
    net, meta = checkpoint.load(ckpt)
    clone = build_from_spec(meta["spec"])
    clone.load_state_dict({k[6:]: v for k, v in load_file(str(ckpt)).items() if k.startswith("model.")})
    x = mini.test_x[:8].float() / 255
    with torch.no_grad():
        assert torch.equal(clone.eval()(x), net(x))
    from epcli.data import load_dataset
    ds = load_dataset(str(data), cache_dir=s.cache_dir)
    assert math.isclose(evaluate(net, ds.test_x, ds.test_y), s.get_run(s_run)["summary"]["test_acc"])
    s.close()

    # trace: teacher -> student -> attack; the student's own trace names its teacher
    tree = json.loads(_cli(store, "trace", t_run, "--json").stdout)["tree"]
    child = next(c for c in tree["children"] if c["run_id"] == s_run)
    assert child["kind"] == "train" and [g["run_id"] for g in child["children"]] == [a_run]
    out = _cli(store, "trace", s_run).stdout
    assert f"input teacher {t_ckpt['sha256'][:12]} of train {t_run}" in out
    r = _cli(store, "rm", t_run)  # the students depend on their teacher
    assert r.exit_code == 2 and s_run in r.stderr and "--cascade" in r.stderr
    # the report names the student after its teacher, and compares it with no paper number
    md = _cli(store, "report", "-f", "md").stdout
    assert f"EP-student (distilled from ep-cnn-tiny {t_run[:10]})" in md
    assert paper_key_for(Store(store).get_run(s_run)) is None

    # a teacher given as a file: recorded by path, and linked by content (here: the stored checkpoint's copy)
    copy_path = tmp_path / "teacher.safetensors"
    copy_path.write_bytes(Store(store).artifact_path(t_ckpt["sha256"]).read_bytes())
    r = _cli(store, "train", "--teacher", copy_path, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    by_file = Store(store).get_run(json.loads(r.stdout)["run_id"])
    assert by_file["config"]["teacher"]["path"] == str(copy_path.resolve()) and by_file["dataset"] == "data"
    assert [a["sha256"] for a in Store(store).artifacts_of(by_file["id"], role="input")] == [t_ckpt["sha256"]]

    # resume: the same teacher, from the run's record
    r = _cli(store, "train", "--resume", s_run, "--epochs", 2, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    resumed = Store(store).get_run(json.loads(r.stdout)["run_id"])
    assert resumed["config"]["teacher"]["run_id"] == t_run

    # a teacher trained on other data is refused before a run opens (one line, exit 2)
    other = write_imagefolder(tmp_path / "other", mini, 12, 4)
    n_runs = len(Store(store).runs())
    r = _cli(store, "train", "--teacher", t_run, "--dataset", other, "--epochs", 1, "--device", "cpu")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and [ln for ln in lines if ln.startswith("error")] == lines[-1:], r.output
    assert "teacher " + t_run + " was trained on data, not on other" in lines[-1] and "Traceback" not in r.output
    assert len(Store(store).runs()) == n_runs


def test_torchrun_student_equals_one_process(mini, tmp_path):
    """Two processes (gloo) distil the same student as one: the teacher's path travels in the plan, the data
    defaults to the teacher's on every rank, and the teacher statistics are reduced over the ranks."""
    import os
    import subprocess
    import sys
    data = write_imagefolder(tmp_path / "data", mini, 10, 4)  # 100 train images: batches of 25, 12 + 13 per rank
    store = tmp_path / "store"
    r = _cli(store, "train", "--model", "ep-cnn-tiny", "--dataset", data, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    t_run = json.loads(r.stdout)["run_id"]
    common = ["--teacher", t_run, "--epochs", "1", "--batch-size", "25", "--set", "augment=null", "--device", "cpu",
              "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EPCLI_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "epcli", "--store", str(store), "train", *common], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout)
    r = _cli(store, "train", *common)
    assert r.exit_code == 0, r.output
    one = json.loads(r.stdout)
    s = Store(store)
    weights = []
    for res in (two, one):
        ck = s.artifacts_of(res["run_id"], role="output", kind="checkpoint")[0]
        weights.append(load_file(str(s.artifact_path(ck["sha256"]))))
    h2, h1 = (s.metrics(res["run_id"], name="teacher_agreement")[0]["value"] for res in (two, one))
    assert two["world_size"] == 2 and s.get_run(two["run_id"])["config"]["teacher"]["run_id"] == t_run
    model_keys = [k for k in weights[1] if k.startswith("model.")]
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in model_keys) < 1e-5
    tk = load_file(str(s.artifact_path(s.get_run(two["run_id"])["config"]["teacher"]["sha256"])))
    assert max(float((tk[k] - weights[1][k]).abs().max()) for k in model_keys) > 1e-3  # it trained from the teacher
    assert h2 == pytest.approx(h1)


def test_resume_takes_the_teacher_file_it_was_given_not_its_runs_final(tmp_path):
    """A teacher given as a file records the file and the run named in its metadata; that run's final
    checkpoint may be another epoch than the file (a --select run, an exported epoch), so a resume loads the
    recorded file while it exists, and the run's checkpoint only when the file is gone."""
    from epcli.pipelines.train import _recorded_teacher
    f = tmp_path / "epoch-3.safetensors"
    f.write_bytes(b"x")
    config = {"teacher": {"run_id": "0123456789abcdef", "path": str(f), "sha256": None},
              "recipe": {"distill": {"teacher": "0123456789abcdef"}}}
    assert _recorded_teacher(config) == str(f)
    f.unlink()
    assert _recorded_teacher(config) == "0123456789abcdef"
    by_run = {"teacher": {"run_id": "0123456789abcdef", "path": None, "sha256": "ab" * 32},
              "recipe": {"distill": {"teacher": "0123456789abcdef"}}}
    assert _recorded_teacher(by_run) == "0123456789abcdef"


def test_an_unfinished_teacher_only_as_a_file(mini, tmp_path):
    """A teacher run that did not finish is refused by run id (its last checkpoint may be any epoch); the same
    checkpoint given as a file is the user's explicit choice, and is recorded by path."""
    data = write_imagefolder(tmp_path / "data", mini, 10, 5)
    store = tmp_path / "store"
    r = _cli(store, "train", "--model", "ep-cnn-tiny", "--dataset", data, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    t_run = json.loads(r.stdout)["run_id"]
    s = Store(store)
    s.db.execute("UPDATE runs SET status = 'interrupted' WHERE id = ?", [t_run])
    s.db.conn.commit()
    (ckpt,) = s.artifacts_of(t_run, role="output", kind="checkpoint")
    r = _cli(store, "train", "--teacher", t_run, "--epochs", 1, "--device", "cpu")
    assert r.exit_code == 2 and "is interrupted, not finished" in r.stderr and ".safetensors file" in r.stderr
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(s.artifact_path(ckpt["sha256"]).read_bytes())
    r = _cli(store, "train", "--teacher", path, "--epochs", 1, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert Store(store).get_run(json.loads(r.stdout)["run_id"])["config"]["teacher"]["path"] == str(path.resolve())
