"""Benchmark the EP core: training s/epoch (T1, T2, β, batch) and inference images/s (T and converged T).

Prints first a "run" line (the exact command, the device, torch and thread count), then one JSON line per
measurement: device, date, command, impl, what, value (the median of --repeat runs), values, unit and settings.
GPU: `python bench/bench_ep.py` (the paper net, batch 128, T1=250, T2=30, β=0.5; add --dtype fp16 --compile).
CPU: `python bench/bench_ep.py --small` (ep-cnn-small, short phases, a few batches).
Random weights and random images: the step cost does not depend on them, but the *converged* T does
(a trained net needs more steps than a random one), so that line is a lower bound on steps.

--reference also times, in the same process on the same device, thread count, batch, weights, T1/T2/β, a
reference-style implementation (`RefStyleEP`, below: the approach of Laborieux et al. 2021, also used by
lanl/AdvEP — re-implemented here, not copied): the dynamics are `torch.autograd.grad` of Φ at every step, fp32,
NCHW, the input conv recomputed every step, a host-built `torch.tensor([1.]*B)` as grad_outputs every step,
free / +β / −β phases one after the other, the weight update by autograd of
[Φ^{−β}(s^−) − Φ^{+β}(s^+)]/(2β).
It first checks that both compute the same numbers: in float64 on a sub-batch (--check-images), sync
relaxation, the free / +β / −β states, logits and weight gradients (asserted, --atol); and in the timed precision
the free phase step by step (reported: in fp32 a 1-ulp difference between the two conv implementations
eventually flips a near-tie max-pool arg-max, after which the trajectories differ by ~1e-3..1e-2). Then it emits
impl="epcli" / impl="reference-style" lines and the ratio (reference time / epcli time; > 1: epcli is faster);
each repeat times epcli then the reference. Use --update sync: the reference is synchronous. On CUDA the
reference runs after epcli's accelerate() has set cudnn.benchmark (TF32 convs are PyTorch's default anyway).

--baseline explicit does the same with `ExplicitEP` (below): the plain explicit EP one writes by hand
(channels_last weights and states, max_unpool2d + conv_transpose2d top-down, input conv once per batch,
sequential ±β phases, the textbook update). Its lines carry impl="explicit", and its ratio lines baseline="explicit".
--profile replaces the timings with one profiled training step per implementation (ms per phase and per kind of
op; docs/ep.md "The paper-net CPU gap"). --only NAME times one implementation alone.
"""

