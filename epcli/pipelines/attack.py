"""`epcli attack` and `epcli compare`: attacks recorded with per-example outcomes and reliability checks."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from epcli.attacks.checks import mcnemar_p  # re-exported: the API and compare use it from here
from epcli.data import Dataset, first_order, subset
from epcli.errors import NotFoundError, UsageError
from epcli.pipelines.common import (
    Progress,
    check_eps,
    check_model_takes,
    check_not_blank,
    check_numbers,
    dataset_for,
    eps_label,
    link_model_input,
    load_model,
    no_progress,
    parse_eps,
    resolve_device,
)
from epcli.pipelines.common import relax_residual_rows
from epcli.store import Store, describe_device


# Mansingh et al.'s protocols (docs/attacks.md "paper protocol"), one per attack they ran, all through IBM ART
# with y=None (the model's predictions as labels) on the first test images:
# - PGD: clip_values=None, eps_step 2.5*eps/20, max_iter 20, num_random_init 0; EP gradients by BPTT through a
#   70-step unroll while predictions relax 250 steps;
# - Square: ART's SquareAttack on the softmax of a T=250 prediction, max_iter 1000, 1 restart, p_init 0.8, the
#   first 200 images in one call (the windows are shared by the batch, so the batch is part of the protocol);
# - AutoAttack: ART's AutoAttack with its defaults (eps_step 0.1), batch 200, the first 200 images; the EP
#   unroll of its gradients is not recorded: truncated:70, as their PGD.
PAPER_PROTOCOLS = {
    "pgd": {"attack": "pgd", "labels": "predicted", "select": "first",
            "params": {"steps": 20, "step_size": None, "random_start": False, "restarts": 1, "clip": False,
                       "loss": "ce"},
            "ep_grad_mode": "truncated:70", "ep_T": 250},
    "square": {"attack": "art-square", "labels": "predicted", "select": "first", "n": 200, "batch_size": 200,
               "params": {"max_iter": 1000, "p_init": 0.8, "restarts": 1, "scores": "softmax"}, "ep_T": 250},
    "autoattack": {"attack": "art-autoattack", "labels": "predicted", "select": "first", "n": 200,
                   "batch_size": 200, "params": {"eps_step": 0.1, "batch_size": 200, "apgd_iter": 100, "restarts": 5,
                                                 "deepfool_iter": 100, "overshoot": 1e-3, "nb_grads": 10,
                                                 "square_iter": 5000, "p_init": 0.8, "square_restarts": 5},
                   "ep_grad_mode": "truncated:70", "ep_T": 250},
}
# other values the paper also ran for a setting (its Square L2 table at 20,000 iterations): allowed, and the
# report then sets that table beside the result
PAPER_ALTERNATIVES = {"square": {"max_iter": (20000,)}}
PAPER_ALTERNATIVES["art-square"] = PAPER_ALTERNATIVES["square"]
PAPER_PROTOCOLS["art-square"] = PAPER_PROTOCOLS["square"]
PAPER_PROTOCOLS["art-autoattack"] = PAPER_PROTOCOLS["autoattack"]
PAPER_PROTOCOL = PAPER_PROTOCOLS["pgd"]  # the one most users mean (scripts/art_agreement.py)
PROTOCOLS = ("epcli", "paper")
RANKING_ATTACKS = ("apgd-dlr", "apgd-t", "fab-t", "autoattack", "art-autoattack")  # DLR/runner-up: >= 3 classes


# the attack parameters the CLI's flags set (cli.attack), to name a refused one as the user gave it
PARAM_FLAGS = {"steps": "--steps", "step_size": "--step-size", "restarts": "--restarts", "n_queries": "--queries",
               "random_start": ("--random-start", "--no-random-start"), "clip": ("--clip", "--no-clip")}


def _as_given(key: str, value, renamed: dict) -> str:
    """A parameter as the user set it: its CLI flag (with the ART name it became, when renamed), else key=value."""
    flag = PARAM_FLAGS.get(renamed.get(key, key))
    if isinstance(flag, tuple):
        text = flag[0] if value else flag[1]
    elif flag:
        text = f"{flag} {value:g}" if isinstance(value, (int, float)) else f"{flag} {value}"
    else:
        return f"{key}={value!r}"
    return f"{text} ({key})" if key in renamed else text


def _apply_protocol(protocol, attack, labels, select, params, grad_mode, targeted, n=None, batch_size=None,
                    renamed=None):
    """The paper protocol's settings; an explicit choice that contradicts it is a UsageError, named as the user
    gave it (renamed: ART parameter -> the CLI parameter it came from). Returns (attack, labels, select, params,
    n, batch_size)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}: use 'epcli' or 'paper'")
    if protocol == "epcli":
        return attack, labels or "true", select, params, n, batch_size
    if attack not in PAPER_PROTOCOLS:
        raise UsageError(f"--protocol paper covers the attacks the paper ran: pgd, square and autoattack (ART's); "
                         f"got --attack {attack}")
    p = PAPER_PROTOCOLS[attack]
    clash = ["--select random" if select == "random" else "", "--targeted" if targeted else "",
             f"--labels {labels}" if labels not in (None, p["labels"]) else "",
             *[_as_given(k, v, renamed or {}) for k, v in (params or {}).items()
               if k in p["params"] and v != p["params"][k]
               and v not in PAPER_ALTERNATIVES.get(attack, {}).get(k, ())],
             f"--grad-mode {grad_mode}" if (grad_mode or "").startswith("transfer") else "",
             f"--batch-size {batch_size}" if "batch_size" in p and batch_size not in (None, p["batch_size"])
             else ""]
    clash = [c for c in clash if c]
    if clash:
        raise UsageError(f"--protocol paper fixes these settings; drop {', '.join(clash)}")
    chosen = {k: v for k, v in (params or {}).items() if v in PAPER_ALTERNATIVES.get(attack, {}).get(k, ())}
    return (p["attack"], p["labels"], p["select"], {**(params or {}), **p["params"], **chosen},
            p.get("n") if n is None else n, p.get("batch_size", batch_size))


