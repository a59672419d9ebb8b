"""Class 1, readers are locked: a stage holds each input stage read-locked while it runs, so `train overwrite=true`
cannot replace distill/ while finetune reads it (one line naming the reader); and a reader whose input changed anyway
(a writer ignoring the lock, as an NFS mount with local locks allows) fails at its end instead of completing."""

from __future__ import annotations

import json

import pytest
from builders import GLUE_DIR
from faults.harness import assert_ok, assert_refused, copy_run, digests, distil, paused, train

from distilbert_cli.rundir import read_manifest, readers_path
from distilbert_cli.stages import finetune as finetune_stage

pytestmark = pytest.mark.faults
FINETUNE = ["finetune", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32",
            "finetune.models=[student]", "finetune.seeds=[3]", "finetune.epochs=1", "finetune.max_train_samples=8",
            "finetune.max_eval_samples=8", "finetune.batch_size=8"]


@pytest.fixture()
def distilled(reference_run, tmp_path):
    return copy_run(reference_run, tmp_path)


@pytest.mark.slow
def test_a_stage_being_read_is_not_rewritten_and_the_writer_names_the_reader(distilled, tmp_path):
    before = digests(distilled / "distill")
    with paused("finetune", tmp_path, *FINETUNE, f"run_dir={distilled}") as reader:
        assert_refused(train(distilled, "overwrite=true"), f"error: stage distill of {distilled} is being read by "
                       f"stage finetune of {distilled} (pid {reader.pid} on ", "wait for it to finish or stop it")
        assert digests(distilled / "distill") == before
    # The reader was killed: the kernel released its lock, and the writer clears the record it left.
    assert_ok(train(distilled, "overwrite=true"))
    assert not list(readers_path(distilled, "distill").iterdir())


def test_a_reader_whose_input_changed_while_it_ran_fails(distilled, monkeypatch):
    weights = distilled / "distill" / "final" / "model.safetensors"
    finetune_one = finetune_stage.finetune_one

    def rewritten_meanwhile(*args, **kwargs):
        weights.write_bytes(weights.read_bytes())  # same bytes, rewritten: a replaced file is not what was read
        return finetune_one(*args, **kwargs)

    monkeypatch.setattr(finetune_stage, "finetune_one", rewritten_meanwhile)
    assert_refused(distil(*FINETUNE, f"run_dir={distilled}"), f"error: input {weights} changed while stage finetune "
                   "read it (rewritten): this stage's outputs may not match it", stage_dir=distilled / "finetune")
    assert read_manifest(distilled / "finetune")["status"] == "failed"
    assert_refused(distil("evaluate", f"run_dir={distilled}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}"),
                   "input stage finetune is not complete (status 'failed')")


def test_a_reader_whose_input_stage_was_replaced_fails(distilled, monkeypatch):
    manifest = distilled / "distill" / "manifest.json"
    finetune_one = finetune_stage.finetune_one

    def replaced_meanwhile(*args, **kwargs):
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "sha256:" + "1" * 64}))
        return finetune_one(*args, **kwargs)

    monkeypatch.setattr(finetune_stage, "finetune_one", replaced_meanwhile)
    assert_refused(distil(*FINETUNE, f"run_dir={distilled}"), f"error: input stage distill of {distilled} changed "
                   "while stage finetune ran (now complete, fingerprint sha256:111", stage_dir=distilled / "finetune")
