"""Training recipes (presets) and the epoch loop for every model family, adversarial training included.

`fit` trains any registry model on an `epcli.data.Dataset`:
- EP models (they have `ep_train_step`) fill `.grad` with the EP (or BPTT) estimate, then the optimiser steps;
- everything else trains by cross-entropy back-propagation; with `recipe["adv"]` each batch is first replaced
  by its PGD adversarial version (`epcli.attacks.pgd`, the one PGD implementation; model in eval mode while
  attacking), Madry et al. style, with no clean/adversarial mix;
- with `recipe["distill"]` an `ep-student` (epcli.student) learns by backprop from a teacher EP-CNN's fixed points
  on the same batch (`fit(..., teacher=...)`; `distill_loss`).

After every epoch the test accuracy is measured and `on_epoch(epoch, metrics, state)` gets a `state` that
resumes training *exactly* (same final weights as an uninterrupted run): weights, optimiser, schedule position,
epoch, history and every RNG (global CPU/CUDA and the data generator). `state_to_tensors` flattens it for a
safetensors file. This module imports no store, CLI or rich: tensors in, tensors and plain dicts out.

Under torchrun (`epcli.distributed`) `fit` trains one model data-parallel: `recipe["batch_size"]` is the
*global* batch; every rank draws the same shuffled order and augmentation from the shared seed, takes its
contiguous slice of each global batch (`distributed.shard_range`), and the gradients (backprop or EP) are
averaged with one flattened all_reduce, weighted by slice size, so every rank steps with the gradient of the
global batch. See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from epcli.errors import Diverged, UsageError

__all__ = ["RECIPES", "BP_RECIPES", "DEFAULTS", "resolve_recipe", "default_recipe", "check_plan", "fit", "evaluate",
           "check_adv_eps", "lr_factor", "state_to_tensors", "tensors_to_state", "PAPER_AT_EPS",
           "SELECTS", "validation_split", "DISTILL_DEFAULTS", "distill_loss"]

PAPER_AT_EPS = (0.05, 0.5, 0.75, 1.0)  # the paper's L2 adversarial-training budgets
SCHEDULES = ("constant", "step", "cosine", "warmup-cosine", "onecycle")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = (None, "crop-flip", "randaugment", "autoaugment")
EP_RULES = ("symmetric", "one-sided", "bptt")  # the EP-CNN's ep_train_step rules

# Every key a recipe may have, with its default. A preset overrides some; `resolve_recipe` fills the rest.
DEFAULTS: dict = {
    "model": None,  # the registry model the recipe was tuned for (informative; fit trains what it is given)
    "dataset": None,
    "epochs": 10,
    "batch_size": 128,
    "drop_last": False,
    "eval_batch_size": 500,
    "optimizer": {"name": "sgd", "lr": 0.1, "lrs": None, "momentum": 0.9, "weight_decay": 0.0,
                  "nesterov": False, "betas": [0.9, 0.999]},
    # lr(t) = base_lr * factor(t). cosine/step change once per epoch (as the paper's schedulers);
    # warmup-cosine/onecycle change every batch. t_max defaults to the number of epochs.
    "schedule": {"name": "constant", "t_max": None, "eta_min": 0.0, "step_size": 30, "gamma": 0.1,
                 "warmup_epochs": 0},
    "augment": None,  # None | crop-flip | randaugment | autoaugment (the last two add crop-flip)
    "augment_group": 8,  # randaugment/autoaugment draw one policy per group of this many images
    "pad_mode": "edge",
    "label_smoothing": 0.0,
    "grad_clip": None,  # max global gradient norm (None: no clipping)
    "amp": False,  # CUDA only: bf16 autocast for backprop models; EP models get model.accelerate(float16)
    "channels_last": False,  # CUDA only
    "compile": False,  # torch.compile the forward for backprop models, CUDA only
    "ep": None,  # {T1, T2, beta, rule} for EP models
    "adv": None,  # {norm, eps, steps, step_size, random_start, labels: true|predicted} adversarial training
    "distill": None,  # {teacher, target, logit_weight, temperature, label_weight, init}: distil an EP-CNN
}
# update / solver None: the model's own. tol / tol_nudged: each sample's phase stops once its relative residual
# is below it (T1 / T2 the caps). warm_start: start each example's free phase from its fixed point of the last epoch.
EP_DEFAULTS = {"T1": 250, "T2": 30, "beta": 0.5, "rule": "symmetric", "update": None, "solver": None,
               "tol": None, "tol_nudged": None, "warm_start": False}
SELECTS = ("last", "best-val", "best-test")  # which epoch's weights a training run hands on
VAL_FRACTION = 0.1  # --select best-val holds out this fraction of the training set (seeded)
ADV_DEFAULTS = {"norm": "l2", "eps": None, "steps": 20, "step_size": None, "random_start": False,
                "labels": "predicted"}
# Distillation of an EP-CNN teacher into a feed-forward student (epcli.student; docs/models.md, "Distillation").
# teacher: the reference the pipeline resolved (fit is handed the loaded model). target "states": Σ_l MSE(student
# layer l, teacher fixed point s*_l) + logit_weight·τ²·KL(teacher softmax ‖ student softmax) at temperature τ;
# "logits": the KL term only. label_weight: + that times CE on the true labels. init: the student starts from the
# teacher's weights ("teacher") or from its own random init ("random").
DISTILL_TARGETS = ("states", "logits")
DISTILL_INITS = ("teacher", "random")
DISTILL_DEFAULTS = {"teacher": None, "target": "states", "logit_weight": 1.0, "temperature": 1.0,
                    "label_weight": 0.0, "init": "teacher"}

_PAPER_CNN = {
    "model": "cnn", "dataset": "cifar10", "epochs": 45, "batch_size": 200, "drop_last": True,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
    "schedule": {"name": "step", "step_size": 8, "gamma": 0.3},
    "augment": "crop-flip", "pad_mode": "edge",
}

BP_RECIPES: dict[str, dict] = {
    # lanl/AdvEP's feed-forward CNN: SGD 0.1 momentum 0.9 no weight decay, StepLR(8 epochs, x0.3), 45 epochs,
    # batch 200 (drop_last), flip + 4-pixel crop with edge padding (paper-facts §3.1).
    "paper-cnn": _PAPER_CNN,
    # Madry PGD-AT as the paper ran it (ART defaults): L2, 20 steps of 2.5*eps/20, no random start, attack
    # labels = the model's own predictions, every batch replaced. eps: one of PAPER_AT_EPS, given by the user.
    "paper-cnn-at": {**_PAPER_CNN, "adv": dict(ADV_DEFAULTS)},
    # The usual L-inf PGD-AT (Madry et al. 2018): eps 8/255, 10 steps of 2/255, random start, true labels.
    "paper-cnn-at-linf": {**_PAPER_CNN, "adv": {"norm": "linf", "eps": 8 / 255, "steps": 10,
                                                "step_size": 2 / 255, "random_start": True, "labels": "true"}},
    # The ViT of omihub777/ViT-CIFAR (paper-facts §3.2): Adam(W) 1e-3, 5-epoch warm-up then cosine to 1e-5,
    # weight decay 5e-5, label smoothing 0.1, AutoAugment + crop-flip, 200 epochs, batch 128.
    "vit": {"model": "vit", "dataset": "cifar10", "epochs": 200, "batch_size": 128,
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 5e-5, "betas": [0.9, 0.999]},
            "schedule": {"name": "warmup-cosine", "warmup_epochs": 5, "eta_min": 1e-5},
            "augment": "autoaugment", "pad_mode": "reflect", "label_smoothing": 0.1, "amp": True},
    # CPU demo: the small CNN, a few epochs on the embedded 5k images.
    "demo-cnn": {"model": "cnn-small", "dataset": None, "epochs": 3, "batch_size": 64,
                 "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                               "nesterov": True},
                 "schedule": {"name": "cosine", "eta_min": 1e-3}, "augment": "crop-flip"},
    # GUESSES, unmeasured (no GPU in the session that wrote them): the paper's accuracy (CNN ~88.6%, ViT ~84.7%)
    # in <= 10 minutes on one H100. bf16 autocast, channels_last, compiled forward, per-batch schedules.
    "fast-cnn": {"model": "cnn", "dataset": "cifar10", "epochs": 30, "batch_size": 256, "drop_last": True,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                               "nesterov": True},
                 "schedule": {"name": "warmup-cosine", "warmup_epochs": 2, "eta_min": 0.0},
                 "augment": "crop-flip", "pad_mode": "edge", "label_smoothing": 0.1,
                 "amp": True, "channels_last": True, "compile": True},
    "fast-vit": {"model": "vit", "dataset": "cifar10", "epochs": 80, "batch_size": 512, "drop_last": True,
                 "optimizer": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
                 "schedule": {"name": "warmup-cosine", "warmup_epochs": 5, "eta_min": 1e-5},
                 "augment": "randaugment", "pad_mode": "reflect", "label_smoothing": 0.1, "grad_clip": 1.0,
                 "amp": True, "compile": True},
    # The EP student (ep-student, docs/models.md "Distillation"): a GUESS, the follow-up's protocol is unknown.
    # Adam and a cosine decay (the student is a plain feed-forward net); the teacher relaxes on the same
    # crop-flipped batch. The teacher comes from --teacher (the pipeline fills distill.teacher).
    "distill-ep": {"model": "ep-student", "dataset": None, "epochs": 10, "batch_size": 64,
                   "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999]},
                   "schedule": {"name": "cosine", "eta_min": 1e-5}, "augment": "crop-flip", "pad_mode": "edge",
                   "distill": dict(DISTILL_DEFAULTS)},
    # ResNet-18 (CIFAR stem): the common 0.1 / 5e-4 / cosine recipe.
    "resnet": {"model": "resnet18", "dataset": "cifar10", "epochs": 100, "batch_size": 128,
               "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
               "schedule": {"name": "cosine"}, "augment": "crop-flip", "pad_mode": "reflect",
               "amp": True, "channels_last": True},
}


def _ep_recipes() -> dict:
    try:
        from epcli.ep import EP_RECIPES
    except ImportError:  # the EP module is optional for everything here
        return {}
    return dict(EP_RECIPES)


def _recipes() -> dict[str, dict]:
    """BP presets merged with `epcli.ep.EP_RECIPES`, built on first use and cached as the module's RECIPES."""
    cached = globals().get("RECIPES")
    if cached is None:
        cached = {**_ep_recipes(), **BP_RECIPES}
        globals()["RECIPES"] = cached
    return cached


