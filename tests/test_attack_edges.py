"""Edge cases of the attacks that the reference-agreement tests (small CPU float32 CIFAR batches) do not reach:
dtypes (float64; float16 and uint8 refused), class counts, image geometry, degenerate budgets and batches, determinism.

Fast: untrained or seeded tiny models (an untrained CNN's logits are close, so small eps already breaks some
images), a few steps or queries each.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from epcli.attacks import ATTACKS, apgd_t, autoattack, evaluate, fab_t, get_attack, square
from epcli.errors import UsageError

FAST = {"fgsm": {}, "pgd": {"steps": 3}, "cw": {"steps": 5, "binary_search_steps": 2},
        "apgd-ce": {"steps": 5}, "apgd-dlr": {"steps": 5}, "apgd-t": {"steps": 5, "n_target_classes": 2},
        "fab-t": {"steps": 5, "n_target_classes": 2}, "square": {"n_queries": 20},
        "autoattack": {"steps": 3, "n_target_classes": 2, "n_queries": 10},
        "art-autoattack": {"apgd_iter": 3, "restarts": 1, "deepfool_iter": 3, "square_iter": 10, "square_restarts": 1}}
FAST["art-square"] = {"max_iter": 5}


class PoolNet(nn.Module):
    """A strided conv, an adaptive pool (any image size) and a linear read-out."""

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 5, stride=4, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def net(channels: int = 3, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PoolNet(channels, classes).eval()


def images(n: int, c: int = 3, h: int = 32, w: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def predicted(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1).double()
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- dtypes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.005), ("l2", 0.2)])
def test_fab_t_in_float64_breaks_what_float32_breaks(norm, eps):
    """FAB-T on a float64 model and images (it failed: its best-norm record was float32) gives float64 images
    in the ball, and the same broken set and minimal norms as the float32 run of the same weights."""
    m32 = net()
    m64 = copy.deepcopy(m32).double()
    x = images(8)
    y = predicted(m32, x)
    kw = dict(eps=eps, norm=norm, steps=10, n_target_classes=3)
    a32 = fab_t(m32, x, y, **kw)
    a64 = fab_t(m64, x.double(), y, **kw)
    assert a64.dtype == torch.float64
    assert float(norms(a64 - x.double(), norm).max()) <= eps * (1 + 1e-9)
    b32, b64 = predicted(m32, a32) != y, predicted(m64, a64) != y
    assert 0 < int(b32.sum()) < len(y)  # mixed outcomes: the comparison means something
    assert torch.equal(b32, b64)
    # the minimal norms agree (measured: 1.7e-4 relative); L-inf images may differ where pixels are free to move
    torch.testing.assert_close(norms(a64 - x.double(), norm), norms(a32 - x, norm), rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_images_are_refused(name, dtype):
    """In 16 bits the attacks failed in three ways: a traceback (FAB-T L2, C&W, Square L-inf: float32 tensors
    met a half model), NaN images (APGD-DLR L2: its 1e-12 guards round to 0) and silently coarse steps. They
    are refused with one line; evaluate() refuses a 16-bit model before its first batch."""
    m = net().to(dtype)
    x = images(4).to(dtype)
    with pytest.raises(UsageError, match="float32 or float64"):
        get_attack(name)(m, x, torch.zeros(4, dtype=torch.long), eps=0.5, norm="l2", **FAST[name])
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UsageError, match="float32 or float64"):
        evaluate(m, (x.float() * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long), attack=name, norm="l2",
                 eps_list=[0.5], params=FAST[name])
    assert not calls


def test_evaluate_runs_a_float64_model_in_float64():
    """evaluate() cast every batch to float32, so a float64 model failed on its first forward pass. The images go
    in the model's dtype; the outcome equals the float32 model's (same weights, steps small enough to agree)."""
    m32 = net()
    m64 = copy.deepcopy(m32).double()
    x = (images(10) * 255).to(torch.uint8)
    y = predicted(m32, x.float() / 255)
    kw = dict(attack="apgd-ce", norm="linf", eps_list=[1 / 255, 4 / 255], batch_size=4, params={"steps": 5})
    r32, r64 = evaluate(m32, x, y, **kw), evaluate(m64, x, y, **kw)
    assert r64["x_adv"][1 / 255].dtype == torch.float64
    for e in kw["eps_list"]:
        assert torch.equal(r32["robust"][e], r64["robust"][e])
    assert 0 < int(r64["robust"][1 / 255].sum()) < 10


@pytest.mark.parametrize("name", list(ATTACKS))
def test_integer_images_are_refused_by_the_attack_functions(name):
    """uint8 images given straight to an attack were clamped to {0, 1} (a binary image, attacked as such); the
    functions take floats in [0, 1] and say so (evaluate() divides uint8 by 255)."""
    m = net()
    x = (images(2) * 255).to(torch.uint8)
    with pytest.raises(UsageError, match="255"):
        get_attack(name)(m, x, torch.zeros(2, dtype=torch.long), eps=0.5, norm="l2" if name == "cw" else "linf",
                         **FAST[name])


# --- class counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_autoattack_on_two_classes_is_refused_whatever_apgd_ce_breaks(eps):
    """APGD-T and FAB-T rank >= 3 logits. AutoAttack refused a 2-class model only when images survived APGD-CE
    (eps 1e-6 raised, eps 0.5 broke everything first and returned): refused before any member runs."""
    m = net(classes=2)
    x = images(6)
    with pytest.raises(UsageError, match="3 classes"):
        autoattack(m, x, predicted(m, x), eps=eps, **FAST["autoattack"])


def test_more_target_classes_than_classes_is_all_of_them():
    """n_target_classes above C - 1 is C - 1: the same images as asking for exactly C - 1 (nine on ten)."""
    m = net()
    x = images(6)
    y = predicted(m, x)
    kw = dict(eps=1 / 255, steps=4)
    assert torch.equal(apgd_t(m, x, y, n_target_classes=50, generator=gen(), **kw),
                       apgd_t(m, x, y, n_target_classes=9, generator=gen(), **kw))
    assert torch.equal(fab_t(m, x, y, n_target_classes=50, eps=1 / 255, steps=4),
                       fab_t(m, x, y, n_target_classes=9, eps=1 / 255, steps=4))


# --- budgets and batches ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square", "autoattack", "cw",
                                  "art-square"])
def test_nothing_to_attack_eps_zero_and_a_batch_of_one(name):
    """Every image already misclassified, or eps 0: the images come back unchanged. A batch of one: in the ball."""
    m = net()
    x = images(5)
    y = predicted(m, x)
    norm = "l2" if name == "cw" else "linf"
    p = FAST[name]
    assert torch.equal(get_attack(name)(m, x, (y + 1) % 10, eps=0.5, norm=norm, generator=gen(), **p), x)
    assert torch.equal(get_attack(name)(m, x, y, eps=0.0, norm=norm, generator=gen(), **p), x)
    one = get_attack(name)(m, x[:1], y[:1], eps=8 / 255, norm=norm, generator=gen(), **p)
    assert one.shape == x[:1].shape and float(norms(one - x[:1], norm).max()) <= 8 / 255 + 1e-6


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square", "art-square"])
def test_a_second_restart_only_adds_broken_images(name):
    """Restarts run on the images not yet broken and the first run draws what a one-restart run draws: the
    broken set with 2 restarts contains the one with 1."""
    m = net()
    x = images(10)
    y = predicted(m, x)
    p = {k: v for k, v in FAST[name].items()}
    one = get_attack(name)(m, x, y, eps=1 / 255, norm="linf", generator=gen(3), restarts=1, **p)
    two = get_attack(name)(m, x, y, eps=1 / 255, norm="linf", generator=gen(3), restarts=2, **p)
    b1, b2 = predicted(m, one) != y, predicted(m, two) != y
    assert bool((b2 | ~b1).all()) and int(b1.sum()) < len(y)


@pytest.mark.parametrize("name,bad", [
    ("square", {"n_queries": 0}), ("square", {"restarts": 0}), ("apgd-ce", {"steps": 0}),
    ("apgd-t", {"steps": 0}), ("apgd-t", {"restarts": 0}), ("apgd-t", {"n_target_classes": 0}),
    ("fab-t", {"steps": 0}), ("fab-t", {"restarts": 0}), ("fab-t", {"n_target_classes": 0}),
    ("autoattack", {"n_queries": 0}), ("autoattack", {"n_target_classes": 0}), ("autoattack", {"p_init": 0.0}),
])
def test_budgets_below_one_are_refused(name, bad):
    """A zero budget was run as something else: APGD-T with 0 steps returned its random starts, 0 target classes
    ran one, FAB-T with 0 steps or restarts returned the images; AutoAttack's Square budget was checked only
    when images survived the white-box members (here they all break first at eps 0.1)."""
    m = net()
    x = images(4)
    y = predicted(m, x)
    with pytest.raises(UsageError, match=">= 1|p_init"):
        get_attack(name)(m, x, y, eps=0.1, norm="linf", **bad)


# --- Square's geometry against the reference ------------------------------------------------------------------

def _official_run(model, x, y, *, norm, eps, seed, n_queries):
    """fra31's attack_single_run (one run, no restarts, no selection of images)."""
    SquareAttack = pytest.importorskip("pyautoattack.square").SquareAttack
    ref = SquareAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, n_queries=n_queries, seed=seed)
    ref.init_hyperparam(x)
    torch.manual_seed(seed)
    with torch.no_grad():
        return ref.attack_single_run(x, y)[1]


