"""torchrun on the CPU (gloo): 2 processes train the same model as 1 process would, and attack and corrupt
with the same per-example outcomes (sharded evaluation, epcli/pipelines/shard.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_imagefolder
from safetensors.torch import load_file

from epcli import api, distributed
from epcli.store import Store

# Same global batch, same order, no augmentation: the 2-process run is the 1-process run up to float rounding.
# 160 train images in batches of 25: six of 25 (12 + 13 per rank) and a last one of 10 (5 + 5).
COMMON = ["--epochs", "1", "--batch-size", "25", "--set", "augment=null", "--seed", "3", "--device", "cpu"]
EP = ["--T1", "8", "--T2", "4", "--set", "optimizer.lrs=null"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, mini):
    """160 train + 100 test real CIFAR-10 images as an ImageFolder tree (lossless PNG copies)."""
    return write_imagefolder(tmp_path_factory.mktemp("data") / "cifar-tiny", mini, 16, 10)


def _torchrun(args, nproc=2, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EPCLI_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _final_weights(store):
    s = Store(store)
    runs = s.runs(kind="train")
    assert len(runs) == 1 and runs[0]["status"] == "finished", runs
    ck = s.artifacts_of(runs[0]["id"], role="output", kind="checkpoint")
    assert [a["name"] for a in ck] == ["final"]
    tensors = load_file(str(s.artifact_path(ck[0]["sha256"])))
    return runs[0], {k: v for k, v in tensors.items() if k.startswith("model.")}


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _assert_same_weights(two, one, model, tol, **options):
    """Equal up to float rounding, where training moved the weights far more than the tolerance.

    EP's gradient is a difference of energies divided by 2*beta: rounding noise is amplified. Measured on
    ep-cnn-tiny: 1 vs 2 processes differ by at most 4e-5 after 7 steps, exactly as much as 1 process run
    with 1 vs 2 threads does. Backprop differs by ~1e-7.
    """
    from epcli.models import create_model
    torch.manual_seed(3)  # api.train seeds the initial weights with the run's seed
    init = {f"model.{k}": v for k, v in create_model(model, num_classes=10, **options).state_dict().items()}
    assert _max_diff(two, one) < tol
    assert _max_diff(one, init) > 50 * tol  # the comparison is not trivially passed by untrained weights


def _cli_one_process(tmp_path, data, model, extra):
    from typer.testing import CliRunner
    from epcli.cli import app
    store = tmp_path / "one"
    r = CliRunner().invoke(app, ["--store", str(store), "train", "--model", model, "--dataset", str(data),
                                 *COMMON, *extra, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return store


@pytest.mark.parametrize("model,extra", [("ep-cnn-tiny", EP), ("cnn-small", [])])
def test_torchrun_cli_trains_one_model(tmp_path, small_data, model, extra):
    store = tmp_path / "two"
    out = _torchrun(["-m", "epcli", "--store", str(store), "train", "--model", model, "--dataset",
                     str(small_data), *COMMON, *extra, "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)  # rank 0 alone prints the result
    assert res["world_size"] == 2 and res["epochs"] == 1
    run, two = _final_weights(store)
    assert run["id"] == res["run_id"] and run["config"]["world_size"] == 2
    assert [m["value"] for m in Store(store).metrics(run["id"], name="test_acc")] == [res["test_acc"]]
    if model == "cnn-small":
        # BatchNorm normalises per rank on the CPU (SyncBatchNorm is CUDA-only): the run is a valid
        # data-parallel run but not bit-equal to one process. The EP-CNN has no BatchNorm.
        return
    one_run, one = _final_weights(_cli_one_process(tmp_path, small_data, model, extra))
    assert one_run["config"]["world_size"] == 1
    _assert_same_weights(two, one, model, tol=2e-4)
    assert res["test_acc"] == pytest.approx(one_run["summary"]["test_acc"])


SCRIPT = """
import sys
from epcli import api, distributed
from epcli.store import Store
store = Store(sys.argv[1]) if distributed.is_main() else None
res = api.train(model="cnn", model_options={"channels": [8, 8, 8, 8], "batchnorm": False}, dataset=sys.argv[2],
                overrides={"epochs": 1, "batch_size": 25, "augment": None}, seed=3, device="cpu", store=store)
