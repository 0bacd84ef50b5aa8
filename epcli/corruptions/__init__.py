"""The 19 CIFAR-10-C corruptions in torch, batched, seeded; the official .npy loader and exporter; metrics.

`corrupt_uint8` takes uint8 images (B, 3, H, W) on any device and returns the corrupted uint8 images (`corrupt`:
the same for float images on the 8-bit grid), with the CIFAR-10-C severity parameters of Hendrycks & Dietterich
(hendrycks/robustness, `make_cifar_c.py`; see docs/corruptions.md for the table and the measured fidelity). Random
draws come from a `torch.Generator`; when it lives on the CPU the draws are made there and moved, so the same seed
gives the same draws on every device.

The reference itself set no seed, so random corruptions can be matched in distribution only; given the same
draws, every corruption follows the reference maths step by step in the reference's own precision (float64,
float32 or 8-bit, as numpy, OpenCV, PIL and ImageMagick computed it) and ends with its `np.uint8(...)`
truncation. Every corrupted image is therefore an 8-bit image, the same one whether it is generated, exported or
read back from the exported files. docs/corruptions.md has the measured fidelity table.

Modules, in reading order: `params` (names and the severity table), `core` (the registry, `corrupt`,
`corrupt_uint8`, seeded chunks), the four families `noise`, `blur`, `weather`, `digital` (one function per
corruption), `_ops` (the low-level operations the families share), `evaluate` (accuracy, `summarize`) and `files`
(the .npy layout: `load_official`, `export`). Only torch, numpy and Pillow are used; the package never imports the
store, the CLI or rich.
"""

from __future__ import annotations

# beyond __all__, as before the split: CHUNK, RANDOM_CORRUPTIONS (tests, bench), export_files, FROST_DIR, FROST_FILES
from epcli.corruptions.core import (CHUNK, RANDOM_CORRUPTIONS, chunk_generator, corrupt, corrupt_range,
                                    corrupt_range_uint8, corrupt_uint8, sample_grid, to_uint8)
from epcli.corruptions.evaluate import evaluate, evaluate_official, summarize
from epcli.corruptions.files import export, export_files, load_clean, load_official, open_official
from epcli.corruptions.params import BENCHMARK_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, PARAMS
from epcli.corruptions.weather import FROST_DIR, FROST_FILES

__all__ = [
    "CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "EXTRA_CORRUPTIONS", "PARAMS", "corrupt", "corrupt_range",
    "corrupt_uint8", "corrupt_range_uint8", "chunk_generator", "evaluate", "summarize", "load_official",
    "open_official", "load_clean", "evaluate_official", "export", "sample_grid", "to_uint8",
]
