"""Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (a scheduler's stop) in a stage: its
workers end, the stage is marked failed, one `error: interrupted ...` line, exit 130; an interrupted train resumes
bit-identical. After a kill -9 the workers die with their parent."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
from faults.harness import TRAIN, assert_ok, assert_same_weights, logged, paused, prepare_args, train

from distilbert_cli.rundir import read_manifest

pytestmark = [pytest.mark.faults, pytest.mark.slow]
EXIT_TIMEOUT_S = 120


def stopped(child, signum: int, group: bool = True) -> str:
    """Send `signum` (to the child's whole process group, as a terminal does), wait for the exit; its stderr."""
    (os.killpg if group else os.kill)(child.pid, signum)
    _, stderr = child.communicate(timeout=EXIT_TIMEOUT_S)
    return stderr


def one_interrupt_line(child, stderr: str, *fragments: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert child.returncode == 130 and len(errors) == 1, (child.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "TimeoutError" not in stderr, stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_ctrl_c_in_a_multi_process_prepare_data_ends_its_workers_and_marks_the_stage_failed(
        tmp_path, tiny_teacher, corpus):
    run_dir = tmp_path / "run"
    with paused("tokenize-workers", tmp_path, *prepare_args(run_dir, tiny_teacher, corpus, "prepare.num_proc=2")) \
            as child:
        workers = psutil.Process(child.pid).children(recursive=True)
        assert len(workers) >= 2  # two tokenizing processes (and datasets' manager)
        stderr = stopped(child, signal.SIGINT)
    one_interrupt_line(child, stderr, f"error: interrupted by SIGINT (stage prepare-data of {run_dir} marked failed; "
                                      "rerun the same command to run it again)")
    assert read_manifest(run_dir / "prepare-data")["status"] == "failed"
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive


def test_the_workers_of_a_killed_prepare_data_die_with_it(tmp_path, tiny_teacher, corpus):
    with paused("tokenize-workers", tmp_path, *prepare_args(tmp_path / "run", tiny_teacher, corpus,
                                                            "prepare.num_proc=2")) as child:
        workers = psutil.Process(child.pid).children(recursive=True)
        assert workers
        os.kill(child.pid, signal.SIGKILL)  # no handler runs: the parent-death signal ends them
        child.wait(timeout=EXIT_TIMEOUT_S)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive


def test_sigterm_in_a_stage_marks_it_failed(tmp_path, tiny_teacher, corpus):
    run_dir = tmp_path / "run"
    with paused("tokenize", tmp_path, *prepare_args(run_dir, tiny_teacher, corpus)) as child:
        stderr = stopped(child, signal.SIGTERM, group=False)
    one_interrupt_line(child, stderr, f"error: interrupted by SIGTERM (stage prepare-data of {run_dir} marked failed")
    assert read_manifest(run_dir / "prepare-data")["status"] == "failed"
    assert not list((run_dir / "prepare-data").rglob(".tmp-*"))


def test_ctrl_c_before_any_stage_writes_nothing(tmp_path, tiny_teacher, corpus):
    run_dir = tmp_path / "run"
    with paused("compose", tmp_path, *prepare_args(run_dir, tiny_teacher, corpus)) as child:
        stderr = stopped(child, signal.SIGINT)
    one_interrupt_line(child, stderr, "error: interrupted by SIGINT before any stage started (nothing was written)")
    assert not run_dir.exists()


def test_an_interrupted_train_resumes_bit_identical(run_dir, reference_run, tmp_path):
    with paused("after-checkpoint-2", tmp_path, "train", *TRAIN, f"run_dir={run_dir}") as child:
        stderr = stopped(child, signal.SIGINT)
    one_interrupt_line(child, stderr, f"error: interrupted by SIGINT (stage distill of {run_dir} marked failed; rerun "
                                      "the same command to resume it)")
    assert read_manifest(run_dir / "distill")["status"] == "failed"
    assert_ok(train(run_dir, "train.resume=auto"))
    assert read_manifest(run_dir / "distill")["resumed_from"].endswith("step-2")
    assert_same_weights(run_dir, reference_run)
    assert logged(run_dir) == logged(reference_run)