import argparse
import datetime
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epcli.ep import EPCNN  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class RefStyleEP(nn.Module):
    """The reference approach for an EPCNN's conv stack with a CE read-out outside Φ, on a copy of its weights.

    Φ^β(x, s) = Σ_l <s_l, P_l(conv_l(s_{l-1}))> − β·CE(W_o vec(s_N) + b_o, y), per sample, s_0 = normalised x.
    One step: s ← σ(∂Φ^β/∂s) for all layers at once, ∂Φ/∂s by autograd. Plain fp32 NCHW modules.
    """

    def __init__(self, model: EPCNN):
        super().__init__()
        if model.fcs or model.out is None:
            raise ValueError("reference-style mode covers conv stacks with the CE read-out (no hidden fc layers)")
        self.convs = nn.ModuleList()
        for conv in model.convs:
            c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
            with torch.no_grad():
                c.weight.copy_(conv.weight.detach().float().contiguous())
                c.bias.copy_(conv.bias.detach().float())
            self.convs.append(c)
        self.out = nn.Linear(model.out.in_features, model.out.out_features)
        with torch.no_grad():
            self.out.weight.copy_(model.out.weight.detach().float())
            self.out.bias.copy_(model.out.bias.detach().float())
        self.pools = [{"m": nn.MaxPool2d(2), "a": nn.AvgPool2d(2), "i": nn.Identity()}[p] for p in model.pools]
        self.act, self.shapes = model.act, model.shapes
        self.register_buffer("mean", model.mean.detach().float().clone())
        self.register_buffer("std", model.std.detach().float().clone())
        self.to(model.mean.device)

    def params(self):
        return [p for m in [*self.convs, self.out] for p in m.parameters()]

    def phi(self, xn, s, beta, y):
        prev, total = xn, 0.0
        for conv, pool, sl in zip(self.convs, self.pools, s):  # the input conv is recomputed at every call
            total = total + (sl * pool(conv(prev))).sum(dim=(1, 2, 3))
            prev = sl
        if beta != 0.0:
            total = total - beta * F.cross_entropy(self.out(s[-1].flatten(1)), y, reduction="none")
        return total

    def relax(self, xn, y, s, T, beta):
        B = xn.shape[0]
        s = [t.detach().requires_grad_() for t in s]
        for _ in range(T):
            phi = self.phi(xn, s, beta, y)
            # grad_outputs built from a Python list at every step (a host->device copy, a sync on CUDA)
            ones = torch.tensor([1.0 for _ in range(B)], dtype=xn.dtype, device=xn.device)
            grads = torch.autograd.grad(phi, s, grad_outputs=ones)
            s = [self.act(g).detach().requires_grad_() for g in grads]
        return s

    def zeros(self, B, device):
        return [torch.zeros(B, *shape, device=device, dtype=self.mean.dtype) for shape in self.shapes]

    def logits(self, s):
        return self.out(s[-1].flatten(1))

    def train_step(self, x, y, T1, T2, beta):
        """Free (T1), +β (T2 from the free state), −β (T2 from the free state), then autograd of ΔΦ/(2β) into
        .grad. Returns the three end states and the free-phase logits (detached)."""
        xn = (x - self.mean) / self.std  # normalised once per batch, like a data transform
        s0 = self.relax(xn, y, self.zeros(x.shape[0], x.device), T1, 0.0)
        logits = self.logits(s0).detach()
        sp = self.relax(xn, y, s0, T2, beta)
        sm = self.relax(xn, y, s0, T2, -beta)
        dphi = (self.phi(xn, sm, -beta, y).mean() - self.phi(xn, sp, beta, y).mean()) / (2 * beta)
        dphi.backward()
        return s0, sp, sm, logits

    def predict(self, x, T):
        xn = (x - self.mean) / self.std
        s = self.relax(xn, None, self.zeros(x.shape[0], x.device), T, 0.0)
        return self.logits(s).detach()

    def free_stepper(self, x):
        """One free step at a time on images x: states -> states (for the step-by-step comparison)."""
        xn = (x - self.mean) / self.std
        return lambda s: [v.detach() for v in self.relax(xn, None, s, 1, 0.0)]