def attack(*, model: str, attack: str = "pgd", norm: str = "linf", eps: list[float] | str = "8/255",
           dataset: str | None = None, data_dir: str | None = None, n: int | None = None, seed: int = 0,
           grad_mode: str | None = None, batch_size: int | None = None, labels: str | None = None,
           params: dict | None = None, T: int | None = None, device: str | None = None, store: Store,
           argv: list[str] | None = None, checks: bool = True, strength: bool = True,
           unroll_sweep: list[int] | None = None, chunk: int | None = None, progress: Progress = no_progress,
           targeted: bool = False, protocol: str = "epcli", select: str | None = None) -> dict:
    """Attack a stored model on the test split for every eps; record accuracy, outcomes and examples.

    The set is attacked in chunks of `chunk` examples (default: `attack_chunk(n, batch_size)`) whose outcomes
    are kept under store/partial/<config>-<run id>/ until the run finishes, so re-running an interrupted attack
    with the same arguments takes over its folder and resumes where it stopped.
    Reliability checks (monotone in eps, large eps, PGD strength, white-box vs stored black-box results on
    the same points, and the unroll-length sweep when asked) are stored with the result.
    select: "random" (a seeded subset of n, the default) or "first" (the first n test images).
    grad_mode: None is bptt; labels: None is "true".
    protocol "paper": Mansingh et al.'s ART protocol for pgd, square or autoattack (PAPER_PROTOCOLS): square and
    autoattack become ART's algorithms (art-square, art-autoattack) on the first 200 images in batches of 200;
    on EP models the gradient mode becomes truncated:70 and T 250 unless given; labels are "predicted" (an
    explicit "true" is refused).
    """
    from epcli import attacks
    from epcli import distributed as dist
    from epcli.pipelines import shard
    from epcli.store import config_hash

    check_numbers(n=n, seed=seed, batch_size=batch_size, T=T, chunk=chunk, unroll=unroll_sweep,
                  **{k: v for k, v in (params or {}).items() if k in ("steps", "restarts", "step_size",
                                                                      "n_queries")})
    device = dist.device_for(resolve_device(device))
    if shard.worker(device):  # a torchrun rank > 0: attacks the chunks rank 0 hands out (docs/distributed.md)
        return shard.serve(device)
    check_not_blank(**{"--model": model, "--dataset": dataset, "--data-dir": data_dir, "--grad-mode": grad_mode})
    eps_list = sorted(set(parse_eps(eps)))
    notes = check_eps(norm, eps_list)
    attack, labels, select, params, n, batch_size = _check_attack(attack, norm, labels, select, params, grad_mode,
                                                                  targeted, protocol, n, batch_size)
    progress("load", 0, 1, {"model": model})
    net, info, surrogate, surrogate_info, grad_mode, sweep = _attacked_model(
        store, model, dataset, device, attack=attack, protocol=protocol, grad_mode=grad_mode, T=T,
        targeted=targeted, unroll_sweep=unroll_sweep)
    ds = dataset_for(store, info, dataset, data_dir)
    for m in (net, surrogate) if surrogate is not None else (net,):
        check_model_takes(m, ds.test_x, ds.name)
    x, y, idx = _examples(ds, select, n, seed)
    chunk = chunk or attack_chunk(len(y), batch_size or 256)
    progress("load", 1, 1, {"model": net.spec["name"], "dataset": ds.name, "images": len(y)})
    train_run = info["train_run"] or {}
    T_main = getattr(net, "T", None)
    # an unroll longer than the prediction's T needs a longer relaxation: that sweep entry runs with T = K
    sweep_T = {f"truncated:{k}": max(k, T_main) for k in sweep} if sweep else {}
    raised = {gm: t for gm, t in sweep_T.items() if t != T_main}
    if raised:
        notes.append(f"unroll sweep: {', '.join(raised)} longer than --T {T_main}: those run with T = K "
                     "(prediction and gradient through the same K steps)")
    config = {"model": net.spec["name"], "model_run_id": train_run.get("id"), "attack": attack, "norm": norm,
              "eps": eps_list, "dataset": ds.name, "n_examples": len(y), "seed": seed, "grad_mode": grad_mode,
              "labels": labels, "params": params, "T": T_main, "batch_size": batch_size,
              "unroll_sweep": sweep, "chunk": chunk, "checkpoint": info["sha256"] or str(info["path"]),
              "targeted": bool(targeted), "protocol": protocol, "select": select,
              **({"first_order": first_order(ds.test_y)[1]} if select == "first" else {}),
              **({"unroll_sweep_T": raised} if raised else {})}
    prefix = f"attack-{config_hash(config)[:20]}"
    modes = [grad_mode] + [f"truncated:{k}" for k in sweep if f"truncated:{k}" != grad_mode]
    with store.run("attack", config, argv=argv, seed=seed, model=net.spec["name"], dataset=ds.name,
                   model_run_id=train_run.get("id"), device=describe_device(device)) as run_id:
        partial = _partial_folder(store, prefix, run_id)
        if any(partial.rglob("*.safetensors")):
            notes.append(f"resuming an interrupted attack with the same arguments ({partial.name})")
        for note in notes:
            warnings.warn(note)
        link_model_input(store, run_id, info)
        if surrogate_info:
            link_model_input(store, run_id, surrogate_info)
        t0 = time.time()
        results = {}
        if hasattr(net, "implicit_stats"):
            from epcli.ep import new_implicit_stats
            net.implicit_stats = new_implicit_stats()
        for gm in modes:
            with _relaxation_steps(net, sweep_T.get(gm, T_main) if gm != grad_mode else T_main):
                results[gm] = _attack_in_chunks(
                    net, x, y, attack=attack, norm=norm, eps_list=eps_list, batch_size=batch_size or 256,
                    device=device, seed=seed, params=params, grad_mode=gm, surrogate=surrogate, labels=labels,
                    targeted=targeted, chunk=chunk, partial=partial / gm.replace(":", "-"), progress=progress,
                    task=f"{attack} {{eps}}" + ("" if gm == grad_mode else f" {gm}"))
        res = results[grad_mode]
        flags = []
        if grad_mode == "implicit" and getattr(net, "implicit_stats", {}).get("calls"):
            flags.append(_implicit_check(net.implicit_stats, T_main))
            if not flags[-1]["passed"]:
                warnings.warn(flags[-1]["detail"])
        if checks:
            progress("checks", 0, 1, {})
            flags += [dict(f) for f in attacks.check_reliability([res])]
            if strength and attack == "pgd" and len(y):
                flags.append(_strength(attacks, net, x, y, res, norm, eps_list, params, seed, device, grad_mode,
                                       surrogate, batch_size, labels, progress))
            if labels == "true" and not targeted:  # robust means the same thing as in the stored runs
                flags += _cross_run_checks(store, run_id, train_run.get("id"), attack, norm, idx, y, res,
                                           T=T_main, dataset=ds.name)
            if sweep:
                flags.append(_unroll_check(results, grad_mode, eps_list, len(y)))
            progress("checks", 1, 1, {"passed": sum(bool(f["passed"]) for f in flags), "failed":
                                      sum(not f["passed"] for f in flags)})
        for f in flags:
            f.pop("result", None)
        bad = [f for f in flags if not f["passed"]]
        reason = "; ".join(f"{f['check']}: {f['detail']}" for f in bad)
        clean = res["clean_correct"].float().mean().item()
        base = {"dataset": ds.name, "split": "test", "model": net.spec["name"], "attack": attack, "norm": norm,
                "n_examples": len(y)}
        detail = {"labels": labels, "protocol": protocol, "select": select, "targeted": bool(targeted)}
        rows, robust, sweep_out = _accuracy_rows(results, grad_mode, eps_list, clean, base, detail, reason,
                                                 T_of={gm: T_main if gm == grad_mode else sweep_T.get(gm, T_main)
                                                       for gm in results},
                                                 unreliable=bool(bad))
        # how far from equilibrium the predictions are: the clean images, and every adversarial prediction
        rows += relax_residual_rows(net, x, device, base, adversarial=res.get("adv_residual"))
        progress("save", 0, 1, {})
        store.log_metrics(run_id, rows)
        store.log_checks(run_id, flags)
        _save_attack_artifacts(store, run_id, res, x, y, idx, eps_list, ds)
        progress("save", 1, 1, {"run_id": run_id})
        seconds = time.time() - t0
        target_hit = ({eps_label(e): float(res["target_hit"][e].float().mean()) for e in eps_list}
                      if res.get("target_hit") else None)
        members = _member_accuracy(res)
        # predicted labels (the paper's ART protocol): robust means "on its true label after the attack", which an
        # image the model got wrong reaches when the attack moves it there: say how much of robust that is
        from_errors = {eps_label(e): _from_clean_errors(res, e) for e in eps_list} if labels == "predicted" else None
        shards = {"shards": res["shards"]} if "shards" in res else {}  # torchrun: who attacked what
        summary = {"clean_acc": clean, "robust_acc": robust, "unreliable": bool(bad), "reason": reason,
                   "seconds": seconds, "labels": labels, "protocol": protocol,
                   **({"unroll_sweep": sweep_out} if sweep_out else {}),
                   **({"target_hit": target_hit} if target_hit else {}),
                   **({"members": members} if members else {}),
                   **({"robust_from_clean_errors": from_errors} if from_errors else {}), **shards}
        store.update_run(run_id, summary=summary)
        shutil.rmtree(partial, ignore_errors=True)
        with contextlib.suppress(OSError):
            partial.parent.rmdir()  # only when no other attack is in progress
    return shard.finish({
        "run_id": run_id, "model": net.spec["name"], "model_run_id": train_run.get("id"), "attack": attack,
        "dataset": ds.name, "norm": norm, "grad_mode": grad_mode, "n_examples": len(y), "clean_acc": clean,
        "robust_acc": robust, "unroll_sweep": sweep_out, "unreliable": bool(bad), "reason": reason,
        "seconds": round(seconds, 2), "checks": flags, "notes": notes, "eps": eps_list, "labels": labels,
        "params": res.get("params") or params, "forward_passes": res.get("forward_passes"),
        "attack_forward_passes": res.get("attack_forward_passes"),
        "protocol": protocol, "select": select, "targeted": bool(targeted), "T": T_main,
        "unroll_sweep_T": raised, **({"target_hit": target_hit} if target_hit else {}),
        **({"members": members} if members else {}),
        **({"robust_from_clean_errors": from_errors} if from_errors else {}), **shards})


