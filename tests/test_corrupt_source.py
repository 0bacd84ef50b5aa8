"""`epcli corrupt --source`: the official-layout path through the CLI (JSON, table, store), and the promise that
generated, exported-then-read and official files give the same per-example outcomes."""
import json
import os
import re
import stat

import numpy as np
import pytest
import torch
from conftest import write_imagefolder
from safetensors.torch import load_file
from typer.testing import CliRunner

from epcli.cli import app
from epcli.store import Store

runner = CliRunner()
NAMES = ("contrast", "motion_blur", "spatter")


def invoke(*args, store):
    return runner.invoke(app, ["--store", str(store)] + [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini):
    data = write_imagefolder(tmp_path_factory.mktemp("data") / "cifar-small", mini, 20, 10)
    store = tmp_path_factory.mktemp("store")
    r = invoke("train", "--model", "cnn-small", "--dataset", data, "--epochs", 1, "--json", "--device", "cpu",
               store=store)
    assert r.exit_code == 0, r.output
    return store, data, json.loads(r.stdout)["run_id"]


def outcomes(store, run_id):
    s = Store(store)
    art = s.artifacts_of(run_id, role="output", kind="per-example")[0]
    return load_file(str(s.artifact_path(art["sha256"])))


def test_export_then_source_equals_generate(trained, tmp_path):
    store, data, run = trained
    out = tmp_path / "c10c"
    flags = [a for c in NAMES for a in ("-c", c)]
    r = invoke("corrupt", "--export", out, "--dataset", data, "--n", 40, "--seed", 3, *flags, "--json",
               store=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_examples"] == 40
    for f in out.iterdir():
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
    r = invoke("corrupt", "--model", run, "--dataset", data, "--n", 40, "--seed", 3, *flags, "--json",
               store=store)
    assert r.exit_code == 0, r.output
    gen = json.loads(r.stdout)
    r = invoke("corrupt", "--model", run, "--source", out, "--json", store=store)
    assert r.exit_code == 0, r.output
    src = json.loads(r.stdout)  # JSON on stdout, the table and the note on stderr
    assert src["clean_from"] == "clean.npy" and src["source"] == str(out) and src["n_examples"] == 40
    assert src["clean_acc"] == gen["clean_acc"] and src["cells"] == gen["cells"]
    cells = {f"{c['corruption']}/{c['severity']}": c["acc"] for c in src["cells"]}  # docs/cli.md JSON schema
    assert set(cells) == {f"{c}/{s}" for c in NAMES for s in range(1, 6)}
    a, b = outcomes(store, gen["run_id"]), outcomes(store, src["run_id"])
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    s = Store(store)
    run_row = s.get_run(src["run_id"])
    assert run_row["status"] == "finished" and run_row["dataset"] == f"official:{out}"
    stored = {(m["corruption"], m["severity"]): m["value"] for m in s.metrics(src["run_id"], name="corruption_acc")}
    assert round(stored[("spatter", 3)], 4) == cells["spatter/3"]  # JSON: fractions rounded to 4 decimals
    assert round(s.metrics(src["run_id"], name="clean_acc")[0]["value"], 4) == src["clean_acc"]
    # the table: one row per corruption, severities as columns
    r = invoke("corrupt", "--model", run, "--source", out, "-c", "contrast", "-s", 2, store=store)
    assert r.exit_code == 0, r.output
    assert "contrast" in r.output and "s2" in r.output and re.search(r"clean \d+\.\d\d%", r.output)


def test_source_without_clean_images_reports_na(trained, tmp_path):
    store, data, run = trained
    out = tmp_path / "c10c"
    r = invoke("corrupt", "--export", out, "--dataset", data, "--n", 12, "-c", "fog", store=store)
    assert r.exit_code == 0, r.output
    (out / "clean.npy").unlink()  # like the published folders: no clean images, labels not our test set's
    r = invoke("corrupt", "--model", run, "--source", out, "--json", store=store)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["clean_acc"] is None and res["clean_from"] is None and len(res["cells"]) == 5
    assert "clean n/a" in r.output


def test_source_official_layout_uses_the_matching_test_set(trained, tmp_path, mini):
    """A CIFAR-10-C-style folder whose labels are the dataset's test labels in order: clean accuracy is that of
    the dataset's test images (the published folders follow the CIFAR-10 test set's order)."""
    store, data, run = trained
    from epcli.data import load_dataset
    ds = load_dataset(str(data))
    out = tmp_path / "official"
    out.mkdir()
    x = ds.test_x.permute(0, 2, 3, 1).numpy()
    np.save(out / "brightness.npy", np.concatenate([x] * 5))
    np.save(out / "labels.npy", np.tile(ds.test_y.numpy(), 5).astype(np.uint8))
    r = invoke("corrupt", "--model", run, "--source", out, "--dataset", data, "--json", store=store)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["clean_from"].endswith("test set (labels match)")
    # the "corrupted" images are the clean ones
    assert all(c["acc"] == res["clean_acc"] for c in res["cells"])
