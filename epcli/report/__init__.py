"""Reports over the store: leaderboard, exports, figures, the paper side by side, HTML, lineage tree.

Everything here reads the store only (no recomputation; no torch, no models, no attacks). The flow is

    data = collect(store, models=None, runs=None, dataset=None)   # a handful of queries -> ReportData
    render(data, "table" | "csv" | "json" | "md" | "html" | "robustbench") -> str
    figures(data, out_dir) -> [png, svg, ...]                       # matplotlib, Agg
    html_report(data, figures) -> str                               # one self-contained file
    lineage_tree(store, run_id) -> rich.tree.Tree

Conventions:
- Accuracies are shown in percent. The store's accuracy metrics are fractions in [0, 1]; a store whose
  accuracy values exceed 1 is taken to hold percent already (`ReportData.scale` records which).
- A leaderboard cell (model x attack x norm x eps) is the result on the largest n (ties: the strongest), then
  the exact per-image worst case over the other results on the same test images (per-example outcomes);
  results on other images are never mixed in. Failed and interrupted runs never contribute.
- A cell is flagged unreliable when a result it rests on was logged with unreliable=1 (reason from its
  detail, or from the run's failed checks).
- The comparability rule: a paper number stands beside epcli's only when model, dataset, threat model, n and
  gradient mode are comparable; otherwise the place says why (docs/report.md).
- The CIFAR-C numbers come from the latest corrupt run of a model; every mean says what it was taken over.

The modules, each importing only those above it:

    datamodel    Column, Cell, Row, Comparison, ReportData; attack and norm names; shared text helpers
    coverage     which CIFAR-C corruptions x severities a run covered; the means a report may show
    comparison   the comparability rule, protocol differences, the paper's numbers beside epcli's
    reader       collect(): the store -> ReportData (cells, worst cases, corruption summaries, sweeps)
    tables       terminal table, CSV, JSON, Markdown; the notes beside a model
    robustbench  RobustBench's model_info records and folder layout
    html_page    html_report(): the self-contained HTML page
    formats      render(data, fmt): a format name -> text
    plotting     what every figure shares (Agg backend, PNG + SVG, colours, which models to draw)
    image_grids  the adversarial-example grid and the corruption sample grid
    perturbations  the perturbations' spatial-frequency spectrum per model
    charts       figures(): every figure the data supports
    runs         lineage tree, training history, curves and diff of single training runs

This file only re-exports the names callers use (`from epcli.report import collect, render`).
"""

from __future__ import annotations

from epcli.report.charts import FIGURE_KINDS, figures
from epcli.report.comparison import (
    ART_AUTOATTACK_BUDGET,
    MIN_N,
    PAPER_DATASETS,
    PAPER_EP_CHANNELS,
    PAPER_REGISTRY,
    SQUARE_VARIANT_ITERATIONS,
    cell_not_comparable,
    model_not_comparable,
    protocol_reasons,
)
from epcli.report.coverage import (
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    corruption_coverage,
    corruption_mean_label,
)
from epcli.report.datamodel import (
    ACC_METRICS,
    ATTACK_NAMES,
    ATTACK_ORDER,
    BLACK_BOX,
    ENSEMBLES,
    HEADLINE_ATTACKS,
    NORM_NAMES,
    PAPER_ATTACK_OF,
    PAPER_EPOCHS,
    STANDARD_EPS,
    WHITE_BOX,
    Cell,
    Column,
    Comparison,
    ReportData,
    Row,
    eps_label,
    result_grad_mode,
    wilson95,
)
from epcli.report.formats import FORMATS, render
from epcli.report.html_page import html_report
from epcli.report.image_grids import choose_image, corruption_samples
from epcli.report.plotting import ADVERSARIAL_MODELS, FIGURE_MODELS
from epcli.report.reader import METRIC_COLUMNS, collect
from epcli.report.perturbations import LOW_FREQUENCY, low_frequency_share, radial_spectrum, spectra, spectrum_figure
from epcli.report.robustbench import (
    PAPER_AUTHORS,
    PAPER_LINK,
    ROBUSTBENCH_DATASETS,
    ROBUSTBENCH_EPS,
    robustbench_files,
    robustbench_id,
    robustbench_json,
    write_robustbench,
)
from epcli.report.runs import (
    CURVE_METRICS,
    flatten_config,
    lineage_tree,
    output_folder,
    training_curves,
    training_diff,
    training_history,
)
from epcli.report.tables import (ci_text, clean_note, leaderboard_table, left_out_notes, member_notes, model_notes,
                                 to_dict)

__all__ = ["Cell", "Column", "Comparison", "ReportData", "Row", "FORMATS", "cell_not_comparable", "choose_image",
           "clean_note", "collect", "corruption_coverage", "corruption_mean_label", "corruption_samples", "eps_label",
           "figures", "flatten_config", "html_report", "leaderboard_table", "lineage_tree", "model_not_comparable",
           "left_out_notes", "member_notes", "model_notes", "output_folder", "protocol_reasons", "render",
           "robustbench_files",
           "robustbench_id", "robustbench_json", "ci_text", "wilson95", "low_frequency_share", "radial_spectrum",
           "spectra", "spectrum_figure",
           "result_grad_mode", "to_dict", "training_curves", "training_diff", "training_history", "write_robustbench",
           # constants callers read (tests, bench, the corrupt and report pipelines)
           "ACC_METRICS", "ADVERSARIAL_MODELS", "ART_AUTOATTACK_BUDGET", "ATTACK_NAMES", "ATTACK_ORDER",
           "BENCHMARK_CORRUPTIONS", "BLACK_BOX", "ENSEMBLES",
           "CURVE_METRICS", "EXTRA_CORRUPTIONS", "FIGURE_KINDS", "LOW_FREQUENCY", "FIGURE_MODELS", "HEADLINE_ATTACKS",
           "METRIC_COLUMNS", "MIN_N", "NORM_NAMES", "PAPER_ATTACK_OF", "PAPER_AUTHORS", "PAPER_DATASETS",
           "PAPER_EP_CHANNELS",
           "PAPER_EPOCHS", "PAPER_LINK", "PAPER_REGISTRY", "ROBUSTBENCH_DATASETS", "ROBUSTBENCH_EPS", "SEVERITIES",
           "SQUARE_VARIANT_ITERATIONS",
           "STANDARD_EPS", "WHITE_BOX"]