def __getattr__(name):  # PEP 562: `from epcli.train import RECIPES` imports epcli.ep only then
    if name == "RECIPES":
        return _recipes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- recipes --------------------------------------------------------------------------------------------

def _merge(base: dict, over: dict, path: str, strict: bool) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if strict and k not in out:
            known = ", ".join(sorted(out))
            raise UsageError(f"unknown recipe key {where!r}; known{' under ' + path[:-1] if path else ''}: {known}")
        group, value_is_group = isinstance(out.get(k), dict), isinstance(v, dict)
        switch = k in ("adv", "ep", "distill") and (v is None or out.get(k) is None)  # None is off
        if strict and group != value_is_group and not switch:
            raise UsageError(f"recipe key {where!r} is a group of keys ({', '.join(sorted(out[k]))}): set one "
                             f"of them, e.g. {where}.{'name' if 'name' in out[k] else sorted(out[k])[0]}=..."
                             if group else
                             f"recipe key {where!r} is a single value ({out[k]!r}), not a group: set {where}=...")
        if value_is_group and group:
            out[k] = _merge(out[k], v, where + ".", strict)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _unflatten(overrides: dict) -> dict:
    """{"optimizer.lr": 0.1} -> {"optimizer": {"lr": 0.1}}; nested dicts pass through."""
    out: dict = {}
    for k, v in overrides.items():
        parts = str(k).split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UsageError(f"recipe key {k!r} conflicts with another override")
        if isinstance(v, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]] = _merge(d[parts[-1]], v, "", False)
        else:
            d[parts[-1]] = v
    return out


def resolve_recipe(name: str | None, overrides: dict | None = None) -> dict:
    """The full recipe: DEFAULTS <- preset `name` <- `overrides` (deep merge; dotted keys allowed).

    Unknown keys, names and values raise UsageError. `adv` and `ep` may be switched on by an override
    (e.g. {"adv": {"eps": 0.5}} fills the rest from the paper's PGD-AT preset) or off with None.
    """
    if name is None:
        preset: dict = {}
    elif name in _recipes():
        preset = _recipes()[name]
    else:
        import difflib
        close = difflib.get_close_matches(str(name), list(_recipes()), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown recipe {name!r}: {hint}known: {', '.join(sorted(_recipes()))}")
    base = _merge(DEFAULTS, {k: v for k, v in preset.items() if k not in DEFAULTS}, "", False)  # ep extras
    recipe = _merge(base, _nested_defaults(preset), "", True)
    over = _unflatten({k: v for k, v in (overrides or {}).items()})
    sections = {"adv": ADV_DEFAULTS, "ep": EP_DEFAULTS, "distill": DISTILL_DEFAULTS}
    for k, defaults in sections.items():  # a sub-dict switched on by an override starts from its defaults
        if isinstance(over.get(k), dict) and recipe.get(k) is None:
            recipe[k] = dict(defaults)
    recipe = _merge(recipe, over, "", True)
    for k in ("model", "dataset"):
        if k in over:
            raise UsageError(f"recipe key {k!r} only records what the preset was tuned for: choose the {k} with "
                             f"--{k}, not --set {k}")
    _validate(recipe)
    return recipe


def _nested_defaults(preset: dict) -> dict:
    """A preset's adv/ep sub-dicts completed with their defaults."""
    out = dict(preset)
    if isinstance(out.get("adv"), dict):
        out["adv"] = {**ADV_DEFAULTS, **out["adv"]}
    if isinstance(out.get("ep"), dict):
        out["ep"] = {**EP_DEFAULTS, **out["ep"]}
    if isinstance(out.get("distill"), dict):
        out["distill"] = {**DISTILL_DEFAULTS, **out["distill"]}
    return out


def _check_number(v, where: str, *, integer: bool = False, low: float | None = None, low_open: bool = False,
                  high: float | None = None, high_open: bool = False, null: bool = False) -> None:
    """A recipe value that must be a finite number (an int when `integer`; never a bool) within bounds."""
    if v is None and null:
        return
    kind = isinstance(v, int) if integer else isinstance(v, (int, float))
    ok = kind and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (low is None or (v > low if low_open else v >= low))
    ok = ok and (high is None or (v < high if high_open else v <= high))
    if not ok:
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low:g}"
        else:
            bounds = ""
        raise UsageError(f"recipe {where} must be {'an integer' if integer else 'a number'}{bounds}"
                         f"{' or null' if null else ''}, got {v!r}")


