"""Training a model on task data with the engine, shared by finetune and both steps of task-distill: the batch
arithmetic of a task training section, its budget in steps, AdamW with a linear warmup and decay, resume, model
selection on the held-out split, and what a finished run leaves (model, predictions, metrics)."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from distilbert_cli.artifacts import FinetuneRun, read_json
from distilbert_cli.downstream.prediction import VALIDATION, encode_splits, evaluate, predict_splits, selection_score
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import write_json_atomic
from distilbert_cli.tasks.base import Task
from distilbert_cli.training.batches import PaddedRows, StepBatches, StepLayout
from distilbert_cli.training.checkpoint import TrainerState
from distilbert_cli.training.engine import EngineSettings, Phase, TrainingJob, Validation, fit, restore, resume_point

if TYPE_CHECKING:
    from distilbert_cli.schema import TaskTraining

log = logging.getLogger(__name__)

# A task training section's settings that change what a run computes: a resume must find them unchanged.
MATHS_KEYS = ("batch_size", "micro_batch_size", "group_window", "learning_rate", "weight_decay", "warmup_ratio",
              "max_grad_norm", "max_train_samples", "mixed_precision", "validation_split", "eval_every",
              "early_stopping")


def micro_batch_size(section: TaskTraining, world_size: int) -> int:
    """Examples per process per forward pass: `micro_batch_size`, or the global batch split over the processes."""
    return section.micro_batch_size or section.batch_size // world_size


def accumulation_steps(section: TaskTraining, name: str, world_size: int) -> int:
    """The micro batches each process accumulates so that a step takes `batch_size` examples on `world_size`
    processes; a UsageError when the numbers do not divide."""
    micro = micro_batch_size(section, world_size)
    accumulation, remainder = divmod(section.batch_size, max(micro, 1) * world_size)
    if micro == 0 or remainder or accumulation == 0:
        raise UsageError(f"{name}.batch_size={section.batch_size} is not a multiple of {name}.micro_batch_size="
                         f"{section.micro_batch_size or micro} x {world_size} process(es)")
    return accumulation


def optimizer_and_schedule(parameters, section: TaskTraining, steps: int):
    """AdamW (fused: one kernel per step, several times faster than the per-tensor loop on a CPU) and a linear
    warmup over warmup_ratio of the steps, then decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=section.learning_rate, weight_decay=section.weight_decay, fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(section.warmup_ratio * steps), steps)


@dataclass
class TrainedModel:
    model: nn.Module  # prepared by the accelerator
    state: TrainerState
    seconds: float
    cpu_seconds: float

    def budget(self, total_steps: int) -> dict:
        """The budget it was given and the one model selection chose (the report states each arm's)."""
        return {"total_steps": total_steps, "trained_steps": self.state.step, "chosen_step": self.state.best_step
                if self.state.best_step is not None else self.state.step, "stopped_early": self.state.stopped_early,
                "validation_score": self.state.best_score}


def layout_of(examples: int, section: TaskTraining, accelerator) -> StepLayout:
    """How `examples` rows are cut into the steps of a task training section on this accelerator's processes."""
    world = accelerator.num_processes
    return StepLayout.of(examples, micro_batch_size(section, world), accelerator.gradient_accumulation_steps, world,
                         fills_last=True)


def steps_per_epoch(examples: int, section: TaskTraining, accelerator) -> int:
    return layout_of(examples, section, accelerator).steps_per_epoch


