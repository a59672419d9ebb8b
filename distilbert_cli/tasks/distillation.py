"""Task-specific distillation (distil task-distill; Tang et al. 2019, TinyBERT's task stage): the transfer set (the
task's training examples and their augmented copies, with the teacher's outputs computed once and stored), and the
training of one student on it, optionally in TinyBERT's two steps (intermediate layers, then the prediction layer).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from distilbert_cli.artifacts import FinetuneRun, TaskDistillOutputs
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_tokenizer
from distilbert_cli.tasks.augment import Augmented, augmentor
from distilbert_cli.tasks.base import SequenceClassificationTask, TaskData
from distilbert_cli.tasks.finetuning import (
    check_length,
    encode_splits,
    finish_run,
    forward_inputs,
    load_task_model,
    make_loader,
    predict,
    training_schedule,
)
from distilbert_cli.training.batches import to_device
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses, layer_pairs
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.task_losses import TaskLossPlan, compute_task_losses

log = logging.getLogger(__name__)

# The columns of the transfer set beside the model inputs.
TRANSFER_COLUMNS = ("labels", "augmented", "origin", "teacher_logits")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# TinyBERT's intermediate-layer terms (training/losses.py), learned by the student in the first step.
INTERMEDIATE_TERMS = ("embed", "hidden", "attn_scores")


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def build_transfer_set(task: SequenceClassificationTask, train, settings, augment_cfg, seed: int, teacher,
                       teacher_tokenizer, masked_lm, words_tokenizer, batch_size: int, accelerator,
                       out: TaskDistillOutputs) -> dict:
    """Augment `train` (a task split; `words_tokenizer` finds its words: the masked LM's), tokenize it with the
    teacher's tokenizer, compute the teacher's outputs once (None: no loss term uses them) and save it all to
    `out.transfer` (Arrow). Returns what it did (counts, seconds, bytes)."""
    from datasets import Dataset

    examples = train.to_dict()
    method = augmentor(augment_cfg, words_tokenizer, seed, task.input_length(settings)[0], masked_lm)
    started = time.perf_counter()
    augmented = method.augment(examples) if method is not None else Augmented(
        {**examples, "origin": list(range(len(train))), "augmented": [False] * len(train)})
    augment_seconds = time.perf_counter() - started
    rows = Dataset.from_dict(augmented.rows)
    with_types = teacher is not None and "token_type_ids" in forward_inputs(teacher)
    encoded = task.encode(rows.remove_columns(["origin", "augmented"]), teacher_tokenizer, settings, with_types,
                          training=True)
    encoded = encoded.add_column("augmented", rows["augmented"]).add_column("origin", rows["origin"])
    stats = {"examples": len(train), "rows": len(encoded), "augmented_rows": int(np.sum(rows["augmented"])),
             "copies_drawn": augmented.drawn, "duplicates_dropped": augmented.duplicates, "words": augmented.words,
             "candidate_words": augmented.candidate_words, "augment_seconds": round(augment_seconds, 2)}
    if teacher is not None:
        started = time.perf_counter()
        logits = teacher_outputs(task, teacher, encoded, teacher_tokenizer, batch_size, accelerator)
        stats["teacher_seconds"] = round(time.perf_counter() - started, 2)
        encoded = encoded.add_column("teacher_logits", logits.tolist())
    text_columns = [name for name in rows.column_names if name.startswith("sentence")]
    for name in text_columns:  # kept beside the ids, to read what the teacher was shown
        encoded = encoded.add_column(name, rows[name])
    encoded.save_to_disk(str(out.transfer))
    stats["bytes"] = directory_bytes(out.transfer)
    log.info("transfer set: %d rows (%d examples + %d augmented copies, %d duplicate copies dropped) in %.1f s; "
             "teacher outputs %s; %.1f MB on disk (%s)", stats["rows"], stats["examples"], stats["augmented_rows"],
             stats["duplicates_dropped"], augment_seconds,
             f"computed once in {stats['teacher_seconds']:.1f} s" if teacher is not None else "not needed",
             stats["bytes"] / 1e6, out.transfer)
    return stats


def teacher_outputs(task, teacher, features, tokenizer, batch_size: int, accelerator) -> np.ndarray:
    """The teacher's task outputs (logits, or a regression score) for every row of `features`, in order; the rows
    are run in order of length, so that a batch pads little."""
    accepted = forward_inputs(teacher)
    inputs = features.select_columns([name for name in features.column_names if name in accepted])
    order = np.argsort([len(ids) for ids in features["input_ids"]], kind="stable")
    loader = make_loader(inputs.select(order), tokenizer, batch_size, shuffle=False, seed=0)
    outputs = np.concatenate(predict(task, accelerator.prepare_model(teacher, evaluation_mode=True), loader,
                                     accelerator))
    result = np.empty_like(outputs)
    result[order] = outputs
    return result


def intermediate_plan(cfg: DictConfig) -> LossPlan:
    """TinyBERT's intermediate-layer loss (embedding output, layer outputs, pre-softmax attention scores) from the
    weights of `task_distill.intermediate`."""
    from distilbert_cli.training.losses import LOSS_TERMS

    weights = {name: getattr(cfg, f"alpha_{name}") if name in INTERMEDIATE_TERMS else 0.0 for name in LOSS_TERMS}
    return LossPlan(weights, temperature=1.0, restrict_ce_to_mask=False, teacher_layer=None, relation_heads=None)


class _Log:
    """The loss terms averaged over the steps since the last line of metrics.jsonl."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.sums, self.count = path, every, {}, 0

    def add(self, step: int, losses: dict, lr: float, stage: str, last: bool) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value.detach())
        self.count += 1
        if step % self.every == 0 or last:
            record = {"step": step, "stage": stage, **{f"loss_{name}" if name != "loss" else name: total / self.count
                                                       for name, total in self.sums.items()}, "lr": lr}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.sums, self.count = {}, 0


