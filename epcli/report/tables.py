"""The leaderboard as text: the terminal table (rich), CSV, JSON (to_dict) and Markdown; the notes set
beside a model (model_notes, clean_note) and the lines on what was not compared with the paper, which the HTML
page shares."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import fields

from epcli.errors import printable
from epcli.report.datamodel import ATTACK_NAMES, ENSEMBLES, Cell, Column, ReportData, Row, _fmt, _grad, _short


def _columns(data: ReportData, which: str) -> list[Column]:
    if which == "all":
        return data.columns
    return data.headline_columns() or data.columns


def _sub(cell: Cell, sep: str) -> str:
    """The line under a value: example count, gradient mode (when the result has one), running."""
    bits = [f"n={cell.n_examples if cell.n_examples is not None else '?'}"]
    attacks = list(dict.fromkeys(w.split()[1] for w in cell.worst_of if len(w.split()) > 2))
    if len(attacks) > 1:
        bits.append("worst of " + "+".join(ATTACK_NAMES.get(x, x) for x in attacks))
    elif cell.grad_mode:
        bits.append(_grad(cell.grad_mode) if "+" not in cell.grad_mode else
                    "worst of " + "+".join(_grad(g) for g in cell.grad_mode.split("+")))
    elif cell.n_results > 1:
        bits.append(f"worst of {cell.n_results}")
    if cell.labels == "predicted":  # robust then includes errors moved onto their label: how many, when recorded
        bits.append("predicted labels" + (f", incl. {cell.from_clean_errors:.2f} clean errors"
                                          if cell.from_clean_errors is not None else ""))
    if cell.status == "running":
        bits.append("running")
    return sep.join(bits)


def _corr_text(corr: dict, unit: str = "") -> str:
    """The CIFAR-C mean with the set it was taken over ("40.00 (5/15 × 5 sev.)"), or — ."""
    if corr.get("mean") is None:
        return "—"
    cov = corr.get("coverage")
    if not cov:
        return f"{corr['mean']:.2f}"
    if cov.get("complete15"):
        return f"{corr['mean']:.2f} (15 × 5 sev.)"
    sev = cov.get("severities") or []
    return f"{corr['mean']:.2f} ({len(cov['benchmark'])}/15 × {len(sev)} sev.)"


def _residual_tol(eq: dict) -> float | None:
    if eq.get("tol") is not None:
        return float(eq["tol"])
    import sys
    ep = sys.modules.get("epcli.ep")  # only when already loaded: a report never imports torch itself
    for name in ("EQUILIBRIUM_TOL",):
        if ep is not None and isinstance(getattr(ep, name, None), (int, float)):
            return float(getattr(ep, name))
    return None


def model_notes(row: Row) -> list[str]:
    """What a reader must know beside a model's numbers: equilibrium residual, checkpoint selection."""
    notes = []
    eq = row.equilibrium
    if eq.get("residual") is not None:
        t = f" at T={eq['T']}" if eq.get("T") is not None else ""
        sm = eq.get("steps_mean")
        if isinstance(sm, (int, float)) and eq.get("T") is not None and sm < eq["T"]:  # each image stopped on its own
            t = f", {sm:.0f} steps per image on average (cap T={eq['T']})"
        tol = _residual_tol(eq)
        if eq.get("at_equilibrium") is False or (tol is not None and eq["residual"] > tol):
            notes.append(f"NOT converged: residual {eq['residual']:.3g}{t}" + (f" (tolerance {tol:g})" if tol else ""))
        else:
            notes.append(f"at equilibrium: residual {eq['residual']:.3g}{t}")
        adv = eq.get("adversarial")
        if adv:
            over = f" over {adv['predictions']} predictions" if adv.get("predictions") else ""
            if adv.get("unconverged") or (tol is not None and adv["max"] > tol):
                k = f"{adv['unconverged']} " if adv.get("unconverged") is not None else ""
                notes.append(f"adversarial predictions NOT converged: {k}above tolerance, residual up to "
                             f"{adv['max']:.3g}{over} (run {adv['run_id']})")
            else:
                notes.append(f"adversarial predictions at equilibrium: residual up to {adv['max']:.3g}{over}")
    if row.selection:
        notes.append(f"checkpoint: {row.selection}" + (" chosen on the test set"
                                                        if row.selection.startswith("best-test") else ""))
    return notes