assert res["world_size"] == distributed.world_size() == 2, res
sys.stdout.write(f"rank {distributed.rank()} {res['run_id']}\\n")  # one write: atomic on a pipe
sys.stdout.flush()
"""


def test_torchrun_api_backprop_equals_one_process(tmp_path, small_data):
    """The backprop path (no BatchNorm): the 2-process weights are the 1-process weights."""
    script = tmp_path / "train_two.py"
    script.write_text(SCRIPT)
    out = _torchrun([str(script), str(tmp_path / "two"), str(small_data)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("rank ") == 2 and len(set(out.stdout.split())) == 4  # both ranks: one run id
    _, two = _final_weights(tmp_path / "two")
    api.train(model="cnn", model_options={"channels": [8, 8, 8, 8], "batchnorm": False}, dataset=str(small_data),
              overrides={"epochs": 1, "batch_size": 25, "augment": None}, seed=3, device="cpu",
              store=Store(tmp_path / "one"))
    _, one = _final_weights(tmp_path / "one")
    _assert_same_weights(two, one, "cnn", tol=1e-5, channels=[8, 8, 8, 8], batchnorm=False)


def test_shard_range_is_a_partition():
    for n in (0, 1, 2, 3, 10, 25, 200, 201):
        for world in (1, 2, 3, 4, 8):
            ranges = [distributed.shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint, in rank order
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    with pytest.raises(ValueError):
        distributed.shard_range(10, 2, 2)


def test_not_launched_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched() and not distributed.init("cpu")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = [torch.ones(3)]
    assert distributed.all_reduce_mean_(t)[0].tolist() == [1.0, 1.0, 1.0]
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_object(5) == [5]
    assert distributed.device_for("cuda") == "cuda"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and (distributed.rank(), distributed.world_size()) == (2, 4)
    assert not distributed.is_main() and distributed.device_for("cuda:0") == "cuda:1"
    assert distributed.device_for("cpu") == "cpu"


def test_sync_grads_weighs_uneven_slices():
    """Slice means weighted by n_r * W / N, averaged over W ranks, are the global batch's mean; a parameter
    with no gradient anywhere keeps None. (No process group here: the all_reduce is the identity.)"""
    from epcli.train import _sync_grads
    torch.manual_seed(0)
    g = torch.randn(25, 4)
    world, parts = 2, [distributed.shard_range(25, r, 2) for r in range(2)]
    total = torch.zeros(4)
    for lo, hi in parts:
        p, unused = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
        p.grad = g[lo:hi].mean(0).clone()
        loss = _sync_grads([p, unused], torch.tensor(1.0), hi - lo, 25, world)
        assert unused.grad is None and float(loss) == pytest.approx((hi - lo) * world / 25)
        total += p.grad
    assert torch.allclose(total / world, g.mean(0), atol=1e-6)


# --- sharded evaluation: attacks and corruptions under torchrun (epcli/pipelines/shard.py) ------------------

def _memorised_folder(root, dataset, per_class=10):
    """An ImageFolder whose test split is its train split (real images): a few epochs of cnn-small then classify
    most test images correctly, so the attacks below have many points to attack and their outcomes are mixed."""
    from PIL import Image
    for split in ("train", "test"):
        for c, name in enumerate(dataset.classes):
            (root / split / name).mkdir(parents=True)
            for i in (dataset.train_y == c).nonzero().flatten()[:per_class].tolist():
                Image.fromarray(dataset.train_x[i].permute(1, 2, 0).numpy()).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory, mini):
    """A store with a finished cnn-small (most of its 100 test images right) and ep-cnn-small training run."""
    root = tmp_path_factory.mktemp("shard")
    data = _memorised_folder(root / "data", mini)
    store = Store(root / "store")
    common = {"batch_size": 20, "augment": None}
    store.cnn = api.train(model="cnn-small", dataset=str(data), store=store, device="cpu", seed=1,
                          overrides={"epochs": 6, **common})
    store.ep = api.train(model="ep-cnn-small", dataset=str(data), store=store, device="cpu", seed=1,
                         overrides={"epochs": 2, **common, "ep": {"T1": 8, "T2": 4}})
    store.data = data
    return store


def _outcomes(store, run_id):
    """The per-example artifact of an attack or corruption run (every tensor in it)."""
    arts = store.artifacts_of(run_id, role="output", kind="per-example")
    assert len(arts) == 1
    return load_file(str(store.artifact_path(arts[0]["sha256"])))


def _assert_same_outcomes(store, run_a, run_b):
    a, b = _outcomes(store, run_a), _outcomes(store, run_b)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between {run_a} and {run_b}"
    return a


# Attacks through the API: chunks of 9 (9, 9, 9, 3: two rounds, the second uneven in size) in batches of 5
# (so each chunk's generators run over two batches), and a corruption sweep in batches of 16 (rank 0 gets
# batch 0, rank 1 batches 1-2; CHUNK = 100 examples share one generator, cut across both ranks).
ATTACKS = {
    "pgd": dict(eps="2/255", params={"steps": 3}),
    "apgd-ce": dict(eps="2/255", params={"steps": 3}),
    "square": dict(eps="4/255", params={"n_queries": 30}),
    # each member runs on the points of its batch still robust: per example, inside the chunk
    "autoattack": dict(eps="4/255", params={"steps": 2, "n_target_classes": 2, "n_queries": 20}),
}
ATTACK_COMMON = dict(n=30, chunk=9, batch_size=5, seed=5, device="cpu", strength=False, checks=False)
CORRUPT = dict(names=["gaussian_noise", "glass_blur", "contrast"], severities=[2, 5], n=40, batch_size=16, seed=5,
               device="cpu")

SHARD_SCRIPT = """
import json, sys
from epcli import api, distributed
from epcli.store import Store
ATTACKS, ATTACK_COMMON, CORRUPT = json.loads(sys.argv[3])
store = Store(sys.argv[1]) if distributed.is_main() else None
runs = {}
for name, kw in ATTACKS.items():
    runs[name] = api.attack(model=sys.argv[2], attack=name, store=store, **kw, **ATTACK_COMMON)
