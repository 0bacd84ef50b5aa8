"""APGD, APGD-T, FAB-T and the AutoAttack ensemble against the reference implementation, image by image.

The reference is fra31/auto-attack (the code AutoAttack users compare with): itself, installed from PyPI as
`pyautoattack` (0.2.0, the repository's files at commit a392200 but for imports; the last section), and
torchattacks' ports of it (APGD, APGDT, FAB), whose attack_single_run gives the single-run best points and
losses. Both are only the independent computation here; epcli's code is its own. Every comparison starts
the two from the same point: epcli's starts are drawn as the reference draws them, so a CPU generator seeded
s gives the reference's starts after torch.manual_seed(s). Models: the small trained CNN of
test_attack_protocol.py, and an untrained max-pool CNN (most input gradients zero; every ensemble member has
work), on real CIFAR-10 test images; CPU, one thread.

Measured on 2026-11-30 (these 32 images, float32 unless said):
- APGD-CE and APGD-DLR L-inf, 20 steps, same start: x_best within 6e-9, loss_best equal, same fooled set.
- APGD L2 (eps 0.5), 20 steps: same fooled set; x_best within 1.8e-4 (CE) and 4.4e-4 (DLR), loss_best within
  7e-7 (CE) and 1e-4 (DLR). That is float rounding amplified through ReLU kinks: in float64 (both codes)
  they agree to 1.5e-13.
- APGD-T L-inf and the public apgd / apgd_t with restarts against APGD / APGDT (seed 0): equal outputs
  (L2: within 1.2e-7). APGD-T L2 one image at a time (eps 1.0): 8 of 23 fooled in both, within 2.4e-7.
- FAB-T (first run, deterministic): same broken set; smallest perturbation norms within 8e-6 relative
  (epcli's bisection against the reference's sorting projections). With restarts, on a max-pool CNN: the
  same broken sets, images within 4.2e-7.
- Against the official code (seed 0): APGD-CE/DLR (20 steps, 3 restarts) and APGD-T (3 targets x 2
  restarts), L-inf 4/255 and L2 0.5: the same fooled images, images within 6e-8 and 5.3e-5; FAB-T: the
  same broken sets, norms within 8e-6 relative; AutoAttack standard (2 steps, 2 targets, 100 queries) on the
  max-pool CNN: the same robust mask after every member and the same final images (within 2.4e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SmallCNN, train_briefly

from epcli.attacks import apgd, apgd_t, autoattack, fab_t
from epcli.attacks._common import dlr_loss, dlr_targeted_loss
from epcli.attacks.apgd import apgd_run
from epcli.attacks.fab import project_hyperplane

ta = pytest.importorskip("torchattacks")

EPS = {"linf": 8 / 255, "l2": 0.5}
TA_NORM = {"linf": "Linf", "l2": "L2"}


@pytest.fixture(scope="module")
def data(mini):
    torch.manual_seed(0)
    model = train_briefly(SmallCNN(), mini)
    return model, mini.test_x[:32].float() / 255, mini.test_y[:32]


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def reference_start(x, eps, norm):
    """The reference's APGD start from the global stream: on the surface of the eps-ball, clipped."""
    t = 2 * torch.rand(x.shape, dtype=x.dtype) - 1 if norm == "linf" else torch.randn(x.shape, dtype=x.dtype)
    n = t.flatten(1).abs().amax(1) if norm == "linf" else t.flatten(1).norm(dim=1) + 1e-12
    return (x + eps * t / n.view(-1, 1, 1, 1)).clamp(0, 1)


def _single_runs(model, x, y, loss, norm, steps):
    """The reference port's and epcli's single APGD run from the same start: (ref best, ref fooled, ref loss),
    (epcli info, epcli fooled)."""
    eps = EPS[norm]
    atk = ta.APGD(model, norm=TA_NORM[norm], eps=eps, steps=steps, loss=loss, seed=0)
    torch.manual_seed(0)
    ref_best, ref_robust, ref_loss, _ = atk.attack_single_run(x, y)
    torch.manual_seed(0)
    x0 = reference_start(x, eps, norm)
    objective = (lambda z: F.cross_entropy(z, y, reduction="none")) if loss == "ce" else (lambda z: dlr_loss(z, y))
    info = {}
    _, fooled = apgd_run(model, x, objective, lambda z: z.argmax(1) != y, eps=eps, norm=norm, steps=steps,
                         generator=None, x_init=x0, info=info)
    return (ref_best, ref_robust == 0, ref_loss), (info, fooled)


