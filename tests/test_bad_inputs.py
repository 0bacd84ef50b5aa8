"""Every bad input is one line `error: ...` on stderr with its documented exit code, never a traceback, and
leaves the store exactly as it was (table-driven: input, exit code, message fragment, store checksum)."""
import hashlib
import json
import os
import pickle
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import write_imagefolder
from typer.testing import CliRunner

from epcli.cli import app
from epcli.store import Store

runner = CliRunner()


def invoke(*args, store=None):
    argv = (["--store", str(store)] if store else []) + [str(a) for a in args]
    return runner.invoke(app, argv, catch_exceptions=False)


def checksum(root: Path) -> str:
    """The store's content: every table row (through a fresh SQLite connection, so the WAL is included) and
    every file but SQLite's own side files (whose bytes change on a mere read)."""
    h = hashlib.sha256()
    conn = sqlite3.connect(f"{(root / 'epcli.db').resolve().as_uri()}?mode=ro", uri=True)
    for line in conn.iterdump():
        h.update(line.encode())
    conn.close()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in ("epcli.db", "epcli.db-wal", "epcli.db-shm", ".lock"):
            h.update(str(p.relative_to(root)).encode() + hashlib.sha256(p.read_bytes()).digest())
        elif p.is_dir():
            h.update(str(p.relative_to(root)).encode())
    return h.hexdigest()


