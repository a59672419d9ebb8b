"""`distil finetune`: placeholder until its own issue lands."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

from distilbert_cli.errors import UsageError


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    raise UsageError("distil finetune is not implemented yet")
