"""distil init-student: layer maps, exact weight copies, token-type folding, logits at init, RoBERTa, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import build_tiny_bert, build_tiny_roberta
from torch.testing import assert_close
from typer.testing import CliRunner

from distilbert_cli.artifacts import recorded_teacher
from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import count_parameters
from distilbert_cli.rundir import Run
from distilbert_cli.stages.init_student import run

SENTENCES = ["the city is large", "a small model was born in the river city during the war"]

# Each tensor of a DistilBERT layer and the BERT layer tensor it must equal.
DISTILBERT_LAYER_FROM_BERT = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def init_student(run_dir: Path, teacher: Path, *overrides: str) -> tuple[Path, dict]:
    overrides = [f"teacher.name_or_path={teacher}", f"run_dir={run_dir}", *overrides]
    model_dir = run(compose_config("init_student", overrides), overrides)
    return model_dir, json.loads((model_dir.parent / "manifest.json").read_text())


def load_masked_lm(path: Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(path).eval()


def batch_of(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(SENTENCES, padding=True, return_tensors="pt")


def test_every_other_copies_teacher_tensors_exactly(tiny_teacher, run_dir):
    model_dir, manifest = init_student(run_dir, tiny_teacher)  # the defaults: a BERT teacher gets the paper's
    teacher, student = load_masked_lm(tiny_teacher), load_masked_lm(model_dir)
    assert type(student).__name__ == "DistilBertForMaskedLM" and manifest["student_arch"] == "distilbert"
    assert manifest["layer_map"] == [0, 2, 4, 7, 9, 11]

    for i, teacher_index in enumerate(manifest["layer_map"]):
        teacher_layer = teacher.bert.encoder.layer[teacher_index].state_dict()
        student_layer = student.distilbert.transformer.layer[i].state_dict()
        assert len(student_layer) == len(teacher_layer) == 16
        for name, tensor in student_layer.items():
            module, param = name.rsplit(".", 1)
            assert torch.equal(tensor, teacher_layer[f"{DISTILBERT_LAYER_FROM_BERT[module]}.{param}"]), (i, name)

    teacher_embeddings, student_embeddings = teacher.bert.embeddings, student.distilbert.embeddings
    assert torch.equal(student_embeddings.word_embeddings.weight, teacher_embeddings.word_embeddings.weight)
    assert torch.equal(student_embeddings.LayerNorm.weight, teacher_embeddings.LayerNorm.weight)
    assert torch.equal(student_embeddings.LayerNorm.bias, teacher_embeddings.LayerNorm.bias)
    assert_close(student_embeddings.position_embeddings.weight,
                 teacher_embeddings.position_embeddings.weight + teacher_embeddings.token_type_embeddings.weight[0])

    head = teacher.cls.predictions
    for student_module, teacher_module in [(student.vocab_transform, head.transform.dense),
                                           (student.vocab_layer_norm, head.transform.LayerNorm)]:
        assert torch.equal(student_module.weight, teacher_module.weight)
        assert torch.equal(student_module.bias, teacher_module.bias)
    assert torch.equal(student.vocab_projector.weight, head.decoder.weight)
    assert torch.equal(student.vocab_projector.bias, head.bias)


def test_manifest_records_the_student_and_the_model_loads_in_a_fill_mask_pipeline(tiny_teacher, run_dir):
    from transformers import pipeline

    model_dir, manifest = init_student(run_dir, tiny_teacher)
    assert (model_dir / "model.safetensors").is_file()
    assert manifest["status"] == "complete"
    assert recorded_teacher(Run(run_dir)) == manifest["teacher"] == str(tiny_teacher.resolve())
    assert manifest["teacher_has_mlm_head"] is True
    assert (manifest["strategy"], manifest["student_arch"]) == ("every_other", "distilbert")
    assert manifest["fold_token_type_embeddings"] is True and manifest["copied_mlm_head_transform"] is True
    assert manifest["param_counts"] == {"teacher": count_parameters(load_masked_lm(tiny_teacher)),
                                        "student": count_parameters(load_masked_lm(model_dir))}
    assert manifest["param_counts"]["student"] < manifest["param_counts"]["teacher"]
    assert "token_type_ids" not in batch_of(model_dir)  # DistilBERT has no segments

    predictions = pipeline("fill-mask", model=str(model_dir))("the [MASK] is large")
    assert len(predictions) == 5 and all("sequence" in p for p in predictions)


@pytest.mark.parametrize(("fold", "equal"), [("true", True), ("false", False)])
def test_folding_token_type_embeddings_keeps_the_embedding_output(tiny_teacher, run_dir, fold, equal):
    model_dir, manifest = init_student(run_dir, tiny_teacher, f"fold_token_type_embeddings={fold}")
    assert manifest["fold_token_type_embeddings"] is equal
    teacher, student = load_masked_lm(tiny_teacher), load_masked_lm(model_dir)
    input_ids = batch_of(model_dir)["input_ids"]
    with torch.no_grad():
        teacher_output = teacher.bert.embeddings(input_ids=input_ids)
        student_output = student.distilbert.embeddings(input_ids)
    assert torch.allclose(student_output, teacher_output, atol=1e-5) is equal


def test_head_transform_copy_can_be_turned_off(tiny_teacher, run_dir):
    model_dir, manifest = init_student(run_dir, tiny_teacher, "copy_mlm_head_transform=false")
    assert manifest["copied_mlm_head_transform"] is False
    teacher, student = load_masked_lm(tiny_teacher), load_masked_lm(model_dir)
    assert not torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(student.vocab_projector.bias, teacher.cls.predictions.bias)  # the decoder is still copied


@pytest.mark.parametrize("student", ["distilbert", "same_arch"])
def test_student_with_every_teacher_layer_reproduces_the_teachers_logits(tiny_teacher, run_dir, student):
    model_dir, _ = init_student(run_dir, tiny_teacher, f"student={student}", "student.num_layers=12",
                                "init=explicit", f"init.layers={list(range(12))}")
    teacher, student_model = load_masked_lm(tiny_teacher), load_masked_lm(model_dir)
    batch = batch_of(model_dir)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student_logits = student_model(**batch).logits
    assert teacher_logits.abs().max() > 0.1  # a real signal to compare
    assert_close(student_logits, teacher_logits, atol=1e-5, rtol=1e-4)


def test_teacher_without_mlm_head_gives_a_fresh_head(tmp_path):
    teacher_dir = build_tiny_bert(tmp_path / "encoder", num_layers=4, with_mlm_head=False)
    model_dir, manifest = init_student(tmp_path / "run", teacher_dir)
    assert manifest["teacher_has_mlm_head"] is False and manifest["copied_mlm_head_transform"] is False
    assert manifest["layer_map"] == [0, 3]  # the default depth: half the teacher's 4 layers
    teacher, student = load_masked_lm(teacher_dir), load_masked_lm(model_dir)
    # Loading the encoder as a masked LM gives it a random head; the student must not copy it.
    assert not torch.equal(student.vocab_transform.weight, teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(student.distilbert.transformer.layer[1].ffn.lin1.weight,
                       teacher.bert.encoder.layer[3].intermediate.dense.weight)


def test_same_arch_copy_of_a_plain_encoder_keeps_its_hidden_states(tmp_path):
    from transformers import AutoModel

    teacher_dir = build_tiny_bert(tmp_path / "encoder", num_layers=4, with_mlm_head=False)
    model_dir, manifest = init_student(tmp_path / "run", teacher_dir, "student=same_arch", "student.num_layers=4",
                                       "init=explicit", "init.layers=[0,1,2,3]")
    assert manifest["student_arch"] == "same_arch" and manifest["fold_token_type_embeddings"] is False
    student = load_masked_lm(model_dir)
    assert type(student).__name__ == "BertForMaskedLM"
    batch = batch_of(model_dir)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(teacher_dir).eval()(**batch).last_hidden_state
        assert_close(student.bert(**batch).last_hidden_state, expected)


def test_roberta_teacher_gives_a_distilroberta_style_student(tmp_path):
    from transformers import pipeline

    teacher_dir = build_tiny_roberta(tmp_path / "roberta")
    model_dir, manifest = init_student(tmp_path / "run", teacher_dir)  # the defaults: no student= override
    assert manifest["layer_map"] == [0, 3] and manifest["copied_mlm_head_transform"] is True
    assert manifest["student_arch"] == "same_arch"  # what student.arch=auto resolved to
    teacher, student = load_masked_lm(teacher_dir), load_masked_lm(model_dir)
    assert type(student).__name__ == "RobertaForMaskedLM" and student.config.num_hidden_layers == 2
    assert torch.equal(student.roberta.encoder.layer[1].output.dense.weight,
                       teacher.roberta.encoder.layer[3].output.dense.weight)
    assert torch.equal(student.lm_head.layer_norm.weight, teacher.lm_head.layer_norm.weight)
    assert len(pipeline("fill-mask", model=str(model_dir))("a small<mask> city")) == 5


def test_roberta_student_with_every_layer_reproduces_the_teachers_logits(tmp_path):
    teacher_dir = build_tiny_roberta(tmp_path / "roberta")
    model_dir, _ = init_student(tmp_path / "run", teacher_dir, "student=same_arch", "student.num_layers=4",
                                "init=explicit", "init.layers=[0,1,2,3]")
    batch = batch_of(model_dir)
    with torch.no_grad():
        assert_close(load_masked_lm(model_dir)(**batch).logits, load_masked_lm(teacher_dir)(**batch).logits,
                     atol=1e-5, rtol=1e-4)


def test_distilbert_student_refuses_a_roberta_teacher(tmp_path):
    teacher_dir = build_tiny_roberta(tmp_path / "roberta")
    with pytest.raises(UsageError, match="student=distilbert needs a BERT or DistilBERT teacher.*use student=auto"):
        init_student(tmp_path / "run", teacher_dir, "student=distilbert")
    assert not (tmp_path / "run" / "init-student").exists()


def test_random_init_through_the_plain_strategy_key(tiny_teacher, run_dir):
    model_dir, manifest = init_student(run_dir, tiny_teacher, "init.strategy=random")
    assert manifest["layer_map"] == [None] * 6 and manifest["strategy"] == "random"
    assert manifest["fold_token_type_embeddings"] is False and manifest["copied_mlm_head_transform"] is False
    teacher, student = load_masked_lm(tiny_teacher), load_masked_lm(model_dir)
    assert not torch.equal(student.distilbert.embeddings.word_embeddings.weight,
                           teacher.bert.embeddings.word_embeddings.weight)
    query = student.distilbert.transformer.layer[0].attention.q_lin.weight
    assert not any(torch.equal(query, layer.attention.self.query.weight) for layer in teacher.bert.encoder.layer)


def test_narrower_student_needs_random_init(tiny_teacher, run_dir):
    narrow = ("student.hidden_size=16", "student.num_attention_heads=2")
    with pytest.raises(UsageError, match="student.hidden_size=16.*only be built with init.strategy=random"):
        init_student(run_dir, tiny_teacher, *narrow)
    model_dir, _ = init_student(run_dir, tiny_teacher, *narrow, "init=random")
    config = load_masked_lm(model_dir).config
    assert (config.dim, config.n_heads, config.hidden_dim, config.n_layers) == (16, 2, 32, 6)


runner = CliRunner()


def _not_bert_family(tmp_path: Path) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def _custom_code(tmp_path: Path) -> Path:
    """A checkpoint whose config names its own code (config.json `auto_map`), as hub repos with custom models do."""
    from transformers import BertConfig

    directory = tmp_path / "custom"
    config = BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32).to_dict()
    config.update(model_type="my_bert", auto_map={"AutoConfig": "modeling.MyConfig",
                                                  "AutoModelForMaskedLM": "modeling.MyModel"})
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "modeling.py").write_text("raise RuntimeError('custom code must not run')\n")
    return directory


@pytest.mark.parametrize(("teacher", "overrides", "message"), [
    (lambda tmp, tiny: tmp / "missing", [], "teacher directory does not exist"),
    (lambda tmp, tiny: _not_bert_family(tmp), [], "is a 'gpt2' model, which is not supported (supported: bert, "
                                                  "roberta, xlm-roberta, camembert, electra, deberta-v2, modernbert, "
                                                  "distilbert)"),
    (lambda tmp, tiny: _custom_code(tmp), [], "ships its own model code (auto_map ['AutoConfig', "
                                              "'AutoModelForMaskedLM']), which runs only with trust_remote_code=true"),
    (lambda tmp, tiny: tiny, ["init=explicit", "init.layers=[0,2,4,7,9,12]"], "teacher layers are 0..11"),
    (lambda tmp, tiny: tiny, ["init=explicit", "init.layers=[0,2,4]", "student.num_layers=6"],
     "has 3 layers but student.num_layers=6"),
    (lambda tmp, tiny: tiny, ["student.num_layers=13"], "the student needs 1 to 12 layers"),
    (lambda tmp, tiny: tiny, ["init=explicit"], "missing required config value(s): init.layers"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_teacher, teacher, overrides, message):
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["init-student", f"teacher.name_or_path={teacher(tmp_path, tiny_teacher)}",
                                 f"run_dir={run_dir}", *overrides])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (run_dir / "init-student" / "manifest.json").exists()


# ---- student=bilstm ---------------------------------------------------------------------------------

BILSTM = ["student=bilstm", "student.embedding_size=16", "student.hidden_size=8", "student.classifier_size=8"]


def test_bilstm_embeddings_are_the_teachers_projected_by_pca(tmp_path, tiny_teacher):
    from transformers import AutoModel, AutoModelForMaskedLM

    from distilbert_cli.models.bilstm import BiLSTMModel, projected_embeddings

    model_dir, manifest = init_student(tmp_path / "run", tiny_teacher, *BILSTM)
    student = AutoModel.from_pretrained(model_dir)
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher)
    assert type(student) is BiLSTMModel and student.config.vocab_size == teacher.config.vocab_size
    assert_close(student.embeddings.weight, projected_embeddings(teacher.get_input_embeddings().weight.detach(), 16))
    assert (manifest["student_arch"], manifest["layer_map"], manifest["strategy"]) == ("bilstm", [], "every_other")
    assert manifest["param_counts"]["student"] == count_parameters(student)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["model_input_names"] == [
        "input_ids", "attention_mask"]
    random_dir, _ = init_student(tmp_path / "random", tiny_teacher, *BILSTM, "init=random")
    assert not torch.allclose(AutoModel.from_pretrained(random_dir).embeddings.weight, student.embeddings.weight)


@pytest.mark.parametrize(("overrides", "message"), [
    (["init=uniform"], "init.strategy=uniform: a BiLSTM student has no teacher layers to choose"),
    (["student.embedding_size=64"], "student.embedding_size=64 exceeds the teacher's 32-wide input embeddings"),
    (["student.num_layers=2"], "Key 'num_layers' is not in struct"),
])
def test_bilstm_settings_that_cannot_be_built_exit_2(tmp_path, tiny_teacher, overrides, message):
    result = CliRunner().invoke(app, ["init-student", f"run_dir={tmp_path}", f"teacher.name_or_path={tiny_teacher}",
                                      *BILSTM, *overrides])
    assert result.exit_code == 2 and message in result.output, result.output