class ExplicitEP(nn.Module):
    """The plain explicit baseline (--baseline explicit): EP for an EPCNN's conv stack with the CE read-out, the
    way one writes it by hand, on a copy of its weights. Written for this bench; it shares no code with epcli.

    PyTorch's channels_last recipe: weights and states channels_last. One synchronous step, for every layer l:
    s_l <- σ(P(W_l ⋆ s_{l−1} + b_l) + W_{l+1}ᵀ ⋆ Unpool(s_{l+1})) with the max-pool indices of the bottom-up
    pass (F.max_pool2d(return_indices=True), top-down F.conv_transpose2d of F.max_unpool2d), and
    −β·(softmax − onehot)·W_o on the last layer. The input term P(W_1 ⋆ x̂ + b_1) is computed once per batch.
    Free phase (T1) from zero, then +β and −β (T2 each) from the free state, one after the other, batch B each.
    The weight update is the textbook formula −[∂Φ/∂θ(s⁺) − ∂Φ/∂θ(s⁻)]/(2β):
    ∂Φ/∂W_l = G(Unpool(s_l), s_{l−1}) per phase (torch.nn.grad.conv2d_weight, the documented weight-gradient
    call: aten's convolution_backward, as in epcli, which passes a channels_last stand-in weight) with the pool
    indices of that phase's end state; the read-out by hand: ½[(p⁺ − y)ᵀ s_N⁺ + (p⁻ − y)ᵀ s_N⁻], batch mean.
    """

    def __init__(self, model: EPCNN):
        super().__init__()
        if model.fcs or model.out is None:
            raise ValueError("the explicit baseline covers conv stacks with the CE read-out (no hidden fc layers)")
        dt = model.convs[0].weight.dtype
        self.convs = nn.ModuleList()
        for conv in model.convs:
            c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
            with torch.no_grad():
                c.weight.copy_(conv.weight.detach())
                c.bias.copy_(conv.bias.detach())
            self.convs.append(c)
        self.out = nn.Linear(model.out.in_features, model.out.out_features)
        with torch.no_grad():
            self.out.weight.copy_(model.out.weight.detach())
            self.out.bias.copy_(model.out.bias.detach())
        self.pools, self.act, self.shapes, self.num_classes = model.pools, model.act, model.shapes, model.num_classes
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())
        self.to(device=model.mean.device, dtype=dt)
        self.to(memory_format=torch.channels_last)  # 4-D weights channels_last

    def params(self):
        return [p for m in [*self.convs, self.out] for p in m.parameters()]

    def pool(self, l, z):
        """(P(z), what Unpool needs): max-pool with its arg-max indices, 2x2 average, or none."""
        if self.pools[l] == "m":
            return F.max_pool2d(z, 2, return_indices=True)
        if self.pools[l] == "a":
            return F.avg_pool2d(z, 2), None
        return z, None

    def unpool(self, l, s, idx, size):
        """∂<s, P(z)>/∂z: s put back at the arg-max positions (max), spread over the 2x2 window /4 (avg)."""
        if self.pools[l] == "m":
            return F.max_unpool2d(s, idx, 2, output_size=size)
        if self.pools[l] == "a":
            u = F.interpolate(s, scale_factor=2, mode="nearest") / 4
            return F.pad(u, (0, size[1] - u.shape[-1], 0, size[0] - u.shape[-2]))
        return s

    def bottom_up(self, l, prev):
        """P(W_l ⋆ prev + b_l), the pool indices and the pre-pool size."""
        z = self.convs[l](prev)
        p, idx = self.pool(l, z)
        return p, idx, z.shape[-2:]

    def nudge(self, s_last, y, beta):
        """−β ∂CE(W_o vec(s_N) + b_o, y)/∂s_N = −β (softmax − onehot) W_o, shaped like s_N."""
        d = torch.softmax(self.out(s_last.flatten(1)), 1) - F.one_hot(y, self.num_classes).to(s_last.dtype)
        return (-beta * (d @ self.out.weight)).view(s_last.shape)

    def relax(self, first, s, T, beta=0.0, y=None):
        """T synchronous steps from states s; `first` = the cached input term bottom_up(0, x̂)."""
        n = len(s)
        for _ in range(T):
            ups = [first] + [self.bottom_up(l, s[l - 1]) for l in range(1, n)]
            new = []
            for l in range(n):
                h = ups[l][0]
                if l + 1 < n:
                    _, idx, size = ups[l + 1]
                    h = h + F.conv_transpose2d(self.unpool(l + 1, s[l + 1], idx, size), self.convs[l + 1].weight,
                                               padding=self.convs[l + 1].padding)
                if l == n - 1 and beta != 0.0:
                    h = h + self.nudge(s[l], y, beta)
                new.append(self.act(h))
            s = new
        return s

    def first(self, x):
        xn = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return xn, self.bottom_up(0, xn)

    def zeros(self, B, device):
        return [torch.zeros(B, *sh, device=device, dtype=self.mean.dtype).contiguous(
            memory_format=torch.channels_last) for sh in self.shapes]

    def logits(self, s):
        return self.out(s[-1].flatten(1))

    def dphi_dtheta(self, xn, first, s):
        """∂Φ/∂θ at states s: (G(Unpool(s_l), s_{l−1}), Σ Unpool(s_l)) per conv, summed over the batch."""
        out = []
        for l, conv in enumerate(self.convs):
            prev = xn if l == 0 else s[l - 1]
            _, idx, size = first if l == 0 else self.bottom_up(l, prev)
            u = self.unpool(l, s[l], idx, size)
            gw = torch.nn.grad.conv2d_weight(prev, conv.weight.shape, u, padding=conv.padding)
            out += [gw, u.sum((0, 2, 3))]
        return out

    @torch.no_grad()
    def train_step(self, x, y, T1, T2, beta):
        """Free (T1), +β (T2), −β (T2), then the textbook update into .grad. Returns the three end states and the
        free-phase logits."""
        xn, first = self.first(x)
        B = x.shape[0]
        s0 = self.relax(first, self.zeros(B, x.device), T1)
        logits = self.logits(s0)
        sp = self.relax(first, s0, T2, beta, y)
        sm = self.relax(first, s0, T2, -beta, y)
        gp, gm = self.dphi_dtheta(xn, first, sp), self.dphi_dtheta(xn, first, sm)
        grads = [-(a - b) / (2 * beta * B) for a, b in zip(gp, gm)]
        onehot = F.one_hot(y, self.num_classes).to(x.dtype)
        dp = torch.softmax(self.logits(sp), 1) - onehot
        dm = torch.softmax(self.logits(sm), 1) - onehot
        grads += [(dp.t() @ sp[-1].flatten(1) + dm.t() @ sm[-1].flatten(1)) / (2 * B), (dp + dm).sum(0) / (2 * B)]
        for p, g in zip(self.params(), grads):
            p.grad = g if p.grad is None else p.grad + g
        return s0, sp, sm, logits

    @torch.no_grad()
    def predict(self, x, T):
        _, first = self.first(x)
        return self.logits(self.relax(first, self.zeros(x.shape[0], x.device), T))

    def free_stepper(self, x):
        _, first = self.first(x)
        return torch.no_grad()(lambda s: self.relax(first, s, 1))


