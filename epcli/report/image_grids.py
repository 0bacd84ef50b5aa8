"""Figures made of images: the adversarial-example grid (one test image every shown model classifies
correctly when clean, its adversarial versions per ε and the amplified perturbations) and the corrupt run's
sample grid redrawn with its labels (corruption_samples)."""

from __future__ import annotations

from pathlib import Path

from epcli.report.datamodel import ATTACK_NAMES, NORM_NAMES, ReportData, _grad, _json, eps_label
from epcli.report.plotting import ADVERSARIAL_MODELS, _figure_models, _plt, _save
from epcli.report.reader import _load_per_example


def _load_adv(path: str) -> tuple[dict, dict] | None:
    try:
        from safetensors import safe_open
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, meta
    except Exception:  # a missing or unreadable file: skip the figure row, never crash a report
        return None


def _to_img(a):
    import numpy as np
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    return np.clip(a, 0, 1).squeeze()


def _eps_of(suffix: str) -> float | None:
    try:
        return float(suffix)
    except ValueError:
        if "/" in suffix:
            try:
                num, den = suffix.split("/")
                return float(num) / float(den)
            except ValueError:
                return None
    return None


def _load_adv_entry(a: dict) -> dict | None:
    """One adversarial-examples artifact: images, predictions per eps, labels, and the test indices (from the
    same attack run's per-example outcomes, whose first entries are these images)."""
    import numpy as np
    got = _load_adv(a["path"])
    if got is None:
        return None
    t, meta = got
    if "x" not in t:
        return None
    n = t["x"].shape[0] if t["x"].ndim == 4 else 1
    classes = _json(meta.get("classes")) or a["meta"].get("classes") or []
    labels = t.get("labels")
    if labels is None:
        lab = _json(meta.get("labels"))
        labels = np.asarray(lab) if isinstance(lab, list) else None
    eps = []
    for k in t:
        if k.startswith("x_adv_"):
            e = _eps_of(k[len("x_adv_"):])
            if e is not None:
                eps.append((e, k, "pred_" + k[len("x_adv_"):]))
    if not eps:
        return None
    eps.sort()
    index = None
    if a.get("per_example"):
        pe = _load_per_example(a["per_example"])
        if pe is not None and len(pe["index"]) >= n:
            index = pe["index"][:n]
    return {"a": a, "t": t, "n": n, "eps": eps, "classes": classes,
            "labels": None if labels is None else np.asarray(labels).reshape(-1)[:n],
            "index": index if index is not None else np.arange(n), "indexed": index is not None}


def choose_image(entries: list[dict]) -> tuple[int | None, list[int | None]]:
    """A test image every shown model classifies correctly when clean (the attack had something to do), by
    test-set index when the artifacts carry it; preferring one whose prediction some attack changed.
    Returns (test index or None, the row of that image in each entry)."""
    import numpy as np
    candidates = None
    for e in entries:
        if e["labels"] is None or "pred_clean" not in e["t"]:
            return None, [None] * len(entries)
        ok = np.asarray(e["t"]["pred_clean"]).reshape(-1)[: e["n"]] == e["labels"]
        good = {int(i) for i, g in zip(e["index"], ok) if g}
        candidates = good if candidates is None else candidates & good
    if not candidates:
        return None, [None] * len(entries)

    def fooled(idx: int) -> int:  # how many models some eps fooled on this image
        total = 0
        for e in entries:
            r = int(np.flatnonzero(e["index"] == idx)[0])
            preds = [np.asarray(e["t"][kp]).reshape(-1)[r] for _, _, kp in e["eps"] if kp in e["t"]]
            total += any(int(p) != int(e["labels"][r]) for p in preds)
        return total

    best = max(sorted(candidates), key=lambda i: (fooled(i), -i))
    return best, [int(np.flatnonzero(e["index"] == best)[0]) for e in entries]


