"""The whole pipeline through the `distil` CLI on a tiny teacher, a baseline run, and `distil report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builders import GLUE_DIR, write_corpus
from typer.testing import CliRunner

from distilbert_cli.artifacts import STAGES
from distilbert_cli.cli import app
from distilbert_cli.rundir import read_manifest

pytestmark = pytest.mark.slow  # every stage on tiny models, twice (~1 min on 2 cores)
runner = CliRunner()
FINETUNE_SMOKE = ["task.names=[rte]", f"task.data_dir={GLUE_DIR}", "finetune.epochs=1",
                  "finetune.max_train_samples=64", "finetune.max_eval_samples=32", "task.max_seq_length=64"]
TASK_DISTILL_SMOKE = ["task.names=[rte]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=64", "augment=tang",
                      "augment.copies=1", "task_distill.max_train_samples=64", "task_distill.max_eval_samples=32",
                      "task_distill.epochs=null", "task_distill.max_steps=2"]


def distil(*args: str) -> None:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output


def distilled_run(run_dir: Path, teacher: Path, corpus: Path, experiment: str) -> None:
    distil("prepare-data", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", "data=local",
           f"data.paths=[{corpus}]", "prepare.validation_size=12", "prepare.num_proc=1", "prepare.max_seq_length=64")
    distil("init-student", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", "student.num_layers=3",
           f"+experiment={experiment}")
    distil("train", f"run_dir={run_dir}", f"+experiment={experiment}", "+debug=tiny")


@pytest.fixture(scope="module")
def demo_like_runs(tmp_path_factory, tiny_teacher) -> tuple[Path, Path]:
    """As the demo: two distilled runs, a BiLSTM run; labels alone (finetune) and task distillation of the main run's
    student and of the BiLSTM from the main run's fine-tuned teacher; the teacher, the student and the BiLSTM timed."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus.txt")
    main, baseline, lstm = root / "triple_loss", root / "random_init", root / "bilstm"
    distilled_run(main, tiny_teacher, corpus, "triple_loss")
    distilled_run(baseline, tiny_teacher, corpus, "random_init")
    distil("init-student", f"run_dir={lstm}", f"teacher.name_or_path={tiny_teacher}", "student=bilstm",
           "student.embedding_size=16", "student.hidden_size=8", "student.classifier_size=8")
    distil("finetune", f"run_dir={main}", "finetune.models=[student,teacher]", *FINETUNE_SMOKE)
    for run_dir in (baseline, lstm):
        distil("finetune", f"run_dir={run_dir}", *FINETUNE_SMOKE)
    distil("task-distill", f"run_dir={main}", *TASK_DISTILL_SMOKE)
    teacher = main / "finetune" / "teacher" / "rte" / "seed-56" / "model"
    distil("task-distill", f"run_dir={lstm}", *TASK_DISTILL_SMOKE, f"task_distill.teacher={teacher}",
           f"task_distill.transfer_set={main / 'task-distill' / 'transfer'}")
    for run_dir in (main, baseline, lstm):
        distil("evaluate", f"run_dir={run_dir}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}")
    # As the demo: the task-distilled student and BiLSTM exported, timed as exported, their cards written.
    shipped = ",".join(f"{name}:{run / 'task-distill' / 'student' / 'rte' / 'seed-56' / 'model'}"
                       for name, run in (("distilbert-rte", main), ("bilstm-rte", lstm)))
    distil("export", f"run_dir={main}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=64",
           f"export.models=[{shipped}]", "export.parity_samples=16")
    distil("bench-cpu", f"run_dir={main}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}",
           "bench.backends=[eager,onnx_int8]", "bench.max_examples=8", "bench.warmup_batches=1", "bench.repeats=1",
           "bench.check_examples=4", f"bench.models=[teacher,{shipped}]")
    distil("publish", f"run_dir={main}")
    distil("report", str(main), f"report.baselines=[{baseline},{lstm}]", "report.teacher_note=a tiny random BERT")
    return main, baseline


def test_every_stage_of_the_run_is_complete(demo_like_runs):
    main, _ = demo_like_runs
    for stage in STAGES:
        assert read_manifest(main / stage)["status"] == "complete", stage


def test_the_report_links_the_model_cards_of_the_exported_models(demo_like_runs):
    main, _ = demo_like_runs
    report = (main / "report" / "report.md").read_text()
    for name in ("distilbert-rte", "bilstm-rte"):
        assert f"[model card](../publish/{name}/README.md)" in report
        assert (main / "report" / ".." / "publish" / name / "README.md").is_file()
    assert "BiLSTMForSequenceClassification, text-classification" in report