runs["corrupt"] = api.corrupt(model=sys.argv[2], store=store, **CORRUPT)
runs["official"] = api.corrupt(model=sys.argv[2], store=store, source=sys.argv[4], **CORRUPT)
if distributed.is_main():
    sys.stdout.write(json.dumps({k: {"run_id": r["run_id"], "shards": r.get("shards")} for k, r in runs.items()}))
"""


@pytest.mark.slow
def test_torchrun_attacks_and_corruptions_equal_one_process(tmp_path, eval_store):
    """PGD, APGD-CE, Square, AutoAttack and a corruption sweep (generated and from .npy files) on 2 gloo
    processes: every per-example outcome equals one process's, and both ranks did part of the work."""
    model = eval_store.cnn["run_id"]
    official = tmp_path / "official"
    api.export_corruptions(directory=str(official), names=CORRUPT["names"], dataset=str(eval_store.data),
                           n=CORRUPT["n"], seed=CORRUPT["seed"], store=eval_store)
    script = tmp_path / "shard_two.py"
    script.write_text(SHARD_SCRIPT)
    out = _torchrun([str(script), str(eval_store.root), model, json.dumps([ATTACKS, ATTACK_COMMON, CORRUPT]),
                     str(official)])
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout)
    for name, kw in ATTACKS.items():
        shards = two[name]["shards"]
        assert shards["world_size"] == 2 and shards["chunks"] == [2, 2], shards  # 4 chunks, 2 rounds
        assert min(shards["forward_passes"]) > 0
        one = api.attack(model=model, attack=name, store=eval_store, **kw, **ATTACK_COMMON)
        assert "shards" not in one
        res = _assert_same_outcomes(eval_store, one["run_id"], two[name]["run_id"])
        robust = res[[k for k in res if k.startswith("robust_")][0]]
        assert res["clean_correct"].sum() > 8 and 0 < robust.sum() < res["clean_correct"].sum(), name
    assert two["corrupt"]["shards"] == {"world_size": 2, "examples": [16, 24]}
    assert two["official"]["shards"] == {"world_size": 2, "corruptions": [2, 1]}
    for kind, extra in (("corrupt", {}), ("official", {"source": str(official)})):
        one = api.corrupt(model=model, store=eval_store, **CORRUPT, **extra)
        res = _assert_same_outcomes(eval_store, one["run_id"], two[kind]["run_id"])
        assert len(res) == 1 + len(CORRUPT["names"]) * len(CORRUPT["severities"])
        assert len({int(v.sum()) for k, v in res.items() if "/" in k}) > 1  # outcomes vary across cells


