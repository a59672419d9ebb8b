"""Sequence-classification tasks: their loss and soft-target (D) loss against hand-computed values, the head,
the encoding and what becomes a prediction."""

from __future__ import annotations

import math

import pytest
import torch
from builders import GLUE_DIR, build_tiny_bert, build_tiny_distilbert

from distilbert_cli.config import compose_config
from distilbert_cli.downstream.task_models import forward_inputs, load_task_model
from distilbert_cli.tasks import get_task

RTE, STSB = get_task("rte"), get_task("stsb")


def test_task_loss_by_hand():
    assert RTE.loss(torch.zeros(1, 2), {"labels": torch.tensor([0])}).item() == pytest.approx(math.log(2))
    # squared errors 1 and 4 -> mean 2.5
    assert STSB.loss(torch.tensor([[1.0], [3.0]]), {"labels": torch.tensor([0.0, 1.0])}).item() == 2.5


def test_fine_tuning_distillation_loss_by_hand():
    # Row 1: teacher logits [ln 3, 0] at T=2 -> p = [sqrt3, 1] / (sqrt3 + 1); student uniform. Row 2: equal -> 0.
    temperature = 2.0
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl_row1 = sum(pi * math.log(pi / 0.5) for pi in p)
    expected = (kl_row1 + 0.0) / 2 * temperature**2  # batch mean, times T^2
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    loss = RTE.soft_target_loss(student, teacher, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # regression: the teacher's score is the target (MSE): (1 - 3)^2 / 1
    assert STSB.soft_target_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), temperature).item() == 4.0


def test_distilbert_gets_no_token_type_ids(tmp_path):
    teacher = build_tiny_bert(tmp_path / "teacher", num_layers=1)
    student = build_tiny_distilbert(tmp_path / "student", teacher, num_layers=2)
    model = load_task_model(str(student), RTE, RTE.label_names, False, "student")
    assert "token_type_ids" not in forward_inputs(model)
    assert model.config.finetuning_task == "rte" and model.config.num_labels == 2
    from transformers import AutoTokenizer

    data = RTE.load_split("dev", str(GLUE_DIR)).select(range(4))
    settings = compose_config("finetune", ["task.max_seq_length=16"]).task
    encoded = RTE.encode(data, AutoTokenizer.from_pretrained(student), settings, with_token_type_ids=False,
                         training=True)
    assert sorted(encoded.column_names) == ["attention_mask", "input_ids", "labels"]
    assert max(len(ids) for ids in encoded["input_ids"]) == 16  # truncated, and not padded here