def _our_run(model, x, y, *, norm, eps, seed, n_queries):
    from epcli.attacks.square import _square_run
    with torch.no_grad():
        return _square_run(model, x, y, eps, norm, False, gen(seed), n_queries, 0.8, True)


@pytest.mark.parametrize("c,h,w", [(1, 28, 28), (3, 30, 40), (3, 40, 30), (1, 25, 40), (3, 64, 64)])
@pytest.mark.parametrize("norm,eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_square_on_other_image_shapes_draws_what_the_reference_draws(c, h, w, norm, eps):
    """One channel, non-square and larger images (the reference tests are 32x32, three channels): the same
    images as the official run, query by query (tile counts per row and column, window sides capped by the
    shorter edge)."""
    m = net(channels=c)
    x = images(5, c, h, w)
    y = predicted(m, x)
    kw = dict(norm=norm, eps=eps, seed=4, n_queries=40)
    ref, ours = _official_run(m, x, y, **kw), _our_run(m, x, y, **kw)
    assert float((ref - x).abs().max()) > 0
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("c,h", [(1, 12), (3, 12)])
def test_square_l2_init_below_25_pixels_is_the_reference_tiling_cropped(c, h):
    """Below 25 pixels the reference's last L2 tile runs past the border (it fails). epcli crops it: its start
    direction is the reference's on an image one pixel larger (same tile side, start and count, so the same
    draws), cropped to the image and renormalised."""
    m = net(channels=c)
    x = torch.full((3, c, h, h), 0.5)
    big = torch.full((3, c, h + 1, h + 1), 0.5)
    s = h // 5
    assert (h + 1) // 5 == s and (h + 1 - 5 * s) // 2 == (h - 5 * s) // 2 and (h + 1) // s == h // s
    assert (h - 5 * s) // 2 + (h // s) * s > h  # the last tile does cross the border
    eps = 0.1  # small: no clipping at 0 or 1
    ref = (_official_run(m, big, predicted(m, big), norm="l2", eps=eps, seed=2, n_queries=0) - 0.5)[:, :, :h, :h]
    ours = _our_run(m, x, predicted(m, x), norm="l2", eps=eps, seed=2, n_queries=0) - 0.5
    want = ref / norms(ref, "l2").view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(ours.double(), want.double(), atol=1e-6, rtol=0)


# --- determinism ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["square", "autoattack"])
def test_same_seed_same_result_and_members_through_evaluate(name):
    """Two evaluate() runs with the same seed and batch size: the same outcomes, images and AutoAttack
    per-member record; the record is monotone (a member only removes robust images) and ends at the result."""
    m = net()
    x = images(12)
    y = predicted(m, x)
    y[0] = (y[0] + 1) % 10  # one image the model gets wrong: never robust, never attacked
    kw = dict(attack=name, norm="linf", eps_list=[0.0, 1 / 255], batch_size=5, seed=3, params=FAST[name])
    a, b = evaluate(m, x, y, **kw), evaluate(m, x, y, **kw)
    for e in kw["eps_list"]:
        assert torch.equal(a["robust"][e], b["robust"][e]) and torch.equal(a["x_adv"][e], b["x_adv"][e])
    assert 0 < int(a["robust"][1 / 255].sum()) < 11
    if name == "autoattack":
        for e in kw["eps_list"]:
            mr = a["member_robust"][e]
            assert torch.equal(mr, b["member_robust"][e])
            assert bool((mr[:, 1:] <= mr[:, :-1]).all()) and torch.equal(mr[:, -1], a["robust"][e])
        assert torch.equal(a["member_robust"][0.0][:, 0], a["clean_correct"])


def test_evaluate_leaves_the_callers_images_alone():
    """evaluate() clipped each float batch in place, a view of the caller's tensor: images outside [0, 1] came
    back clipped."""
    m = net()
    x = images(4) * 2 - 0.5
    before = x.clone()
    evaluate(m, x, torch.zeros(4, dtype=torch.long), attack="fgsm", norm="linf", eps_list=[1 / 255])
    assert torch.equal(x, before)


# --- host syncs -----------------------------------------------------------------------------------------------

class _Syncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device on CUDA: a value read back (.item(), bool(),
    int()), nonzero, and indexing with a boolean mask (its size is data-dependent)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select"):
            self.n += 1
        elif name in ("index", "index_put", "index_put_") and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] or []) if i is not None):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _syncs(fn) -> int:
    with _Syncs() as s:
        fn()
    return s.n


