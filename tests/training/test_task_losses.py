"""task-distill's loss terms against hand-computed values, and the plan of their weights."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from distilbert_cli.training.task_losses import TaskLossPlan, compute_task_losses, hard_label_loss

LN3 = math.log(3.0)


def plan(regression: bool = False, **weights) -> TaskLossPlan:
    return TaskLossPlan.from_config(OmegaConf.create({"alpha_mse": 0.0, "alpha_soft": 0.0, "alpha_hard": 0.0,
                                                      "temperature": 2.0, **weights}), regression)


def test_logit_mse_is_summed_over_the_outputs_and_averaged_over_the_examples():
    student, teacher = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    losses = compute_task_losses(plan(alpha_mse=1.0), student, {"teacher_logits": teacher})
    assert losses["mse"].item() == pytest.approx((5 + 2) / 2)


def test_soft_cross_entropy_at_temperature_times_t_squared():
    # T = 2: the teacher's [0, 2 ln 3] becomes [1/4, 3/4], the student's [0, 0] stays [1/2, 1/2].
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2 * LN3]])
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    losses = compute_task_losses(plan(alpha_soft=1.0), student, {"teacher_logits": teacher})
    assert losses["soft"].item() == pytest.approx(4 * kl, rel=1e-6)


def test_hard_labels_count_the_original_examples_only():
    logits, labels = torch.tensor([[0.0, LN3], [2.0, 0.0]]), torch.tensor([1, 0])
    assert hard_label_loss(logits, labels, torch.tensor([True, False]), False).item() == pytest.approx(-math.log(0.75))
    assert hard_label_loss(logits, labels, torch.tensor([False, False]), False).item() == 0.0
    scores = torch.tensor([[2.0], [0.5]])
    assert hard_label_loss(scores, torch.tensor([1.5, 3.0]), torch.tensor([True, True]), True).item() == (
        pytest.approx((0.25 + 6.25) / 2))


def test_the_total_is_the_weighted_sum_of_the_terms_used():
    student, teacher = torch.tensor([[0.0, LN3], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    batch = {"teacher_logits": teacher, "labels": torch.tensor([1, 1]), "augmented": torch.tensor([False, True])}
    losses = compute_task_losses(plan(alpha_mse=1.0, alpha_hard=0.5), student, batch)
    assert set(losses) == {"mse", "hard", "loss"}
    assert losses["mse"].item() == pytest.approx((1 + (LN3 - 1) ** 2 + 1) / 2)
    assert losses["loss"].item() == pytest.approx(losses["mse"].item() + 0.5 * -math.log(0.75))


def test_the_plan_says_what_the_terms_need():
    assert plan(alpha_hard=1.0).uses_teacher is False and plan(alpha_mse=1.0).uses_teacher is True
    assert plan(alpha_soft=1.0, alpha_mse=1.0).classes_only == ["soft"]
    assert plan(alpha_hard=1.0).used == ["hard"]
