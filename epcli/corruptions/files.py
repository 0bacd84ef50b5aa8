"""The CIFAR-10-C file layout: read the published (or exported) `<name>.npy` and `labels.npy`, and export a
generated set in the same layout (plus `clean.npy`), each file written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from epcli.atomic import atomic_write, remove_stale_temps
from epcli.corruptions.core import _check, _check_names, corrupt_range_uint8
from epcli.corruptions.params import CORRUPTIONS
from epcli.errors import DatasetError, UsageError


def open_official(directory, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`<directory>/<name>.npy` and labels.npy memory-mapped and checked from their headers (nothing is read):
    (images uint8 (5N, H, W, 3), labels (5N,)). A missing, broken or misshapen file is a DatasetError."""
    _check(name, 1)
    d = Path(directory)
    f, lf = d / f"{name}.npy", d / "labels.npy"
    if not d.is_dir():
        raise DatasetError(f"corruption directory {d} not found (expected CIFAR-10-C's <name>.npy + labels.npy)")
    for p in (f, lf):
        if not p.is_file():
            raise DatasetError(f"{p} not found: expected the CIFAR-10-C layout (<name>.npy and labels.npy)")
    try:
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
        lab = np.load(lf, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a broken file
        raise DatasetError(f"cannot read {f.name} or labels.npy in {d}: {' '.join(str(exc).split())}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] % 5 or arr.shape[0] == 0:
        raise DatasetError(f"{f} has {arr.dtype} {arr.shape}: expected uint8 (5N, H, W, 3), "
                           "e.g. (50000, 32, 32, 3), severities stacked 1..5")
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        raise DatasetError(f"{lf} has shape {lab.shape}: expected ({arr.shape[0]},) to match {f.name}")
    return arr, lab


def load_official(directory, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read `<directory>/<name>.npy` (uint8 (5N, H, W, 3), severity s in rows (s-1)N .. sN) and labels.npy.

    Returns (x_uint8 (5N, 3, H, W), y int64 (5N,)); N is inferred as rows / 5 (10,000 for CIFAR-10-C).
    """
    arr, lab = open_official(directory, name)
    x = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2).contiguous()  # copy out of the read-only memmap
    return x, torch.from_numpy(np.asarray(lab).astype(np.int64))


def load_clean(directory) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The clean images of an exported directory (`clean.npy`, uint8 (N, H, W, 3), with labels.npy's first N
    labels), or None when the directory has none (the official CIFAR-10-C folders do not)."""
    d = Path(directory)
    f = d / "clean.npy"
    if not f.is_file():
        return None
    try:
        arr = np.load(f, allow_pickle=False)
        lab = np.load(d / "labels.npy", allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a broken file
        raise DatasetError(f"cannot read clean.npy or labels.npy in {d}: {exc}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or lab.ndim != 1 or lab.shape[0] < arr.shape[0]:
        raise DatasetError(f"{f} has {arr.dtype} {arr.shape} and labels.npy {lab.shape}: expected uint8 (N, H, W, 3) "
                           "and at least N labels in one dimension")
    return (torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(lab[:arr.shape[0]].astype(np.int64)))


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
    atomic_write(path, write, mode=0o644)  # data sets are meant to be shared


def export_files(names: Iterable[str]) -> list[str]:
    """The file names `export` writes for these corruptions."""
    return [f"{n}.npy" for n in names] + ["labels.npy", "clean.npy"]


def export(directory, x_uint8: torch.Tensor, y: torch.Tensor, names: Iterable[str] = CORRUPTIONS, seed: int = 0,
           *, batch_size: int = 500, device="cpu", on_batch: Callable[[dict], None] | None = None) -> list[Path]:
    """Write a generated set in the CIFAR-10-C layout: <name>.npy uint8 (5N, H, W, 3) and labels.npy (5N,), plus
    clean.npy (N, H, W, 3), the clean images, so that evaluating the directory can report clean accuracy.

    Images are exactly those `evaluate` sees for the same seed (`corrupt_range_uint8`), so `evaluate_official` on
    the directory gives the same per-example outcomes. Each file is written to a temporary name in the directory
    (`.<name>.<host>.<pid>-<token>.tmp`) and renamed into place, mode 0644; the temporaries a killed export left
    there are removed when the next export into the folder starts (epcli.atomic). Returns the written paths.
    """
    names = _check_names(names)
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise UsageError(f"export expects uint8 images (N, 3, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # a kill (SIGKILL cannot be caught) between writing a temporary and its rename leaves it behind: remove
    # those of dead exports (ours and earlier versions' naming), only for the files an export writes
    remove_stale_temps(d, targets=set(export_files(CORRUPTIONS)), legacy=("mkstemp",))
    n = x_uint8.shape[0]
    y = torch.as_tensor(y).long()
    written = []
    for name in names:
        out = np.empty((5 * n,) + tuple(x_uint8.shape[2:]) + (3,), dtype=np.uint8)
        for sev in range(1, 6):
            for s in range(0, n, batch_size):
                e = min(s + batch_size, n)
                xb = corrupt_range_uint8(x_uint8, name, sev, seed, s, e, device)
                out[(sev - 1) * n + s:(sev - 1) * n + e] = xb.permute(0, 2, 3, 1).cpu().numpy()
                if on_batch:
                    on_batch({"name": name, "severity": sev, "done": e, "total": n})
        _atomic_save(d / f"{name}.npy", out)
        written.append(d / f"{name}.npy")
    lab_dtype = np.uint8 if (int(y.max()) if y.numel() else 0) < 256 else np.int64  # CIFAR-10/100: uint8
    _atomic_save(d / "labels.npy", np.tile(y.numpy(), 5).astype(lab_dtype))
    written.append(d / "labels.npy")
    _atomic_save(d / "clean.npy", x_uint8.permute(0, 2, 3, 1).contiguous().numpy())  # epcli's addition
    written.append(d / "clean.npy")
    return written
