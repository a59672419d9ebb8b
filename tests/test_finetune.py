"""finetune and eval-glue: losses by hand, seed medians, bad inputs (exit 2), and a tiny end-to-end on real RTE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import GLUE_DIR, build_tiny_bert, build_tiny_distilbert
from typer.testing import CliRunner

from distilbert_cli import eval_glue, finetune, glue
from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.rundir import open_stage, read_manifest

runner = CliRunner()


# ---- losses -------------------------------------------------------------------------------------

def test_task_loss_by_hand():
    assert finetune.task_loss(torch.zeros(1, 2), torch.tensor([0]), regression=False).item() == pytest.approx(
        math.log(2))
    # squared errors 1 and 4 -> mean 2.5
    assert finetune.task_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]), regression=True).item() == 2.5


def test_fine_tuning_distillation_loss_by_hand():
    # Row 1: teacher logits [ln 3, 0] at T=2 -> p = [sqrt3, 1] / (sqrt3 + 1); student uniform. Row 2: equal -> 0.
    temperature = 2.0
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl_row1 = sum(pi * math.log(pi / 0.5) for pi in p)
    expected = (kl_row1 + 0.0) / 2 * temperature**2  # batch mean, times T^2
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    loss = finetune.fine_tuning_distillation_loss(student, teacher, temperature, regression=False)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # regression: the teacher's score is the target (MSE): (1 - 3)^2 / 1
    assert finetune.fine_tuning_distillation_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), temperature,
                                                  regression=True).item() == 4.0


def test_run_glue_epochs_five_for_mrpc_and_wnli_three_otherwise():
    cfg = compose_config("finetune")
    assert {name: finetune.epochs_for(cfg, task) for name, task in glue.TASKS.items()} == {
        "cola": 3, "sst2": 3, "mrpc": 5, "stsb": 3, "qqp": 3, "mnli": 3, "qnli": 3, "rte": 3, "wnli": 5}
    assert finetune.epochs_for(compose_config("finetune", ["finetune.long_tasks=[MRPC]"]), glue.TASKS["mrpc"]) == 5


# ---- seeds, medians, retention ------------------------------------------------------------------

def test_median_over_seeds_task_scores_and_retention():
    records = [{"model": "student", "task": "rte", "seed": s, "metrics": {"accuracy": a}}
               for s, a in [(1, 50.0), (2, 70.0), (3, 60.0)]]
    records += [{"model": "student", "task": "mrpc", "seed": s, "metrics": {"f1": f1, "accuracy": acc}}
                for s, f1, acc in [(1, 80.0, 70.0), (2, 90.0, 60.0)]]
    records += [{"model": "teacher", "task": "rte", "seed": 1, "metrics": {"accuracy": 80.0}}]
    summary = eval_glue.summarize(records)
    student = summary["student"]
    assert student["tasks"]["rte"]["score"] == 60.0  # median of 50, 70, 60
    assert student["tasks"]["mrpc"]["metrics"] == {"f1": 85.0, "accuracy": 65.0}  # medians of two seeds
    assert student["tasks"]["mrpc"]["score"] == 75.0
    assert student["score"] == 67.5
    kept = eval_glue.retention(summary)
    assert kept == {"tasks": ["rte"], "student": 60.0, "teacher": 80.0, "percent": 75.0}  # common tasks only


def seed_runs(task: str, *predictions_by_seed, labels) -> list[dict]:
    """`finetuned_runs`-shaped runs of one model: one per seed, all on the same dev labels."""
    return [{"model": "m", "task": glue.get_task(task), "seed": seed, "where": f"seed-{seed}",
             "by_split": {"dev": (np.asarray(predictions), np.asarray(labels))}}
            for seed, predictions in enumerate(predictions_by_seed)]


def test_paired_bootstrap_of_identical_and_of_opposite_models():
    labels = [0, 1] * 20
    same = eval_glue.paired_bootstrap(seed_runs("rte", labels, labels=labels), seed_runs("rte", labels, labels=labels),
                                      resamples=50, seed=0)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "resamples": 50, "dev_examples": 40}
    wrong = [1 - y for y in labels]
    opposite = eval_glue.paired_bootstrap(seed_runs("rte", labels, labels=labels),
                                          seed_runs("rte", wrong, labels=labels), resamples=50, seed=0)
    assert (opposite["difference"], opposite["low"], opposite["high"]) == (100.0, 100.0, 100.0)


def test_paired_bootstrap_scores_as_the_table_does_and_separates_signal_from_noise():
    labels = np.arange(200) % 2
    baseline = np.where(np.arange(200) < 140, labels, 1 - labels)  # 70% right
    one_more = baseline.copy()
    one_more[140] = labels[140]  # right on one more example: 70.5%
    many_more = np.where(np.arange(200) < 180, labels, 1 - labels)  # 90% right
    # Three seeds: the median seed decides, as in the table (70.5 vs 70.0 here).
    ours = seed_runs("rte", baseline, one_more, many_more, labels=labels)
    theirs = seed_runs("rte", baseline, baseline, baseline, labels=labels)
    close = eval_glue.paired_bootstrap(ours, theirs, resamples=300, seed=0)
    assert close["difference"] == pytest.approx(0.5) and close["low"] <= 0 <= close["high"]
    far = eval_glue.paired_bootstrap(seed_runs("rte", many_more, labels=labels), theirs[:1], resamples=300, seed=0)
    assert far["difference"] == pytest.approx(20.0) and 10 < far["low"] < 20 < far["high"] < 30


def test_paired_bootstrap_needs_the_same_dev_examples_and_a_defined_score():
    ours = seed_runs("rte", [0, 1, 1], labels=[0, 1, 1])
    assert eval_glue.paired_bootstrap(ours, seed_runs("rte", [0, 1, 1], labels=[0, 1, 0]), 10, 0) is None
    assert eval_glue.paired_bootstrap(ours, seed_runs("sst2", [0, 1, 1], labels=[0, 1, 1]), 10, 0) is None
    constant = seed_runs("stsb", [2.0, 2.0, 2.0], labels=[1.0, 2.5, 4.0])  # Pearson of a constant: undefined
    assert eval_glue.paired_bootstrap(constant, constant, 10, 0) is None


# ---- inputs -------------------------------------------------------------------------------------



def test_distilbert_gets_no_token_type_ids(tmp_path):
    teacher = build_tiny_bert(tmp_path / "teacher", num_layers=1)
    student = build_tiny_distilbert(tmp_path / "student", teacher, num_layers=2)
    rte = glue.get_task("rte")
    model = finetune.load_classifier(str(student), rte, False, "student")
    assert "token_type_ids" not in finetune.forward_inputs(model)
    assert model.config.glue_task == "rte" and model.config.num_labels == 2
    from transformers import AutoTokenizer

    data = glue.load_split("rte", "dev", str(GLUE_DIR)).select(range(4))
    encoded = finetune.tokenize(data, AutoTokenizer.from_pretrained(student), 16, with_token_type_ids=False)
    assert sorted(encoded.column_names) == ["attention_mask", "input_ids", "labels"]
    assert max(len(ids) for ids in encoded["input_ids"]) == 16  # truncated, and not padded here


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
    code, output = _invoke("finetune", "glue.tasks=[rte,sst3]", f"run_dir={tmp_path}")
    assert code == 2 and "unknown GLUE task 'sst3'" in output


def test_glue_dir_missing_task_files_exits_2(tmp_path, tiny_models):
    code, output = _invoke("finetune", "glue.tasks=[rte]", f"glue.data_dir={tmp_path}",
                           f"finetune.models=[{tiny_models['teacher']}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "GLUE RTE train file not found" in output
    assert not (tmp_path / "run" / "finetune").exists()  # nothing started


def test_model_without_sequence_classification_exits_2(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    code, output = _invoke("finetune", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tmp_path / 'vit'}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "has no sequence-classification architecture" in output
    (tmp_path / "empty").mkdir()
    code, output = _invoke("finetune", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tmp_path / 'empty'}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "cannot load model" in output


def test_eval_of_a_model_that_is_not_fine_tuned_exits_2(tmp_path, tiny_models):
    code, output = _invoke("eval-glue", "glue.tasks=[rte]", f"eval.model_dirs=[{tiny_models['teacher']}]",
                           f"run_dir={tmp_path}")
    assert code == 2 and "not a fine-tuned sequence-classification checkpoint" in output


def test_missing_soft_target_teacher_exits_2(tmp_path, tiny_models):
    code, output = _invoke("finetune", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}",
                           f"finetune.models=[{tiny_models['student']}]", f"run_dir={tmp_path}",
                           f"finetune.soft_targets.teacher='{tmp_path}/ft/{{task}}/seed-{{seed}}'")  # quoted: braces
    assert code == 2 and f"soft-target teacher directory does not exist: {tmp_path}/ft/rte/seed-56" in output


def test_a_model_directory_named_student_is_not_taken_for_the_runs_student(tmp_path, tiny_models):
    cfg = compose_config("finetune", [f"finetune.models=[{tiny_models['student']},teacher]", f"run_dir={tmp_path}"])
    with open_stage(compose_config("init_student", [f"run_dir={tmp_path}"]), "init-student") as stage:
        stage.update(teacher="bert-base-uncased")
    assert finetune.resolve_models(cfg) == [
        finetune.ModelChoice("model-student", str(tiny_models["student"]), "other"),
        finetune.ModelChoice("teacher", "bert-base-uncased", "teacher")]


@pytest.mark.parametrize(("command", "overrides", "message"), [
    ("finetune", ["glue.tasks=[rte]"], "input stage distill not found"),
    ("finetune", ["glue.tasks=[rte]", "finetune.models=[teacher]"], "input stage init-student not found"),
    ("finetune", ["finetune.mixed_precision=fp8"], "finetune.mixed_precision must be one of"),
    ("finetune", ["finetune.seeds=[1,1]"], "distinct seeds"),
    ("finetune", ["finetune.long_task_epochs=0"], "finetune.long_task_epochs must be positive"),
    ("finetune", ["finetune.long_tasks=[mrpc,qnli2]"], "unknown GLUE task 'qnli2'"),
    ("finetune", ["finetune.soft_targets.teacher=teacher"], "needs teacher in finetune.models"),
    ("eval-glue", [], "input stage finetune not found"),
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


def test_finetune_student_and_teacher_with_soft_targets_then_eval_glue(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    cfg = compose_config("finetune", [
        f"run_dir={run_dir}", "glue.tasks=[rte]", f"glue.data_dir={GLUE_DIR}", "finetune.models=[student,teacher]",
        "finetune.seeds=[3]", "finetune.epochs=1", "finetune.max_train_samples=128", "finetune.max_eval_samples=48",
        "finetune.max_seq_length=64", "finetune.learning_rate=1e-3", "finetune.soft_targets.teacher=teacher"])
    scores = finetune.run(cfg)
    assert set(scores) == {"student", "teacher"} and set(scores["student"]["rte"]) == {3}

    ft_dir = run_dir / "finetune"
    assert read_manifest(ft_dir)["status"] == "complete"
    seed_dir = ft_dir / "student" / "rte" / "seed-3"
    summary = json.loads((seed_dir / "metrics.json").read_text())
    assert summary["train_examples"] == 128 and summary["dev_examples"] == {"dev": 48} and summary["soft_targets"]
    predictions = [json.loads(line) for line in (seed_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 48 and {p["prediction"] for p in predictions} <= {0, 1}
    assert [p["label"] for p in predictions] == glue.load_split("rte", "dev", str(GLUE_DIR))["label"][:48]
    recomputed = glue.compute_metrics("rte", [p["prediction"] for p in predictions], [p["label"] for p in predictions])
    assert summary["metrics"] == pytest.approx(recomputed)
    saved = json.loads((seed_dir / "model" / "config.json").read_text())
    assert saved["model_type"] == "distilbert" and saved["glue_task"] == "rte"
    assert (ft_dir / "teacher" / "rte" / "seed-3" / "model" / "config.json").is_file()

    results = eval_glue.run(compose_config("eval_glue", [f"run_dir={run_dir}", "eval.note=a tiny smoke run"]))
    table = (run_dir / "eval-glue" / "results.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[:4] == ["student (ours)", "teacher (ours)", "BERT-base (published)", "DistilBERT (published)"]
    assert "| BERT-base (published) | 69.3 | 69.3 |" in table and "Note: a tiny smoke run" in table
    assert "finetune.max_train_samples=128 (not the full split)" in table
    student, teacher = results["models"]["student"]["score"], results["models"]["teacher"]["score"]
    assert student == pytest.approx(scores["student"]["rte"][3])
    assert results["retention"]["percent"] == pytest.approx(100 * student / teacher)
    assert f"{100 * student / teacher:.1f}%" in table

    # An already fine-tuned model directory alone: the task comes from its config.
    alone = eval_glue.run(compose_config("eval_glue", [
        f"run_dir={tmp_path / 'alone'}", f"glue.data_dir={GLUE_DIR}", "eval.max_samples=48",
        f"eval.model_dirs=[{seed_dir / 'model'}]"]))
    (row,) = alone["models"].values()
    assert row["tasks"]["rte"]["metrics"] == pytest.approx(summary["metrics"])
