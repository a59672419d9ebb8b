"""finetune and evaluate: epochs per task, bad inputs and bad data (exit 2), and tiny end-to-end runs of each task
kind, checked against the saved models' own outputs and hand metrics: GLUE RTE with the (D) soft targets, STS-B
regression, MNLI's two dev splits, SQuAD with soft targets (Table 2), IMDb and your own CSV, your own pair
regression with soft targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from builders import GLUE_DIR, MNLI_DIR, REVIEWS_DIR, SQUAD_DIR, build_tiny_bert, build_tiny_distilbert, open_stage
from safetensors.torch import load_file
from scipy.stats import rankdata
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.models.run_models import ModelChoice, resolve_models
from distilbert_cli.rundir import Run, read_manifest
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


# Weights (and fresh task heads) drawn 25x wider than BERT's 0.02: the tiny models' outputs then differ clearly
# from one example to the next (at 0.02 they are nearly constant), so a prediction saved against the wrong row shows.
INIT_RANGE = 0.5


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    teacher = build_tiny_bert(root / "teacher", num_layers=2, initializer_range=INIT_RANGE)
    return {"teacher": teacher,
            "student": build_tiny_distilbert(root / "student", teacher, num_layers=2, initializer_range=INIT_RANGE)}


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
    assert code == 2 and f"model empty {tmp_path / 'empty'} has no config.json: not a saved model" in output


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
    assert resolve_models(Run.of(cfg), cfg.finetune.models, "finetune.models") == [
        ModelChoice("model-student", str(tiny_models["student"]), "other"),
        ModelChoice("teacher", "bert-base-uncased", "teacher", "init-student")]  # the teacher init-student recorded


def test_a_model_entry_can_be_named(tmp_path, tiny_models):
    odd = tmp_path / "a:b"  # an existing path with a colon stays a path
    odd.mkdir()
    entries = [f"lstm:{tiny_models['student']}", str(odd), f"student:{tiny_models['teacher']}"]
    assert resolve_models(Run(tmp_path), entries, "bench.models") == [
        ModelChoice("lstm", str(tiny_models["student"]), "other"), ModelChoice("a:b", str(odd), "other"),
        ModelChoice("model-student", str(tiny_models["teacher"]), "other")]  # never taken for the run's own


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
    ("finetune", ["task=squad", "task.qa.max_query_length=400"], "task.qa.max_query_length=400 leaves no room"),
    ("finetune", ["task.truncation=middle"], "task.truncation='middle': input should be 'head' or 'head_tail'"),
    ("evaluate", ["task.truncation=head_tail", "task.head_tokens=128"], "leaves no room for the tail"),
    ("finetune", ["task.data.label_names=[a,a]"], "must not name an entry twice"),
    ("finetune", ["task=squad_v3"], "Could not find 'task/squad_v3'"),
    ("finetune", ["task.names=[squad,imbd]"], "unknown task 'imbd'"),
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
        build_tiny_distilbert(stage.path / "final", tiny_models["teacher"], num_layers=2, initializer_range=INIT_RANGE)


def read_predictions(run_dir, model: str, task: str, seed: int) -> list[dict]:
    path = run_dir / "finetune" / model / task / f"seed-{seed}" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def accuracy_by_hand(rows: list[dict]) -> float:
    return 100.0 * sum(row["prediction"] == row["label"] for row in rows) / len(rows)


def assert_each_prediction_is_the_models_output_on_its_own_row(model_dir, task, data, rows, max_seq_length):
    """Run the saved model on each dev example alone (no batch, no padding, in file order): its output is the
    saved prediction of the row with that index, and the row's label is the file's."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distilbert_cli.downstream.task_models import forward_inputs

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    accepted = forward_inputs(model)
    assert [row["index"] for row in rows] == list(range(len(data)))
    for example, row in zip(data, rows, strict=True):
        texts = [example[name] for name in ("sentence1", "sentence2") if name in example]
        inputs = tokenizer(*texts, truncation=True, max_length=max_seq_length, return_tensors="pt")
        with torch.no_grad():
            logits = model(**{k: v for k, v in inputs.items() if k in accepted}).logits[0]
        assert row["label"] == pytest.approx(example["label"])
        if task.is_regression:
            assert row["prediction"] == pytest.approx(logits.item(), abs=1e-4)
        else:  # the batched run pads, so a near tie may flip: the saved class must be (almost) the best one
            assert logits[row["prediction"]] >= logits.max() - 1e-4, (row, logits)


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
    dev = get_task("rte").load_split("dev", str(GLUE_DIR)).select(range(48))
    predictions = {model: read_predictions(run_dir, model, "rte", 3) for model in ("student", "teacher")}
    for model, rows in predictions.items():
        assert {row["split"] for row in rows} == {"dev"} and {row["prediction"] for row in rows} <= {0, 1}
        assert_each_prediction_is_the_models_output_on_its_own_row(ft_dir / model / "rte" / "seed-3" / "model",
                                                                   get_task("rte"), dev, rows, 64)
    student, teacher = (accuracy_by_hand(predictions[model]) for model in ("student", "teacher"))
    assert summary["metrics"] == {"accuracy": pytest.approx(student)}
    saved = json.loads((seed_dir / "model" / "config.json").read_text())
    assert saved["model_type"] == "distilbert" and saved["finetuning_task"] == "rte"

    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "eval.note=a tiny smoke run"]))
    table = (run_dir / "evaluate" / "results.md").read_text()
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")][1:]
    assert rows[:4] == ["student (D) (ours)", "teacher (ours)", "BERT-base (published)", "DistilBERT (published)"]
    assert "| BERT-base (published) | 69.3 | 69.3 |" in table and "Note: a tiny smoke run" in table
    assert "finetune.max_train_samples=96 (not the full split)" in table
    assert results["models"]["student"]["score"] == pytest.approx(student)
    assert results["models"]["teacher"]["score"] == pytest.approx(teacher)
    assert results["retention"]["GLUE dev (the paper's Table 1)"] == {
        "tasks": ["rte"], "student": pytest.approx(student), "teacher": pytest.approx(teacher),
        "percent": pytest.approx(100 * student / teacher)}
    assert f"Retention (student / teacher on rte): {100 * student / teacher:.1f}%" in table

    # An already fine-tuned model directory alone: the task comes from its config.
    alone = evaluate.run(compose_config("evaluate", [
        f"run_dir={tmp_path / 'alone'}", f"task.data_dir={GLUE_DIR}", "eval.max_samples=48", "task.max_seq_length=64",
        f"eval.model_dirs=[{seed_dir / 'model'}]"]))
    (row,) = alone["models"].values()
    assert row["tasks"]["rte"]["metrics"] == {"accuracy": pytest.approx(student)}