def member_notes(row: Row, cols: list[Column]) -> list[str]:
    """An ensemble cell's robust accuracy after each member in turn (AutoAttack's own log lines): the cell's
    value is the last; the earlier ones say which member did the work."""
    notes = []
    for c in cols:
        cell = row.cells.get(c.key)
        if c.attack in ENSEMBLES and cell is not None and cell.members:
            after = ", ".join(f"{ATTACK_NAMES.get(m, m)} {v:.2f}" for m, v in cell.members)
            notes.append(f"{c.label}, robust % after each member in turn (n={cell.n_examples}): {after}")
    return notes


def left_out_notes(row: Row, cols: list[Column]) -> list[str]:
    """Results for a cell that are lower than its value yet not part of it (on other images, with other
    relaxation steps, or without per-image outcomes): the cell may overstate robustness, so the reader sees them."""
    notes = []
    for c in cols:
        cell = row.cells.get(c.key)
        if c.attack == "worst" or cell is None or cell.value is None:
            continue  # a worst-case cell's other results are each in their own attack's column
        lower = [r for r in cell.left_out if r["value"] < cell.value]
        if lower:
            shown = "; ".join(f"{r['value']:.2f} (n={r['n_examples']}, {r['why']}, run {_short(r['run_id'])})"
                              for r in lower[:3])
            more = f"; {len(lower) - 3} more" if len(lower) > 3 else ""
            notes.append(f"{c.label}, lower results not in the cell: {shown}{more}")
    return notes


def clean_note(row: Row) -> str:
    """What the clean accuracy was measured on: "n=1000, test split" (the training run's own evaluation of the
    whole test split, not the attack cells' images) or "n=200, attacked images" when it comes from an attack."""
    where = "test split" if row.clean_from == "test split" else "attacked images"
    return (f"n={row.clean_n}, " if row.clean_n else "") + where


def _clean_text(row: Row, markup: str = "plain") -> str:
    if row.clean_acc is None:
        return "—"
    return f"{row.clean_acc:.2f} ({clean_note(row)})" if markup == "md" else f"{row.clean_acc:.2f}\n{clean_note(row)}"


def _cell_text(cell: Cell | None, *, markup: str = "plain") -> str:
    if cell is None or cell.value is None:
        return "—"
    flag = "⚠" if cell.unreliable else ""
    sub = _sub(cell, ", ")
    if markup == "md":
        return f"{cell.value:.2f}{flag} ({sub})"
    return f"{cell.value:.2f}{flag}\n{sub}"


def leaderboard_table(data: ReportData, columns: str = "headline"):
    """A rich Table: one row per trained model; unreliable cells in red with ⚠."""
    from rich.table import Table
    from rich.text import Text

    cols = _columns(data, columns)
    datasets = {row.dataset for row in data.rows}
    one = next(iter(datasets)) if len(datasets) == 1 and None not in datasets else None  # then said in the title
    # store text (labels, names, dataset folders, reasons) is shown as written: Text, never read as markup
    t = Table(title=Text(printable(f"epcli leaderboard — accuracy % {'on ' + one + ' ' if one else ''}"
                                f"({data.store_root})")),
              show_lines=True, caption_justify="left",
              caption="cells: the result on the most images (n), then the exact worst case over other results on "
                      "those images; n = examples, then gradient mode. ⚠ = unreliable. clean: the training run's "
                      "accuracy on its whole test split (its own n). CIFAR-C: mean of k/15 benchmark corruptions × "
                      "severities run. \"predicted labels, incl. X clean errors\": X points of the value are "
                      "images misclassified clean that the attack moved onto their true label. worst case: exact "
                      "per image over the attacks, on the images they all attacked (its own n)")
    t.add_column("model", style="bold")
    t.add_column("run")
    if not one:
        t.add_column("data")
    t.add_column("clean", justify="right")
    for c in cols:
        t.add_column(c.label, justify="right")
    t.add_column("CIFAR-C", justify="right")
    t.add_column("mCE", justify="right")
    footnotes = []  # a model's notes go under the table: in an 80-column model cell they wrap word by word
    for row in data.rows:
        status = "" if row.status == "finished" else f"\n{row.status}"
        cells = []
        for c in cols:
            cell = row.cells.get(c.key)
            txt = Text(_cell_text(cell))
            if cell is not None and cell.unreliable:
                txt.stylize("red")
            cells.append(txt)
        corr = row.corruption
        notes, mark = model_notes(row) + member_notes(row, cols) + left_out_notes(row, cols), ""
        if notes:
            footnotes.append(f"[{len(footnotes) + 1}] {row.name or row.label}: " + "; ".join(notes))
            mark = f" [{len(footnotes)}]"
        t.add_row(Text(printable((row.name or row.label) + mark + status)), _short(row.run_id),
                  *([] if one else [Text(printable(row.dataset or "—"))]), Text(_clean_text(row)), *cells,
                  Text(_corr_text(corr)), _fmt(corr.get("mce")))
    t.caption = Text(printable(t.caption + ("\n" + "\n".join(footnotes) if footnotes else "")))
    return t


