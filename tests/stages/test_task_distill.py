"""task-distill end to end on tiny models: a transformer student (TinyBERT's augmentation, the teacher's outputs
stored once and equal to a fresh forward pass, evaluated by distil evaluate), a BiLSTM on sentence pairs (Tang's
augmentation, a reused transfer set, timed by bench-cpu with ONNX), labels alone, TinyBERT's two steps, and bad
input (one line, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builders import GLUE_DIR, build_tiny_bert, write_corpus
from datasets import load_from_disk
from typer.testing import CliRunner

from distilbert_cli.artifacts import TaskDistillOutputs, read_jsonl
from distilbert_cli.cli import app
from distilbert_cli.downstream.task_models import load_finetuned
from distilbert_cli.models.loading import load_tokenizer
from distilbert_cli.rundir import read_manifest
from distilbert_cli.tasks import get_task

runner = CliRunner()
DATA = [f"task.data_dir={GLUE_DIR}", "task.max_seq_length=48"]
SMALL = [*DATA, "task_distill.max_train_samples=8", "task_distill.max_eval_samples=8", "task_distill.epochs=null",
         "task_distill.max_steps=3", "task_distill.log_every=2", "task_distill.teacher_batch_size=4"]


def distil(*args: str) -> None:
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run whose teacher (a tiny BERT with an MLM head) is fine-tuned on SST-2 and RTE and whose student is a
    1-layer DistilBERT (init-student, distil train), and a BiLSTM run built from the same teacher."""
    root = tmp_path_factory.mktemp("task-distill")
    teacher = build_tiny_bert(root / "teacher", num_layers=2)
    main, lstm = root / "main", root / "lstm"
    corpus = write_corpus(root / "corpus.txt")
    distil("prepare-data", f"run_dir={main}", f"teacher.name_or_path={teacher}", "data=local",
           f"data.paths=[{corpus}]", "prepare.validation_size=4", "prepare.num_proc=1", "prepare.max_seq_length=32")
    distil("init-student", f"run_dir={main}", f"teacher.name_or_path={teacher}", "student.num_layers=1")
    distil("train", f"run_dir={main}", "+debug=tiny", "train.max_steps=1")
    distil("finetune", f"run_dir={main}", "finetune.models=[teacher]", "task.names=[sst2,rte]", *DATA,
           "finetune.epochs=1", "finetune.max_train_samples=16", "finetune.max_eval_samples=8")
    distil("init-student", f"run_dir={lstm}", f"teacher.name_or_path={teacher}", "student=bilstm",
           "student.embedding_size=16", "student.hidden_size=8", "student.classifier_size=8")
    return {"teacher": teacher, "main": main, "lstm": lstm}


def test_a_transformer_student_from_tinybert_augmented_data(runs):
    main = runs["main"]
    distil("task-distill", f"run_dir={main}", "task.names=[sst2]", *SMALL, "augment.copies=3")
    out = TaskDistillOutputs(main / "task-distill")
    info = json.loads(out.transfer_info.read_text())
    assert info["settings"]["augment"]["method"] == "tinybert" and info["settings"]["masked_lm"].startswith("sha256:")
    stats = info["stats"]
    assert stats["examples"] == 8 and stats["rows"] == 8 + stats["augmented_rows"] and stats["augmented_rows"] > 8
    assert stats["copies_drawn"] == 24 and stats["teacher_seconds"] >= 0 and stats["bytes"] > 0
    run = out.run("sst2", 56)
    summary = json.loads(run.metrics.read_text())
    assert summary["steps"] == {"intermediate": 0, "prediction": 3} and summary["losses"] == {"mse": 1.0}
    assert len(read_jsonl(run.predictions)) == 8 and (run.model / "config.json").is_file()
    assert [line["step"] for line in read_jsonl(run.loss_log)] == [2, 3]
    manifest = read_manifest(out.path)
    assert manifest["status"] == "complete" and manifest["scores"] == {"56": summary["score"]}
    assert {entry.get("stage") or entry["role"] for entry in manifest["inputs"]} >= {
        "finetune", "distill", "student", "teacher", "augmentation masked LM"}
    # evaluated like any fine-tuned model
    distil("evaluate", f"run_dir={main / 'eval'}", "task.names=[sst2]", f"eval.model_dirs=[{run.model}]", *DATA,
           "eval.max_samples=8")
    results = json.loads((main / "eval" / "evaluate" / "results.json").read_text())
    assert results["models"][str(run.model)]["score"] == pytest.approx(summary["score"])