# ---- beyond GLUE: SQuAD (with "(D)"), IMDb, your own data ---------------------------------------------------------

SQUAD_SMALL = [f"task.data_dir={SQUAD_DIR}", "task.qa.max_seq_length=96", "task.qa.doc_stride=48",
               "task.qa.max_query_length=24"]
TINY_RUN = ["finetune.seeds=[3]", "finetune.epochs=1", "finetune.batch_size=16", "finetune.learning_rate=1e-3"]


def _table_rows(table: str, heading: str) -> list[str]:
    """The rows of the markdown table under `heading`."""
    section = table.split(f"## {heading}\n\n", 1)[1].split("\n\n", 1)[0]
    return section.splitlines()[2:]


@pytest.mark.slow
def test_squad_with_soft_targets_then_evaluate_writes_table_2(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    scores = finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task=squad", *SQUAD_SMALL, *TINY_RUN, "finetune.models=[student,teacher]",
        "finetune.soft_targets.teacher=teacher"]))
    assert set(scores) == {"student", "teacher"}

    seed_dir = run_dir / "finetune" / "student" / "squad" / "seed-3"
    summary = json.loads((seed_dir / "metrics.json").read_text())
    assert summary["soft_targets"] and summary["train_examples"] == 8 and summary["train_features"] > 8
    assert summary["dev_examples"] == {"dev": 8} and set(summary["metrics"]) == {"exact_match", "f1"}
    # The official format: {question id: answer text}, which an official evaluator re-scores to the same numbers.
    official = json.loads((seed_dir / "predictions-dev.json").read_text())
    dev = get_task("squad").load(compose_config("finetune", ["task=squad", *SQUAD_SMALL]).task, ("dev",))
    dev = dev.splits["dev"]
    assert sorted(official) == sorted(dev["id"]) and all(isinstance(text, str) for text in official.values())
    rescored = get_task("squad").compute_metrics([official[i] for i in dev["id"]], dev["answers"])
    assert rescored == pytest.approx(summary["metrics"])
    rows = [json.loads(line) for line in (seed_dir / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == dev["id"] and rows[1]["label"] == dev[1]["answers"]
    saved = json.loads((seed_dir / "model" / "config.json").read_text())
    assert saved["architectures"] == ["DistilBertForQuestionAnswering"] and saved["finetuning_task"] == "squad"

    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "task=squad"]))
    table = (run_dir / "evaluate" / "results.md").read_text()
    student = results["models"]["student"]["tasks"]["squad"]["metrics"]
    assert _table_rows(table, "IMDb and SQuAD (the paper's Table 2)") == [
        f"| student (D) (ours) | {student['exact_match']:.1f}/{student['f1']:.1f} |",
        "| teacher (ours) | {exact_match:.1f}/{f1:.1f} |".format(**results["models"]["teacher"]["tasks"]["squad"]
                                                               ["metrics"]),
        "| BERT-base (published) | 81.2/88.5 |", "| DistilBERT (published) | 77.7/85.8 |",
        "| DistilBERT (D) (published) | 79.1/86.9 |"]
    assert "| Model | SQuAD v1.1 (EM/F1) |" in table
    teacher = results["models"]["teacher"]["tasks"]["squad"]["score"]
    assert ("the paper on the same tasks: 96.3%" in table) == (teacher > 0)  # no retention of a zero score
    assert "(D): every model but the teacher learned from the soft targets of the fine-tuned 'teacher'" in table
    assert "windows of 96 tokens every 48 context tokens" in table

    # The saved model alone, through eval.model_dirs: the same questions, the same scores.
    alone = evaluate.run(compose_config("evaluate", [f"run_dir={tmp_path / 'alone'}", "task=squad", *SQUAD_SMALL,
                                                     f"eval.model_dirs=[{seed_dir / 'model'}]"]))
    (row,) = alone["models"].values()
    assert row["tasks"]["squad"]["metrics"] == pytest.approx(summary["metrics"])
    assert (tmp_path / "alone" / "evaluate" / "model-0" / "predictions-dev.json").is_file()