def _check_attack(attack, norm, labels, select, params, grad_mode, targeted, protocol, n=None, batch_size=None):
    """The attack's settings, checked before any model is loaded or run opened; the protocol applied.
    Returns (attack, labels, select, params, n, batch_size)."""
    from epcli import attacks
    if attack not in attacks.ATTACKS:
        raise UsageError(f"unknown attack {attack!r}: choose from {', '.join(sorted(attacks.ATTACKS))}")
    if labels not in (None, "true", "predicted"):
        raise UsageError("labels must be 'true' or 'predicted'")
    if select not in (None, "random", "first"):
        raise UsageError(f"select must be 'random' or 'first', got {select!r}")
    params = dict(params or {})
    art = {"square": "art-square", "autoattack": "art-autoattack"}.get(attack, attack) if protocol == "paper" \
        else attack
    # the CLI's budget flags under the names ART's attacks take (ART's Square counts iterations, about 3 model
    # calls each; in AutoAttack --steps and --restarts are APGD's, --queries Square's)
    renamed = {}
    for flag, name in {"art-square": {"n_queries": "max_iter"},
                       "art-autoattack": {"steps": "apgd_iter", "n_queries": "square_iter"}}.get(art, {}).items():
        if flag in params:
            params[name] = params.pop(flag)
            renamed[name] = flag
    attack, labels, select, params, n, batch_size = _apply_protocol(protocol, attack, labels, select, params,
                                                                    grad_mode, targeted, n, batch_size, renamed)
    if protocol == "paper" and attack == "art-square" and params.get("max_iter") != 1000 and norm != "l2":
        raise UsageError(f"--protocol paper ran Square at {params['max_iter']} iterations only under L2; drop "
                         f"{_as_given('max_iter', params['max_iter'], renamed)} or use --norm l2")
    if norm not in attacks.NORMS_OF[attack]:
        raise UsageError(f"{attack} is an {' / '.join(n.upper() for n in attacks.NORMS_OF[attack])} attack: use "
                         f"--norm {attacks.NORMS_OF[attack][0]}")
    if targeted and attack in attacks.UNTARGETED:
        raise UsageError(f"{attack} is untargeted, as the paper ran it through ART; --targeted applies to fgsm, pgd, "
                         "cw, apgd-ce, apgd-dlr and square")
    if targeted and attack in attacks.SELF_TARGETED:
        raise UsageError(f"{attack} picks its own target classes; --targeted applies to fgsm, pgd, cw, apgd-ce, "
                         "apgd-dlr and square")
    params = attacks.resolve_params(attack, params or {})
    attacks.check_grad_mode(grad_mode or "bptt")  # before any run is opened: a typo leaves the store as it was
    return attack, labels, select or "random", params, n, batch_size