class Exploit:
    """A pickle that would create `marker` when unpickled by pickle.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, mini):
    """A store with one trained cnn-small, and a folder of bad files to feed it."""
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_imagefolder(root / "data", mini, 8, 4)
    store = root / "store"
    r = invoke("train", "--model", "cnn-small", "--dataset", data, "--epochs", 1, "--device", "cpu",
               store=store)
    assert r.exit_code == 0, r.output
    files = root / "files"
    files.mkdir()
    s = Store(store)
    run = s.runs(kind="train")[0]
    ckpt = s.artifact_path(s.artifacts_of(run["id"], kind="checkpoint")[0]["sha256"])
    s.close()
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(ckpt), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["spec"])

    def crafted(name, **changes):
        m = {**meta, **changes}
        save_file(tensors, str(files / name), metadata={k: v for k, v in m.items() if v is not None})

    crafted("huge.safetensors", spec=json.dumps({**spec, "width": 100000}))  # would ask for ~10^11 weights
    crafted("huge2.safetensors", spec=json.dumps({**spec, "width": -4}))
    crafted("nospec.safetensors", spec=None)
    crafted("badjson.safetensors", spec="{not json")
    crafted("speclist.safetensors", spec="[1, 2]")
    crafted("badclasses.safetensors", num_classes='"ten"')
    crafted("negclasses.safetensors", num_classes="-3")
    crafted("unknownmodel.safetensors", spec=json.dumps({**spec, "name": "nope-net"}))
    crafted("badconfig.safetensors", config="[1]")
    crafted("badlist.safetensors", classes='{"a": 1}')
    save_file({"w": next(iter(tensors.values()))}, str(files / "foreign.safetensors"))
    (files / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 50)
    (files / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:200])
    (files / "folder.safetensors").mkdir()
    # CIFAR python layouts: one whose batch runs code when unpickled, one with junk, one with bad labels
    for name in ("exploit", "junk", "labels", "emptytest"):
        folder = files / name / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        good = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        for i in range(1, 6):
            pickle.dump(good, open(folder / f"data_batch_{i}", "wb"))
        pickle.dump(good, open(folder / "test_batch", "wb"))
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, open(folder / "batches.meta", "wb"))
    pickle.dump({b"data": Exploit(files / "PWNED"), b"labels": [0]}, open(files / "exploit" /
                "cifar-10-batches-py" / "data_batch_1", "wb"))
    (files / "junk" / "cifar-10-batches-py" / "test_batch").write_bytes(b"junk")
    pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 99]},
                open(files / "labels" / "cifar-10-batches-py" / "test_batch", "wb"))
    pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []},
                open(files / "emptytest" / "cifar-10-batches-py" / "test_batch", "wb"))
    (files / "empty").mkdir()
    # ImageFolders no model here can use: 2x2 images, one class, train and test of different sizes
    from PIL import Image

    def png(path, size, seed):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
    classes = [p.name for p in sorted((Path(data) / "train").iterdir())]  # the trained model's (CIFAR-10's)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            png(files / "tiny" / split / name / "0.png", 2, c)
            png(files / "renamed" / split / f"c{c}" / "0.png", 32, c)  # the right size, other class names
        png(files / "oneclass" / split / "a" / "0.png", 32, 0)
        for c in "ab":
            png(files / "splitsize" / split / c / "0.png", 32 if split == "train" else 16, 0)
    from epcli.data import load_dataset
    s = Store(store)
    for name in ("tiny", "renamed"):  # decoded once here: the cases below add no cache file
        load_dataset(str(files / name), cache_dir=s.cache_dir)
    s.close()
    # an official-layout corruption folder with a wrongly shaped file and a pickled one
    (files / "csrc").mkdir()
    np.save(files / "csrc" / "labels.npy", np.zeros(10, np.int64))
    np.save(files / "csrc" / "contrast.npy", np.zeros((10, 32, 32), np.uint8))
    np.save(files / "csrc" / "snow.npy", np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    for name, images, labels in (("csrc2", np.zeros((10, 2, 2, 3), np.uint8), np.zeros(10, np.int64)),
                                 ("csrc3", np.zeros((10, 32, 32, 3), np.uint8), np.full(10, 99, np.int64))):
        (files / name).mkdir()  # 2x2 images no model here takes; labels outside 0..9
        np.save(files / name / "fog.npy", images)
        np.save(files / name / "labels.npy", labels)
    (files / "bad.tar.xz").write_bytes(b"not an archive")
    (files / "afile.txt").write_text("x")
    (files / "outclash" / "report.md").mkdir(parents=True)  # a folder where `report -f md --out` writes its file
    return {"store": store, "data": data, "files": files, "run": run["id"]}


A = ["attack", "--model", "cnn-small", "--n", "8", "--steps", "1"]
T = ["train", "--model", "cnn-small", "--epochs", "1"]
C = ["corrupt", "--model", "cnn-small", "--n", "8"]

CASES = [
    # numeric options: one validation layer
    (A + ["--batch-size", "-1"], 2, "--batch-size must be >= 1"),
    (A + ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (A + ["--n", "-5"], 2, "--n must be >= 1"),
    (A + ["--n", "0"], 2, "--n must be >= 1"),
    (A + ["--step-size", "nan"], 2, "--step-size must be a finite number"),
    (A + ["--step-size", "inf"], 2, "--step-size must be a finite number"),
    (A + ["--step-size", "-0.1"], 2, "--step-size must be > 0"),
    (A + ["--steps", "0"], 2, "--steps must be >= 1"),
    (A + ["--restarts", "0"], 2, "--restarts must be >= 1"),
    (A + ["--attack", "square", "--queries", "0"], 2, "--queries must be >= 1"),
    (A + ["--T", "0"], 2, "--T must be >= 1"),
    (A + ["--seed", "-1"], 2, "--seed must be >= 0"),
    (A + ["--unroll-sweep", "0"], 2, "--unroll-sweep must be >= 1"),
    (A + ["--unroll-sweep", "a,b"], 2, "--unroll-sweep expects comma-separated integers"),
    (A + ["--eps", "nan"], 2, "finite"),
    (A + ["--eps", "-1/255"], 2, ">= 0"),
    (A + ["--eps", "1/0"], 2, "cannot read eps"),
    (A + ["--eps", "abc"], 2, "cannot read eps"),
    (A + ["--eps", ","], 2, "no eps"),
    (A + ["--eps", "2"], 2, "outside [0, 1]"),
    (A + ["--norm", "l7"], 2, "unknown norm"),
    (A + ["--attack", "deepfool9"], 2, "unknown attack"),
    (A + ["--labels", "foo"], 2, "labels must be"),
    (A + ["--grad-mode", "truncated:5"], 2, "relaxation models only"),
    (A + ["--T", "5"], 2, "relaxation"),
    (A + ["--device", "tpu"], 2, "unknown device"),
    (C + ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (C + ["--batch-size", "-3"], 2, "--batch-size must be >= 1"),
    (C + ["--n", "0"], 2, "--n must be >= 1"),
    (C + ["-s", "6"], 2, "severity 6"),
    (C + ["-s", "0"], 2, "severity 0"),
    (C + ["-s", "1,x"], 2, "--severity expects comma-separated integers, e.g. 1,3,5"),
    (C + ["-s", "2,7"], 2, "severity 7"),
    (C + ["-c", "lightning"], 2, "unknown corruption 'lightning'"),
    (C + ["-c", "fog,lightning"], 2, "unknown corruption 'lightning'"),
    (C + ["-c", "[bold]x[/]"], 2, "unknown corruption '[bold]x[/]'"),
    (T + ["--beta", "nan"], 2, "--beta must be a finite number"),
    (T + ["--epochs", "0"], 2, "--epochs must be >= 1"),
    (T + ["--epochs", "-1"], 2, "--epochs must be >= 1"),
    (T + ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (T + ["--lr", "nan"], 2, "--lr must be a finite number"),
    (T + ["--lr", "-0.1"], 2, "--lr must be > 0"),
    (T + ["--lr", "0"], 2, "--lr must be > 0"),
    (T + ["--T1", "0"], 2, "--T1 must be >= 1"),
    (T + ["--T2", "-5"], 2, "--T2 must be >= 1"),
    (T + ["--seed", "-2"], 2, "--seed must be >= 0"),
    (T + ["--set", "garbage"], 2, "--set expects key=value"),
    (T + ["--set", "=3"], 2, "--set expects key=value"),
    (T + ["--set", "a..b=1"], 2, "--set expects key=value"),
    (T[:3] + ["--set", "epochs=abc"], 2, "--epochs must be a number"),
    (T + ["--set", "optimizer.lr=NaN"], 2, "not a finite number"),
    (T + ["--set", "epochs=2", "--set", "epochs.x=1"], 2, "already set"),
    (T + ["--adv-train", "l2"], 2, "--adv-train expects NORM:EPS"),
    (T + ["--adv-train", "l7:0.5"], 2, "norm"),
    (T + ["--adv-train", "linf:2"], 2, "outside [0, 1]"),
    (T + ["--adv-train", "l2:abc"], 2, "cannot read eps"),
    (T + ["--model-set", "width=abc"], 2, "bad option"),
    (T + ["--model-set", "nosuch=1"], 2, "has no option nosuch"),
    (T + ["--model-set", "oops"], 2, "--model-set expects key=value"),
    (T + ["--recipe", "nope"], 2, "unknown recipe"),
    (["train", "--model", "resnet-9000"], 3, "resnet-9000"),
    (T + ["--resume", "nosuchrun"], 3, "nosuchrun"),
    # model references, datasets, markup in user text
    (A[:2] + ["nosuch"], 3, "'nosuch' is neither"),
    (A[:2] + ["vit"], 3, "no finished training run"),
    (A[:2] + ["x[/]y"], 3, "'x[/]y' is neither"),
    (A[:2] + ["[bold red]m"], 3, "'[bold red]m' is neither"),
    (A[:2] + ["/nonexistent/m.safetensors"], 3, "does not exist"),
    (A + ["--dataset", "/nonexistent/data"], 3, "no finished training run of model 'cnn-small' on"),
    (T + ["--dataset", "/nonexistent/[red]x[/]"], 3, "/nonexistent/[red]x[/]"),
    (T + ["--dataset", "FILES/empty"], 3, "not an ImageFolder dataset"),
    (T + ["--dataset", "FILES/bad.tar.xz"], 3, "not a readable"),
    (T + ["--dataset", "cifar10", "--data-dir", "FILES/exploit"], 3, "refusing to load posix.system"),
    (T + ["--dataset", "cifar10", "--data-dir", "FILES/junk"], 3, "not a CIFAR python batch"),
    (T + ["--dataset", "cifar10", "--data-dir", "FILES/labels"], 3, "labels must be in 0..9"),
    (T + ["--dataset", "cifar10", "--data-dir", "FILES/emptytest"], 3, "the test split has no images"),
    # checkpoints: metadata is untrusted
    (A[:2] + ["FILES/huge.safetensors"], 4, "refusing to build it"),
    (A[:2] + ["FILES/huge2.safetensors"], 4, "cannot rebuild its model"),
    (A[:2] + ["FILES/nospec.safetensors"], 4, "no valid model spec"),
    (A[:2] + ["FILES/badjson.safetensors"], 4, "no valid model spec"),
    (A[:2] + ["FILES/speclist.safetensors"], 4, "no valid model spec"),
    (A[:2] + ["FILES/badclasses.safetensors"], 4, "num_classes"),
    (A[:2] + ["FILES/negclasses.safetensors"], 4, "num_classes"),
    (A[:2] + ["FILES/unknownmodel.safetensors"], 4, "cannot rebuild its model"),
    (A[:2] + ["FILES/badconfig.safetensors"], 4, "config"),
    (A[:2] + ["FILES/badlist.safetensors"], 4, "classes"),
    (A[:2] + ["FILES/foreign.safetensors"], 4, "not an epcli checkpoint"),
    (A[:2] + ["FILES/garbage.safetensors"], 4, "not a safetensors checkpoint"),
    (A[:2] + ["FILES/truncated.safetensors"], 4, "not a safetensors checkpoint"),
    (A[:2] + ["FILES/folder.safetensors"], 3, "does not exist"),
    # store commands
    (["runs", "--kind", "nope"], 2, "unknown run kind 'nope'"),
    (["runs", "--status", "weird"], 2, "unknown status 'weird'"),
    (["runs", "--limit", "-1"], 2, "--limit must be a whole number >= 0"),
    (["runs", "--where", "nonsense"], 2, "cannot read the condition 'nonsense'"),
    (["runs", "--since", "[/]"], 2, "cannot read --since '[/]'"),
    (["show", "zzzz"], 3, "no run 'zzzz'"),
    (["show", "%"], 3, "no run '%'"),
    (["show", "_"], 3, "no run '_'"),
    (["show", "[/]"], 3, "no run '[/]'"),
    (["trace", "nope"], 3, "no run 'nope'"),
    (["compare", "a", "b"], 3, "no run 'a'"),
    (["report", "-f", "md", "--out", "FILES/afile.txt"], 2, "is a file"),
    (["report", "--out", "FILES/newdir"], 2, "the table format writes no file"),
    (["recipes", "nope"], 2, "unknown recipe"),
    # store commands, probed with hostile values: each was exit 1 (a Python exception), or exit 0 with the value
    # silently ignored (an empty id named every run "ambiguous"; --since "" listed everything)
    (["show", ""], 2, "the run id is empty"),
    (["trace", " "], 2, "the run id is empty"),
    (["rm", ""], 2, "the run id is empty"),
    (["tag", "", "x"], 2, "the run id is empty"),
    (["runs", "--since", "99999999999999d"], 2, "--since '99999999999999d' is outside the calendar"),
    (["runs", "--since", "0001-01-01T00:00:00+14:00"], 2, "is outside the calendar"),
    (["runs", "--since", ""], 2, "--since is empty"),
    (["runs", "--tag", ""], 2, "--tag is empty"),
    (["runs", "--model", ""], 2, "--model is empty"),
    (["runs", "--dataset", " "], 2, "--dataset is empty"),
    (["runs", "--sort", "-"], 2, "--sort '-' names nothing"),
    (["runs", "--where", "test_acc>>0.5"], 2, "cannot read the condition 'test_acc>>0.5': one operator"),
    (["runs", "--where", "test_acc=<0.5"], 2, "one operator"),
    (["runs", "--where", "test_acc>nan"], 2, "nan is not a number to compare with"),
    (["runs", "--sort", "config"], 2, "'config' is not a value to filter or sort on: name one key"),
    (["runs", "--where", "config.=3"], 2, "'config.' is not a value to filter or sort on"),
    (["runs", "--where", "tags=x"], 2, "(use --tag for tags)"),
    (["tag", "RUN", ""], 2, "a tag is empty"),
    (["tag", "RUN", "-"], 2, "a tag is empty"),
    (["tag", "RUN", "two words"], 2, "tag 'two words' has whitespace: a tag is one word (e.g. two-words)"),
    (["tag", "RUN", "ok", "x y"], 2, "tag 'x y' has whitespace"),
    (["tag", "RUN", "t\x1b[31m"], 2, "tag 't\\x1b[31m' has a control character"),  # was stored, colouring `runs`
    (["tag", "RUN", "--jsno"], 2, "No such option: --jsno (a tag to remove is written -TAG"),  # removed tag "-jsno"
    (["tag", "RUN", "ok", "---"], 2, "No such option: ---"),
    (["recipes", ""], 2, "the recipe name is empty"),
    (["report", "--out", ""], 2, "--out is empty"),
    (["report", "--run", ""], 2, "--run is empty"),
    (["report", "--model", ""], 2, "--model is empty"),
    (["report", "--dataset", ""], 2, "--dataset is empty"),
    (["report", "-f", "csv", "--out", "FILES/afile.txt/sub"], 2, "afile.txt/sub: cannot create the folder (Not a directory)"),
    (["report", "-f", "html", "--out", "FILES/afile.txt/sub"], 2, "cannot create the folder (Not a directory)"),
    (["report", "--figures", "--out", "FILES/afile.txt/sub"], 2, "cannot create the folder (Not a directory)"),
    (["report", "--curves", "--out", "FILES/afile.txt"], 2, "afile.txt is a file; give a folder"),
    (["report", "--curves", "--run", "RUN", "--out", "FILES/afile.txt/sub"], 2, "cannot create the folder"),
    (["report", "--curves", "--run", ""], 2, "--run is empty"),
    (["report", "--curves", "--model", ""], 2, "--model is empty"),
    (["report", "-f", "md", "--out", "FILES/outclash"], 2, "outclash: report.md there is not a file"),
    (A + ["--grad-mode", "truncated:0"], 2, "unknown gradient mode"),
    (T + ["--set", "optimizer.lrs=[0.1,0.1]"], 2, "needs a model with layer_param_groups()"),
    (T + ["--set", "optimizer=sgd"], 2, "recipe key 'optimizer' is a group of keys"),
    (T + ["--set", "model.patch=7"], 2, "recipe key 'model' is a single value"),
    # recipe values of every section: checked before the run opens (were TypeErrors, failed runs, or accepted)
    (T + ["--set", "schedule.t_max=abc"], 2, "recipe schedule.t_max must be an integer >= 1 or null"),
    (T + ["--set", "schedule.name=step", "--set", "schedule.step_size=0"], 2, "schedule.step_size must be an"),
    (T + ["--set", "schedule.eta_min=abc"], 2, "recipe schedule.eta_min must be a number >= 0"),
    (T + ["--set", "schedule.warmup_epochs=-1"], 2, "recipe schedule.warmup_epochs must be a number >= 0"),
    (T + ["--set", "optimizer.betas=[2]"], 2, "optimizer betas must be two numbers in [0, 1)"),
    (T + ["--set", "optimizer.momentum=-1"], 2, "recipe optimizer.momentum must be a number >= 0"),
    (T + ["--set", "optimizer.weight_decay=abc"], 2, "recipe optimizer.weight_decay must be a number >= 0"),
    (T + ["--set", "optimizer.nesterov=maybe"], 2, "recipe optimizer.nesterov must be true or false"),
    (T + ["--set", "optimizer.momentum=0", "--set", "optimizer.nesterov=true"], 2, "nesterov needs a momentum"),
    (T + ["--set", "optimizer.lrs=[Infinity,1,1]"], 2, "optimizer lrs must be a list of positive"),
    (T + ["--set", "grad_clip=-1"], 2, "recipe grad_clip must be a number > 0 or null"),
    (T + ["--set", "label_smoothing=abc"], 2, "recipe label_smoothing must be a number in [0, 1)"),
    (T + ["--set", "amp=maybe"], 2, "recipe amp must be true or false"),
    (T + ["--set", "augment_group=0"], 2, "recipe augment_group must be an integer >= 1"),
    (T + ["--set", "adv.eps=0.5", "--set", "adv.step_size=-1"], 2, "recipe adv.step_size must be a number > 0"),
    (T + ["--set", "adv.eps=0.5", "--set", "adv.random_start=maybe"], 2, "adv.random_start must be true or"),
    (T + ["--set", "model=vit"], 2, "choose the model with --model"),
    (T + ["--set", "dataset=cifar100"], 2, "choose the dataset with --dataset"),
    (T + ["--T1", "5"], 2, "apply to EP models; cnn-small trains by backprop"),
    (T + ["--recipe", "demo-ep"], 2, "EP settings (recipe demo-ep, --T1"),
    (["train", "--model", "ep-cnn-tiny", "--recipe", "demo-cnn"], 2, "recipe demo-cnn has no ep settings"),
    (T + ["--recipe", "paper-cnn-at"], 2, "needs an eps (--adv-train l2:EPS or --set adv.eps=EPS)"),
    (A + ["--strict", "--no-checks"], 2, "--strict exits 7 when a reliability check fails, but --no-checks"),
    (["train", "--model", "ep-cnn-tiny", "--set", "optimizer.lrs=null", "--beta", "0"], 2,
     "recipe ep.beta must be a finite non-zero number"),
    (["train", "--model", "ep-cnn-tiny", "--set", "optimizer.lrs=null", "--rule", "nope"], 2,
     "recipe ep.rule must be one of symmetric, one-sided, bptt"),
    (["train", "--model", "ep-cnn-tiny", "--set", "optimizer.lrs=null", "--set", "ep.T2=[1]"], 2,
     "recipe ep.T2 must be an integer >= 1"),
    (["train", "--model", "ep-cnn-tiny", "--set", "optimizer.lrs=null", "--T1", "1"], 2,
     "ep.T1=1 is smaller than the 2 steps the input needs to reach the read-out (sync update)"),
    (["train", "--model", "ep-cnn-tiny", "--set", "optimizer.lrs=null", "--set", "ep=null"], 2,
     "ep-cnn-tiny trains by EP, but recipe tiny-ep has no ep settings"),
    (["train", "--model", "ep-cnn-tiny", "--recipe", "demo-ep"], 2, "or optimizer.lrs=null for one lr"),
    # distillation: the teacher (an EP-CNN trained on the same data) and the recipe's distill section
    (["train", "--model", "ep-student", "--epochs", "1"], 2, "--model ep-student is distilled from an EP-CNN: give "
     "--teacher"),
    (T + ["--teacher", "RUN"], 2, "--teacher is for --model ep-student"),
    (["train", "--teacher", "RUN", "--epochs", "1"], 2, "is not an EP-CNN but a cnn-small"),
    (["train", "--teacher", "nosuch", "--epochs", "1"], 3, "'nosuch' is neither a model name"),
    (["train", "--teacher", "ep-cnn-tiny", "--epochs", "1"], 3, "no finished training run of model 'ep-cnn-tiny'"),
    (["train", "--teacher", "FILES/garbage.safetensors"], 4, "not a safetensors checkpoint"),
    (["train", "--teacher", "RUN", "--recipe", "demo-cnn"], 2, "recipe demo-cnn has no distill section"),
    (["train", "--teacher", "RUN", "--set", "distill.temperature=0"], 2, "distill.temperature must be a number > 0"),
    (["train", "--teacher", "RUN", "--set", "distill.init=zeros"], 2, "distill.init must be one of teacher, random"),
    (["train", "--resume", "RUN", "--teacher", "RUN"], 2, "--resume continues a run with its own teacher"),
    # options that contradict each other or would be ignored
    (T + ["--set", "epochs=2"], 2, "--epochs and --set epochs both set epochs"),
    (T + ["--set", "optimizer=sgd", "--lr", "0.1"], 2, "--lr sets optimizer.lr, but --set optimizer=\"sgd\""),
    (T + ["--set", "adv.norm=linf", "--adv-train", "l2:0.5"], 2, "--adv-train and --set adv.norm both set"),
    (["train", "--resume", "RUN", "--epochs", "2", "--lr", "0.5"], 2, "drop the recipe changes (optimizer.lr)"),
    (["train", "--resume", "RUN", "--epochs", "2", "--recipe", "paper-cnn"], 2, "drop --recipe paper-cnn"),
    (["train", "--resume", "RUN", "--epochs", "2", "--model-set", "width=8"], 2, "drop --model-set"),
    (T + ["--model-set", "width=0"], 2, "leave layer features.0.weight with no weights"),
    (T + ["--model-set", "width=-3"], 2, "cannot build it with these options"),
    (T + ["--model-set", "num_classes=5"], 2, "the number of classes comes from the dataset"),
    (["train", "--model", "vit", "--model-set", "patch_size=0"], 2, "model 'vit': bad option value"),
    (A + ["-a", "cw", "--norm", "linf"], 2, "cw is an L2 attack: use --norm l2"),
    (["attack", "-m", "RUN", "-a", "art-square", "--grad-mode", "truncated:5"], 2,
     "--grad-mode truncated:5 does nothing for art-square: a black-box attack only queries the model"),
    (A[:-2] + ["--protocol", "paper", "--labels", "true"], 2, "--protocol paper fixes these settings; drop --labels"),
    (["attack", "-m", "RUN", "--protocol", "paper", "-a", "autoattack", "--steps", "3", "--queries", "20"], 2,
     "--protocol paper fixes these settings; drop --steps 3 (apgd_iter), --queries 20 (square_iter)"),
    (["attack", "-m", "RUN", "--protocol", "paper", "--steps", "3", "--no-clip", "--random-start"], 2,
     "--protocol paper fixes these settings; drop --steps 3, --random-start"),
    (A + ["--norm", "l2", "--eps", "paper-linf"], 2, "--eps paper-linf is the paper's linf grid"),
    (A + ["--unroll-sweep", ","], 2, "--unroll-sweep expects comma-separated integers"),
    (C + ["-c", "fog", "-s", "1", "--T", "5"], 2, "--T applies to relaxation models; cnn-small has no relaxation"),
    (C + ["--source", "FILES/csrc", "-c", "contrast"], 3, "expected uint8 (5N, H, W, 3)"),
    (C + ["--source", "FILES/csrc", "-c", "snow"], 3, "cannot read snow.npy or labels.npy"),
    (C + ["--source", "FILES/csrc2"], 2, "model cnn-small cannot take fog.npy's 2x2 images"),
    (C + ["--source", "FILES/csrc3"], 3, "labels.npy holds int64 labels in [99, 99]; the model has 10 classes"),
    (C + ["--export", "FILES/afile.txt"], 2, "is a file, not a folder"),
    (C + ["--export", "FILES/afile.txt/sub"], 2, "/afile.txt/sub: cannot create the folder (Not a directory)"),
    # output folders inside the store's own folders: files without a row there, which gc deletes (were exit 0)
    (["report", "-f", "md", "--out", "STORE/artifacts"], 2, "is inside the store's artifacts/ folder"),
    (["report", "--figures", "--out", "STORE/tmp/figs"], 2, "is inside the store's tmp/ folder"),
    (["report", "--curves", "--out", "STORE/artifacts/ab"], 2, "is inside the store's artifacts/ folder"),
    (C + ["--export", "STORE/cache/c10c"], 2, "is inside the store's cache/ folder"),
    (C + ["--export", "STORE/artifacts/../partial"], 2, "is inside the store's partial/ folder"),
    (C[:3] + ["--export", "FILES/exported", "--n", "0"], 2, "--n must be >= 1"),
    (C + ["--export", "FILES/exported", "-s", "2"], 2, "--export only writes corrupted images"),
    (C + ["--export", "FILES/exported", "--dataset", "nope"], 3, "dataset 'nope' not found"),
    # unused by an export, still refused (the fuzz found both accepted: the whole set written, exit 0)
    (C + ["--export", "FILES/exported", "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    (C + ["--export", "FILES/exported", "--device", "tpu"], 2, "unknown device 'tpu'"),
    # datasets a model cannot take: refused before the run opens (were RuntimeErrors in a failed run)
    (T + ["--dataset", "FILES/tiny"], 2, "model cnn-small cannot take tiny's 2x2 images"),
    (A[:2] + ["RUN"] + A[3:] + ["--dataset", "FILES/tiny"], 2, "model cnn-small cannot take tiny's 2x2 images"),
    (C[:2] + ["RUN"] + C[3:] + ["--dataset", "FILES/tiny"], 2, "model cnn-small cannot take tiny's 2x2 images"),
    (["train", "--model", "resnet18", "--epochs", "1", "--dataset", "FILES/tiny"], 2,
     "augment crop-flip (pad_mode reflect) cannot work on 2x2 images"),
    (T + ["--dataset", "FILES/oneclass"], 3, "one class (a) in train/; a classifier needs at least 2"),
    (A[:2] + ["RUN"] + A[3:] + ["--dataset", "FILES/renamed"], 2, "the model's class 0 is 'airplane' but dataset"),
    (C[:2] + ["RUN"] + C[3:] + ["--dataset", "FILES/renamed"], 2, "the model's class 0 is 'airplane' but dataset"),
    (T + ["--dataset", "FILES/splitsize"], 3, "train images are 32x32 but test images are 16x16"),
    # an empty value is not "not given"
    (T + ["--dataset", ""], 2, "--dataset is empty"),
    (T + ["--recipe", ""], 2, "--recipe is empty"),
    (T + ["--label", ""], 2, "--label is empty"),
    (T + ["--label", "a\x1b[2Jb"], 2, "--label 'a\\x1b[2Jb' has a control character"),  # reports printed it raw
    (T + ["--label", "two\nlines"], 2, "has a control character or line break"),
    (["train", "--resume", ""], 2, "--resume is empty"),
    (["train", "--model", ""], 2, "--model is empty"),
    (["train", "--teacher", ""], 2, "--teacher is empty"),
    (A + ["--grad-mode", ""], 2, "--grad-mode is empty"),
    (A + ["--dataset", ""], 2, "--dataset is empty"),
    (C + ["--source", ""], 2, "--source is empty"),
    (C + ["--export", ""], 2, "--export is empty"),
    (C + ["--reference", ""], 2, "--reference is empty"),
    # what Typer/Click parse: one line too, with where to look
    (A + ["--no-such-option"], 2, "No such option: --no-such-option (see 'epcli attack --help')"),
    (A[:-2] + ["--steps", "many"], 2, "Invalid value for '--steps'"),
    (["show"], 2, "Missing argument"),
    (["atack"], 2, "No such command 'atack'"),
    # a global option after the command: was only "No such option: --store (Possible options: --json, --sort)"
    (["runs", "--store", "FILES"], 2, "(--store is an option of epcli itself: give it before the command, 'epcli "
     "--store VALUE runs ...')"),
    (["show", "RUN", "--debug"], 2, "give it before the command, 'epcli --debug show ...')"),
]


@pytest.mark.parametrize("args,code,needle", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_input(world, args, code, needle):
    store, files = world["store"], world["files"]
    args = [world["run"] if a == "RUN" else a.replace("FILES", str(files)).replace("STORE", str(store)) for a in args]
    if args[0] == "train" and "--dataset" not in args:
        args += ["--dataset", str(world["data"])]
    before = checksum(store)
    r = invoke(*args, "--device", "cpu", store=store) if args[0] in ("train", "attack", "corrupt") and \
        "--device" not in args else invoke(*args, store=store)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == code, r.output
    errors = [ln for ln in lines if ln.startswith("error")]  # progress lines of finished stages may precede it
    assert errors == lines[-1:] and errors[0].startswith("error: ") and needle in errors[0], r.stderr
    assert "Traceback" not in r.output
    assert checksum(store) == before
    assert not (files / "PWNED").exists()  # the crafted pickle never ran
    assert not (files / "exported").exists()  # a refused --export writes nothing


def test_table_is_large_enough():
    assert len(CASES) >= 60 and {c for _, c, _ in CASES} == {2, 3, 4}


def test_refusals_that_need_more_runs(world, tmp_path):
    """Usage errors about other stored runs (a 2-epoch run, a 2-class model, a corrupt run, an EP-CNN): refused
    before a run opens, the store unchanged. On a copy of the world's store, with those runs added."""
    import shutil

    from PIL import Image
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    two = tmp_path / "twoclass"
    for split in ("train", "test"):
        for c in "ab":
            (two / split / c).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 40 if c == "a" else 200, np.uint8)).save(two / split / c / "0.png")

    def run_id(*args):
        r = invoke(*args, "--device", "cpu", "--json", store=store)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["run_id"]

    longer = run_id("train", "--resume", world["run"], "--epochs", 2, "--dataset", world["data"])
    binary = run_id("train", "--model", "cnn-small", "--epochs", 1, "--dataset", two)
    fog = run_id("corrupt", "--model", world["run"], "-c", "fog", "-s", 1, "--n", 4)
    ep_run = run_id("train", "--model", "ep-cnn-tiny", "--epochs", 1, "--set", "optimizer.lrs=null", "--T1", 3,
                    "--T2", 2, "--dataset", world["data"])
    cases = [
        (["train", "--resume", longer, "--epochs", 1, "--dataset", world["data"]], "already trained 2 epochs"),
        (["train", "--resume", longer, "--dataset", world["data"]],
         f"run {longer} finished all its 2 epochs: nothing to resume"),
        (["train", "--resume", longer, "--epochs", 2, "--dataset", world["data"]],
         f"run {longer} finished all its 2 epochs: nothing to resume"),
        (["train", "--resume", longer, "--epochs", 3, "--seed", 5, "--dataset", world["data"]],
         "cannot resume with --seed 5: the run was seeded 0"),
        (["train", "--resume", longer, "--epochs", 3, "--model", "vit", "--dataset", world["data"]],
         "cannot resume a cnn-small run as --model vit"),
        (A[:2] + [ep_run] + A[3:] + ["--grad-mode", "truncated:1"], "an unroll of 1 steps is shorter than the 2"),
        (A[:2] + [ep_run] + A[3:] + ["--unroll-sweep", "1,5"], "an unroll of 1 steps is shorter than the 2"),
        (A[:2] + [binary] + A[3:] + ["-a", "apgd-t"], "apgd-t needs at least 3 classes"),
        (A[:2] + [binary] + A[3:] + ["-a", "autoattack"], "autoattack needs at least 3 classes"),
        (A[:2] + [binary] + A[3:] + ["-a", "apgd-ce", "--targeted"], "apgd-ce --targeted needs at least 3 classes"),
        (A[:2] + [world["run"]] + A[3:] + ["--grad-mode", f"transfer:{binary}"],
         "the transfer surrogate cnn-small has 2 classes, the attacked model 10"),
        (C[:2] + [world["run"]] + C[3:] + ["-c", "contrast", "--reference", fog],
         "has none of the requested corruption x severity cells"),
    ]
    for args, needle in cases:
        before = checksum(store)
        r = invoke(*args, "--device", "cpu", store=store)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and ln.startswith("error")]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
        assert checksum(store) == before