def test_squad_v2_null_threshold_decides_the_empty_answers(tmp_path):
    from transformers import BertForQuestionAnswering

    model_dir = build_tiny_bert(tmp_path / "qa", num_layers=1)
    model = BertForQuestionAnswering.from_pretrained(model_dir)
    model.config.finetuning_task = "squad_v2"
    model.save_pretrained(model_dir)
    scored = {}
    for threshold in (-1e4, 1e4):  # always no answer; never
        results = evaluate.run(compose_config("evaluate", [
            f"run_dir={tmp_path / str(threshold)}", "task=squad_v2", *SQUAD_SMALL, f"eval.model_dirs=[{model_dir}]",
            f"task.qa.null_score_diff_threshold={threshold}"]))
        (row,) = results["models"].values()
        scored[threshold] = row["tasks"]["squad_v2"]["metrics"]
        answers = json.loads((tmp_path / str(threshold) / "evaluate" / "model-0" / "predictions-dev.json").read_text())
        assert len(answers) == 14 and (all(a == "" for a in answers.values()) == (threshold < 0))
    assert scored[-1e4] == {"exact_match": pytest.approx(100 * 6 / 14), "f1": pytest.approx(100 * 6 / 14)}
    assert scored[1e4]["exact_match"] < 100 * 6 / 14  # the 6 questions without an answer are answered


