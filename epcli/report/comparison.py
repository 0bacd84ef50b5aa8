"""The paper beside the results. A paper number stands beside epcli's only when model, dataset, threat
model, n and gradient mode are comparable (model_not_comparable, cell_not_comparable; docs/report.md states the
rule); beside a compared number go the protocol differences (protocol_reasons). _compare builds
ReportData.comparisons and sets each compared cell's paper number."""

from __future__ import annotations

import functools
import math

from epcli import paper
from epcli.report.datamodel import (PAPER_ATTACK_OF, PAPER_EPOCHS, WHITE_BOX, Cell, Column, Comparison, Row, _grad,
                                    wilson95)

# --- comparability ------------------------------------------------------------------------------------------
# A number is set beside another (the paper's, or another run's) only when model, dataset, threat model, n and
# gradient mode are comparable; otherwise the place says why not. docs/report.md states the rule.

# The paper's models are epcli registry names: a differently sized net (ep-cnn-small, a demo) is not the
# paper's model, however its family.
PAPER_REGISTRY = {"ep-cnn": "ep-cnn", "cnn": "cnn", "vit": "vit"}
PAPER_DATASETS = ("cifar10", "cifar100")
PAPER_EP_CHANNELS = (128, 256, 512, 512)  # the paper's EP-CNN (paper_facts.json "architecture")
MIN_N = 1000  # below the paper's own n, at least this many examples (binomial std error <= 1.6 points)


def _paper_registry(paper_key: str | None) -> str | None:
    if not paper_key:
        return None
    return "cnn" if paper_key.startswith("cnn-at-") else PAPER_REGISTRY.get(paper_key)


def model_not_comparable(row: "Row") -> str | None:
    """Why this training run cannot stand beside the paper's numbers at all (model or data), or None."""
    if not row.paper_key:
        return None
    why = []
    info = paper.load_facts()["models"].get(row.paper_key, {})
    what = f"{info.get('label', row.paper_key)}: {info.get('architecture', '?')}"
    want = _paper_registry(row.paper_key)
    recipe = str(row.config.get("recipe") or "") if not isinstance(row.config.get("recipe"), dict) else ""
    overrides = row.config.get("model_overrides") or row.config.get("model_set")
    if want and row.model != want:
        kind = "demo model" if recipe.startswith("demo") or row.model.endswith("-small") else "another model"
        why.append(f"{kind} {row.model}: the paper compares {what}")
    elif overrides:
        why.append(f"model {row.model} with changed architecture ({overrides}): the paper compares {what}")
    else:
        spec = row.config.get("spec") if isinstance(row.config.get("spec"), dict) else {}
        if want == "ep-cnn" and spec.get("channels") and list(spec["channels"]) != list(PAPER_EP_CHANNELS):
            why.append(f"model ep-cnn with channels {'-'.join(str(c) for c in spec['channels'])}: the paper "
                       f"compares {what}")
    ds = (row.dataset or "").lower()
    if ds not in PAPER_DATASETS:
        why.append(f"data {row.dataset or '?'}: the paper evaluates on the full "
                   f"{paper.paper_dataset(ds) or 'CIFAR-10'} test set")
    return "; ".join(why) or None


def cell_not_comparable(cell: "Cell", fact: dict, paper_key: str | None, attack: str | None = None) -> str | None:
    """Why one result cannot stand beside the paper's number for the same threat (the attack's algorithm, n,
    gradient mode), or None. attack: epcli's attack name (None: taken to be the paper's)."""
    why = []
    if attack is not None and PAPER_ATTACK_OF.get(attack) != fact.get("attack"):
        why.append(f"attack {attack}: a different algorithm from the paper's ART {fact.get('attack')} "
                   f"(epcli attack -a {fact.get('attack')} --protocol paper runs ART's)")
    n_fact, n = fact.get("n_examples"), cell.n_examples
    if n_fact and (n or 0) < min(n_fact, MIN_N):
        why.append(f"n={n or '?'}: the paper's number is over {n_fact:,} images (need ≥ {min(n_fact, MIN_N):,})")
    pg = fact.get("grad_mode")
    if paper_key == "ep-cnn" and fact.get("attack") in WHITE_BOX and pg and cell.grad_mode != pg:
        why.append(f"gradient {_grad(cell.grad_mode)}: the paper's attack used {pg}")
    return "; ".join(why) or None


