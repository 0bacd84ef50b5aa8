"""The report's data model: the dataclasses every other part of the report reads (Column, Cell, Row,
Comparison, ReportData), the names and order of attacks and norms, and the small text helpers the renderers share
(eps_label, _short, _grad, _fmt, _json, _label). Nothing here reads the store or draws."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

ATTACK_ORDER = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "square", "art-square", "autoattack",
                "art-autoattack", "worst")
ATTACK_NAMES = {"fgsm": "FGSM", "pgd": "PGD", "cw": "C&W", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T",
                "fab-t": "FAB-T", "square": "Square", "art-square": "Square (ART)", "autoattack": "AutoAttack",
                "art-autoattack": "AutoAttack (ART)", "worst": "worst case over attacks",
                "apgd-dlr": "APGD-DLR", "deepfool": "DeepFool"}  # the last two: members of ART's AutoAttack
HEADLINE_ATTACKS = ("fgsm", "pgd", "cw", "square", "art-square", "autoattack", "art-autoattack", "worst")
WHITE_BOX = ("fgsm", "pgd", "cw", "apgd-ce", "apgd-t", "fab-t", "autoattack", "art-autoattack")
ENSEMBLES = ("autoattack", "art-autoattack")  # their cells carry the robust accuracy after each member
BLACK_BOX = ("square", "art-square")  # they only query the model: a gradient mode means nothing for them
# The paper ran its Square and AutoAttack through ART: only epcli's ports of ART's algorithms measure the same
# thing; epcli's own square/autoattack follow fra31's code, a different algorithm (docs/report.md).
PAPER_ATTACK_OF = {"pgd": "pgd", "art-square": "square", "art-autoattack": "autoattack"}
NORM_NAMES = {"linf": "L∞", "l2": "L2"}
STANDARD_EPS = {"linf": 8 / 255, "l2": 0.5}
ACC_METRICS = ("clean_acc", "robust_acc", "corruption_acc", "corruption_mean_acc", "corruption_mean_acc_all",
               "mce_unnormalized", "relative_mce", "accuracy_vs_steps")
PAPER_EPOCHS = {"ep-cnn": 120, "cnn": 45, "vit": 200}


# --- data model --------------------------------------------------------------------------------------------

@dataclass
class Column:
    key: str            # "pgd:linf:8/255"
    attack: str
    norm: str
    eps: float
    label: str          # "PGD L∞ 8/255"
    headline: bool = False


@dataclass
class Cell:
    value: float | None          # percent
    n_examples: int | None = None
    grad_mode: str | None = None
    unreliable: bool = False
    reason: str | None = None
    run_id: str | None = None
    status: str = "finished"     # of the attack run that produced the value
    n_results: int = 1           # how many results the minimum was taken over
    paper: float | None = None   # the paper's number for this cell (percent)
    paper_std: float | None = None
    forward_passes: int | None = None  # from the result's detail, when the attack logged it (whole attack)
    forward_passes_T: int | None = None  # the relaxation steps T the attacked model predicted with (detail "T")
    diff: float | None = None    # epcli - paper, percentage points
    reasons: list[str] = field(default_factory=list)  # protocol differences vs the paper
    not_compared: str | None = None  # why the paper's number is not set beside this one (comparability rule)
    worst_of: list[str] = field(default_factory=list)  # "run_id grad_mode" of each result the minimum is exact over
    attack_clean: float | None = None  # clean accuracy (percent) on the images this result attacked
    # predicted labels (the paper's protocol), one result: the part of value (percent points) that is images
    # misclassified clean which the attack moved onto their true label
    from_clean_errors: float | None = None
    labels: str | None = None  # one result: "predicted" or "true", the labels its attack moved away from
    # one ensemble result (AutoAttack): [member, robust % after it], in the order the members ran
    members: list[list] | None = None
    ci95: list[float] | None = None  # Wilson 95 % interval of value, a proportion of n_examples images (percent)
    # results for this cell that value is not exact over (other images, other T, no per-image outcomes), lowest
    # first: {run_id, attack, grad_mode, n_examples, value (percent), why}; a lower one means value may overstate
    left_out: list[dict] = field(default_factory=list)


@dataclass
class Row:
    run_id: str
    model: str
    label: str
    dataset: str | None
    status: str
    paper_key: str | None
    clean_acc: float | None
    epochs: int | None
    config: dict
    clean_n: int | None = None   # the images clean_acc was measured on (None: not recorded by older runs)
    clean_from: str = "test split"  # "test split": the training run's own test evaluation; else an attack's images
    clean_ci95: list[float] | None = None  # Wilson 95 % interval of clean_acc over clean_n images (percent)
    cells: dict[str, Cell] = field(default_factory=dict)
    corruption: dict[str, Any] = field(default_factory=dict)  # mean, mean_all, mce, relative_mce, run_id, ...
    failed_checks: list[str] = field(default_factory=list)
    derived_running: int = 0     # attack/corrupt runs of this model still running
    seed: int | None = None
    name: str = ""               # unique display name (label, plus seed or run id when labels repeat)
    not_compared: str | None = None  # why no paper number is set beside this model's (model or data differ)
    equilibrium: dict[str, Any] = field(default_factory=dict)  # relax_residual at prediction (EP-CNNs)
    selection: str | None = None  # checkpoint selection: last, best-val, best-test

    @property
    def unreliable(self) -> bool:
        return any(c.unreliable for c in self.cells.values())


@dataclass
class Comparison:
    run_id: str
    label: str
    paper_key: str
    what: str                    # "clean", "PGD L∞ 8/255", "CIFAR-C mean"
    epcli: float
    paper: float | None          # None when not comparable (see not_compared)
    paper_std: float | None
    diff: float | None
    n_examples: int | None
    reasons: list[str]
    section: str | None
    not_compared: str | None = None
    ci95: list[float] | None = None  # Wilson 95 % interval of epcli (clean and robust accuracies; percent)


@dataclass
class ReportData:
    rows: list[Row]
    columns: list[Column]
    curves: list[dict]           # robust accuracy per model/attack/norm/eps (worst case), for the eps figures
    corruptions: list[dict]      # per model/corruption/severity accuracy (latest corrupt run)
    steps: list[dict]            # accuracy vs relaxation steps
    unroll: list[dict]           # robust accuracy vs truncated:K
    adversarial: list[dict]      # adversarial-examples artifacts: run ids, label, path
    comparisons: list[Comparison]
    store_root: str
    generated_at: str
    filters: dict
    scale: str                   # "fraction" or "percent": what the store held
    notes: list[str] = field(default_factory=list)

    def headline_columns(self) -> list[Column]:
        return [c for c in self.columns if c.headline]


# --- helpers -----------------------------------------------------------------------------------------------

def eps_label(eps: float, norm: str | None = None) -> str:
    """8/255-style for L-inf values that are k/255, else %g."""
    if norm != "l2":
        k = eps * 255
        if k >= 0.5 and abs(k - round(k)) < 1e-5 * max(1.0, k):  # 0.0314 is not 8/255; 0.0313725 is
            return f"{int(round(k))}/255"
    return f"{eps:g}"


def wilson95(percent: float | None, n: int | None) -> list[float] | None:
    """The Wilson score 95 % interval (percent) of a proportion measured on n images: how far the same model's
    accuracy on other images of the same size could lie. Valid for a worst case over attacks on the same n
    images too (still a proportion of them); not for a mean over corruptions (correlated, not one proportion)."""
    if percent is None or not n or n <= 0 or not 0.0 <= percent <= 100.0:
        return None
    z, p = 1.959963984540054, percent / 100.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(100.0 * max(0.0, centre - half), 4), round(100.0 * min(1.0, centre + half), 4)]


def _json(text: Any) -> Any:
    if text is None or isinstance(text, (dict, list)):
        return text
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def _label(run: dict) -> str:
    cfg = run["config"] if isinstance(run.get("config"), dict) else {}
    if cfg.get("label"):
        return str(cfg["label"])
    name = run.get("model") or cfg.get("model") or "?"
    adv = cfg.get("adv") or ((cfg.get("recipe") or {}).get("adv") if isinstance(cfg.get("recipe"), dict) else None)
    if isinstance(adv, dict) and adv.get("eps") is not None:
        return f"{name} (AT {NORM_NAMES.get(str(adv.get('norm')), adv.get('norm'))} ε={float(adv['eps']):g})"
    return str(name)


def _short(run_id: str | None) -> str:
    return (run_id or "")[:10]


def _grad(g: str | None) -> str:
    if not g:
        return "-"
    if g.startswith("transfer:"):
        return "transfer:" + _short(g.split(":", 1)[1])
    return g


def result_grad_mode(attack: str | None, grad_mode: str | None) -> str | None:
    """The gradient mode a result was obtained with, as shown: None for a black-box attack, which takes no
    gradient (the run's grad_mode config is then only the default bptt), unless it queried a transfer model."""
    if attack in BLACK_BOX and not (grad_mode or "").startswith("transfer"):
        return None
    return grad_mode


def _fmt(v: float | None, nd: int = 2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"