@pytest.mark.slow
def test_imdb_and_your_own_csv_then_evaluate(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task.names=[imdb,text_classification]", f"task.data_dir={REVIEWS_DIR}",
        f"task.data.train={REVIEWS_DIR / 'train.csv'}", f"task.data.validation={REVIEWS_DIR / 'test.csv'}",
        "task.max_seq_length=48", "task.truncation=head_tail", "task.head_tokens=16", *TINY_RUN]))
    ft_dir = run_dir / "finetune" / "student"
    saved = json.loads((ft_dir / "text_classification" / "seed-3" / "model" / "config.json").read_text())
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["finetuning_task"] == "text_classification"
    imdb = json.loads((ft_dir / "imdb" / "seed-3" / "metrics.json").read_text())
    assert imdb["train_examples"] == 24 and imdb["dev_examples"] == {"test": 12} and set(imdb["metrics"]) == {
        "accuracy"}

    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}",
                                                       "task.names=[imdb,text_classification]"]))
    table = (run_dir / "evaluate" / "results.md").read_text()
    accuracy = results["models"]["student"]["tasks"]["imdb"]["metrics"]["accuracy"]
    assert _table_rows(table, "IMDb and SQuAD (the paper's Table 2)") == [
        f"| student (ours) | {accuracy:.1f} |", "| BERT-base (published) | 93.46 |",
        "| DistilBERT (published) | 92.82 |", "| DistilBERT (D) (published) | – |"]
    own = results["models"]["student"]["tasks"]["text_classification"]["metrics"]
    score = (own["accuracy"] + own["macro_f1"]) / 2
    assert _table_rows(table, "Your own data") == [f"| student (ours) | {score:.1f} |"]
    assert "IMDb, text classification: inputs cut to 48 tokens; truncation head+tail (the first 16 tokens" in table


@pytest.mark.slow
def test_your_own_pair_regression_with_soft_targets(tmp_path, tiny_models):
    stsb = GLUE_DIR / "STS-B"
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task=text_regression", f"task.data.train={stsb / 'train.tsv'}",
        f"task.data.validation={stsb / 'dev.tsv'}", "task.data.text_field=sentence1",
        "task.data.text_pair_field=sentence2", "task.data.label_field=score", "task.max_seq_length=64",
        "finetune.max_train_samples=48", *TINY_RUN, "finetune.models=[student,teacher]",
        "finetune.soft_targets.teacher=teacher"]))
    summary = json.loads((run_dir / "finetune" / "student" / "text_regression" / "seed-3" / "metrics.json").read_text())
    assert summary["soft_targets"] and set(summary["metrics"]) == {"pearson", "spearman"}
    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "task=text_regression"]))
    assert results["retention"]["Your own data"]["tasks"] == ["text_regression"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["task=text_classification", f"task.data.train={REVIEWS_DIR / 'train.csv'}",
      f"task.data.validation={REVIEWS_DIR / 'test.csv'}", "task.data.label_field=stars"], "has no field 'stars'"),
    (["task=text_classification", f"task.data.train={REVIEWS_DIR / 'train.csv'}", "task.data.validation=DEV"],
     "label 'meh' (row 1) is not one of the classes ['neg', 'pos']"),
    (["task=text_classification", f"task.data.train={REVIEWS_DIR / 'train.csv'}", "task.data.validation=EMPTY"],
     "empty.csv is empty"),
    (["task=squad", "task.data_dir=BAD_SQUAD"], "is not in the SQuAD JSON layout"),
])
def test_bad_data_exits_2_and_leaves_no_complete_stage(tmp_path, tiny_models, overrides, message):
    (tmp_path / "dev.csv").write_text("text,label\nso so,meh\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    (tmp_path / "squad").mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (tmp_path / "squad" / name).write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    overrides = [o.replace("DEV", str(tmp_path / "dev.csv")).replace("EMPTY", str(tmp_path / "empty.csv"))
                 .replace("BAD_SQUAD", str(tmp_path / "squad")) for o in overrides]
    code, output = _invoke("finetune", *overrides, f"finetune.models=[{tiny_models['student']}]",
                           f"run_dir={tmp_path / 'run'}")
    last = output.strip().splitlines()[-1]  # (the runner also shows earlier tests' log handlers failing)
    assert code == 2 and last.startswith("error: ") and message in last, output
    assert read_manifest(tmp_path / "run" / "finetune")["status"] == "failed"


