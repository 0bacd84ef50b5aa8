import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from epcli.data import CIFAR10_CLASSES, batches, crop_flip, load_dataset, subset
from epcli.errors import DatasetError


def test_embedded_default(mini, tmp_path):
    assert mini.name == "cifar10-mini" and mini.classes == CIFAR10_CLASSES
    assert mini.train_x.shape == (5000, 3, 32, 32) and mini.train_x.dtype == torch.uint8
    assert mini.test_x.shape == (1000, 3, 32, 32)
    assert mini.train_y.bincount().tolist() == [500] * 10 and mini.test_y.bincount().tolist() == [100] * 10
    # real photographs, not noise: neighbouring pixels are strongly correlated
    x = mini.test_x.float()
    assert torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1] > 0.8
    again = load_dataset(None, cache_dir=tmp_path)  # fresh cache dir: decoded again, identical content
    assert again.sha256 == mini.sha256 and torch.equal(again.test_x, mini.test_x)
    assert list(tmp_path.glob("cifar10-mini-*.safetensors"))


def _write_folder(root, n=3, size=8):
    rng = np.random.default_rng(0)
    imgs = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / cls / f"{i}.png")
                imgs[(split, cls, i)] = a
    return imgs


@pytest.mark.parametrize("form", ["folder", "tar", "tar.xz"])
def test_imagefolder_forms(tmp_path, form):
    src = tmp_path / "ds"
    imgs = _write_folder(src)
    path = src
    if form != "folder":
        path = tmp_path / f"ds.{form}"
        with tarfile.open(path, "w:xz" if form == "tar.xz" else "w") as t:
            t.add(src, arcname=".")
    d = load_dataset(str(path), cache_dir=tmp_path / "cache")
    assert d.classes == ["cat", "dog"] and d.train_x.shape == (6, 3, 8, 8)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(d.test_x[4].permute(1, 2, 0).numpy(), imgs[("test", "dog", 1)])  # PNG: exact


def _write_cifar(root, name, n_train=10, n_test=4):
    rng = np.random.default_rng(1)
    data = {}
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            d = {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), b"labels": list(range(n_train))}
            pickle.dump(d, open(folder / f"data_batch_{i}", "wb"))
            data[f"train{i}"] = d
        t = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}
        pickle.dump(t, open(folder / "test_batch", "wb"))
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, open(folder / "batches.meta", "wb"))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        tr = {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8), b"fine_labels": list(range(n_train))}
        t = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), b"fine_labels": [99, 0, 5, 7]}
        pickle.dump(tr, open(folder / "train", "wb"))
        pickle.dump(t, open(folder / "test", "wb"))
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, open(folder / "meta", "wb"))
        data["train"] = tr
    data["test"] = t
    return data


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvision_layout(tmp_path, name):
    raw = _write_cifar(tmp_path, name)
    d = load_dataset(name, data_dir=tmp_path, cache_dir=tmp_path / "cache", download=False)
    assert d.num_classes == (10 if name == "cifar10" else 100)
    assert d.train_x.shape[0] == (50 if name == "cifar10" else 10)
    first = raw["train1" if name == "cifar10" else "train"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(d.train_x[0].numpy(), first)
    assert d.test_y.tolist() == raw["test"][b"labels" if name == "cifar10" else b"fine_labels"]


def test_bad_datasets(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not an ImageFolder"):
        load_dataset(str(tmp_path / "empty"))
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="archive"):
        load_dataset(str(bad))
    src = tmp_path / "broken"
    _write_folder(src)
    (src / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot decode"):
        load_dataset(str(src))
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a CIFAR python batch"):
        load_dataset("cifar100", data_dir=tmp_path, download=False)


def test_crop_flip_matches_a_direct_loop():
    x = torch.rand(6, 3, 8, 8)
    out = crop_flip(x, pad=2, pad_mode="edge", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    off = torch.randint(0, 5, (2, 6), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    for i in range(6):
        xp = torch.nn.functional.pad(x[i:i + 1], (2, 2, 2, 2), mode="replicate")[0]
        want = xp[:, off[0, i]:off[0, i] + 8, off[1, i]:off[1, i] + 8]
        if flip[i]:
            want = want.flip(2)
        assert torch.equal(out[i], want)


def test_batches_cover_every_example_once(mini):
    x, y = mini.test_x[:103], mini.test_y[:103]
    seen = []
    for xb, yb in batches(x, y, 25, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
        seen.append(yb)
    assert sorted(torch.cat(seen).tolist()) == sorted(y.tolist())
    xs, ys, idx = subset(mini.test_x, mini.test_y, 50, seed=1)
    assert len(ys) == 50 and torch.equal(mini.test_y[idx], ys)
    assert torch.equal(subset(mini.test_x, mini.test_y, 50, seed=1)[2], idx)


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_are_read_without_running_code(tmp_path, protocol):
    raw = _write_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):  # the real files are protocol-2 pickles of numpy arrays: still readable
        pickle.dump(raw[f"train{i}"], open(folder / f"data_batch_{i}", "wb"), protocol=protocol)
    d = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert np.array_equal(d.train_x[0].numpy(), raw["train1"][b"data"][0].reshape(3, 32, 32))
    marker = tmp_path / "PWNED"
    pickle.dump({b"data": _RunsCode(marker), b"labels": [0]}, open(folder / "data_batch_3", "wb"),
                protocol=protocol)
    with pytest.raises(DatasetError, match="refusing to load posix.system"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()
    pickle.dump({b"data": np.zeros((10, 3072), dtype=object), b"labels": list(range(10))},
                open(folder / "data_batch_3", "wb"), protocol=protocol)
    with pytest.raises(DatasetError, match="not a CIFAR python batch|refusing"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    pickle.dump({b"data": raw["train3"][b"data"], b"labels": [0, 1]}, open(folder / "data_batch_3", "wb"))
    with pytest.raises(DatasetError, match="2 labels for 10 images"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_a_failed_cache_write_is_not_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    import os

    import safetensors.torch as st
    _write_cifar(tmp_path, "cifar10")
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / "cifar10-0123456789.tmp4206649"  # left by a killed process (that pid does not run)
    stale.write_bytes(b"x" * 1000)

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", full_disk)
    d = load_dataset("cifar10", data_dir=tmp_path, cache_dir=cache, download=False)
    assert d.train_x.shape[0] == 50
    assert os.listdir(cache) == []  # neither this process's partial file nor the dead one's


def test_first_order_interleaves_a_class_sorted_set_and_keeps_any_other_order():
    """"The first n test images" of a set stored class by class (ImageFolder: test/airplane/0000.jpg ...) would
    be one class; they are taken one class after another instead. A set in its own order keeps it."""
    from epcli.data import first_order
    y = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    order, name = first_order(y)
    assert name == "class-interleaved" and sorted(order.tolist()) == list(range(12))
    assert y[order].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 2, 0]
    assert order[:3].tolist() == [0, 5, 8] and order[3:6].tolist() == [1, 6, 9]  # within a class: file order
    official = torch.tensor([3, 8, 8, 0, 6, 6, 1, 6, 3, 1])  # CIFAR-10's first test labels: not sorted
    assert first_order(official)[1] == "dataset" and first_order(official)[0].tolist() == list(range(10))
    assert first_order(torch.tensor([4, 4, 4]))[1] == "dataset"  # one class: nothing to interleave