def peak_mib(dev) -> float:
    """Peak memory so far: CUDA memory allocated (since the last reset) on CUDA, the process's max RSS on CPU."""
    if dev.type == "cuda":
        return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def max_diff(a, b):
    return max(float((u.detach().double() - v.detach().double()).abs().max()) for u, v in zip(a, b))


# --profile: where a training step's time goes, per phase and per kind of op (torch.profiler, CPU self+child time
# of each top-level aten op, so that nothing is counted twice)
OP_KINDS = [
    ("conv2d (bottom-up)", ("aten::conv2d",)),
    ("conv_transpose2d (top-down)", ("aten::conv_transpose2d",)),
    ("conv weight grads", ("aten::convolution_backward",)),
    ("pooling", ("aten::max_pool2d", "aten::max_pool2d_with_indices", "aten::avg_pool2d")),
    ("unpool", ("aten::max_pool2d_with_indices_backward", "aten::max_unpool2d", "aten::avg_pool2d_backward",
                "aten::upsample_nearest2d", "aten::constant_pad_nd", "aten::pad")),
    ("clamp (σ)", ("aten::clamp", "aten::clamp_")),
    ("add/mul/sub/div", ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::div",
                         "aten::neg", "aten::rsub")),
    ("copies, cat, zeros, casts", ("aten::cat", "aten::copy_", "aten::contiguous", "aten::clone", "aten::zeros",
                                   "aten::fill_", "aten::zero_", "aten::to", "aten::_to_copy", "aten::empty",
                                   "aten::empty_like", "aten::full", "aten::zeros_like", "aten::view",
                                   "aten::reshape", "aten::flatten", "aten::slice", "aten::expand")),
]


def _op_kind(name):
    for kind, names in OP_KINDS:
        if name in names:
            return kind
    return "other aten ops"