# Tolerances from the measurements in the module docstring, with headroom: L-inf is exact up to rounding
# (sign() removes ulp noise), L2 carries float32 noise through 20 steps.
TOL32 = {("ce", "linf"): (1e-6, 1e-6), ("dlr", "linf"): (1e-6, 1e-6),
         ("ce", "l2"): (1e-3, 1e-5), ("dlr", "l2"): (1e-3, 5e-4)}


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_single_run_equals_the_reference_port(data, loss, norm):
    """Same start, 20 steps: the same fooled images, the same best-loss points and losses (float32)."""
    model, x, y = data
    (ref_best, ref_fooled, ref_loss), (info, fooled) = _single_runs(model, x, y, loss, norm, 20)
    assert torch.equal(fooled, ref_fooled) and 0 < int(fooled.sum()) < len(y)
    atol_x, atol_loss = TOL32[(loss, norm)]
    torch.testing.assert_close(info["x_best"], ref_best, atol=atol_x, rtol=0)
    torch.testing.assert_close(info["loss_best"], ref_loss, atol=atol_loss, rtol=0)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_l2_equals_the_reference_port_in_float64(data, loss):
    """L2 in float64 (model, images and every tensor both codes create): the float32 differences above are
    rounding, not algorithm. Measured: 1.2e-13 (CE) and 1.5e-13 (DLR) on x_best, 6e-13 and 4e-11 on the loss,
    every image, including one whose DLR gradient is rounding noise (true class ranked third at the start:
    DLR = 1 there), where only the same 1e-12 in the step direction's normaliser gives the same step."""
    model = SmallCNN()
    model.load_state_dict(data[0].state_dict())
    model = model.double().eval()
    x, y = data[1].double(), data[2]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the reference's torch.zeros/ones/rand in float64 too
    try:
        (ref_best, ref_fooled, ref_loss), (info, fooled) = _single_runs(model, x, y, loss, "l2", 20)
    finally:
        torch.set_default_dtype(old)
    assert torch.equal(fooled, ref_fooled)
    torch.testing.assert_close(info["x_best"], ref_best, atol=1e-9, rtol=0)
    torch.testing.assert_close(info["loss_best"], ref_loss, atol=1e-9, rtol=0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_with_restarts_equals_the_reference_port_for_the_same_seed(data, loss, norm):
    """The public function: seed 0, 3 restarts on the images not yet fooled, only clean-correct images
    attacked; returns the latest successful iterate (the reference's choice) for the fooled images."""
    model, x, y = data
    eps = EPS[norm] / 2
    ref = ta.APGD(model, norm=TA_NORM[norm], eps=eps, steps=10, loss=loss, seed=0, n_restarts=3)(x, y)
    out = apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=10, restarts=3,
               generator=torch.Generator().manual_seed(0))
    clean_ok = predict(model, x) == y
    fooled, ref_fooled = (predict(model, out) != y) & clean_ok, (predict(model, ref) != y) & clean_ok
    assert torch.equal(fooled, ref_fooled) and fooled.any()
    torch.testing.assert_close(out[fooled], ref[fooled].detach(), atol=1e-6 if norm == "linf" else 1e-4, rtol=0)
    assert torch.equal(out[~clean_ok], x[~clean_ok])  # misclassified images are not attacked


def fra31_targeted_dlr(logits, y, target):
    """The targeted DLR as fra31's code writes it: denominator z_pi1 - 0.5 * (z_pi3 + z_pi4). torchattacks'
    port writes z_pi1 - 0.5 * z_pi3 - 0.5 * z_pi4, one ulp away, which flips APGD's step-size tests on ties."""
    srt = logits.sort(dim=1)[0]
    u = torch.arange(len(y))
    return -(logits[u, y] - logits[u, target]) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


