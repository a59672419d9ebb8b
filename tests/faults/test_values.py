"""A run that did no work, or whose student validates to a non-finite loss, fails instead of completing; identical
runs give identical weights, and nothing a run writes needs unpickling. (Values that would ruin a run before it
starts, such as loss.temperature=nan or optim.max_grad_norm=-1, are refused by the schema: tests/test_schema.py.)"""

from __future__ import annotations

import pytest
from builders import inject_non_finite_losses
from faults.harness import assert_ok, assert_refused, assert_same_weights, train

from distilbert_cli.rundir import read_manifest
from distilbert_cli.stages import train as train_stage

pytestmark = pytest.mark.faults


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # every update skipped
def test_a_run_whose_every_step_was_skipped_fails(run_dir, monkeypatch):
    inject_non_finite_losses(monkeypatch)
    assert_refused(train(run_dir, "train.max_bad_steps=100"), "error: training did no work: all 4 steps had a "
                   "non-finite loss and were skipped", stage_dir=run_dir / "distill")
    assert read_manifest(run_dir / "distill")["status"] == "failed"


def test_a_non_finite_validation_loss_fails_the_run(run_dir, monkeypatch):
    monkeypatch.setattr(train_stage, "mlm_figures", lambda *args, **kwargs: {"mlm_loss": float("nan"),
                                                                               "mlm_accuracy": 0.0})
    assert_refused(train(run_dir), "error: the distilled student's validation MLM loss is nan",
                   stage_dir=run_dir / "distill")
    assert read_manifest(run_dir / "distill")["status"] == "failed"


def test_two_identical_runs_give_identical_weights_and_nothing_needs_unpickling(run_dir, reference_run):
    assert_ok(train(run_dir))
    assert_same_weights(run_dir, reference_run)
    assert read_manifest(run_dir / "distill")["fingerprint"] == read_manifest(reference_run / "distill")["fingerprint"]
    # No file in the run directory is a pickle (protocol 2+ starts with 0x80) or a torch zip archive.
    for path in run_dir.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path
