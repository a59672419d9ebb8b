"""Student construction: the teacher layers each strategy picks, and base-sized parameter counts."""

from __future__ import annotations

import pytest
import torch

from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import count_parameters
from distilbert_cli.models.student import (
    default_num_layers,
    init_student_weights,
    input_names,
    select_layers,
    student_config,
)


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
    ("first_k", 12, 1, [0]),  # a one-layer student is allowed
    ("uniform", 12, 1, [11]),
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
    (("alternate", 12, 6), r"^unknown init.strategy 'alternate' \(choose from every_other, uniform, first_k, last_k, "
                           r"explicit, random\)$"),
    (("explicit", 12, 3), r"^init.strategy=explicit needs init.layers, e.g. init.layers=\[0,2,4,7,9,11\]$"),
    (("first_k", 12, 0), "the student needs 1 to 12 layers"),
])
def test_select_layers_rejects_impossible_maps(args, message):
    with pytest.raises(UsageError, match=message):
        select_layers(*args)


def test_bert_base_shaped_parameter_counts():
    from transformers import AutoModelForMaskedLM, BertConfig

    with torch.device("meta"):  # shapes only, no 110M-parameter allocation
        teacher = AutoModelForMaskedLM.from_config(BertConfig())
        student = AutoModelForMaskedLM.from_config(student_config(BertConfig(), "distilbert", [0, 2, 4, 7, 9, 11]))
    assert 109e6 < count_parameters(teacher) < 111e6
    assert 66e6 <= count_parameters(student) <= 67e6


def test_explicit_layers_give_the_default_depth():
    assert default_num_layers(12, "explicit", [0, 1, 2, 3, 4, 5]) == 6
    assert default_num_layers(12, "every_other", None) == 6
    assert default_num_layers(1, "uniform", None) == 1


def test_distilbert_config_takes_the_teachers_settings():
    from transformers import BertConfig

    teacher = BertConfig(vocab_size=99, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                         max_position_embeddings=77, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3,
                         hidden_act="relu", initializer_range=0.05, pad_token_id=3, tie_word_embeddings=False)
    config = student_config(teacher, "distilbert", [0, 1], hidden_size=32)
    assert (config.vocab_size, config.max_position_embeddings, config.n_layers, config.dim, config.n_heads,
            config.hidden_dim) == (99, 77, 2, 32, 4, 128)  # the intermediate size scales with the width
    assert (config.dropout, config.attention_dropout, config.activation, config.initializer_range) == (
        0.2, 0.3, "relu", 0.05)
    assert config.pad_token_id == 3 and config.tie_word_embeddings is False
    assert config.sinusoidal_pos_embds is False  # learned positions, copied from the teacher
    assert input_names("distilbert") == ["input_ids", "attention_mask"] and input_names("same_arch") is None


def test_distilbert_config_warns_about_the_teachers_layer_norm_epsilon(caplog):
    from transformers import BertConfig

    with caplog.at_level("WARNING", logger="distilbert_cli"):
        student_config(BertConfig(layer_norm_eps=1e-12), "distilbert", [0, 1])
        assert not caplog.records
        student_config(BertConfig(layer_norm_eps=1e-5), "distilbert", [0, 1])
    assert [r.getMessage() for r in caplog.records] == [
        "the teacher's LayerNorm epsilon is 1e-05; DistilBERT's is fixed at 1e-12"]


def test_student_config_rejects_impossible_students():
    from transformers import BertConfig, ViTConfig

    with pytest.raises(UsageError, match=r"^unknown student\.arch 'tiny' \(choose from auto, distilbert, same_arch, "
                                         r"mobilebert\)$"):
        student_config(BertConfig(), "tiny", [0, 1])
    with pytest.raises(UsageError, match=r"^the student's hidden size 100 is not divisible by its 12 attention heads "
                                         r"\(set student.num_attention_heads\)$"):
        student_config(BertConfig(), "distilbert", [0, 1], hidden_size=100)
    with pytest.raises(UsageError, match="^the teacher is a 'vit' model, which is not supported"):
        student_config(ViTConfig(num_attention_heads=12), "same_arch", [0, 1])


@pytest.mark.parametrize("copy_transform", [True, False])
def test_mlm_head_decoder_is_copied_and_its_transform_only_when_asked(copy_transform):
    from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    teacher_config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32)
    teacher = BertForMaskedLM(teacher_config)
    with torch.no_grad():
        for tensor in teacher.cls.parameters():  # no zero or one left that a fresh head would share
            tensor.normal_()
    student = AutoModelForMaskedLM.from_config(student_config(teacher_config, "distilbert", [1, 3]))
    init_student_weights(student, teacher, [1, 3], teacher_has_mlm_head=True, fold_token_type_embeddings=False,
                         copy_mlm_head_transform=copy_transform)
    head = teacher.cls.predictions
    assert torch.equal(student.vocab_projector.bias, head.bias)  # the decoder, whatever copy_transform says
    for ours, theirs in [(student.vocab_transform.weight, head.transform.dense.weight),
                         (student.vocab_transform.bias, head.transform.dense.bias),
                         (student.vocab_layer_norm.weight, head.transform.LayerNorm.weight)]:
        assert torch.equal(ours, theirs) is copy_transform
    assert torch.equal(student.distilbert.transformer.layer[1].ffn.lin1.weight,
                       teacher.bert.encoder.layer[3].intermediate.dense.weight)