def test_apgd_t_equals_the_reference_port_for_the_same_seed(data):
    """APGD-T, L-inf: targets are the clean logits' runner-ups in order (the reference's sort, [-2], [-3],
    ...), each run on the images still robust, one start per target and restart drawn in the reference's
    order. The port's targeted DLR is given fra31's operation order (above). 3 targets x 2 restarts, 10 steps.
    (L2: the next test.)"""
    model, x, y = data
    eps = 4 / 255
    atk = ta.APGDT(model, norm="Linf", eps=eps, steps=10, seed=0, n_restarts=2, n_classes=10)
    atk.n_target_classes = 3
    atk.dlr_loss_targeted = fra31_targeted_dlr
    ref = atk(x, y).detach()
    out = apgd_t(model, x, y, eps=eps, norm="linf", steps=10, restarts=2, n_target_classes=3,
                 generator=torch.Generator().manual_seed(0))
    clean_ok = predict(model, x) == y
    fooled, ref_fooled = (predict(model, out) != y) & clean_ok, (predict(model, ref) != y) & clean_ok
    assert torch.equal(fooled, ref_fooled) and fooled.sum() >= 3
    torch.testing.assert_close(out[fooled], ref[fooled], atol=1e-6, rtol=0)
    # one target's run from the same start: best points and targeted-DLR losses
    ok = clean_ok.nonzero().squeeze(1)
    xs, ys = x[ok], y[ok]
    atk.target_class = 2
    torch.manual_seed(0)
    ref_best, ref_robust, ref_loss, _ = atk.attack_single_run(xs, ys)
    torch.manual_seed(0)
    x0 = reference_start(xs, eps, "linf")
    tgt = model(xs).argsort(1, descending=True)[:, 1]
    info = {}
    _, f = apgd_run(model, xs, lambda z: dlr_targeted_loss(z, ys, tgt), lambda z: z.argmax(1) != ys, eps=eps,
                    norm="linf", steps=10, generator=None, x_init=x0, info=info)
    assert torch.equal(f, ref_robust == 0)
    torch.testing.assert_close(info["x_best"], ref_best, atol=1e-6, rtol=0)
    torch.testing.assert_close(info["loss_best"], ref_loss, atol=1e-6, rtol=0)


def test_apgd_t_l2_equals_the_reference_port_one_image_at_a_time(data):
    """APGD-T, L2 (eps 1.0, 3 targets, 10 steps), each clean-correct image alone with seed 0: the port steps
    every image of a batch with the first image's step size, which is the reference's rule only for a batch
    of one. Same fooled images, adversarial images within 1e-4 (measured 2.4e-7; L2 carries float32 noise)."""
    model, x, y = data
    fooled = []
    for i in (predict(model, x) == y).nonzero().flatten().tolist():
        xi, yi = x[i:i + 1], y[i:i + 1]
        atk = ta.APGDT(model, norm="L2", eps=1.0, steps=10, seed=0, n_restarts=1, n_classes=10)
        atk.n_target_classes = 3
        atk.dlr_loss_targeted = fra31_targeted_dlr
        ref = atk(xi, yi).detach()
        out = apgd_t(model, xi, yi, eps=1.0, norm="l2", steps=10, n_target_classes=3,
                     generator=torch.Generator().manual_seed(0))
        f = bool(predict(model, out) != yi)
        assert f == bool(predict(model, ref) != yi), i
        if f:
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        fooled.append(f)
    assert 3 <= sum(fooled) < len(fooled)