def test_a_model_without_a_question_answering_head_exits_2(tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    code, output = _invoke("finetune", "task=squad", f"task.data_dir={SQUAD_DIR}",
                           f"finetune.models=[{tmp_path / 'vit'}]", f"run_dir={tmp_path / 'run'}")
    assert code == 2 and "has no question-answering architecture" in output


def test_stsb_regression_end_to_end(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task.names=[stsb]", f"task.data_dir={GLUE_DIR}", "finetune.seeds=[1]",
        "finetune.epochs=1", "finetune.max_train_samples=32", "finetune.max_eval_samples=40",
        "task.max_seq_length=64", "finetune.learning_rate=1e-3"]))
    stsb = get_task("stsb")
    rows = read_predictions(run_dir, "student", "stsb", 1)
    dev = stsb.load_split("dev", str(GLUE_DIR)).select(range(40))
    assert_each_prediction_is_the_models_output_on_its_own_row(
        run_dir / "finetune" / "student" / "stsb" / "seed-1" / "model", stsb, dev, rows, 64)
    assert len({row["prediction"] for row in rows}) > 1 and any(row["label"] % 1 for row in rows)  # real numbers
    predictions, labels = np.array([row["prediction"] for row in rows]), np.array([row["label"] for row in rows])
    pearson = 100 * np.corrcoef(predictions, labels)[0, 1]
    spearman = 100 * np.corrcoef(rankdata(predictions), rankdata(labels))[0, 1]  # Pearson of the (mean) ranks
    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "task.names=[stsb]"]))
    task_row = results["models"]["student"]["tasks"]["stsb"]
    assert task_row["metrics"] == {"pearson": pytest.approx(pearson), "spearman": pytest.approx(spearman)}
    assert task_row["score"] == pytest.approx((pearson + spearman) / 2)


def test_mnli_two_dev_splits_end_to_end(tmp_path, tiny_models):
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task.names=[mnli]", f"task.data_dir={MNLI_DIR}", "finetune.models=[teacher]",
        "finetune.seeds=[2]", "finetune.epochs=1", "task.max_seq_length=64", "finetune.learning_rate=1e-3"]))
    mnli = get_task("mnli")
    rows = read_predictions(run_dir, "teacher", "mnli", 2)
    by_split = {split: [row for row in rows if row["split"] == split] for split in ("dev_matched", "dev_mismatched")}
    assert [len(by_split[split]) for split in by_split] == [20, 14] and len(rows) == 34
    for split, split_rows in by_split.items():
        assert_each_prediction_is_the_models_output_on_its_own_row(
            run_dir / "finetune" / "teacher" / "mnli" / "seed-2" / "model", mnli,
            mnli.load_split(split, str(MNLI_DIR)), split_rows, 64)
    matched, mismatched = accuracy_by_hand(by_split["dev_matched"]), accuracy_by_hand(by_split["dev_mismatched"])
    saved = json.loads((run_dir / "finetune" / "teacher" / "mnli" / "seed-2" / "metrics.json").read_text())
    assert saved["dev_examples"] == {"dev_matched": 20, "dev_mismatched": 14}
    expected = {"dev_matched_accuracy": pytest.approx(matched), "dev_mismatched_accuracy": pytest.approx(mismatched)}
    assert saved["metrics"] == expected and saved["score"] == pytest.approx((matched + mismatched) / 2)
    results = evaluate.run(compose_config("evaluate", [f"run_dir={run_dir}", "task.names=[mnli]"]))
    task_row = results["models"]["teacher"]["tasks"]["mnli"]
    assert task_row["metrics"] == expected and task_row["score"] == pytest.approx((matched + mismatched) / 2)