def test_stored_teacher_outputs_equal_a_fresh_forward_pass(runs):
    out = TaskDistillOutputs(runs["main"] / "task-distill")
    if not out.transfer.exists():
        pytest.skip("needs the transformer run above")
    transfer = load_from_disk(str(out.transfer))
    assert list(transfer["augmented"]).count(True) > 0
    teacher_dir = runs["main"] / "finetune" / "teacher" / "sst2" / "seed-56" / "model"
    teacher, tokenizer = load_finetuned(str(teacher_dir), get_task("sst2"), False, "teacher"), load_tokenizer(
        str(teacher_dir))
    rows = transfer.select(range(0, len(transfer), 3))
    encoded = tokenizer(list(rows["sentence1"]), truncation=True, max_length=48, padding=True, return_tensors="pt")
    assert encoded["input_ids"][0].tolist()[:len(rows[0]["input_ids"])] == rows[0]["input_ids"]
    with torch.no_grad():
        fresh = teacher.eval()(**encoded).logits
    np.testing.assert_allclose(np.asarray(list(rows["teacher_logits"])), fresh.numpy(), atol=1e-5)


def test_a_bilstm_on_sentence_pairs_with_a_reused_transfer_set_timed_by_bench_cpu(runs):
    main, lstm = runs["main"], runs["lstm"]
    teacher = main / "finetune" / "teacher" / "rte" / "seed-56" / "model"
    tang = ["task.names=[rte]", *SMALL, "augment=tang", "augment.copies=2", f"task_distill.teacher={teacher}",
            "task_distill.learning_rate=1e-3"]
    distil("task-distill", f"run_dir={main / 'rte'}", *tang, "task_distill.student=" + str(lstm / "init-student"
                                                                                          / "model"))
    transfer = main / "rte" / "task-distill" / "transfer"
    distil("task-distill", f"run_dir={lstm}", *tang, f"task_distill.transfer_set={transfer}")
    manifest = read_manifest(lstm / "task-distill")
    assert "transfer set" in {entry.get("role") for entry in manifest["inputs"]}
    assert not (lstm / "task-distill" / "transfer").exists()  # reused, not rebuilt
    model = TaskDistillOutputs(lstm / "task-distill").run("rte", 56).model
    assert json.loads((model / "config.json").read_text())["architectures"] == ["BiLSTMForSequenceClassification"]
    # Another augmentation than the reused set's is refused, naming what differs.
    result = runner.invoke(app, ["task-distill", f"run_dir={lstm}", "overwrite=true", *tang, "augment.copies=3",
                                 f"task_distill.transfer_set={transfer}"])
    assert result.exit_code == 2 and "was built with other augment" in result.output
    distil("bench-cpu", f"run_dir={lstm}", f"bench.models=[{model}]", "bench.backends=[eager,onnx]",
           "task.names=[rte]", f"task.data_dir={GLUE_DIR}", "bench.max_examples=6", "bench.num_threads=1",
           "bench.repeats=1", "bench.warmup_batches=1", "bench.check_examples=6")
    results = json.loads((lstm / "bench-cpu" / "results.json").read_text())
    assert [(row["backend"], row["status"]) for row in results["results"]] == [("eager", "ok"), ("onnx", "ok")]
    (check,) = results["checks"]
    assert check["max_abs_diff"] < 1e-5


