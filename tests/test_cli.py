"""The `distil` command line: help, --cfg, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from distilbert_cli.cli import COMMANDS, app

runner = CliRunner()


def test_help_lists_every_stage_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ["prepare-data", "init-student", "train", "distill", "finetune", "evaluate", "eval-glue", "bench-cpu",
                 "report", "sweep"]:
        assert name in result.output


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_each_command_prints_its_composed_config(command):
    result = runner.invoke(app, [command, "run_dir=runs/x", "--cfg"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["run_dir"] == "runs/x"


def test_train_triple_loss_config_has_paper_weights():
    result = runner.invoke(app, ["train", "+experiment=triple_loss", "--cfg"])
    assert result.exit_code == 0, result.output
    loss = yaml.safe_load(result.output)["loss"]
    assert (loss["alpha_ce"], loss["alpha_mlm"], loss["alpha_cos"], loss["temperature"]) == (5.0, 2.0, 1.0, 2.0)


@pytest.mark.parametrize(("command", "alias"), [("train", "distill"), ("evaluate", "eval-glue")])
def test_aliases_compose_the_same_config(command, alias):
    expected = runner.invoke(app, [command, "seed=3", "--cfg"]).output
    assert runner.invoke(app, [alias, "seed=3", "--cfg"]).output == expected


def test_renamed_glue_keys_still_work_with_a_note():
    result = _run_cli("finetune", "glue=rte", "glue.data_dir=some/dir", "finetune.max_seq_length=64", "--cfg")
    assert result.returncode == 0, result.stderr
    task = yaml.safe_load(result.stdout)["task"]
    assert (task["names"], task["data_dir"], task["max_seq_length"]) == (["rte"], "some/dir", 64)
    assert result.stderr.splitlines() == ["note: glue is now task", "note: glue.data_dir is now task.data_dir",
                                          "note: finetune.max_seq_length is now task.max_seq_length"]


def test_a_run_level_preset_gives_each_command_only_its_own_sections():
    init = yaml.safe_load(runner.invoke(app, ["init-student", "+experiment=random_init", "--cfg"]).output)
    train = yaml.safe_load(runner.invoke(app, ["train", "+experiment=random_init", "--cfg"]).output)
    assert init["init"]["strategy"] == "random" and "loss" not in init
    assert "init" not in train and train["loss"]["alpha_ce"] == 5.0


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "distilbert_cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_unknown_key_exits_2_with_one_line_naming_it():
    result = _run_cli("train", "not_a_key=1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not_a_key" in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=abc", "seed='abc': input should be a valid integer"),
    ("overwrite=maybe", "overwrite='maybe': input should be a valid boolean"),
    ("loss=no_such_loss", "no_such_loss"),
    ("+experiment=no_such_experiment", "no_such_experiment"),
    ("loss.temperature=[1,2]", "loss.temperature=[1, 2]: input should be a valid number"),
])
def test_bad_values_exit_2_with_one_line(override, expected):
    result = runner.invoke(app, ["train", override])
    assert result.exit_code == 2
    assert expected in result.output and len(result.output.strip().splitlines()) == 1


def test_type_check_accepts_matching_types_and_group_keys():
    result = runner.invoke(app, ["train", "seed=7", "loss.temperature=4", "overwrite=true", "logger=none", "--cfg"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert (cfg["seed"], cfg["loss"]["temperature"], cfg["overwrite"], cfg["logger"]["name"]) == (7, 4, True, "none")


def test_missing_required_value_exits_2(tmp_path):
    result = runner.invoke(app, ["prepare-data", "data=local", f"run_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "data.paths" in result.output