def _rich_text(renderable, width: int = 200) -> str:
    from rich.console import Console
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buf.getvalue()


def _csv(data: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["run_id", "model", "label", "dataset", "status", "paper_key", "clean_acc", "clean_acc:n", "clean_acc:from"]
    for c in data.columns:
        head += [c.key, f"{c.key}:n", f"{c.key}:grad_mode", f"{c.key}:unreliable", f"{c.key}:paper"]
        head += [f"{c.key}:members"] if c.attack in ENSEMBLES else []
    head += ["corruption_mean_acc", "corruption_mean_over", "corruption_mean_acc_all", "mce_unnormalized",
             "relative_mce"]
    w.writerow(head)
    for row in data.rows:
        line = [row.run_id, row.model, row.label, row.dataset or "", row.status, row.paper_key or "",
                "" if row.clean_acc is None else repr(row.clean_acc), row.clean_n or "",
                "" if row.clean_acc is None else row.clean_from]
        for c in data.columns:
            cell = row.cells.get(c.key)
            if cell is None:
                line += [""] * (6 if c.attack in ENSEMBLES else 5)
            else:
                line += [repr(cell.value), cell.n_examples if cell.n_examples is not None else "",
                         cell.grad_mode or "", int(cell.unreliable),
                         cell.paper if cell.paper is not None else (f"not compared: {cell.not_compared}"
                                                                    if cell.not_compared else "")]
                if c.attack in ENSEMBLES:  # "apgd-ce=20.0;apgd-t=15.5;...": robust % after each member
                    line.append(";".join(f"{m}={v!r}" for m, v in cell.members or []))
        for k in ("mean", "mean_label", "mean_all", "mce", "relative_mce"):
            v = row.corruption.get(k)
            line.append("" if v is None else (v if isinstance(v, str) else repr(v)))
        w.writerow(line)
    return buf.getvalue()


def _fields(obj, skip: tuple[str, ...] = ()) -> dict:
    """A flat dataclass as a dict of its fields, without asdict's deep copy (the values are only serialised)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in skip}


def to_dict(data: ReportData) -> dict:
    """A JSON-ready dict of the whole report (accuracies in percent)."""
    rows = []
    for row in data.rows:
        d = _fields(row, skip=("cells", "config"))
        d["unreliable"] = row.unreliable
        d["cells"] = {k: _fields(c) for k, c in row.cells.items()}
        rows.append(d)
    return {"generated_at": data.generated_at, "store": data.store_root, "filters": data.filters,
            "unit": "percent", "store_scale": data.scale,
            "columns": [_fields(c) for c in data.columns], "rows": rows,
            "comparisons": [_fields(c) for c in data.comparisons], "notes": data.notes}


def _json_text(doc: dict) -> str:
    """The report document with one line per column, row, comparison and note: as easy to read and grep as an
    indented dump, and written by json's C encoder (an indented dump runs the pure-Python one over every value,
    seconds at thousands of models)."""
    enc = json.JSONEncoder(ensure_ascii=False, default=str)
    parts = []
    for key, value in doc.items():
        if isinstance(value, list) and value:
            items = ",\n".join("    " + enc.encode(x) for x in value)
            parts.append(f"  {enc.encode(key)}: [\n{items}\n  ]")
        else:
            parts.append(f"  {enc.encode(key)}: {enc.encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _md(data: ReportData, columns: str = "headline") -> str:
    cols = _columns(data, columns)
    out = ["# epcli leaderboard", "",
           f"Accuracy in %. Store `{data.store_root}`, generated {data.generated_at}. Cells: the result on the most "
           "images, then the exact worst case over the other results on the same images (n = examples, gradient "
           "mode); ⚠ = unreliable (see notes). clean: the training run's accuracy on its whole test split (its own "
           "n, not the attacked images'). CIFAR-C: mean over the corruptions × severities that were run. "
           "\"predicted labels, incl. X clean errors\": attacked away from the model's own predictions (the "
           "paper's protocol), so X points of the value are images misclassified clean that the attack moved onto "
           "their true label. Worst-case columns: exact per image over the attacks, on the images they all "
           "attacked (their own n).", ""]
    head = ["model", "run", "data", "status", "clean"] + [c.label for c in cols] + ["CIFAR-C", "mCE"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    flags, members, left_out = [], [], []
    for row in data.rows:
        name = row.name or row.label
        notes = model_notes(row)
        members += [f"- {name}: {m}" for m in member_notes(row, cols)]
        left_out += [f"- {name}: {m}" for m in left_out_notes(row, cols)]
        line = [name + (f" ({'; '.join(notes)})" if notes else ""), f"`{_short(row.run_id)}`", row.dataset or "—",
                row.status, _clean_text(row, "md")]
        for c in cols:
            cell = row.cells.get(c.key)
            line.append(_cell_text(cell, markup="md"))
            if cell is not None and cell.unreliable:
                flags.append(f"- ⚠ {name}, {c.label}: {cell.reason}")
        line += [_corr_text(row.corruption), _fmt(row.corruption.get("mce"))]
        out.append("| " + " | ".join(_md_safe(x).replace("|", "\\|") for x in line) + " |")
    if members:
        out += ["", "AutoAttack, member by member:", ""] + [_md_safe(m) for m in members]
    if left_out:
        out += ["", "Lower results not in their cell (on other images or with other relaxation steps, so no exact "
                "per-image worst case exists; the cell may overstate robustness):", ""]
        out += [_md_safe(m) for m in left_out]
    if flags:
        out += ["", "Unreliable results:", ""] + [_md_safe(f) for f in flags]
    if data.comparisons:
        out += ["", "## The paper beside the results", "", _PAPER_NOTE]
        shown = [c for c in data.comparisons if c.not_compared is None]
        if shown:
            out += ["", "| model | metric | epcli | epcli 95% CI (n) | paper | diff | protocol differences |",
                    "|---|---|---:|---:|---:|---:|---|"]
            for c in shown:
                p = f"{c.paper:.2f}" + (f" ± {c.paper_std:.2f}" if c.paper_std is not None else "")
                out.append(f"| {_md_safe(c.label)} | {c.what} | {c.epcli:.2f} | {ci_text(c.ci95, c.n_examples)} | "
                           f"{p} | {c.diff:+.2f} | {'; '.join(c.reasons) or '—'} |")
        out += [""] + [f"- {line}" for line in _not_compared_lines(data)]
    if data.notes:
        out += ["", "Notes:", ""] + [f"- {_md_safe(n)}" for n in data.notes]
    return "\n".join(out) + "\n"


def _md_safe(text: str) -> str:
    """Store text (labels, model and dataset names, reasons) as inert Markdown: no raw HTML (<script>,
    <img onerror>) and no link or image syntax (javascript: URLs) reaches a renderer."""
    text = printable(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("[", "\\[").replace("]", "\\]")


_PAPER_NOTE = ("A paper number (Mansingh et al. 2024, from the authors' logs, mean ± std over seeds) stands beside "
               "epcli's only when model, dataset, threat model, n and gradient mode are comparable; diff = epcli − "
               "paper, in points. epcli 95% CI: the Wilson interval of epcli's accuracy as a proportion of its n "
               "images (sampling of images only, one seed; none for a mean over corruptions).")


def ci_text(ci: list[float] | None, n: int | None) -> str:
    """"19.54–31.42 (n=200)", or — when there is no interval."""
    return f"{ci[0]:.2f}–{ci[1]:.2f} (n={n:,})" if ci else "—"


def _not_compared_lines(data: ReportData) -> list[str]:
    """One line per model that cannot be compared at all, one per other result that cannot."""
    lines, done = [], set()
    rows = {r.run_id: r for r in data.rows}
    for c in data.comparisons:
        if c.not_compared is None:
            continue
        row = rows.get(c.run_id)
        if row is not None and row.not_compared and c.not_compared == row.not_compared:
            if c.run_id not in done:
                done.add(c.run_id)
                lines.append(f"{c.label}: not compared with the paper ({c.not_compared})")
        else:
            lines.append(f"{c.label}, {c.what}: not compared ({c.not_compared})")
    return lines