def test_soft_target_loss_is_weighted_by_alpha_task_and_alpha_ce(tmp_path, tiny_models, monkeypatch):
    """The (D) loss of each student batch is alpha_task x task loss + alpha_ce x soft-target loss at the configured
    temperature; the teacher's own fine-tuning uses the task loss alone."""
    from accelerate import Accelerator

    from distilbert_cli.tasks.base import SequenceClassificationTask

    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    # Constant losses that still carry a gradient: 3 for the task, 7 for the soft targets.
    monkeypatch.setattr(SequenceClassificationTask, "loss", lambda self, logits, labels: logits.sum() * 0 + 3.0)
    temperatures = []

    def soft_target_loss(self, student_logits, teacher_logits, temperature):
        temperatures.append(temperature)
        assert teacher_logits.shape == student_logits.shape and not teacher_logits.requires_grad
        return student_logits.sum() * 0 + 7.0

    monkeypatch.setattr(SequenceClassificationTask, "soft_target_loss", soft_target_loss)
    losses = []
    real_backward = Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (losses.append(loss.item()),
                                                                           real_backward(self, loss, **kw)))
    finetune.run(compose_config("finetune", [
        f"run_dir={run_dir}", "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "finetune.models=[student,teacher]",
        "finetune.seeds=[1]", "finetune.epochs=1", "finetune.batch_size=16", "finetune.max_train_samples=32",
        "finetune.max_eval_samples=8", "task.max_seq_length=32", "finetune.soft_targets.teacher=teacher",
        "finetune.soft_targets.alpha_task=0.25", "finetune.soft_targets.alpha_ce=0.75",
        "finetune.soft_targets.temperature=3.0"]))
    # The teacher is fine-tuned first (2 batches of 16), then the student learns from it (2 batches).
    assert losses == [3.0, 3.0, pytest.approx(0.25 * 3.0 + 0.75 * 7.0), pytest.approx(0.25 * 3.0 + 0.75 * 7.0)]
    assert temperatures == [3.0, 3.0]


# ---- the training engine: several processes, resume, the non-finite guard, the tracker, model selection ----------

ENGINE_RUN = ["task.names=[rte]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32", "finetune.seeds=[1]",
              "finetune.epochs=1", "finetune.batch_size=8", "finetune.micro_batch_size=4",
              "finetune.max_train_samples=32", "finetune.max_eval_samples=13", "finetune.log_every=1",
              "finetune.checkpoint_every=2", "finetune.max_grad_norm=null", "finetune.learning_rate=1e-3"]


def finetune_run_dir(run_dir, name="student", task="rte", seed=1):
    return run_dir / "finetune" / name / task / f"seed-{seed}"


