"""CIFAR-C coverage: which of the 15 benchmark and 4 extra corruptions x 5 severities a corrupt run covered,
the label saying what a mean was taken over, and the means a report may show (the 15-, 18- and 19-corruption
means, and mCE, only when that set is complete)."""

from __future__ import annotations

# corrupt.py's names (the report never imports torch); tests pin them to epcli.corruptions
BENCHMARK_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                         "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                         "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


def corruption_coverage(cells: dict[str, set]) -> dict:
    """Which corruptions x severities a corrupt run covered, and whether the 15-, 18- and 19-means exist."""
    def full(names) -> bool:
        return all(c in cells and set(SEVERITIES) <= set(cells[c]) for c in names)
    allc = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    bench = [c for c in BENCHMARK_CORRUPTIONS if c in cells]
    sevs = [set(cells[c]) for c in bench] or [set()]
    return {"benchmark": bench, "extra": [c for c in EXTRA_CORRUPTIONS if c in cells],
            "severities": sorted(set.intersection(*sevs)), "uniform": all(v == sevs[0] for v in sevs),
            "complete15": full(BENCHMARK_CORRUPTIONS), "complete19": full(allc),
            "complete18": full([c for c in allc if c != "frost"])}


def corruption_mean_label(cov: dict) -> str:
    """"mean of 5/15 benchmark corruptions × 5 severities" (the set a mean was taken over)."""
    sev = cov.get("severities") or []
    if not cov.get("uniform", True):
        s = "uneven severities"
    elif sev == list(SEVERITIES):
        s = "5 severities"
    else:
        s = f"severit{'y' if len(sev) == 1 else 'ies'} {','.join(str(x) for x in sev)}"
    return f"mean of {len(cov.get('benchmark') or [])}/15 benchmark corruptions × {s}"


def _corruption_means(c: dict) -> None:
    """Means over exactly the corruptions x severities that were run, each labelled with that set; the 15- and
    19-corruption means (and mCE) only when that set is complete, the paper's 18 (no frost) likewise."""
    cells = c.pop("_cells", None)
    if not cells:
        return
    cov = corruption_coverage({n: set(v) for n, v in cells.items()})
    bench = [a for n in cov["benchmark"] for a in cells[n].values()]
    c["coverage"] = {k: cov[k] for k in ("benchmark", "extra", "severities", "complete15", "complete19")}
    c["mean_label"] = corruption_mean_label(cov)
    c["mean"] = sum(bench) / len(bench) if bench else None
    everything = [a for v in cells.values() for a in v.values()]
    c["mean_all"] = sum(everything) / len(everything) if cov["complete19"] else None
    no_frost = [a for n, v in cells.items() if n != "frost" for a in v.values()]
    c["mean18"] = sum(no_frost) / len(no_frost) if cov["complete18"] else None
    if not cov["complete15"]:
        for key in ("mce", "relative_mce"):
            if c.get(key) is not None:
                c[key] = None
                c.setdefault("withheld", []).append(key)