@pytest.mark.parametrize("name, norm", [("apgd-ce", "linf"), ("apgd-t", "linf"), ("fab-t", "linf"),
                                        ("fab-t", "l2"), ("cw", "l2")])
def test_no_host_sync_per_step(name, norm):
    """APGD's, FAB's and C&W's steps update the per-image records with torch.where: the number of host syncs
    does not grow with the steps (boolean-mask indexing made 11 per APGD step, 4 per FAB and C&W step; FAB's
    L2 projection bracketed its bisection with a loop that read back whether it was done)."""
    m = net()
    x = images(6)
    y = predicted(m, x)
    p = {k: v for k, v in FAST[name].items() if k != "steps"}
    # C&W: its early stop reads the loss back every steps // 10 steps (off here); Adam reads its step count,
    # a CPU tensor on CUDA too (not a device sync), once per step and binary-search step
    p.update({"abort_early": False, "binary_search_steps": 2} if name == "cw" else {})
    adam = 2 if name == "cw" else 0

    def run(steps):
        return _syncs(lambda: get_attack(name)(m, x, y, eps=1 / 255, norm=norm, generator=gen(), steps=steps,
                                               **p))
    assert run(5) > 0 and run(25) == run(5) + 20 * adam


def test_a_batchs_draws_depend_on_the_batches_before_it():
    """What docs/attacks.md says: each eps's generator runs on from batch to batch, so the images of a batch
    get other draws when the batches before them change (why `--chunk` is part of the result)."""
    m = net()
    x = images(10)
    y = predicted(m, x)
    kw = dict(attack="square", norm="linf", eps_list=[8 / 255], batch_size=5, seed=3, params={"n_queries": 30})
    whole, tail = evaluate(m, x, y, **kw)["x_adv"][8 / 255][5:], evaluate(m, x[5:], y[5:], **kw)["x_adv"][8 / 255]
    changed = (whole - x[5:]).flatten(1).abs().amax(1) > 0
    assert bool(changed.any()) and not torch.equal(whole, tail)


