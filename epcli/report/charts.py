"""figures(): every figure the data supports, as PNG and SVG: robust accuracy vs ε per attack and norm,
accuracy vs corruption severity, accuracy vs relaxation steps, the unroll-length sweep, the adversarial-example
grid (drawn by image_grids) and the perturbations' spectrum (drawn by perturbations)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from epcli import paper
from epcli.report.datamodel import ATTACK_NAMES, ATTACK_ORDER, NORM_NAMES, ReportData, _grad, eps_label
from epcli.report.image_grids import _adversarial_grid
from epcli.report.perturbations import spectrum_figure
from epcli.report.plotting import _figure_models, _plt, _row_labels, _save

FIGURE_KINDS = ("robust", "corruptions", "steps", "unroll", "adversarial", "spectrum")


def figures(data: ReportData, out_dir: str | Path, paper_curves: bool = True,
            only: Iterable[str] | None = None) -> list[Path]:
    """Write every figure the data supports as PNG and SVG; skip a figure whose data is absent. `only`: these
    kinds (FIGURE_KINDS) of figure, e.g. to draw some in another process; the paths come in FIGURE_KINDS order."""
    only = set(FIGURE_KINDS if only is None else only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    paths: list[Path] = []
    names = _row_labels(data)
    rows = {r.run_id: r for r in data.rows}
    # every figure's points, grouped once by model (a figure then reads only its own models' points)
    curves: dict[tuple, list[dict]] = {}
    for c in data.curves:
        curves.setdefault((c["attack"], c["norm"]), []).append(c)
    corr_by: dict[str, list[dict]] = {}
    for c in data.corruptions:
        corr_by.setdefault(c["run_id"], []).append(c)
    steps_by: dict[str, list[dict]] = {}
    for st in data.steps:
        steps_by.setdefault(st["run_id"], []).append(st)

    # robust accuracy vs eps, one panel per attack x norm
    for attack, norm in sorted(curves if "robust" in only else [],
                               key=lambda an: (ATTACK_ORDER.index(an[0]) if an[0] in ATTACK_ORDER else 99, an[1])):
        if len({c["eps"] for c in curves[(attack, norm)]}) < 2:
            continue  # a single eps is no curve: the number is in the tables
        by_run: dict[str, list[dict]] = {}
        for c in curves[(attack, norm)]:
            by_run.setdefault(c["run_id"], []).append(c)
        shown, colors, left_out = _figure_models(data, names, by_run)
        fig, ax = plt.subplots(figsize=(6.8, 4.4))
        all_eps, drawn_paper, datasets = set(), set(), set()
        for rid in shown:
            pts = sorted((c["eps"], c["value"], c["unreliable"], c.get("n"), c.get("grad_mode")) for c in by_run[rid])
            row = rows[rid]
            datasets.add(row.dataset or "?")
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            all_eps.update(xs)
            ns = sorted({p[3] for p in pts if p[3]})
            modes = sorted({_grad(p[4]) for p in pts if p[4]})
            n_txt = "n=?" if not ns else (f"n={ns[0]:,}" if len(ns) == 1 else f"n={ns[0]:,}–{ns[-1]:,}")
            ax.plot(xs, ys, "o-", color=colors[names[rid]],
                    label=f"{names[rid]} ({n_txt}" + (f", {'/'.join(modes)}" if modes else "") + ")")
            bad = [(p[0], p[1]) for p in pts if p[2]]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", markersize=10, mew=2,
                        label="unreliable (flagged)" if "unreliable" not in drawn_paper else None)
                drawn_paper.add("unreliable")
            # the paper's curve only for a comparable model (same architecture and data), once per paper model
            if paper_curves and row.paper_key and row.not_compared is None and row.paper_key not in drawn_paper:
                facts = paper.paper_values(row.paper_key, dataset=paper.paper_dataset(row.dataset) or "cifar10",
                                           metric="robust_acc", attack=attack, norm=norm, variant=False)
                if facts:
                    drawn_paper.add(row.paper_key)
                    fx = sorted((f["eps"], f["value"]) for f in facts)
                    nf = sorted({f.get("n_examples") for f in facts if f.get("n_examples")})
                    info = paper.load_facts()["models"].get(row.paper_key, {})
                    ax.plot(*zip(*fx), "--", color=colors[names[rid]], alpha=0.6, lw=1,
                            label=f"paper: {info.get('label', row.paper_key)}"
                                  + (f" (n={nf[-1]:,})" if nf else ""))
        ticks = sorted(all_eps)
        ax.set_xlim(0, max(ticks) * 1.06 if ticks else 1)
        if norm == "linf" and ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([eps_label(e, "linf") for e in ticks], fontsize=8)
        ax.set_ylim(-2, 100)  # a point at 0 % stays visible
        ax.set_xlabel(f"ε ({NORM_NAMES.get(norm, norm)}" + (", pixel scale /255" if norm == "linf" else "") + ")")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"{ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)} on "
                     f"{', '.join(sorted(datasets))}: robust accuracy vs ε" + left_out, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, f"robust-{attack}-{norm}", paths)

    # accuracy vs severity per corruption, the clean accuracy as a dotted reference line
    if data.corruptions and "corruptions" in only:
        shown, colors, left_out = _figure_models(data, names, corr_by)
        shown_rows = data.rows if not left_out else [rows[rid] for rid in shown]
        points = [c for rid in shown for c in corr_by[rid]]
        by_panel: dict[tuple, list[tuple]] = {}
        for c in points:
            if c["severity"] is not None:
                by_panel.setdefault((c["run_id"], c["corruption"]), []).append((c["severity"], c["value"]))
        cnames = sorted({c["corruption"] for c in points})
        ncol = min(5, len(cnames))
        nrow = math.ceil(len(cnames) / ncol)
        vals = [c["value"] for c in points] + [r.corruption["clean"] for r in shown_rows
                                               if r.corruption.get("clean") is not None]
        lo, hi = min(vals), max(vals)
        pad = max(2.0, 0.08 * (hi - lo))
        legend_rows = max(1, math.ceil(2 * len(shown) / 4))  # a line and a clean line per model, 4 a row
        header = 0.75 + 0.2 * (legend_rows - 1)  # inches for the title and the legend
        height = 2.5 * nrow + header
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.7 * ncol, height), squeeze=False, sharey=True)
        n_ex = sorted({r.corruption.get("n_examples") for r in shown_rows if r.corruption.get("n_examples")})
        datasets = sorted({rows[rid].dataset or "?" for rid in shown})

        def line_label(rid):  # n in the title when every model has the same, else per model
            n = rows[rid].corruption.get("n_examples")
            return names[rid] if len(n_ex) == 1 else f"{names[rid]} (n={n:,})" if n else f"{names[rid]} (n=?)"

        for ax, cn in zip(axes.flat, cnames):
            for rid in shown:
                pts = sorted(by_panel.get((rid, cn), []))
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=line_label(rid))
                    clean = rows[rid].corruption.get("clean")
                    if clean is not None:
                        ax.axhline(clean, ls=":", lw=1, color=colors[names[rid]],
                                   label=f"{names[rid]}: clean")
            ax.set_title(cn.replace("_", " "), fontsize=9)
            ax.set_xticks([1, 2, 3, 4, 5])
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(cnames):]:
            ax.axis("off")
        legend = {}  # every model once, whichever panel it first appears in (not all models have all corruptions)
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(lab, h)
        handles, labels = list(legend.values()), list(legend)
        for i, ax in enumerate(axes.flat):
            if i % ncol == 0:
                ax.set_ylabel("accuracy (%)")
            if i >= len(cnames) - ncol:
                ax.set_xlabel("severity")
        fig.suptitle(f"Accuracy under each corruption vs severity on {', '.join(datasets)}; dotted: the model's "
                     "clean accuracy" + (f" (n={n_ex[-1]:,} test images)" if len(n_ex) == 1 else "") + left_out,
                     fontsize=9,
                     y=1 - 0.05 / height, va="top")
        fig.tight_layout(rect=(0, 0, 1, 1 - (header - 0.25) / height))
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=8,
                   bbox_to_anchor=(0.5, 1 - 0.25 / height), frameon=False)
        _save(fig, out_dir, "corruptions", paths)

    # accuracy vs relaxation steps
    if data.steps and "steps" in only:
        shown, colors, left_out = _figure_models(data, names, steps_by)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        keys = set()
        for rid in shown:
            pts = sorted((s["T"], s["value"]) for s in steps_by[rid])
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, color=colors[names[rid]], label=names[rid])
                if rows[rid].paper_key and rows[rid].not_compared is None:  # comparability rule
                    keys.add(rows[rid].paper_key)
        for key in sorted(keys):
            facts = paper.paper_values(key, metric="accuracy_vs_steps")
            if facts and paper_curves:
                ax.plot(*zip(*sorted((f["T"], f["value"]) for f in facts)), "--", color="gray",
                        label=f"paper ({paper.load_facts()['models'][key]['label']}, CIFAR-10)")
        ax.set_xscale("log")
        ts = sorted({s["T"] for rid in shown for s in steps_by[rid]})
        ax.set_xticks(ts)
        ax.set_xticklabels([str(t) for t in ts], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel("relaxation steps T (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("EP convergence: test accuracy vs relaxation steps T ("
                     + ", ".join(sorted({rows[rid].dataset or "?" for rid in shown})) + ")" + left_out)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out_dir, "steps", paths)

    # unroll-length sweep
    if data.unroll and "unroll" in only:
        unroll_by: dict[str, list[dict]] = {}
        for u in data.unroll:
            unroll_by.setdefault(u["run_id"], []).append(u)
        shown, _, left_out = _figure_models(data, names, unroll_by)
        groups = sorted({(u["run_id"], u["attack"], u["norm"]) for rid in shown for u in unroll_by[rid]})
        fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
        for ax, (rid, attack, norm) in zip(axes.flat, groups):
            us = [u for u in unroll_by[rid] if (u["attack"], u["norm"]) == (attack, norm)]
            epss = sorted({u["eps"] for u in us})
            cmap = plt.get_cmap("viridis")
            for i, e in enumerate(epss):
                pts = sorted((u["K"], u["value"]) for u in us if u["eps"] == e)
                color = cmap(i / max(1, len(epss) - 1))
                ax.plot(*zip(*pts), "o-", ms=3, color=color, label=f"ε={eps_label(e, norm)}")
                key = rows[rid].paper_key
                facts = paper.paper_values(key, dataset=paper.paper_dataset(rows[rid].dataset) or "cifar10",
                                           attack=attack, norm=norm, eps=e, variant="unroll-sweep") \
                    if key and paper_curves and rows[rid].not_compared is None else []
                if facts:
                    fx = sorted((int(f["grad_mode"].split(":")[1]), f["value"]) for f in facts)
                    ax.plot(*zip(*fx), "--", color=color, alpha=0.5, lw=1, label=f"ε={eps_label(e, norm)} (paper)")
            ax.set_xlabel("attack unroll length K (truncated:K)")
            ax.set_ylabel("robust accuracy (%)")
            ax.set_ylim(0, 100)
            ns = sorted({u.get("n") for u in us if u.get("n")})
            ax.set_title(f"{names[rid]}: {ATTACK_NAMES.get(attack, attack)} {NORM_NAMES.get(norm, norm)} on "
                         f"{rows[rid].dataset}" + (f", n={ns[-1]:,}" if len(ns) == 1 else ""), fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        if left_out:
            fig.suptitle(left_out.strip(" ()"), fontsize=9)
        fig.tight_layout()
        _save(fig, out_dir, "unroll", paths)

    # adversarial-example grid
    grid = _adversarial_grid(data, names) if "adversarial" in only else None
    if grid is not None:
        _save(grid, out_dir, "adversarial-examples", paths)
    # where in spatial frequency the attacks put their perturbations (the paper's "semantic" perturbations)
    spectrum = spectrum_figure(data, names) if "spectrum" in only else None
    if spectrum is not None:
        _save(spectrum, out_dir, "perturbation-spectrum", paths)
    return paths
