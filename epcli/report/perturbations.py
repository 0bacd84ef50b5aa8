"""Where in spatial frequency an attack puts its perturbation, per model: the paper saw EP's L2 perturbations draw
object-like shapes (a deer's head) where a standard CNN's were high-frequency noise (paper-facts §10). The
radially averaged power spectrum of δ = x_adv − x measures that: the fraction of the perturbation's energy at
each spatial frequency, in cycles per image. Drawn from the adversarial examples an attack run kept (the first
images of its run, 16 by default)."""

from __future__ import annotations

from epcli.report.datamodel import ATTACK_NAMES, NORM_NAMES, ReportData, _grad, eps_label
from epcli.report.image_grids import _load_adv_entry
from epcli.report.plotting import _figure_models, _plt

LOW_FREQUENCY = 4  # cycles per image: "low" when at most this (an eighth of a 32-pixel image's 16)


def radial_spectrum(delta):
    """The mean over images and channels of each perturbation's power spectrum |DFT(δ)|², normalised to sum
    1 per image and channel, summed over rings of integer radius r = round(sqrt(fy² + fx²)) cycles per image
    (r = 0 the mean, up to the corner's). delta: (N, C, H, W) or (N, H, W). Returns (r, fraction); all-zero
    perturbations (an image the attack did not touch) are left out, and none left gives an empty result."""
    import numpy as np
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim == 3:
        d = d[:, None]
    n, c, h, w = d.shape
    power = np.abs(np.fft.fft2(d.reshape(n * c, h, w))) ** 2
    total = power.sum(axis=(1, 2))
    power = power[total > 0] / total[total > 0, None, None]
    if not len(power):
        return np.zeros(0, dtype=int), np.zeros(0)
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    ring = np.rint(np.hypot(fy[:, None], fx[None, :])).astype(int)
    fraction = np.bincount(ring.ravel(), weights=power.mean(axis=0).ravel())
    return np.arange(len(fraction)), fraction


def low_frequency_share(radii, fraction, cutoff: int = LOW_FREQUENCY) -> float | None:
    """The fraction of the perturbation's energy at most `cutoff` cycles per image from the mean."""
    return float(fraction[radii <= cutoff].sum()) if len(fraction) else None


def spectra(data: ReportData, names: dict[str, str]) -> list[dict]:
    """One spectrum per (model, norm, eps) of the adversarial examples the report picked (one attack per model
    and norm): model, norm, eps, attack, grad_mode, n (images with a perturbation), radii, fraction, low."""
    import numpy as np
    by_run: dict[str, list[dict]] = {}
    for a in data.adversarial:
        by_run.setdefault(a["run_id"], []).append(a)
    shown, _, _ = _figure_models(data, names, by_run)
    out = []
    for a in data.adversarial:
        if a["run_id"] not in shown:
            continue
        entry = _load_adv_entry(a)
        if entry is None:
            continue
        x = np.asarray(entry["t"]["x"], dtype=np.float64)
        for eps, key, _ in entry["eps"]:
            delta = np.asarray(entry["t"][key], dtype=np.float64) - x
            r, f = radial_spectrum(delta)
            if not len(f):
                continue
            touched = int((np.abs(delta).reshape(len(delta), -1).max(axis=1) > 0).sum())
            out.append({"run_id": a["run_id"], "model": names[a["run_id"]], "norm": a["norm"], "eps": eps,
                        "attack": a["attack"], "grad_mode": a.get("grad_mode"), "n": touched, "radii": r,
                        "fraction": f, "low": low_frequency_share(r, f)})
    return out


def spectrum_figure(data: ReportData, names: dict[str, str]):
    """Per norm, one panel: each model's perturbation spectrum, cumulated from the lowest frequency (a curve
    that rises early: smooth, object-like perturbations), at the largest ε every drawn model was attacked with
    (else each at its own largest, said in the legend). None when no attack kept adversarial examples."""
    import numpy as np
    found = spectra(data, names)
    if not found:
        return None
    plt = _plt()
    norms = [n for n in ("l2", "linf") if any(s["norm"] == n for s in found)]
    fig, axes = plt.subplots(1, len(norms), figsize=(6.4 * len(norms), 4.2), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        mine = [s for s in found if s["norm"] == norm]
        models = list(dict.fromkeys(s["run_id"] for s in mine))
        common = set.intersection(*({s["eps"] for s in mine if s["run_id"] == m} for m in models))
        for m in models:
            eps = max(common) if common else max(s["eps"] for s in mine if s["run_id"] == m)
            s = next(s for s in mine if s["run_id"] == m and s["eps"] == eps)
            how = f"{ATTACK_NAMES.get(s['attack'], s['attack'])}" + (f", {_grad(s['grad_mode'])}"
                                                                      if s.get("grad_mode") else "")
            label = (f"{s['model']} ({how}, n={s['n']}" + ("" if common else f", ε={eps_label(eps, norm)}")
                     + f"; ≤{LOW_FREQUENCY} cycles: {100 * s['low']:.0f}%)")
            ax.plot(s["radii"], 100 * np.cumsum(s["fraction"]), "o-", ms=3, label=label)
        ax.set_ylim(0, 100)
        ax.axvline(LOW_FREQUENCY, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("spatial frequency r (cycles per image, radius of the 2-D DFT)")
        ax.set_ylabel("% of the perturbation's energy at frequencies ≤ r")
        what = f"ε={eps_label(max(common), norm)}" if common else "each model's largest ε"
        datasets = sorted({r.dataset or "?" for r in data.rows if r.run_id in models})
        ax.set_title(f"Perturbation spectrum, {NORM_NAMES.get(norm, norm)} {what} on {', '.join(datasets)}\n"
                     "mean over the kept adversarial images and channels", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
