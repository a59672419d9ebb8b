"""kill -9 at several phases and two runs at once: a killed stage is never complete, a second process on a live
stage is refused and touches nothing, a dead holder's lock is taken over, and a resumed run ends bit-identical
to an uninterrupted one (weights and logged metrics)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from builders import GLUE_DIR
from faults.harness import (
    TRAIN,
    assert_ok,
    assert_refused,
    assert_same_weights,
    digests,
    distil,
    logged,
    no_temporaries,
    paused,
    prepare_args,
    train,
)
from safetensors.torch import load_file

from distilbert_cli.rundir import lock_path, read_manifest

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_second_train_is_refused_while_the_first_runs_and_a_killed_run_resumes_bit_identical(
        run_dir, reference_run, tmp_path, monkeypatch):
    stage = run_dir / "distill"
    with paused("after-checkpoint-2", tmp_path, "train", *TRAIN, f"run_dir={run_dir}") as first:
        before, manifest = digests(stage), read_manifest(stage)
        holder = json.loads(lock_path(run_dir, "distill").read_text())
        assert holder["pid"] == first.pid
        assert_refused(train(run_dir), f"stage distill of {run_dir} is in use by pid {first.pid}",
                       holder["started_at"])
        assert_refused(train(run_dir, "overwrite=true"), f"in use by pid {first.pid}")
        assert digests(stage) == before and read_manifest(stage) == manifest  # nothing touched
    assert read_manifest(stage)["status"] == "running"  # killed: never complete

    # Resuming loads no pickle: a checkpoint cannot run code.
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    result = train(run_dir, "train.resume=auto")
    assert_ok(result)
    assert "took over the lock of stage distill from pid" in result.output
    assert read_manifest(stage)["resumed_from"].endswith("step-2")
    assert_same_weights(run_dir, reference_run)
    assert logged(run_dir) == logged(reference_run)  # same steps (3, 4), same averages


def test_a_run_killed_inside_a_checkpoint_resumes_from_the_one_before(run_dir, reference_run, tmp_path):
    with paused("inside-checkpoint-4", tmp_path, "train", *TRAIN, f"run_dir={run_dir}"):
        assert (run_dir / "distill" / "checkpoints" / ".tmp-step-4" / "optimizer.safetensors").is_file()
    assert_ok(train(run_dir, "train.resume=auto"))
    assert read_manifest(run_dir / "distill")["resumed_from"].endswith("step-2")
    no_temporaries(run_dir / "distill")
    assert_same_weights(run_dir, reference_run)
    assert logged(run_dir) == logged(reference_run)


def test_a_run_killed_during_validation_is_not_complete_and_finishes_on_resume(run_dir, reference_run, tmp_path):
    with paused("validation", tmp_path, "train", *TRAIN, f"run_dir={run_dir}"):
        assert (run_dir / "distill" / "final" / "model.safetensors").is_file()
    assert read_manifest(run_dir / "distill")["status"] == "running"
    assert_refused(distil("finetune", f"run_dir={run_dir}"), "input stage distill is not complete")
    assert_ok(train(run_dir, "train.resume=auto"))
    assert_same_weights(run_dir, reference_run)
    assert json.loads((run_dir / "distill" / "validation.json").read_text()) == \
        json.loads((reference_run / "distill" / "validation.json").read_text())


def test_second_prepare_data_is_refused_and_a_killed_one_reruns_to_the_same_fingerprint(
        tmp_path, tiny_teacher, corpus, inputs_run):
    run_dir = tmp_path / "run"
    args = prepare_args(run_dir, tiny_teacher, corpus)
    stage = run_dir / "prepare-data"
    with paused("tokenize", tmp_path, *args) as first:
        assert (stage / ".tmp-work" / "corpus.arrow").is_file()
        before = digests(stage)
        assert_refused(distil(*args), f"stage prepare-data of {run_dir} is in use by pid {first.pid}")
        assert digests(stage) == before  # the live run's folder is still there, untouched
    assert read_manifest(stage)["status"] == "running"
    result = distil(*args)
    assert_ok(result)
    assert "took over the lock of stage prepare-data from pid" in result.output
    no_temporaries(stage)
    # Byte-identical data, so the same fingerprint as the first run's (timings in stats.json are left out).
    assert read_manifest(stage)["fingerprint"] == read_manifest(inputs_run / "prepare-data")["fingerprint"]


# ---- finetune and task-distill: the same engine, the same exact resume ------------------------------------------

def finetune_args(run_dir: Path, model: Path) -> list[str]:
    return ["finetune", f"run_dir={run_dir}", f"finetune.models=[tiny:{model}]", "task.names=[sst2]",
            f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32", "finetune.seeds=[1,2]", "finetune.epochs=1",
            "finetune.batch_size=8", "finetune.max_train_samples=32", "finetune.max_eval_samples=8",
            "finetune.learning_rate=1e-3", "finetune.checkpoint_every=2", "finetune.log_every=1", "logger=none"]


def task_run_files(run: Path) -> dict:
    """What a finished fine-tuning or task-distillation run leaves, timings aside: its weights, predictions and
    logged losses."""
    from distilbert_cli.artifacts import read_jsonl

    return {"weights": load_file(run / "model" / "model.safetensors"),
            "predictions": (run / "predictions.jsonl").read_text(),
            "logged": [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(run / "metrics.jsonl")]}


def assert_same_run(ours: Path, theirs: Path) -> None:
    mine, reference = task_run_files(ours), task_run_files(theirs)
    assert mine["weights"].keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert torch.equal(mine["weights"][name], tensor), name
    assert mine["predictions"] == reference["predictions"] and mine["logged"] == reference["logged"]


def test_a_finetune_killed_in_its_second_run_keeps_the_first_and_resumes_the_second_bit_identical(
        tmp_path, tiny_teacher):
    reference = tmp_path / "reference"
    assert_ok(distil(*finetune_args(reference, tiny_teacher)))
    run_dir = tmp_path / "run"
    with paused("after-checkpoint-2-2", tmp_path, *finetune_args(run_dir, tiny_teacher)):
        pass  # seed 1 finished, seed 2 checkpointed at its step 2 of 4
    stage = run_dir / "finetune"
    assert read_manifest(stage)["status"] == "running"
    assert (stage / "tiny" / "sst2" / "seed-1" / "metrics.json").is_file()
    assert (stage / "tiny" / "sst2" / "seed-2" / "checkpoints" / "step-2").is_dir()
    result = distil(*finetune_args(run_dir, tiny_teacher), "finetune.resume=auto")
    assert_ok(result)
    assert "tiny sst2 seed 1: finished in an earlier attempt, kept" in result.output
    assert "resuming from" in result.output and "step-2 at step 2" in result.output
    for seed in (1, 2):
        assert_same_run(stage / "tiny" / "sst2" / f"seed-{seed}", reference / "finetune" / "tiny" / "sst2" /
                        f"seed-{seed}")
    assert read_manifest(stage)["fingerprint"] == read_manifest(reference / "finetune")["fingerprint"]


def test_a_task_distill_killed_in_its_prediction_step_resumes_bit_identical(tmp_path, tiny_teacher):
    """TinyBERT's two steps, killed after the prediction step's step-2 checkpoint: the resumed run keeps the
    transfer set, skips the finished intermediate step and ends as the uninterrupted run does."""
    teachers = tmp_path / "teachers"
    assert_ok(distil(*finetune_args(teachers, tiny_teacher)))
    teacher = teachers / "finetune" / "tiny" / "sst2" / "seed-1" / "model"
    args = ["task-distill", "task.names=[sst2]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32",
            f"task_distill.teacher={teacher}", f"task_distill.student={tiny_teacher}", "augment=tang",
            "augment.copies=1", "task_distill.max_train_samples=12", "task_distill.max_eval_samples=8",
            "task_distill.batch_size=8", "task_distill.epochs=null", "task_distill.max_steps=4",
            "task_distill.intermediate.epochs=1", "task_distill.checkpoint_every=2", "task_distill.log_every=1",
            "logger=none"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert_ok(distil(*args, f"run_dir={reference}"))
    with paused("after-checkpoint-2-2", tmp_path, *args, f"run_dir={run_dir}"):
        pass  # the intermediate step's checkpoint at step 2 came first
    student = run_dir / "task-distill" / "student" / "sst2" / "seed-56"
    assert (student / "checkpoints" / "prediction" / "step-2").is_dir()
    result = distil(*args, f"run_dir={run_dir}", "task_distill.resume=auto")
    assert_ok(result)
    assert "keeping the transfer set an earlier attempt built" in result.output
    assert_same_run(student, reference / "task-distill" / "student" / "sst2" / "seed-56")