# --- the paper beside the results -----------------------------------------------------------------------------

# ART's AutoAttack defaults, which the paper ran (pipelines.attack.PAPER_PROTOCOLS["autoattack"], checked equal
# by the tests): art-autoattack's parameter -> (what it is, ART's value); a run with other budgets says so
ART_AUTOATTACK_BUDGET = {"apgd_iter": ("APGD iterations", 100), "restarts": ("APGD restarts", 5),
                         "deepfool_iter": ("DeepFool iterations", 100), "nb_grads": ("DeepFool classes", 10),
                         "overshoot": ("DeepFool overshoot", 1e-3), "square_iter": ("Square iterations", 5000),
                         "square_restarts": ("Square restarts", 5), "p_init": ("Square p_init", 0.8)}


def _labels_mode(cfg: dict) -> str | None:
    for key in ("labels", "label_mode", "targets"):
        if isinstance(cfg.get(key), str):
            return cfg[key]
    if cfg.get("use_predictions") or cfg.get("predicted_labels"):
        return "predicted"
    return None


def protocol_reasons(row: Row, cell: Cell | None, fact: dict, attack_cfg: dict | None = None,
                     eps: float | None = None) -> list[str]:
    """Short reasons why epcli's number and the paper's were not measured the same way."""
    reasons = []
    ds = (row.dataset or "").lower()
    if ds in ("cifar10-mini", "embedded"):
        reasons.append("data: mini CIFAR-10, JPEG-recompressed (q75); paper: CIFAR-10")
    elif ds and paper.paper_dataset(ds) is None:
        reasons.append(f"data: {row.dataset}, paper: {fact.get('dataset')}")
    if row.status == "running":
        reasons.append("model still training")
    n_fact = fact.get("n_examples")
    n_ours = cell.n_examples if cell else None
    if fact.get("metric") in ("clean_acc",) and row.epochs and row.paper_key in PAPER_EPOCHS \
            and row.epochs != PAPER_EPOCHS[row.paper_key]:
        reasons.append(f"training: {row.epochs} epochs, paper {PAPER_EPOCHS[row.paper_key]}")
    if n_fact and n_ours and n_ours != n_fact:
        reasons.append(f"examples: {n_ours:,}, paper {n_fact:,}")
    attack = fact.get("attack")
    if cell is not None and cell.n_results > 1:  # e.g. Square at 1,000 and at 20,000 iterations on the same images
        reasons.append(f"epcli: the worst case over {cell.n_results} results on the same images (at most any one "
                       "of them); the paper's number is one attack run")
    if attack and cell is not None:
        cfg = attack_cfg or {}
        params = cfg.get("params") if isinstance(cfg.get("params"), dict) else {}
        if attack == "pgd" and params.get("clip", True) is not False:
            reasons.append("clipping: epcli clips to [0,1], paper PGD does not")
        lm = _labels_mode(cfg)
        if lm is None or not lm.startswith("pred"):
            reasons.append("labels: true labels, paper attacks the model's predictions")
        elif cell.from_clean_errors is not None:  # as the paper, which logged no such split
            reasons.append(f"of which {cell.from_clean_errors:.2f} points: images misclassified clean that the "
                           "attack moved onto their true label (predicted labels count them; the paper's "
                           "logs do not say how many)")
        if row.paper_key == "ep-cnn" and attack in WHITE_BOX:
            pg = fact.get("grad_mode")
            if pg and cell.grad_mode != pg:
                reasons.append(f"gradient: {_grad(cell.grad_mode)}, paper {pg}")
            elif not pg and attack == "autoattack":
                reasons.append(f"gradient: {_grad(cell.grad_mode)}, paper's AutoAttack unroll not recorded")
        if attack == "square":
            theirs = SQUARE_VARIANT_ITERATIONS.get(fact.get("variant"), 1000)
            if params.get("max_iter") not in (None, theirs):
                reasons.append(f"Square: {params['max_iter']} iterations, paper {theirs}")
            if params.get("scores") not in (None, "softmax"):
                reasons.append(f"Square: margin of the {params['scores']}, paper of the softmax")
            if params.get("restarts") not in (None, 1):
                reasons.append(f"Square: {params['restarts']} restarts, paper 1")
        if attack == "autoattack":  # ART's ensemble with ART's defaults, as the paper ran it
            for key, (what, theirs) in ART_AUTOATTACK_BUDGET.items():
                if params.get(key) not in (None, theirs):
                    reasons.append(f"AutoAttack: {what} {params[key]:g}, paper ART's default {theirs:g}")
        if attack in ("square", "autoattack"):
            # the batch the attack saw: a chunk (recorded even when --batch-size was left to its default) or the
            # whole set can be smaller than --batch-size
            sizes = [v for v in (cfg.get("batch_size"), cfg.get("chunk"), cfg.get("n_examples"))
                     if isinstance(v, int) and not isinstance(v, bool) and v > 0]
            bs = min(sizes) if sizes else None
            if bs not in (None, 200):
                reasons.append(f"batch: {bs}, paper 200 (Square's windows are shared by a batch)")
            if params.get("eps_step") not in (None, 0.1):
                reasons.append(f"AutoAttack: APGD eps_step {params['eps_step']}, paper ART's default 0.1")
        if cfg.get("select") == "random" and n_fact and n_fact < 10000:
            reasons.append(f"images: a random subset, paper the first {n_fact:,} test images")
        elif cfg.get("first_order") == "class-interleaved" and n_fact and n_fact < 10000:
            reasons.append(f"images: the first of each class in turn (these files are sorted by class, with no "
                           f"test order of their own), paper the first {n_fact:,} of CIFAR-10's test order")
    if fact.get("metric") == "corruption_mean_acc":
        reasons.append("corruptions: epcli generates them (seeded) unless --source gave the official files")
    if fact.get("eps") is not None and eps is not None and not math.isclose(fact["eps"], eps, rel_tol=1e-3):
        reasons.append(f"eps: paper {fact['eps']:g}")
    return reasons