def test_labels_alone_needs_no_teacher(runs):
    run_dir = runs["main"] / "labels"
    distil("task-distill", f"run_dir={run_dir}", "task.names=[sst2]", *SMALL, "augment=none",
           "task_distill.loss.alpha_mse=0", "task_distill.loss.alpha_hard=1",
           f"task_distill.student={runs['main'] / 'distill' / 'final'}")
    transfer = load_from_disk(str(run_dir / "task-distill" / "transfer"))
    assert len(transfer) == 8 and "teacher_logits" not in transfer.column_names
    assert not any(entry.get("role") == "teacher" for entry in read_manifest(run_dir / "task-distill")["inputs"])


def test_tinybert_two_steps_intermediate_layers_then_the_prediction_layer(runs):
    main = runs["main"]
    distil("task-distill", f"run_dir={main / 'two-step'}", "+experiment=tinybert_task", "task.names=[sst2]",
           *SMALL, "augment=tang", "augment.copies=1", "task_distill.intermediate.epochs=0.5",
           f"task_distill.student={main / 'distill' / 'final'}",
           f"task_distill.teacher={main / 'finetune' / 'teacher' / 'sst2' / 'seed-56' / 'model'}")
    run = TaskDistillOutputs(main / "two-step" / "task-distill").run("sst2", 56)
    lines = read_jsonl(run.loss_log)
    first = [line for line in lines if line["stage"] == "intermediate layers"]
    second = [line for line in lines if line["stage"] == "prediction layer"]
    assert first and second and first[-1]["step"] < second[0]["step"]
    assert {"loss_embed", "loss_hidden", "loss_attn_scores"} <= set(first[0]) and "loss_soft" in second[0]
    steps = json.loads(run.metrics.read_text())["steps"]
    assert steps["intermediate"] == first[-1]["step"] and steps["prediction"] == 3


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.names=[squad]"], "task-distill distills classification and regression tasks; SQuAD v1.1 is question"),
    (["task.names=[stsb]", "task_distill.loss.alpha_soft=1"], "STS-B is a regression: task_distill.loss.alpha_soft"),
    (["task.names=[sst2,rte]"], "task-distill distills one task"),
    (["task_distill.epochs=null"], "set exactly one of task_distill.epochs, task_distill.max_steps"),
    (["task_distill.loss.alpha_mse=0"], "every task_distill.loss weight is 0"),
    (["augment.replace_probability=1.5"], "augment.replace_probability=1.5: input should be less than or equal to 1"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path, overrides, message):
    result = runner.invoke(app, ["task-distill", f"run_dir={tmp_path / 'run'}", *DATA, *overrides])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "run" / "task-distill").exists()


def test_a_run_without_a_fine_tuned_teacher_or_with_a_foreign_student_exits_2(runs, tmp_path):
    result = runner.invoke(app, ["task-distill", f"run_dir={runs['lstm']}", "task.names=[sst2]", *SMALL])
    assert result.exit_code == 2 and "input stage finetune not found" in result.output
    result = runner.invoke(app, ["task-distill", f"run_dir={runs['lstm']}", "task.names=[sst2]", *SMALL,
                                 "task_distill.intermediate.epochs=1"])
    assert result.exit_code == 2 and "the student is a 'distil_bilstm' model" in result.output
    other = build_tiny_bert(tmp_path / "other", num_layers=1)
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab_file=str(other / "vocab.txt")).save_pretrained(other)
    result = runner.invoke(app, ["task-distill", f"run_dir={runs['main']}", "task.names=[sst2]", *SMALL,
                                 f"task_distill.student={other}", "overwrite=true"])
    assert result.exit_code == 2 and "does not share the teacher's vocabulary" in result.output


def explicit_models(main) -> list[str]:
    """The run's student and fine-tuned SST-2 teacher named by path: a run directory needs no other stage."""
    return [f"task_distill.student={main / 'distill' / 'final'}",
            f"task_distill.teacher={main / 'finetune' / 'teacher' / 'sst2' / 'seed-56' / 'model'}"]


