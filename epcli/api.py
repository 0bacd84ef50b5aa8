"""The Python API behind the CLI: each function is one recorded run in the store.

This is the only module where the science (models, training, attacks, corruptions) meets the store.
Every function takes plain values, returns a JSON-serialisable dict, and raises `EpcliError`s for
anything the user can fix. Progress is reported through an optional `progress(task, done, total, info)`
callback so that the CLI can draw bars and scripts can stay silent.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch

from epcli import checkpoint
from epcli.data import Dataset, load_dataset, subset
from epcli.errors import CheckpointError, EpcliError, NotFoundError, UsageError
from epcli.store import Store, describe_device

Progress = Callable[[str, int, int, dict], None]
NORMS = ("linf", "l2")


def _noop(task: str, done: int, total: int, info: dict) -> None:
    pass


def resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is available (use --device cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def parse_eps(text: str | float | list) -> list[float]:
    """'8/255,0.5,1e-3' -> floats; fractions are allowed so that 8/255 stays exact."""
    if isinstance(text, (int, float)):
        return [float(text)]
    if isinstance(text, list):
        return [v for t in text for v in parse_eps(t)]
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            out.append(float(Fraction(part)) if "/" in part else float(part))
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"cannot read eps {part!r}: use numbers or fractions like 8/255") from None
    if not out:
        raise UsageError("no eps given")
    return out


def eps_label(eps: float) -> str:
    """8/255-style label when eps is a small multiple of 1/255, else the number."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and 0 < round(k) <= 64:
        return f"{round(k)}/255"
    return f"{eps:g}"


def check_eps(norm: str, eps_list: list[float]) -> list[str]:
    """Refuse eps outside the norm's sensible range; return warnings for suspicious values."""
    if norm not in NORMS:
        raise UsageError(f"unknown norm {norm!r}: use linf or l2")
    notes = []
    for e in eps_list:
        if not math.isfinite(e) or e < 0:
            raise UsageError(f"eps {e} must be a finite number >= 0")
        if norm == "linf" and e > 1:
            raise UsageError(f"L-inf eps {e} is outside [0, 1]: images are in [0, 1] (did you mean {e:g}/255?)")
        if norm == "linf" and abs(e - 0.3) < 1e-9:
            notes.append("eps 0.3 is the MNIST default; the CIFAR convention is 8/255")
        if norm == "l2" and e > 32:
            raise UsageError(f"L2 eps {e} is larger than the diameter of the image space (~55 for 3x32x32)")
    return notes


# --- model references -----------------------------------------------------------------------------------

def resolve_model(store: Store, ref: str, dataset: str | None = None) -> dict:
    """A model reference (registry name, run id or checkpoint path) -> its checkpoint and training run.

    Returns {path, sha256 (if in the store), train_run (dict or None), meta}.
    """
    p = Path(ref)
    if ref.endswith(".safetensors") or (p.exists() and p.is_file()):
        if not p.is_file():
            raise NotFoundError(f"checkpoint file {ref} does not exist")
        meta = checkpoint.read_metadata(p)
        run = None
        if meta.get("run_id"):
            try:
                run = store.get_run(str(meta["run_id"]))
            except NotFoundError:
                run = None
        return {"path": p, "sha256": None, "train_run": run, "meta": meta}
    try:
        run = store.get_run(ref)
    except NotFoundError:
        run = None
    if run is not None and run["kind"] != "train":
        raise UsageError(f"run {run['id']} is a {run['kind']} run, not a training run")
    if run is None:
        from epcli.models import list_models
        if ref not in list_models() and not ref.startswith("timm:"):
            raise NotFoundError(f"{ref!r} is neither a model name ({', '.join(list_models())}), a run id, "
                                "nor a checkpoint file")
        run = store.latest_train_run(ref, dataset)
    if run["status"] == "running":
        raise UsageError(f"training run {run['id']} is still running; wait for it or pass a checkpoint path")
    ckpts = store.artifacts_of(run["id"], role="output", kind="checkpoint")
    if not ckpts:
        raise NotFoundError(f"training run {run['id']} ({run['status']}) has no checkpoint")
    final = [a for a in ckpts if a["name"] == "final"] or ckpts
    art = final[-1]
    return {"path": store.artifact_path(art["sha256"]), "sha256": art["sha256"], "train_run": run,
            "meta": checkpoint.read_metadata(store.artifact_path(art["sha256"]))}