def test_recipe_is_refused_before_the_dataset_is_read(world, monkeypatch):
    # a full CIFAR-10 decoded first (~9 s the first time, 2 contended cores) before a bad --set was refused
    from epcli.data import dataset_name, load_dataset
    from epcli.pipelines import train as pipeline
    assert dataset_name(None) == "cifar10-mini" and dataset_name("x/cifar10-jpeg.tar.xz") == "cifar10-jpeg"
    assert dataset_name(str(world["data"])) == load_dataset(str(world["data"])).name

    def unread(*args, **kwargs):
        raise AssertionError("the dataset was read before the recipe was checked")
    monkeypatch.setattr(pipeline, "load_dataset", unread)
    r = invoke(*T, "--dataset", world["data"], "--set", "optimizer.betas=[2]", "--device", "cpu", store=world["store"])
    assert r.exit_code == 2 and r.stderr.startswith("error: optimizer betas must be two numbers"), r.output


def test_empty_store_option_is_refused(tmp_path, monkeypatch, world):
    # `--store ""` was the current folder: a train wrote epcli.db, artifacts/ and cache/ into it
    monkeypatch.chdir(tmp_path)
    for cmd in (T + ["--dataset", world["data"], "--device", "cpu"], ["runs"]):
        r = runner.invoke(app, ["--store", ""] + [str(a) for a in cmd], catch_exceptions=False)
        assert r.exit_code == 2 and r.stderr.startswith("error: --store is empty") and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_store_folder_mistakes(tmp_path, world):
    # a typo in --store: reading commands do not create a store
    typo = tmp_path / "sotre"
    for cmd in (["runs"], ["show", "x"], ["report"], ["trace", "x"]):
        r = invoke(*cmd, store=typo)
        assert r.exit_code == 5 and "no epcli store" in r.stderr and r.stderr.count("\n") == 1
        assert not typo.exists()
    # commands that write create it, and say so
    r = invoke("attack", "--model", "nosuch", "--device", "cpu", store=typo)
    assert r.exit_code == 3 and "created a new store" in r.stderr
    # a foreign SQLite file with a `runs` table is refused and left byte-for-byte untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    con = sqlite3.connect(foreign / "epcli.db")
    con.execute("CREATE TABLE runs (id TEXT, distance REAL)")
    con.execute("INSERT INTO runs VALUES ('monday', 5.2)")
    con.commit()
    con.close()
    before = (foreign / "epcli.db").read_bytes()
    for cmd in (["runs"], ["train", "--model", "cnn-small", "--epochs", "1", "--dataset", world["data"]]):
        r = invoke(*cmd, store=foreign)
        assert r.exit_code == 5 and "not an epcli store" in r.stderr and r.stderr.count("\n") == 1
    assert (foreign / "epcli.db").read_bytes() == before
    assert sorted(p.name for p in foreign.iterdir()) == ["epcli.db"]  # no -wal, -shm, .lock, tmp/


