"""The config schema: values that would silently ruin a run, or crash it late, are refused before any work with
one line naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.errors import UsageError

runner = CliRunner()


@pytest.mark.parametrize(("command", "override", "message"), [
    ("train", "loss.temperature=nan", "loss.temperature=nan: input should be a finite number"),
    ("train", "loss.temperature=0", "loss.temperature=0: input should be greater than 0"),
    ("train", "loss.alpha_ce=-1", "loss.alpha_ce=-1: input should be greater than or equal to 0"),
    ("train", "optim.max_grad_norm=-1", "optim.max_grad_norm=-1: input should be greater than 0"),
    ("train", "optim.warmup_fraction=-0.5", "optim.warmup_fraction=-0.5: input should be greater than or equal to 0"),
    ("train", "optim.warmup_fraction=2", "optim.warmup_fraction=2: input should be less than or equal to 1"),
    ("train", "optim.lr=-1", "optim.lr=-1: input should be greater than 0"),
    ("train", "optim.lr=nan", "optim.lr=nan: input should be a finite number"),
    ("train", "optim.eps=-1", "optim.eps=-1: input should be greater than 0"),
    ("train", "optim.betas=[1.5,0.9]", "optim.betas.0=1.5: input should be less than 1"),
    ("train", "batch.num_workers=-1", "batch.num_workers=-1: input should be greater than or equal to 0"),
    ("train", "validation.batch_size=0", "validation.batch_size=0: input should be greater than or equal to 1"),
    ("train", "validation.max_sequences=0", "validation.max_sequences=0: input should be greater than or equal to 1"),
    ("train", "masking.mlm_probability=1.5", "masking.mlm_probability=1.5: input should be less than or equal to 1"),
    ("train", "masking.random_fraction=0.3", "masking.mask_fraction + masking.random_fraction = 1.1 exceeds 1"),
    ("train", "train.max_steps=0", "train.max_steps=0: input should be greater than or equal to 1"),
    ("train", "logger.mode=sometimes", "logger.mode='sometimes': input should be 'online', 'offline' or 'disabled'"),
    ("finetune", "finetune.seeds=[abc]", "finetune.seeds.0='abc': input should be a valid integer"),
    ("finetune", "finetune.warmup_ratio=1.5", "finetune.warmup_ratio=1.5: input should be less than or equal to 1"),
    ("prepare-data", "prepare.min_seq_length=600", "prepare.min_seq_length=600 exceeds prepare.max_seq_length=512"),
    ("init-student", "student.num_layers=0", "student.num_layers=0: input should be greater than or equal to 1"),
    ("init-student", "init.strategy=alternate", "init.strategy='alternate': input should be 'every_other'"),
    ("bench-cpu", "task=small", "bench-cpu times one task's dev set"),
    ("report", "report.bootstrap_resamples=1.5", "report.bootstrap_resamples=1.5: input should be a valid integer"),
])
def test_impossible_values_exit_2_with_one_line_naming_key_value_and_range(tmp_path, command, override, message):
    extra = ["data=local", "data.paths=[corpus.txt]"] if command == "prepare-data" else []
    result = runner.invoke(app, [command, f"run_dir={tmp_path}", *extra, override])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line, line
    assert not any(tmp_path.iterdir())  # nothing started


def test_unknown_keys_are_refused():
    with pytest.raises(UsageError, match="not in struct"):
        compose_config("train", ["loss.alpha_typo=1"])
    with pytest.raises(UsageError, match="report.extra: unknown key"):
        compose_config("report", ["+report.extra=1"])


def test_every_problem_is_named_in_the_one_line():
    with pytest.raises(UsageError, match=r"optim.lr=-1: .*; optim.eps=0: "):
        compose_config("train", ["optim.lr=-1", "optim.eps=0"])


def test_printing_the_config_validates_it_first():
    """--cfg prints what would run: a value the stage would refuse is the same one line, exit 2, not printed."""
    result = runner.invoke(app, ["train", "optim.betas.0=1.5", "--cfg"])
    assert result.exit_code == 2 and result.output.strip() == "error: optim.betas.0=1.5: input should be less than 1"
    printed = runner.invoke(app, ["train", "optim.lr=0.001", "--cfg"])
    assert printed.exit_code == 0 and "lr: 0.001" in printed.output