def _norms(adv, x, norm):
    d = (adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_equals_the_reference_port(data, norm):
    """FAB-T's first run per target starts at the image: deterministic. 3 targets, 10 steps. With an eps no
    image needs, every clean-correct image is broken and the smallest perturbations found agree to 1e-4
    relative (measured 8e-6: bisection against sorting); at eps 8/255 (L-inf) / 0.5 (L2) the broken sets agree."""
    model, x, y = data
    clean_ok = predict(model, x) == y
    big = {"linf": 1.0, "l2": 50.0}[norm]
    for eps in (big, EPS[norm]):
        atk = ta.FAB(model, norm=TA_NORM[norm], eps=eps, steps=10, n_restarts=1, multi_targeted=True,
                     n_classes=10, seed=0)
        atk.n_target_classes = 3
        ref = atk(x, y).detach()
        out = fab_t(model, x, y, eps=eps, norm=norm, steps=10, n_target_classes=3)
        broken, ref_broken = (predict(model, out) != y) & clean_ok, (predict(model, ref) != y) & clean_ok
        assert torch.equal(broken, ref_broken)
        if eps == big:
            assert torch.equal(broken, clean_ok)
            torch.testing.assert_close(_norms(out, x, norm)[broken], _norms(ref, x, norm)[broken], atol=0,
                                       rtol=1e-4)
        else:
            assert 0 < int(broken.sum()) < int(clean_ok.sum())


def test_fab_t_with_restarts_equals_the_reference_port_on_a_max_pool_model(data):
    """An untrained max-pool CNN, whose input gradients are zero on most pixels, labels = its predictions;
    2 steps, 2 targets, L-inf 2/255: here the first runs leave images that the restarts (fresh runs from the
    surface of the eps/2-ball, drawn as the reference draws them) break, so both paths are compared."""
    x = data[1]
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)).eval()
    y = predict(model, x)
    broken = {}
    for restarts in (1, 3):
        atk = ta.FAB(model, norm="Linf", eps=2 / 255, steps=2, n_restarts=restarts, multi_targeted=True,
                     n_classes=10, seed=0)
        atk.n_target_classes = 2
        ref = atk(x, y).detach()
        out = fab_t(model, x, y, eps=2 / 255, norm="linf", steps=2, n_target_classes=2, restarts=restarts,
                    generator=torch.Generator().manual_seed(0))
        b = predict(model, out) != y
        assert torch.equal(b, predict(model, ref) != y)
        torch.testing.assert_close(out[b], ref[b], atol=1e-5, rtol=0)  # measured 4.2e-7
        broken[restarts] = int(b.sum())
    assert broken[3] > broken[1]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_constrained_hyperplane_projection_equals_the_reference(norm):
    """epcli's projections (exact, from the sorted kinks of a piecewise-linear function) against the
    reference's sorting projections, on random points, planes and offsets that the box meets (the
    exact projection) and that it does not (the box point closest to the plane). A fifth of the weights are
    zero, as for pixels a max-pool or a dead ReLU ignores: such a pixel stays. In float64, so that the
    comparison is of the solutions and not of float32 rounding."""
    from torchattacks.attacks.fab import projection_l2, projection_linf
    g = torch.Generator().manual_seed(0)
    p, w = torch.rand(400, 50, generator=g), torch.randn(400, 50, generator=g)
    w[torch.rand(400, 50, generator=g) < 0.2] = 0
    b = torch.randn(400, generator=g) * torch.tensor([1.0, 20.0, 100.0]).repeat_interleave(134)[:400]
    p, w, b = p.double(), w.double(), b.double()
    meets = ((w.clamp(min=0).sum(1) + b) >= 0) & ((w.clamp(max=0).sum(1) + b) <= 0)
    assert 50 < int(meets.sum()) < 350  # both kinds
    mine = project_hyperplane(p, w, b, norm) - p
    ref = (projection_linf if norm == "linf" else projection_l2)(p, w, -b)  # reference plane: <w, z> = b'
    # measured: L-inf 2.8e-16, L2 8.5e-15 (by bisection, as before 2026-11-30: 9.3e-10 and 1.4e-9)
    torch.testing.assert_close(mine, ref, atol=1e-12, rtol=0)