@functools.lru_cache(maxsize=4096)
def _paper_facts(model_key: str, dataset: str, metric: str, attack: str | None = None, norm: str | None = None,
                 eps: float | None = None, variant: bool | None = None) -> tuple[dict, ...]:
    """paper.paper_values, remembered: thousands of models ask for the same few (model, threat) cells, and each
    lookup scans the paper's 1,113 numbers. The facts are read-only here."""
    return tuple(paper.paper_values(model_key, dataset=dataset, metric=metric, attack=attack, norm=norm, eps=eps,
                                    variant=variant))


# the paper's Square tables by iterations: its primary one (1000) and the L2 one at 20,000 (paper-facts §6)
SQUARE_VARIANT_ITERATIONS = {None: 1000, "max_iter-20000": 20000}


@functools.lru_cache(maxsize=4096)
def _paper_cell_fact(model_key: str, dataset: str, attack: str, norm: str, eps: float,
                     grad_mode: str | None, max_iter: int | None = None) -> dict | None:
    """The paper's number a result is set beside: the one with the result's gradient mode, or for Square the
    table run with the result's iterations, else the primary."""
    facts = _paper_facts(model_key, dataset, "robust_acc", attack, norm, eps)
    same_grad = [f for f in facts if f.get("grad_mode") and f.get("grad_mode") == grad_mode]
    same_iterations = [f for f in facts if attack == "square" and max_iter is not None
                       and f.get("variant") is not None and SQUARE_VARIANT_ITERATIONS.get(f["variant"]) == max_iter]
    primary = [f for f in facts if f.get("variant") is None]
    return (same_grad or same_iterations or primary or [None])[0]


