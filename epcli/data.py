"""Datasets as uint8 tensors, decoded once and cached; batches with augmentation on the compute device.

Sources, by name:
- `None` or "cifar10-mini": the 6,000 real CIFAR-10 images shipped inside the package (500 train + 100 test
  per class, JPEG quality 75);
- "cifar10" / "cifar100": torchvision's official python layout under `data_dir`
  (`cifar-10-batches-py/` or `cifar-100-python/`), downloaded when missing and the network allows;
- a path to an ImageFolder tree (`train/<class>/*`, `test/<class>/*`), as a folder or a .tar/.tar.gz/.tar.xz.

Images stay uint8 (N, 3, H, W) until a batch is drawn; models take float images in [0, 1].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from epcli.atomic import atomic_write, remove_stale_temps
from epcli.errors import DatasetError

EMBEDDED = Path(__file__).parent / "assets" / "cifar10-mini-jpeg.tar.xz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CACHE_FORMAT = "1"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TORCHVISION_LAYOUT = {
    "cifar10": "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    "cifar100": "cifar-100-python/{train, test, meta}",
}


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = ""
    sha256: str = ""  # identity of the decoded content, recorded with every run
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.train_x, self.train_y
        if name == "test":
            return self.test_x, self.test_y
        raise DatasetError(f"unknown split {name!r}: use 'train' or 'test'")


def dataset_name(name: str | None) -> str:
    """The `Dataset.name` that `load_dataset(name)` gives, known without reading anything (a path: its stem)."""
    name = name or "cifar10-mini"
    if name in ("cifar10-mini", "embedded", "cifar10", "cifar100"):
        return "cifar10-mini" if name == "embedded" else name
    return Path(name).name.split(".")[0]


def load_dataset(name: str | None = None, data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """Load a dataset by name or path, decoding it once into a cached tensor file under `cache_dir`."""
    name = name or "cifar10-mini"
    if name in ("cifar10-mini", "embedded"):
        return _cached(EMBEDDED, dataset_name(name), cache_dir, lambda: _read_imagefolder(EMBEDDED))
    if name in ("cifar10", "cifar100"):
        root = Path(data_dir or os.environ.get("EPCLI_DATA_DIR", ".data"))
        folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
        if not folder.is_dir():
            _try_download(name, root, download)
        if not folder.is_dir():
            raise DatasetError(f"{name} not found: expected {root / TORCHVISION_LAYOUT[name]} "
                               f"(torchvision's python layout) and it could not be downloaded")
        return _cached(folder, name, cache_dir, lambda: _read_torchvision(name, folder))
    path = Path(name)
    if not path.exists():
        raise DatasetError(f"dataset {name!r} not found: give cifar10-mini, cifar10, cifar100, "
                           "or a path to an ImageFolder folder or .tar/.tar.xz archive")
    return _cached(path, dataset_name(name), cache_dir, lambda: _read_imagefolder(path))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            augment: str | None = None, pad_mode: str = "edge", device: str | torch.device = "cpu",
            generator: torch.Generator | None = None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0,1], labels) on `device`. Pass tensors already on `device` to avoid copies.

    augment: None or "crop-flip" (random 4-pixel-padded crop + horizontal flip, done on `device`).
    """
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    n = x.shape[0]
    order = torch.randperm(n, generator=generator).to(device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        xb = x[idx].float().div_(255)
        if augment == "crop-flip":
            xb = crop_flip(xb, pad=4, pad_mode=pad_mode, generator=generator)
        elif augment:
            raise DatasetError(f"unknown augmentation {augment!r}: use 'crop-flip' or none")
        yield xb, y[idx]


def crop_flip(x: torch.Tensor, pad: int = 4, pad_mode: str = "edge",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop from a padded image plus random horizontal flip, one draw per image, vectorised."""
    b, c, h, w = x.shape
    mode = {"edge": "replicate", "reflect": "reflect", "zeros": "constant"}[pad_mode]
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=mode)
    off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0):
    """A seeded random subset of n examples (all of them when n is None or >= len), in index order."""
    if n is None or n >= len(y):
        return x, y, torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    return x[idx], y[idx], idx


def first_order(y: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The order "the first n test images" are taken in, and its name. A set whose labels come sorted by class
    (an ImageFolder copy, such as the JPEG CIFAR-10 here: test/airplane/0000.jpg, ...) has no order of its own
    beyond its classes, and its first 200 images would be 200 airplanes; there the classes are interleaved
    (the first image of every class, then the second, ...), so the first n cover the classes evenly, as the
    first images of CIFAR-10's official test order do. Any other set keeps its own order ("dataset")."""
    n = len(y)
    if n < 2 or int(y.unique().numel()) < 2 or not bool((y[1:] >= y[:-1]).all()):
        return torch.arange(n), "dataset"
    start = torch.searchsorted(y, y, right=False)  # each image's rank within its class: i - first index of it
    rank = torch.arange(n) - start
    return torch.argsort(rank * (int(y.max()) + 1) + y, stable=True), "class-interleaved"


# --- decoding -------------------------------------------------------------------------------------------

def _decode(data: bytes, where: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for bad files
        raise DatasetError(f"cannot decode image {where}: {e}") from None


def _read_imagefolder(path: Path) -> dict:
    """Read train/<class>/* and test/<class>/* from a folder or a tar archive."""
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}

    def add(rel: str, read):
        parts = Path(rel).parts
        if len(parts) >= 3 and parts[-3] in files and Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            files[parts[-3]].setdefault(parts[-2], []).append((rel, read()))

    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                add(str(p.relative_to(path)), p.read_bytes)
    else:
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if m.isfile():
                        add(m.name, lambda m=m: tar.extractfile(m).read())
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(f"{path} is not a readable .tar/.tar.xz archive: {e}") from None
    if not files["train"] or not files["test"]:
        raise DatasetError(f"{path} is not an ImageFolder dataset: expected train/<class>/<image> and "
                           "test/<class>/<image>")
    classes = sorted(files["train"])
    if len(classes) < 2:
        raise DatasetError(f"{path}: one class ({classes[0]}) in train/; a classifier needs at least 2")
    if set(files["test"]) - set(classes):
        raise DatasetError(f"{path}: test classes {sorted(set(files['test']) - set(classes))} not in train")
    if classes == sorted(CIFAR10_CLASSES):
        classes = list(CIFAR10_CLASSES)  # keep the canonical CIFAR-10 label order
    out = {"classes": classes}
    for split, by_class in files.items():
        xs, ys = [], []
        for label, cls in enumerate(classes):
            for rel, data in sorted(by_class.get(cls, [])):
                xs.append(_decode(data, f"{path}:{rel}"))
                ys.append(label)
        shapes = {a.shape for a in xs}
        if len(shapes) != 1:
            raise DatasetError(f"{path}: images of different sizes in {split}: {sorted(shapes)[:3]}")
        out[split + "_x"] = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
        out[split + "_y"] = torch.tensor(ys, dtype=torch.int64)
    if out["train_x"].shape[1:] != out["test_x"].shape[1:]:  # a model is built for one image size
        (h, w), (th, tw) = out["train_x"].shape[2:], out["test_x"].shape[2:]
        raise DatasetError(f"{path}: train images are {h}x{w} but test images are {th}x{tw}")
    return out


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python batches without running code: the only callables a pickle may name are the ones
    that rebuild a numpy array (and `_codecs.encode`, which protocol-2 pickles use for bytes). Anything
    else - os.system, builtins.eval, any class - is refused, so a crafted batch file cannot execute."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only dicts, "
                                         "lists, bytes and numpy arrays)")
        return super().find_class(module, name)


def _plain(obj, depth: int = 0) -> bool:
    """True for the structure of a CIFAR batch: dicts / lists of bytes, str, ints and numeric arrays."""
    if depth > 4:
        return False
    if isinstance(obj, np.ndarray):
        return obj.dtype != object
    if isinstance(obj, dict):
        return all(isinstance(k, (bytes, str)) and _plain(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v, depth + 1) for v in obj)
    return isinstance(obj, (bytes, str, int, float)) and not isinstance(obj, bool) or obj is None


def _read_torchvision(name: str, folder: Path) -> dict:
    def unpickle(p: Path) -> dict:
        try:
            with open(p, "rb") as f:
                d = _CifarUnpickler(f, encoding="bytes").load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, MemoryError, RecursionError) as e:
            raise DatasetError(f"{p} is missing or not a CIFAR python batch ({' '.join(str(e).split())[:160]}); "
                               f"expected {TORCHVISION_LAYOUT[name]}") from None
        if not isinstance(d, dict) or not _plain(d):
            raise DatasetError(f"{p} is not a CIFAR python batch (expected a dict of bytes, lists and arrays)")
        return d

    def to_x(d: dict, p: Path) -> torch.Tensor:
        raw = d.get(b"data", [])
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            raise DatasetError(f"{p}: 'data' must be a uint8 numpy array")
        data = raw
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{p}: 'data' must be an (N, 3072) uint8 array, got {data.shape}")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())

    def names(meta: dict, key: bytes, p: Path) -> list[str]:
        raw = meta.get(key, [])
        if not isinstance(raw, list) or not all(isinstance(c, (bytes, str)) for c in raw):
            raise DatasetError(f"{p}: {key.decode()!r} must be a list of class names")
        return [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in raw]

    def to_y(d: dict, key: bytes, x: torch.Tensor, p: Path, num_classes: int) -> torch.Tensor:
        raw = d.get(key)
        try:
            y = torch.as_tensor(np.asarray(raw, dtype=np.int64).reshape(-1))
        except (TypeError, ValueError, OverflowError):
            raise DatasetError(f"{p}: {key.decode()!r} must be a list of integer labels") from None
        if raw is None or len(y) != len(x):
            raise DatasetError(f"{p}: {key.decode()!r} has {0 if raw is None else len(y)} labels for {len(x)} "
                               "images")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DatasetError(f"{p}: labels must be in 0..{num_classes - 1}, found {int(y.min())}.."
                               f"{int(y.max())}")
        return y

    if name == "cifar10":
        files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        train = [unpickle(f) for f in files]
        test = unpickle(folder / "test_batch")
        classes = names(unpickle(folder / "batches.meta"), b"label_names", folder / "batches.meta") \
            or CIFAR10_CLASSES
        key = b"labels"
        xs = [to_x(d, f) for d, f in zip(train, files)]
        tx = torch.cat(xs)
        ty = torch.cat([to_y(d, key, x, f, len(classes)) for d, x, f in zip(train, xs, files)])
        test_file = folder / "test_batch"
    else:
        tr = unpickle(folder / "train")
        test = unpickle(folder / "test")
        classes = names(unpickle(folder / "meta"), b"fine_label_names", folder / "meta")
        if not classes:
            raise DatasetError(f"{folder / 'meta'}: no 'fine_label_names'")
        key = b"fine_labels"
        tx = to_x(tr, folder / "train")
        ty = to_y(tr, key, tx, folder / "train", len(classes))
        test_file = folder / "test"
    test_x = to_x(test, test_file)
    test_y = to_y(test, key, test_x, test_file, len(classes))
    for split, x, where in (("train", tx, folder), ("test", test_x, test_file)):
        if not len(x):  # nothing to train on, or every accuracy 0/0
            raise DatasetError(f"{where}: the {split} split has no images")
    if len(classes) < 2:
        raise DatasetError(f"{folder}: one class ({classes[0] if classes else '?'}); a classifier needs at least 2")
    return {"classes": classes, "train_x": tx, "train_y": ty, "test_x": test_x, "test_y": test_y}