def _attacked_model(store, model, dataset, device, *, attack, protocol, grad_mode, T, targeted, unroll_sweep):
    """Load the attacked model (and a transfer surrogate) and check what depends on it: classes, T, the
    gradient mode, the unroll sweep. Returns (net, info, surrogate, surrogate_info, grad_mode, sweep)."""
    from epcli import attacks
    net, info = load_model(store, model, dataset, device)
    if protocol == "paper" and hasattr(net, "grad_mode"):
        p = PAPER_PROTOCOLS[attack]
        grad_mode = grad_mode or p.get("ep_grad_mode")
        T = p["ep_T"] if T is None else T
    grad_mode = grad_mode or "bptt"
    k = net.spec.get("num_classes")
    if k is not None and k < 3 and (attack in RANKING_ATTACKS or (targeted and attack.startswith("apgd"))):
        raise UsageError(f"{attack}{' --targeted' if targeted else ''} needs at least 3 classes (the DLR loss ranks "
                         f"logits); {net.spec['name']} has {k}")
    if T is not None:
        if not hasattr(net, "T"):
            raise UsageError(f"--T applies to relaxation models; {net.spec['name']} has no relaxation")
        net.T = int(T)
    surrogate, surrogate_info = None, None
    if grad_mode.startswith("transfer:"):
        surrogate, surrogate_info = load_model(store, grad_mode.split(":", 1)[1], dataset, device)
        if surrogate.spec.get("num_classes") != net.spec.get("num_classes"):
            raise UsageError(f"the transfer surrogate {surrogate.spec.get('name')} has "
                             f"{surrogate.spec.get('num_classes')} classes, the attacked model "
                             f"{net.spec.get('num_classes')}")
    elif grad_mode != "bptt" and attack in attacks.BLACK_BOX:  # it would be recorded, yet change nothing
        raise UsageError(f"--grad-mode {grad_mode} does nothing for {attack}: a black-box attack only queries the "
                         "model (transfer:<model> queries a surrogate instead)")
    elif grad_mode != "bptt" and not hasattr(net, "grad_mode"):
        raise UsageError(f"gradient mode {grad_mode!r} applies to relaxation models only; "
                         f"{net.spec['name']} supports bptt (plain backprop) and transfer:<model>")
    sweep = sorted(set(int(k) for k in unroll_sweep or []))
    if sweep and not hasattr(net, "grad_mode"):
        raise UsageError("--unroll-sweep applies to relaxation models (EP-CNN) only")
    if callable(getattr(net, "min_steps", None)):  # an unroll too short to reach the read-out has no gradient
        unrolls = sweep + ([int(grad_mode.split(":", 1)[1])] if grad_mode.startswith("truncated:") else [])
        shortest = min(unrolls, default=None)
        if shortest is not None and shortest < net.min_steps():
            raise UsageError(f"an unroll of {shortest} steps is shorter than the {net.min_steps()} the input needs "
                             f"to reach the read-out of {net.spec['name']}")
    if sweep and attack not in attacks.WHITE_BOX:
        raise UsageError("--unroll-sweep needs a white-box attack (it varies the gradient's unroll length)")
    return net, info, surrogate, surrogate_info, grad_mode, sweep


def _examples(ds: Dataset, select: str, n: int | None, seed: int):
    """The attacked test images, in index order: the first n (data.first_order: a class-sorted ImageFolder set
    is taken class by class in turn), or a seeded random subset of n. Returns (x, y, test indices)."""
    if select == "first":
        k = len(ds.test_y) if n is None else min(int(n), len(ds.test_y))
        idx = first_order(ds.test_y)[0][:k].sort().values
        return ds.test_x[idx], ds.test_y[idx], idx
    return subset(ds.test_x, ds.test_y, n, seed)