def _square_iterations(run_info: dict[str, dict], run_id: str) -> int | None:
    """An ART Square run's iterations (params.max_iter), or None when it does not record them."""
    params = run_info.get(run_id, {}).get("config", {}).get("params")
    it = params.get("max_iter") if isinstance(params, dict) else None
    return it if isinstance(it, int) and not isinstance(it, bool) else None


def _compare(rows: list[Row], columns: dict[str, Column], run_info: dict[str, dict]) -> list[Comparison]:
    """Every (model, metric) the paper also logged. The paper's number is set beside epcli's only under the
    comparability rule; otherwise the comparison carries `not_compared` (why) and no paper number or diff."""
    out = []

    def add(row, what, value, fact, n, reasons, why):
        ok = why is None
        out.append(Comparison(row.run_id, row.name or row.label, row.paper_key, what, value,
                              fact["value"] if ok else None, fact.get("std") if ok else None,
                              value - fact["value"] if ok else None, n, reasons if ok else [],
                              fact.get("section"), why,
                              # a corruption mean is no single proportion of n images: no interval
                              wilson95(value, n) if fact.get("metric") != "corruption_mean_acc" else None))

    for row in rows:
        if not row.paper_key:
            continue
        ds = paper.paper_dataset(row.dataset) or ("cifar10" if row.dataset is None else None)
        if ds is None:
            continue
        fact = next(iter(_paper_facts(row.paper_key, ds, "clean_acc", variant=False)), None)
        if fact and row.clean_acc is not None:
            add(row, "clean", row.clean_acc, fact, row.clean_n, protocol_reasons(row, None, fact), row.not_compared)
        for key, cell in row.cells.items():
            col = columns[key]
            if cell.value is None:
                continue
            cfg = run_info.get(cell.run_id or "", {}).get("config", {})
            params = cfg.get("params") if isinstance(cfg.get("params"), dict) else {}
            max_iter = params.get("max_iter") if col.attack == "art-square" else None
            if col.attack == "art-square" and cell.worst_of:  # a worst case: as strong as its longest run
                runs_iter = [_square_iterations(run_info, w.split()[0]) for w in cell.worst_of]
                runs_iter = [i for i in runs_iter if i is not None]
                if runs_iter and max(runs_iter) != max_iter:
                    max_iter = max(runs_iter)
                    cfg = {**cfg, "params": {**params, "max_iter": max_iter}}
            fact = _paper_cell_fact(row.paper_key, ds, PAPER_ATTACK_OF.get(col.attack, col.attack), col.norm,
                                    col.eps, cell.grad_mode, max_iter if isinstance(max_iter, int) else None)
            if fact is None:
                continue
            why = row.not_compared or cell_not_comparable(cell, fact, row.paper_key, col.attack)
            reasons = []
            if why is None:  # the protocol differences are listed only beside a number that is compared
                reasons = protocol_reasons(row, cell, fact, cfg, eps=col.eps)
                if fact.get("variant"):
                    reasons.insert(0, f"paper run: {fact['variant']}")
            if why is None:
                cell.paper, cell.paper_std = fact["value"], fact.get("std")
                cell.diff = cell.value - fact["value"]
                cell.reasons = reasons
            else:
                cell.not_compared = why
            add(row, col.label, cell.value, fact, cell.n_examples, reasons, why)
        fact = next(iter(_paper_facts(row.paper_key, ds, "corruption_mean_acc", variant=False)), None)
        corr = row.corruption
        if fact and corr.get("mean") is not None:
            # the paper's mean is over 18 corruptions (all but frost) x 5 severities: only that mean compares
            mean18 = corr.get("mean18")
            why = row.not_compared or (None if mean18 is not None else
                                       f"corruptions: epcli ran {corr.get('mean_label', '?')}; the paper's mean "
                                       f"is over 18 corruptions (all but frost) × 5 severities")
            value = mean18 if mean18 is not None else corr["mean"]
            add(row, "CIFAR-C mean (18 corruptions × 5 severities)" if mean18 is not None else
                f"CIFAR-C {corr.get('mean_label', 'mean')}", value, fact, corr.get("n_examples"),
                protocol_reasons(row, None, fact), why)
    return out
