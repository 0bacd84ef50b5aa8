"""html_report(): one self-contained HTML page (no external references): the leaderboard tables, the
unreliable results, the paper beside the results, the corruption table, and the figures inlined (SVG, or base64
PNG for image grids)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Iterable

from epcli.report.datamodel import ATTACK_NAMES, Cell, Column, ReportData, _fmt, _short
from epcli.report.tables import _PAPER_NOTE, _corr_text, _not_compared_lines, _sub, ci_text, clean_note, model_notes

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1b1f24;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;white-space:nowrap}
td .sub{display:block;color:#57606a;font-size:11px}
td.unreliable{background:#ffebe9;color:#a40e26}.status{color:#9a6700;font-size:11px}
.pos{color:#1a7f37}.neg{color:#cf222e}.muted{color:#57606a;font-size:12px}
figure{margin:16px 0}figure svg,figure img{max-width:100%;height:auto}
figcaption{color:#57606a;font-size:12px}code{font-size:12px}
"""


def _h(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _html_cell(cell: Cell | None, worst: bool = False) -> str:
    if cell is None or cell.value is None:
        return '<td class="num">—</td>'
    cls = "num unreliable" if cell.unreliable else "num"
    title = f' title="unreliable: {_h(cell.reason)}"' if cell.unreliable else ""
    flag = " ⚠" if cell.unreliable else ""
    paper_line = ""
    if cell.paper is not None:
        paper_line = f'<span class="sub">paper {cell.paper:.2f} ({cell.diff:+.2f})</span>'
    elif cell.not_compared:
        title = title or f' title="not compared with the paper: {_h(cell.not_compared)}"'
    sub = f'<span class="sub">{_h(_sub(cell, " · "))}</span>'
    if cell.members:  # an ensemble: robust % after each member in turn, the last being the value
        sub += '<span class="sub">after ' + _h(" · ".join(f"{ATTACK_NAMES.get(m, m)} {v:.2f}"
                                                          for m, v in cell.members)) + "</span>"
    lower = [] if worst else [r for r in cell.left_out if r["value"] < cell.value]
    if lower:  # results it is not exact over (other images or T) that are lower: the value may overstate
        sub += '<span class="sub">lower, not in the cell: ' + _h(" · ".join(
            f"{r['value']:.2f} (n={r['n_examples']}, {r['why']})" for r in lower[:3])) + "</span>"
    return f'<td class="{cls}"{title}>{cell.value:.2f}{flag}{sub}{paper_line}</td>'


def _html_leaderboard(data: ReportData, cols: list[Column], id_: str) -> str:
    head = "".join(f"<th>{_h(c)}</th>" for c in ["model", "run", "data", "clean"] + [c.label for c in cols]
                   + ["CIFAR-C", "mCE (unnorm.)", "rel. mCE"])
    body = []
    for row in data.rows:
        status = "" if row.status == "finished" else f' <span class="status">{_h(row.status)}</span>'
        corr = row.corruption
        cc = f'<td class="num">{_h(_corr_text(corr))}</td>' + "".join(
            f'<td class="num">{_fmt(corr.get(k))}</td>' for k in ("mce", "relative_mce"))
        notes = "".join(f'<span class="sub">{_h(n)}</span>' for n in model_notes(row))
        body.append(f"<tr><td>{_h(row.name or row.label)}{status}{notes}</td>"
                    f"<td><code>{_h(_short(row.run_id))}</code></td>"
                    f"<td>{_h(row.dataset)}</td><td class=\"num\">{_fmt(row.clean_acc)}"
                    + (f'<span class="sub">{_h(clean_note(row))}</span>' if row.clean_acc is not None else "")
                    + "</td>"
                    + "".join(_html_cell(row.cells.get(c.key), c.attack == "worst") for c in cols) + cc + "</tr>")
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _inline_figure(path: Path) -> str:
    if path.suffix == ".svg":
        text = path.read_text()
        start = text.find("<svg")
        if start < 0:
            return ""
        # drop the RDF metadata block (namespace URLs only, but no external reference should remain)
        svg = re.sub(r"<metadata>.*?</metadata>\s*", "", text[start:], flags=re.S)
        # several figures share one page: make every element id (and every reference to one) unique
        pre = re.sub(r"[^A-Za-z0-9_-]", "-", path.stem) + "-"
        svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{pre}{m.group(1)}"', svg)
        svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{pre}{m.group(1)}"', svg)
        return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{pre}{m.group(1)})", svg)
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_h(path.stem)}" src="data:image/png;base64,{data}">'


_CAPTIONS = {
    "robust": "Robust accuracy vs ε (linear axis; L∞ ticks at the measured k/255), one line per model with its n "
              "and gradient mode (none for a black-box attack); dashed: the paper's curve, only for a model "
              "comparable with the paper's; red ×: "
              "result flagged unreliable.",
    "corruptions": "Accuracy vs corruption severity (latest corrupt run per model); dotted: the model's clean "
                   "accuracy on the same images. The y axis is fitted to the data.",
    "steps": "Accuracy vs number of relaxation steps T (EP convergence, 'characteristic time'); dashed: paper "
             "(comparable models only).",
    "unroll": "Robust accuracy vs the unroll length K of the attack gradient (truncated:K): a plateau for large "
              "K means the truncation does not mask the gradient.",
    "corruption-samples": "Test images under each evaluated corruption (rows), clean then severities (columns); "
                          "seeded: the exact images the model was scored on.",
    "adversarial-examples": "Per norm, one test image every shown model classifies correctly when clean, attacked at "
                            "growing ε: adversarial image with the predicted class (red: changed) and the "
                            "perturbation amplified by the factor written above it.",
    "perturbation-spectrum": "Where in spatial frequency each model's attack put its perturbation δ = x_adv − x: "
                             "the share of its energy at frequencies up to r cycles per image (2-D DFT, mean over "
                             "the adversarial images the attack run kept and their channels). A curve that rises "
                             "early: smooth, object-like perturbations (the paper saw them on the EP-CNN); late: "
                             "high-frequency noise. n: kept images the attack changed.",
}