def _accuracy_rows(results: dict, grad_mode: str, eps_list: list[float], clean: float, base: dict, detail: dict,
                   reason: str, *, T_of: dict, unreliable: bool):
    """Metric rows: the clean accuracy and the robust accuracy per gradient mode and eps (the run's own mode
    carries the reliability verdict; the unroll-sweep modes do not). Returns (rows, robust, sweep_out): the
    robust accuracies by eps label, of the run's mode and of each sweep mode."""
    rows = [{"name": "clean_acc", "value": clean, **base, "grad_mode": grad_mode, "eps": 0.0}]
    robust, sweep_out = {}, {}
    for gm, r in results.items():
        for e in eps_list:
            acc = r["robust"][e].float().mean().item()
            if gm == grad_mode:
                robust[eps_label(e)] = acc
            else:
                sweep_out.setdefault(gm, {})[eps_label(e)] = acc
            rows.append({"name": "robust_acc", "value": acc, **base, "grad_mode": gm, "eps": e,
                         "unreliable": unreliable and gm == grad_mode,
                         "detail": {"reason": reason if gm == grad_mode else "",
                                    "forward_passes": r.get("forward_passes"), "params": r.get("params"),
                                    "batch_size": r.get("batch_size"), "T": T_of[gm], **detail,
                                    **({"target_hit": float(r["target_hit"][e].float().mean())}
                                       if r.get("target_hit") else {}),
                                    **({"from_clean_errors": _from_clean_errors(r, e)}
                                       if detail.get("labels") == "predicted" else {})}})
    return rows, robust, sweep_out


def _from_clean_errors(r: dict, e: float) -> float:
    """Predicted labels (the paper's ART protocol): the fraction of all images that count as robust at eps
    although the model got them wrong clean (the attack moved them onto their true label)."""
    return float((r["robust"][e].bool() & ~r["clean_correct"].bool()).float().mean())


def _member_accuracy(res: dict) -> dict:
    """AutoAttack: robust accuracy after each member in turn, per eps label (the official code's log lines)."""
    from epcli.attacks.evaluate import ensemble_members
    MEMBERS = ensemble_members(res.get("attack") or "autoattack")
    return {eps_label(e): {name: float(m[:, k].float().mean()) for k, name in enumerate(MEMBERS)}
            for e, m in (res.get("member_robust") or {}).items() if len(m)}


@contextlib.contextmanager
def _relaxation_steps(net, T):
    """Run with net.T = T (relaxation models), restoring it after."""
    old = getattr(net, "T", None)
    if old is None or T is None or T == old:
        yield
        return
    net.T = T
    try:
        yield
    finally:
        net.T = old


def _implicit_check(stats: dict, T) -> dict:
    """Did the implicit gradient's adjoint see fixed points? (ep.EPCNN._to_fixed_point keeps the record.)"""
    adj = stats.get("adjoint_unconverged", 0)
    ok = stats["unconverged"] == 0 and adj == 0
    return {"check": "implicit-fixed-point", "passed": ok,
            "detail": f"implicit gradient: relative residual of one step at T={T} up to "
                      f"{stats['max_residual_at_T']:.3g}; relaxed up to {stats['max_extra_steps']} more steps, "
                      f"residual then up to {stats['max_residual']:.3g} (tolerance {stats['tol']:g}); "
                      f"{stats['unconverged']} of {stats['calls']} gradient calls not at a fixed point; "
                      f"{adj} adjoint solves stopped by their iteration budget before converging" +
                      ("" if ok else ": the gradient there is not the gradient of the prediction")}