def test_autoattack_robust_masks_equal_the_reference_members_composed(data):
    """The ensemble against the reference members composed in AutoAttack's order on the points still robust,
    each member seeded 0 (as fra31's AutoAttack(seed=0) does). Matched image by image: the robust mask after
    APGD-CE, APGD-T and FAB-T (their starts are the same draws) and the adversarial images each of them finds.
    Not matched: Square's random stream (epcli's own Square draws differently); only that it never makes a point
    robust again is checked. On this model FAB-T breaks no image that APGD-CE/APGD-T left robust: its own
    agreement is tested above."""
    model, x, y = data
    eps, steps, n_t = 8 / 255, 5, 3
    masks = {}
    out = autoattack(model, x, y, eps=eps, norm="linf", steps=steps, n_target_classes=n_t, n_queries=20,
                     generator=torch.Generator().manual_seed(0), on_member=lambda name, m: masks.update({name: m}))
    apgd_ce_ref = ta.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0, n_restarts=1)
    apgd_t_ref = ta.APGDT(model, norm="Linf", eps=eps, steps=steps, seed=0, n_restarts=1, n_classes=10)
    apgd_t_ref.n_target_classes = n_t
    apgd_t_ref.dlr_loss_targeted = fra31_targeted_dlr
    fab_ref = ta.FAB(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10,
                     seed=0)
    fab_ref.n_target_classes = n_t
    robust = predict(model, x) == y
    for name, ref in (("apgd-ce", apgd_ce_ref), ("apgd-t", apgd_t_ref), ("fab-t", fab_ref)):
        idx = robust.nonzero().squeeze(1)
        adv = ref(x[idx], y[idx]).detach()
        broken = predict(model, adv) != y[idx]
        robust[idx[broken]] = False
        assert torch.equal(masks[name], robust), name
        assert broken.any() or name == "fab-t", name  # on this model FAB-T finds none that APGD missed
        # and the same adversarial images (FAB: to its projections' precision)
        torch.testing.assert_close(out[idx[broken]], adv[broken], atol=1e-6 if name != "fab-t" else 1e-5, rtol=0)
    assert not (masks["square"] & ~masks["fab-t"]).any()


# --- against fra31/auto-attack itself (PyPI `pyautoattack`, its files at commit a392200 but for imports) ------

def _official(name):
    return pytest.importorskip(f"pyautoattack.{name}")


