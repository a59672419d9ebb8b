"""Inputs verified when consumed (a changed, missing or added file is one line naming it; timings are not part of
a fingerprint, so re-preparing the same data keeps a checkpoint resumable), binary regions anywhere in a corpus,
and undecodable GLUE rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from builders import GLUE_DIR
from faults.harness import assert_ok, assert_refused, assert_same_weights, distil, prepare_args, train

from distilbert_cli.rundir import read_manifest
from distilbert_cli.tasks import get_task

pytestmark = pytest.mark.faults


def test_a_model_file_changed_in_place_is_named(run_dir):
    weights = run_dir / "init-student" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8192:-4096] = bytes(4096)  # 4 KB overwritten, same size: the file still loads, with wrong weights
    weights.write_bytes(bytes(data))
    assert_refused(train(run_dir), f"error: {weights} has changed since stage init-student wrote it (sha256 ",
                   "restore it or run `distil init-student` again with overwrite=true", stage_dir=run_dir / "distill")


def test_a_missing_data_file_is_named(run_dir):
    arrow = next((run_dir / "prepare-data" / "dataset" / "validation").glob("*.arrow"))
    arrow.unlink()
    assert_refused(train(run_dir), f"error: {arrow} is missing: stage prepare-data wrote it",
                   stage_dir=run_dir / "distill")


def test_an_added_file_is_named(run_dir):
    added = run_dir / "prepare-data" / "tokenizer" / "added_tokens.json"  # it would change the tokenizer
    added.write_text('{"[NEW]": 999}')
    assert_refused(train(run_dir), f"error: {added} was added after stage prepare-data completed",
                   stage_dir=run_dir / "distill")


def test_re_prepared_identical_data_still_resumes_the_checkpoint(interrupted, reference_run, tiny_teacher, corpus):
    run_dir = interrupted
    before = read_manifest(run_dir / "prepare-data")
    assert_ok(distil(*prepare_args(run_dir, tiny_teacher, corpus, "overwrite=true")))
    after = read_manifest(run_dir / "prepare-data")
    assert json.loads((run_dir / "prepare-data" / "stats.json").read_text())["seconds"] > 0
    assert after["started_at"] >= before["started_at"] and after["fingerprint"] == before["fingerprint"]
    assert_ok(train(run_dir, "train.resume=auto"))
    assert read_manifest(run_dir / "distill")["resumed_from"].endswith("step-2")
    assert_same_weights(run_dir, reference_run)


def binary_tail_corpus(path, prose_lines: int = 200):
    """About 20 KB of prose, then a binary region (lines of random bytes, each with NUL bytes)."""
    rng = np.random.default_rng(0)
    prose = "".join(f"the history of the river {i} and the city is a good story\n" for i in range(prose_lines))
    binary = b"".join(rng.integers(1, 256, 60, dtype=np.uint8).tobytes().replace(b"\n", b"") + b"\0\0\n"
                      for _ in range(11))
    path.write_bytes(prose.encode() + binary)
    assert len(prose) > 8192  # past the part check_corpus_file sniffs
    return path


def test_a_binary_region_after_the_sniffed_head_is_refused_or_counted(tmp_path, tiny_teacher):
    corpus = binary_tail_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    result = distil(*prepare_args(run_dir, tiny_teacher, corpus, "data.bad_lines=fail"))
    assert_refused(result, f"error: {corpus}:201: binary data (a NUL byte) (data.bad_lines=fail",
                   stage_dir=run_dir / "prepare-data")
    assert_ok(distil(*prepare_args(run_dir, tiny_teacher, corpus, "data.bad_lines=skip")))
    stats = json.loads((run_dir / "prepare-data" / "stats.json").read_text())
    assert stats["bad_lines"]["count"] == 11 and stats["documents_read"] == 200


def test_a_tsv_row_that_is_not_utf8_is_a_malformed_row(tmp_path, caplog):
    task = get_task("rte")
    shutil.copytree(GLUE_DIR / "RTE", tmp_path / "RTE")
    train_tsv = tmp_path / "RTE" / "train.tsv"
    clean = task.load_split("train", str(tmp_path))
    lines = train_tsv.read_bytes().splitlines(keepends=True)
    lines.insert(3, b"999\tCaf\xe9 au lait is served.\tCoffee is served.\tentailment\n")  # latin-1 \xe9
    train_tsv.write_bytes(b"".join(lines))
    loaded = task.load_split("train", str(tmp_path))
    assert len(loaded) == len(clean)
    assert "skipped 1 malformed row(s)" in caplog.text and "first at line 4" in caplog.text
