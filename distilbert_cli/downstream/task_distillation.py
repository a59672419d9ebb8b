"""Task-specific distillation (distil task-distill; Tang et al. 2019, TinyBERT's task stage): the transfer set (the
task's training examples and their augmented copies, with the teacher's outputs computed once and stored), and the
training of one student on it through the engine, optionally in TinyBERT's two steps (intermediate layers, then the
prediction layer).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from distilbert_cli.artifacts import FinetuneRun, TaskDistillOutputs
from distilbert_cli.downstream.augment import Augmented, augmentor
from distilbert_cli.downstream.prediction import VALIDATION, encode_splits, make_loader, predict, scored_splits
from distilbert_cli.downstream.task_models import check_length, forward_inputs, load_task_model
from distilbert_cli.downstream.task_training import (
    finish_run,
    held_out_validation,
    steps_per_epoch,
    train_task_model,
)
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_tokenizer
from distilbert_cli.rundir import temporary_path, write_json_atomic
from distilbert_cli.tasks.base import SequenceClassificationTask, TaskData
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses, layer_pairs
from distilbert_cli.training.engine import open_tracker
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.task_losses import TaskLossPlan, compute_task_losses

if TYPE_CHECKING:
    from distilbert_cli.schema import IntermediateLayers, TaskDistillSettings
    from distilbert_cli.schema import Task as TaskSettings

log = logging.getLogger(__name__)

# The columns of the transfer set beside the model inputs.
TRANSFER_COLUMNS = ("labels", "augmented", "origin", "teacher_logits")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# TinyBERT's intermediate-layer terms (training/losses.py), learned by the student in the first step.
INTERMEDIATE_TERMS = ("embed", "hidden", "attn_scores")


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def build_transfer_set(task: SequenceClassificationTask, train, settings: TaskSettings, augment_cfg, seed: int,
                       teacher, teacher_tokenizer, masked_lm, words_tokenizer, batch_size: int, accelerator,
                       out: TaskDistillOutputs, transfer_settings: dict) -> dict:
    """Augment `train` (a task split; `words_tokenizer` finds its words: the masked LM's) and tokenize it with the
    teacher's tokenizer (on the main process), compute the teacher's outputs once (None: no loss term uses them; on
    every process, each a share of the rows), and save it all to `out.transfer` (Arrow, renamed into place once
    complete) and `out.transfer_info` ({"settings": transfer_settings, "stats": what it did: counts, seconds,
    bytes}), which it returns."""
    from datasets import Dataset, load_from_disk

    rows_dir, transfer_tmp = temporary_path(out.path / "augmented"), temporary_path(out.transfer)
    with_types = teacher is not None and "token_type_ids" in forward_inputs(teacher)
    stats = {}
    if accelerator.is_main_process:
        examples = train.to_dict()
        method = augmentor(augment_cfg, words_tokenizer, seed, task.input_length(settings)[0], masked_lm)
        started = time.perf_counter()
        augmented = method.augment(examples) if method is not None else Augmented(
            {**examples, "origin": list(range(len(train))), "augmented": [False] * len(train)})
        augment_seconds = time.perf_counter() - started
        rows = Dataset.from_dict(augmented.rows)
        encoded = task.encode(rows.remove_columns(["origin", "augmented"]), teacher_tokenizer, settings, with_types,
                              training=True)
        encoded = encoded.add_column("augmented", rows["augmented"]).add_column("origin", rows["origin"])
        for name in [name for name in rows.column_names if name.startswith("sentence")]:
            encoded = encoded.add_column(name, rows[name])  # kept beside the ids, to read what the teacher was shown
        encoded.save_to_disk(str(rows_dir))
        stats = {"examples": len(train), "rows": len(encoded), "augmented_rows": int(np.sum(rows["augmented"])),
                 "copies_drawn": augmented.drawn, "duplicates_dropped": augmented.duplicates,
                 "words": augmented.words, "candidate_words": augmented.candidate_words,
                 "augment_seconds": round(augment_seconds, 2)}
    accelerator.wait_for_everyone()
    encoded = load_from_disk(str(rows_dir))
    if teacher is not None:
        started = time.perf_counter()
        logits = teacher_outputs(task, teacher, encoded, teacher_tokenizer, batch_size, accelerator)
        stats["teacher_seconds"] = round(time.perf_counter() - started, 2)
        encoded = encoded.add_column("teacher_logits", logits.tolist())
    info = None
    if accelerator.is_main_process:
        encoded.save_to_disk(str(transfer_tmp))
        os.replace(transfer_tmp, out.transfer)
        shutil.rmtree(rows_dir)
        stats["bytes"] = directory_bytes(out.transfer)
        info = {"settings": transfer_settings, "stats": stats}
        write_json_atomic(out.transfer_info, info)  # written last: the transfer set is complete
        log.info("transfer set: %d rows (%d examples + %d augmented copies, %d duplicate copies dropped) in %.1f s; "
                 "teacher outputs %s; %.1f MB on disk (%s)", stats["rows"], stats["examples"],
                 stats["augmented_rows"], stats["duplicates_dropped"], stats["augment_seconds"],
                 f"computed once in {stats['teacher_seconds']:.1f} s" if teacher is not None else "not needed",
                 stats["bytes"] / 1e6, out.transfer)
    accelerator.wait_for_everyone()
    return info


def teacher_outputs(task, teacher, features, tokenizer, batch_size: int, accelerator) -> np.ndarray:
    """The teacher's task outputs (logits, or a regression score) for every row of `features`, in order, each
    process computing a share; the rows are run in order of length, so that a batch pads little."""
    accepted = forward_inputs(teacher)
    inputs = features.select_columns([name for name in features.column_names if name in accepted])
    order = np.argsort([len(ids) for ids in features["input_ids"]], kind="stable")
    loader = accelerator.prepare(make_loader(inputs.select(order), tokenizer, batch_size))
    outputs = np.concatenate(predict(task, accelerator.prepare_model(teacher, evaluation_mode=True), loader,
                                     accelerator))
    result = np.empty_like(outputs)
    result[order] = outputs
    return result


def intermediate_plan(intermediate: IntermediateLayers) -> LossPlan:
    """TinyBERT's intermediate-layer loss (embedding output, layer outputs, pre-softmax attention scores) from the
    weights of `task_distill.intermediate`."""
    from distilbert_cli.training.losses import LOSS_TERMS

    weights = {name: getattr(intermediate, f"alpha_{name}") if name in INTERMEDIATE_TERMS else 0.0
               for name in LOSS_TERMS}
    return LossPlan(weights, temperature=1.0, restrict_ce_to_mask=False, teacher_layer=None, relation_heads=None)


def distill_one(td: TaskDistillSettings, settings: TaskSettings, logger, task: SequenceClassificationTask,
                data: TaskData, transfer, source: str, seed: int, plan: TaskLossPlan, teacher, accelerator,
                out: FinetuneRun, trust_remote_code: bool) -> dict:
    """Train the student `source` (with a fresh task head) on the transfer set with seed `seed`: first, when
    td.intermediate.epochs > 0, on TinyBERT's intermediate-layer loss against `teacher`; then on the `plan`'s terms
    against the stored teacher outputs, keeping the best model on the held-out split when td.eval_every is set.
    Score it on the dev splits of `data`; write model/, predictions.jsonl, metrics.jsonl (the loss terms over the
    steps of both, and each evaluation) and metrics.json into `out`; return metrics.json's payload."""
    from accelerate.utils import set_seed
    from transformers import DataCollatorWithPadding

    set_seed(seed)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, role="student")
    model = load_task_model(source, task, data.label_names, trust_remote_code, "student")
    check_length(model, *task.input_length(settings), "the student")
    inputs = [name for name in MODEL_INPUTS if name in forward_inputs(model) and name in transfer.column_names]
    with_types = "token_type_ids" in inputs
    dev = encode_splits(task, data, scored_splits(data), tokenizer, settings, with_types)
    eval_batch = td.batch_size // accelerator.num_processes
    validation = held_out_validation(task, data, tokenizer, settings, with_types, eval_batch, accelerator)
    collator = DataCollatorWithPadding(tokenizer)
    resume_state = {"source": source, "task": task.name, "seed": seed, "transfer_rows": len(transfer)}
    checkpoints = {step: out.checkpoints / step for step in ("intermediate", "prediction")}
    out.path.mkdir(parents=True, exist_ok=True)
    tracker = open_tracker(logger, out.path, f"task-distill/{task.name}/seed-{seed}", {
        "task": task.name, "seed": seed, "task_distill": td.model_dump(mode="json")}, accelerator.is_main_process)
    try:
        steps = {"intermediate": math.ceil(td.intermediate.epochs * steps_per_epoch(len(transfer), td, accelerator)),
                 "prediction": 0}
        resumes_prediction = td.resume != "never" and any(checkpoints["prediction"].glob("step-*"))
        if steps["intermediate"] and not resumes_prediction:  # a resumed prediction step holds the whole student
            _intermediate_step(td, model, teacher, transfer, inputs, collator, seed, accelerator,
                               checkpoints["intermediate"], out.loss_log, resume_state, tracker)

        def make_loss(prepared):
            def loss(batch: dict) -> dict:
                batch["augmented"] = batch["augmented"].bool()
                return compute_task_losses(plan, task.outputs(prepared(**{k: batch[k] for k in inputs})), batch)
            return loss

        columns = [*inputs, "labels", "augmented", *(["teacher_logits"] if plan.uses_teacher else [])]
        budget = (lambda _: td.max_steps) if td.max_steps is not None else (
            lambda steps_per_epoch: math.ceil(td.epochs * steps_per_epoch))
        trained, steps["prediction"] = train_task_model(
            model, transfer.select_columns(columns), collator, make_loss, td, "task_distill", seed, budget,
            accelerator, checkpoints["prediction"], out.loss_log, f"task-distill {task.name} seed {seed}",
            {**resume_state, "step": "prediction layer", "loss": {name: plan.weights[name] for name in plan.used},
             "temperature": plan.temperature}, validation, tracker, log_step_offset=steps["intermediate"],
            phase="prediction layer")
    finally:
        if tracker is not None:
            tracker.finish()
    summary = finish_run(task, trained.model, tokenizer, dev, settings, eval_batch, accelerator, out, True, {
        "model": "student", "source": source, "task": task.name, "seed": seed, "steps": steps,
        "budget": trained.budget(steps["prediction"]), "transfer_rows": len(transfer),
        "validation_examples": len(data.splits[VALIDATION]) if VALIDATION in data.splits else 0,
        "losses": {name: plan.weights[name] for name in plan.used}, "temperature": plan.temperature,
        "train_seconds": round(trained.seconds, 2), "train_cpu_seconds": round(trained.cpu_seconds, 2)},
        [out.checkpoints])
    accelerator.free_memory()
    return summary