def max_pool_cnn(seed=2):
    """An untrained max-pool CNN: input gradients zero on most pixels, and every member of the ensemble has
    images to break at small eps (labels: its own predictions)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)).eval()


def _same_images(model, x, y, out, ref, norm):
    """Same fooled set among the clean-correct images, and the same adversarial images on it (L2: 5e-4, the
    float32 noise of 20 L2 steps; measured up to 5.3e-5 at eps 0.5 and 1.3e-4 at eps 1.0)."""
    ok = predict(model, x) == y
    fooled, ref_fooled = (predict(model, out) != y) & ok, (predict(model, ref) != y) & ok
    assert torch.equal(fooled, ref_fooled)
    torch.testing.assert_close(out[fooled], ref[fooled], atol=1e-6 if norm == "linf" else 5e-4, rtol=0)
    return fooled


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_and_apgd_t_equal_the_official_code_for_the_same_seed(data, norm):
    """APGDAttack (CE, DLR; 3 restarts) and APGDAttack_targeted (3 targets x 2 restarts), 20 steps, seed 0,
    against apgd / apgd_t with a CPU generator seeded 0, L-inf 4/255 and L2 0.5. Measured: the same fooled
    images (3, 4, 4 and 3, 3, 3), images within 6e-8 (L-inf) and 5.3e-5 (L2)."""
    pgd_base = _official("autopgd_base")
    model, x, y = data
    eps = {"linf": 4 / 255, "l2": 0.5}[norm]
    n = 0
    for loss in ("ce", "dlr"):
        ref = pgd_base.APGDAttack(model, n_iter=20, norm=TA_NORM[norm], n_restarts=3, eps=eps, seed=0, loss=loss,
                                  device="cpu").perturb(x, y)
        out = apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=20, restarts=3,
                   generator=torch.Generator().manual_seed(0))
        n += int(_same_images(model, x, y, out, ref, norm).sum())
    ref = pgd_base.APGDAttack_targeted(model, n_iter=20, norm=TA_NORM[norm], n_restarts=2, eps=eps, seed=0,
                                       n_target_classes=3, device="cpu").perturb(x, y)
    out = apgd_t(model, x, y, eps=eps, norm=norm, steps=20, restarts=2, n_target_classes=3,
                 generator=torch.Generator().manual_seed(0))
    n += int(_same_images(model, x, y, out, ref, norm).sum())
    assert n >= 9


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_equals_the_official_code(data, norm):
    """FABAttack_PT(targeted=True), 3 targets, 10 steps: on the trained CNN (first runs only, as AutoAttack)
    and on the max-pool CNN with 1 and 3 restarts (seed 0). Measured: the same broken sets, images within
    4.2e-7 (max-pool) and norms within 8e-6 relative."""
    fab_pt = _official("fab_pt")
    model, x, y = data
    eps = {"linf": 1.0, "l2": 50.0}[norm]  # an eps no image needs: compares the smallest norms found
    ref = fab_pt.FABAttack_PT(model, norm=TA_NORM[norm], n_restarts=1, n_iter=10, eps=eps, seed=0, targeted=True,
                              device="cpu", n_target_classes=3).perturb(x, y)
    out = fab_t(model, x, y, eps=eps, norm=norm, steps=10, n_target_classes=3)
    ok = predict(model, x) == y
    broken = (predict(model, out) != y) & ok
    assert torch.equal(broken, (predict(model, ref) != y) & ok) and torch.equal(broken, ok)
    torch.testing.assert_close(_norms(out, x, norm)[broken], _norms(ref, x, norm)[broken], atol=0, rtol=1e-4)
    pool = max_pool_cnn()
    y = predict(pool, x)
    eps = {"linf": 2 / 255, "l2": 0.05}[norm]
    for restarts in (1, 3):
        ref = fab_pt.FABAttack_PT(pool, norm=TA_NORM[norm], n_restarts=restarts, n_iter=2, eps=eps, seed=0,
                                  targeted=True, device="cpu", n_target_classes=2).perturb(x, y)
        out = fab_t(pool, x, y, eps=eps, norm=norm, steps=2, n_target_classes=2, restarts=restarts,
                    generator=torch.Generator().manual_seed(0))
        assert _same_images(pool, x, y, out, ref, norm).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_autoattack_equals_the_official_ensemble_for_the_same_seed(data, norm):
    """fra31's AutoAttack(version="standard", seed=0) with its budgets cut for the test (2 steps, 2 targets,
    100 Square queries), on the max-pool CNN, against autoattack(generator seeded 0): the robust mask after
    each prefix of the member list (the official run with attacks_to_run cut to that prefix) and the final
    adversarial images. Every member is matched, Square included (epcli's Square is the official algorithm
    draw for draw); here APGD-CE, APGD-T and FAB-T each break images and Square breaks none. Measured: final
    images within 2.4e-7."""
    official = _official("autoattack")
    import logging
    x = data[1]
    model = max_pool_cnn()
    y = predict(model, x)
    eps, steps = {"linf": 0.5 / 255, "l2": 0.05}[norm], {"linf": 2, "l2": 1}[norm]
    masks = {}
    out = autoattack(model, x, y, eps=eps, norm=norm, steps=steps, n_target_classes=2, n_queries=100,
                     generator=torch.Generator().manual_seed(0), on_member=lambda name, m: masks.update({name: m}))
    members = ["apgd-ce", "apgd-t", "fab-t", "square"]
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    for k in range(1, 5):
        aa = official.AutoAttack(model, norm=TA_NORM[norm], eps=eps, seed=0, version="standard", device="cpu")
        aa.verbose = False
        for a in (aa.apgd, aa.apgd_targeted):  # the checkpoint schedule is set from n_iter in __init__
            a.n_iter, a.n_iter_2, a.n_iter_min, a.size_decr = steps, max(int(0.22 * steps), 1), 1, 1
        aa.fab.n_iter, aa.apgd_targeted.n_target_classes, aa.fab.n_target_classes = steps, 2, 2
        aa.square.n_queries = 100
        aa.attacks_to_run = members[:k]
        ref = aa.run_standard_evaluation(x, y, batch_size=64)
        ref = ref[0] if isinstance(ref, tuple) else ref
        assert torch.equal(masks[members[k - 1]], predict(model, ref) == y), members[k - 1]
    _same_images(model, x, y, out, ref, norm)
    counts = [int(predict(model, x).eq(y).sum())] + [int(masks[m].sum()) for m in members]
    assert counts[0] > counts[1] > counts[2] > counts[3] == counts[4], counts