def logged_losses(run) -> list[dict]:
    return [{k: v for k, v in line.items() if k.startswith("loss")}
            for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


@pytest.mark.slow
def test_two_processes_fine_tune_like_one_accumulating_two_resume_exactly_and_score_every_dev_row_once(
        tmp_path, tiny_models, monkeypatch):
    """Micro batch 4 x 2 processes against micro batch 4 x accumulation 2 on 1 process: the same first-step
    gradients and logged losses; the 2-process run stopped after its step-2 checkpoint and resumed ends bitwise
    where it does uninterrupted; its 13 dev rows (uneven over 2 processes) are each predicted once."""
    from stage_worker import assert_first_step_gradients_match, recording_train_step, run_on_two_processes

    from distilbert_cli.training import engine

    single = tmp_path / "single"
    _fake_upstream_stages(single, tiny_models)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", recording_train_step(engine.train_step, single))
        finetune.run(compose_config("finetune", [f"run_dir={single}", *ENGINE_RUN]))
    root = tmp_path / "two"
    for name in ("uninterrupted", "resumed"):
        _fake_upstream_stages(root / name, tiny_models)
    run_on_two_processes("finetune", root, ENGINE_RUN)
    two = root / "uninterrupted"
    assert_first_step_gradients_match(single, two)
    ours, theirs = logged_losses(finetune_run_dir(two)), logged_losses(finetune_run_dir(single))
    assert len(ours) == len(theirs) == 4
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine == pytest.approx(reference, rel=1e-5, abs=1e-7)

    resumed, uninterrupted = (load_file(finetune_run_dir(run) / "model" / "model.safetensors")
                              for run in (root / "resumed", two))
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert logged_losses(finetune_run_dir(root / "resumed")) == logged_losses(finetune_run_dir(two))
    assert not (finetune_run_dir(two) / "checkpoints").exists()  # removed once the run finished
    rows = read_predictions(two, "student", "rte", 1)
    assert sorted(row["index"] for row in rows) == list(range(13))


@pytest.mark.slow
def test_two_processes_score_an_uneven_dev_set_like_one(tmp_path, tiny_models):
    """distil evaluate under torchrun with 2 processes: 13 dev rows (7 and 6, the last batch padded by Accelerate)
    give exactly the predictions and the score of 1 process."""
    model_dir = tmp_path / "tuned"
    run_dir = tmp_path / "tune"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *ENGINE_RUN]))
    import shutil

    shutil.copytree(finetune_run_dir(run_dir) / "model", model_dir)
    common = [f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32", "eval.max_samples=13", "eval.batch_size=4",
              f"eval.model_dirs=[{model_dir}]"]
    one = evaluate.run(compose_config("evaluate", [f"run_dir={tmp_path / 'one'}", *common]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "distilbert_cli", "evaluate", f"run_dir={tmp_path / 'two'}", *common],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "evaluate" / "results.json").read_text())
    assert two["models"] == one["models"]
    lines = [(tmp_path / run / "evaluate" / "model-0" / "predictions.jsonl").read_text() for run in ("one", "two")]
    assert lines[0] == lines[1] and len(lines[0].splitlines()) == 13


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # skipped updates
def test_a_non_finite_loss_is_skipped_and_counted_and_too_many_stop_with_one_line(tmp_path, tiny_models,
                                                                                   monkeypatch):
    from builders import inject_non_finite_losses

    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    inject_non_finite_losses(monkeypatch, steps={2})
    finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *ENGINE_RUN]))
    lines = [json.loads(line) for line in (finetune_run_dir(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [np.isnan(line["loss"]) for line in lines] == [False, True, False, False]
    assert "step 2: non-finite loss nan, update skipped (1 so far)" in (run_dir / "finetune" / "log.txt").read_text()

    inject_non_finite_losses(monkeypatch, steps={1, 2, 3})
    code, output = _invoke("finetune", f"run_dir={tmp_path / 'again'}", *ENGINE_RUN,
                           f"finetune.models=[{tiny_models['student']}]", "finetune.max_bad_steps=2")
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and errors == ["error: training diverged: non-finite loss at 3 steps, the last at step 3 "
                                    "(finetune.max_bad_steps=2); lower the learning rate or check the data"]
    assert read_manifest(tmp_path / "again" / "finetune")["status"] == "failed"


def test_wandb_offline_files_appear_under_each_runs_folder(tmp_path, tiny_models, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb login
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    _fake_upstream_stages(run_dir, tiny_models)
    finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *ENGINE_RUN, "logger=wandb",
                                             "logger.mode=offline"]))
    (offline_run,) = (finetune_run_dir(run_dir) / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))
    assert read_manifest(run_dir / "finetune")["status"] == "complete"


