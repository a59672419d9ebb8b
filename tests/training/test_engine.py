"""The training engine on a toy regression: model selection on a validation split (the best weights kept, early
stopping at the planted best evaluation), the non-finite guard, the metrics log, and the micro batches of task
data (every example once an epoch, the last step filled)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from distilbert_cli.errors import UsageError
from distilbert_cli.training.batches import StepBatches, StepLayout, epoch_micro_batches
from distilbert_cli.training.checkpoint import TrainerState
from distilbert_cli.training.engine import EngineSettings, TrainingJob, Validation, fit

EXAMPLES = 16
X = torch.linspace(-1, 1, EXAMPLES).unsqueeze(1)
Y = 3 * X + 1


def toy_collate(indices: np.ndarray, generator: torch.Generator) -> dict:
    return {"x": X[indices], "y": Y[indices]}


def toy_job(tmp_path, accelerator, steps: int, validation=None, loss=None) -> TrainingJob:
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    layout = StepLayout.of(EXAMPLES, 4, 1, 1)
    batches = StepBatches(np.ones(EXAMPLES, dtype=np.int64), layout, toy_collate, seed=1, group_window=1, rank=0,
                          start_step=0, end_step=steps)

    def mse(batch: dict) -> dict:
        value = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return {"mse": value, "loss": value}

    return TrainingJob(model, optimizer, scheduler, batches, loss or mse, {}, tmp_path / "checkpoints",
                       tmp_path / "metrics.jsonl", "toy", validation=validation(model) if validation else None)


def settings(steps: int, **overrides) -> EngineSettings:
    values = {"section": "toy", "seed": 1, "total_steps": steps, "max_grad_norm": None, "max_bad_steps": 2,
              "log_every": 1, "checkpoint_every": 100, "keep_last": 1} | overrides
    return EngineSettings(**values)


@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_early_stopping_stops_at_the_planted_best_evaluation_and_keeps_its_weights(tmp_path, accelerator):
    """Validation scores planted per evaluation: the best is the 2nd (step 4); with patience 2 the run stops after
    the 4th (step 8), never reaching its budget of 20 steps, and ends with the weights it had at step 4."""
    planted = iter([0.50, 0.80, 0.70, 0.75, 0.90])  # the 5th (better) must never be asked for
    weights_at = {}

    def validation(model):
        def score() -> dict:
            weights_at[len(weights_at) + 1] = [p.detach().clone() for p in model.parameters()]
            return {"score": next(planted)}
        return Validation(score, higher_is_better=True)

    job = toy_job(tmp_path, accelerator, 20, validation)
    state = fit(job, settings(20, eval_every=2, early_stopping=2), TrainerState(), accelerator)
    assert (state.step, state.best_step, state.best_score, state.stopped_early) == (8, 4, 0.80, True)
    assert state.stale_evaluations == 2
    for kept, best in zip(job.model.parameters(), weights_at[2], strict=True):
        assert torch.equal(kept, best)
    assert not torch.equal(weights_at[2][0], weights_at[4][0])  # training did move on after the best
    evaluations = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                   if "validation" in json.loads(line)]
    assert [(e["step"], e["validation"]["score"], e["best_step"]) for e in evaluations] == [
        (2, 0.50, 2), (4, 0.80, 4), (6, 0.70, 4), (8, 0.75, 4)]


def test_lower_is_better_and_no_early_stopping_trains_the_whole_budget(tmp_path, accelerator):
    planted = iter([3.0, 1.0, 2.0])
    job = toy_job(tmp_path, accelerator, 6, lambda model: Validation(lambda: {"score": next(planted)},
                                                                      higher_is_better=False))
    state = fit(job, settings(6, eval_every=2), TrainerState(), accelerator)
    assert (state.step, state.best_step, state.best_score, state.stopped_early) == (6, 4, 1.0, False)


def test_non_finite_steps_are_skipped_and_counted_then_too_many_stop_with_one_line(tmp_path, accelerator):
    calls = []

    def sometimes_nan(batch: dict) -> dict:
        calls.append(1)
        value = (job.model(batch["x"]) ** 2).mean()
        value = value * float("nan") if len(calls) in (2, 4, 5) else value  # micro batches = steps here
        return {"loss": value}

    job = toy_job(tmp_path, accelerator, 3, loss=sometimes_nan)
    before = [p.detach().clone() for p in job.model.parameters()]
    state = fit(job, settings(3), TrainerState(), accelerator)
    assert (state.step, state.bad_steps) == (3, 1)
    assert not torch.equal(before[0], next(job.model.parameters()))
    calls.clear()
    (tmp_path / "again").mkdir()
    job = toy_job(tmp_path / "again", accelerator, 6, loss=sometimes_nan)
    with pytest.raises(UsageError, match=r"training diverged: non-finite loss at 3 steps, the last at step 5 "
                                         r"\(toy.max_bad_steps=2\)"):
        fit(job, settings(6), TrainerState(), accelerator)


def test_task_batches_fill_the_last_step_with_the_epochs_first_examples():
    """10 examples in global batches of 4: 3 steps an epoch, every example in every epoch, the first two of the
    epoch's order once more to fill the last step; a train-style layout skips the tail instead."""
    filled = StepLayout.of(10, 2, 2, 1, fills_last=True)
    assert (filled.steps_per_epoch, filled.filled_epoch) == (3, 12)
    batches = epoch_micro_batches(np.ones(10, dtype=np.int64), 2, seed=5, epoch=0, group_window=1,
                                  fill=filled.filled_epoch)
    order = np.random.default_rng([5, 0]).permutation(10)
    assert sorted(batches.flatten().tolist()) == sorted([*range(10), *order[:2].tolist()])
    assert StepLayout.of(10, 2, 2, 1).steps_per_epoch == 2
    assert StepLayout.of(3, 4, 1, 2, fills_last=True).steps_per_epoch == 1  # fewer examples than a batch: one step