def attack_chunk(n: int, batch_size: int) -> int:
    """Images per resumable chunk: about an eighth of the set (a killed attack keeps most of its work), at
    most 1,000, but never less than a full batch (min(n, batch_size)): a small chunk starves the batch (only its
    clean-correct images are attacked), and per-call overheads then dominate (an EP-CNN's PGD on 200 CPU images
    ran 1.7x slower in 25-image chunks than in one). A whole number of batches when a chunk holds more than one.
    It depends only on n and the batch size, never on the number of processes, so a sharded attack computes
    exactly the same chunks."""
    per = max(min(1000, math.ceil(max(n, 1) / 8)), min(max(n, 1), batch_size))
    return per if per < batch_size else batch_size * (per // batch_size)


def _partial_folder(store: Store, prefix: str, run_id: str) -> Path:
    """This run's own partial folder. An interrupted or failed run with the same config left its chunks in
    `<prefix>-<its run id>`: take that folder over (a rename, so two identical attacks never share one)."""
    root = store.root / "partial"
    mine = root / f"{prefix}-{run_id}"
    for old in sorted(root.glob(f"{prefix}-*"), reverse=True):
        other = old.name[len(prefix) + 1:]
        try:
            status = store.get_run(other)["status"] if other else None
        except NotFoundError:
            status = None  # a folder whose run is gone (or the pre-run-id layout): nobody owns it
        if status == "running":
            continue  # an identical attack in progress right now: leave its folder alone
        try:
            old.rename(mine)
            return mine
        except OSError:
            continue  # another process took it over first
    mine.mkdir(parents=True, exist_ok=True)
    return mine


def _attack_in_chunks(net, x, y, *, chunk: int, partial: Path, progress: Progress, task: str, seed: int,
                      **kw) -> dict:
    """attacks.evaluate over consecutive chunks, each chunk's outcome saved so an interrupted run resumes.

    Progress: one task per eps (`task` with {eps} replaced by its label), counted in images, advanced inside
    each batch as the attack's forward passes accumulate; it ends with the robust accuracy."""
    from safetensors.torch import load_file, save_file

    from epcli.pipelines import shard
    if shard.sharded():  # under torchrun: the ranks share the chunks, rank 0 keeps the chunk files
        return shard.attack_in_chunks(net, x, y, chunk=chunk, partial=partial, progress=progress, task=task,
                                      seed=seed, **kw)
    partial.mkdir(parents=True, exist_ok=True)
    parts, total = [], len(y)
    names = {e: task.format(eps=eps_label(e)) for e in kw["eps_list"]}
    robust = {e: 0 for e in kw["eps_list"]}
    passes = {e: 0 for e in kw["eps_list"]}
    for e in kw["eps_list"]:
        progress(names[e], 0, total, {})

    def on_step(info: dict, start: int) -> None:
        e = info["eps"]
        done = start + info["lo"] + info["fraction"] * (info["hi"] - info["lo"])
        if "robust" in info:  # the attack at this eps finished the batch
            robust[e] += info["robust"]
            passes[e] += info["forward_passes"]
            shown = {"robust_acc": robust[e] / (start + info["hi"]), "fwd": passes[e]}
        else:
            seen = start + info["lo"]
            shown = {"robust_acc": robust[e] / seen if seen else None, "fwd": passes[e] + info["forward_passes"],
                     "_eta_bound": not info.get("exact", True)}  # the display then says "eta ≤"
        progress(names[e], done, total, shown)

    for k, (start, stop) in enumerate(_chunks(total, chunk)):
        f = _chunk_file(partial, k)
        if f.exists():
            r = _load_chunk(f, load_file)
            for e in kw["eps_list"]:
                robust[e] += int(r["robust"][e].sum())
                progress(names[e], stop, total, {"robust_acc": robust[e] / max(1, stop), "resumed": "yes"})
        else:
            r = _attack_chunk(net, x, y, k, (start, stop), seed=seed, on_step=lambda i, s=start: on_step(i, s),
                              **kw)
            _save_chunk(f, r, save_file)
        parts.append(r)
    return _merge_chunks(parts)


def _chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of every chunk: set by n and the chunk size alone, never by the number of processes."""
    return [(start, min(start + chunk, total)) for start in range(0, max(total, 1), chunk)]


def _chunk_file(partial: Path, k: int) -> Path:
    return partial / f"chunk-{k:05d}.safetensors"


def _attack_chunk(net, x, y, k: int, bounds: tuple[int, int], *, seed: int, **kw) -> dict:
    """Chunk k's outcome: it depends only on the chunk's images, the batch size and the run seed, so any process
    may compute it (epcli.pipelines.shard hands whole chunks to torchrun ranks). kw: attacks.evaluate's."""
    from epcli import attacks
    start, stop = bounds
    return attacks.evaluate(net, x[start:stop], y[start:stop], seed=seed + 7919 * k,
                            keep_adv=16 if k == 0 else 0, **kw)


_CHUNK_TENSORS = ("clean_correct", "clean_pred", "y", "attack_labels", "targets")
_CHUNK_GROUPS = ("robust", "pred_adv", "target_hit", "adv_residual", "member_robust")


def _save_chunk(path: Path, r: dict, save_file) -> None:
    import json
    t = {k: r[k].cpu().contiguous() for k in _CHUNK_TENSORS if isinstance(r.get(k), torch.Tensor)}
    for e in r["robust"]:
        for group in _CHUNK_GROUPS:
            if e in (r.get(group) or {}):
                t[f"{group}/{e!r}"] = r[group][e].cpu().contiguous()
        if e in r.get("x_adv", {}) and len(r["x_adv"][e]):
            t[f"x_adv/{e!r}"] = r["x_adv"][e].cpu().float().contiguous()
    scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str, list, dict)) and k not in
               (*_CHUNK_GROUPS, "x_adv", "robust_accuracy")}
    tmp = path.with_suffix(".tmp")
    save_file(t, str(tmp), metadata={"scalars": json.dumps(scalars, default=str)})
    os.replace(tmp, path)


def _load_chunk(path: Path, load_file) -> dict:
    import json

    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        scalars = json.loads((f.metadata() or {}).get("scalars", "{}"))
    t = load_file(str(path))
    r = dict(scalars)
    for k, v in t.items():
        if "/" in k:
            group, e = k.split("/", 1)
            r.setdefault(group, {})[float(e)] = v
        else:
            r[k] = v
    r.setdefault("x_adv", {})
    return r


def _merge_chunks(parts: list[dict]) -> dict:
    out = dict(parts[0])
    for k in _CHUNK_TENSORS:
        if isinstance(parts[0].get(k), torch.Tensor):
            out[k] = torch.cat([p[k].cpu() for p in parts])
    for group in _CHUNK_GROUPS:  # a group some chunk lacks (written by an older epcli, resumed) is dropped
        if all(p.get(group) for p in parts):
            out[group] = {e: torch.cat([p[group][e].cpu() for p in parts]) for e in parts[0][group]}
        else:
            out.pop(group, None)
    out["x_adv"] = parts[0].get("x_adv", {})
    out["n"] = int(out["clean_correct"].numel())
    out["robust_accuracy"] = {e: float(v.float().mean()) for e, v in out["robust"].items()}
    for k in ("forward_passes", "attack_forward_passes", "queries", "seconds"):
        if all(isinstance(p.get(k), (int, float)) for p in parts):
            out[k] = sum(p[k] for p in parts)
    return out


def _strength(attacks, net, x, y, res, norm, eps_list, params, seed, device, grad_mode, surrogate, batch_size,
              labels, progress: Progress = no_progress) -> dict:
    """PGD with 2x steps and restarts on the first (up to) 500 points, at the eps whose robust accuracy is
    nearest half the clean; the base outcome is the main run's own on those points (not re-run)."""
    clean = float(res["clean_correct"].float().mean())
    e = min(eps_list, key=lambda v: abs(res["robust_accuracy"][v] - clean / 2))
    m = min(len(y), 500)
    steps, restarts = params.get("steps", 20), params.get("restarts", 1)
    # counted in PGD steps x images: only the stronger run (2x steps, 2x restarts); the base is the run's own
    strong_w = 4 * steps * max(restarts, 1)
    name = f"check strength {eps_label(e)}"
    progress(name, 0, strong_w, {"images": m})

    def on_step(info: dict) -> None:
        frac = (info["lo"] + info["fraction"] * (info["hi"] - info["lo"])) / max(1, m)
        progress(name, min(frac * strong_w, strong_w - 1e-9), strong_w, {"phase": info["phase"]})

    out = dict(attacks.strength_check(net, x, y, norm=norm, eps=e, steps=steps, restarts=restarts, n=m,
                                      seed=seed, device=device, grad_mode=grad_mode, surrogate=surrogate,
                                      batch_size=batch_size or 256, labels=labels, params=params,
                                      base_robust=res["robust"][e][:m], on_step=on_step))
    progress(name, strong_w, strong_w,
             {"base": out.get("base"), "strong": out.get("strong"), "passed": "yes" if out["passed"] else "no"})
    return out