def test_report_compares_the_run_with_its_baseline(demo_like_runs):
    main, baseline = demo_like_runs
    report = (main / "report" / "report.md").read_text()
    validation = json.loads((baseline / "distill" / "validation.json").read_text())
    baseline_row = next(line for line in report.splitlines() if line.startswith("| random_init |"))
    assert f"{validation['student']['mlm_loss']:.3f}" in baseline_row and "random (published" not in baseline_row
    assert "-3.69 (published)" in baseline_row  # the paper's Table 4 figure for random init
    assert "| teacher |" in report and "a tiny random BERT" in report
    assert "- triple_loss vs random_init:\n  - validation MLM on uniform masks (BERT's objective): loss" in report
    # held-out MLM with intervals over the targets: both runs prepared the same data, so scored the same targets
    uniform_row = next(line for line in report.splitlines() if line.startswith("| random_init | uniform |"))
    assert f"| {validation['student']['uniform']['mlm_loss']:.3f} [" in uniform_row
    assert "paired over" in report and "Runs are compared on uniform masks first" in report
    # each downstream arm's budget, as its metrics.json says, and the protocol in the verdict
    metrics = json.loads((baseline / "finetune" / "student" / "rte" / "seed-56" / "metrics.json").read_text())
    assert (f"| random_init: student fine-tuned | rte | 56 | {metrics['budget']['total_steps']} | "
            f"{metrics['budget']['chosen_step']} | no | none (the last step's model) | "
            f"{metrics['train_seconds']:.1f} |") in report
    assert "fine-tuned at equal steps (no model selection" in report
    assert "95% paired-bootstrap interval" in report and "over 32 dev examples" in report  # RTE dev, capped at 32
    comparison, _ = read_manifest(main / "report")["downstream_comparisons"]  # vs random_init, vs bilstm
    assert comparison["resamples"] == 300 and comparison["low"] <= comparison["difference"] <= comparison["high"]
    assert "![loss curves](loss_curves.png)" in report and (main / "report" / "loss_curves.png").stat().st_size > 0
    assert "student (ours)" in report and "teacher (ours)" in report  # evaluate's Table 1, embedded
    bench = json.loads((main / "bench-cpu" / "results.json").read_text())  # bench-cpu's measurements and chart
    for row in bench["results"]:
        measured = f"{row['latency_ms']['median']:.2f}"
        assert f"| {row['model']} | {row['backend']} | {row['batch_size']} | {measured} |" in report
    assert "(bench-cpu-latency.png)" in report
    assert (main / "report" / "bench-cpu-latency.png").exists()
    assert read_manifest(main / "report")["baselines"] == [str(baseline), str(baseline.parent / "bilstm")]


def test_report_compares_task_distillation_with_labels_alone_and_places_every_model_by_speed(demo_like_runs):
    main, _ = demo_like_runs
    report = (main / "report" / "report.md").read_text()
    manifest = read_manifest(main / "report")
    assert [entry["run"] for entry in manifest["task_distillation"]] == ["triple_loss", "bilstm"]
    for entry in manifest["task_distillation"]:
        comparison = entry["comparison"]
        assert comparison["difference"] == pytest.approx(entry["distilled"] - entry["labels"])
        assert comparison["low"] <= comparison["difference"] <= comparison["high"]
    assert "## Task-specific distillation" in report and "| bilstm | BiLSTMModel" in report
    assert "- triple_loss: task-distilled" in report
    assert "Task-distilled students against the same students on labels alone: " in report
    assert "augment=tang, N=1; mse 1, T 1" in report
    assert [entry["protocol"] for entry in manifest["task_distillation"]] == [
        "at equal steps (no model selection: 2 steps each)"] * 2  # 64 rows in batches of 32; max_steps=2
    assert "| bilstm: task-distilled | rte | 56 | 2 | 2 | no | none (the last step's model) |" in report
    names = {point["name"]: point for point in manifest["accuracy_latency"]}
    assert set(names) == {"teacher", "triple_loss (labels)", "triple_loss (task-distilled)", "random_init (labels)",
                          "bilstm (labels)", "bilstm (task-distilled)"}
    # bench-cpu timed the exported task-distilled models: each run's student is placed by the one of its shape
    assert names["random_init (labels)"]["timed_as"] == "distilbert-rte"
    assert names["bilstm (labels)"]["timed_as"] == "bilstm-rte"
    assert "![accuracy vs latency](accuracy_latency.png)" in report and "| yes |" in report
    assert (main / "report" / "accuracy_latency.png").stat().st_size > 0
    assert "the teacher predicts" in report and "of masked tokens drawn uniformly" in report


def test_report_refuses_a_run_without_a_distill_stage(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "distill" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "empty"), f"report.baselines=[{tmp_path / 'nope'}]"])
    assert result.exit_code == 2 and "run directory not found" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "empty"), "report.bootstrap_resamples=-1"])
    assert result.exit_code == 2
    assert "report.bootstrap_resamples=-1: input should be greater than or equal to 0" in result.output


def test_rerunning_a_complete_stage_is_refused_in_one_line(demo_like_runs, tmp_path):
    main, _ = demo_like_runs
    copy = tmp_path / "copy"
    shutil.copytree(main / "report", copy / "report")
    shutil.copytree(main / "distill", copy / "distill")
    result = runner.invoke(app, ["report", str(copy)])
    assert result.exit_code == 2
    expected = f"error: stage already complete: {copy / 'report'} (pass overwrite=true to replace it)"
    assert result.output.strip() == expected
