"""Rank-aware logging: the main process logs to the console and to the stage's log.txt."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from accelerate import PartialState

LOGGER_NAME = "distilbert_cli"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def distributed_state() -> PartialState:
    """The process group. Without a GPU, processes started by torchrun or `accelerate launch --cpu` form a
    gloo group: accelerate only does that when the first PartialState is created with cpu=True."""
    import torch

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return distributed_state().is_main_process


def wait_for_everyone() -> None:
    distributed_state().wait_for_everyone()


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not the stream of the moment the handler was
    made: that stream may since have been replaced and closed (pytest's capture, a wrapped console)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    """Console logging for the package; other ranks only report warnings and errors."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level if is_main_process() else logging.WARNING)
    if not any(isinstance(handler, _CurrentStderrHandler) for handler in logger.handlers):  # a stage's file log
        handler = _CurrentStderrHandler()                                                     # may be there already
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


def attach_file_log(path: Path) -> logging.Handler | None:
    """Also write the package's log records to `path` (main process only)."""
    if not is_main_process():
        return None
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    return handler


def detach_file_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger(LOGGER_NAME).removeHandler(handler)
        handler.close()
