"""`epcli train`: one recorded training run, checkpointed every epoch into the store."""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import torch

from epcli import checkpoint
from epcli.data import Dataset, dataset_name, load_dataset
from epcli.errors import CheckpointError, EpcliError, UsageError
from epcli.pipelines.common import (
    Progress,
    check_model_takes,
    check_not_blank,
    check_numbers,
    dataset_ref,
    drop_artifact,
    link_model_input,
    no_progress,
    resolve_device,
    resolve_model,
)
from epcli.store import Store, config_hash, describe_device

DEFAULT_MODEL = "ep-cnn-small"  # what `epcli train` trains when no --model is given


def train(*, model: str | None = None, dataset: str | None = None, data_dir: str | None = None,
          recipe: str | None = None,
          overrides: dict | None = None, model_options: dict | None = None, seed: int | None = None,
          device: str | None = None, store: Store | None, resume: str | None = None, label: str | None = None,
          argv: list[str] | None = None, progress: Progress = no_progress, select: str | None = None,
          teacher: str | None = None) -> dict:
    """Train `model` on `dataset` with a recipe; checkpoint every epoch into the store.

    select: which epoch's weights become the run's "final" checkpoint (what attack/corrupt/report use):
    "last" (default), "best-val" (best accuracy on a seeded held-out 10% of the training set, not trained on) or
    "best-test" (the paper's choice: best test accuracy, i.e. selected on the test set; labelled in reports).
    It is stored in the config as `select`; the newest epoch stays as checkpoint "last" for --resume.

    teacher: for `ep-student` (the default model when a teacher is given): the EP-CNN to distil, as a run id, a
    registry name (its newest finished training run) or a .safetensors path. It must have been trained on the
    dataset asked for (by default the teacher's own); the student copies its architecture, and the run records
    the teacher's checkpoint as an input (lineage) and in its config (`teacher`, `recipe.distill.teacher`).

    Under torchrun every process calls this with the same arguments and trains one model data-parallel
    (docs/distributed.md): only rank 0 uses `store` (others may pass None), resolves a resume and records the
    run; the device is cuda:LOCAL_RANK for any CUDA request; every rank returns rank 0's result.
    """
    from epcli import distributed as dist
    from epcli import train as training
    from epcli.models import build_from_spec, create_model

    if select is not None and select not in training.SELECTS:
        raise UsageError(f"unknown --select {select!r}: use {', '.join(training.SELECTS)}")
    check_numbers(seed=seed, **_numeric_overrides(overrides or {}, model_options or {}))
    check_not_blank(**{"--model": model, "--dataset": dataset, "--data-dir": data_dir, "--recipe": recipe,
                       "--resume": resume, "--label": label, "--teacher": teacher})
    if label is not None and any(unicodedata.category(c) == "Cc" for c in label):  # reports would print it raw
        raise UsageError(f"--label {label!r} has a control character or line break: give one line of text")
    # a resume takes the model and seed from its checkpoint: a different one is refused
    given_model, given_seed, given_dataset = model, seed, dataset
    if resume and teacher:
        raise UsageError("--resume continues a run with its own teacher; drop --teacher")
    if not resume:
        model, seed = model or (STUDENT_MODEL if teacher else DEFAULT_MODEL), 0 if seed is None else seed
        _check_teacher_flag(model, teacher)
    if resume:  # a resume continues the run as it was configured: other settings would be silently ignored
        changed = sorted(_dotted({k: v for k, v in (overrides or {}).items() if k != "epochs"}))
        ignored = ([f"--recipe {recipe}"] if recipe else []) + (["--model-set"] if model_options else []) + \
            ([f"the recipe changes ({', '.join(changed)})"] if changed else [])
        if ignored:
            raise UsageError(f"--resume continues a run with its own recipe and model; drop {', '.join(ignored)} "
                             "(only --epochs, --dataset/--data-dir and --label may be given)")
    if "num_classes" in (model_options or {}):
        raise UsageError("--model-set num_classes: the number of classes comes from the dataset")
    device = dist.device_for(resolve_device(device))
    distributed = dist.init(device)  # False outside torchrun
    main = dist.is_main()
    if main and store is None:
        raise UsageError("train needs a store")
    # rank 0 loads first (it may download or decode into the store's cache); the others then read that cache
    cache_dir = dist.broadcast_object(str(store.cache_dir) if main else None)
    if main and not resume and not model.startswith("timm:"):
        from epcli.models import list_models
        if model not in list_models():
            create_model(model)  # an unknown name fails here, before any data is read
    if main and not resume:  # the recipe as it will resolve, checked before a large dataset is decoded
        planned_name = recipe or training.default_recipe(model, dataset_name(dataset))
        planned = training.resolve_recipe(planned_name, overrides or {})
        if teacher and not planned.get("distill"):
            raise UsageError(f"recipe {planned_name} has no distill section: a student learns from its teacher with "
                             "a distillation recipe such as distill-ep")
    teacher_info = teacher_net = None
    if main and not resume and teacher:  # resolved and loaded before the data: a bad teacher reads nothing
        teacher_info, teacher_net = _load_teacher(store, teacher, dataset, device)
        if dataset is None:  # by default the student learns on the teacher's own data
            cfg = _teacher_config(teacher_info)
            dataset, data_dir = cfg.get("dataset_ref") or cfg.get("dataset"), data_dir or cfg.get("data_dir")
    if teacher and not resume and given_dataset is None:  # every rank loads what rank 0 chose
        dataset, data_dir = dist.broadcast_object((dataset, data_dir) if main else None)
    if resume and dataset is None:  # resume on the dataset the checkpoint was trained on (rank 0 reads it)
        if main:
            cfg = (resolve_model(store, resume).get("meta") or {}).get("config") or {}
            dataset, data_dir = cfg.get("dataset_ref"), data_dir or cfg.get("data_dir")
        dataset, data_dir = dist.broadcast_object((dataset, data_dir) if main else None)
    if main:
        progress("load", 0, 1, {"dataset": dataset or "cifar10-mini"})
    ds = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir) if main else None
    if main:
        progress("load", 1, 1, {"dataset": ds.name, "train": len(ds.train_y), "test": len(ds.test_y)})
    dist.barrier()
    if not main:
        ds = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir)
    if dist.broadcast_object(ds.sha256) != ds.sha256:
        raise UsageError(f"rank {dist.rank()} loaded a different {ds.name} than rank 0 (dataset_sha256 differs)")
    if not main:  # rank 0 resolves the model, recipe and any resume state, and hands them over
        plan = dist.broadcast_object(None)
        net = build_from_spec(plan["spec"])
        _check_fits(net, ds)
        tnet = checkpoint.load(plan["teacher"], device=device)[0] if plan.get("teacher") else None
        training.fit(net, ds, plan["recipe"], device=device, seed=plan["seed"], state=plan["state"],
                     select=plan.get("select", "last"), teacher=tnet)
        return dist.broadcast_object(None)
    state, resume_info = None, None
    if resume:
        resume_info = resolve_model(store, resume, ds.name)
        if resume_info["train_run"]:  # resume from the newest epoch, not from the selected one
            arts = store.artifacts_of(resume_info["train_run"]["id"], role="output", kind="checkpoint")
            def epoch_of(a):
                meta = json.loads(a["meta"]) if isinstance(a["meta"], str) else a["meta"] or {}
                return meta.get("epoch", -1)
            if arts:
                newest = max(arts, key=epoch_of)
                resume_info = {**resume_info, "path": store.artifact_path(newest["sha256"]),
                               "sha256": newest["sha256"]}
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
        if given_model is not None and given_model != model_name:
            raise UsageError(f"cannot resume a {model_name} run as --model {given_model}")
        if given_seed is not None and given_seed != config.get("seed", 0):
            raise UsageError(f"cannot resume with --seed {given_seed}: the run was seeded {config.get('seed', 0)}")
        rec = config["recipe"]
        done = int(state.get("epoch", 0))
        if overrides and "epochs" in overrides:
            if overrides["epochs"] < done:
                raise UsageError(f"--epochs {overrides['epochs']}: the run has already trained {done} epochs")
            rec = {**rec, "epochs": overrides["epochs"]}
        train_run = resume_info.get("train_run")
        if train_run and train_run["status"] == "finished" and done >= int(rec.get("epochs") or 0):
            # nothing would train: a new run adopting the same checkpoint would only duplicate the model's row
            raise UsageError(f"run {train_run['id']} finished all its {done} epochs: nothing to resume (its "
                             f"checkpoint is final; --epochs N with N > {done} trains on)")
        seed = config.get("seed", 0)
        if select is not None and select != config.get("select", "last"):
            raise UsageError(f"cannot resume with --select {select}: the run selects {config.get('select', 'last')}")
        select = config.get("select", "last")
        if rec.get("distill"):  # the same teacher checkpoint as the run started with
            teacher_info, teacher_net = _load_teacher(store, _recorded_teacher(config), None, device)
    else:
        torch.manual_seed(int(seed))  # the initial weights follow --seed too (rank 0's are broadcast)
        student_of = {}
        if teacher_net is not None:
            _check_teacher_data(teacher, teacher_info, teacher_net, ds)
            student_of = {"teacher_spec": teacher_net.spec}
        try:
            with warnings.catch_warnings(record=True) as caught:  # torch warns of zero-size layers: said below
                warnings.simplefilter("always")
                net = create_model(model, num_classes=ds.num_classes, **(model_options or {}), **student_of)
        except (TypeError, ValueError, ArithmeticError) as e:  # a --model-set value the constructor cannot use
            raise UsageError(f"model {model!r}: bad option value ({e})") from None
        except RuntimeError as e:  # torch refusing the shapes (a negative width) or the memory (a huge one)
            raise UsageError(f"model {model!r}: cannot build it with these options "
                             f"({' '.join(str(e).split())[:200]})") from None
        empty = [name for name, p in net.named_parameters() if p.numel() == 0]
        if empty:
            raise UsageError(f"model {model!r}: these options leave layer {empty[0]} with no weights")
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        model_name = model
        rec_name = recipe or training.default_recipe(model, ds.name)
        rec = training.resolve_recipe(rec_name, overrides or {})
        rec.setdefault("name", rec_name)
        if teacher_info is not None:  # the reference as resolved: a resume finds the same teacher
            rec["distill"]["teacher"] = _teacher_ref(teacher_info)
    _check_fits(net, ds)
    if not resume and bool(rec.get("ep")) != training._is_ep(net):
        raise UsageError(f"EP settings (recipe {rec.get('name')}, --T1, --T2, --beta, --rule or --set ep.*) apply to "
                         f"EP models; {model_name} trains by backprop (drop them, or --set ep=null)" if rec.get("ep")
                         else f"{model_name} trains by EP, but recipe {rec.get('name')} has no ep settings (use an EP "
                         "recipe such as demo-ep; --set ep=null is for backprop models)")
    select = select or "last"
    # before the run opens: a bad recipe is a usage error
    training.check_plan(net, rec, len(ds.train_y), select, sample=ds.train_x[:2], teacher=teacher_net)
    if distributed:
        dist.broadcast_object({"spec": net.spec, "recipe": rec, "seed": seed, "state": state, "select": select,
                               "teacher": str(teacher_info["path"]) if teacher_info else None})
    config = {"model": model_name, "spec": net.spec, "dataset": ds.name, "dataset_sha256": ds.sha256,
              "dataset_ref": dataset_ref(dataset), "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
              "recipe": rec, "seed": seed, "label": label or _default_label(model_name, rec, teacher_info),
              "world_size": dist.world_size(), "select": select}
    if teacher_info is not None:
        config["teacher"] = _teacher_record(teacher_info, teacher_net)
    if resume_info:
        config["resumed_from"] = (resume_info["train_run"] or {}).get("id") or str(resume_info["path"])
    with store.run("train", config, argv=argv, seed=seed, model=model_name, dataset=ds.name,
                   device=describe_device(device)) as run_id:
        if resume_info:
            link_model_input(store, run_id, resume_info)
        if teacher_info is not None:  # lineage: the teacher's checkpoint is an input of the student's run
            if teacher_info["sha256"]:
                store.link(run_id, teacher_info["sha256"], "input", "teacher")
            else:
                store.register_external(run_id, "checkpoint", teacher_info["path"], "input", "teacher")
        last_sha: list[str] = []
        history: list[dict] = []
        score_key = {"best-val": "val_acc", "best-test": "test_acc"}.get(select)
        best: dict = {"sha": None, "score": None, "epoch": None}
        if score_key and state is not None:  # a resumed run: the best so far is in the history and the store
            olds = [a for a in store.artifacts_of(resume_info["train_run"]["id"], role="output", kind="checkpoint")
                    if a["name"] == "best"] if resume_info.get("train_run") else []
            done = [h for h in state.get("history", []) if h.get(score_key) is not None]
            if olds and done:
                top = max(done, key=lambda h: h[score_key])
                best.update(sha=olds[-1]["sha256"], score=top[score_key], epoch=top["epoch"])
                store.link(run_id, best["sha"], "output", "best")

        def on_epoch(epoch: int, metrics: dict, st: dict) -> None:
            tensors, scalars = training.state_to_tensors(st)
            meta = {"run_id": run_id, "config_sha256": config_hash(config), "epoch": epoch, "dataset": ds.name,
                    "classes": ds.classes, "num_classes": ds.num_classes, "config": config,
                    "train_state": scalars}
            sha = store.write_artifact(
                run_id, "checkpoint", lambda p: checkpoint.save(p, net, meta=meta, train_tensors=tensors),
                suffix=".safetensors", name="last", meta={"epoch": epoch})
            for old in last_sha:  # keep the newest good checkpoint (and the best one when selecting)
                if old != sha and old != best["sha"]:
                    drop_artifact(store, run_id, old)
            last_sha[:] = [sha]
            if score_key and (best["score"] is None or metrics[score_key] > best["score"]):
                if best["sha"] and best["sha"] != sha:
                    drop_artifact(store, run_id, best["sha"])
                best.update(sha=sha, score=metrics[score_key], epoch=epoch)
                store.link(run_id, sha, "output", "best")
            rows = [{"name": k, "value": float(v), "step": epoch, "dataset": ds.name, "model": model_name,
                     "split": {"test_acc": "test", "val_acc": "val"}.get(k, "train"),
                     **({"n_examples": len(ds.test_y)} if k == "test_acc" else {})}  # the whole test split
                    for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            store.log_metrics(run_id, rows)
            history.append({"epoch": epoch, **metrics})
            # the epoch's last step (its test evaluation) ends with its metrics; then the next epoch starts
            steps = per_epoch[0] + 1
            shown = {k: v for k, v in metrics.items() if k not in ("epoch", "seconds")}
            progress(f"epoch {epoch}/{n_epochs}", steps, steps, shown)
            progress("training", epoch - first, n_epochs - first, {"test_acc": metrics.get("test_acc")})
            if epoch < n_epochs:
                progress(f"epoch {epoch + 1}/{n_epochs}", 0, steps, {})

        # Progress: "training" counts epochs (fractions within one, so the ETA is the whole run's); each
        # "epoch k/N" counts its batches plus one step for the test evaluation.
        n_epochs, first = int(rec["epochs"]), int((state or {}).get("epoch", 0))
        per_epoch = [_batches_per_epoch(rec, len(ds.train_y))]

        def on_batch(done: int, total: int, info: dict) -> None:
            per_epoch[0] = total
            e = int(info.get("epoch", first + 1))
            extra = {"status": "testing"} if done >= total else {}
            progress(f"epoch {e}/{n_epochs}", done, total + 1, {"loss": info.get("loss"), **extra})
            progress("training", e - 1 - first + done / (total + 1), n_epochs - first, {})

        if first < n_epochs:
            progress("training", 0, n_epochs - first, {})
            progress(f"epoch {first + 1}/{n_epochs}", 0, per_epoch[0] + 1, {})
        training.fit(net, ds, rec, device=device, seed=seed, state=state, on_epoch=on_epoch, on_batch=on_batch,
                     select=select, teacher=teacher_net)
        if not last_sha and resume_info:  # killed after its last epoch's checkpoint: that checkpoint is final
            last_sha[:] = [_adopt_final(store, run_id, resume_info, history)]
        if not last_sha:
            raise EpcliError("training ran no epoch (epochs must be >= 1, or the checkpoint was already final)")
        final_sha = best["sha"] if score_key else last_sha[0]
        final_epoch = best["epoch"] if score_key else (history[-1]["epoch"] if history else None)
        if final_sha == last_sha[0]:
            store.db["run_artifacts"].update((run_id, final_sha, "output"), {"name": "final"})
        else:  # the selected epoch is "final"; the newest stays "last" for --resume
            store.db["run_artifacts"].delete((run_id, best["sha"], "output"))
            store.link(run_id, final_sha, "output", "final")
        chosen = next((h for h in history if h["epoch"] == final_epoch), None) if history else None
        if chosen is None and state is not None:
            chosen = next((h for h in state.get("history", []) if h.get("epoch") == final_epoch), None)
        summary = {"test_acc": (chosen or {}).get("test_acc"), "epochs": len(history), "select": select,
                   "selected_epoch": final_epoch}
        if score_key == "val_acc":
            summary["val_acc"] = (chosen or {}).get("val_acc")
        store.update_run(run_id, summary=summary)
    result = {"run_id": run_id, "model": model_name, "dataset": ds.name, "checkpoint": final_sha,
              "test_acc": summary["test_acc"], "epochs": rec["epochs"], "label": config["label"],
              "select": select, "selected_epoch": final_epoch, "history": history,
              **({"teacher": config["teacher"]} if config.get("teacher") else {})}
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


def _batches_per_epoch(rec: dict, n: int) -> int:
    """The batch count fit() will report (used only to size the first progress bar before it starts)."""
    import math
    bs = max(1, int(rec.get("batch_size") or 1))
    return n // bs if rec.get("drop_last") and n >= bs else math.ceil(n / bs)


def _numeric_overrides(overrides: dict, model_options: dict) -> dict:
    """The numeric recipe and model options a user can set, for check_numbers (NaN, <= 0, wrong type)."""
    ep = overrides.get("ep") if isinstance(overrides.get("ep"), dict) else {}
    opt = overrides.get("optimizer") if isinstance(overrides.get("optimizer"), dict) else {}
    out = {k: overrides.get(k) for k in ("epochs", "batch_size", "eval_batch_size")}
    out.update({"lr": opt.get("lr"), "T1": ep.get("T1"), "T2": ep.get("T2"), "beta": ep.get("beta"),
                "T": model_options.get("T")})
    return out


def _dotted(overrides: dict, prefix: str = "") -> list[str]:
    """{"optimizer": {"lr": 1}} -> ["optimizer.lr"]: the recipe keys an override dict sets."""
    out = []
    for k, v in overrides.items():
        out += _dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
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
    check_model_takes(net, ds.train_x, ds.name)


def _default_label(model: str, recipe: dict, teacher_info: dict | None = None) -> str:
    if teacher_info is not None:
        return f"EP-student (distilled from {_teacher_label(teacher_info)})"
    adv = recipe.get("adv")
    if adv:
        return f"{model} (AT {adv.get('norm', '').upper()} eps={adv.get('eps')})"
    return model




# --- distillation: the teacher of an ep-student ------------------------------------------------------------

STUDENT_MODEL = "ep-student"  # what `epcli train --teacher T` trains when no --model is given


def _is_student(model: str) -> bool:
    from epcli.models import list_models, model_info
    return model in list_models() and "student" in model_info(model)["tags"]


def _check_teacher_flag(model: str, teacher: str | None) -> None:
    """--teacher goes with a student model, and a student model needs one (its layers copy the teacher's)."""
    if teacher and not _is_student(model):
        raise UsageError(f"--teacher is for --model {STUDENT_MODEL} (a feed-forward net distilled from an EP-CNN); "
                         f"{model} does not learn from a teacher")
    if not teacher and _is_student(model):
        raise UsageError(f"--model {model} is distilled from an EP-CNN: give --teacher with its training run id, "
                         "its model name (the newest finished run) or a .safetensors checkpoint")


def _teacher_config(info: dict) -> dict:
    return (info["train_run"] or {}).get("config") or (info["meta"] or {}).get("config") or {}


def _teacher_label(info: dict) -> str:
    cfg = _teacher_config(info)
    run_id = (info["train_run"] or {}).get("id")
    name = cfg.get("label") or cfg.get("model") or (info["meta"].get("spec") or {}).get("name") or "?"
    return f"{name} {run_id[:10]}" if run_id else str(name)


def _teacher_ref(info: dict) -> str:
    return (info["train_run"] or {}).get("id") or str(Path(info["path"]).resolve())


def _teacher_record(info: dict, net) -> dict:
    """What the student's config says about its teacher."""
    cfg = _teacher_config(info)
    return {"run_id": (info["train_run"] or {}).get("id"), "sha256": info["sha256"],
            "path": None if info["sha256"] else str(Path(info["path"]).resolve()),
            "model": cfg.get("model") or net.spec.get("name"), "label": _teacher_label(info),
            "dataset": cfg.get("dataset"), "T": getattr(net, "T", None), "tol": getattr(net, "tol", None)}


def _recorded_teacher(config: dict) -> str:
    """A resumed student's teacher: the file its run recorded (given as a file: it may be another epoch than
    the final checkpoint of the run its metadata names) while it exists, else the training run (its final
    checkpoint)."""
    t = config.get("teacher") or {}
    if t.get("path") and Path(t["path"]).is_file():
        return str(t["path"])
    ref = t.get("run_id") or t.get("path") or ((config.get("recipe") or {}).get("distill") or {}).get("teacher")
    if not ref:
        raise CheckpointError("this distillation run does not record its teacher")
    return ref


def _load_teacher(store: Store, ref: str, dataset: str | None, device: str):
    """Resolve a teacher reference like `epcli attack --model` does, load it on the device and check that it is
    an EP-CNN. Returns (resolve_model's info, the model)."""
    from epcli import train as training
    key = dataset if (dataset and Path(dataset).exists()) else (dataset_name(dataset) if dataset else None)
    info = resolve_model(store, ref, key)
    # a run id or a name must name a finished teacher; a checkpoint file given as such is the user's choice
    if info["train_run"] is not None and info["train_run"]["status"] != "finished" and not Path(ref).is_file():
        raise UsageError(f"teacher run {info['train_run']['id']} is {info['train_run']['status']}, not finished "
                         "(to distil from its last checkpoint anyway, give that .safetensors file)")
    net, _ = checkpoint.load(info["path"], device=device)
    if not training._is_ep(net):
        raise UsageError(f"teacher {ref} is not an EP-CNN but a {net.spec.get('name')}: an ep-student is distilled "
                         "from an EP-CNN's fixed points (train one with `epcli train --model ep-cnn-small`)")
    return info, net.eval()


def _check_teacher_data(ref: str, info: dict, net, ds: Dataset) -> None:
    """The teacher was trained on this dataset: same data, classes in the same order, same image size."""
    cfg = _teacher_config(info)
    meta = info["meta"] or {}
    if cfg.get("dataset_sha256") and cfg["dataset_sha256"] != ds.sha256:
        where = cfg.get("dataset") or "another dataset"
        same = " (another copy or version of it)" if where == ds.name else ""
        raise UsageError(f"teacher {ref} was trained on {where}, not on {ds.name}{same}: distil on the teacher's "
                         "data (leave --dataset out)")
    classes = meta.get("classes")
    if classes and list(classes) != list(ds.classes):
        raise UsageError(f"teacher {ref} has the classes {', '.join(map(str, classes[:3]))}..., dataset {ds.name} "
                         f"{', '.join(map(str, ds.classes[:3]))}...: a student learns its teacher's classes")
    n = net.spec.get("num_classes")
    if n != ds.num_classes:
        raise UsageError(f"teacher {ref} has {n} classes, dataset {ds.name} has {ds.num_classes}")
    size = net.spec.get("image_size")
    want = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if tuple(ds.image_shape[1:]) != want:
        raise UsageError(f"teacher {ref} takes {want[0]}x{want[1]} images, dataset {ds.name} has "
                         f"{ds.image_shape[1]}x{ds.image_shape[2]}")