def test_markdown_report_of_hostile_labels_is_inert(world, tmp_path):
    import shutil
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    hostile = '<script>alert(1)</script><img src=x onerror=alert(2)>[click](javascript:alert(3))'
    conn = sqlite3.connect(store / "epcli.db")
    conn.execute("UPDATE runs SET config = json_set(config, '$.label', ?), model = ? WHERE kind = 'train'",
                 [hostile, "[x](javascript:alert(4))"])
    conn.commit()
    conn.close()
    r = invoke("report", "-f", "md", store=store)
    assert r.exit_code == 0, r.output
    import re
    assert "<script" not in r.stdout and "<img" not in r.stdout
    assert not re.search(r"(?<!\\)\]\(javascript:", r.stdout)  # no link: its brackets are escaped
    assert "&lt;script&gt;" in r.stdout and "\\[click\\](javascript:" in r.stdout  # still shown, inert


def test_a_lost_outcomes_file_does_not_fail_later_attacks(world, tmp_path):
    # every attack compares itself with the model's stored attacks: one deleted per-example file made every later
    # attack of the model fail at its end (FileNotFoundError, a failed run, exit 1); compare names the lost file
    import shutil
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    attack = A[:2] + [world["run"]] + A[3:] + ["--device", "cpu", "--json"]
    r = invoke(*attack, store=store)
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)["run_id"]
    s = Store(store)
    lost = s.artifact_path(s.artifacts_of(first, role="output", kind="per-example")[0]["sha256"])
    s.close()
    lost.unlink()
    r = invoke(*attack, store=store)
    assert r.exit_code == 0, r.output
    second = json.loads(r.stdout)["run_id"]
    lost.unlink()  # the second run's outcomes are the same bytes: content-addressed, the same file came back
    before = checksum(store)
    r = invoke("compare", first, second, store=store)
    assert r.exit_code == 3 and r.stderr.startswith(f"error: run {first}'s per-example outcomes") and \
        "are missing from the store" in r.stderr and r.stderr.count("\n") == 1, r.output
    assert checksum(store) == before


def test_a_stored_checkpoint_replaced_by_garbage(world, tmp_path):
    # the store's own checkpoint file damaged on disk: attack and corrupt by run id or by model name are exit 4
    # before any run opens (a guard: this already held when the store commands were probed)
    import shutil
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    s = Store(store)
    ckpt = s.artifact_path(s.artifacts_of(world["run"], kind="checkpoint")[0]["sha256"])
    s.close()
    ckpt.write_bytes(b"\x00garbage" * 64)
    before = checksum(store)
    for args in (A[:2] + [world["run"]] + A[3:], A, C + ["-c", "fog"]):
        r = invoke(*args, "--device", "cpu", store=store)
        assert r.exit_code == 4 and r.stderr.startswith("error: ") and "is not a safetensors checkpoint" in r.stderr \
            and r.stderr.count("\n") == 1, r.output
    assert checksum(store) == before