@pytest.mark.slow
def test_torchrun_cli_attack_equals_one_process(tmp_path, eval_store):
    """The issue's command: `torchrun --nproc_per_node 2 -m epcli attack -m ep-cnn-small --n 64 --device cpu`
    with `--chunk 8` gives the per-example results of the same command in one process: 8 chunks of 8 images,
    4 per rank (the default chunk for 64 images is one chunk of 64: at least one batch). eps 1/255 so that the
    outcomes are mixed (at 8/255 nothing survives on this briefly trained model)."""
    from typer.testing import CliRunner

    from epcli.cli import app
    args = ["attack", "-m", "ep-cnn-small", "--n", "64", "--chunk", "8", "--device", "cpu", "--eps", "1/255",
            "--json"]
    out = _torchrun(["-m", "epcli", "--quiet", "--store", str(eval_store.root), "--", *args])
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout)  # rank 0 alone prints
    shards = eval_store.get_run(two["run_id"])["summary"]["shards"]
    assert shards["chunks"] == [4, 4] and min(shards["forward_passes"]) > 0
    r = CliRunner().invoke(app, ["--quiet", "--store", str(eval_store.root), *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    one = json.loads(r.stdout)
    assert one["model_run_id"] == two["model_run_id"] == eval_store.ep["run_id"]
    res = _assert_same_outcomes(eval_store, one["run_id"], two["run_id"])
    assert 0 < res["robust_0.00392156862745098"].sum() < res["clean_correct"].sum()
    assert one["results"] == two["results"] and one["clean_acc"] == two["clean_acc"]
    assert {c["check"] for c in two["checks"]} == {c["check"] for c in one["checks"]} >= {"strength", "monotone"}


RESUME_SCRIPT = """
import json, sys
import epcli.attacks as A
from epcli import api, distributed
from epcli.store import Store
kw, interrupt = json.loads(sys.argv[3]), sys.argv[4] == "interrupt"
real, calls = A.evaluate, []

def counting(*a, **k):  # rank 0 is interrupted (as by Ctrl-C) when it starts its second chunk
    calls.append(len(a[2]))
    if interrupt and distributed.rank() == 0 and len(calls) == 2:
        raise KeyboardInterrupt
    return real(*a, **k)

A.evaluate = counting
store = Store(sys.argv[1]) if distributed.is_main() else None
res = api.attack(model=sys.argv[2], store=store, **kw)
sys.stdout.write(json.dumps({"rank": distributed.rank(), "calls": calls, "result": res}) + "\\n")
"""


@pytest.mark.slow
def test_interrupted_sharded_attack_resumes_to_the_same_result(tmp_path, eval_store):
    """Rank 0 stops in the second round: the first round's chunks (one per rank) are on disk in rank 0's
    partial folder; the re-run attacks only the other two chunks and ends with the 1-process result."""
    kw = dict(attack="pgd", eps="2/255", params={"steps": 3}, n=40, chunk=10, batch_size=5, seed=7,
              device="cpu", strength=False, checks=False)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    model = eval_store.cnn["run_id"]
    out = _torchrun([str(script), str(eval_store.root), model, json.dumps(kw), "interrupt"])
    assert out.returncode != 0
    stopped = eval_store.runs(kind="attack", limit=1)[0]
    assert stopped["status"] == "interrupted" and stopped["config"]["seed"] == 7
    files = sorted(p.name for p in (eval_store.root / "partial").rglob("chunk-*.safetensors"))
    assert files == ["chunk-00000.safetensors", "chunk-00001.safetensors"]
    out = _torchrun([str(script), str(eval_store.root), model, json.dumps(kw), "resume"])
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in out.stdout.splitlines()), key=lambda d: d["rank"])
    assert [d["calls"] for d in ranks] == [[10], [10]]  # chunks 2 and 3 only
    resumed = ranks[0]["result"]
    assert resumed["shards"]["resumed_chunks"] == 2 and ranks[1]["result"]["run_id"] == resumed["run_id"]
    assert not list((eval_store.root / "partial").rglob("*.safetensors"))  # cleaned up on success
    fresh = api.attack(model=model, store=eval_store, **kw)  # one process, from scratch
    res = _assert_same_outcomes(eval_store, fresh["run_id"], resumed["run_id"])
    assert 0 < res["robust_0.00784313725490196"].sum() < res["clean_correct"].sum()


