"""Run one attack over a set of images for a list of eps values and return per-example outcomes.

No store, no CLI: tensors in, a plain dict out, progress through a callback.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from typing import Callable

import torch

from epcli.attacks._common import check_attack_dtype, check_eps, check_norm, eval_mode
from epcli.errors import UsageError

_FIXED = {"model", "x", "y", "eps", "norm", "targeted", "generator", "on_member"}


def resolve_params(attack: str, params: dict | None = None) -> dict:
    """The attack's keyword parameters with defaults filled in; unknown names are a UsageError."""
    from epcli.attacks import get_attack
    fn = get_attack(attack)
    sig = inspect.signature(fn)
    free = {k: p.default for k, p in sig.parameters.items() if k not in _FIXED and p.default is not p.empty}
    params = dict(params or {})
    bad = sorted(set(params) - set(free))
    if bad:
        raise UsageError(f"unknown parameter(s) {', '.join(bad)} for attack {attack!r}: "
                         f"accepted: {', '.join(sorted(free)) or 'none'}")
    free.update(params)
    return free


def check_grad_mode(grad_mode: str) -> str:
    g = str(grad_mode)
    if g in ("bptt", "implicit", "ep") or g.startswith("transfer"):
        return g
    if g.startswith("truncated:") and g.split(":", 1)[1].isdigit() and int(g.split(":", 1)[1]) > 0:
        return g
    raise UsageError(f"unknown gradient mode {grad_mode!r}: use bptt, truncated:K, implicit, ep or "
                     "transfer:<model>")


@contextlib.contextmanager
def _gradient_mode(model, mode: str):
    """Apply an EP gradient mode to the model for the duration; plain models accept only bptt."""
    if mode == "bptt" and not hasattr(model, "grad_mode"):
        yield
        return
    if not hasattr(model, "grad_mode"):
        raise UsageError(f"gradient mode {mode!r} needs an EP model; this model only supports 'bptt'")
    try:
        from epcli.ep import gradient_mode
    except ImportError:
        gradient_mode = None
    if gradient_mode is not None:
        with gradient_mode(model, mode):
            yield
        return
    old = model.grad_mode
    model.grad_mode = mode
    try:
        yield
    finally:
        model.grad_mode = old


class _Counter:
    """Counts examples passed through forward of the hooked modules."""

    def __init__(self, *models):
        self.n = 0
        self.on_forward = None  # optional heartbeat, called after every counted forward pass
        self.handles = [m.register_forward_hook(self._hook) for m in {id(m): m for m in models}.values()]

    def _hook(self, module, inputs, output):
        if inputs and torch.is_tensor(inputs[0]):
            self.n += int(inputs[0].shape[0])
            if self.on_forward is not None:
                self.on_forward()

    def close(self):
        for h in self.handles:
            h.remove()


def forward_budget(attack: str, params: dict) -> int:
    """About how many forward passes per attacked example `attack` makes with `params` (an upper bound for
    the attacks that stop early); only used to show progress and an ETA inside a long batch."""
    p = params
    steps, restarts = int(p.get("steps") or 1), max(1, int(p.get("restarts") or 1))
    targets = int(p.get("n_target_classes") or 9)
    nq = int(p.get("n_queries") or 5000)
    return max(1, {
        "fgsm": 2,
        "pgd": (steps + 1) * restarts,
        "cw": steps * int(p.get("binary_search_steps") or 1),
        # + 2: the clean pass that picks the images to attack, and one that counts the classes
        "apgd-ce": (steps + 1) * restarts + 2,
        "apgd-dlr": (steps + 1) * restarts + 2,
        "apgd-t": (steps + 2) * restarts * targets + 2,
        "fab-t": (steps + 2) * restarts * targets + 2,
        # the initial query, n_queries, and one pass per restart to read which images broke; one clean pass
        "square": (nq + 2) * restarts + 1,
        # ART's Square: per restart and per iteration, all images, then the robust ones and their candidates
        "art-square": 3 * (int(p.get("max_iter") or 1000) + 1) * restarts,
        "autoattack": (steps + 3) + 2 * ((steps + 2) * targets + 2) + nq + 4,
        # ART's: per APGD restart a gradient and a loss pass per iteration, f_0 and two predictions; DeepFool a
        # prediction and a gradient pass per iteration; Square three queries per iteration; 5 verdict passes
        "art-autoattack": 2 * restarts * (2 * int(p.get("apgd_iter") or 100) + 3)
        + 2 * int(p.get("deepfool_iter") or 100) + 2
        + max(1, int(p.get("square_restarts") or 5)) * (3 * int(p.get("square_iter") or 5000) + 3) + 5,
    }.get(attack, steps * restarts))