def html_report(data: ReportData, figures: Iterable[str | Path] | None = None) -> str:
    """One self-contained HTML page: tables, the paper comparison, figures inlined (SVG, or base64 PNG)."""
    figs = [Path(f) for f in (figures or [])]
    chosen: dict[str, Path] = {}
    for f in figs:  # prefer SVG for line charts, PNG for the image grid (smaller, crisp enough)
        want_svg = f.stem not in ("adversarial-examples", "corruption-samples")  # image grids: PNG
        cur = chosen.get(f.stem)
        if cur is None or (f.suffix == ".svg") == want_svg:
            chosen[f.stem] = f
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>epcli report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>epcli report: how robust are EP-trained energy-based models?</h1>",
             f'<p class="muted">Store <code>{_h(data.store_root)}</code> · generated {_h(data.generated_at)} · '
             f'{len(data.rows)} model(s) · accuracies in %. Each cell is the result on the most images (n), then '
             f'the exact worst case over the other results on those same images; below the value: example count '
             f'and gradient mode (none for the black-box Square attacks). The clean column is the training run\'s '
             f'accuracy on its whole test split (its '
             f'own n, not the attacked images\'). A paper number stands beside a result only when model, dataset, '
             f'threat model, n and gradient mode are comparable. "predicted labels, incl. X clean errors": the '
             f'attack moved away from the model\'s own predictions (the paper\'s protocol), and X points of the '
             f'value are images misclassified clean that it moved onto their true label.</p>']
    if data.notes:
        parts.append("<ul>" + "".join(f"<li>{_h(n)}</li>" for n in data.notes) + "</ul>")
    parts.append("<h2>Leaderboard</h2>")
    parts.append(_html_leaderboard(data, data.headline_columns() or data.columns, "leaderboard"))
    if len(data.columns) > len(data.headline_columns()):
        parts.append("<details><summary>every attack, norm and ε</summary>"
                     + _html_leaderboard(data, data.columns, "leaderboard-all") + "</details>")
    flagged = [(r, c, r.cells[c.key]) for r in data.rows for c in data.columns
               if c.key in r.cells and r.cells[c.key].unreliable]
    if flagged:
        parts.append("<h2>Unreliable results</h2><ul>" + "".join(
            f"<li>{_h(r.name or r.label)} · {_h(c.label)}: {_h(cell.reason)} (run <code>{_h(_short(cell.run_id))}"
            f"</code>)</li>" for r, c, cell in flagged) + "</ul>")
    if data.comparisons:
        rows = []
        for c in data.comparisons:
            if c.not_compared is not None:
                continue
            p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
            cls = "pos" if c.diff >= 0 else "neg"
            rows.append(f"<tr><td>{_h(c.label)}</td><td>{_h(c.what)}</td><td class=\"num\">{c.epcli:.2f}</td>"
                        f"<td class=\"num\">{_h(ci_text(c.ci95, c.n_examples))}</td><td class=\"num\">{p}</td>"
                        f"<td class=\"num {cls}\">{c.diff:+.2f}</td>"
                        f"<td>{_h('; '.join(c.reasons) or '—')}</td><td>{_h(c.section)}</td></tr>")
        parts.append(f"<h2>The paper beside the results</h2><p class=\"muted\">{_h(_PAPER_NOTE)}</p>")
        if rows:
            parts.append("<table id=\"paper\"><thead><tr><th>model</th><th>metric</th><th>epcli</th>"
                         "<th>epcli 95% CI (n)</th><th>paper</th><th>diff</th><th>protocol differences</th>"
                         "<th>paper §</th></tr></thead><tbody>"
                         + "".join(rows) + "</tbody></table>")
        lines = _not_compared_lines(data)
        if lines:
            parts.append('<ul id="not-compared">' + "".join(f"<li>{_h(x)}</li>" for x in lines) + "</ul>")
    corr_rows = [r for r in data.rows if r.corruption]
    if corr_rows:
        parts.append("<h2>Natural corruptions (CIFAR-10-C)</h2><table id=\"corruptions\"><thead><tr><th>model</th>"
                     "<th>clean (corrupt run)</th><th>benchmark mean</th><th>taken over</th><th>mean, all 19</th>"
                     "<th>mCE (unnormalized)</th><th>relative mCE</th><th>run</th></tr></thead><tbody>" + "".join(
                         f"<tr><td>{_h(r.name or r.label)}</td>" + "".join(
                             f'<td class="num">{_fmt(r.corruption.get(k))}</td>' for k in ("clean", "mean"))
                         + f"<td>{_h(r.corruption.get('mean_label', '—'))}</td>" + "".join(
                             f'<td class="num">{_fmt(r.corruption.get(k))}</td>'
                             for k in ("mean_all", "mce", "relative_mce"))
                         + f"<td><code>{_h(_short(r.corruption.get('run_id')))}</code></td></tr>"
                         for r in corr_rows) + "</tbody></table>")
    if chosen:
        parts.append("<h2>Figures</h2>")
        for stem, f in chosen.items():  # in the order figures() wrote them
            cap = _CAPTIONS.get(stem.split("-")[0] if stem.startswith("robust") else stem, "")
            parts.append(f'<figure id="fig-{_h(stem)}">{_inline_figure(f)}<figcaption>{_h(stem)}: {_h(cap)}'
                         f"</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
