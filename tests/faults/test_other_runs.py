"""Class 2, artifacts of other runs are verified: a path into another run's stage folder (a model entry, a reused
transfer set, a teacher) is that stage's input like one of the same run: complete, its digests matching, recorded
in the consumer's manifest; a stage left running by a kill, or a corrupted file, is one line."""

from __future__ import annotations

import json

import pytest
from builders import GLUE_DIR
from faults.harness import assert_ok, assert_refused, copy_run, distil

from distilbert_cli.rundir import read_manifest

pytestmark = pytest.mark.faults


def finetune(run_dir, model):
    return distil("finetune", f"run_dir={run_dir}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}",
                  "task.max_seq_length=32", f"finetune.models=[other:{model}]", "finetune.seeds=[3]",
                  "finetune.epochs=1", "finetune.max_train_samples=8", "finetune.max_eval_samples=8",
                  "finetune.batch_size=8")


@pytest.fixture()
def other(reference_run, tmp_path):
    """Another run with a complete distill stage."""
    return copy_run(reference_run, tmp_path / "other")


def test_a_model_from_another_runs_complete_stage_is_verified_and_recorded(other, tmp_path):
    final = other / "distill" / "final"
    assert_ok(finetune(tmp_path / "run", final))
    entry = next(i for i in read_manifest(tmp_path / "run" / "finetune")["inputs"] if i.get("role") == "model other")
    assert entry["from_stage"] == {"run_dir": str(other.resolve()), "stage": "distill",
                                   "fingerprint": read_manifest(other / "distill")["fingerprint"]}


def test_a_model_from_a_stage_left_running_by_a_kill_is_refused(other, tmp_path):
    manifest = other / "distill" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
    assert_refused(finetune(tmp_path / "run", other / "distill" / "final"), "error: input stage distill is not "
                   f"complete (status 'running'): {(other / 'distill').resolve()}",
                   stage_dir=tmp_path / "run" / "finetune")


def test_a_corrupted_file_of_another_run_is_named(other, tmp_path):
    tokenizer = other / "distill" / "final" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"[UNK]"', '"[unk]"'))  # still loads, means something else
    assert_refused(finetune(tmp_path / "run", other / "distill" / "final"),
                   f"error: {tokenizer.resolve()} has changed since stage distill wrote it",
                   stage_dir=tmp_path / "run" / "finetune")
