"""The device check's own logic on the CPU: the accuracy probe's epoch plan, and that a probe run is exactly the
run of its recipe with the planned epoch count (bench/bench_probe.py). The whole script runs in CI as
`make device-smoke`; the GPU run is documented in docs/benchmarks.md."""

import importlib.util
from pathlib import Path

import pytest
import torch

from epcli.data import Dataset, subset
from epcli.models import create_model
from epcli.train import fit, resolve_recipe

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


probe = load("bench_probe")


@pytest.mark.parametrize("elapsed,last,budget,want", [
    (10.0, 10.0, 180.0, 12),  # 17 more would fit: capped by the recipe's 12
    (100.0, 100.0, 180.0, 1),  # the warm-up epoch took 100 s: 80 s left holds no other
    (30.0, 20.0, 95.0, 4),  # 65 s left: three 20-s epochs
    (200.0, 20.0, 95.0, 1),  # over budget already: the warm-up only
])
def test_plan_epochs(elapsed, last, budget, want):
    assert probe.plan_epochs(12, 1, elapsed, last, budget) == want


def test_warmup_epochs_follow_the_schedule():
    assert probe.warmup_epochs(resolve_recipe("fast-cnn", {})) == 2
    assert probe.warmup_epochs(resolve_recipe("fast-ep", {})) == 1
    assert probe.warmup_epochs(resolve_recipe("demo-cnn", {"epochs": 3})) == 1  # no warm-up: the first epoch


def test_planned_run_is_the_recipe_run_with_that_many_epochs(mini):
    # warm-up-cosine: 1 warm-up epoch, then 2 more decided after it; equals a plain 3-epoch run of the recipe,
    # and differs from the 5-epoch run the recipe names (the decay follows the planned count)
    tx, ty, _ = subset(mini.train_x, mini.train_y, 96, seed=0)
    vx, vy, _ = subset(mini.test_x, mini.test_y, 40, seed=0)
    ds = Dataset("small", mini.classes, tx, ty, vx, vy)
    recipe = resolve_recipe("demo-cnn", {"epochs": 5, "batch_size": 32, "augment": None,
                                         "schedule": {"name": "warmup-cosine", "warmup_epochs": 1}})
    torch.manual_seed(0)
    init = create_model("cnn-small", width=4).state_dict()

    def fresh():
        m = create_model("cnn-small", width=4)
        m.load_state_dict(init)
        return m

    seen = []
    planned_model = fresh()
    hist, planned = probe.train_planned(planned_model, ds, recipe, "cpu", 3, None,
                                        lambda h, elapsed: seen.append(len(h)) or 3)
    assert seen == [1] and planned == 3 and len(hist) == 3
    plain = fresh()
    fit(plain, ds, {**recipe, "epochs": 3}, device="cpu", seed=3)
    for (k, a), b in zip(plain.state_dict().items(), planned_model.state_dict().values()):
        assert torch.equal(a, b), k
    five = fresh()
    fit(five, ds, recipe, device="cpu", seed=3, max_epochs=3)
    assert any(not torch.equal(a, b) for a, b in zip(five.state_dict().values(), plain.state_dict().values()))


def test_the_cuda_tests_collect_on_an_image_without_the_test_extras(tmp_path):
    """The GPU image has torch, timm, typer, rich, safetensors, matplotlib, pytest and hypothesis (and the device
    check installs sqlite-utils and torchattacks), not the test extras. pytest stops at any collection error, so
    one test file importing an extra at its top would cancel every CUDA test: collect them with the extras
    blocked (as the device check does) and find no error."""
    import subprocess
    import sys
    blocked = ("jsonschema", "scipy", "cv2", "art", "autoattack", "multiprocess", "skimage")
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {blocked!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not on the GPU image)')\n"
        "sys.meta_path.insert(0, Block())\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                          "no:cacheprovider", "tests"], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "error" not in out.stdout.lower().split("tests collected")[-1], out.stdout[-2000:]
    assert "not on the GPU image" in out.stdout  # the block did bite: some modules skipped for it