def _load_model(store: Store, ref: str, dataset: str | None, device: str):
    info = resolve_model(store, ref, dataset)
    model, meta = checkpoint.load(info["path"], device=device)
    return model, info


def _dataset_ref(dataset: str | None) -> str | None:
    """How to find the dataset again: a name, or an absolute path."""
    if dataset and Path(dataset).exists():
        return str(Path(dataset).resolve())
    return dataset


def _dataset_for(store: Store, info: dict, dataset: str | None, data_dir: str | None) -> Dataset:
    """The dataset to evaluate on: the one given, else the one the model was trained on."""
    cfg = (info["train_run"] or {}).get("config") or info["meta"].get("config") or {}
    name = dataset or cfg.get("dataset_ref") or cfg.get("dataset")
    ds = load_dataset(name, data_dir=data_dir or cfg.get("data_dir"), cache_dir=store.cache_dir)
    want = info["meta"].get("num_classes") or info["meta"]["spec"].get("num_classes")
    if want and int(want) != ds.num_classes:
        raise UsageError(f"the model has {want} classes but dataset {ds.name} has {ds.num_classes}")
    return ds


def _link_model_input(store: Store, run_id: str, info: dict) -> None:
    if info["sha256"]:
        store.link(run_id, info["sha256"], "input", "checkpoint")
    else:
        store.register_external(run_id, "checkpoint", info["path"], "input", "checkpoint")


# --- train ----------------------------------------------------------------------------------------------

