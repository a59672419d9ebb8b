"""The distillation loop: accumulate micro batches, skip non-finite updates, clip, step, log, checkpoint.

Every micro batch's randomness (its masks, the student's dropout) derives from (seed, micro-batch number) and
the data order from (seed, epoch), so a resumed run repeats an uninterrupted one exactly; a checkpoint keeps the
metrics summed since the last log line, so a resumed run logs the same lines too. A run whose every update was
skipped as non-finite fails instead of completing with the initial weights.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli.artifacts import DistillOutputs, read_jsonl
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import write_text_atomic
from distilbert_cli.training.checkpoint import TrainerState, save_checkpoint
from distilbert_cli.training.distiller import distillation_losses, to_device
from distilbert_cli.training.losses import LOSS_TERMS
from distilbert_cli.training.masking import derived_seed
from distilbert_cli.training.progressive import enter
from distilbert_cli.training.setup import Distillation, data_loader

log = logging.getLogger(__name__)

# derived_seed(seed, micro batch) seeds a micro batch's masks (masking.py); this extra part seeds its dropout.
DROPOUT_STREAM = 1


def train(run: Distillation, cfg: DictConfig, accelerator, out: DistillOutputs, tracker) -> TrainerState:
    """Train from `run.state` to `run.total_steps`; returns the final state."""
    state, student = run.state, run.student
    metrics = MetricsLog(out.metrics, tracker, accelerator, run.accumulation, state)
    loader = data_loader(run, cfg.batch.num_workers, pin_memory=accelerator.device.type == "cuda")
    student.train()
    progress = tqdm(total=run.total_steps, initial=state.step, desc="distill", unit="step",
                    disable=not accelerator.is_main_process)
    stage = None
    try:
        for step in range(state.step, run.total_steps):
            if stage is None or step == stage.end:  # the loss, layer pairs and trainable parameters of this step
                stage = enter(run.stages, step, accelerator.unwrap_model(student).model)
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(run.accumulation):
                batch = to_device(next(loader), accelerator.device)
                torch.manual_seed(derived_seed(cfg.seed, batch["number"], DROPOUT_STREAM))
                with accelerator.accumulate(student):
                    losses = distillation_losses(student, run.teacher, batch, stage.plan, stage.pairs,
                                                 accelerator.autocast)
                    accelerator.backward(losses["loss"])
                step_loss += losses["loss"].detach()
                metrics.add(losses)
            lr = run.scheduler.get_last_lr()[0]
            if bool(accelerator.gather(torch.isfinite(step_loss).float().reshape(1)).all()):
                if cfg.optim.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
                run.optimizer.step()
            else:
                state.bad_steps += 1
                log.warning("step %d: non-finite loss %s, update skipped (%d so far)", step + 1, step_loss.item(),
                            state.bad_steps)
                if state.bad_steps > cfg.train.max_bad_steps:
                    raise UsageError(f"training diverged: non-finite loss at {state.bad_steps} steps, the last at "
                                     f"step {step + 1} (train.max_bad_steps={cfg.train.max_bad_steps}); lower "
                                     "optim.lr or check the data")
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            state.step, state.tokens_seen = step + 1, state.tokens_seen + run.batches.step_tokens(step)
            progress.update()

            last = state.step == run.total_steps
            if state.step % cfg.train.log_every == 0 or state.step == stage.end:  # a log line ends every stage
                record = metrics.write(state, lr, stage.name)
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if state.step % cfg.train.checkpoint_every == 0 or last:
                state.log_window = metrics.window()
                save_checkpoint(accelerator, out, state, run.resume_state, cfg.train.keep_last, student,
                                run.optimizer, run.scheduler)
    finally:
        progress.close()  # before any error line, which must not share the bar's line
    if state.bad_steps >= state.step:
        raise UsageError(f"training did no work: all {state.step} steps had a non-finite loss and were skipped, so "
                         "the student still has its initial weights; lower optim.lr or check loss.* and the data")
    return state


class MetricsLog:
    """Loss terms summed over the micro batches since the last log line; each line holds their means, the
    learning rate and the throughput (metrics.jsonl on the main process, and the tracker). A resumed run reopens
    the window its checkpoint saved, so its lines average the same micro batches as an uninterrupted run's."""

    def __init__(self, path: Path, tracker, accelerator, accumulation: int, state: TrainerState):
        self.path, self.tracker, self.accelerator, self.accumulation = path, tracker, accelerator, accumulation
        if accelerator.is_main_process and path.exists():  # drop what was logged after the resumed checkpoint
            kept = [record for record in read_jsonl(path, drop_torn_tail=True) if record["step"] <= state.step]
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
            self.sums[name] = self.sums.get(name, 0.0) + value.detach()
        self.steps += 1

    def window(self) -> dict | None:
        """What a checkpoint keeps of the open window: every process's sums (gathered, so that each gets its own
        back on resume) and the micro batches they cover; None when nothing was summed since the last line."""
        if not self.steps:
            return None
        names = sorted(self.sums)
        sums = self.accelerator.gather(torch.stack([self.sums[name] for name in names]).reshape(1, -1))
        return {"micro_batches": self.steps, "names": names, "sums": sums.tolist()}

    def write(self, state: TrainerState, lr: float, stage: str | None) -> dict:
        micro_batches = self.steps  # one add() per micro batch
        means = {name: self.accelerator.reduce(total, "mean").item() / micro_batches
                 for name, total in self.sums.items()}
        seconds = time.perf_counter() - self.since
        record = {"step": state.step, "loss": means.pop("loss"),
                  **{f"loss_{name}": means[name] for name in LOSS_TERMS if name in means},
                  "lr": lr, "tokens_per_s": (state.tokens_seen - self.tokens_before) / seconds,
                  "tokens_seen": state.tokens_seen, **({"stage": stage} if stage is not None else {})}
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            if self.tracker is not None:
                self.tracker.log(record, step=state.step)
        self._restart(state)
        return record
