"""Shared fixtures: a tiny BERT teacher built in code (no hub access) and a per-test run directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 12-layer, 32-wide random BertForMaskedLM with its tokenizer, saved once per test session."""
    from builders import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-teacher"))


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    return tmp_path / "run"
