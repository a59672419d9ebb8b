"""A full disk at chosen points (writes that raise ENOSPC, as a full filesystem makes them): one line naming the
stage and the path, the stage failed, temporary files removed, an earlier complete checkpoint untouched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from faults.harness import (
    assert_ok,
    assert_refused,
    assert_same_weights,
    digests,
    distil,
    no_temporaries,
    prepare_args,
    train,
)

from distilbert_cli import rundir
from distilbert_cli.data import corpus as corpus_module
from distilbert_cli.rundir import read_manifest
from distilbert_cli.training import checkpoint

pytestmark = pytest.mark.faults


def disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_inside_a_checkpoint_keeps_the_one_before(run_dir, reference_run, monkeypatch):
    save = checkpoint._save_optimizer
    written = {}

    def save_until_full(state_dict, path: Path):
        if path.parent.name == ".tmp-step-4":
            written["step-2"] = digests(path.parent.parent / "step-2")
            path.write_bytes(b"\0" * 100)  # what fit before the disk filled up
            raise disk_full(path)
        save(state_dict, path)

    monkeypatch.setattr(checkpoint, "_save_optimizer", save_until_full)
    optimizer = run_dir / "distill" / "checkpoints" / ".tmp-step-4" / "optimizer.safetensors"
    assert_refused(train(run_dir), f"error: stage distill ran out of disk space writing {optimizer} (",
                   "MB free there now); temporary files removed, the stage is failed", stage_dir=run_dir / "distill")
    assert read_manifest(run_dir / "distill")["status"] == "failed"
    no_temporaries(run_dir / "distill")
    assert digests(run_dir / "distill" / "checkpoints" / "step-2") == written["step-2"]
    monkeypatch.undo()
    assert_ok(train(run_dir, "train.resume=auto"))  # the earlier checkpoint still resumes exactly
    assert_same_weights(run_dir, reference_run)


def test_full_disk_reported_as_text_by_a_library_is_recognised(run_dir, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    tmp = run_dir / "distill" / "checkpoints" / ".tmp-step-2"  # the error names no file: the last temporary written
    assert_refused(train(run_dir), f"error: stage distill ran out of disk space writing {tmp} (",
                   stage_dir=run_dir / "distill")
    no_temporaries(run_dir / "distill")


def test_full_disk_while_saving_the_final_student(run_dir, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def full(self, directory, *args, **kwargs):
        raise disk_full(Path(directory) / "tokenizer.json")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    assert_refused(train(run_dir), "error: stage distill ran out of disk space writing "
                   f"{run_dir / 'distill' / '.tmp-final' / 'tokenizer.json'}", stage_dir=run_dir / "distill")
    no_temporaries(run_dir / "distill")
    assert not (run_dir / "distill" / "final").exists()
    assert (run_dir / "distill" / "checkpoints" / "step-4" / "trainer_state.json").is_file()


def test_full_disk_in_prepare_data_even_for_the_failed_manifest(tmp_path, tiny_teacher, corpus, monkeypatch):
    run_dir = tmp_path / "run"
    write_arrow, write_text = corpus_module.write_text_arrow, rundir.write_text_atomic

    def arrow_until_full(documents, path: Path):
        path.write_bytes(b"\0" * 100)
        raise disk_full(path)

    def no_room_for_failed(path: Path, text: str):
        if '"status": "failed"' in text:
            raise disk_full(rundir.temporary_path(path))
        write_text(path, text)

    monkeypatch.setattr(corpus_module, "write_text_arrow", arrow_until_full)
    stage = run_dir / "prepare-data"
    assert_refused(distil(*prepare_args(run_dir, tiny_teacher, corpus)), "error: stage prepare-data ran out of disk "
                   f"space writing {stage / '.tmp-work' / 'corpus.arrow'}", stage_dir=stage)
    no_temporaries(stage)
    assert read_manifest(stage)["status"] == "failed"

    monkeypatch.setattr(rundir, "write_text_atomic", no_room_for_failed)
    assert_refused(distil(*prepare_args(run_dir, tiny_teacher, corpus)), "error: stage prepare-data ran out of disk "
                   "space", "its manifest could not even be marked failed ([Errno 28] No space left on device",
                   "so it still says running (never complete)", stage_dir=stage)
    no_temporaries(stage)
    assert read_manifest(stage)["status"] == "running"
    monkeypatch.setattr(corpus_module, "write_text_arrow", write_arrow)
    monkeypatch.setattr(rundir, "write_text_atomic", write_text)
    assert_ok(distil(*prepare_args(run_dir, tiny_teacher, corpus)))


def test_full_disk_before_the_stage_folder_exists(run_dir, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as os.pwrite raises it: no file name

    monkeypatch.setattr(rundir.os, "pwrite", full)
    assert_refused(train(run_dir), "error: distil train ran out of disk space ([Errno 28] No space left on device: "
                   f"'{run_dir / '.distill.lock'}')")
    assert not (run_dir / "distill").exists()
