"""Class 4, nothing complete without work: every stage checks its own output before it is marked complete. A bench
whose every backend was skipped, a report whose chart was never drawn, an init-student that left no tokenizer fail
with one line (distil train's own case, every step non-finite, is in test_values.py)."""

from __future__ import annotations

import pytest
from builders import GLUE_DIR
from faults.harness import assert_refused, copy_run, distil

from distilbert_cli.bench import measure
from distilbert_cli.rundir import read_manifest
from distilbert_cli.stages import report

pytestmark = pytest.mark.faults


def test_a_bench_whose_every_backend_was_skipped_fails(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.setattr(measure, "missing_packages", lambda backend: [] if backend == "eager" else ["onnxruntime"])
    run_dir = tmp_path / "run"
    result = distil("bench-cpu", f"run_dir={run_dir}", f"bench.models=[tiny:{tiny_teacher}]", "bench.backends=[onnx]",
                    "task=stsb", f"task.data_dir={GLUE_DIR}", "bench.max_examples=4", "bench.batch_sizes=[2]",
                    "bench.repeats=1", "bench.warmup_batches=0", "bench.check_examples=2", "bench.num_threads=1")
    assert_refused(result, "error: stage bench-cpu did no work: model tiny has no measurement: onnx skipped: "
                   "onnxruntime not installed", "the stage is failed, not complete", stage_dir=run_dir / "bench-cpu")
    assert read_manifest(run_dir / "bench-cpu")["status"] == "failed"


def test_a_report_whose_chart_was_not_drawn_fails(reference_run, tmp_path, monkeypatch):
    run_dir = copy_run(reference_run, tmp_path)
    monkeypatch.setattr(report, "plot_losses", lambda runs, path: True)  # says it drew, drew nothing
    assert_refused(distil("report", run_dir), "error: stage report did no work: report.md shows the chart "
                   "loss_curves.png, which was not drawn", stage_dir=run_dir / "report")


def test_an_init_student_that_left_no_tokenizer_fails(tmp_path, tiny_teacher, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", lambda self, *args, **kwargs: ())
    run_dir = tmp_path / "run"
    result = distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={tiny_teacher}",
                    "student.num_layers=2")
    missing = run_dir / "init-student" / "model" / "tokenizer_config.json"
    assert_refused(result, f"error: stage init-student did no work: {missing} is missing",
                   stage_dir=run_dir / "init-student")
