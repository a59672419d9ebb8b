"""The training engine: the one place where a training step happens, for every stage that trains (distil train,
finetune, and task-distill's two steps). A stage hands it a `TrainingJob` (its prepared model, optimizer and
schedule, the micro batches of this process, and the loss of one micro batch) and the engine runs it:

    for each step:
        for each of this process's `accumulation` micro batches:
            seed the dropout from the micro batch's global number; loss = job.loss(batch); backward (accumulated)
        if the step's loss is finite on every process: clip the gradients, step the optimizer
        else: skip the update and count it (one `error:` line once more than max_bad_steps were skipped)
        step the learning-rate schedule; zero the gradients (set to None)
        every log_every steps: a metrics.jsonl line (the mean of each loss term, lr, tokens/s), the tracker, the bar
        every eval_every steps: score the validation split, keep the best weights, stop early after `patience`
        every checkpoint_every steps and at the end: a checkpoint (safetensors and JSON, exact resume)

With N processes (accelerate launch, torchrun) each step takes the micro batches 1 process would accumulate, so
gradients and logged losses are those of 1 process accumulating N times as many. A resumed run repeats an
uninterrupted one bit for bit: the data order, masks and dropout are functions of (seed, step), and a checkpoint
keeps the metrics summed since the last log line and where model selection stands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distilbert_cli.artifacts import read_jsonl
from distilbert_cli.errors import UsageError, unreadable
from distilbert_cli.rundir import write_text_atomic
from distilbert_cli.training.batches import StepBatches, derived_seed, to_device
from distilbert_cli.training.checkpoint import (
    TRAINER_STATE,
    TrainerState,
    clear_earlier_attempt,
    load_best,
    load_checkpoint,
    read_checkpoint,
    resume_checkpoint,
    save_best,
    save_checkpoint,
)

log = logging.getLogger(__name__)

# derived_seed(seed, micro batch) seeds a micro batch's own randomness (its masks); this extra part, its dropout.
DROPOUT_STREAM = 1


@dataclass(frozen=True)
class EngineSettings:
    """How a stage's training runs, from its typed config section (`section` names it in messages)."""

    section: str  # train, finetune, task_distill
    seed: int
    total_steps: int
    max_grad_norm: float | None
    max_bad_steps: int
    log_every: int
    checkpoint_every: int
    keep_last: int
    eval_every: int | None = None  # None: no evaluation during training
    early_stopping: int | None = None  # evaluations without improvement before stopping; None: never
    # A checkpoint at the last step too: train keeps its last ones as outputs; a downstream run, finished a moment
    # later and its checkpoints then removed, is not worth one.
    checkpoint_at_end: bool = True


@dataclass(frozen=True)
class Phase:
    """A span of steps with its own trainable parameters or loss (progressive transfer, a head-only start):
    `enter(step)` makes the model and the loss ready for it from `step` on (a resumed run enters mid-phase); a
    metrics line ends every named phase."""

    name: str | None
    end: int  # the step after its last one
    enter: Callable[[int], None]


@dataclass(frozen=True)
class Validation:
    """Model selection on a validation split (never the scored dev set): `score()` evaluates the model as it stands
    and returns its metrics with the selection figure under "score"."""

    score: Callable[[], dict]
    higher_is_better: bool


@dataclass
class TrainingJob:
    """What a stage hands the engine."""

    model: nn.Module  # prepared by the accelerator
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: StepBatches  # this process's micro batches from the resume step
    loss: Callable[[dict], dict[str, torch.Tensor]]  # one micro batch -> {"loss": total, <term>: value, ...}
    resume_state: dict  # the settings a resume must match, saved with each checkpoint
    checkpoints: Path
    metrics: Path  # metrics.jsonl
    description: str  # the progress bar's
    phases: Sequence[Phase] = field(default_factory=list)  # empty: one phase, nothing to enter
    validation: Validation | None = None
    num_workers: int = 0  # DataLoader workers preparing micro batches
    # Steps of an earlier training logged in the same metrics file (task-distill's intermediate step): this one's
    # lines continue their numbering.
    log_step_offset: int = 0


def check_mixed_precision(mixed_precision: str, setting: str) -> None:
    """fp16 needs a CUDA GPU (its loss scaling); bf16 runs on a CPU too."""
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(f"{setting}=fp16 needs a CUDA GPU (use bf16 or no on CPU)")


def check_resume(resume: str, setting: str) -> None:
    if resume not in ("never", "auto") and not (Path(resume) / TRAINER_STATE).is_file():
        raise UsageError(f"{setting} must be never, auto or a checkpoint directory; {resume!r} has no "
                         f"{TRAINER_STATE}")