@pytest.mark.slow
def test_two_processes_task_distill_like_one_accumulating_two_in_both_steps_and_resume_exactly(
        runs, tmp_path, monkeypatch):
    """TinyBERT's two steps with micro batch 2 x 2 processes against micro batch 2 x accumulation 2 on 1 process:
    the same first-step gradients (of the intermediate step) and every logged loss of both steps; the 2-process run
    stopped after its step-2 checkpoint (inside the intermediate step) and resumed ends bitwise where it does
    uninterrupted."""
    from safetensors.torch import load_file
    from stage_worker import assert_first_step_gradients_match, recording_train_step, run_on_two_processes

    from distilbert_cli.training import engine

    settings = ["task.names=[sst2]", *SMALL, *explicit_models(runs["main"]), "augment=tang", "augment.copies=2",
                "task_distill.batch_size=4", "task_distill.micro_batch_size=2", "task_distill.max_steps=4",
                "task_distill.intermediate.epochs=1", "task_distill.log_every=1", "task_distill.checkpoint_every=2",
                "task_distill.max_grad_norm=null", "logger=none"]
    single = tmp_path / "single"
    single.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", recording_train_step(engine.train_step, single))
        distil("task-distill", f"run_dir={single}", *settings)
    root = tmp_path / "two"
    for name in ("uninterrupted", "resumed"):
        (root / name).mkdir(parents=True)
    run_on_two_processes("task_distill", root, settings)
    two = root / "uninterrupted"
    assert_first_step_gradients_match(single, two, min_norm=1e-3)  # a 1-layer student's intermediate step
    runs_of = {name: TaskDistillOutputs(path / "task-distill").run("sst2", 56)
               for name, path in (("single", single), ("two", two), ("resumed", root / "resumed"))}
    logged = {name: [{k: v for k, v in line.items() if k.startswith("loss") or k in ("step", "stage")}
                     for line in read_jsonl(run.loss_log)] for name, run in runs_of.items()}
    assert logged["resumed"] == logged["two"]
    assert {line["stage"] for line in logged["single"]} == {"intermediate layers", "prediction layer"}
    assert [line["step"] for line in logged["two"]] == [line["step"] for line in logged["single"]]
    for ours, theirs in zip(logged["two"], logged["single"], strict=True):
        assert ours.pop("stage") == theirs.pop("stage")
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7)
    resumed, uninterrupted = (load_file(runs_of[name].model / "model.safetensors") for name in ("resumed", "two"))
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert json.loads(runs_of["two"].metrics.read_text())["steps"] == json.loads(
        runs_of["single"].metrics.read_text())["steps"]


def test_wandb_offline_files_appear_under_each_students_folder(runs, tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    distil("task-distill", f"run_dir={tmp_path / 'run'}", "task.names=[sst2]", *SMALL, *explicit_models(runs["main"]),
           "augment=none", "logger=wandb", "logger.mode=offline")
    run = TaskDistillOutputs(tmp_path / "run" / "task-distill").run("sst2", 56)
    (offline_run,) = (run.path / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb"))


def test_model_selection_holds_training_examples_out_of_the_transfer_set(runs):
    """With task_distill.eval_every, validation_split of the training examples are held out before the transfer set
    is built (never the dev set): the student is scored on them every eval_every steps and the best step is kept."""
    main = runs["main"]
    run = main / "selection"
    teacher = main / "finetune" / "teacher" / "sst2" / "seed-56" / "model"
    distil("task-distill", f"run_dir={run}", "task.names=[sst2]", *SMALL, "augment=none",
           f"task_distill.teacher={teacher}",
           f"task_distill.student={main / 'distill' / 'final'}", "task_distill.eval_every=1",
           "task_distill.validation_split=0.25", "task_distill.learning_rate=1e-3")
    outputs = TaskDistillOutputs(run / "task-distill")
    metrics = json.loads(outputs.run("sst2", 56).metrics.read_text())
    assert metrics["validation_examples"] == 2
    assert len(load_from_disk(str(outputs.transfer))) == 6  # 8 training examples, 2 held out, no copies
    budget = metrics["budget"]
    assert budget["total_steps"] == 3 and budget["chosen_step"] in (1, 2, 3)
    evaluations = [line for line in read_jsonl(outputs.run("sst2", 56).loss_log) if "validation" in line]
    assert [line["step"] for line in evaluations] == [1, 2, 3]
