"""The paper's logged numbers, for side-by-side comparison with epcli's own results.

`assets/paper_facts.json` holds every number of Mansingh et al. 2024 that the fact sheet
(`reference/paper-facts.md`) could recover from the authors' logs: clean accuracies (§4), PGD / Square /
AutoAttack tables (§6), CIFAR-10-C means (§8), the characteristic time (§2.3) and the attack-unroll sweep
(§9.1). Values are in percent. Each fact is a flat dict:

    {"model": "ep-cnn", "dataset": "cifar10", "metric": "robust_acc", "attack": "pgd", "norm": "l2",
     "eps": 0.486219, "value": 44.03, "std": 0.61, "n_seeds": 5, "n_examples": 10000,
     "grad_mode": "truncated:70", "variant": null, "section": "§6", "protocol": "pgd"}

`variant` is null for the number the paper plots (the one to compare against); other runs of the same cell
(attack unroll T=29, the ViT seeds, the 20000-iteration Square, the second AutoAttack log) carry a name.
`protocol` points into the file's "protocols" map (a one-line description of how the paper measured it).

Model keys: "ep-cnn", "cnn", "vit", "cnn-at-l2-<eps>" (eps in `%g` form: 0.05, 0.5, 0.75, 1).
Dataset keys: "cifar10", "cifar100".

The JSON was built once from the fact sheet with `build_facts(markdown_text)` (kept here so the asset can be
rebuilt and checked: `python -m epcli.paper path/to/paper-facts.md > epcli/assets/paper_facts.json`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ASSET = Path(__file__).parent / "assets" / "paper_facts.json"

EPS_RTOL = 0.02  # eps values match within 2 % (0.031 ~ 8/255 = 0.031373; 0.4862 ~ 0.486219)
DATASET_ALIASES = {"cifar10": "cifar10", "cifar-10": "cifar10", "cifar10-mini": "cifar10", "embedded": "cifar10",
                   "cifar100": "cifar100", "cifar-100": "cifar100"}


# --- lookups ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def load_facts() -> dict:
    """The parsed asset: {"source", "models", "protocols", "facts": [...]}."""
    return json.loads(ASSET.read_text())


def eps_match(a: float | None, b: float | None, rtol: float = EPS_RTOL) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-9)


def paper_dataset(dataset: str | None) -> str | None:
    """The paper dataset an epcli dataset name corresponds to (cifar10-mini -> cifar10), or None."""
    if dataset is None:
        return None
    return DATASET_ALIASES.get(str(dataset).lower())


def paper_values(model_key: str, dataset: str | None = "cifar10", attack: str | None = None,
                 norm: str | None = None, eps: float | None = None, metric: str | None = None,
                 variant: str | None | bool = None, **facets: Any) -> list[dict]:
    """Every fact for `model_key` matching the filters (None = any), primary (variant null) first.

    `eps` matches by relative tolerance EPS_RTOL. `variant=None` returns all variants; `variant=False` only
    the primary number; a string only that variant. Extra facets (grad_mode, corruption, severity, T) match
    exactly.
    """
    ds = paper_dataset(dataset) if dataset is not None else None
    out = []
    for f in load_facts()["facts"]:
        if f["model"] != model_key:
            continue
        if ds is not None and f["dataset"] != ds:
            continue
        if dataset is not None and ds is None:
            continue
        if metric is not None and f.get("metric") != metric:
            continue
        if attack is not None and f.get("attack") != attack:
            continue
        if norm is not None and f.get("norm") != norm:
            continue
        if eps is not None and not eps_match(f.get("eps"), eps):
            continue
        if variant is False and f.get("variant") is not None:
            continue
        if isinstance(variant, str) and f.get("variant") != variant:
            continue
        if any(f.get(k) != v for k, v in facets.items()):
            continue
        out.append(f)
    out.sort(key=lambda f: (f.get("variant") is not None, f.get("variant") or ""))
    return out


def paper_value(model_key: str, **filters: Any) -> dict | None:
    """The primary fact (variant null) matching `filters`, or None."""
    hits = paper_values(model_key, variant=False, **filters)
    return hits[0] if hits else None


def protocol(name: str | None) -> str:
    return load_facts()["protocols"].get(name or "", "")


def _fmt_eps(x: float) -> str:
    return f"{float(x):g}"


def paper_key_for(run: dict) -> str | None:
    """Map a training run (a `runs` row, config decoded or not) to a paper model key, or None.

    ep-* models -> "ep-cnn"; vit* -> "vit"; a cnn with config["adv"] = {"norm": "l2", "eps": e} ->
    "cnn-at-l2-<e>" when the paper trained that eps (0.05, 0.5, 0.75, 1), else None; a plain cnn -> "cnn";
    a distilled student (recipe distill) -> None (the follow-up's numbers are unknown).
    """
    cfg = run.get("config") or {}
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = {}
    name = str(run.get("model") or cfg.get("model") or "").lower()
    if cfg.get("paper_key"):
        return str(cfg["paper_key"])
    recipe = cfg.get("recipe")
    adv = cfg.get("adv") or (recipe.get("adv") if isinstance(recipe, dict) else None)
    if isinstance(recipe, dict) and recipe.get("distill"):  # a distilled student: the paper has no such model
        return None
    if name.startswith("ep"):
        return "ep-cnn" if not adv else None
    if name.startswith("vit"):
        return "vit" if not adv else None
    if name.startswith("cnn"):
        if not adv:
            return "cnn"
        if str(adv.get("norm", "")).lower() not in ("l2", "2"):
            return None
        try:
            e = float(adv.get("eps"))
        except (TypeError, ValueError):
            return None
        key = f"cnn-at-l2-{_fmt_eps(e)}"
        return key if key in load_facts()["models"] else None
    return None


# --- building the asset from the fact sheet ----------------------------------------------------------------

_PROTOCOLS = {
    "pgd": "ART PGD, 20 iterations, step 2.5*eps/20, no random start, no [0,1] clipping, attacks the "
           "model's predicted labels, full 10k test set; EP gradient = BPTT through a 70-step unroll "
           "(truncated:70), EP prediction with T=250",
    "square": "ART Square, max_iter 1000 (~3000 queries), 1 restart, p_init 0.8, clipped to [0,1], predicted "
              "labels, first 200 test images; EP queried with T=250",
    "autoattack": "ART AutoAttack (APGD-CE, APGD-DLR, DeepFool, Square; ART defaults, not fra31 "
                  "standard), L-inf only, clipped to [0,1], predicted labels, first 200 test images; EP "
                  "gradient unroll not recorded",
    "clean": "clean test accuracy on the 10k test set; EP: T=250, checkpoint with the best test accuracy",
    "corruption": "official CIFAR-10-C .npy, 10k images x 5 severities; mean over 18 corruptions (EP logs "
                  "have no frost); EP possibly evaluated at T=29 (code default)",
    "steps": "CIFAR-10 test accuracy vs free-phase iterations, mean over 5 seeds",
    "unroll": "seed 11, L2 PGD as in 'pgd', prediction T=250, gradient through a T-step unroll; T=15/20 rows "
              "at eps<0.3 on 200 images",
}

_MODELS = {
    "ep-cnn": {"label": "EP-CNN", "architecture": "4-layer conv EP network (128-256-512-512), T1=250"},
    "cnn": {"label": "CNN", "architecture": "4-layer conv BN-ReLU CNN (128-256-512-512)"},
    "vit": {"label": "ViT", "architecture": "ViT patch 4 (omihub777 ViT-CIFAR), trained from scratch"},
    "cnn-at-l2-0.05": {"label": "CNN (AT L2 ε=0.05)", "architecture": "CNN, L2 PGD adversarial training"},
    "cnn-at-l2-0.5": {"label": "CNN (AT L2 ε=0.5)", "architecture": "CNN, L2 PGD adversarial training"},
    "cnn-at-l2-0.75": {"label": "CNN (AT L2 ε=0.75)", "architecture": "CNN, L2 PGD adversarial training"},
    "cnn-at-l2-1": {"label": "CNN (AT L2 ε=1)", "architecture": "CNN, L2 PGD adversarial training"},
}

_CELL = re.compile(r"^\s*(-?\d+(?:\.\d+)?)(?:\s*±\s*(\d+(?:\.\d+)?))?(?:\s*\[n=(\d+)\])?\s*$")


def _cell(text: str) -> tuple[float, float | None, int | None] | None:
    m = _CELL.match(text.strip())
    if not m:
        return None
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), (int(m.group(3)) if m.group(3)
                                                                              else None)


def _column(head: str, attack: str) -> dict | None:
    """A §6 table column header -> {model, variant, grad_mode}."""
    h = head.strip()
    second = '"Square"' in h or "(\"Square\")" in h
    m = re.search(r"CNN-AT (?:eps=)?([\d.]+)", h)
    if m:
        key = f"cnn-at-l2-{_fmt_eps(float(m.group(1)))}"
        return {"model": key, "variant": "aa-second-log" if second else None, "grad_mode": None}
    if h.startswith("EP-CNN"):
        grad = "truncated:70" if attack == "pgd" else None
        variant = None
        t = re.search(r"T=(\d+)", h)
        if t:
            grad = f"truncated:{t.group(1)}"
            if t.group(1) != "70":
                variant = f"attack-T{t.group(1)}"
        if second:
            variant = "aa-second-log"
        return {"model": "ep-cnn", "variant": variant, "grad_mode": grad}
    if h.startswith("ViT"):
        variant = "seeds" if "seeds" in h else None
        if second:
            variant = "aa-second-log"
        return {"model": "vit", "variant": variant, "grad_mode": None}
    if h.startswith("CNN std") or h.startswith("CNN (std)"):
        return {"model": "cnn", "variant": None, "grad_mode": None}
    return None


def _tables(md: str) -> list[tuple[str, list[list[str]]]]:
    """(heading, rows of cells) for every '####' table."""
    out, heading, rows = [], None, []
    for line in md.splitlines():
        if line.startswith("#"):
            if heading and rows:
                out.append((heading, rows))
            heading, rows = line.lstrip("# ").strip(), []
        elif line.startswith("|") and heading:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
    if heading and rows:
        out.append((heading, rows))
    return out


def build_facts(md: str) -> dict:
    """Build the paper_facts.json content from the fact sheet's markdown."""
    facts: list[dict] = []

    def add(**f):
        base = {"model": None, "dataset": "cifar10", "metric": "robust_acc", "attack": None, "norm": None,
                "eps": None, "value": None, "std": None, "n_seeds": None, "n_examples": None,
                "grad_mode": None, "corruption": None, "severity": None, "T": None, "variant": None,
                "section": None, "protocol": None, "note": None}
        base.update(f)
        facts.append(base)

    # §6 robust-accuracy tables
    for heading, rows in _tables(md):
        if not heading.startswith(("CIFAR-10,", "CIFAR-100,")):
            continue
        dataset = "cifar100" if heading.startswith("CIFAR-100") else "cifar10"
        attack = "pgd" if "PGD" in heading else "autoattack" if "AutoAttack" in heading else \
            "square" if "Square" in heading else None
        if attack is None:
            continue
        norm = "l2" if re.search(r"\bL2\b", heading) else "linf"
        table_variant = "max_iter-20000" if "20000" in heading else None
        n_default = 10000 if attack == "pgd" else 200
        header, body = rows[0], rows[1:]
        cols = [_column(h, attack) for h in header[1:]]
        for r in body:
            try:
                eps = float(r[0])
            except ValueError:
                continue
            for col, text in zip(cols, r[1:]):
                parsed = _cell(text) if col else None
                if not parsed:
                    continue
                value, std, n = parsed
                variant = col["variant"] or table_variant
                n_ex = n_default
                if col["model"] == "vit" and col["variant"] == "seeds":
                    n_ex = None  # "some on 1000 images"
                add(model=col["model"], dataset=dataset, attack=attack, norm=norm, eps=eps, value=value,
                    std=std, n_seeds=n if n else (5 if std is not None else 1), n_examples=n_ex,
                    grad_mode=col["grad_mode"], variant=variant, section="§6", protocol=attack)

    # §4 clean accuracies
    clean = [("ep-cnn", "cifar10", 88.11, 0.64, 5, "EP-CNN, T1=250"),
             ("ep-cnn", "cifar100", 64.05, 0.21, 5, "EP-CNN, T1=250"),
             ("cnn", "cifar10", 88.55, 0.36, 5, "read from the L2 PGD eps=0.005 row (≈88.6)"),
             ("cnn", "cifar100", 68.0, None, 1, "≈68 on 200 images (Square log at eps=0.001)"),
             ("vit", "cifar10", 84.72, None, 1, "patch 4 with augmentation, single run"),
             ("cnn-at-l2-0.05", "cifar10", 89.72, 0.45, 5, "L-inf PGD eps=1e-4 row (essentially clean)"),
             ("cnn-at-l2-0.5", "cifar10", 84.92, 0.52, 5, "L-inf PGD eps=1e-4 row (essentially clean)"),
             ("cnn-at-l2-0.75", "cifar10", 81.87, 0.62, 5, "L-inf PGD eps=1e-4 row (essentially clean)"),
             ("cnn-at-l2-1", "cifar10", 78.74, 0.91, 5, "L-inf PGD eps=1e-4 row (essentially clean)"),
             ("cnn-at-l2-0.05", "cifar100", 67.39, 0.28, 5, "L2 PGD eps=0.005 row"),
             ("cnn-at-l2-0.5", "cifar100", 62.27, 0.16, 5, "L2 PGD eps=0.005 row"),
             ("cnn-at-l2-0.75", "cifar100", 59.21, 0.21, 5, "L2 PGD eps=0.005 row"),
             ("cnn-at-l2-1", "cifar100", 56.28, 0.19, 5, "L2 PGD eps=0.005 row")]
    for model, ds, v, s, n, note in clean:
        add(model=model, dataset=ds, metric="clean_acc", value=v, std=s, n_seeds=n,
            n_examples=200 if "200 images" in note else 10000, section="§4", protocol="clean", note=note)
    add(model="ep-cnn", dataset="cifar10", metric="clean_acc", value=87.30, std=0.34, n_seeds=5, n_examples=10000,
        T=30, variant="predict-T30", section="§4", protocol="clean", note="read out at T=30 instead of 250")

    # §8 corruptions: per-corruption table and per-model means
    corr_models = ["ep-cnn", "cnn-at-l2-0.05", "cnn-at-l2-0.5", "cnn-at-l2-0.75", "cnn-at-l2-1"]
    for heading, rows in _tables(md):
        if not heading.startswith("8. Natural corruptions"):
            continue
        for r in rows:
            if r[0] == "corruption" or r[0] == "model":
                continue
            if re.match(r"^[a-z_]+$", r[0]):
                for model, text in zip(corr_models, r[1:]):
                    parts = [p.strip() for p in text.split("/")]
                    if len(parts) != 3:
                        continue
                    for sev, p in zip((1, 5, None), parts):
                        add(model=model, metric="corruption_acc", corruption=r[0], severity=sev, value=float(p),
                            n_seeds=5, n_examples=10000, section="§8", protocol="corruption",
                            note=None if sev else "mean over severities 1-5")
            else:
                key = {"EP-CNN": "ep-cnn", "CNN-AT 0.05": "cnn-at-l2-0.05", "CNN-AT 0.5": "cnn-at-l2-0.5",
                       "CNN-AT 0.75": "cnn-at-l2-0.75", "CNN-AT 1": "cnn-at-l2-1"}.get(r[0])
                if not key:
                    continue
                for sev, text in enumerate(r[1:6], start=1):
                    add(model=key, metric="corruption_severity_mean_acc", severity=sev, value=float(text),
                        n_seeds=5, n_examples=10000, section="§8", protocol="corruption",
                        note="mean over 18 corruptions at this severity")
                v, s, _ = _cell(r[6])
                add(model=key, metric="corruption_mean_acc", value=v, std=s, n_seeds=5, n_examples=10000,
                    section="§8", protocol="corruption",
                    note="mean over 18 corruptions (no frost) x 5 severities, not the 15 benchmark corruptions")

    # §2.3 characteristic time
    steps = {1: 10.0, 2: 10.0, 3: 10.0, 4: 17.6, 6: 50.1, 8: 65.6, 10: 73.7, 15: 82.0, 20: 85.4, 25: 86.7,
             29: 87.2, 30: 87.3, 40: 87.8, 50: 88.1, 60: 88.1, 250: 88.1}
    for t, v in steps.items():
        add(model="ep-cnn", metric="accuracy_vs_steps", T=t, value=v, n_seeds=5, n_examples=10000,
            std={10: 1.2, 30: 0.3, 250: 0.6}.get(t), section="§2.3", protocol="steps")

    # §9.1 attack-unroll sweep (fractions in the sheet -> percent)
    sweep_eps = [0.05, 0.124198, 0.195743, 0.308503, 0.486219, 0.766309, 1.0, 1.20775, 1.90348, 3.0]
    for heading, rows in _tables(md):
        if not heading.startswith("9.1"):
            continue
        for r in rows[1:]:
            t = int(r[0])
            for e, text in zip(sweep_eps, r[1:]):
                parsed = _cell(text)
                if parsed:
                    add(model="ep-cnn", attack="pgd", norm="l2", eps=e, value=round(parsed[0] * 100, 2),
                        n_seeds=1, n_examples=10000, grad_mode=f"truncated:{t}", variant="unroll-sweep",
                        section="§9.1", protocol="unroll")

    return {
        "source": "Mansingh et al. 2024, 'How Robust Are Energy-Based Models Trained With Equilibrium "
                  "Propagation?' (arXiv:2401.11543); numbers aggregated from the authors' logs in lanl/AdvEP "
                  "(reference/paper-facts.md). Values in percent; std = population std over seeds.",
        "models": _MODELS,
        "protocols": _PROTOCOLS,
        "facts": facts,
    }


def dumps_facts(d: dict) -> str:
    """The asset's text: null fields dropped, one fact per line (small, diffable)."""
    head = {k: v for k, v in d.items() if k != "facts"}
    lines = [json.dumps({k: v for k, v in f.items() if v is not None}, ensure_ascii=False) for f in d["facts"]]
    body = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    return body + ',\n "facts": [\n  ' + ",\n  ".join(lines) + "\n ]\n}"


if __name__ == "__main__":  # pragma: no cover
    text = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else sys.stdin.read()
    print(dumps_facts(build_facts(text)))