# --- AutoAttack's per-member record under torchrun ------------------------------------------------------------

MEMBERS_SCRIPT = """
import json, sys
from epcli import api, distributed
from epcli.store import Store
store = Store(sys.argv[1]) if distributed.is_main() else None
r = api.attack(model=sys.argv[2], attack="autoattack", store=store, **json.loads(sys.argv[3]))
if distributed.is_main():
    sys.stdout.write(json.dumps({"run_id": r["run_id"], "members": r.get("members"), "shards": r.get("shards"),
                                 "robust_acc": r["robust_acc"]}))
"""


@pytest.mark.slow
def test_autoattack_members_survive_the_shard_merge(tmp_path, mini):
    """2 gloo processes, 4 chunks of 9 in batches of 5: AutoAttack's robust accuracy after each member (run
    summary and result) equals one process's, and is not trivial (members break images at 2 of 2 eps)."""
    from test_distributed import _memorised_folder, _torchrun

    from epcli import api
    from epcli.store import Store
    data = _memorised_folder(tmp_path / "data", mini)
    store = Store(tmp_path / "store")
    model = api.train(model="cnn-small", dataset=str(data), store=store, device="cpu", seed=1,
                      overrides={"epochs": 6, "batch_size": 20, "augment": None})["run_id"]
    kw = dict(n=30, chunk=9, batch_size=5, seed=5, device="cpu", strength=False, checks=False,
              eps="1/255,4/255", params={"steps": 2, "n_target_classes": 2, "n_queries": 20})
    script = tmp_path / "members.py"
    script.write_text(MEMBERS_SCRIPT)
    out = _torchrun([str(script), str(store.root), model, json.dumps(kw)])
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout)
    assert two["shards"]["world_size"] == 2 and two["shards"]["chunks"] == [2, 2]
    one = api.attack(model=model, attack="autoattack", store=store, **kw)
    assert "shards" not in one
    assert two["members"] == one["members"] and two["robust_acc"] == one["robust_acc"]
    summary = store.get_run(two["run_id"])["summary"]["members"]
    assert summary == one["members"] == store.get_run(one["run_id"])["summary"]["members"]
    for label, acc in one["members"].items():
        after = [acc[m] for m in ("apgd-ce", "apgd-t", "fab-t", "square")]
        assert after == sorted(after, reverse=True) and after[-1] == one["robust_acc"][label]
    assert any(acc["apgd-ce"] > acc["square"] for acc in one["members"].values())


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "fab-t", "square"])
def test_no_generator_draws_the_global_cpu_stream(name):
    """generator=None on the CPU: the draws of torch's global generator, i.e. those of a generator seeded
    the same (restarts included)."""
    m = net()
    x = images(8)
    y = predicted(m, x)
    p = {**FAST[name], "restarts": 2}
    eps = 8 / 255 if name == "square" else 1 / 255
    torch.manual_seed(7)
    a = get_attack(name)(m, x, y, eps=eps, norm="linf", generator=None, **p)
    b = get_attack(name)(m, x, y, eps=eps, norm="linf", generator=gen(7), **p)
    assert torch.equal(a, b) and bool((a != x).any())