def _intermediate_step(td: TaskDistillSettings, model, teacher, transfer, inputs: list[str], collator, seed: int,
                       accelerator, checkpoints: Path, metrics: Path, resume_state: dict, tracker) -> None:
    """TinyBERT's first step: the student's embedding output, layer outputs (through learned projections W_e, W_h
    when the widths differ) and attention scores learn the teacher's, student layer m from teacher layer m * N / M;
    the projections are dropped afterwards."""
    plan = intermediate_plan(td.intermediate)
    if teacher is None:
        raise UsageError("task_distill.intermediate needs the teacher")
    student_width, teacher_width = model.config.hidden_size, teacher.config.hidden_size
    projections = nn.ModuleDict({name: nn.Linear(student_width, teacher_width) for name in ("embed", "hidden")
                                 if plan.uses(name) and student_width != teacher_width})
    teacher_rows = MaskedLMRows(teacher.eval()).to(accelerator.device)
    pairs = layer_pairs(model.config.num_hidden_layers, teacher.config.num_hidden_layers, None)
    teacher_inputs = [name for name in MODEL_INPUTS if name in forward_inputs(teacher)
                      and name in transfer.column_names]

    def make_loss(prepared):
        def loss(batch: dict) -> dict:
            batch["token_rows"] = batch["attention_mask"].flatten().nonzero().squeeze(-1)
            return distillation_losses(prepared, teacher_rows, batch, plan, pairs, accelerator.autocast)
        return loss

    train_task_model(MaskedLMRows(model, projections), transfer.select_columns(sorted({*inputs, *teacher_inputs})),
                     collator, make_loss, td, "task_distill", seed,
                     lambda steps_per_epoch: math.ceil(td.intermediate.epochs * steps_per_epoch), accelerator,
                     checkpoints, metrics, "task-distill intermediate layers",
                     {**resume_state, "step": "intermediate layers", "intermediate": td.intermediate.model_dump()},
                     tracker=tracker, phase="intermediate layers")
    accelerator.free_memory()


def check_loss(plan: TaskLossPlan, task: SequenceClassificationTask) -> None:
    """The terms must fit the task: a regression has no class distribution to soften."""
    if task.is_regression and plan.classes_only:
        raise UsageError(f"{task.title} is a regression: task_distill.loss.alpha_{plan.classes_only[0]} needs class "
                         "probabilities; use task_distill.loss.alpha_mse (the teacher's score)")