def resume_point(resume: str, checkpoints: Path, resume_state: dict, section: str, accelerator,
                 leftovers: Sequence[Path]) -> tuple[Path | None, TrainerState]:
    """Where a training run starts: the checkpoint `resume` (never | auto | a checkpoint directory) gives it, and
    its state; starting over, the `leftovers` of an earlier attempt (checkpoints, final model, metrics) go."""
    checkpoint = resume_checkpoint(resume, checkpoints)
    if checkpoint is None and accelerator.is_main_process:
        clear_earlier_attempt([checkpoints, *leftovers], f"{section}.resume={resume}")
    accelerator.wait_for_everyone()
    state = read_checkpoint(checkpoint, resume_state, f"{section}.resume") if checkpoint else TrainerState()
    return checkpoint, state


def restore(checkpoint: Path | None, state: TrainerState, job: TrainingJob, accelerator) -> None:
    """Load the resumed checkpoint into the job's prepared model, optimizer and schedule."""
    if checkpoint is not None:
        load_checkpoint(checkpoint, accelerator, job.model, job.optimizer, job.scheduler)
        log.info("resuming from %s at step %d", checkpoint, state.step)


def fit(job: TrainingJob, settings: EngineSettings, state: TrainerState, accelerator, tracker=None) -> TrainerState:
    """Train from `state.step` to the budget (or an early stop); returns the final state. With validation, the
    model ends with the best weights it had on the validation split."""
    metrics = MetricsLog(job.metrics, tracker, accelerator, state, job.log_step_offset)
    loader = iter(DataLoader(job.batches, batch_size=None, num_workers=job.num_workers,
                             pin_memory=accelerator.device.type == "cuda"))
    phases = job.phases or [Phase(None, settings.total_steps, lambda step: None)]
    job.model.train()
    progress = tqdm(total=settings.total_steps, initial=state.step, desc=job.description, unit="step",
                    disable=not accelerator.is_main_process)
    phase = None
    try:
        for step in range(state.step, settings.total_steps if not state.stopped_early else state.step):
            if phase is None or step == phase.end:
                phase = next(p for p in phases if step < p.end)
                phase.enter(step)
            lr = job.scheduler.get_last_lr()[0]
            train_step(job, settings, state, accelerator, loader, metrics, step)
            state.step, state.tokens_seen = step + 1, state.tokens_seen + job.batches.step_tokens(step)
            progress.update()
            last = state.step == settings.total_steps
            if state.step % settings.log_every == 0 or state.step == phase.end:  # a log line ends every phase
                record = metrics.write(state, lr, phase.name)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if job.validation is not None and (state.step % settings.eval_every == 0 or last):
                evaluate(job, settings, state, accelerator, metrics)
            ending = (last or state.stopped_early) and settings.checkpoint_at_end
            if state.step % settings.checkpoint_every == 0 or ending:
                state.log_window = metrics.window()
                save_checkpoint(accelerator, job.checkpoints, state, job.resume_state, settings.keep_last, job.model,
                                job.optimizer, job.scheduler)
            if state.stopped_early:
                log.info("early stopping at step %d: no better validation score in %d evaluations (best at step "
                         "%d)", state.step, state.stale_evaluations, state.best_step)
                break
    finally:
        progress.close()  # before any error line, which must not share the bar's line
    if state.bad_steps >= state.step:
        raise UsageError(f"training did no work: all {state.step} steps had a non-finite loss and were skipped, so "
                         f"the model still has its initial weights; lower {settings.section}'s learning rate or "
                         "check the data and the loss weights")
    if job.validation is not None:
        load_best(accelerator, job.checkpoints, job.model)
        log.info("kept the weights of step %d (validation score %.4f)", state.best_step, state.best_score)
    return state