def budget_is_exact(attack: str, params: dict) -> bool:
    """Whether forward_budget is the attack's count (FGSM; PGD without restarts), not an upper bound: the
    others stop early on the images already broken, so an ETA from it is one too."""
    return attack == "fgsm" or (attack == "pgd" and max(1, int(params.get("restarts") or 1)) == 1)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model takes its images in: that of its first floating-point parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def ensemble_members(attack: str) -> tuple[str, ...]:
    """The members of an ensemble attack, in the order it runs them (() for a single attack)."""
    if attack == "autoattack":
        from epcli.attacks.autoattack import MEMBERS
        return MEMBERS
    if attack == "art-autoattack":
        from epcli.attacks.art_autoattack import MEMBERS
        return MEMBERS
    return ()


SELF_TARGETED = ("apgd-t", "fab-t", "autoattack")  # pick their own target classes
UNTARGETED = ("art-square", "art-autoattack")  # ART's, untargeted as the paper ran them
MIN_NORM = ("cw",)  # minimum-norm attacks: one run per example serves every eps


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, attack: str, norm: str,
             eps_list, batch_size: int | None = 256, device="cpu", seed: int = 0, params: dict | None = None,
             grad_mode: str = "bptt", surrogate: torch.nn.Module | None = None, labels: str = "true",
             targeted: bool = False, keep_adv: int = 16,
             on_batch: Callable[[int, int, dict], None] | None = None,
             on_step: Callable[[dict], None] | None = None) -> dict:
    """Attack `model` on (x, y) at each eps; see docs/attacks.md for the returned dict.

    x: uint8 (converted /255) or float images, clipped to [0, 1] (not clipped when params has clip=False).
    labels="true": only clean-correct examples are attacked, away from their true label (the others are not
    robust by definition; their x_adv is x). labels="predicted" (the paper's ART protocol, y=None): EVERY
    example is attacked, away from the model's clean prediction, and robust means predicting the true label
    on the adversarial image (a misclassified image that an attack pushes onto its true class counts).
    targeted=True: each example gets a seeded random target class other than its label (true or predicted);
    robustness is still scored against the true labels and `target_hit` says where the target was reached.
    grad_mode: how gradients are taken ("bptt", "truncated:K", "implicit", "ep" on EP models) or
    "transfer[:<name>]" with `surrogate`: the attack runs on the surrogate and is scored on `model`.
    batch_size=None starts at 256; on CUDA out-of-memory the batch is halved and retried.
    on_step(info), for progress inside a batch: called when the attack at one eps starts on a batch, every
    ~0.5 s while it runs and when it ends, with eps, lo, hi (the batch), fraction (forward passes so far over
    forward_budget(), an estimate capped below 1 until the end; exact: False when that budget is an upper bound,
    the attack stopping early on broken images) and, at the end, robust (count in the batch).
    """
    from epcli.attacks import get_attack
    fn = get_attack(attack)
    attack = str(attack).strip().lower().replace("_", "-")
    if targeted and attack in SELF_TARGETED:
        raise UsageError(f"{attack} picks its own target classes; --targeted applies to "
                         "fgsm, pgd, cw, apgd-ce, apgd-dlr and square")
    if targeted and attack in UNTARGETED:
        raise UsageError(f"{attack} is untargeted, as ART runs it; --targeted applies to "
                         "fgsm, pgd, cw, apgd-ce, apgd-dlr and square")
    norm = check_norm(norm)
    if attack == "cw" and norm != "l2":
        raise UsageError("cw is an L2 attack: use norm='l2'")
    eps_list = [check_eps(e) for e in (eps_list if isinstance(eps_list, (list, tuple)) else [eps_list])]
    if not eps_list:
        raise UsageError("eps_list is empty")
    if labels not in ("true", "predicted"):
        raise UsageError(f"labels must be 'true' or 'predicted', got {labels!r}")
    grad_mode = check_grad_mode(grad_mode)
    transfer = grad_mode.startswith("transfer")
    if transfer and surrogate is None:
        raise UsageError(f"gradient mode {grad_mode!r} needs a surrogate model")
    if surrogate is not None and not transfer:
        raise UsageError("a surrogate model is only used with grad_mode='transfer:<model>'")
    resolved = resolve_params(attack, params)
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise UsageError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")

    device = torch.device(device)
    n = len(y)
    y = y.long().cpu()
    model = model.to(device)
    attacker = surrogate.to(device) if transfer else model
    clip = bool(resolved.get("clip", True))
    dtype, attacker_dtype = _float_dtype(model), _float_dtype(attacker)
    check_attack_dtype(dtype, "model's parameters")
    check_attack_dtype(attacker_dtype, "surrogate's parameters")
    target_shift = None
    if targeted and n:
        from epcli.attacks._common import num_classes_of
        c = num_classes_of(model, x[:1].to(device, dtype))
        if c < 2:
            raise UsageError("a targeted attack needs at least 2 classes")
        # target = (label + shift) mod C with shift in 1..C-1: a seeded class other than the label
        target_shift = torch.randint(1, c, (n,), generator=torch.Generator().manual_seed(int(seed) + 15_485_863))
    bs = int(batch_size or 256)
    clean_pred = torch.empty(n, dtype=torch.long)
    attack_labels = torch.empty(n, dtype=torch.long)
    pred_adv = {e: torch.empty(n, dtype=torch.long) for e in eps_list}
    # relaxation models (EP-CNN) leave each image's relative residual in model.last_residual: how far from
    # equilibrium the adversarial predictions were (NaN where the model does not say)
    adv_residual = {e: torch.full((n,), float("nan")) for e in eps_list}
    x_keep = {e: [] for e in eps_list}
    # AutoAttack: per example, robust after each member in turn (the official code's "robust accuracy after X");
    # with true labels only: with predicted ones an image can end robust by being pushed onto its true label;
    # not in transfer: the members' verdicts are then the surrogate's, not the scored model's
    MEMBERS = ensemble_members(attack)
    member_robust = ({e: torch.zeros((n, len(MEMBERS)), dtype=torch.bool) for e in eps_list}
                     if MEMBERS and labels == "true" and not transfer else {})
    gens = {e: torch.Generator().manual_seed(int(seed) * 1_000_003 + i) for i, e in enumerate(eps_list)}
    counter = _Counter(model, attacker)

    def scored(pred, clean, truth):
        """Robust: the true label on the adversarial image (true-label protocol: and on the clean one)."""
        return (pred == truth) if labels == "predicted" else (pred == truth) & (clean == truth)

    attack_passes = 0
    budget, exact = forward_budget(attack, resolved), budget_is_exact(attack, resolved)
    step = {"eps": None, "lo": 0, "hi": 0, "base": 0, "todo": 0, "last": 0.0}

    def beat(final_robust: int | None = None):  # progress inside one attack call, throttled
        if on_step is None or step["eps"] is None:
            return
        t = time.perf_counter()
        if final_robust is None and t - step["last"] < 0.5:
            return
        step["last"] = t
        # at the end, the attack's own passes: not the pass that scores the adversarial images (the attack's
        # forward-pass count and the progress line then agree)
        passes = (step["attack_end"] if final_robust is not None and step.get("attack_end") is not None
                  else counter.n) - step["base"]
        frac = 1.0 if final_robust is not None else min(0.99, passes / max(1, step["todo"] * budget))
        info = {"eps": step["eps"], "lo": step["lo"], "hi": step["hi"], "fraction": frac, "forward_passes": passes,
                "exact": exact}
        if final_robust is not None:
            info["robust"] = final_robust
        on_step(info)

    if on_step is not None:
        counter.on_forward = beat
    t0 = time.perf_counter()

    def to_float(xb):
        # in the model's dtype (a float64 or half model takes its own); out of place: x[lo:hi] may be the caller's
        xb = xb.to(device)
        xb = xb.to(dtype).div(255) if xb.dtype == torch.uint8 else xb.to(dtype)
        return xb.clamp(0, 1) if clip else xb

    def run_batch(lo, hi):
        nonlocal attack_passes
        xb, yb = to_float(x[lo:hi]), y[lo:hi].to(device)
        with eval_mode(model), torch.no_grad():
            cp = model(xb).argmax(1)
        ref = cp if labels == "predicted" else yb  # the label the attack moves away from
        if target_shift is not None:
            ref = (ref + target_shift[lo:hi].to(device)) % c  # ... or, targeted, the label it moves to
        todo = torch.arange(len(yb), device=device) if labels == "predicted" else (cp == yb).nonzero().squeeze(1)
        mode = "bptt" if transfer else grad_mode
        found = None
        if attack in MIN_NORM and todo.numel():  # one run, read at every eps; its progress is the first eps's
            from epcli.attacks.cw import cw_min_norm
            step.update(eps=eps_list[0], lo=lo, hi=hi, base=counter.n, todo=int(todo.numel()), last=0.0,
                        attack_end=None)
            beat()
            before = counter.n
            with _gradient_mode(attacker, mode):
                found = cw_min_norm(attacker, xb[todo].to(attacker_dtype), ref[todo], targeted=bool(targeted),
                                    **resolved)
            attack_passes += counter.n - before
        outs = {}
        for e in eps_list:
            xa = xb.clone()
            if not (found is not None and e == eps_list[0]):  # (the min-norm run is already on that line)
                step.update(eps=e, lo=lo, hi=hi, base=counter.n, todo=int(todo.numel()), last=0.0, attack_end=None)
                beat()
            if todo.numel() and found is not None:
                from epcli.attacks.cw import cw_at_eps
                xa[todo] = cw_at_eps(xb[todo], found, e)
            elif todo.numel():
                before = counter.n
                extra = {}
                if member_robust:
                    rows = lo + todo.cpu()  # the clean-correct images (the others stay not robust)

                    def on_member(name, mask, e=e, rows=rows):
                        member_robust[e][rows, MEMBERS.index(name)] = mask.cpu()
                    extra["on_member"] = on_member
                with _gradient_mode(attacker, mode):
                    xa[todo] = fn(attacker, xb[todo].to(attacker_dtype), ref[todo], eps=e, norm=norm,
                                  targeted=bool(targeted), generator=gens[e], **resolved, **extra).detach().to(dtype)
                attack_passes += counter.n - before
            step["attack_end"] = counter.n
            with eval_mode(model), torch.no_grad():
                pa = model(xa).argmax(1)
            r = getattr(model, "last_residual", None)
            r = r.detach().float().cpu() if isinstance(r, torch.Tensor) and r.shape == pa.shape else None
            outs[e] = (pa.cpu(), xa, r)
            beat(final_robust=int(scored(pa, cp, yb).sum()))
            step["eps"] = None
        return cp.cpu(), ref.cpu(), outs

    try:
        lo = 0
        while lo < n:
            hi = min(lo + bs, n)
            try:
                cp, ref, outs = run_batch(lo, hi)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err) or bs == 1:
                    raise
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bs = max(1, bs // 2)
                continue
            clean_pred[lo:hi] = cp
            attack_labels[lo:hi] = ref
            for e, (pa, xa, r) in outs.items():
                pred_adv[e][lo:hi] = pa
                if r is not None:
                    adv_residual[e][lo:hi] = r
                room = keep_adv - sum(len(t) for t in x_keep[e])
                if room > 0:
                    x_keep[e].append(xa[:room].detach().cpu())
            lo = hi
            if on_batch is not None:
                on_batch(lo, n, {"batch_size": bs, "clean_correct": int((clean_pred[:lo] == y[:lo]).sum()),
                                 "robust": {e: int(scored(pred_adv[e][:lo], clean_pred[:lo], y[:lo]).sum())
                                            for e in eps_list}})
    finally:
        counter.close()
    seconds = time.perf_counter() - t0
    clean_correct = clean_pred == y
    robust = {e: scored(pred_adv[e], clean_pred, y) for e in eps_list}
    extra = {}
    if targeted:
        attacked = torch.ones_like(clean_correct) if labels == "predicted" else clean_correct
        extra = {"targets": attack_labels.clone(), "target_hit": {e: (pred_adv[e] == attack_labels) & attacked
                                                         for e in eps_list}}
    return {**extra,
        "attack": attack,
        "norm": norm,
        "eps_list": eps_list,
        "params": resolved,
        "grad_mode": grad_mode,
        "labels": labels,
        "attack_labels": attack_labels,
        "targeted": bool(targeted),
        "seed": int(seed),
        "n": n,
        "y": y,
        "clean_pred": clean_pred,
        "clean_correct": clean_correct,
        "clean_accuracy": float(clean_correct.float().mean()) if n else 0.0,
        "robust": robust,
        "robust_accuracy": {e: float(r.float().mean()) if n else 0.0 for e, r in robust.items()},
        "pred_adv": pred_adv,
        "adv_residual": adv_residual if any(not bool(v.isnan().all()) for v in adv_residual.values()) else {},
        "member_robust": member_robust,
        "x_adv": {e: (torch.cat(v) if v else torch.empty(0)) for e, v in x_keep.items()},
        "forward_passes": counter.n,
        "attack_forward_passes": attack_passes,
        "queries": attack_passes,
        "seconds": seconds,
        "batch_size": bs,
        "device": str(device),
    }
