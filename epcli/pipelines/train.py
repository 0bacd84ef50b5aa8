"""`epcli train`: one recorded training run, checkpointed every epoch into the store."""

from __future__ import annotations

from pathlib import Path

import torch

from epcli import checkpoint
from epcli.data import Dataset, load_dataset
from epcli.errors import CheckpointError, EpcliError, UsageError
from epcli.pipelines.common import (
    Progress,
    check_numbers,
    dataset_ref,
    drop_artifact,
    link_model_input,
    no_progress,
    resolve_device,
    resolve_model,
)
from epcli.store import Store, config_hash, describe_device


def train(*, model: str, dataset: str | None = None, data_dir: str | None = None, recipe: str | None = None,
          overrides: dict | None = None, model_options: dict | None = None, seed: int = 0,
          device: str | None = None, store: Store | None, resume: str | None = None, label: str | None = None,
          argv: list[str] | None = None, progress: Progress = no_progress) -> dict:
    """Train `model` on `dataset` with a recipe; checkpoint every epoch into the store.

    Under torchrun every process calls this with the same arguments and trains one model data-parallel
    (docs/distributed.md): only rank 0 uses `store` (others may pass None), resolves a resume and records the
    run; the device is cuda:LOCAL_RANK for any CUDA request; every rank returns rank 0's result.
    """
    from epcli import distributed as dist
    from epcli import train as training
    from epcli.models import build_from_spec, create_model

    check_numbers(seed=seed, **_numeric_overrides(overrides or {}, model_options or {}))
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
        try:
            net = create_model(model, num_classes=ds.num_classes, **(model_options or {}))
        except (TypeError, ValueError) as e:  # a --model-set value the constructor cannot use
            raise UsageError(f"model {model!r}: bad option value ({e})") from None
        model_name = model
        rec_name = recipe or training.default_recipe(model, ds.name)
        rec = training.resolve_recipe(rec_name, overrides or {})
        rec.setdefault("name", rec_name)
    _check_fits(net, ds)
    if distributed:
        dist.broadcast_object({"spec": net.spec, "recipe": rec, "seed": seed, "state": state})
    config = {"model": model_name, "spec": net.spec, "dataset": ds.name, "dataset_sha256": ds.sha256,
              "dataset_ref": dataset_ref(dataset), "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
              "recipe": rec, "seed": seed, "label": label or _default_label(model_name, rec),
              "world_size": dist.world_size()}
    if resume_info:
        config["resumed_from"] = (resume_info["train_run"] or {}).get("id") or str(resume_info["path"])
    with store.run("train", config, argv=argv, seed=seed, model=model_name, dataset=ds.name,
                   device=describe_device(device)) as run_id:
        if resume_info:
            link_model_input(store, run_id, resume_info)
        last_sha: list[str] = []
        history: list[dict] = []

        def on_epoch(epoch: int, metrics: dict, st: dict) -> None:
            tensors, scalars = training.state_to_tensors(st)
            meta = {"run_id": run_id, "config_sha256": config_hash(config), "epoch": epoch, "dataset": ds.name,
                    "classes": ds.classes, "num_classes": ds.num_classes, "config": config,
                    "train_state": scalars}
            sha = store.write_artifact(
                run_id, "checkpoint", lambda p: checkpoint.save(p, net, meta=meta, train_tensors=tensors),
                suffix=".safetensors", name="last", meta={"epoch": epoch})
            for old in last_sha:  # keep one checkpoint per run: the newest good one
                if old != sha:
                    drop_artifact(store, run_id, old)
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
        if not last_sha and resume_info:  # killed after its last epoch's checkpoint: that checkpoint is final
            last_sha[:] = [_adopt_final(store, run_id, resume_info, history)]
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


def _adopt_final(store: Store, run_id: str, resume_info: dict, history: list[dict]) -> str:
    """Resuming a checkpoint that already holds every epoch: record it as this run's final output (with the
    test accuracy its run logged) instead of failing with nothing to do."""
    sha = resume_info["sha256"] or store.register_external(run_id, "checkpoint", resume_info["path"], "input",
                                                            "checkpoint")
    store.link(run_id, sha, "output", "final")
    source = (resume_info["train_run"] or {}).get("id")
    accs = store.metrics(source, name="test_acc") if source else []
    epoch = resume_info["meta"].get("epoch")
    history.append({"epoch": epoch, **({"test_acc": accs[-1]["value"]} if accs else {})})
    return sha


def _numeric_overrides(overrides: dict, model_options: dict) -> dict:
    """The numeric recipe and model options a user can set, for check_numbers (NaN, <= 0, wrong type)."""
    ep = overrides.get("ep") if isinstance(overrides.get("ep"), dict) else {}
    opt = overrides.get("optimizer") if isinstance(overrides.get("optimizer"), dict) else {}
    out = {k: overrides.get(k) for k in ("epochs", "batch_size", "eval_batch_size")}
    out.update({"lr": opt.get("lr"), "T1": ep.get("T1"), "T2": ep.get("T2"), "beta": ep.get("beta"),
                "T": model_options.get("T")})
    return out


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


