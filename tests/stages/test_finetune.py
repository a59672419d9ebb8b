"""finetune and evaluate: epochs per task, bad inputs (exit 2), and a tiny end-to-end on real RTE rows."""

from __future__ import annotations

import json

import pytest
from builders import GLUE_DIR, build_tiny_bert, build_tiny_distilbert
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.models.run_models import ModelChoice, resolve_models
from distilbert_cli.rundir import open_stage, read_manifest
from distilbert_cli.stages import evaluate, finetune
from distilbert_cli.tasks import get_task, glue

runner = CliRunner()


def test_run_glue_epochs_five_for_mrpc_and_wnli_three_otherwise():
    cfg = compose_config("finetune")
    assert {name: finetune.epochs_for(cfg, glue.TASKS[name]) for name in glue.TASKS} == {
        "cola": 3, "sst2": 3, "mrpc": 5, "stsb": 3, "qqp": 3, "mnli": 3, "qnli": 3, "rte": 3, "wnli": 5}
    assert finetune.epochs_for(compose_config("finetune", ["finetune.long_tasks=[MRPC]"]), glue.TASKS["mrpc"]) == 5


# ---- bad input: one line, exit 2 ----------------------------------------------------------------

def _invoke(command, *overrides):
    result = runner.invoke(app, [command, *overrides])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    teacher = build_tiny_bert(root / "teacher", num_layers=2)
    return {"teacher": teacher, "student": build_tiny_distilbert(root / "student", teacher, num_layers=2)}


def test_unknown_task_exits_2(tmp_path):
    code, output = _invoke("finetune", "task.names=[rte,sst3]", f"run_dir={tmp_path}")
    assert code == 2 and "unknown task 'sst3'" in output