def train(*, model: str, dataset: str | None = None, data_dir: str | None = None, recipe: str | None = None,
          overrides: dict | None = None, model_options: dict | None = None, seed: int = 0,
          device: str | None = None, store: Store | None, resume: str | None = None, label: str | None = None,
          argv: list[str] | None = None, progress: Progress = _noop) -> dict:
    """Train `model` on `dataset` with a recipe; checkpoint every epoch into the store.

    Under torchrun every process calls this with the same arguments and trains one model data-parallel
    (docs/distributed.md): only rank 0 uses `store` (others may pass None), resolves a resume and records the
    run; the device is cuda:LOCAL_RANK for any CUDA request; every rank returns rank 0's result.
    """
    from epcli import distributed as dist
    from epcli import train as training
    from epcli.models import build_from_spec, create_model

    device = dist.device_for(resolve_device(device))
    distributed = dist.init(device)  # False outside torchrun
    main = dist.is_main()
    if main and store is None:
        raise UsageError("train needs a store")
    # rank 0 loads first (it may download or decode into the store's cache); the others then read that cache
    cache_dir = dist.broadcast_object(str(store.cache_dir) if main else None)
    ds = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir) if main else None
    dist.barrier()
    if not main:
        ds = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir)
    if dist.broadcast_object(ds.sha256) != ds.sha256:
        raise UsageError(f"rank {dist.rank()} loaded a different {ds.name} than rank 0 (dataset_sha256 differs)")
    if not main:  # rank 0 resolves the model, recipe and any resume state, and hands them over
        plan = dist.broadcast_object(None)
        net = build_from_spec(plan["spec"])
        _check_fits(net, ds)
        training.fit(net, ds, plan["recipe"], device=device, seed=plan["seed"], state=plan["state"])
        return dist.broadcast_object(None)
    state, resume_info = None, None
    if resume:
        resume_info = resolve_model(store, resume, ds.name)
        net, meta, tensors = checkpoint.load(resume_info["path"], with_train_state=True)
        if not tensors:
            raise CheckpointError(f"{resume_info['path']} holds no training state to resume from")
        state = training.tensors_to_state(tensors, meta.get("train_state") or {})
        config = dict(meta.get("config") or {})
        if not config:
            raise CheckpointError(f"{resume_info['path']} does not record its training config")
        if config.get("dataset_sha256") and config["dataset_sha256"] != ds.sha256:
            raise UsageError(f"cannot resume on a different dataset than the checkpoint's ({config['dataset']})")
        model_name = config["model"]
        rec = config["recipe"]
        if overrides and "epochs" in overrides:
            rec = {**rec, "epochs": overrides["epochs"]}
        seed = config.get("seed", seed)
    else:
        torch.manual_seed(int(seed))  # the initial weights follow --seed too (rank 0's are broadcast)
        net = create_model(model, num_classes=ds.num_classes, **(model_options or {}))
        model_name = model
        rec_name = recipe or training.default_recipe(model, ds.name)
        rec = training.resolve_recipe(rec_name, overrides or {})
        rec.setdefault("name", rec_name)
    _check_fits(net, ds)
    if distributed:
        dist.broadcast_object({"spec": net.spec, "recipe": rec, "seed": seed, "state": state})
    config = {"model": model_name, "spec": net.spec, "dataset": ds.name, "dataset_sha256": ds.sha256,
              "dataset_ref": _dataset_ref(dataset), "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
              "recipe": rec, "seed": seed, "label": label or _default_label(model_name, rec),
              "world_size": dist.world_size()}
    if resume_info:
        config["resumed_from"] = (resume_info["train_run"] or {}).get("id") or str(resume_info["path"])
    with store.run("train", config, argv=argv, seed=seed, model=model_name, dataset=ds.name,
                   device=describe_device(device)) as run_id:
        if resume_info:
            _link_model_input(store, run_id, resume_info)
        last_sha: list[str] = []
        history: list[dict] = []

        def on_epoch(epoch: int, metrics: dict, st: dict) -> None:
            tensors, scalars = training.state_to_tensors(st)
            meta = {"run_id": run_id, "config_sha256": _hash(config), "epoch": epoch, "dataset": ds.name,
                    "classes": ds.classes, "num_classes": ds.num_classes, "config": config,
                    "train_state": scalars}
            sha = store.write_artifact(
                run_id, "checkpoint", lambda p: checkpoint.save(p, net, meta=meta, train_tensors=tensors),
                suffix=".safetensors", name="last", meta={"epoch": epoch})
            for old in last_sha:  # keep one checkpoint per run: the newest good one
                if old != sha:
                    _drop_artifact(store, run_id, old)
            last_sha[:] = [sha]
            rows = [{"name": k, "value": float(v), "step": epoch, "dataset": ds.name, "model": model_name,
                     "split": "test" if k == "test_acc" else "train"}
                    for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            store.log_metrics(run_id, rows)
            history.append({"epoch": epoch, **metrics})
            progress("epoch", epoch, rec["epochs"], metrics)  # epochs are 1-based

        def on_batch(done: int, total: int, info: dict) -> None:
            progress("batch", done, total, info)

        training.fit(net, ds, rec, device=device, seed=seed, state=state, on_epoch=on_epoch, on_batch=on_batch)
        if not last_sha:
            raise EpcliError("training ran no epoch (epochs must be >= 1, or the checkpoint was already final)")
        store.db["run_artifacts"].update((run_id, last_sha[0], "output"), {"name": "final"})
        summary = {"test_acc": history[-1].get("test_acc") if history else None, "epochs": len(history)}
        store.update_run(run_id, summary=summary)
    result = {"run_id": run_id, "model": model_name, "dataset": ds.name, "checkpoint": last_sha[0],
              "test_acc": summary["test_acc"], "epochs": rec["epochs"], "label": config["label"]}
    if distributed:
        result["world_size"] = dist.world_size()
        dist.broadcast_object(result)
    return result


def _drop_artifact(store: Store, run_id: str, sha: str) -> None:
    users = list(store.db.query("SELECT COUNT(*) AS n FROM run_artifacts WHERE sha256 = ? AND run_id != ?",
                                [sha, run_id]))[0]["n"]
    if users:
        return
    path = store.artifact_path(sha)
    store.db.execute("DELETE FROM run_artifacts WHERE sha256 = ?", [sha])
    store.db.execute("DELETE FROM artifacts WHERE sha256 = ?", [sha])
    path.unlink(missing_ok=True)


def _check_fits(net: torch.nn.Module, ds: Dataset) -> None:
    n = net.spec.get("num_classes")
    if n is not None and n != ds.num_classes:
        raise UsageError(f"model {net.spec.get('name')} has {n} classes, dataset {ds.name} has {ds.num_classes}")
    size = net.spec.get("image_size")
    if size is not None:
        want = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(ds.image_shape[1:]) != want:
            raise UsageError(f"model {net.spec.get('name')} is built for {want[0]}x{want[1]} images but dataset "
                             f"{ds.name} has {ds.image_shape[1]}x{ds.image_shape[2]}")


def _default_label(model: str, recipe: dict) -> str:
    adv = recipe.get("adv")
    if adv:
        return f"{model} (AT {adv.get('norm', '').upper()} eps={adv.get('eps')})"
    return model


def _hash(config: dict) -> str:
    from epcli.store import config_hash
    return config_hash(config)


# --- attack ---------------------------------------------------------------------------------------------

def attack(*, model: str, attack: str = "pgd", norm: str = "linf", eps: list[float] | str = "8/255",
           dataset: str | None = None, data_dir: str | None = None, n: int | None = None, seed: int = 0,
           grad_mode: str = "bptt", batch_size: int | None = None, labels: str = "true",
           params: dict | None = None, T: int | None = None, device: str | None = None, store: Store,
           argv: list[str] | None = None, checks: bool = True, strength: bool = True,
           unroll_sweep: list[int] | None = None, chunk: int = 1000, progress: Progress = _noop) -> dict:
    """Attack a stored model on the test split for every eps; record accuracy, outcomes and examples.

    The set is attacked in chunks of `chunk` examples whose outcomes are kept under store/partial/ until the
    run finishes, so re-running an interrupted attack with the same arguments resumes where it stopped.
    Reliability checks (monotone in eps, large eps, PGD strength, white-box vs stored black-box results on
    the same points, and the unroll-length sweep when asked) are stored with the result.
    """
    from epcli import attacks
    from epcli.store import config_hash

    device = resolve_device(device)
    eps_list = sorted(set(parse_eps(eps)))
    notes = check_eps(norm, eps_list)
    if attack not in attacks.ATTACKS:
        raise UsageError(f"unknown attack {attack!r}: choose from {', '.join(sorted(attacks.ATTACKS))}")
    if labels not in ("true", "predicted"):
        raise UsageError("labels must be 'true' or 'predicted'")
    params = attacks.resolve_params(attack, params or {})
    net, info = _load_model(store, model, dataset, device)
    if T is not None:
        if not hasattr(net, "T"):
            raise UsageError(f"--T applies to relaxation models; {net.spec['name']} has no relaxation")
        net.T = int(T)
    surrogate, surrogate_info = None, None
    if grad_mode.startswith("transfer:"):
        surrogate, surrogate_info = _load_model(store, grad_mode.split(":", 1)[1], dataset, device)
    elif grad_mode != "bptt" and not hasattr(net, "grad_mode"):
        raise UsageError(f"gradient mode {grad_mode!r} applies to relaxation models only; "
                         f"{net.spec['name']} supports bptt (plain backprop) and transfer:<model>")
    sweep = sorted(set(int(k) for k in unroll_sweep or []))
    if sweep and not hasattr(net, "grad_mode"):
        raise UsageError("--unroll-sweep applies to relaxation models (EP-CNN) only")
    if sweep and attack not in attacks.WHITE_BOX:
        raise UsageError("--unroll-sweep needs a white-box attack (it varies the gradient's unroll length)")
    ds = _dataset_for(store, info, dataset, data_dir)
    x, y, idx = subset(ds.test_x, ds.test_y, n, seed)
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
        _link_model_input(store, run_id, info)
        if surrogate_info:
            _link_model_input(store, run_id, surrogate_info)
        t0 = time.time()
        results = {}
        for gm in modes:
            results[gm] = _attack_in_chunks(
                net, x, y, attack=attack, norm=norm, eps_list=eps_list, batch_size=batch_size or 256,
                device=device, seed=seed, params=params, grad_mode=gm, surrogate=surrogate, labels=labels,
                chunk=chunk, partial=partial / gm.replace(":", "-"),
                progress=lambda d, t, i, gm=gm: progress("attack" if gm == grad_mode else gm, d, t, i))
        res = results[grad_mode]
        flags = []
        if checks:
            flags += [dict(f) for f in attacks.check_reliability([res])]
            if strength and attack == "pgd" and len(y):
                flags.append(_strength(attacks, net, x, y, res, norm, eps_list, params, seed, device, grad_mode,
                                       surrogate, batch_size, labels))
            flags += _cross_run_checks(store, run_id, train_run.get("id"), attack, norm, idx, y, res)
            if sweep:
                flags.append(_unroll_check(results, grad_mode, eps_list, len(y)))
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
        store.log_metrics(run_id, rows)
        store.log_checks(run_id, flags)
        _save_attack_artifacts(store, run_id, res, x, y, idx, eps_list, ds)
        seconds = time.time() - t0
        summary = {"clean_acc": clean, "robust_acc": robust, "unreliable": bool(bad), "reason": reason,
                   "seconds": seconds, **({"unroll_sweep": sweep_out} if sweep_out else {})}
        store.update_run(run_id, summary=summary)
        shutil.rmtree(partial, ignore_errors=True)
    return {"run_id": run_id, "model": net.spec["name"], "model_run_id": train_run.get("id"), "attack": attack,
            "norm": norm, "grad_mode": grad_mode, "n_examples": len(y), "clean_acc": clean,
            "robust_acc": robust, "unroll_sweep": sweep_out, "unreliable": bool(bad), "reason": reason,
            "seconds": round(seconds, 2), "checks": flags, "notes": notes}


def _attack_in_chunks(net, x, y, *, chunk: int, partial: Path, progress, seed: int, **kw) -> dict:
    """attacks.evaluate over consecutive chunks, each chunk's outcome saved so an interrupted run resumes."""
    from safetensors.torch import load_file, save_file
    from epcli import attacks
    partial.mkdir(parents=True, exist_ok=True)
    parts, total = [], len(y)
    for k, start in enumerate(range(0, max(total, 1), chunk)):
        f = partial / f"chunk-{k:05d}.safetensors"
        if f.exists():
            parts.append(_load_chunk(f, load_file))
        else:
            r = attacks.evaluate(net, x[start:start + chunk], y[start:start + chunk], seed=seed + 7919 * k,
                                 keep_adv=16 if k == 0 else 0,
                                 on_batch=lambda d, t, i, s=start: progress(s + d, total, i), **kw)
            _save_chunk(f, r, save_file)
            parts.append(r)
        progress(min(start + chunk, total), total, {})
    return _merge_chunks(parts)


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
              labels) -> dict:
    """PGD with 2x steps and restarts on a subset, at the eps whose robust accuracy is nearest half the clean."""
    clean = float(res["clean_correct"].float().mean())
    e = min(eps_list, key=lambda v: abs(res["robust_accuracy"][v] - clean / 2))
    m = min(len(y), max(50, min(200, len(y) // 10)))
    return dict(attacks.strength_check(net, x, y, norm=norm, eps=e, steps=params.get("steps", 20),
                                       restarts=params.get("restarts", 1), n=m, seed=seed, device=device,
                                       grad_mode=grad_mode, surrogate=surrogate, batch_size=batch_size or 256,
                                       labels=labels))


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


# --- corrupt --------------------------------------------------------------------------------------------

def corrupt(*, model: str, names: list[str] | None = None, severities: list[int] | None = None,
            dataset: str | None = None, data_dir: str | None = None, n: int | None = None, seed: int = 0,
            source: str | None = None, reference: str | None = None, batch_size: int = 500,
            T: int | None = None, device: str | None = None, store: Store, argv: list[str] | None = None,
            progress: Progress = _noop) -> dict:
    """Evaluate a stored model on corruptions x severities (generated, or the official .npy files)."""
    from epcli import corruptions as C

    device = resolve_device(device)
    names = list(names or C.CORRUPTIONS)
    severities = list(severities or [1, 2, 3, 4, 5])
    unknown = [c for c in names if c not in C.CORRUPTIONS]
    if unknown:
        raise UsageError(f"unknown corruption {unknown[0]!r}: choose from {', '.join(C.CORRUPTIONS)}")
    bad = [s for s in severities if s not in (1, 2, 3, 4, 5)]
    if bad:
        raise UsageError(f"severity {bad[0]} is outside 1-5")
    net, info = _load_model(store, model, dataset, device)
    if T is not None and hasattr(net, "T"):
        net.T = int(T)
    train_run = info["train_run"] or {}
    ref_result = None
    if reference:
        ref_result = _corruption_result_of(store, reference)
    ds = None if source else _dataset_for(store, info, dataset, data_dir)
    config = {"model": net.spec["name"], "model_run_id": train_run.get("id"), "corruptions": names,
              "severities": severities, "seed": seed, "n_examples": n, "source": source,
              "dataset": ds.name if ds else f"official:{source}", "reference": reference,
              "T": getattr(net, "T", None)}
    with store.run("corrupt", config, argv=argv, seed=seed, model=net.spec["name"],
                   dataset=config["dataset"], model_run_id=train_run.get("id"),
                   device=describe_device(device)) as run_id:
        _link_model_input(store, run_id, info)
        cells_total = 1 + len(names) * len(severities)
        seen: list = []

        def cb(info: dict) -> None:  # one bar over every (corruption, severity) cell
            what = f"{info['name']}/{info['severity']}" if info.get("name") else "clean"
            if what not in seen:
                seen.append(what)
            done = (len(seen) - 1) * info["total"] + info["done"]
            progress("corrupt", done, cells_total * info["total"], {"cell": what})

        if source:
            clean = None if ds is None else subset(ds.test_x, ds.test_y, n, seed)[:2]
            res = C.evaluate_official(net, source, names=names, severities=severities, batch_size=batch_size,
                                      device=device, on_batch=cb, clean=clean)
            x_grid = None
        else:
            x, y, _ = subset(ds.test_x, ds.test_y, n, seed)
            res = C.evaluate(net, x, y, names=names, severities=severities, seed=seed, batch_size=batch_size,
                             device=device, on_batch=cb)
            x_grid = x[:4]
        summ = C.summarize(res, reference=ref_result, reference_label=reference or "reference")
        pct = lambda v: None if v is None else v / 100.0  # noqa: E731  (the store keeps fractions)
        n_ex = int(next(iter(res["correct"].values())).numel())
        facets = {"dataset": config["dataset"], "split": "test", "model": net.spec["name"], "n_examples": n_ex}
        rows = []
        if summ.get("clean_accuracy") is not None:
            rows.append({"name": "clean_acc", "value": pct(summ["clean_accuracy"]), **facets})
        cells = {(c, int(sv)): pct(a) for c, by_sev in summ["cells"].items() for sv, a in by_sev.items()}
        for (c, sv), acc in cells.items():
            rows.append({"name": "corruption_acc", "value": acc, "corruption": c, "severity": sv, **facets})
        headline = {"clean_acc": pct(summ.get("clean_accuracy")),
                    "corruption_mean_acc": pct(summ.get("mean_accuracy_benchmark")),
                    "corruption_mean_acc_all": pct(summ.get("mean_accuracy_all")),
                    "mce_unnormalized": pct(summ.get("mce_unnormalized")),
                    "relative_mce": pct(summ.get("relative_mce_vs_reference")),
                    "mce_vs_reference": pct(summ.get("mce_vs_reference"))}
        for key, val in headline.items():
            if key != "clean_acc" and val is not None:
                rows.append({"name": key, "value": val, **facets,
                             "detail": {"reference": reference} if "reference" in key or key == "relative_mce"
                             else None})
        store.log_metrics(run_id, rows)
        _save_corruption_artifacts(store, run_id, res, names, severities, x_grid, seed)
        summary = {k: v for k, v in headline.items() if v is not None}
        store.update_run(run_id, summary=summary)
    return {"run_id": run_id, "model": net.spec["name"], "model_run_id": train_run.get("id"),
            "n_examples": n_ex, "clean_acc": headline["clean_acc"], **summary,
            "cells": {f"{c}/{sv}": v for (c, sv), v in cells.items()}}


def _corruption_result_of(store: Store, ref: str) -> dict:
    """The newest corrupt run of a run id or model name, as per-example outcomes (for relative mCE)."""
    from safetensors.torch import load_file
    try:
        run = store.get_run(ref)
        runs = [run] if run["kind"] == "corrupt" else store.runs(kind="corrupt", status="finished",
                                                                  model_run_id=run["id"], limit=1)
    except NotFoundError:
        runs = store.runs(kind="corrupt", status="finished", model=ref, limit=1)
    if not runs:
        raise NotFoundError(f"no finished corruption run for reference {ref!r} (run `epcli corrupt` on it first)")
    arts = store.artifacts_of(runs[0]["id"], role="output", kind="per-example")
    if not arts:
        raise NotFoundError(f"corruption run {runs[0]['id']} has no per-example outcomes")
    t = load_file(str(store.artifact_path(arts[0]["sha256"])))
    correct = {}
    for k, v in t.items():
        if "/" in k:
            c, sv = k.rsplit("/", 1)
            correct[(c, int(sv))] = v.bool()
    return {"clean_correct": t["clean_correct"].bool(), "correct": correct}


def _save_corruption_artifacts(store: Store, run_id, res, names, severities, x_grid, seed) -> None:
    from safetensors.torch import save_file
    outcome = {"clean_correct": res["clean_correct"].to(torch.uint8).cpu()}
    for (c, s), v in res["correct"].items():
        outcome[f"{c}/{s}"] = v.to(torch.uint8).cpu()
    store.write_artifact(run_id, "per-example", lambda p: save_file(outcome, str(p)), suffix=".safetensors")
    if x_grid is not None:
        from epcli import corruptions as C
        from torchvision.utils import save_image
        grid = C.sample_grid(x_grid, names, severities, seed)
        store.write_artifact(run_id, "corruption-grid",
                             lambda p: save_image(grid.float() / 255 if grid.dtype == torch.uint8 else grid,
                                                  str(p)),
                             suffix=".png", meta={"corruptions": names, "severities": severities})


def export_corruptions(*, directory: str, names: list[str] | None = None, dataset: str | None = None,
                       data_dir: str | None = None, n: int | None = None, seed: int = 0,
                       store: Store) -> dict:
    """Write a generated CIFAR-10-C-style set (.npy per corruption + labels.npy) to `directory`."""
    from epcli import corruptions as C
    names = list(names or C.CORRUPTIONS)
    ds = load_dataset(dataset, data_dir=data_dir, cache_dir=store.cache_dir)
    x, y, _ = subset(ds.test_x, ds.test_y, n, seed)
    C.export(directory, x, y, names=names, seed=seed)
    return {"directory": str(directory), "corruptions": names, "n_examples": len(y), "seed": seed}


# --- report ---------------------------------------------------------------------------------------------

def report(*, store: Store, models: list[str] | None = None, runs: list[str] | None = None,
           dataset: str | None = None, fmt: str = "table", out: str | None = None, figures: bool = False,
           argv: list[str] | None = None) -> dict:
    """Collect the store's results; render them; optionally write figures and a self-contained HTML file."""
    from epcli import report as R
    data = R.collect(store, models=models, runs=runs, dataset=dataset)
    text = None if fmt == "table" else R.render(data, fmt)
    written = []
    if out or figures:
        out_dir = Path(out or store.root / "reports")
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {"models": models, "runs": runs, "dataset": dataset, "format": fmt, "out": str(out_dir)}
        with store.run("report", config, argv=argv) as run_id:
            figs = R.figures(data, out_dir) if figures or fmt == "html" else []
            if figs:
                figs += _corruption_samples(store, data, out_dir)
            files = list(figs)
            if text is not None and fmt != "html":  # the html page is written once, below, with figures
                ext = {"robustbench": "json"}.get(fmt, fmt)
                f = out_dir / f"report.{ext}"
                f.write_text(text)
                files.append(f)
            if fmt == "html" or figures:
                f = out_dir / "report.html"
                f.write_text(R.html_report(data, figs))
                files.append(f)
            for f in files:
                store.add_file(run_id, "report", f, name=f.name)
            for rid in _source_run_ids(data):
                for a in store.artifacts_of(rid, role="output")[:1]:
                    store.link(run_id, a["sha256"], "input", "source")
            written = [str(f) for f in files]
        return {"run_id": run_id, "files": written, "data": data, "text": text}
    return {"run_id": None, "files": [], "data": data, "text": text}


def _corruption_samples(store: Store, data, out_dir: Path) -> list[Path]:
    """The newest corruption sample grid among the reported models, copied next to the figures."""
    import shutil
    for rid in _source_run_ids(data):
        for run in store.runs(kind="corrupt", status="finished", model_run_id=rid, limit=1):
            arts = store.artifacts_of(run["id"], role="output", kind="corruption-grid")
            if arts:
                dest = out_dir / "corruption-samples.png"
                shutil.copyfile(store.artifact_path(arts[-1]["sha256"]), dest)
                return [dest]
    return []


def _source_run_ids(data) -> list[str]:
    ids = []
    for row in getattr(data, "rows", []) or []:
        rid = getattr(row, "run_id", None)
        if rid:
            ids.append(rid)
    return ids


# --- demo -----------------------------------------------------------------------------------------------

DEMO = {
    "models": [("ep-cnn-small", "demo-ep", "EP-CNN (small)"), ("cnn-small", "demo-cnn", "CNN (small)")],
    "attacks": [("pgd", "linf", "1/255,2/255,4/255,8/255"), ("pgd", "l2", "0.125,0.25,0.5,1.0")],
    "corruptions": ["gaussian_noise", "defocus_blur", "fog", "contrast", "jpeg_compression"],
    "n_attack": 200,
    "n_corrupt": 500,
    "dataset": None,  # the embedded real CIFAR-10 subset
    "overrides": {},  # recipe overrides for every demo model (tests shrink the epochs)
}


def demo(*, store: Store, device: str | None = None, progress: Progress = _noop,
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


# --- paired comparison ----------------------------------------------------------------------------------

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