def _labelled(obj, attr, label):
    """Wrap obj.attr (an instance attribute shadows the method; a module function is swapped) in a record_function
    "phase: " + label(*args, **kw). Returns the undo."""
    fn, own = getattr(obj, attr), vars(obj).get(attr)

    def wrapped(*args, **kw):
        with torch.profiler.record_function("phase: " + label(*args, **kw)):
            return fn(*args, **kw)
    setattr(obj, attr, wrapped)
    return lambda: setattr(obj, attr, own) if own is not None else delattr(obj, attr)


def profile_step(fn, phases):
    """Profile one call of fn (after the caller's warm-up). `phases`: (obj, attr, label) to wrap while profiling
    (label(*args, **kw) names the phase of one call).
    Returns {wall_ms, aten_ms, by_phase, by_kind, calls, table: {phase: {kind: ms}}}; a top-level aten op is one
    whose parent is not an aten op, its time includes its children; an op belongs to the nearest labelled phase
    around it ("(rest of the step)" outside all)."""
    from torch.profiler import ProfilerActivity, profile
    undo = [_labelled(o, a, lab) for o, a, lab in phases]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
    finally:
        for u in undo:
            u()
    table, calls = {}, {}
    for ev in prof.events():
        parent = ev.cpu_parent
        if not ev.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        phase = "(rest of the step)"
        while parent is not None:
            if parent.name.startswith("phase: "):
                phase = parent.name[7:]
                break
            parent = parent.cpu_parent
        kind = _op_kind(ev.name)
        row = table.setdefault(phase, {})
        row[kind] = row.get(kind, 0.0) + ev.cpu_time_total / 1e3
        calls[kind] = calls.get(kind, 0) + 1
    by_kind, by_phase = {}, {}
    for phase, row in table.items():
        by_phase[phase] = sum(row.values())
        for kind, ms in row.items():
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
    aten = sum(by_phase.values())
    r = lambda d: {k: round(v, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}  # noqa: E731
    return dict(wall_ms=round(wall * 1e3, 1), aten_ms=round(aten, 1),
                python_and_dispatch_ms=round(wall * 1e3 - aten, 1),
                by_phase=r(by_phase), by_kind=r(by_kind), calls=calls, table={p: r(row) for p, row in table.items()})


def print_profile(n, d):
    """The profile as a phase x kind table on stderr."""
    kinds = list(d["by_kind"])
    phases = list(d["by_phase"])
    w = max(len(k) for k in kinds + ["kind of op"])
    out = [f"profile of one training step: {n} (wall {d['wall_ms']:.0f} ms, aten ops {d['aten_ms']:.0f} ms)",
           f"{'kind of op':<{w}} " + " ".join(f"{p[:16]:>16}" for p in phases) + f" {'total':>9} {'calls':>6}"]
    for k in kinds:
        out.append(f"{k:<{w}} " + " ".join(f"{d['table'][p].get(k, 0.0):16.1f}" for p in phases)
                   + f" {d['by_kind'][k]:9.1f} {d['calls'][k]:6d}")
    out.append(f"{'total':<{w}} " + " ".join(f"{d['by_phase'][p]:16.1f}" for p in phases) + f" {d['aten_ms']:9.1f}")
    print("\n".join(out), file=sys.stderr, flush=True)


def _nudge_label(i):
    """Phase label from the β argument (position i, or keyword): free or nudged."""
    def label(*args, **kw):
        beta = args[i] if len(args) > i else kw.get("beta", 0.0)
        return "nudged phases" if torch.is_tensor(beta) or beta != 0.0 else "free phase"
    return label


def profile_phases(n, impl):
    """What to label while profiling implementation n (its object)."""
    import epcli.ep as ep_module
    if n == "epcli":
        return [(impl, "relax", _nudge_label(2)), (impl, "ep_update", lambda *a, **k: "weight update"),
                (ep_module, "relative_residual", lambda *a, **k: "residual checks")]
    if n == "explicit":
        return [(impl, "relax", _nudge_label(3)), (impl, "dphi_dtheta", lambda *a, **k: "weight update")]
    return [(impl, "relax", _nudge_label(4))]


BASELINES = {"reference-style": RefStyleEP, "explicit": ExplicitEP}


def agreement(model: EPCNN, x, y, T1, T2, beta, dtype=torch.float64, baseline="reference-style"):
    """Run epcli and a baseline (a BASELINES name) on copies of `model` in `dtype` (sync relaxation, symmetric EP)
    and return the max |epcli − baseline| of the free, +β and −β states and the free logits, and the max relative
    difference of the weight gradients (max |Δgrad| / max |grad| over the tensors)."""
    m = EPCNN.from_spec(model.spec).to(x.device)
    m.load_state_dict(model.state_dict())
    m = m.to(dtype)
    ref = BASELINES[baseline](m).to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        s0, _ = m.relax(x, T1, update="sync")
        lg = m.logits(s0)
        sp, _ = m.relax(x, T2, beta, y, states=s0, update="sync")
        sm, _ = m.relax(x, T2, -beta, y, states=s0, update="sync")
    m.ep_train_step(x, y, T1, T2, beta, "symmetric", update="sync")
    g_ep = [p.grad for g in m.layer_param_groups() for p in g]
    r0, rp, rm, rl = ref.train_step(x, y, T1, T2, beta)
    g_ref = [p.grad for p in ref.params()]
    return dict(states_free=max_diff(s0, r0), states_plus=max_diff(sp, rp), states_minus=max_diff(sm, rm),
                logits=max_diff([lg], [rl]),
                grad_rel=max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
                             for a, b in zip(g_ep, g_ref)))