def test_data_dir_missing_task_files_exits_2(tmp_path, tiny_models):
    code, output = _invoke("finetune", "task.names=[rte]", f"task.data_dir={tmp_path}",
                           f"finetune.models=[{tiny_models['teacher']}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "RTE train file not found" in output
    assert not (tmp_path / "run" / "finetune").exists()  # nothing started


def test_model_without_sequence_classification_exits_2(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    code, output = _invoke("finetune", "task.names=[rte]", f"task.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tmp_path / 'vit'}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "has no sequence-classification architecture" in output
    (tmp_path / "empty").mkdir()
    code, output = _invoke("finetune", "task.names=[rte]", f"task.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tmp_path / 'empty'}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "cannot load model" in output


def test_eval_of_a_model_that_is_not_fine_tuned_exits_2(tmp_path, tiny_models):
    code, output = _invoke("eval-glue", "task.names=[rte]", f"eval.model_dirs=[{tiny_models['teacher']}]",
                           f"run_dir={tmp_path}")
    assert code == 2 and "not a fine-tuned sequence-classification checkpoint" in output


def test_missing_soft_target_teacher_exits_2(tmp_path, tiny_models):
    code, output = _invoke("finetune", "task.names=[rte]", f"task.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tiny_models['student']}]", f"run_dir={tmp_path}",
                           f"finetune.soft_targets.teacher='{tmp_path}/ft/{{task}}/seed-{{seed}}'")  # quoted: braces
    assert code == 2 and f"soft-target teacher directory does not exist: {tmp_path}/ft/rte/seed-56" in output


def test_a_model_directory_named_student_is_not_taken_for_the_runs_student(tmp_path, tiny_models):
    cfg = compose_config("finetune", [f"finetune.models=[{tiny_models['student']},teacher]", f"run_dir={tmp_path}"])
    with open_stage(compose_config("init_student", [f"run_dir={tmp_path}"]), "init-student") as stage:
        stage.update(teacher="bert-base-uncased")
    assert resolve_models(cfg.run_dir, cfg.finetune.models, "finetune.models") == [
        ModelChoice("model-student", str(tiny_models["student"]), "other"),
        ModelChoice("teacher", "bert-base-uncased", "teacher")]


@pytest.mark.parametrize(("command", "overrides", "message"), [
    ("finetune", ["task.names=[rte]"], "input stage distill not found"),
    ("finetune", ["task.names=[rte]", "finetune.models=[teacher]"], "input stage init-student not found"),
    ("finetune", ["finetune.mixed_precision=fp8"],
     "finetune.mixed_precision='fp8': input should be 'no', 'bf16' or 'fp16'"),
    ("finetune", ["finetune.seeds=[1,1]"], "finetune.seeds=[1, 1]: must not name an entry twice"),
    ("finetune", ["finetune.seeds=[abc]"], "finetune.seeds.0='abc': input should be a valid integer"),
    ("finetune", ["finetune.long_task_epochs=0"],
     "finetune.long_task_epochs=0: input should be greater than or equal to 1"),
    ("finetune", ["finetune.long_tasks=[mrpc,qnli2]"], "unknown task 'qnli2'"),
    ("finetune", ["finetune.soft_targets.teacher=teacher"], "needs teacher in finetune.models"),
    ("evaluate", [], "input stage finetune not found"),
])
def test_missing_inputs_and_impossible_values_exit_2(tmp_path, command, overrides, message):
    code, output = _invoke(command, *overrides, f"run_dir={tmp_path}")
    assert code == 2 and message in output, output


# ---- end to end on real RTE ---------------------------------------------------------------------

def _fake_upstream_stages(run_dir, tiny_models):
    """Complete init-student (recording the teacher) and distill (final/ = the student) stages, as they are left."""
    with open_stage(compose_config("init_student", [f"run_dir={run_dir}"]), "init-student") as stage:
        stage.update(teacher=str(tiny_models["teacher"]))
    with open_stage(compose_config("train", [f"run_dir={run_dir}"]), "distill") as stage:
        build_tiny_distilbert(stage.path / "final", tiny_models["teacher"], num_layers=2)


def test_finetune_student_and_teacher_with_soft_targets_then_evaluate(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    cfg = compose_config("finetune", [
        f"run_dir={run_dir}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "finetune.models=[student,teacher]",
        "finetune.seeds=[3]", "finetune.epochs=1", "finetune.max_train_samples=96", "finetune.max_eval_samples=48",
        "task.max_seq_length=64", "finetune.learning_rate=1e-3", "finetune.soft_targets.teacher=teacher"])
    scores = finetune.run(cfg)
    assert set(scores) == {"student", "teacher"} and set(scores["student"]["rte"]) == {3}

    ft_dir = run_dir / "finetune"
    assert read_manifest(ft_dir)["status"] == "complete"
    seed_dir = ft_dir / "student" / "rte" / "seed-3"
    summary = json.loads((seed_dir / "metrics.json").read_text())
    assert summary["train_examples"] == 96 and summary["dev_examples"] == {"dev": 48} and summary["soft_targets"]
    predictions = [json.loads(line) for line in (seed_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 48 and {p["prediction"] for p in predictions} <= {0, 1}
    assert [p["label"] for p in predictions] == get_task("rte").load_split("dev", str(GLUE_DIR))["label"][:48]
    recomputed = get_task("rte").compute_metrics([p["prediction"] for p in predictions],
                                                 [p["label"] for p in predictions])
    assert summary["metrics"] == pytest.approx(recomputed)
    saved = json.loads((seed_dir / "model" / "config.json").read_text())
    assert saved["model_type"] == "distilbert" and saved["finetuning_task"] == "rte"
    assert (ft_dir / "teacher" / "rte" / "seed-3" / "model" / "config.json").is_file()

    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "eval.note=a tiny smoke run"]))
    table = (run_dir / "evaluate" / "results.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[:4] == ["student (ours)", "teacher (ours)", "BERT-base (published)", "DistilBERT (published)"]
    assert "| BERT-base (published) | 69.3 | 69.3 |" in table and "Note: a tiny smoke run" in table
    assert "finetune.max_train_samples=96 (not the full split)" in table
    student, teacher = results["models"]["student"]["score"], results["models"]["teacher"]["score"]
    assert student == pytest.approx(scores["student"]["rte"][3])
    assert results["retention"]["GLUE dev (the paper's Table 1)"]["percent"] == pytest.approx(100 * student / teacher)
    assert f"{100 * student / teacher:.1f}%" in table

    # An already fine-tuned model directory alone: the task comes from its config.
    alone = evaluate.run(compose_config("evaluate", [
        f"run_dir={tmp_path / 'alone'}", f"task.data_dir={GLUE_DIR}", "eval.max_samples=48",
        f"eval.model_dirs=[{seed_dir / 'model'}]"]))
    (row,) = alone["models"].values()
    assert row["tasks"]["rte"]["metrics"] == pytest.approx(summary["metrics"])