def _check_flag(v, where: str) -> None:
    if not isinstance(v, bool):
        raise UsageError(f"recipe {where} must be true or false, got {v!r}")


def _validate(r: dict) -> None:
    """Every recipe value has the type and range `fit` needs: a bad one is a UsageError here, before a run is
    opened, not a TypeError (or a silently odd run) once training starts."""
    def need(cond, msg):
        if not cond:
            raise UsageError(msg)

    for k in ("epochs", "batch_size", "eval_batch_size", "augment_group"):
        _check_number(r[k], k, integer=True, low=1)
    for k in ("drop_last", "amp", "channels_last", "compile"):
        _check_flag(r[k], k)
    for k in ("model", "dataset"):  # informative: what the preset was tuned for
        need(r[k] is None or isinstance(r[k], str), f"recipe {k} must be a name or null, got {r[k]!r}")
    opt, sch = r["optimizer"], r["schedule"]
    need(opt["name"] in OPTIMIZERS, f"unknown optimizer {opt['name']!r}: use {' or '.join(OPTIMIZERS)}")
    _check_number(opt["lr"], "optimizer.lr", low=0, low_open=True)
    lrs = opt["lrs"]
    need(lrs is None or (isinstance(lrs, (list, tuple)) and len(lrs) > 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in lrs)),
         f"optimizer lrs must be a list of positive per-layer learning rates (or null), got {lrs!r}")
    _check_number(opt["momentum"], "optimizer.momentum", low=0)
    _check_number(opt["weight_decay"], "optimizer.weight_decay", low=0)
    _check_flag(opt["nesterov"], "optimizer.nesterov")
    need(not (opt["name"] == "sgd" and opt["nesterov"] and opt["momentum"] == 0),
         "optimizer nesterov needs a momentum > 0")
    betas = opt["betas"]
    need(isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas),
         f"optimizer betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {betas!r}")
    need(sch["name"] in SCHEDULES, f"unknown schedule {sch['name']!r}: use one of {', '.join(SCHEDULES)}")
    _check_number(sch["t_max"], "schedule.t_max", integer=True, low=1, null=True)
    _check_number(sch["eta_min"], "schedule.eta_min", low=0)
    _check_number(sch["step_size"], "schedule.step_size", integer=True, low=1)
    _check_number(sch["gamma"], "schedule.gamma", low=0, low_open=True)
    _check_number(sch["warmup_epochs"], "schedule.warmup_epochs", low=0)
    need(r["augment"] in AUGMENTS, f"unknown augment {r['augment']!r}: use crop-flip, randaugment, autoaugment "
                                   "or null")
    need(r["pad_mode"] in ("edge", "reflect", "zeros"), f"unknown pad_mode {r['pad_mode']!r}: use edge, "
                                                         "reflect or zeros")
    _check_number(r["label_smoothing"], "label_smoothing", low=0, high=1, high_open=True)
    _check_number(r["grad_clip"], "grad_clip", low=0, low_open=True, null=True)
    if r["ep"] is not None:
        need(isinstance(r["ep"], dict), "recipe ep must be a dict {T1, T2, beta, rule, update} or None")
        ep = r["ep"]
        for k in ("T1", "T2"):
            _check_number(ep.get(k), f"ep.{k}", integer=True, low=1)
        beta = ep.get("beta")
        need(isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta != 0,
             f"recipe ep.beta must be a finite non-zero number (the EP update divides by it), got {beta!r}")
        need(ep.get("rule") in EP_RULES, f"recipe ep.rule must be one of {', '.join(EP_RULES)}, "
                                         f"got {ep.get('rule')!r}")
        need(ep.get("update") in (None, "sync", "alternate"),
             f"recipe ep.update must be sync or alternate, got {ep.get('update')!r}")
        need(ep.get("solver") in (None, "plain", "anderson"),
             f"recipe ep.solver must be plain or anderson, got {ep.get('solver')!r}")
        for k in ("tol", "tol_nudged"):
            v = ep.get(k)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
                 f"recipe ep.{k} must be a positive number or null, got {v!r}")
        need(isinstance(ep.get("warm_start", False), bool),
             f"recipe ep.warm_start must be true or false, got {ep.get('warm_start')!r}")
    if r["adv"] is not None:
        a = r["adv"]
        need(isinstance(a, dict), "recipe adv must be a dict {norm, eps, steps, ...} or None")
        from epcli.attacks import check_norm
        a["norm"] = check_norm(a["norm"])
        need(a["labels"] in ("true", "predicted"), f"adv labels must be 'true' or 'predicted', got {a['labels']!r}")
        need(isinstance(a["steps"], int) and not isinstance(a["steps"], bool) and a["steps"] >= 1,
             f"adv steps must be an integer >= 1, got {a['steps']!r}")
        _check_number(a["step_size"], "adv.step_size", low=0, low_open=True, null=True)
        _check_flag(a["random_start"], "adv.random_start")
        if a["eps"] is not None:
            a["eps"] = check_adv_eps(a["eps"], a["norm"])
    if r["distill"] is not None:
        d = r["distill"]
        need(isinstance(d, dict), "recipe distill must be a dict {teacher, target, logit_weight, ...} or None")
        need(d["teacher"] is None or (isinstance(d["teacher"], str) and d["teacher"].strip()),
             f"recipe distill.teacher must be a run id, model name or checkpoint path (or null), got {d['teacher']!r}")
        need(d["target"] in DISTILL_TARGETS, f"recipe distill.target must be one of {', '.join(DISTILL_TARGETS)}, "
                                             f"got {d['target']!r}")
        need(d["init"] in DISTILL_INITS, f"recipe distill.init must be one of {', '.join(DISTILL_INITS)}, "
                                         f"got {d['init']!r}")
        _check_number(d["logit_weight"], "distill.logit_weight", low=0)
        _check_number(d["temperature"], "distill.temperature", low=0, low_open=True)
        _check_number(d["label_weight"], "distill.label_weight", low=0)
        need(d["target"] != "logits" or d["logit_weight"] > 0 or d["label_weight"] > 0,
             "recipe distill.target logits needs a distill.logit_weight or distill.label_weight > 0 (else the loss "
             "is zero)")


