"""`epcli demo`: the study in miniature on the embedded real images."""

from __future__ import annotations

from typing import Callable

from epcli.pipelines.attack import attack
from epcli.pipelines.common import (
    Progress,
    no_progress,
)
from epcli.pipelines.corrupt import corrupt
from epcli.pipelines.train import train
from epcli.store import Store

DEMO = {
    "models": [("ep-cnn-small", "demo-ep", "EP-CNN (small)"), ("cnn-small", "demo-cnn", "CNN (small)")],
    "attacks": [("pgd", "linf", "1/255,2/255,4/255,8/255"), ("pgd", "l2", "0.125,0.25,0.5,1.0")],
    "corruptions": ["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"],
    "n_attack": 200,
    "n_corrupt": 500,
    "dataset": None,  # the embedded real CIFAR-10 subset
    "overrides": {},  # recipe overrides for every demo model (tests shrink the epochs)
}


def demo(*, store: Store, device: str | None = None, progress: Progress = no_progress,
         note: Callable[[str], None] = lambda m: None) -> dict:
    """The study in miniature on the embedded real images: train, attack, corrupt, report."""
    from epcli import report as R
    runs = []
    for model, recipe, label in DEMO["models"]:
        note(f"[bold]train[/] {label} ({model}, recipe {recipe}) on the embedded CIFAR-10 images")
        res = train(model=model, recipe=recipe, store=store, device=device, label=label, progress=progress,
                    dataset=DEMO["dataset"], overrides=dict(DEMO["overrides"]), argv=["epcli", "demo"])
        runs.append(res["run_id"])
        note(f"  test accuracy {res['test_acc']:.3f}  (run {res['run_id']})")
    for rid in runs:
        for name, norm, eps in DEMO["attacks"]:
            note(f"[bold]attack[/] {rid} with {name} {norm} eps {eps} on {DEMO['n_attack']} test images")
            attack(model=rid, attack=name, norm=norm, eps=eps, n=DEMO["n_attack"], store=store, device=device,
                   progress=progress, argv=["epcli", "demo"])
        note(f"[bold]corrupt[/] {rid}: {', '.join(DEMO['corruptions'])} x 5 severities")
        corrupt(model=rid, names=DEMO["corruptions"], n=DEMO["n_corrupt"], store=store, device=device,
                progress=progress, argv=["epcli", "demo"])
    data = R.collect(store, runs=runs)
    return {"runs": runs, "store": str(store.root), "data": data}