def train_task_model(model: nn.Module, features, collator, make_loss: Callable[[nn.Module], Callable],
                     section: TaskTraining, name: str, seed: int, budget: Callable[[int], int], accelerator,
                     checkpoints: Path, metrics: Path, description: str, resume_state: dict,
                     make_validation: Callable[[nn.Module], Validation] | None = None, tracker=None,
                     log_step_offset: int = 0, phase: str | None = None) -> tuple[TrainedModel, int]:
    """Train `model` on the rows of `features` (padded by `collator`) with the loss `make_loss(prepared model)`
    for `budget(steps per epoch)` steps of section `name`, through the engine, resuming as `section.resume` says;
    with `make_validation`, the best weights on the held-out split are kept. Its metrics lines continue the steps
    of earlier trainings logged in the same file (`log_step_offset`) and name the `phase`. Returns the trained
    model and the budget in steps."""
    layout = layout_of(len(features), section, accelerator)
    if len(features) == 0:
        raise UsageError(f"no training rows for {description} (check {name}.max_train_samples and the data)")
    steps = budget(layout.steps_per_epoch)
    resume_state = {**resume_state, "world_size": layout.world_size, "total_steps": steps,
                    "settings": section.model_dump(include=set(MATHS_KEYS))}
    checkpoint, state = resume_point(section.resume, checkpoints, resume_state, name, accelerator, [])
    optimizer, scheduler = optimizer_and_schedule([p for p in model.parameters() if p.requires_grad], section, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    lengths = np.fromiter((len(ids) for ids in features["input_ids"]), dtype=np.int64, count=len(features))
    batches = StepBatches(lengths, layout, PaddedRows(features, collator), seed, section.group_window,
                          accelerator.process_index, state.step, steps)
    validation = make_validation(model) if make_validation is not None else None
    job = TrainingJob(model, optimizer, scheduler, batches, make_loss(model), resume_state, checkpoints, metrics,
                      description, phases=[Phase(phase, steps, lambda step: None)] if phase is not None else [],
                      validation=validation, log_step_offset=log_step_offset)
    restore(checkpoint, state, job, accelerator)
    settings = EngineSettings(name, seed, steps, section.max_grad_norm, section.max_bad_steps, section.log_every,
                              section.checkpoint_every, section.keep_last,
                              section.eval_every if validation is not None else None, section.early_stopping,
                              checkpoint_at_end=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    state = fit(job, settings, state, accelerator, tracker)
    trained = TrainedModel(model, state, time.perf_counter() - started, time.process_time() - cpu_started)
    return trained, steps


def held_out_validation(task: Task, data, tokenizer, settings, with_types: bool, batch_size: int, accelerator):
    """`make_validation` for train_task_model: the task's score on the training examples held out of `data` (its
    VALIDATION split), higher is better; None when it holds none out."""
    if VALIDATION not in data.splits:
        return None
    (held_out,) = encode_splits(task, data, [VALIDATION], tokenizer, settings, with_types).values()

    def make(model: nn.Module) -> Validation:
        def score() -> dict:
            examples, predictions = predict_splits(task, model, tokenizer, {VALIDATION: held_out}, settings,
                                                   batch_size, accelerator)[VALIDATION]
            return selection_score(task, examples, predictions)
        return Validation(score, higher_is_better=True)
    return make


def completed_run(out: FinetuneRun) -> dict | None:
    """The metrics of a run that finished in an earlier attempt of the stage (its metrics.json is written last),
    else None."""
    return read_json(out.metrics) if out.metrics.is_file() else None


def finish_run(task: Task, model, tokenizer, dev: dict, settings, batch_size: int, accelerator, out: FinetuneRun,
               save_model: bool, summary: dict, checkpoints: list[Path]) -> dict:
    """After training: predict and score the dev splits (predictions into `out`), save the model and its tokenizer
    (`save_model`), write metrics.json (`summary` with the metrics, the score and the evaluation time; written
    last, it marks the run finished), then drop the run's `checkpoints`. Returns the metrics.json payload."""
    started = time.perf_counter()
    metrics = evaluate(task, model, tokenizer, dev, settings, batch_size, accelerator, out)
    eval_seconds = time.perf_counter() - started
    summary = {**summary, "metrics": metrics, "score": task.score(metrics), "eval_seconds": round(eval_seconds, 2)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_model:
            accelerator.unwrap_model(model).save_pretrained(out.model)
            tokenizer.save_pretrained(out.model)
        write_json_atomic(out.metrics, summary)
        for path in checkpoints:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("%s %s seed %d: %s (eval %.1fs)", summary["model"], task.name, summary["seed"],
             ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), eval_seconds)
    return summary