def _stored_outcomes(store: Store, run: dict, required: bool = False) -> dict | None:
    """A run's stored per-example outcomes, or None when it has none. A file deleted or damaged on disk is None
    too (other runs' outcomes only add checks: one lost file failed every later attack of the model), unless
    `required`: then a NotFoundError that names the run."""
    from safetensors.torch import load_file
    arts = store.artifacts_of(run["id"], role="output", kind="per-example")
    if not arts:
        return None
    path = store.artifact_path(arts[0]["sha256"])
    try:
        t = load_file(str(path))
    except Exception as e:  # missing (OSError) or not safetensors (SafetensorError)
        if not required:
            return None
        if not path.exists():
            raise NotFoundError(f"run {run['id']}'s per-example outcomes {path} are missing from the store (`epcli "
                                "gc` forgets lost files)") from None
        raise NotFoundError(f"run {run['id']}'s per-example outcomes {path} cannot be read ({e})") from None
    robust = {float(k[len("robust_"):]): v.bool() for k, v in t.items() if k.startswith("robust_")}
    return {"attack": run["config"]["attack"], "norm": run["config"]["norm"], "index": t["index"],
            "y": t["label"], "robust": robust, "run_id": run["id"]}


def _cross_run_checks(store: Store, run_id: str, model_run_id: str | None, attack: str, norm: str, idx, y,
                      res: dict, T: int | None = None, dataset: str | None = None) -> list[dict]:
    """White-box vs black-box on the same points, against the stored runs of the same model.

    Same points means the same test set (`dataset`: indices of another set name other images) and the same
    classifier (`T`: an EP-CNN relaxed for other steps predicts otherwise).

    Every other stored white-box run of the model (same norm) is used to tell a weak white-box attack from
    gradient masking (checks.white_vs_black). When the black-box result beats a stored white-box one, the
    stored result is flagged as well.
    """
    from epcli.attacks import BLACK_BOX, WHITE_BOX
    from epcli.attacks.checks import white_vs_black
    if not model_run_id:
        return []
    mine = {"attack": attack, "norm": norm, "index": idx, "y": y, "robust": res["robust"], "run_id": run_id}
    stored = []
    for other in store.runs(kind="attack", status="finished", model_run_id=model_run_id):
        if len(stored) >= MAX_CROSS_CHECKS:  # the newest few: check rows stay bounded however many runs exist
            break
        cfg = other.get("config") or {}
        if other["id"] == run_id or cfg.get("norm") != norm or cfg.get("attack") not in (*WHITE_BOX, *BLACK_BOX):
            continue
        if cfg.get("labels", "true") != "true" or cfg.get("targeted"):
            continue  # robust means something else there
        if cfg.get("T") != T or (dataset is not None and cfg.get("dataset", dataset) != dataset):
            continue  # another classifier, or other images under the same indices
        o = _stored_outcomes(store, other)
        if o is not None:
            stored.append(o)
    whites = ([mine] if attack in WHITE_BOX else []) + [o for o in stored if o["attack"] in WHITE_BOX]
    out = []
    for theirs in stored:
        if not ((attack in WHITE_BOX and theirs["attack"] in BLACK_BOX)
                or (attack in BLACK_BOX and theirs["attack"] in WHITE_BOX)):
            continue
        white, black = (mine, theirs) if attack in WHITE_BOX else (theirs, mine)
        _, ia, ib = _common_indices(white["index"], black["index"])
        if len(ia) == 0:
            continue
        at = white["index"][ia]
        others = [_aligned(o, at) for o in whites if o is not white]
        for c in white_vs_black(_restrict(white, ia), _restrict(black, ib), others):
            c["detail"] += f" (vs run {theirs['run_id']})"
            if not c["passed"] and white is theirs:  # the stored white-box result is the unreliable one
                store.log_checks(theirs["run_id"], [c])
                store.db.execute("UPDATE metrics SET unreliable = 1 WHERE run_id = ? AND name = 'robust_acc'",
                                 [theirs["run_id"]])
                c = {**c, "passed": True, "detail": c["detail"] + ": flagged that run"}
            out.append(c)
    return out


def _aligned(r: dict, at: torch.Tensor) -> dict:
    """r's per-example robustness at the test indices `at`; points r did not attack count as robust."""
    pos = {int(v): i for i, v in enumerate(r["index"].tolist())}
    sel = torch.tensor([pos.get(int(v), -1) for v in at.tolist()], dtype=torch.long)
    have = sel >= 0
    robust = {}
    for e, v in r["robust"].items():
        full = torch.ones(len(at), dtype=torch.bool)
        full[have] = v.cpu().bool()[sel[have]]
        robust[e] = full
    return {"attack": r["attack"], "norm": r["norm"], "robust": robust}


MAX_CROSS_CHECKS = 5


def _common_indices(a: torch.Tensor, b: torch.Tensor):
    pos_b = {int(v): i for i, v in enumerate(b.tolist())}
    ia, ib = [], []
    for i, v in enumerate(a.tolist()):
        if int(v) in pos_b:
            ia.append(i)
            ib.append(pos_b[int(v)])
    return ia, torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long)


def _restrict(r: dict, sel: torch.Tensor) -> dict:
    robust = {e: v.cpu()[sel] for e, v in r["robust"].items()}
    return {"attack": r["attack"], "norm": r["norm"], "n": len(sel), "y": r["y"].cpu()[sel], "robust": robust,
            "robust_accuracy": {e: float(v.float().mean()) for e, v in robust.items()}}


