"""The family table, one tiny random teacher per family built in code: the weight map (an all-layers student
reproduces the teacher; every_other copies exact tensors), family-specific facts, defaults and the QA head."""

from __future__ import annotations

import logging

import pytest
import torch
from builders import TINY_TEACHERS
from torch.testing import assert_close
from transformers import AutoModelForMaskedLM, AutoModelForQuestionAnswering, AutoTokenizer

from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import (
    FAMILIES,
    TEACHER_FAMILIES,
    family_of,
    family_of_model,
    max_sequence_length,
    mlm_head,
)
from distilbert_cli.models.loading import load_frozen_teacher, load_masked_lm
from distilbert_cli.models.student import (
    default_num_layers,
    init_student_weights,
    resolve_arch,
    select_layers,
    student_config,
)

# Longer than ModernBERT's 8-token sliding window and DeBERTa's 16 position buckets.
SENTENCES = ["the city is large and the river is small", "a small model was born in the river city during the "
             "war of the first year, then the school had a new film about music and the world"]
# Tiny teacher -> its family, and the class of its default (student.arch=auto) student.
EXPECTED = {
    "bert": ("bert", "DistilBertForMaskedLM"),
    "roberta": ("roberta", "RobertaForMaskedLM"),
    "xlm-roberta": ("roberta", "XLMRobertaForMaskedLM"),
    "camembert": ("roberta", "CamembertForMaskedLM"),
    "electra": ("electra", "ElectraForMaskedLM"),
    "electra-discriminator": ("electra", "ElectraForMaskedLM"),
    "deberta-v2": ("deberta-v2", "DebertaV2ForMaskedLM"),
    "deberta-v2-legacy-head": ("deberta-v2", "DebertaV2ForMaskedLM"),
    "modernbert": ("modernbert", "ModernBertForMaskedLM"),
    "distilbert": ("distilbert", "DistilBertForMaskedLM"),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def teacher(request, tmp_path_factory):
    """(name, directory, masked LM, whether it has an MLM head) of one family's 4-layer tiny teacher."""
    directory = TINY_TEACHERS[request.param](tmp_path_factory.mktemp(request.param), num_layers=4)
    model, has_head = load_masked_lm(str(directory))
    return request.param, directory, model.eval(), has_head


def build_student(teacher_model, has_head: bool, layer_map, arch: str = "auto"):
    torch.manual_seed(0)
    student = AutoModelForMaskedLM.from_config(student_config(teacher_model.config, arch, layer_map))
    init_student_weights(student, teacher_model, layer_map, has_head, fold_token_type_embeddings=True,
                         copy_mlm_head_transform=True)
    return student.eval()


def batch_for(model, directory):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert batch["input_ids"].shape[1] > 16 and not batch["attention_mask"].all()  # padding is in play
    return {name: tensor for name, tensor in batch.items() if name != "token_type_ids"}


def test_every_tiny_teacher_has_its_family(teacher):
    name, _, model, has_head = teacher
    assert family_of_model(model).name == EXPECTED[name][0]
    assert has_head is (name != "electra-discriminator")  # the discriminator is a headless teacher


def test_all_layers_student_reproduces_the_teacher(teacher):
    name, directory, model, has_head = teacher
    student = build_student(model, has_head, list(range(4)))
    assert type(student).__name__ == EXPECTED[name][1]
    batch = batch_for(model, directory)
    with torch.no_grad():
        if has_head:
            expected, got = model(**batch).logits, student(**batch).logits
        else:  # no teacher logits: the encoders must agree
            expected, got = model.base_model(**batch).last_hidden_state, student.base_model(**batch).last_hidden_state
    assert expected.abs().max() > 0.05  # a real signal to compare
    real = batch["attention_mask"].bool()
    assert_close(got[real], expected[real], atol=1e-5, rtol=1e-4)


def test_every_other_copies_exact_tensors(teacher):
    name, _, model, has_head = teacher
    layer_map = select_layers("every_other", 4, 2)
    student = build_student(model, has_head, layer_map, arch="same_arch")
    family = family_of(model.config)
    student_layers, teacher_layers = student.get_submodule(family.layers), model.get_submodule(family.layers)
    for i, source in enumerate(layer_map):
        student_layer, teacher_layer = student_layers[i].state_dict(), teacher_layers[source].state_dict()
        assert student_layer.keys() == teacher_layer.keys()
        for tensor_name, tensor in student_layer.items():
            assert torch.equal(tensor, teacher_layer[tensor_name]), (i, tensor_name)
    # Everything outside the layers (embeddings, their projection or norm, relative positions, final norm, the
    # MLM head when the teacher has one) is the teacher's own tensor.
    layer_prefix, teacher_state = f"{family.layers}.", model.state_dict()
    outside = [key for key in student.state_dict() if not key.startswith(layer_prefix)
               and (has_head or key.startswith(f"{student.base_model_prefix}."))]
    assert len(outside) >= 3
    for key in outside:
        assert torch.equal(student.state_dict()[key], teacher_state[key]), key


@pytest.mark.parametrize("name", ["bert", "electra", "deberta-v2", "deberta-v2-legacy-head", "modernbert",
                                  "distilbert", "xlm-roberta"])
def test_the_family_mlm_head_gives_the_models_logits(tmp_path, name):
    model, _ = load_masked_lm(str(TINY_TEACHERS[name](tmp_path / name, num_layers=1)))
    batch = batch_for(model, tmp_path / name)
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
        assert_close(mlm_head(model.eval())(hidden), model(**batch).logits)
    assert mlm_head(model.base_model) is None


def test_modernbert_student_layers_keep_their_teachers_attention(tmp_path, caplog):
    model, _ = load_masked_lm(str(TINY_TEACHERS["modernbert"](tmp_path / "modernbert")))
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert student_config(model.config, "auto", [0, 3]).layer_types == ["full_attention", "full_attention"]
    assert student_config(model.config, "auto", [None] * 3).layer_types == model.config.layer_types[:3]
    # Layer 0 has no pre-attention norm: moving layers around it is reported, not hidden.
    with caplog.at_level(logging.WARNING):
        student = build_student(model, True, [1, 0])
    assert [layer.attention_type for layer in student.model.layers] == ["sliding_attention", "full_attention"]
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "kept fresh (nothing to copy): model.layers.1.attn_norm.weight" in warning
    assert "not copied (no place in the student): model.layers.1.attn_norm.weight" in warning


def test_deberta_student_keeps_the_relative_position_buckets(tmp_path):
    model, _ = load_masked_lm(str(TINY_TEACHERS["deberta-v2"](tmp_path / "deberta")))
    config = student_config(model.config, "auto", [0, 3])
    assert (config.position_buckets, config.max_relative_positions, config.relative_attention) == (16, -1, True)
    student = build_student(model, True, [0, 3])
    assert torch.equal(student.deberta.encoder.rel_embeddings.weight, model.deberta.encoder.rel_embeddings.weight)


def test_electra_student_keeps_the_embedding_projection(tmp_path):
    model, _ = load_masked_lm(str(TINY_TEACHERS["electra"](tmp_path / "electra")))
    student = build_student(model, True, [0, 3])
    assert student.config.embedding_size == 16 and student.config.hidden_size == 32
    assert torch.equal(student.electra.embeddings_project.weight, model.electra.embeddings_project.weight)


def test_student_checkpoints_load_with_a_question_answering_head(teacher, tmp_path):
    name, directory, model, has_head = teacher
    build_student(model, has_head, [0, 3]).save_pretrained(tmp_path)
    qa = AutoModelForQuestionAnswering.from_pretrained(tmp_path).eval()
    batch = batch_for(model, directory)
    with torch.no_grad():
        outputs = qa(**batch)
    assert outputs.start_logits.shape == outputs.end_logits.shape == batch["input_ids"].shape


@pytest.mark.parametrize(("teacher_layers", "student_layers"), [(12, 6), (24, 12), (6, 3), (4, 2), (22, 11), (1, 1)])
def test_default_depth_is_half_the_teachers(teacher_layers, student_layers):
    assert default_num_layers(teacher_layers, "every_other", None) == student_layers


def test_auto_is_distilbert_for_bert_only():
    assert {family.name: resolve_arch("auto", family) for family in FAMILIES} == {
        "bert": "distilbert", "roberta": "same_arch", "electra": "same_arch", "deberta-v2": "same_arch",
        "modernbert": "same_arch", "distilbert": "same_arch", "mobilebert": "same_arch"}
    assert resolve_arch("same_arch", FAMILIES[0]) == "same_arch"


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UsageError, match=r"'gpt2' model, which is not supported \(supported: bert, roberta, "
                                         r"xlm-roberta, camembert, electra, deberta-v2, modernbert, distilbert\)"):
        family_of(GPT2Config(), among=TEACHER_FAMILIES)


