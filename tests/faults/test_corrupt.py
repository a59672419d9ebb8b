"""Corrupt files: unreadable weights, configs and tokenizers, checkpoints and run-dir JSON files each end in one
`error: <file> is unreadable (<reason>)` line; a torn last line of metrics.jsonl is dropped with a warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faults.harness import assert_ok, assert_refused, assert_same_weights, copy_run, distil, logged, train

pytestmark = pytest.mark.faults


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))


def garbage(path: Path) -> None:
    path.write_text("{not json")


@pytest.mark.parametrize(("name", "corrupt", "reason"), [
    ("model.safetensors", truncate, "incomplete metadata, file not fully covered"),
    ("model.safetensors", random_bytes, "Error while deserializing header"),
    ("config.json", garbage, "Expecting property name"),
    ("tokenizer.json", garbage, "Expecting property name"),
])
def test_an_unreadable_teacher_file_is_one_line_naming_it(tmp_path, tiny_teacher, name, corrupt, reason):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    corrupt(teacher / name)
    run_dir = tmp_path / "run"
    result = distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", "student.num_layers=3")
    assert_refused(result, f"error: {teacher / name} is unreadable (", reason, stage_dir=run_dir / "init-student")


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _pickle_beside(path: Path) -> None:  # what Accelerate's save_state(safe_serialization=False) wrote
    (path.parent / "optimizer.bin").write_bytes(b"\x80\x04K\x01.")


@pytest.mark.parametrize(("name", "corrupt", "message"), [
    ("trainer_state.json", garbage, "trainer_state.json is unreadable (Expecting property name"),
    ("trainer_state.json", lambda p: _write(p, "{}"),
     "trainer_state.json is unreadable (it lacks step, tokens_seen, bad_steps, log_window, best_score, best_step, "
     "stale_evaluations, stopped_early, resume_state)"),
    ("optimizer.safetensors", random_bytes, "optimizer.safetensors is unreadable (Error while deserializing header"),
    ("optimizer.safetensors", truncate, "optimizer.safetensors is unreadable (Error while deserializing header"),
    ("scheduler.json", garbage, "scheduler.json is unreadable (Expecting property name"),
    ("model.safetensors", Path.unlink, "model.safetensors is unreadable (missing)"),
    ("model.safetensors", truncate, "model.safetensors is unreadable (Error while deserializing header"),
    ("model.safetensors", _pickle_beside, "is in the old pickle format (optimizer.bin), which is not loaded because "
                                          "unpickling can run code: pass train.resume=never to start over"),
])
def test_an_unreadable_checkpoint_is_one_line_naming_the_file(interrupted, name, corrupt, message):
    checkpoint = interrupted / "distill" / "checkpoints" / "step-2"
    corrupt(checkpoint / name)
    assert_refused(train(interrupted, "train.resume=auto"), f"error: {checkpoint}", message,
                   stage_dir=interrupted / "distill")


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(interrupted, reference_run):
    metrics = interrupted / "distill" / "metrics.jsonl"
    assert not metrics.exists()  # log_every=3: nothing logged by step 2
    metrics.write_text('{"step": 3, "loss": 5.1')  # a kill in the middle of writing a line
    result = train(interrupted, "train.resume=auto")
    assert_ok(result)
    assert "metrics.jsonl: dropped its last line, cut short by an interrupted write" in result.output
    assert_same_weights(interrupted, reference_run)
    assert logged(interrupted) == logged(reference_run)


def test_an_unreadable_input_manifest_is_one_line(run_dir):
    garbage(run_dir / "prepare-data" / "manifest.json")
    assert_refused(train(run_dir), f"error: {run_dir / 'prepare-data' / 'manifest.json'} is unreadable (Expecting",
                   stage_dir=run_dir / "distill")


def test_an_unreadable_manifest_of_the_stage_itself_needs_overwrite(interrupted):
    garbage(interrupted / "distill" / "manifest.json")
    assert_refused(train(interrupted, "train.resume=auto"), f"{interrupted / 'distill' / 'manifest.json'} is "
                   "unreadable (Expecting", "pass overwrite=true to replace the stage")
    assert (interrupted / "distill" / "checkpoints" / "step-2").is_dir()  # untouched


@pytest.fixture()
def distilled(reference_run, tmp_path) -> Path:
    return copy_run(reference_run, tmp_path)


def test_unreadable_validation_json_is_one_line(distilled):
    garbage(distilled / "distill" / "validation.json")  # the report verifies what it reads of the stages it reads
    assert_refused(distil("report", distilled), f"error: {distilled / 'distill' / 'validation.json'} has changed "
                   "since stage distill wrote it", stage_dir=distilled / "report")


def test_unreadable_results_json_is_one_line(distilled):
    evaluate = distilled / "evaluate"
    evaluate.mkdir()
    (evaluate / "manifest.json").write_text(json.dumps({"stage": "evaluate", "status": "complete"}))
    garbage(evaluate / "results.json")
    assert_refused(distil("report", distilled), f"error: {evaluate / 'results.json'} is unreadable",
                   stage_dir=distilled / "report")
