"""Every primary config, and every experiment and debug preset with the train config, composes."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from distilbert_cli.cli import COMMANDS
from distilbert_cli.config import CONF_DIR, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PUBLIC_KEYS = {
    "prepare_data": ["run_dir", "overwrite", "seed", "teacher.name_or_path"],
    "init_student": ["run_dir", "overwrite", "seed", "teacher.name_or_path"],
    "train": ["run_dir", "overwrite", "seed", "teacher.name_or_path", "logger.name"],
    "finetune": ["run_dir", "overwrite", "seed", "glue.tasks", "glue.data_dir"],
    "eval_glue": ["run_dir", "overwrite", "seed", "glue.tasks", "glue.data_dir"],
    "bench_cpu": ["run_dir", "overwrite", "seed"],
    "report": ["run_dir", "overwrite"],
}


# null means "found in the run dir" (train's teacher) or "the hub" (glue.data_dir).
NULLABLE_KEYS = {"glue.data_dir", "teacher.name_or_path"}


@pytest.mark.parametrize("command", [c.config for c in COMMANDS])
def test_primary_config_composes_with_public_keys(command):
    cfg = compose_config(command)
    for key in PUBLIC_KEYS[command]:
        assert OmegaConf.select(cfg, key, default="absent", throw_on_missing=False) != "absent", key
        assert key in NULLABLE_KEYS or OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key


def test_there_are_experiments():
    assert "triple_loss" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_train_and_debug(experiment):
    cfg = compose_config("train", [f"+experiment={experiment}", "+debug=tiny"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_local_data_paths_override():
    cfg = compose_config("prepare_data", ["data=local", "data.paths=[a.txt,b/*.jsonl]"])
    assert list(cfg.data.paths) == ["a.txt", "b/*.jsonl"]


@pytest.mark.parametrize("group", sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))
def test_every_group_option_is_used_by_some_primary_config(group):
    """A config group nobody can select is dead YAML."""
    primaries = [(CONF_DIR / f"{c.config}.yaml").read_text() for c in COMMANDS]
    assert group in ("experiment", "debug") or any(f"- {group}:" in text for text in primaries), group
