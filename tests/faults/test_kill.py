"""kill -9 at several phases and two runs at once: a killed stage is never complete, a second process on a live
stage is refused and touches nothing, a dead holder's lock is taken over, and a resumed run ends bit-identical
to an uninterrupted one (weights and logged metrics)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
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