def _batch(batch: dict, device) -> dict:
    batch = to_device(batch, device)
    batch["augmented"] = batch["augmented"].bool()
    return batch


def distill_one(td: DictConfig, settings: DictConfig, task: SequenceClassificationTask, data: TaskData, transfer,
                source: str, seed: int, plan: TaskLossPlan, teacher, accelerator, out: FinetuneRun,
                trust_remote_code: bool) -> dict[str, float]:
    """Train the student `source` (with a fresh task head) on the transfer set with seed `seed`: first, when
    td.intermediate.epochs > 0, on TinyBERT's intermediate-layer loss against `teacher`; then on the `plan`'s terms
    against the stored teacher outputs. Evaluate it on the dev splits of `data`; write model/, predictions.jsonl,
    metrics.jsonl (the loss terms over the steps) and metrics.json into `out`; return the metrics."""
    from accelerate.utils import set_seed

    set_seed(seed)
    device = accelerator.device
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, role="student")
    model = load_task_model(source, task, data.label_names, trust_remote_code, "student").to(device)
    check_length(model, *task.input_length(settings), "the student")
    inputs = [name for name in MODEL_INPUTS if name in forward_inputs(model) and name in transfer.column_names]
    columns = [*inputs, "labels", "augmented", *(["teacher_logits"] if plan.uses_teacher else [])]
    loader = make_loader(transfer.select_columns(columns), tokenizer, td.batch_size, shuffle=True, seed=seed)
    dev = encode_splits(task, data, [split for split in data.splits if split != "train"], tokenizer, settings,
                        "token_type_ids" in inputs)
    out.path.mkdir(parents=True, exist_ok=True)
    out.loss_log.unlink(missing_ok=True)
    metrics_log = _Log(out.loss_log, td.log_every)
    started, cpu_started = time.perf_counter(), time.process_time()
    steps = {"intermediate": 0, "prediction": 0}
    if td.intermediate.epochs > 0:
        steps["intermediate"] = _intermediate_step(td, model, teacher, transfer, inputs, tokenizer, seed, device,
                                                   metrics_log)
    budget = td.max_steps if td.max_steps is not None else math.ceil(td.epochs * len(loader))
    optimizer, scheduler, total = training_schedule(model.parameters(), td, budget)
    steps["prediction"] = total
    model.train()
    with tqdm(total=total, desc=f"task-distill {task.name} seed {seed}", unit="step") as progress:
        for step, batch in enumerate(_batches(loader, total), start=1):
            batch = _batch(batch, device)
            losses = compute_task_losses(plan, task.outputs(model(**{k: batch[k] for k in inputs})), batch)
            lr = _update(losses["loss"], model, optimizer, scheduler, td.max_grad_norm)
            metrics_log.add(steps["intermediate"] + step, losses, lr, "prediction layer", step == total)
            progress.update()
            progress.set_postfix(loss=f"{losses['loss'].item():.4f}")
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return finish_run(task, model, tokenizer, dev, settings, td.batch_size, accelerator, out, True, {
        "model": "student", "source": source, "task": task.name, "seed": seed, "steps": steps,
        "transfer_rows": len(transfer), "losses": {name: plan.weights[name] for name in plan.used},
        "temperature": plan.temperature, "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2)})


def _update(loss, model: nn.Module, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Backward, clip, step; returns the learning rate the step used."""
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def _batches(loader, total: int):
    """`total` batches from `loader`, epoch after epoch (the last one cut short)."""
    produced = 0
    while produced < total:
        for batch in loader:
            yield batch
            produced += 1
            if produced == total:
                return


def _intermediate_step(td: DictConfig, model, teacher, transfer, inputs: list[str], tokenizer, seed: int, device,
                       metrics_log: _Log) -> int:
    """TinyBERT's first step: the student's embedding output, layer outputs (through learned projections W_e, W_h
    when the widths differ) and attention scores learn the teacher's, student layer m from teacher layer m * N / M;
    the projections are dropped afterwards. Returns the steps taken."""
    plan = intermediate_plan(td.intermediate)
    if teacher is None:
        raise UsageError("task_distill.intermediate needs the teacher")
    student_width, teacher_width = model.config.hidden_size, teacher.config.hidden_size
    projections = nn.ModuleDict({name: nn.Linear(student_width, teacher_width) for name in ("embed", "hidden")
                                 if plan.uses(name) and student_width != teacher_width}).to(device)
    student_rows = MaskedLMRows(model, projections)
    teacher_rows = MaskedLMRows(teacher.to(device).eval())
    pairs = layer_pairs(model.config.num_hidden_layers, teacher.config.num_hidden_layers, None)
    teacher_inputs = [name for name in MODEL_INPUTS if name in forward_inputs(teacher)
                      and name in transfer.column_names]
    loader = make_loader(transfer.select_columns(sorted({*inputs, *teacher_inputs})), tokenizer, td.batch_size,
                         shuffle=True, seed=seed)
    optimizer, scheduler, total = training_schedule(student_rows.parameters(), td,
                                                    math.ceil(td.intermediate.epochs * len(loader)))
    student_rows.train()
    with tqdm(total=total, desc="task-distill intermediate layers", unit="step") as progress:
        for step, batch in enumerate(_batches(loader, total), start=1):
            batch = to_device(batch, device)
            batch["token_rows"] = batch["attention_mask"].flatten().nonzero().squeeze(-1)
            losses = distillation_losses(student_rows, teacher_rows, batch, plan, pairs,
                                         lambda: torch.autocast(device.type, enabled=False))
            lr = _update(losses["loss"], student_rows, optimizer, scheduler, td.max_grad_norm)
            metrics_log.add(step, losses, lr, "intermediate layers", step == total)
            progress.update()
    return total


def check_loss(plan: TaskLossPlan, task: SequenceClassificationTask) -> None:
    """The terms must fit the task: a regression has no class distribution to soften."""
    if task.is_regression and plan.classes_only:
        raise UsageError(f"{task.title} is a regression: task_distill.loss.alpha_{plan.classes_only[0]} needs class "
                         "probabilities; use task_distill.loss.alpha_mse (the teacher's score)")
