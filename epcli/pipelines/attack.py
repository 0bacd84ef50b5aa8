"""`epcli attack` and `epcli compare`: attacks recorded with per-example outcomes and reliability checks."""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from epcli.data import Dataset, subset
from epcli.errors import NotFoundError, UsageError
from epcli.pipelines.common import (
    Progress,
    check_eps,
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


def attack(*, model: str, attack: str = "pgd", norm: str = "linf", eps: list[float] | str = "8/255",
           dataset: str | None = None, data_dir: str | None = None, n: int | None = None, seed: int = 0,
           grad_mode: str = "bptt", batch_size: int | None = None, labels: str = "true",
           params: dict | None = None, T: int | None = None, device: str | None = None, store: Store,
           argv: list[str] | None = None, checks: bool = True, strength: bool = True,
           unroll_sweep: list[int] | None = None, chunk: int = 1000, progress: Progress = no_progress) -> dict:
    """Attack a stored model on the test split for every eps; record accuracy, outcomes and examples.

    The set is attacked in chunks of `chunk` examples whose outcomes are kept under store/partial/ until the
    run finishes, so re-running an interrupted attack with the same arguments resumes where it stopped.
    Reliability checks (monotone in eps, large eps, PGD strength, white-box vs stored black-box results on
    the same points, and the unroll-length sweep when asked) are stored with the result.
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
    eps_list = sorted(set(parse_eps(eps)))
    notes = check_eps(norm, eps_list)
    if attack not in attacks.ATTACKS:
        raise UsageError(f"unknown attack {attack!r}: choose from {', '.join(sorted(attacks.ATTACKS))}")
    if labels not in ("true", "predicted"):
        raise UsageError("labels must be 'true' or 'predicted'")
    params = attacks.resolve_params(attack, params or {})
    progress("load", 0, 1, {"model": model})
    net, info = load_model(store, model, dataset, device)
    if T is not None:
        if not hasattr(net, "T"):
            raise UsageError(f"--T applies to relaxation models; {net.spec['name']} has no relaxation")
        net.T = int(T)
    surrogate, surrogate_info = None, None
    if grad_mode.startswith("transfer:"):
        surrogate, surrogate_info = load_model(store, grad_mode.split(":", 1)[1], dataset, device)
    elif grad_mode != "bptt" and not hasattr(net, "grad_mode"):
        raise UsageError(f"gradient mode {grad_mode!r} applies to relaxation models only; "
                         f"{net.spec['name']} supports bptt (plain backprop) and transfer:<model>")
    sweep = sorted(set(int(k) for k in unroll_sweep or []))
    if sweep and not hasattr(net, "grad_mode"):
        raise UsageError("--unroll-sweep applies to relaxation models (EP-CNN) only")
    if sweep and attack not in attacks.WHITE_BOX:
        raise UsageError("--unroll-sweep needs a white-box attack (it varies the gradient's unroll length)")
    ds = dataset_for(store, info, dataset, data_dir)
    x, y, idx = subset(ds.test_x, ds.test_y, n, seed)
    progress("load", 1, 1, {"model": net.spec["name"], "dataset": ds.name, "images": len(y)})
    train_run = info["train_run"] or {}
    config = {"model": net.spec["name"], "model_run_id": train_run.get("id"), "attack": attack, "norm": norm,
              "eps": eps_list, "dataset": ds.name, "n_examples": len(y), "seed": seed, "grad_mode": grad_mode,
              "labels": labels, "params": params, "T": getattr(net, "T", None), "batch_size": batch_size,
              "unroll_sweep": sweep, "chunk": chunk, "checkpoint": info["sha256"] or str(info["path"])}
    partial = store.root / "partial" / f"attack-{config_hash(config)[:20]}"
    if partial.exists() and any(partial.rglob("*.safetensors")):
        notes.append(f"resuming an interrupted attack with the same arguments ({partial.name})")
    for note in notes:
        warnings.warn(note)
    modes = [grad_mode] + [f"truncated:{k}" for k in sweep if f"truncated:{k}" != grad_mode]
    with store.run("attack", config, argv=argv, seed=seed, model=net.spec["name"], dataset=ds.name,
                   model_run_id=train_run.get("id"), device=describe_device(device)) as run_id:
        link_model_input(store, run_id, info)
        if surrogate_info:
            link_model_input(store, run_id, surrogate_info)
        t0 = time.time()
        results = {}
        for gm in modes:
            results[gm] = _attack_in_chunks(
                net, x, y, attack=attack, norm=norm, eps_list=eps_list, batch_size=batch_size or 256,
                device=device, seed=seed, params=params, grad_mode=gm, surrogate=surrogate, labels=labels,
                chunk=chunk, partial=partial / gm.replace(":", "-"), progress=progress,
                task=f"{attack} {{eps}}" + ("" if gm == grad_mode else f" {gm}"))
        res = results[grad_mode]
        flags = []
        if checks:
            progress("checks", 0, 1, {})
            flags += [dict(f) for f in attacks.check_reliability([res])]
            if strength and attack == "pgd" and len(y):
                flags.append(_strength(attacks, net, x, y, res, norm, eps_list, params, seed, device, grad_mode,
                                       surrogate, batch_size, labels, progress))
            flags += _cross_run_checks(store, run_id, train_run.get("id"), attack, norm, idx, y, res)
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
                             "unreliable": bool(bad) and gm == grad_mode,
                             "detail": {"reason": reason if gm == grad_mode else "",
                                        "forward_passes": r.get("forward_passes"), "params": r.get("params"),
                                        "batch_size": r.get("batch_size"), "T": getattr(net, "T", None),
                                        "labels": labels}})
        rows += relax_residual_rows(net, x, device, base)  # how far from equilibrium the predictions are
        progress("save", 0, 1, {})
        store.log_metrics(run_id, rows)
        store.log_checks(run_id, flags)
        _save_attack_artifacts(store, run_id, res, x, y, idx, eps_list, ds)
        progress("save", 1, 1, {"run_id": run_id})
        seconds = time.time() - t0
        shards = {"shards": res["shards"]} if "shards" in res else {}  # torchrun: who attacked what
        summary = {"clean_acc": clean, "robust_acc": robust, "unreliable": bool(bad), "reason": reason,
                   "seconds": seconds, **({"unroll_sweep": sweep_out} if sweep_out else {}), **shards}
        store.update_run(run_id, summary=summary)
        shutil.rmtree(partial, ignore_errors=True)
    result = {"run_id": run_id, "model": net.spec["name"], "model_run_id": train_run.get("id"), "attack": attack,
              "norm": norm, "grad_mode": grad_mode, "n_examples": len(y), "clean_acc": clean,
              "robust_acc": robust, "unroll_sweep": sweep_out, "unreliable": bool(bad), "reason": reason,
              "seconds": round(seconds, 2), "checks": flags, "notes": notes, "eps": eps_list, "labels": labels,
              "params": res.get("params") or params, "forward_passes": res.get("forward_passes"),
              "attack_forward_passes": res.get("attack_forward_passes"), **shards}
    return shard.finish(result)


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
            shown = {"robust_acc": robust[e] / seen if seen else None, "fwd": passes[e] + info["forward_passes"]}
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


_CHUNK_TENSORS = ("clean_correct", "clean_pred", "y")


def _save_chunk(path: Path, r: dict, save_file) -> None:
    import json
    t = {k: r[k].cpu().contiguous() for k in _CHUNK_TENSORS if isinstance(r.get(k), torch.Tensor)}
    for e in r["robust"]:
        t[f"robust/{e!r}"] = r["robust"][e].cpu().contiguous()
        if e in r.get("pred_adv", {}):
            t[f"pred_adv/{e!r}"] = r["pred_adv"][e].cpu().contiguous()
        if e in r.get("x_adv", {}) and len(r["x_adv"][e]):
            t[f"x_adv/{e!r}"] = r["x_adv"][e].cpu().float().contiguous()
    scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str, list, dict)) and k not in
               ("robust", "pred_adv", "x_adv", "robust_accuracy")}
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
    for group in ("robust", "pred_adv"):
        if parts[0].get(group):
            out[group] = {e: torch.cat([p[group][e].cpu() for p in parts]) for e in parts[0][group]}
    out["x_adv"] = parts[0].get("x_adv", {})
    out["n"] = int(out["clean_correct"].numel())
    out["robust_accuracy"] = {e: float(v.float().mean()) for e, v in out["robust"].items()}
    for k in ("forward_passes", "attack_forward_passes", "queries", "seconds"):
        if all(isinstance(p.get(k), (int, float)) for p in parts):
            out[k] = sum(p[k] for p in parts)
    return out


def _strength(attacks, net, x, y, res, norm, eps_list, params, seed, device, grad_mode, surrogate, batch_size,
              labels, progress: Progress = no_progress) -> dict:
    """PGD with 2x steps and restarts on a subset, at the eps whose robust accuracy is nearest half the clean."""
    clean = float(res["clean_correct"].float().mean())
    e = min(eps_list, key=lambda v: abs(res["robust_accuracy"][v] - clean / 2))
    m = min(len(y), max(50, min(200, len(y) // 10)))
    steps, restarts = params.get("steps", 20), params.get("restarts", 1)
    # counted in PGD steps x images: the base run, then the stronger one (2x steps, 2x restarts)
    base_w, strong_w = steps * max(restarts, 1), 4 * steps * max(restarts, 1)
    name = f"check strength {eps_label(e)}"
    progress(name, 0, base_w + strong_w, {"images": m})

    def on_step(info: dict) -> None:
        frac = (info["lo"] + info["fraction"] * (info["hi"] - info["lo"])) / max(1, m)
        done = frac * base_w if info["phase"] == "base" else base_w + frac * strong_w
        progress(name, min(done, base_w + strong_w - 1e-9), base_w + strong_w, {"phase": info["phase"]})

    out = dict(attacks.strength_check(net, x, y, norm=norm, eps=e, steps=steps, restarts=restarts, n=m,
                                      seed=seed, device=device, grad_mode=grad_mode, surrogate=surrogate,
                                      batch_size=batch_size or 256, labels=labels, on_step=on_step))
    progress(name, base_w + strong_w, base_w + strong_w,
             {"base": out.get("base"), "strong": out.get("strong"), "passed": "yes" if out["passed"] else "no"})
    return out


def _stored_outcomes(store: Store, run: dict) -> dict | None:
    from safetensors.torch import load_file
    arts = store.artifacts_of(run["id"], role="output", kind="per-example")
    if not arts:
        return None
    t = load_file(str(store.artifact_path(arts[0]["sha256"])))
    robust = {float(k[len("robust_"):]): v.bool() for k, v in t.items() if k.startswith("robust_")}
    return {"attack": run["config"]["attack"], "norm": run["config"]["norm"], "index": t["index"],
            "y": t["label"], "robust": robust, "run_id": run["id"]}


def _cross_run_checks(store: Store, run_id: str, model_run_id: str | None, attack: str, norm: str, idx, y,
                      res: dict) -> list[dict]:
    """White-box vs black-box on the same points, against the stored runs of the same model.

    When the black-box result beats a stored white-box one, the stored result is flagged as well.
    """
    from epcli.attacks import BLACK_BOX, WHITE_BOX, check_reliability
    if not model_run_id:
        return []
    mine = {"attack": attack, "norm": norm, "index": idx, "y": y, "robust": res["robust"], "run_id": run_id}
    out = []
    for other in store.runs(kind="attack", status="finished", model_run_id=model_run_id):
        cfg = other.get("config") or {}
        if other["id"] == run_id or cfg.get("norm") != norm:
            continue
        pair = (attack in WHITE_BOX and cfg.get("attack") in BLACK_BOX,
                attack in BLACK_BOX and cfg.get("attack") in WHITE_BOX)
        if not any(pair):
            continue
        theirs = _stored_outcomes(store, other)
        if theirs is None:
            continue
        common, ia, ib = _common_indices(mine["index"], theirs["index"])
        if len(common) == 0:
            continue
        a, b = (_restrict(mine, ia), _restrict(theirs, ib))
        for c in check_reliability([a, b]):
            if c["check"] != "white-vs-black":
                continue
            c = dict(c)
            c.pop("result", None)
            c["detail"] += f" (vs run {other['id']})"
            white = a if attack in WHITE_BOX else b
            if not c["passed"] and white is b:  # the stored white-box result is the unreliable one
                store.log_checks(other["id"], [c])
                store.db.execute("UPDATE metrics SET unreliable = 1 WHERE run_id = ? AND name = 'robust_acc'",
                                 [other["id"]])
                c = {**c, "passed": True, "detail": c["detail"] + ": flagged that run"}
            out.append(c)
    return out


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
            raise UsageError(f"run {r['id']} is a {r['status']} {r['kind']} run; compare needs two finished "
                             "attack runs")
    a, b = _stored_outcomes(store, a_run), _stored_outcomes(store, b_run)
    if a is None or b is None:
        raise NotFoundError("one of the runs has no per-example outcomes stored")
    if a_run["dataset"] != b_run["dataset"]:
        raise UsageError(f"the runs attacked different datasets ({a_run['dataset']} vs {b_run['dataset']})")
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
            "rows": rows}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the discordant pairs are Binomial(only_a + only_b, 1/2) under H0."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)

