"""Model and tokenizer loading: local directories work, bad paths and offline hub names are one-line errors."""

from __future__ import annotations

import pytest
from builders import build_tiny_bert
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_config, load_model, load_tokenizer


def test_loads_local_teacher(tiny_teacher):
    tokenizer = load_tokenizer(str(tiny_teacher))
    model = load_model(AutoModelForMaskedLM, str(tiny_teacher), role="teacher")
    assert tokenizer.is_fast and model.config.vocab_size == len(tokenizer)
    assert load_config(str(tiny_teacher)).num_hidden_layers == 12


def test_missing_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="teacher directory does not exist"):
        load_model(AutoModelForMaskedLM, str(tmp_path / "nope"), role="teacher")


def test_directory_without_a_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=f"teacher {tmp_path} has no config.json: not a saved model"):
        load_model(AutoModelForMaskedLM, str(tmp_path), role="teacher")


def test_unreachable_hub_name_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot load tokenizer from 'no-such-org/no-such-model'"):
        load_tokenizer("no-such-org/no-such-model")


def test_load_report_is_one_line_naming_unused_and_fresh_modules(tmp_path, caplog):
    checkpoint = build_tiny_bert(tmp_path / "mlm", num_layers=1)
    with caplog.at_level("INFO"):
        model, info = load_model(AutoModelForSequenceClassification, str(checkpoint), role="student",
                                 output_loading_info=True, num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and "classifier.weight" in info["missing_keys"]
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith(("transformers", "distilbert_cli"))]
    assert line.startswith(f"student {checkpoint} as BertForSequenceClassification: unused from the checkpoint: ")
    assert "cls.predictions.transform.dense (2)" in line
    assert line.endswith("initialised fresh: bert.pooler.dense (2), classifier (2)")
