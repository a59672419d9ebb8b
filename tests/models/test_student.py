"""Student construction: the teacher layers each strategy picks, and base-sized parameter counts."""

from __future__ import annotations

import pytest
import torch

from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import count_parameters
from distilbert_cli.models.student import select_layers, student_config


@pytest.mark.parametrize(("strategy", "n_teacher", "n_student", "expected"), [
    ("every_other", 12, 6, [0, 2, 4, 7, 9, 11]),
    ("every_other", 6, 3, [0, 2, 5]),
    ("every_other", 12, 4, [0, 3, 8, 11]),
    ("every_other", 24, 6, [0, 4, 8, 15, 19, 23]),
    ("every_other", 4, 4, [0, 1, 2, 3]),
    ("uniform", 12, 6, [1, 3, 5, 7, 9, 11]),
    ("uniform", 12, 4, [2, 5, 8, 11]),
    ("uniform", 6, 3, [1, 3, 5]),
    ("uniform", 12, 5, [1, 3, 6, 8, 11]),  # floor((i + 1) * 12 / 5) - 1; rounding would give [1, 4, 6, 9, 11]
    ("uniform", 24, 7, [2, 5, 9, 12, 16, 19, 23]),
    ("first_k", 12, 3, [0, 1, 2]),
    ("last_k", 12, 3, [9, 10, 11]),
    ("random", 12, 2, [None, None]),
])
def test_select_layers(strategy, n_teacher, n_student, expected):
    assert select_layers(strategy, n_teacher, n_student) == expected


def test_select_layers_explicit():
    assert select_layers("explicit", 12, 3, [11, 0, 5]) == [11, 0, 5]


@pytest.mark.parametrize(("args", "message"), [
    (("explicit", 12, 3, [0, 5, 12]), r"teacher layers are 0\.\.11, got \[12\]"),
    (("explicit", 12, 3, [0, -1, 2]), r"got \[-1\]"),
    (("explicit", 12, 3, [0, 2]), "has 2 layers but student.num_layers=3"),
    (("explicit", 12, 3, None), "init.strategy=explicit needs init.layers"),
    (("every_other", 6, 12), "the student needs 1 to 6 layers"),
    (("random", 6, 7), "the student needs 1 to 6 layers"),
    (("every_other", 12, 3, [0, 1, 2]), "init.layers is only read by init.strategy=explicit"),
    (("alternate", 12, 6), "unknown init.strategy 'alternate'"),
])
def test_select_layers_rejects_impossible_maps(args, message):
    with pytest.raises(UsageError, match=message):
        select_layers(*args)


def test_bert_base_shaped_parameter_counts():
    from transformers import AutoModelForMaskedLM, BertConfig

    with torch.device("meta"):  # shapes only, no 110M-parameter allocation
        teacher = AutoModelForMaskedLM.from_config(BertConfig())
        student = AutoModelForMaskedLM.from_config(student_config(BertConfig(), "distilbert", 6))
    assert 109e6 < count_parameters(teacher) < 111e6
    assert 66e6 <= count_parameters(student) <= 67e6