def check_adv_eps(eps, norm: str) -> float:
    """An attack/training budget in pixel units ([0,1] images); catches budgets given on the 0-255 scale."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise UsageError(f"eps must be a number, got {eps!r}") from None
    if not (e > 0 and math.isfinite(e)):
        raise UsageError(f"eps must be a finite number > 0, got {eps!r}")
    if norm == "linf" and e > 1:
        raise UsageError(f"L-inf eps {e:g} is larger than the whole [0,1] pixel range: did you mean "
                         f"{e:g}/255 = {e / 255:.4f}?")
    if norm == "l2" and e > 4:  # the paper's largest is 1.0; sqrt(3*32*32) = 55 is the diameter of the cube
        raise UsageError(f"L2 eps {e:g} is far beyond the usual budgets (the paper's: "
                         f"{', '.join(map(str, PAPER_AT_EPS))}): did you mean {e:g}/255 = {e / 255:.4f}?")
    return e


def default_recipe(model_name: str, dataset_name: str | None = None) -> str:
    """The preset that `epcli train MODEL` uses when none is given."""
    ds = (dataset_name or "").lower()
    mini = ds in ("", "cifar10-mini", "embedded")
    if model_name == "ep-student":  # a feed-forward net trained by backprop on its teacher's fixed points
        return "distill-ep"
    if model_name.startswith("ep-"):
        ep_names = list(_ep_recipes())
        if mini:  # the embedded set: the recipe written for this net (its per-layer learning rates fit its layers)
            for n in ("demo-ep", "tiny-ep", "paper-ep-cifar10", "paper-ep-cifar100", *ep_names):
                if n in _recipes() and _recipes()[n].get("model") == model_name:
                    return n
        if model_name == "ep-cnn-small" and "demo-ep" in _recipes():
            return "demo-ep"
        if model_name == "ep-cnn-tiny" and "tiny-ep" in _recipes():
            return "tiny-ep"
        want = "paper-ep-cifar100" if ("100" in ds or model_name.endswith("cifar100")) else "paper-ep-cifar10"
        if want in _recipes():
            return want
        if ep_names:
            return ep_names[0]
        raise UsageError(f"no training recipe for {model_name!r}: the EP module is not available")
    if model_name == "cnn-small":
        return "demo-cnn"
    if model_name.startswith("vit"):
        return "vit"
    if model_name.startswith("cnn"):
        return "paper-cnn"
    if model_name.startswith("resnet") or model_name.startswith("timm:"):
        return "resnet"
    return "paper-cnn"


# --- schedule and optimiser -----------------------------------------------------------------------------

def lr_factor(schedule: dict, epoch: int, frac: float, epochs: int, base_lr: float) -> float:
    """Multiplier of base_lr at batch fraction `frac` in [0,1) of epoch `epoch` (0-based)."""
    name = schedule["name"]
    t_max = schedule.get("t_max") or epochs
    eta = float(schedule.get("eta_min") or 0.0) / base_lr
    if name == "constant":
        return 1.0
    if name == "step":  # StepLR stepped per epoch
        return float(schedule["gamma"]) ** (epoch // int(schedule["step_size"]))
    if name == "cosine":  # CosineAnnealingLR stepped per epoch; flat at eta_min after t_max
        e = min(epoch, t_max)
        return eta + (1 - eta) * (1 + math.cos(math.pi * e / t_max)) / 2
    # warmup-cosine / onecycle: linear warm-up then cosine to eta_min, both per batch
    t = epoch + frac
    w = float(schedule.get("warmup_epochs") or 0)
    if t < w:
        return max(t / w, 1e-3)
    span = max(t_max - w, 1e-9)
    p = min((t - w) / span, 1.0)
    return eta + (1 - eta) * (1 + math.cos(math.pi * p)) / 2


def _param_groups(model: nn.Module, opt: dict) -> list[dict]:
    lrs, wd = opt.get("lrs"), float(opt.get("weight_decay") or 0.0)
    if lrs:
        if not hasattr(model, "layer_param_groups"):
            raise UsageError("optimizer lrs (per-layer learning rates) needs a model with layer_param_groups()")
        layers = [list(g["params"]) if isinstance(g, dict) else list(g) for g in model.layer_param_groups()]
        if len(layers) != len(lrs):
            raise UsageError(f"optimizer lrs has {len(lrs)} learning rates but the model has {len(layers)} layers: "
                             f"--set optimizer.lrs=[...] with {len(layers)} rates, or optimizer.lrs=null for one lr")
        seen = {id(p) for g in layers for p in g}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        groups = [{"params": g, "lr": float(lr), "weight_decay": wd} for g, lr in zip(layers, lrs)]
        if rest:
            groups.append({"params": rest, "lr": float(opt["lr"]), "weight_decay": wd})
        return groups
    params = [p for p in model.parameters() if p.requires_grad]
    if opt["name"] == "adamw":  # no decay on biases, norms, position embeddings and tokens (1-D / tiny tensors)
        decay = [p for p in params if p.dim() >= 2 and p.shape[0] > 1]
        no_decay = [p for p in params if not (p.dim() >= 2 and p.shape[0] > 1)]
        return [{"params": decay, "lr": float(opt["lr"]), "weight_decay": wd},
                {"params": no_decay, "lr": float(opt["lr"]), "weight_decay": 0.0}]
    return [{"params": params, "lr": float(opt["lr"]), "weight_decay": wd}]


def _make_optimizer(model: nn.Module, opt: dict, device: torch.device) -> torch.optim.Optimizer:
    groups = _param_groups(model, opt)
    for g in groups:
        g["initial_lr"] = g["lr"]
    if opt["name"] == "sgd":
        return torch.optim.SGD(groups, lr=float(opt["lr"]), momentum=float(opt.get("momentum") or 0.0),
                               nesterov=bool(opt.get("nesterov")))
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=float(opt["lr"]), betas=tuple(opt.get("betas") or (0.9, 0.999)), **kw)


def _set_lr(optimizer, schedule: dict, epoch: int, frac: float, epochs: int) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * lr_factor(schedule, epoch, frac, epochs, g["initial_lr"])
    return optimizer.param_groups[0]["lr"]


# --- augmentation ---------------------------------------------------------------------------------------

def _policy_transform(kind: str):
    from torchvision.transforms import v2
    if kind == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    return v2.RandAugment(num_ops=2, magnitude=9)


def _policy_augment(xb: torch.Tensor, tf, group: int) -> torch.Tensor:
    """AutoAugment/RandAugment on a float [0,1] batch, on its device: one random policy per group of images.

    torchvision applies one draw to a whole batched tensor; groups trade a little diversity for speed.
    The policy works on uint8, exactly as on decoded images (x was u/255, so the round trip is exact).
    """
    u8 = xb.mul(255).round_().to(torch.uint8)
    out = torch.cat([tf(chunk) for chunk in u8.split(max(1, int(group)))])
    return out.float().div_(255)


# --- evaluation -----------------------------------------------------------------------------------------

def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _correct(model, x_u8, y, batch_size, device, amp=False, fwd=None, **fwd_kwargs) -> torch.Tensor:
    """How many of the images the model classifies correctly (an int64 tensor on `device`), in eval mode."""
    from epcli.data import batches
    fwd = fwd or model
    was = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for xb, yb in batches(x_u8, y, batch_size, device=device):
            with _autocast(device, amp):
                logits = fwd(xb, **fwd_kwargs)
            correct += (logits.argmax(1) == yb).sum()
    finally:
        model.train(was)
    return correct


def _accuracy(model, x_u8, y, batch_size, device, amp=False, fwd=None, **fwd_kwargs) -> float:
    return float(_correct(model, x_u8, y, batch_size, device, amp, fwd, **fwd_kwargs)) / max(1, len(y))


def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: str | torch.device = "cpu", **fwd_kwargs) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of `model` on uint8 images, in eval mode, without gradients.

    `fwd_kwargs` go to the forward (e.g. T=30 for the EP-CNN's forward if it takes one).
    """
    device = torch.device(device)
    model.to(device)
    return _accuracy(model, x_uint8.to(device), y.to(device), batch_size, device, **fwd_kwargs)


