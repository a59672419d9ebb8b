"""A tiny run (prepare-data and init-student done) shared by the fault tests, its uninterrupted distillation, and
a distillation interrupted after its first checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import write_corpus
from faults.harness import TRAIN, assert_ok, copy_run, distil, prepare_args, train

from distilbert_cli.config import compose_config
from distilbert_cli.stages import train as train_stage
from distilbert_cli.training import engine


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("fault-corpus") / "corpus.txt")


@pytest.fixture(scope="session")
def inputs_run(tmp_path_factory, tiny_teacher, corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("fault-inputs") / "run"
    assert_ok(distil(*prepare_args(run_dir, tiny_teacher, corpus)))
    assert_ok(distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={tiny_teacher}",
                     "student.num_layers=3"))
    return run_dir


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, inputs_run) -> Path:
    """The inputs distilled without interruption (the weights and metrics every resumed run must equal)."""
    run_dir = copy_run(inputs_run, tmp_path_factory.mktemp("fault-reference"))
    assert_ok(train(run_dir))
    return run_dir


@pytest.fixture()
def run_dir(inputs_run, tmp_path) -> Path:
    return copy_run(inputs_run, tmp_path)


class Interrupted(Exception):
    """Stands for a kill right after a checkpoint (tests/faults/test_kill.py kills real processes)."""


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory, inputs_run) -> Path:
    """A distillation stopped right after its step-2 checkpoint (status failed, checkpoints/step-2 complete)."""
    run_dir = copy_run(inputs_run, tmp_path_factory.mktemp("interrupted"))
    save = engine.save_checkpoint

    def save_then_stop(accelerator, out, state, *args):
        save(accelerator, out, state, *args)
        if state.step == 2:
            raise Interrupted

    overrides = [*TRAIN, f"run_dir={run_dir}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            train_stage.run(compose_config("train", overrides), overrides)
    return run_dir


@pytest.fixture()
def interrupted(interrupted_run, tmp_path) -> Path:
    return copy_run(interrupted_run, tmp_path)