def _draw_strip(ax, tiles: list, ncols: int, gap: int = 4) -> list[float]:
    """Images (H, W[, 3], values in [0, 1]; None = blank) side by side in one image with white gaps, drawn on
    `ax`, `ncols` tiles wide; returns the x centre of each tile (data coordinates)."""
    import numpy as np
    shape = next(tl.shape for tl in tiles if tl is not None)
    h, w = shape[0], shape[1]
    strip = np.ones((h, ncols * (w + gap) - gap, 3), dtype=np.float32)
    for j, tl in enumerate(tiles):
        if tl is not None:
            strip[:, j * (w + gap):j * (w + gap) + w] = tl if tl.ndim == 3 else tl[..., None]
    ax.imshow(strip, interpolation="nearest")
    return [j * (w + gap) + (w - 1) / 2 for j in range(len(tiles))]


def _adversarial_grid(data: ReportData, names: dict[str, str]):
    """Per norm, one row group per model: the chosen clean image and its adversarial versions per eps (prediction
    above, red when it changed), and below the perturbation amplified by a factor written on each panel (one
    factor per eps, shared by the models so their perturbations compare)."""
    import numpy as np
    adv_by: dict[str, list[dict]] = {}
    for a in data.adversarial:
        adv_by.setdefault(a["run_id"], []).append(a)
    # before reading any file: only the shown models' (an image grid holds fewer models than a line chart)
    shown, _, left_out = _figure_models(data, names, adv_by, limit=ADVERSARIAL_MODELS)
    shown_set = set(shown)
    entries = [e for e in (_load_adv_entry(a) for a in data.adversarial if a["run_id"] in shown_set)
               if e is not None]
    if not entries:
        return None
    norms = [n for n in ("linf", "l2") if any(e["a"]["norm"] == n for e in entries)]
    norms += sorted({e["a"]["norm"] for e in entries} - set(norms))
    groups = [(n, [e for e in entries if e["a"]["norm"] == n]) for n in norms]
    ncols = 1 + max(len(e["eps"]) for e in entries)
    nrows = sum(2 * len(g) for _, g in groups)
    plt = _plt()
    height = 1.85 * nrows + 0.6
    # one panel per row: the row's tiles side by side in one image, labels written above each tile (an axes per
    # tile, 2 x 12 per model and norm at 11 eps, took most of a 10k-run report's time)
    width = max(1.7 * ncols, 6.0)  # one or two eps: wide enough for the title (tight_layout warned otherwise)
    fig, axes = plt.subplots(nrows, 1, figsize=(width, height), squeeze=False)
    axes = axes[:, 0]
    for ax in axes:
        ax.axis("off")
    r0 = 0
    for norm, group in groups:
        idx, pos = choose_image(group)
        nname = NORM_NAMES.get(norm, norm)
        # one amplification per eps, shared across models
        amp = {}
        if idx is not None:
            for e, p in zip(group, pos):
                x = e["t"]["x"][p]
                for ev, kx, _ in e["eps"]:
                    d = float(np.abs(np.asarray(e["t"][kx][p], dtype=np.float32) - x).max())
                    amp[round(ev, 9)] = max(amp.get(round(ev, 9), 0.0), d)
        for gi, (e, p) in enumerate(zip(group, pos)):
            a, t = e["a"], e["t"]
            top, bottom = axes[r0], axes[r0 + 1]
            who = names.get(a["run_id"], a["label"])
            if p is None:
                if gi == 0:
                    top.text(0.0, 0.5, f"{nname}: no test image that every shown model classifies correctly when "
                             f"clean among the {e['n']} stored examples, so none is shown", fontsize=7, va="center",
                             transform=top.transAxes)
                r0 += 2
                continue
            cname = (lambda c: e["classes"][int(c)] if isinstance(e["classes"], list)
                     and 0 <= int(c) < len(e["classes"]) else str(int(c)))
            truth = int(e["labels"][p])
            x = np.asarray(t["x"][p], dtype=np.float32)
            images, perturbations, above, under = [_to_img(x)], [None], [], []
            above.append((f"{who}\n{nname} {ATTACK_NAMES.get(a.get('attack') or '', a.get('attack') or '')}"
                          f"{' · ' + _grad(a.get('grad_mode')) if a.get('grad_mode') else ''}\n"
                          f"clean → {cname(truth)}", 6.5, "black"))
            for ev, kx, kp in e["eps"]:
                xa = np.asarray(t[kx][p], dtype=np.float32)
                pred = cname(np.asarray(t[kp]).reshape(-1)[p]) if kp in t else "?"
                images.append(_to_img(xa))
                above.append((f"ε={eps_label(ev, norm)}\n→ {pred}", 7,
                              "crimson" if pred != cname(truth) else "black"))
                m = amp.get(round(ev, 9)) or 0.0
                k = 0.5 / m if m > 0 else 1.0
                perturbations.append(_to_img(0.5 + (xa - x) * k))
                under.append(f"×{k:.0f}" if m > 0 else "no change")
            centres = _draw_strip(top, images, ncols)
            for cx, (text, size, color) in zip(centres, above):
                top.text(cx, -2, text, ha="center", va="bottom", fontsize=size, color=color)
            _draw_strip(bottom, perturbations, ncols)
            bottom.text(centres[0], x.shape[-1] / 2, "perturbation\n(amplified ×k,\ngrey = 0)", ha="center",
                        va="center", fontsize=7)
            for cx, text in zip(centres[1:], under):
                bottom.text(cx, -2, text, ha="center", va="bottom", fontsize=6.5)
            r0 += 2
    title = ("Adversarial examples: one test image every shown model classifies correctly when clean, attacked "
             "at growing ε (red: the prediction changed)" + left_out)
    if width < 8:
        import textwrap
        title = "\n".join(textwrap.wrap(title, int(width * 13)))
    fig.suptitle(title, fontsize=8.5, y=1 - 0.1 / height, va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    return fig


def corruption_samples(grid_png: str | Path, corruptions: list[str], severities: list[int], out_dir: str | Path,
                       label: str | None = None, images: int = 2) -> list[Path]:
    """The corrupt run's sample grid (rows: image x corruption, columns: clean then each severity; 2-pixel
    gaps) redrawn with its labels: one row per corruption for the first `images` test images."""
    import matplotlib.image as mpimg
    import numpy as np
    try:
        grid = mpimg.imread(str(grid_png))
    except (OSError, ValueError, SyntaxError):  # an unreadable grid: no figure, never a failed report
        return []
    if grid.dtype != np.float32 or grid.max() > 1.0:
        grid = grid.astype(np.float32) / 255.0
    pad, cols, rows_total = 2, 1 + len(severities), None
    per_image = len(corruptions)
    h = None
    for k in range(1, 65):  # the number of images k: rows = k * corruptions
        rows_total = k * per_image
        hh = (grid.shape[0] - pad) / rows_total - pad
        if hh == int(hh) and hh > 0 and (grid.shape[1] - pad) / cols - pad == hh:
            h = int(hh)
            break
    if h is None or not corruptions:
        return []
    k_images = rows_total // per_image
    shown = min(images, k_images)
    plt = _plt()
    # one panel per image (its rows of the grid, whose 2-pixel white gaps already frame the tiles), labelled by
    # ticks: a panel per tile drew shown x corruptions x columns axes (228 for 19 corruptions), seconds each report
    fig, axes = plt.subplots(shown, 1, figsize=(1.15 * cols + 1.4, 1.15 * shown * per_image + 0.5), squeeze=False)
    centre = [pad + k * (h + pad) + (h - 1) / 2 for k in range(max(cols, per_image))]
    for i in range(shown):
        ax = axes[i][0]
        y0 = i * per_image * (h + pad)
        tile = grid[y0:y0 + per_image * (h + pad) + pad, :, :3]
        ax.imshow(np.round(tile * 255).astype(np.uint8), interpolation="nearest")  # 8-bit: no float rescaling
        ax.xaxis.tick_top()
        ax.set_xticks(centre[:cols])
        ax.set_xticklabels(["clean"] + [f"severity {sv}" for sv in severities], fontsize=7)
        ax.set_yticks(centre[:per_image])
        ax.set_yticklabels([f"image {i + 1}\n{name.replace('_', ' ')}" for name in corruptions], fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle("Corruption samples" + (f" ({label})" if label else "") + ": the seeded images the model was "
                 "scored on", fontsize=8.5)
    fig.tight_layout()
    paths: list[Path] = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(fig, out, "corruption-samples", paths)
    return [p for p in paths if p.suffix == ".png"] + [p for p in paths if p.suffix != ".png"]
