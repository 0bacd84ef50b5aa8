"""The report's content pinned on a small store: md, csv, json, the HTML page without figures, and the text of
every figure (titles, axis labels, ticks, legends: what a reader sees, from the SVGs), compared with files
under tests/golden/ (times and the store's path replaced by placeholders).

A change to the report's content shows up here as a diff of those files; a change made for speed must leave them
unchanged. To accept an intended change: `EPCLI_UPDATE_GOLDEN=1 pytest tests/test_report_golden.py` and review
the diff of tests/golden/.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from test_report import build_store

from epcli import report
from epcli import store as store_module

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("EPCLI_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """test_report's store (5 models, attacks, corruptions, artifacts) with run ids that are the same every time
    (the store's ids hold the clock; these sort in creation order like the real ones)."""
    count = iter(range(10**6))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store_module, "new_run_id", lambda: f"run{next(count):03d}" + "x" * 10)
        store, _ = build_store(tmp_path_factory.mktemp("golden") / "s")
    yield store, report.collect(store)
    store.close()


def normalize(text: str, store_root: str) -> str:
    """Timestamps and the store's path replaced by placeholders."""
    text = text.replace(store_root, "STORE")
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?", "TIME", text)


def svg_text(path: Path) -> list[str]:
    """The text a reader sees in a figure (matplotlib writes text as <text> with svg.fonttype none)."""
    svg = path.read_text()
    return [re.sub(r"\s+", " ", t).strip() for t in re.findall(r"<text[^>]*>(.*?)</text>", svg, flags=re.S)]


def check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no golden file {path}: run with EPCLI_UPDATE_GOLDEN=1 and review it"
    want = path.read_text()
    if text != want:  # show the first differing line, not two walls of text
        a, b = want.splitlines(), text.splitlines()
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        pytest.fail(f"{name} differs at line {i + 1}:\n  golden: {a[i] if i < len(a) else '<end>'}\n"
                    f"  now:    {b[i] if i < len(b) else '<end>'}")


@pytest.mark.parametrize("fmt", ["md", "csv", "html"])
def test_report_text_is_pinned(small, fmt):
    store, data = small
    check(f"report.{fmt}", normalize(report.render(data, fmt), str(store.root)))


def test_report_json_is_pinned(small):
    """The same document (parsed), whatever its layout (one line per row since the 10k-run bench)."""
    store, data = small
    text = normalize(report.render(data, "json"), str(store.root))
    if UPDATE:
        check("report.json", text)
    assert json.loads(text) == json.loads((GOLDEN / "report.json").read_text())


def test_figure_text_is_pinned(small, tmp_path):
    store, data = small
    paths = report.figures(data, tmp_path / "fig")
    texts = {p.stem: svg_text(p) for p in paths if p.suffix == ".svg"}
    check("figures.json", normalize(json.dumps(texts, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                                    str(store.root)))


def test_corruption_samples_text_is_pinned(tmp_path):
    """The sample grid redrawn with its labels: a grid of corrupt.py's geometry (2 images x 3 corruptions rows,
    clean + 5 severities, 32-pixel tiles, 2-pixel gaps)."""
    from PIL import Image
    names, rows, h, pad = ["gaussian_noise", "fog", "frost"], 6, 32, 2
    a = np.full((pad + rows * (h + pad), pad + 6 * (h + pad), 3), 255, dtype=np.uint8)
    rng = np.random.default_rng(0)
    for r in range(rows):
        for c in range(6):
            a[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (h + pad):pad + c * (h + pad) + h] = \
                rng.integers(0, 256, (h, h, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "grid.png")
    paths = report.corruption_samples(tmp_path / "grid.png", names, [1, 2, 3, 4, 5], tmp_path / "out",
                                      label="EP-CNN, run r1")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    # sorted: the labels a reader sees, whatever order the drawing code places them in
    check("corruption-samples.json", json.dumps(sorted(svg_text(paths[1])), indent=1, ensure_ascii=False) + "\n")