def test_a_model_without_its_familys_layout_is_refused(tiny_teacher):
    from transformers import AutoModel

    with pytest.raises(UsageError, match="BertModel without the bert layout"):
        family_of_model(AutoModel.from_pretrained(tiny_teacher))


def test_max_sequence_length_leaves_out_robertas_rows_before_the_first_position():
    from transformers import BertConfig, GPT2Config, ModernBertConfig, XLMRobertaConfig

    assert max_sequence_length(XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert max_sequence_length(BertConfig(max_position_embeddings=512, pad_token_id=0)) == 512
    assert max_sequence_length(ModernBertConfig(max_position_embeddings=8192, pad_token_id=0, vocab_size=10,
                                                bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                sep_token_id=2)) == 8192
    assert max_sequence_length(GPT2Config(n_positions=1024)) == 1024  # outside the table: its position table


def test_every_family_has_a_tiny_teacher():
    assert {family for family, _ in EXPECTED.values()} == {family.name for family in TEACHER_FAMILIES}
    assert set(EXPECTED) == set(TINY_TEACHERS)


def test_deberta_checkpoints_with_the_original_head_load_it(tmp_path, caplog):
    """DeBERTa's released checkpoints hold the `lm_predictions` head, and their config.json does not name a layout,
    which transformers reads as its `cls.predictions` (legacy) layout: the head must still be found, copied, and
    be the frozen teacher's in train."""
    directory = TINY_TEACHERS["deberta-v2"](tmp_path / "deberta")
    assert "legacy" not in (directory / "config.json").read_text()
    with caplog.at_level(logging.INFO):
        model, has_head = load_masked_lm(str(directory))
    assert has_head and model.legacy is False and "trying {'legacy': False}" in caplog.text
    student = build_student(model, has_head, [0, 3])
    assert torch.equal(student.lm_predictions.lm_head.dense.weight, model.lm_predictions.lm_head.dense.weight)
    assert load_frozen_teacher(str(directory), True, False).legacy is False
