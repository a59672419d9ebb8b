"""Fine-tuning one model on one task with one seed (distil finetune), through the training engine: everything
task-specific (head, features, loss, decoding, metrics) is asked of the `Task`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from distilbert_cli.artifacts import FinetuneRun
from distilbert_cli.downstream.prediction import VALIDATION, encode_splits, scored_splits
from distilbert_cli.downstream.task_models import check_length, forward_inputs, load_soft_teacher, load_task_model
from distilbert_cli.downstream.task_training import finish_run, held_out_validation, train_task_model
from distilbert_cli.models.loading import load_tokenizer
from distilbert_cli.tasks.base import Task, TaskData
from distilbert_cli.training.engine import open_tracker

if TYPE_CHECKING:
    from distilbert_cli.schema import FinetuneSettings
    from distilbert_cli.schema import Task as TaskSettings

log = logging.getLogger(__name__)


def finetune_one(ft: FinetuneSettings, settings: TaskSettings, logger, task: Task, data: TaskData, name: str,
                 source: str, seed: int, epochs: int, accelerator, out: FinetuneRun, soft_teacher,
                 trust_remote_code: bool) -> tuple[object, dict]:
    """Fine-tune `source` on `task` with `seed` (settings `ft`, a finetune config section; `settings`, the task
    section) on `data` (train, the held-out split when ft.eval_every is set, and the scored splits); write model/,
    predictions, metrics.jsonl and metrics.json into `out`; return the fine-tuned model and metrics.json's payload.
    `soft_teacher` (a model, a path or None) gives the "(D)" soft targets."""
    from accelerate.utils import set_seed
    from transformers import DataCollatorWithPadding

    soft = ft.soft_targets
    set_seed(seed)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, role=f"model {name}")
    model = load_task_model(source, task, data.label_names, trust_remote_code, f"model {name}")
    if isinstance(soft_teacher, str):
        soft_teacher = load_soft_teacher(soft_teacher, task, data.label_names, model.config, trust_remote_code)
    length, setting = task.input_length(settings)
    for role, checked in ((f"model {name}", model), ("the soft-target teacher", soft_teacher)):
        if checked is not None:
            check_length(checked, length, setting, role)
    needed = forward_inputs(model) | (forward_inputs(soft_teacher) if soft_teacher is not None else set())
    with_types = "token_type_ids" in needed
    train = task.encode(data.splits["train"], tokenizer, settings, with_types, training=True)
    dev = encode_splits(task, data, scored_splits(data), tokenizer, settings, with_types)
    eval_batch = ft.batch_size // accelerator.num_processes
    validation = held_out_validation(task, data, tokenizer, settings, with_types, eval_batch, accelerator)
    if soft_teacher is not None:
        soft_teacher = accelerator.prepare_model(soft_teacher, evaluation_mode=True)
    teacher_inputs = forward_inputs(accelerator.unwrap_model(soft_teacher)) if soft_teacher is not None else set()

    def make_loss(prepared):
        student_inputs = forward_inputs(accelerator.unwrap_model(prepared))

        def loss(batch: dict) -> dict:
            outputs = task.outputs(prepared(**{k: v for k, v in batch.items() if k in student_inputs}))
            task_loss = task.loss(outputs, batch)
            if soft_teacher is None:
                return {"task": task_loss, "loss": task_loss}
            with torch.no_grad():
                teacher_outputs = task.outputs(soft_teacher(**{k: v for k, v in batch.items() if k in teacher_inputs}))
            soft_loss = task.soft_target_loss(outputs, teacher_outputs, soft.temperature)
            total = soft.alpha_task * task_loss + soft.alpha_ce * soft_loss
            return {"task": task_loss, "soft": soft_loss, "loss": total}
        return loss

    out.path.mkdir(parents=True, exist_ok=True)
    description = f"{name} {task.name} seed {seed}"
    tracker = open_tracker(logger, out.path, f"finetune/{description}", {"model": name, "task": task.name,
                           "seed": seed, "finetune": ft.model_dump(mode="json")}, accelerator.is_main_process)
    try:
        trained, steps = train_task_model(
            model, train, DataCollatorWithPadding(tokenizer), make_loss, ft, "finetune", seed,
            lambda steps_per_epoch: epochs * steps_per_epoch, accelerator, out.checkpoints, out.loss_log, description,
            {"model": name, "source": source, "task": task.name, "seed": seed, "epochs": epochs,
             "soft_targets": soft.model_dump() if soft_teacher is not None else None}, validation, tracker)
    finally:
        if tracker is not None:
            tracker.finish()
    log.info("%s %s seed %d: trained in %.1fs", name, task.name, seed, trained.seconds)
    summary = finish_run(task, trained.model, tokenizer, dev, settings, eval_batch, accelerator, out, ft.save_models, {
        "model": name, "source": source, "task": task.name, "seed": seed, "epochs": epochs,
        "steps": trained.state.step, "budget": trained.budget(steps),
        "train_examples": len(data.splits["train"]), "train_features": len(train),
        "validation_examples": len(data.splits[VALIDATION]) if VALIDATION in data.splits else 0,
        "dev_examples": {split: len(examples) for split, (examples, _) in dev.items()},
        "soft_targets": soft_teacher is not None, "train_seconds": round(trained.seconds, 2),
        "train_cpu_seconds": round(trained.cpu_seconds, 2)}, [out.checkpoints])
    unwrapped = accelerator.unwrap_model(trained.model)
    accelerator.free_memory()  # drop Accelerate's references to this run's optimizer, loaders and model
    return unwrapped.eval(), summary