def test_corruption_span_is_the_slice_of_the_whole_evaluation(mini):
    """corruptions.evaluate(span=...) (one rank's share) reproduces the whole evaluation's outcomes there."""
    from epcli import corruptions as C
    from epcli.models import create_model
    from epcli.pipelines.shard import batch_span
    torch.manual_seed(0)
    net = create_model("cnn-small", num_classes=10).eval()
    x, y = mini.test_x[:30], mini.test_y[:30]
    kw = dict(names=["shot_noise", "elastic_transform"], severities=[3], seed=2, batch_size=8)
    whole = C.evaluate(net, x, y, **kw)
    pieces = [batch_span(30, 8, r, 3) for r in range(3)]
    assert pieces == [(0, 8), (8, 16), (16, 30)]  # 4 batches over 3 ranks
    for lo, hi in pieces:
        part = C.evaluate(net, x, y, span=(lo, hi), **kw)
        assert torch.equal(part["clean_correct"][lo:hi], whole["clean_correct"][lo:hi])
        for cell, ok in whole["correct"].items():
            assert torch.equal(part["correct"][cell][lo:hi], ok[lo:hi])
            assert not part["correct"][cell][:lo].any() and not part["correct"][cell][hi:].any()
    with pytest.raises(Exception, match="batch boundary"):
        C.evaluate(net, x, y, span=(3, 30), **kw)


def test_batch_span_covers_whole_batches():
    from epcli.pipelines.shard import batch_span
    for n, bs in ((0, 4), (1, 4), (40, 16), (100, 7), (10000, 500)):
        for world in (1, 2, 3, 8):
            spans = [batch_span(n, bs, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(lo % bs == 0 for lo, _ in spans)


def test_sharded_attack_progress_never_runs_ahead_of_its_round(tmp_path, monkeypatch):
    """Rank 0 extrapolates its own chunk to the world; in a round with fewer chunks than ranks (the last) or a
    short chunk that overshot the round, so the stage "finished" early, then restarted at the true count and
    finished twice. Counts now never pass the round in flight, never go back, and end once."""
    import io

    from epcli.pipelines import shard
    from epcli.progress import StageProgress
    monkeypatch.setattr(shard.dist, "world_size", lambda: 2)
    monkeypatch.setattr(shard.dist, "broadcast_object", lambda obj=None, src=0: obj)
    eps = 8 / 255

    def rounds(net, surrogate, x, y, job, device, on_step=None, on_result=None):  # two ranks at the same pace
        from epcli.pipelines.attack import _chunks
        bounds = _chunks(job["n"], job["chunk"])
        pending = job["pending"]
        for i in range(0, len(pending), 2):
            turn = pending[i:i + 2]
            lo, hi = bounds[turn[0]]
            for frac in (0.5, 1.0):
                on_step({"eps": eps, "lo": 0, "hi": hi - lo, "fraction": frac, "exact": True})
            for rank, k in enumerate(turn):
                size = bounds[k][1] - bounds[k][0]
                on_result(rank, k, {"robust": {eps: torch.zeros(size, dtype=torch.bool)},
                                    "clean_correct": torch.ones(size, dtype=torch.bool)})

    monkeypatch.setattr(shard, "_attack_rounds", rounds)
    calls = []
    buf = io.StringIO()
    with StageProgress(live=False, stream=buf, every=0) as p:
        def progress(task, done, total, info=None):
            calls.append(done)
            p(task, done, total, info)
        shard.attack_in_chunks(None, torch.zeros(10, 1), torch.zeros(10, dtype=torch.long), chunk=4,
                               partial=tmp_path / "partial", progress=progress, task="pgd {eps}", seed=0,
                               eps_list=[eps], device="cpu")
    assert calls == sorted(calls) and calls[-1] == 10 and calls.count(10) == 1, calls
    assert len(buf.getvalue().splitlines()) == 1  # one finished line