def test_selection_on_the_held_out_split_never_reads_the_dev_set(tmp_path, tiny_models):
    """The same run against a copy of RTE whose dev labels are all flipped (which would reverse any choice made on
    them): the same held-out scores, the same chosen step and the same weights; only the dev scores differ."""
    import shutil

    flipped = tmp_path / "flipped"
    shutil.copytree(GLUE_DIR, flipped)
    dev = flipped / "RTE" / "dev.tsv"
    header, *rows = dev.read_text().splitlines()
    dev.write_text("\n".join([header, *(row.rsplit("\t", 1)[0] + "\t" + {"entailment": "not_entailment",
                                                                          "not_entailment": "entailment"}[
                                            row.rsplit("\t", 1)[1]] for row in rows)]) + "\n")
    summaries = {}
    for name, data_dir in (("real", GLUE_DIR), ("flipped", flipped)):
        run_dir = tmp_path / name
        _fake_upstream_stages(run_dir, tiny_models)
        finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *ENGINE_RUN, f"task.data_dir={data_dir}",
                                                 "finetune.max_train_samples=64", "finetune.epochs=2",
                                                 "finetune.eval_every=2", "finetune.validation_split=0.25"]))
        summaries[name] = json.loads((finetune_run_dir(run_dir) / "metrics.json").read_text())
    real, flip = summaries["real"], summaries["flipped"]
    assert real["budget"] == flip["budget"] and real["validation_examples"] == 16
    assert real["budget"]["total_steps"] == 12 and real["train_examples"] == 48  # 2 epochs of 48 in batches of 8
    weights = [load_file(tmp_path / name / "finetune" / "student" / "rte" / "seed-1" / "model" / "model.safetensors")
               for name in ("real", "flipped")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert real["score"] == pytest.approx(100 - flip["score"])  # binary labels: every dev answer flips


def test_length_grouping_pads_less_and_a_resume_must_keep_it(tmp_path, tiny_models, monkeypatch):
    """finetune.group_window sorts windows of micro batches by length: the same examples, fewer padded tokens than
    plain random batches. It changes what a run computes, so resuming with another window is refused."""
    from distilbert_cli.training import engine

    padded = {}
    real_train_step = engine.train_step
    sst2 = [*ENGINE_RUN, "task.names=[sst2]", "finetune.max_train_samples=64", "task.max_seq_length=64"]
    for window in (1, 4):
        shapes = padded[window] = []

        def train_step(job, *args, _shapes=shapes, **kwargs):
            real_loss = job.loss
            job.loss = lambda batch: (_shapes.append(tuple(batch["input_ids"].shape)), real_loss(batch))[1]
            try:
                return real_train_step(job, *args, **kwargs)
            finally:
                job.loss = real_loss

        monkeypatch.setattr(engine, "train_step", train_step)
        run_dir = tmp_path / f"window-{window}"
        _fake_upstream_stages(run_dir, tiny_models)
        finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *sst2, f"finetune.group_window={window}"]))
    assert sum(rows for rows, _ in padded[1]) == sum(rows for rows, _ in padded[4]) == 64
    assert sum(rows * length for rows, length in padded[4]) < sum(rows * length for rows, length in padded[1])

    monkeypatch.setattr(engine, "train_step", real_train_step)
    run_dir = tmp_path / "resumed"
    _fake_upstream_stages(run_dir, tiny_models)
    checkpoint = finetune_run_dir(run_dir, task="sst2") / "checkpoints"

    def stop_after_a_checkpoint(job, *args, **kwargs):
        real_train_step(job, *args, **kwargs)
        if checkpoint.is_dir() and any(checkpoint.iterdir()):
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", stop_after_a_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            finetune.run(compose_config("finetune", [f"run_dir={run_dir}", *sst2, "finetune.group_window=4"]))
    code, output = _invoke("finetune", f"run_dir={run_dir}", *sst2, "finetune.group_window=1", "finetune.resume=auto")
    assert code == 2 and "group_window" in output, output