class _Moved(nn.Module):
    """Class 0 on the images x0 themselves, class 1 as soon as an image moves by more than 1e-3 (L-inf)."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, z):
        d = (z - self.x0).flatten(1).abs().amax(1)
        return torch.stack([torch.full_like(d, 1e-3), d], 1)


def test_square_stops_when_the_start_fools_every_image():
    """All images fooled by the initialisation (any move is misclassified): no query is made; three batch
    passes in all (the clean one, the initialisation, the read-out)."""
    x = images(6)
    m = _Moved(x)
    y = predicted(m, x)
    assert bool((y == 0).all())
    seen = []
    h = m.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    try:
        out = square(m, x, y, eps=0.1, n_queries=100, generator=gen())
    finally:
        h.remove()
    assert bool((predicted(m, out) != y).all()) and seen == [6, 6, 6]


@pytest.mark.parametrize("grad_mode", ["bptt", "truncated:3", "implicit"])
def test_ep_cnn_with_per_image_stopping_through_evaluate(grad_mode):
    """ep-cnn-tiny relaxing each image to tol 1e-3 (so the batch shrinks as images stop), AutoAttack through
    evaluate() in batches of 5 under each gradient mode: reproducible, mixed outcomes, the per-member record
    monotone and ending at the result, every image's adversarial residual recorded."""
    from epcli.ep import EPCNN
    torch.manual_seed(1)
    ep = EPCNN.preset("ep-cnn-tiny", tol=1e-3)
    ep.T = 12
    ep.eval()
    x = torch.rand(8, 3, 32, 32, generator=gen(2))
    y = predicted(ep, x)
    eps = 0.5 / 255
    kw = dict(attack="autoattack", norm="linf", eps_list=[eps], batch_size=5, seed=0, grad_mode=grad_mode,
              params=FAST["autoattack"])
    a, b = evaluate(ep, x, y, **kw), evaluate(ep, x, y, **kw)
    assert torch.equal(a["robust"][eps], b["robust"][eps]) and torch.equal(a["x_adv"][eps], b["x_adv"][eps])
    mr = a["member_robust"][eps]
    assert torch.equal(mr, b["member_robust"][eps])
    assert 0 < int(a["robust"][eps].sum()) < 8
    assert bool((mr[:, 1:] <= mr[:, :-1]).all()) and torch.equal(mr[:, -1], a["robust"][eps])
    assert bool(torch.isfinite(a["adv_residual"][eps]).all())


def test_transfer_autoattack_keeps_no_member_record():
    """With a surrogate the members judge the surrogate: the record said 0 % robust after Square while the
    scored model kept every image (measured here). No record then, as with predicted labels."""
    m, s = net(seed=0), net(seed=5)
    x = images(12)
    y = predicted(m, x)
    r = evaluate(m, x, y, attack="autoattack", norm="linf", eps_list=[2 / 255], grad_mode="transfer:s",
                 surrogate=s, params=FAST["autoattack"])
    assert r["member_robust"] == {} and int(r["robust"][2 / 255].sum()) > 0


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "autoattack", "cw"])
@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("l2", 0.2)])
def test_one_step(name, norm, eps):
    """steps=1 (APGD's checkpoint list is then [1]): runs, stays in the ball, breaks images."""
    if name == "cw" and norm == "linf":
        pytest.skip("cw is L2 only")
    m = net()
    x = images(6)
    y = predicted(m, x)
    p = {**FAST[name], "steps": 1}
    out = get_attack(name)(m, x, y, eps=eps, norm=norm, generator=gen(), **p)
    assert float(norms(out - x, norm).max()) <= eps * (1 + 1e-6) and bool((predicted(m, out) != y).any())