def _try_download(name: str, root: Path, allowed: bool) -> None:
    if not allowed:
        return
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception:  # no network: the caller reports the expected layout
        pass


# --- cache ----------------------------------------------------------------------------------------------

def _source_key(path: Path) -> str:
    h = hashlib.sha256(CACHE_FORMAT.encode())
    if path.is_file():
        st = path.stat()
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _content_sha(d: dict) -> str:
    h = hashlib.sha256(json.dumps(d["classes"]).encode())
    for k in ("train_x", "train_y", "test_x", "test_y"):
        h.update(d[k].numpy().tobytes())
    return h.hexdigest()


def _cached(path: Path, name: str, cache_dir, read) -> Dataset:
    from safetensors.torch import load_file, save_file
    cache = Path(cache_dir) / f"{name}-{_source_key(path)}.safetensors" if cache_dir else None
    d = None
    if cache is not None and cache.exists():
        try:
            from safetensors import safe_open
            with safe_open(str(cache), "pt") as f:
                meta = f.metadata()
            d = dict(load_file(str(cache)))
            d["classes"] = json.loads(meta["classes"])
            sha = meta["sha256"]
        except Exception:
            d = None  # a damaged cache is rebuilt, never trusted
    if d is None:
        d = read()
        sha = _content_sha(d)
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(cache.parent, legacy=("pid",))  # a killed decode's half-written cache
                tensors = {k: v.contiguous() for k, v in d.items() if k != "classes"}
                atomic_write(cache, lambda tmp: save_file(tensors, str(tmp), metadata={
                    "classes": json.dumps(d["classes"]), "sha256": sha}))
            except Exception:  # a full disk, an unwritable folder: caching is an optimisation, not the command
                pass
    return Dataset(name=name, classes=list(d["classes"]), train_x=d["train_x"], train_y=d["train_y"],
                   test_x=d["test_x"], test_y=d["test_y"], source=str(path), sha256=sha)