# --- state: exact resume --------------------------------------------------------------------------------

def _rng_state(device: torch.device, data_gen: torch.Generator, adv_gen: torch.Generator) -> dict:
    rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state(), "adv": adv_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict, device: torch.device, data_gen: torch.Generator, adv_gen: torch.Generator):
    torch.set_rng_state(rng["torch"].cpu())
    data_gen.set_state(rng["data"].cpu())
    adv_gen.set_state(rng["adv"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


RANK_SEED_STRIDE = 10007  # rank r > 0 seeds its own streams (global RNG, PGD) with seed + r * this


def _rank_rng(device: torch.device, adv_gen: torch.Generator) -> dict:
    """The streams that differ between ranks (the data generator is shared)."""
    rng = {"torch": torch.get_rng_state(), "adv": adv_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rank_rng(rng: dict, device: torch.device, adv_gen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    adv_gen.set_state(rng["adv"].cpu())
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def _cpu_clone(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return copy.deepcopy(obj)


def state_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten a (nested) training state into safetensors-ready tensors plus string metadata.

    Tensors are stored under '/'-joined paths; everything else (scalars, the optimiser's param_groups,
    history, recipe) goes into metadata["state"] as JSON, with markers where tensors, int keys and tuples
    were. `tensors_to_state(tensors, metadata)` inverts it exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path):
        if torch.is_tensor(obj):
            key = base = "/".join(path) or "_"
            while key in tensors:  # keys with '/' in them could collide; the skeleton records the real key
                key = f"{base}#{len(tensors)}"
            tensors[key] = obj.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: walk(v, path + [k]) for k, v in obj.items()}
            return {"__items__": [[k, walk(v, path + [str(k)])] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [walk(v, path + [str(i)]) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, path + [str(i)]) for i, v in enumerate(obj)]
        if isinstance(obj, (str, int, float, bool)) or obj is None:
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} at {'/'.join(path)} in a training state")

    skeleton = walk(state, [])
    return tensors, {"state": json.dumps(skeleton), "format": "epcli-train-state/1"}


def tensors_to_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Inverse of `state_to_tensors`."""
    try:
        skeleton = json.loads(metadata["state"])
    except (KeyError, TypeError, ValueError):
        raise UsageError("not a training state: metadata has no valid 'state' entry") from None

    def build(obj):
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            if set(obj) == {"__items__"}:
                return {k: build(v) for k, v in obj["__items__"]}
            if set(obj) == {"__tuple__"}:
                return tuple(build(v) for v in obj["__tuple__"])
            return {k: build(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [build(v) for v in obj]
        return obj

    return build(skeleton)


# --- the loop -------------------------------------------------------------------------------------------

def _is_ep(model: nn.Module) -> bool:
    return callable(getattr(model, "ep_train_step", None))


def _sync_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers -> torch.nn.SyncBatchNorm, in place (same parameters and buffers, same state_dict)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))


def _sync_grads(params: list, loss: torch.Tensor, n_local: int, n_global: int, world: int) -> torch.Tensor:
    """Turn every rank's p.grad (of its slice's mean loss) into the gradient of the global batch's mean loss.

    Each rank weighs its gradient by n_local * world / n_global (1 for equal slices), then one flattened
    all_reduce (mean) per bucket. A parameter without a gradient on every rank keeps p.grad None, as in a
    single process. Returns the global batch's mean loss (a tensor, the same on every rank).
    """
    from epcli import distributed as dist
    w = n_local * world / max(n_global, 1)
    have, missing = [], False
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
            have.append(0.0)
            missing = True
        else:
            if w != 1.0:
                p.grad.mul_(w)
            have.append(1.0)
    ref = params[0]
    extra = torch.cat([torch.tensor(have, dtype=ref.dtype, device=ref.device),
                       loss.detach().to(ref.device, ref.dtype).reshape(1) * w])
    dist.all_reduce_mean_([p.grad for p in params] + [extra])
    if missing:  # a host read only where this rank had no gradient for some parameter
        for p, h in zip(params, extra[:-1].tolist()):
            if h == 0.0:
                p.grad = None
    return extra[-1]


def _crop_flip_slice(x: torch.Tensor, lo: int, n_global: int, pad_mode: str, generator, world: int):
    """crop_flip of this rank's slice [lo, lo+len(x)) with the draws of the whole global batch (the shared
    data generator stays in step on every rank, and every image gets the draw it gets in one process)."""
    from epcli.data import crop_flip
    if world == 1:
        return crop_flip(x, pad=4, pad_mode=pad_mode, generator=generator)
    full = x.new_zeros((n_global, *x.shape[1:]))
    full[lo:lo + len(x)] = x
    return crop_flip(full, pad=4, pad_mode=pad_mode, generator=generator)[lo:lo + len(x)]


def distill_loss(student_states: list, student_logits: torch.Tensor, teacher_states: list,
                 teacher_logits: torch.Tensor, y: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The distillation loss of one batch (recipe `distill`): for target "states" Σ_l mean((s_l − s*_l)²) over
    the student's layers and the teacher's fixed point, plus (both targets) logit_weight · τ² · KL(softmax(t/τ) ‖
    softmax(s/τ)) (batch mean; τ² keeps the gradient's scale as τ changes, Hinton et al. 2015), plus label_weight
    · CE(student logits, y)."""
    loss = student_logits.new_zeros(())
    if cfg["target"] == "states":
        for s, t in zip(student_states, teacher_states):
            loss = loss + F.mse_loss(s.float(), t.float())
    w, tau = float(cfg["logit_weight"]), float(cfg["temperature"])
    if w:
        log_p_student = F.log_softmax(student_logits.float() / tau, 1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / tau, 1)
        loss = loss + w * tau * tau * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    if cfg["label_weight"]:
        loss = loss + float(cfg["label_weight"]) * F.cross_entropy(student_logits.float(), y)
    return loss


def _distill_step(model, teacher, xb, yb, cfg, device, amp, teach: dict):
    """The teacher relaxes (no_grad, its own T and tol, fp32, outside autocast) on the student's batch; returns
    (the distillation loss, the student's logits) and adds the teacher's residuals and the agreement to `teach`."""
    with torch.no_grad():
        t_states, _ = teacher.relax(xb, teacher.T, tol=getattr(teacher, "tol", None))
        t_logits = teacher.logits(t_states).float()
        r = teacher.last_residual.double()
        teach["max"] = torch.maximum(teach["max"], r.max())
        teach["sum"] += r.sum()
        teach["steps"] += teacher.last_sample_steps.double().sum()
    with _autocast(device, amp):
        s_states = model.states(xb)
        logits = model.logits(s_states)
    loss = distill_loss(s_states, logits, t_states, t_logits, yb, cfg)
    teach["agree"] += (logits.detach().argmax(1) == t_logits.argmax(1)).sum()
    return loss, logits


def validation_split(n: int, seed: int, fraction: float = VAL_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of an n-image training set: a seeded random `fraction` (at least one
    image) held out, both sorted. The same seed gives the same split (resume, reruns)."""
    g = torch.Generator().manual_seed(int(seed) + 7919)  # its own stream: the data order is untouched
    perm = torch.randperm(n, generator=g)
    k = min(n - 1, max(1, round(n * fraction)))
    return perm[k:].sort().values, perm[:k].sort().values


def check_plan(model: nn.Module, recipe: dict, n_train: int, select: str = "last",
               sample: torch.Tensor | None = None, teacher: nn.Module | None = None) -> None:
    """The checks `fit` makes before it trains, without side effects: callers run them before they open a run,
    so that a recipe the model cannot use is a usage error, not a failed run. `sample` (a few uint8 training
    images): the recipe's augmentation is tried on them (a 4-pixel reflect pad needs images larger than 4).
    `teacher`: the EP-CNN a recipe with `distill` learns from (checked against the student's layers)."""
    adv = recipe.get("adv")
    if recipe.get("distill"):
        if not callable(getattr(model, "states", None)) or _is_ep(model):
            raise UsageError("distillation (recipe distill) trains an ep-student (a feed-forward copy of the "
                             f"EP-CNN), not {getattr(model, 'spec', {}).get('name', type(model).__name__)}")
        if adv:
            raise UsageError("recipe distill and adv do not combine: distillation trains on the teacher's fixed "
                             "points of clean images (--set adv=null)")
        if teacher is not None:
            if not callable(getattr(teacher, "relax", None)):
                raise UsageError("the teacher of a distillation must be an EP-CNN (it has no relaxation)")
            from epcli.student import check_matches_teacher
            check_matches_teacher(model, teacher)
    elif teacher is not None:
        raise UsageError("a teacher is only used by a recipe with a distill section (such as distill-ep)")
    if _is_ep(model) and adv:
        raise UsageError("adversarial training (recipe adv) is for backprop models, not the EP-CNN")
    if adv and adv.get("eps") is None:
        raise UsageError("adversarial training needs an eps (--adv-train l2:EPS or --set adv.eps=EPS); the paper "
                         f"trained L2 PGD-AT with eps in {{{', '.join(map(str, PAPER_AT_EPS))}}}")
    if adv:
        check_adv_eps(adv["eps"], adv["norm"])
    ep = recipe.get("ep") or {}
    if _is_ep(model) and callable(getattr(model, "min_steps", None)) and ep.get("T1") is not None:
        need = model.min_steps(ep.get("update"))  # the free phase must reach the read-out
        if int(ep["T1"]) < need:
            raise UsageError(f"ep.T1={ep['T1']} is smaller than the {need} steps the input needs to reach the "
                             f"read-out ({ep.get('update') or model.update} update)")
    if select not in SELECTS:
        raise UsageError(f"unknown checkpoint selection {select!r}: use {', '.join(SELECTS)}")
    if select == "best-val" and n_train < 2:
        raise UsageError("--select best-val needs at least 2 training images (one is held out)")
    _param_groups(model, recipe["optimizer"])  # per-layer learning rates must match the model's layers
    aug = recipe.get("augment")
    if aug and sample is not None and len(sample):
        from epcli.data import crop_flip
        xb = sample[:2].float().div(255)
        try:
            if aug in ("randaugment", "autoaugment"):
                xb = _policy_augment(xb, _policy_transform(aug), recipe.get("augment_group", 8))
            crop_flip(xb, pad=4, pad_mode=recipe["pad_mode"], generator=torch.Generator().manual_seed(0))
        except (RuntimeError, ValueError) as e:
            h, w = sample.shape[-2:]
            raise UsageError(f"augment {aug} (pad_mode {recipe['pad_mode']}) cannot work on {h}x{w} images "
                             f"({' '.join(str(e).split())[:160]}): --set augment=null or another pad_mode") from None


def fit(model: nn.Module, dataset, recipe: dict | str, *, device: str | torch.device = "cpu", seed: int = 0,
        state: dict | None = None, on_epoch: Callable | None = None, on_batch: Callable | None = None,
        max_epochs: int | None = None, select: str = "last", teacher: nn.Module | None = None) -> list[dict]:
    """Train `model` on `dataset` (an `epcli.data.Dataset`) with `recipe`; return one metrics dict per epoch.

    Args:
        recipe: a resolved recipe dict (see `resolve_recipe`) or a preset name.
        seed: seeds the data order/augmentation generator and the global RNG (fresh runs only).
        state: a state passed to `on_epoch` earlier (or `tensors_to_state(...)` of it): resume exactly.
        on_epoch: `on_epoch(epoch, metrics, state)` after each epoch (1-based epoch); metrics has train_loss,
            train_acc, test_acc (fractions), seconds (training time of the epoch), lr, and mean_steps for EP.
        on_batch: `on_batch(done, total, info)` for progress (info: epoch, loss of the batch).
        max_epochs: stop once this many epochs (in total, resumed ones included) are done; the schedule
            still follows recipe["epochs"], so a later resume continues the same run.
        select: "best-val" holds out a seeded `validation_split` of the training set (not trained on) and adds
            val_acc to the metrics; "last" and "best-test" train on everything. Which epoch is kept is the
            caller's business (`on_epoch` sees every epoch's metrics).
        teacher: the EP-CNN a recipe with `distill` learns from (needed then, refused otherwise). It relaxes
            under no_grad, at its own T and tol, on the same augmented batch as the student; a fresh run with
            distill.init "teacher" starts from the teacher's weights. It is not part of `state`.

    Distillation adds, per epoch: teacher_residual / teacher_residual_mean (the largest / mean per-example
    relative residual of the teacher's last relaxation step on the training batches: how close its targets are
    to a fixed point), teacher_steps (mean relaxation steps per example) and teacher_agreement (the fraction of
    training examples on which the student's prediction is the teacher's).

    EP models also get, per epoch: mean_steps / mean_steps_nudged (steps per example of the free / nudged
    phases), residual_free / residual_nudged (the largest per-example relative residual at the end of the
    phase, `epcli.ep.relative_residual`) and residual_free_mean / residual_nudged_mean. With recipe
    ep.warm_start each example's free phase starts from its own end state of the previous epoch (a bank of
    states on the device, fp16 on CUDA, zeros at first); the bank is not part of `state`, so a resumed run
    restarts it from zeros (the only way such a resume differs from an uninterrupted run).

    Under torchrun (several processes) every rank calls `fit` with the same arguments: the process group is
    joined if needed, rank 0's weights are broadcast, each rank trains on its slice of every global batch
    (recipe batch_size is global), gradients are averaged, BatchNorm becomes SyncBatchNorm on CUDA (on the
    CPU it normalises per rank and rank 0's running statistics are broadcast after every epoch), metrics are
    reduced over all ranks, and only rank 0 calls `on_epoch`/`on_batch` (they are ignored elsewhere). The
    state also holds every rank's own RNG streams (`rng_ranks`), so a resume with the same number of
    processes is exact.

    Raises:
        Diverged: the loss became NaN/inf.
    """
    from epcli import distributed as dist
    from epcli.data import batches

    if isinstance(recipe, str):
        recipe = resolve_recipe(recipe, {})
    r = recipe
    device = torch.device(dist.device_for(str(device)))
    if dist.launched():
        dist.init(device)
    world, rank = dist.world_size(), dist.rank()
    if rank != 0:  # progress and checkpoints are rank 0's business
        on_epoch = on_batch = None
    ep_mode = _is_ep(model)
    check_plan(model, r, len(dataset.train_y), select, sample=dataset.train_x[:2], teacher=teacher)
    distill = r.get("distill")
    if distill and teacher is None:
        raise UsageError("recipe distill needs the teacher model: fit(..., teacher=an EP-CNN)")
    adv = r.get("adv")
    if adv:
        adv = {**adv, "eps": check_adv_eps(adv["eps"], adv["norm"])}
    ep_cfg = {**EP_DEFAULTS, **(r.get("ep") or {})} if ep_mode else None
    epochs = int(r["epochs"])
    stop = min(epochs, int(max_epochs)) if max_epochs is not None else epochs
    cuda = device.type == "cuda"

    model.to(device)
    if distill:
        teacher.to(device).eval()  # it only relaxes, under no_grad: its weights never change
        if state is None and distill["init"] == "teacher":  # before rank 0's weights are broadcast
            from epcli.student import init_from_teacher
            init_from_teacher(model, teacher)
    if world > 1 and cuda:
        _sync_batchnorm(model)
    if cuda and r.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, r["optimizer"], device)
    rank_seed = int(seed) + RANK_SEED_STRIDE * rank  # rank 0: the single-process seed
    data_gen = torch.Generator().manual_seed(int(seed))  # shared: the same order and augmentation everywhere
    adv_gen = torch.Generator().manual_seed(rank_seed + 1)
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        history = [dict(h) for h in state.get("history", [])]
        _set_rng_state(state["rng"], device, data_gen, adv_gen)  # rank 0's streams and the shared data stream
        if rank > 0:
            ranks = state.get("rng_ranks") or []
            if len(ranks) == world:
                _set_rank_rng(ranks[rank], device, adv_gen)
            else:  # resumed with another number of processes: deterministic, but not the original streams
                torch.manual_seed(rank_seed + start_epoch)
                if cuda:
                    torch.cuda.manual_seed(rank_seed + start_epoch)
                adv_gen.manual_seed(rank_seed + 1 + start_epoch)
    else:
        torch.manual_seed(rank_seed)
        if cuda:
            torch.cuda.manual_seed(rank_seed)
    if world > 1:  # one model: every replica starts from rank 0's weights and buffers
        dist.broadcast_(list(model.parameters()) + list(model.buffers()))
    if ep_mode and cuda and r.get("amp") and callable(getattr(model, "accelerate", None)):
        # EP "amp": fp16 relaxation (bf16 states lose the first layer's EP signal; see timings.md), fp32 updates
        model.accelerate(torch.float16, channels_last=True, compile=bool(r.get("compile")))
    fwd = model
    if cuda and r.get("compile") and not ep_mode:
        fwd = torch.compile(model)
    amp = bool(r.get("amp")) and cuda and not ep_mode

    # The whole split goes to the device once; batches are drawn there. Each rank tests on its slice.
    train_x, train_y = dataset.train_x.to(device), dataset.train_y.to(device)
    val_x = val_y = None
    if select == "best-val":
        tr_idx, va_idx = validation_split(len(train_y), seed)
        v_lo, v_hi = dist.shard_range(len(va_idx), rank, world)
        val_x, val_y = train_x[va_idx[v_lo:v_hi].to(device)], train_y[va_idx[v_lo:v_hi].to(device)]
        n_val = len(va_idx)
        train_x, train_y = train_x[tr_idx.to(device)], train_y[tr_idx.to(device)]
    t_lo, t_hi = dist.shard_range(len(dataset.test_y), rank, world)
    test_x, test_y = dataset.test_x[t_lo:t_hi].to(device), dataset.test_y[t_lo:t_hi].to(device)
    n_test = len(dataset.test_y)
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(train_y)
    bs = int(r["batch_size"])
    drop_last = bool(r.get("drop_last")) and n >= bs
    total = n // bs if drop_last else math.ceil(n / bs)
    aug = r.get("augment")
    policy = _policy_transform(aug) if aug in ("randaugment", "autoaugment") else None
    smoothing = float(r.get("label_smoothing") or 0.0)
    clip = r.get("grad_clip")
    progress_every = 20 if cuda else 1
    index = torch.arange(n, device=device)  # batches() of the indices: the same draws as of the labels
    bank = None  # warm starts: every training example's free-phase end state
    if ep_mode and ep_cfg.get("warm_start"):
        bank = [torch.zeros(n, *shape, dtype=torch.float16 if cuda else torch.float32, device=device)
                for shape in model.shapes]

    if adv:
        from epcli.attacks import pgd  # lazily: the attacks package is the one PGD implementation

    for epoch in range(start_epoch, stop):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen, steps_sum, steps2_sum = 0, 0, 0
        # distillation: the teacher's residuals, steps and agreement, summed on the device (no per-batch sync)
        teach = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("max", "sum", "steps", "agree")}
        res = {"residual_free": 0.0, "residual_nudged": 0.0, "residual_free_mean": 0.0, "residual_nudged_mean": 0.0}
        lr0 = _set_lr(optimizer, r["schedule"], epoch, 0.0, epochs)
        it = batches(train_x, index, bs, shuffle=True, augment="crop-flip" if aug and not policy else None,
                     pad_mode=r["pad_mode"], device=device, generator=data_gen, drop_last=drop_last)
        for b, (xb, ib) in enumerate(it):  # the global batch, the same on every rank
            n_global = len(ib)
            lo, hi = dist.shard_range(n_global, rank, world)
            if world > 1:
                xb, ib = xb[lo:hi], ib[lo:hi]
            yb = train_y[ib]
            nb = len(yb)
            _set_lr(optimizer, r["schedule"], epoch, b / total, epochs)
            if policy is not None:
                if nb:
                    xb = _policy_augment(xb, policy, r.get("augment_group", 8))
                xb = _crop_flip_slice(xb, lo, n_global, r["pad_mode"], data_gen, world)
            if cuda and r.get("channels_last"):
                xb = xb.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            logits = None
            if nb == 0:  # a last batch smaller than the world: this rank only joins the reduction
                loss = torch.zeros((), dtype=torch.float64, device=device)
            elif ep_mode:
                extra = {k: ep_cfg[k] for k in ("update", "solver", "tol", "tol_nudged") if ep_cfg.get(k)}
                if bank is not None:
                    extra["states"] = [t[ib] for t in bank]
                out = model.ep_train_step(xb, yb, int(ep_cfg["T1"]), int(ep_cfg["T2"]), float(ep_cfg["beta"]),
                                          ep_cfg.get("rule", "symmetric"), **extra)
                loss = torch.as_tensor(out["loss"], dtype=torch.float64, device=device)
                logits = out["logits"]
                steps_sum += float(out.get("steps_mean", out.get("steps", 0))) * len(yb)
                steps2_sum += float(out.get("steps_nudged_mean", out.get("steps_nudged", 0))) * len(yb)
                for k in ("residual_free", "residual_nudged"):
                    res[k] = max(res[k], float(out.get(k, 0.0)))
                    res[k + "_mean"] += float(out.get(k + "_mean", 0.0)) * len(yb)
                if bank is not None:  # this batch's free fixed points start its next epoch
                    for t, s in zip(bank, out["states"]):
                        t[ib] = s.to(t.dtype)
            elif distill:
                loss, logits = _distill_step(model, teacher, xb, yb, distill, device, amp, teach)
                loss.backward()
            else:
                if adv:
                    if adv["labels"] == "predicted":  # ART's default: attack the model's own predictions
                        with torch.no_grad(), _autocast(device, amp):
                            model.eval()
                            target = fwd(xb).argmax(1)
                    else:
                        target = yb
                    with _autocast(device, amp):  # bf16 attack steps on CUDA when amp: 20 steps = 20 passes
                        xb = pgd(model, xb, target, eps=adv["eps"], norm=adv["norm"], steps=int(adv["steps"]),
                                 step_size=adv.get("step_size"), random_start=bool(adv.get("random_start")),
                                 generator=adv_gen).float()  # pgd: eval mode inside, restored after
                    model.train()
                with _autocast(device, amp):
                    logits = fwd(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=smoothing)
                loss.backward()
            loss_d = loss.detach().to(torch.float64)
            loss_g = _sync_grads(params, loss_d, nb, n_global, world) if world > 1 else loss_d
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
            optimizer.step()
            loss_sum += loss_d * nb
            if logits is not None:
                correct += (logits.detach().argmax(1) == yb).sum()
            seen += nb
            if (b + 1) % progress_every == 0 or b + 1 == total:
                lv = float(loss_g)  # one host sync every few batches (every batch on CPU); the same on all ranks
                if not math.isfinite(lv):
                    raise Diverged(f"training diverged: loss {lv} at epoch {epoch + 1}, batch {b + 1}")
                if on_batch is not None:
                    on_batch(b + 1, total, {"epoch": epoch + 1, "loss": lv})
        if cuda:
            torch.cuda.synchronize(device)
        test_correct = _correct(model, test_x, test_y, int(r.get("eval_batch_size") or 500), device, amp=amp,
                                fwd=fwd if not ep_mode else None)
        val_correct = torch.zeros((), device=device)
        if val_x is not None:
            val_correct = _correct(model, val_x, val_y, int(r.get("eval_batch_size") or 500), device, amp=amp,
                                   fwd=fwd if not ep_mode else None)
        if world > 1:  # sums over the ranks; replicas keep rank 0's BatchNorm running statistics
            f64 = lambda v: torch.as_tensor(float(v), dtype=torch.float64, device=device)  # noqa: E731
            tot = dist.all_reduce_sum_([torch.stack([
                loss_sum.to(torch.float64), correct.to(torch.float64), test_correct.to(torch.float64),
                f64(seen), f64(steps_sum), f64(steps2_sum), val_correct.to(torch.float64),
                f64(res["residual_free_mean"]), f64(res["residual_nudged_mean"]), f64(teach["sum"]),
                f64(teach["steps"]), f64(teach["agree"])])])[0].tolist()
            loss_sum, correct, test_correct, seen, steps_sum = tot[0], tot[1], tot[2], int(tot[3]), tot[4]
            steps2_sum, val_correct = tot[5], tot[6]
            res["residual_free_mean"], res["residual_nudged_mean"] = tot[7], tot[8]  # maxima: rank 0's slices
            teach["sum"], teach["steps"], teach["agree"] = tot[9], tot[10], tot[11]
            dist.broadcast_([bf for bf in model.buffers()])
        seconds = time.perf_counter() - t0
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise Diverged(f"training diverged: mean loss {train_loss} in epoch {epoch + 1}")
        test_acc = float(test_correct) / max(1, n_test)
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": float(correct) / max(seen, 1),
                   "test_acc": test_acc, "seconds": seconds, "lr": lr0}
        if val_x is not None:
            metrics["val_acc"] = float(val_correct) / max(1, n_val)
        if ep_mode:
            metrics["mean_steps"] = steps_sum / max(seen, 1)
            metrics["mean_steps_nudged"] = steps2_sum / max(seen, 1)
            metrics.update({k: (v / max(seen, 1) if k.endswith("_mean") else v) for k, v in res.items()})
        if distill:
            metrics.update(teacher_residual=float(teach["max"]),
                           teacher_residual_mean=float(teach["sum"]) / max(seen, 1),
                           teacher_steps=float(teach["steps"]) / max(seen, 1),
                           teacher_agreement=float(teach["agree"]) / max(seen, 1))
        history.append(metrics)
        rng_ranks = dist.all_gather_object(_cpu_clone(_rank_rng(device, adv_gen))) if world > 1 else None
        if on_epoch is not None:
            st = {"model": _cpu_clone(model.state_dict()), "optimizer": _cpu_clone(optimizer.state_dict()),
                  "scheduler": {"name": r["schedule"]["name"], "epoch": epoch + 1},
                  "epoch": epoch + 1, "seed": int(seed), "history": [dict(h) for h in history],
                  "rng": _cpu_clone(_rng_state(device, data_gen, adv_gen)), "recipe": copy.deepcopy(r)}
            if rng_ranks is not None:
                st["world_size"] = world
                st["rng_ranks"] = rng_ranks
            on_epoch(epoch + 1, dict(metrics), st)
    return history