def fp32_trajectory(model: EPCNN, ref, x, T, atol=1e-5):
    """The free phase of epcli and a baseline in the run's own precision, step by step: (steps during which every
    state agrees to `atol`, max |Δstate| after T steps, max |Δlogit| after T steps). A 1-ulp difference between
    two conv implementations eventually flips a max-pool arg-max on a near-tie (a discontinuity of the dynamics),
    after which the trajectories differ by ~1e-3..1e-2 although the mathematics is the same (see the fp64 check)."""
    step = ref.free_stepper(x.float())
    s, r, within = model.zero_states(x.shape[0], x.device), ref.zeros(x.shape[0], x.device), None
    for t in range(1, T + 1):
        with torch.no_grad():
            s, _ = model.relax(x, 1, states=s, update="sync")
        r = step(r)
        if within is None and max_diff(s, r) > atol:
            within = t - 1
    with torch.no_grad():
        dl = max_diff([model.logits(s)], [ref.logits(r)])
    return (T if within is None else within), max_diff(s, r), dl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="CPU-sized run: ep-cnn-small, T1=30, T2=10, batch 64")
    p.add_argument("--preset", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--T1", type=int, default=None)
    p.add_argument("--T2", type=int, default=None)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--rule", default="symmetric")
    p.add_argument("--update", choices=["sync", "alternate"], default=None,
                   help="relaxation: synchronous (the paper) or alternating even/odd sweeps (default: the preset's)")
    p.add_argument("--iters", type=int, default=None, help="timed training batches (after 1 warm-up)")
    p.add_argument("--repeat", type=int, default=1, help="repeat each timing; value = median, values = all")
    p.add_argument("--epoch-images", type=int, default=None, help="images per epoch (50k; 5k with --small)")
    p.add_argument("--tol", type=float, default=1e-3, help="convergence tolerance for the converged-T line")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="relaxation precision (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the relaxation step (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a shared box)")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference-style implementation (autograd-of-Φ dynamics) in this run, "
                        "after checking both agree numerically; emits the ratio")
    p.add_argument("--baseline", choices=["explicit"], action="append", default=[],
                   help="also time the plain explicit implementation (ExplicitEP: channels_last, sequential "
                        "phases, textbook update) in this run, after checking both agree numerically; emits the "
                        "ratio (combine with --reference for both baselines)")
    p.add_argument("--atol", type=float, default=1e-9,
                   help="--reference/--baseline: max allowed difference in the float64 agreement check")
    p.add_argument("--check-images", type=int, default=16,
                   help="--reference/--baseline: images in the agreement check")
    p.add_argument("--no-converged", action="store_true", help="skip the converged-T inference line")
    p.add_argument("--only", choices=["epcli", *BASELINES],
                   help="time only this implementation (no agreement check, no ratio, no converged line): for "
                        "timing whole processes from outside, e.g. with /usr/bin/time")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing: profile one training step of epcli (and of each baseline) after a "
                        "warm-up; one JSON line per implementation with ms per phase and per kind of op, and a "
                        "table on stderr")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    small = a.small
    preset = a.preset or ("ep-cnn-small" if small else "ep-cnn")
    B = a.batch or (64 if small else 128)
    T1, T2 = a.T1 or (30 if small else 250), a.T2 or (10 if small else 30)
    iters = a.iters or (3 if small else 20)
    epoch_images = a.epoch_images or (5000 if small else 50000)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    # tol=None: the T=T1 lines time fixed-length relaxations, as the baselines run them (a preset's own per-image
    # stop, e.g. ep-cnn-small's, would make epcli's forward shorter); the converged-T line passes --tol itself
    model = EPCNN.preset(preset, tol=None, **({"update": a.update} if a.update else {})).to(dev)
    # baselines on copies of the weights, taken before accelerate(): the reference style fp32 NCHW, the explicit
    # baseline fp32 channels_last
    names = (["reference-style"] if a.reference else []) + (["explicit"] if "explicit" in a.baseline else [])
    if a.only:
        names = [] if a.only == "epcli" else [a.only]
    baselines = {n: BASELINES[n](model) for n in names}
    model.accelerate(DTYPES[a.dtype], channels_last=True, compile=a.compile)  # no-op on CPU
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    command = " ".join(shlex.quote(v) for v in [Path(sys.executable).name, *sys.argv])
    base = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=command, torch=torch.__version__, preset=preset, batch=B)
    settings = dict(dtype=a.dtype, compile=a.compile, update=model.update)

    def emit(**kw):
        print(json.dumps({**base, **kw}), flush=True)

    emit(what="run", cuda=torch.version.cuda, threads=torch.get_num_threads(), cpu=platform.processor() or None,
         reference=a.reference, baselines=names, repeat=a.repeat, **settings)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    x = torch.rand(B, 3, 32, 32, device=dev)
    y = torch.randint(0, model.num_classes, (B,), device=dev)

    # the same mathematics? (on a sub-batch: with a fixed T a sample's states do not depend on its batch-mates)
    for n, ref in ({} if a.only else baselines).items():
        nb = min(B, a.check_images)
        d = agreement(model, x[:nb], y[:nb], T1, T2, a.beta, baseline=n)
        ok = max(d.values()) <= a.atol
        within, ds, dl = fp32_trajectory(model, ref, x[:nb], T1)
        emit(what="agreement", impl=f"epcli vs {n}", baseline=n, update="sync", T1=T1, T2=T2, beta=a.beta,
             images=nb, fp64_atol=a.atol, ok=ok, **{f"fp64_{k}": float(f"{v:.3g}") for k, v in d.items()},
             run_dtype=a.dtype, steps_within_1e_5=within, T1_state_diff=float(f"{ds:.3g}"),
             T1_logit_diff=float(f"{dl:.3g}"),
             note="fp64_*: max |difference| over free/+β/−β states, logits, and max |Δgrad|/max |grad| of the "
                  "symmetric EP update (asserted); run_dtype: free phase step by step in the timed precision, "
                  "steps until a near-tie max-pool arg-max flips (then ~1e-3..1e-2 apart)")
        assert ok, f"epcli and the {n} implementation disagree in float64: {d}"

    def time_it(fn, n):
        fn()  # warm-up (cudnn autotune, compile)
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n

    def epcli_train():
        model.zero_grad(set_to_none=True)
        model.ep_train_step(x, y, T1, T2, a.beta, a.rule)

    def baseline_train(ref):
        def train():
            ref.zero_grad(set_to_none=True)
            ref.train_step(x, y, T1, T2, a.beta)
        return train

    n_inf = max(1, iters // 2)
    impls = [("epcli", epcli_train, lambda: model(x, T=T1))]
    if baselines and a.rule != "symmetric":
        raise SystemExit("--reference / --baseline time the symmetric rule (the reference's --thirdphase)")
    for n, ref in baselines.items():
        impls.append((n, baseline_train(ref), lambda ref=ref: ref.predict(x, T1)))
    if a.only:
        impls = [i for i in impls if i[0] == a.only]
    if a.profile:
        for n, train, _ in impls:
            train()  # warm-up
            d = profile_step(train, profile_phases(n, model if n == "epcli" else baselines[n]))
            emit(impl=n, what="profile", unit="ms", T1=T1, T2=T2, beta=a.beta, rule=a.rule, **d,
                 **(settings if n == "epcli" else dict(update="sync")),
                 note="torch.profiler, one training step after a warm-up; each top-level aten op's CPU time "
                      "(children included) by phase and kind; python_and_dispatch_ms = wall - aten")
            print_profile(n, d)
        return
    res = {(n, w): [] for n, _, _ in impls for w in ("train", "infer")}
    peak = {}  # MiB: CUDA memory allocated at the peak of each implementation's timings (CPU: process max RSS)
    for _ in range(a.repeat):  # interleaved, so that a load change on a shared box hits both
        for n, train, infer in impls:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            res[n, "train"].append(time_it(train, iters))
            with torch.no_grad() if n == "epcli" else torch.enable_grad():
                res[n, "infer"].append(time_it(infer, n_inf))
            peak[n] = max(peak.get(n, 0.0), peak_mib(dev))
    batches = math.ceil(epoch_images / B)
    med = {k: statistics.median(v) for k, v in res.items()}
    for n, _, _ in impls:
        extra = settings if n == "epcli" else dict(dtype="fp32", compile=False, update="sync",
                                                   layout="NCHW" if n == "reference-style" else "channels_last")
        emit(impl=n, what="train", value=round(med[n, "train"] * batches, 2), unit="s/epoch",
             values=[round(v * batches, 2) for v in res[n, "train"]], s_per_batch=round(med[n, "train"], 4),
             T1=T1, T2=T2, beta=a.beta, rule=a.rule, epoch_images=epoch_images, iters=iters, **extra,
             peak_mib=peak[n], peak_memory="cuda max allocated" if dev.type == "cuda" else "process max RSS",
             note="training only (no test pass, no data loading)")
        emit(impl=n, what="inference", value=round(B / med[n, "infer"], 1), unit="images/s",
             values=[round(B / v, 1) for v in res[n, "infer"]], T=T1, converged=False, **extra)
    for n in ([] if a.only else baselines):
        for w, unit in (("train", "s/epoch"), ("inference", "images/s")):
            k = "train" if w == "train" else "infer"
            emit(what=f"{w} ratio", baseline=n, value=round(med[n, k] / med["epcli", k], 2),
                 unit=f"{n} time / epcli time", per_repeat=[
                     round(r / e, 2) for r, e in zip(res[n, k], res["epcli", k])],
                 **settings, note="same process, device, threads, batch, weights, T1/T2/β"
                 + ("" if model.update == "sync" else f"; epcli ran alternate sweeps, the {n} baseline sync steps"))

    if a.no_converged or a.only not in (None, "epcli"):
        return
    with torch.no_grad():  # epcli only: the baselines have no convergence test
        _, conv_T = model.relax(x, max(T1, 250), tol=a.tol)
        vals = [B / time_it(lambda: model(x, T=conv_T), n_inf) for _ in range(a.repeat)]
        emit(impl="epcli", what="inference", value=round(statistics.median(vals), 1), unit="images/s",
             values=[round(v, 1) for v in vals], T=conv_T, converged=True, tol=a.tol, **settings)


if __name__ == "__main__":
    main()