def train_step(job: TrainingJob, settings: EngineSettings, state: TrainerState, accelerator, loader,
               metrics: MetricsLog, step: int) -> None:
    """One optimizer step over this process's micro batches (see the module docstring)."""
    step_loss = torch.zeros((), device=accelerator.device)
    for _ in range(job.batches.layout.accumulation):
        batch = to_device(next(loader), accelerator.device)
        torch.manual_seed(derived_seed(settings.seed, batch.pop("number"), DROPOUT_STREAM))
        with accelerator.accumulate(job.model):
            losses = job.loss(batch)
            accelerator.backward(losses["loss"])
        step_loss += losses["loss"].detach()
        metrics.add(losses)
    if bool(accelerator.gather(torch.isfinite(step_loss).float().reshape(1)).all()):
        if settings.max_grad_norm is not None:
            accelerator.clip_grad_norm_(job.model.parameters(), settings.max_grad_norm)
        job.optimizer.step()
    else:
        state.bad_steps += 1
        log.warning("step %d: non-finite loss %s, update skipped (%d so far)", step + 1, step_loss.item(),
                    state.bad_steps)
        if state.bad_steps > settings.max_bad_steps:
            raise UsageError(f"training diverged: non-finite loss at {state.bad_steps} steps, the last at step "
                             f"{step + 1} ({settings.section}.max_bad_steps={settings.max_bad_steps}); lower the "
                             "learning rate or check the data")
    job.scheduler.step()
    job.optimizer.zero_grad(set_to_none=True)


def evaluate(job: TrainingJob, settings: EngineSettings, state: TrainerState, accelerator,
             metrics: MetricsLog) -> None:
    """Score the validation split; keep the weights when they are the best so far; count the evaluations since."""
    found = job.validation.score()
    job.model.train()
    score = found["score"]
    better = state.best_score is None or (score > state.best_score if job.validation.higher_is_better
                                          else score < state.best_score)
    if better:
        state.best_score, state.best_step, state.stale_evaluations = score, state.step, 0
        save_best(accelerator, job.checkpoints, job.model)
    else:
        state.stale_evaluations += 1
        state.stopped_early = settings.early_stopping is not None and state.stale_evaluations >= settings.early_stopping
    metrics.write_record({"step": metrics.offset + state.step, "validation": found,
                          "best_step": metrics.offset + state.best_step})


def open_tracker(logger, directory: Path, name: str, config: dict, is_main: bool):
    """A wandb run named `name` (its files under `directory`), or None for logger=none and on non-main processes."""
    if logger.name == "none" or not is_main:
        return None
    import wandb

    return wandb.init(project=logger.project, mode=logger.mode, dir=str(directory), name=name, config=config,
                      reinit="finish_previous")


class MetricsLog:
    """Loss terms summed over the micro batches since the last log line; each line holds their means, the
    learning rate and the throughput (metrics.jsonl on the main process, and the tracker). A resumed run reopens
    the window its checkpoint saved, so its lines average the same micro batches as an uninterrupted run's."""

    def __init__(self, path: Path, tracker, accelerator, state: TrainerState, offset: int = 0):
        self.path, self.tracker, self.accelerator, self.offset = path, tracker, accelerator, offset
        if accelerator.is_main_process and path.exists():  # drop what was logged after the resumed checkpoint
            records = read_jsonl(path, drop_torn_tail=True)
            if stepless := [record for record in records if not isinstance(record.get("step"), int)]:
                raise unreadable(path, f"a line without a step number: {json.dumps(stepless[0])[:80]}")
            kept = [record for record in records if record["step"] <= offset + state.step]
            write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
        self._restart(state)
        if state.log_window is not None:
            window = state.log_window
            row = window["sums"][accelerator.process_index]  # losses are float32: the saved floats are exact
            self.sums = {name: torch.tensor(value, dtype=torch.float32, device=accelerator.device)
                         for name, value in zip(window["names"], row, strict=True)}
            self.steps = window["micro_batches"]

    def _restart(self, state: TrainerState) -> None:
        self.sums, self.steps = {}, 0
        self.since, self.tokens_before = time.perf_counter(), state.tokens_seen

    def add(self, losses: dict) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1

    def window(self) -> dict | None:
        """What a checkpoint keeps of the open window: every process's sums (gathered, so that each gets its own
        back on resume) and the micro batches they cover; None when nothing was summed since the last line."""
        if not self.steps:
            return None
        names = list(self.sums)
        sums = self.accelerator.gather(torch.stack([self.sums[name] for name in names]).reshape(1, -1))
        return {"micro_batches": self.steps, "names": names, "sums": sums.tolist()}

    def write(self, state: TrainerState, lr: float, phase: str | None) -> dict:
        means = {name: self.accelerator.reduce(total, "mean").item() / self.steps for name, total in self.sums.items()}
        seconds = time.perf_counter() - self.since
        record = {"step": self.offset + state.step, "loss": means.pop("loss"),
                  **{f"loss_{name}": value for name, value in means.items()}, "lr": lr,
                  "tokens_per_s": (state.tokens_seen - self.tokens_before) / seconds, "tokens_seen": state.tokens_seen,
                  **({"stage": phase} if phase is not None else {})}
        self.write_record(record)
        self._restart(state)
        return record

    def write_record(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record, step=record["step"])