def _unroll_check(results: dict, grad_mode: str, eps_list: list[float], n: int) -> dict:
    """The paper's §9.1 check: a shorter unroll must not find a much stronger attack than the full gradient."""
    import math
    worst = []
    for e in eps_list:
        full = float(results[grad_mode]["robust"][e].float().mean())
        best = min(float(r["robust"][e].float().mean()) for r in results.values())
        slack = max(1.0 / max(n, 1), 2 * math.sqrt(max(full * (1 - full), 0) / max(n, 1)))
        if full > best + slack:
            worst.append((e, full, best))
    accs = {gm: {f"{e:g}": round(float(r["robust"][e].float().mean()), 4) for e in eps_list}
            for gm, r in results.items()}
    return {"check": "unroll-sweep", "passed": not worst,
            "detail": f"robust accuracy by gradient unroll: {accs}" +
                      (f"; a shorter unroll is stronger than {grad_mode} at {[w[0] for w in worst]}"
                       if worst else "")}


def _save_attack_artifacts(store: Store, run_id: str, res: dict, x, y, idx, eps_list, ds: Dataset) -> None:
    from safetensors.torch import save_file
    outcome = {"index": idx.to(torch.int64), "label": y.to(torch.int64),
               "clean_correct": res["clean_correct"].to(torch.uint8).cpu()}
    if isinstance(res.get("attack_labels"), torch.Tensor):  # what the attack moved away from (or, targeted, to)
        outcome["attack_label"] = res["attack_labels"].to(torch.int64).cpu()
    for e in eps_list:
        outcome[f"robust_{e!r}"] = res["robust"][e].to(torch.uint8).cpu()
        if "pred_adv" in res:
            outcome[f"pred_{e!r}"] = res["pred_adv"][e].to(torch.int64).cpu()
    meta = {"eps": str(eps_list)}
    store.write_artifact(run_id, "per-example", lambda p: save_file(outcome, str(p), metadata=meta),
                         suffix=".safetensors", meta={"eps": eps_list})
    if res.get("x_adv"):
        k = min(len(v) for v in res["x_adv"].values())
        ex = {"x": x[:k].float().div(255) if x.dtype == torch.uint8 else x[:k].float(),
              "labels": y[:k].to(torch.int64), "pred_clean": res["clean_pred"][:k].to(torch.int64).cpu()}
        for e in eps_list:
            ex[f"x_adv_{e!r}"] = res["x_adv"][e][:k].float().cpu().contiguous()
            if "pred_adv" in res:
                ex[f"pred_{e!r}"] = res["pred_adv"][e][:k].to(torch.int64).cpu()
        meta = {"eps": str(eps_list), "classes": str(ds.classes).replace("'", '"')}
        store.write_artifact(run_id, "adversarial-examples",
                             lambda p: save_file({k2: v.contiguous() for k2, v in ex.items()}, str(p),
                                                 metadata=meta),
                             suffix=".safetensors", meta={"eps": eps_list, "classes": ds.classes})


def compare(*, store: Store, run_a: str, run_b: str) -> dict:
    """Paired comparison of two attack runs on the test points both attacked, per shared eps.

    Uses the stored per-example outcomes: counts of points robust under both, only A, only B, and the exact
    two-sided McNemar p-value on the discordant pairs (is one model really more robust on the same points?).
    """
    a_run, b_run = store.get_run(run_a), store.get_run(run_b)
    for r in (a_run, b_run):
        if r["kind"] != "attack" or r["status"] != "finished":
            raise UsageError(f"run {r['id']} is {'an' if r['status'] == 'interrupted' else 'a'} {r['status']} "
                             f"{r['kind']} run; compare needs two finished "
                             "attack runs")
    a, b = _stored_outcomes(store, a_run, required=True), _stored_outcomes(store, b_run, required=True)
    if a is None or b is None:
        raise NotFoundError("one of the runs has no per-example outcomes stored")
    if a_run["dataset"] != b_run["dataset"]:
        raise UsageError(f"the runs attacked different datasets ({a_run['dataset']} vs {b_run['dataset']})")
    if a["norm"] != b["norm"]:  # an eps means nothing across norms: 0.5 in L2 is not 0.5 in L-inf
        raise UsageError(f"the runs attacked in different norms ({a['norm']} vs {b['norm']}): compare runs of one "
                         "threat model")
    _, ia, ib = _common_indices(a["index"], b["index"])
    if len(ia) == 0:
        raise UsageError("the two runs share no test points (use the same --seed and overlapping --n)")
    rows = []
    for e in sorted(set(a["robust"]) & set(b["robust"])):
        ra, rb = a["robust"][e][ia], b["robust"][e][ib]
        only_a, only_b = int((ra & ~rb).sum()), int((~ra & rb).sum())
        rows.append({"eps": e, "eps_label": eps_label(e), "n": len(ia), "acc_a": float(ra.float().mean()),
                     "acc_b": float(rb.float().mean()), "both": int((ra & rb).sum()), "only_a": only_a,
                     "only_b": only_b, "mcnemar_p": mcnemar_p(only_a, only_b)})
    if not rows:
        raise UsageError("the two runs share no eps value")
    return {"run_a": a_run["id"], "run_b": b_run["id"], "model_a": a_run["model"], "model_b": b_run["model"],
            "attack_a": a["attack"], "attack_b": b["attack"], "norm_a": a["norm"], "norm_b": b["norm"],
            "grad_mode_a": a_run["config"].get("grad_mode"), "grad_mode_b": b_run["config"].get("grad_mode"),
            # what "robust" meant in each run (predicted: a misclassified image pushed onto its label counts)
            "labels_a": a_run["config"].get("labels") or "true", "labels_b": b_run["config"].get("labels") or "true",
            "dataset": a_run["dataset"], "rows": rows}


