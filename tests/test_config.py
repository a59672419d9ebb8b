"""Every primary config, and every experiment and debug preset with the train config, composes; every key in
conf/ is read by the code; experiments hold only their deltas."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import distilbert_cli
from distilbert_cli.cli import COMMANDS
from distilbert_cli.config import CONF_DIR, compose_config
from distilbert_cli.training.losses import LOSS_TERMS
from distilbert_cli.training.task_losses import TASK_LOSS_TERMS

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PUBLIC_KEYS = {
    "prepare_data": ["run_dir", "overwrite", "seed", "teacher.name_or_path"],
    "init_student": ["run_dir", "overwrite", "seed", "teacher.name_or_path"],
    "train": ["run_dir", "overwrite", "seed", "teacher.name_or_path", "logger.name"],
    "finetune": ["run_dir", "overwrite", "seed", "task.names", "task.data_dir"],
    "task_distill": ["run_dir", "overwrite", "seed", "task.names", "task.data_dir", "augment.method",
                     "task_distill.teacher", "task_distill.student"],
    "evaluate": ["run_dir", "overwrite", "seed", "task.names", "task.data_dir"],
    "bench_cpu": ["run_dir", "overwrite", "seed", "task.names"],
    "export": ["run_dir", "overwrite", "seed", "task.names", "task.data_dir", "export.models"],
    "publish": ["run_dir", "overwrite", "seed", "publish.dry_run"],
    "report": ["run_dir", "overwrite", "seed"],
    "sweep": ["run_dir", "sweep.stages", "sweep.launcher", "sweep.parallel"],
}
SHARED_KEYS = {"run_dir", "overwrite", "seed", "trust_remote_code"}

# null means "found in the run dir" (train's teacher) or "the hub" (task.data_dir).
NULLABLE_KEYS = {"task.data_dir", "teacher.name_or_path"}
YAML_FILES = sorted(CONF_DIR.rglob("*.yaml"))
PACKAGE_SOURCE = "\n".join(path.read_text() for path in Path(distilbert_cli.__file__).parent.rglob("*.py"))
# Keys the code reads by a computed name: the loss registries' weights, loss_cfg[f"alpha_{name}"].
COMPUTED_KEYS = {f"alpha_{name}" for name in (*LOSS_TERMS, *TASK_LOSS_TERMS)}


def select(cfg, key: str, default="absent"):
    """The value at a dotted key of a validated config, or `default` where there is none."""
    node = cfg.model_dump()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def leaf_keys(node, prefix: str = "") -> list[str]:
    """Dotted names of the leaves of a YAML mapping (the entries of a list of mappings count as its keys)."""
    if isinstance(node, list):
        return [key for item in node if isinstance(item, dict) for key in leaf_keys(item, prefix)]
    if not isinstance(node, dict):
        return [prefix.rstrip(".")]
    return [key for name, value in node.items() if name != "defaults" for key in leaf_keys(value, f"{prefix}{name}.")]


@pytest.mark.parametrize("command", [c.config for c in COMMANDS])
def test_primary_config_composes_with_public_keys(command):
    cfg = compose_config(command)
    for key in PUBLIC_KEYS[command]:
        assert select(cfg, key) != "absent", key
        assert key in NULLABLE_KEYS or select(cfg, key) is not None, key


def test_there_are_experiments():
    assert "triple_loss" in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_train_and_debug(experiment):
    compose_config("train", [f"+experiment={experiment}", "+debug=tiny"])  # validated: every interpolation resolves


def test_local_data_paths_override():
    cfg = compose_config("prepare_data", ["data=local", "data.paths=[a.txt,b/*.jsonl]"])
    assert list(cfg.data.paths) == ["a.txt", "b/*.jsonl"]


@pytest.mark.parametrize("group", sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))
def test_every_group_option_is_used_by_some_primary_config(group):
    """A config group nobody can select is dead YAML."""
    primaries = [(CONF_DIR / f"{c.config}.yaml").read_text() for c in COMMANDS]
    assert group in ("experiment", "debug") or any(f"- {group}:" in text for text in primaries), group


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda path: str(path.relative_to(CONF_DIR)))
def test_every_leaf_key_is_read_by_the_code(path):
    """A key no code reads is a setting that silently does nothing."""
    for key in leaf_keys(yaml.safe_load(path.read_text()) or {}):
        name = key.rsplit(".", 1)[-1]
        read = name in COMPUTED_KEYS or re.search(rf"\.{name}\b|\[[\"']{name}[\"']\]", PACKAGE_SOURCE)
        assert read, f"{path.name}: {key} is read nowhere in distilbert_cli/"


@pytest.mark.parametrize("command", [c.config for c in COMMANDS])
def test_shared_keys_come_from_one_file(command):
    text = (CONF_DIR / f"{command}.yaml").read_text()
    assert "- common" in text
    assert not [key for key in SHARED_KEYS if re.search(rf"^{key}:", text, re.MULTILINE)], command
    assert set(compose_config(command).model_dump()) >= SHARED_KEYS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_hold_only_their_deltas(experiment):
    """Each value an experiment sets differs from the default of every command whose config has that key."""
    keys = leaf_keys(yaml.safe_load((CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()) or {})
    defaults = {c.config: compose_config(c.config) for c in COMMANDS}
    for key in keys:
        having = [command for command, cfg in defaults.items() if select(cfg, key) != "absent"]
        value = select(compose_config(having[0], [f"+experiment={experiment}"]), key) if having else None
        assert having and all(value != select(defaults[c], key) for c in having), (experiment, key)


# The paper's objective (Sanh et al. 2019: 5.0 L_ce + 2.0 L_mlm + 1.0 L_cos, T = 2) and each ablation of its
# Table 4 as one term removed; mlm_only is the no-distillation baseline. Every other weight stays 0.
TRIPLE = {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
PRESET_WEIGHTS = {
    "triple_loss": TRIPLE,
    "no_ce": {**TRIPLE, "ce": 0.0},
    "no_cos": {**TRIPLE, "cos": 0.0},
    "no_mlm": {**TRIPLE, "mlm": 0.0},
    "random_init": TRIPLE,
    "mlm_only": {"mlm": 1.0},
}


@pytest.mark.parametrize("experiment", PRESET_WEIGHTS)
def test_experiment_presets_set_the_papers_weights_and_init(experiment):
    train = compose_config("train", [f"+experiment={experiment}"])
    weights = {name: 0.0 for name in LOSS_TERMS} | PRESET_WEIGHTS[experiment]
    assert {name: getattr(train.loss, f"alpha_{name}") for name in LOSS_TERMS} == weights
    assert train.loss.temperature == 2.0 and not train.loss.restrict_ce_to_mask
    init = compose_config("init_student", [f"+experiment={experiment}"])
    assert init.init.strategy == ("random" if experiment == "random_init" else "every_other")
