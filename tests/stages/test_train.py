"""distil train: tiny end-to-end runs, exact resume (across an epoch boundary, with DataLoader workers, on 2
processes), 2 processes vs accumulation (gradients and losses), and the safety checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_tiny_bert, inject_non_finite_losses, tiny_vocab, write_corpus
from safetensors.numpy import load_file as load_arrays
from safetensors.torch import load_file
from stage_worker import (
    Stopped,
    assert_first_step_gradients_match,
    recording_train_step,
    run_on_two_processes,
    save_then_stop,
)
from typer.testing import CliRunner

from distilbert_cli.artifacts import PreparedData
from distilbert_cli.cli import app
from distilbert_cli.config import compose_config
from distilbert_cli.data.prepared import load_prepared
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import read_manifest
from distilbert_cli.stages import init_student as init_student_stage
from distilbert_cli.stages import prepare_data as prepare_data_stage
from distilbert_cli.stages import train as train_stage
from distilbert_cli.training import engine
from distilbert_cli.training.masking import masking_spec
from distilbert_cli.training.mlm_eval import evaluate_mlm, score_targets, validation_batches

TINY = ["+experiment=triple_loss", "+debug=tiny"]


def prepare_data(run_dir: Path, teacher: Path, tmp_dir: Path, n_lines: int = 60) -> None:
    """Run prepare-data on a small random corpus made of the tiny vocabulary's words."""
    corpus = write_corpus(tmp_dir / "corpus.txt", n_lines)
    overrides = [f"teacher.name_or_path={teacher}", f"run_dir={run_dir}", "data=local", f"data.paths=[{corpus}]",
                 "prepare.validation_size=12", "prepare.num_proc=1", "prepare.max_seq_length=64"]
    prepare_data_stage.run(compose_config("prepare_data", overrides), overrides)


def init_student(run_dir: Path, teacher: Path, *overrides: str) -> None:
    overrides = [f"teacher.name_or_path={teacher}", f"run_dir={run_dir}", *overrides]
    init_student_stage.run(compose_config("init_student", overrides), overrides)


@pytest.fixture(scope="session")
def inputs_run(tmp_path_factory, tiny_teacher) -> Path:
    """A run directory after prepare-data and init-student (a 3-layer student of the tiny teacher)."""
    tmp_dir = tmp_path_factory.mktemp("distill-inputs")
    run_dir = tmp_dir / "run"
    prepare_data(run_dir, tiny_teacher, tmp_dir)
    init_student(run_dir, tiny_teacher, "student.num_layers=3")
    return run_dir


@pytest.fixture()
def run_dir(inputs_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(inputs_run, target)
    return target


def train(run_dir: Path, *overrides: str, experiment: str = "triple_loss"):
    overrides = [f"+experiment={experiment}", "+debug=tiny", f"run_dir={run_dir}", *overrides]
    return train_stage.run(compose_config("train", overrides), overrides)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "distill" / "final" / "model.safetensors")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


def test_triple_loss_end_to_end_through_the_cli(run_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    result = CliRunner().invoke(app, ["train", *TINY, f"run_dir={run_dir}"])
    assert result.exit_code == 0, result.output
    stage = run_dir / "distill"
    assert read_manifest(stage)["status"] == "complete"
    assert (stage / "final" / "tokenizer.json").is_file()
    assert AutoModelForMaskedLM.from_pretrained(stage / "final").config.n_layers == 3
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "tokens_seen"}
    for r in rows:
        assert r["loss"] == pytest.approx(5.0 * r["loss_ce"] + 2.0 * r["loss_mlm"] + 1.0 * r["loss_cos"], rel=1e-5)
    # 4 steps: warmup over ceil(5% of 4) = 1 step from 0, then linear decay from 5e-4 towards 0 at step 4
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 5e-4, 5e-4 * 2 / 3, 5e-4 / 3])
    assert 0 < rows[0]["tokens_seen"] < rows[-1]["tokens_seen"]
    assert [p.name for p in sorted((stage / "checkpoints").iterdir())] == ["step-2", "step-4"]
    validation = json.loads((stage / "validation.json").read_text())
    assert set(validation["student"]) == {"mlm_loss", "mlm_accuracy", "teacher_agreement", "uniform"}
    assert validation["teacher"]["mlm_loss"] > 0 and validation["teacher"]["uniform"]["mlm_loss"] > 0
    # The saved student reproduces its validation figures on the same fixed masks: smoothed with
    # validation.smoothing_exponent (whatever the training masks), and uniform over the real tokens.
    final = AutoModelForMaskedLM.from_pretrained(stage / "final")
    prepared = PreparedData(run_dir / "prepare-data")
    splits, counts = load_prepared(prepared)
    cfg = compose_config("train", TINY)
    # Every target's label, loss and prediction of both models are kept: the student's are the saved model's own,
    # and the figures and the agreement with the teacher's top-1 prediction are their means.
    targets = load_arrays(stage / "validation_targets.safetensors")
    for masks, exponent, figures in (("smoothed", 0.7, validation["student"]),
                                     ("uniform", 0.0, validation["student"]["uniform"])):
        masking = cfg.masking.model_copy(update={"smoothing_exponent": exponent})
        spec = masking_spec(masking, AutoTokenizer.from_pretrained(prepared.tokenizer), counts,
                            final.config.vocab_size)
        batches = validation_batches(splits["validation"], spec, cfg.validation.max_sequences,
                                     cfg.validation.batch_size, cfg.validation.seed)
        found = evaluate_mlm(final, batches, torch.device("cpu"))
        assert found == pytest.approx({key: figures[key] for key in ("mlm_loss", "mlm_accuracy")})
        scored = score_targets(final, batches, torch.device("cpu"))
        assert np.array_equal(targets[f"{masks}_labels"], scored["labels"]) and len(scored["labels"]) > 20
        assert np.array_equal(targets[f"student_{masks}_predictions"], scored["predictions"])
        np.testing.assert_allclose(targets[f"student_{masks}_losses"], scored["losses"], rtol=1e-5)
        agreement = np.mean(targets[f"student_{masks}_predictions"] == targets[f"teacher_{masks}_predictions"])
        assert figures["teacher_agreement"] == pytest.approx(agreement)


def stop_after_checkpoint(monkeypatch, step: int) -> None:
    """Make the run die (as if killed) right after the checkpoint of `step` is written."""
    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop(engine.save_checkpoint, step))


def test_resumed_run_gives_bitwise_the_same_weights(run_dir, tmp_path, monkeypatch):
    reference = tmp_path / "uninterrupted"
    shutil.copytree(run_dir, reference)
    train(reference, "train.deterministic=true")

    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 2)
        with pytest.raises(Stopped):
            train(run_dir, "train.deterministic=true")
    assert read_manifest(run_dir / "distill")["status"] == "failed"
    with pytest.raises(UsageError, match="loss.alpha_ce: 5.0 -> 1.0"):
        train(run_dir, "train.deterministic=true", "train.resume=auto", "loss.alpha_ce=1.0")
    train(run_dir, "train.deterministic=true", "train.resume=auto")

    assert read_manifest(run_dir / "distill")["resumed_from"].endswith("step-2")
    resumed, uninterrupted = final_weights(run_dir), final_weights(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    drop_speed = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(run_dir)]
    assert drop_speed == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(reference)]


def test_resume_across_an_epoch_boundary_with_dataloader_workers(run_dir, tmp_path, monkeypatch):
    """48 sequences in global batches of 16 (2 micro batches of 8): 3 steps an epoch. Killed after step 4 (epoch 1)
    and resumed there with 2 DataLoader workers, the run ends bitwise where an uninterrupted run without workers
    does."""
    settings = ["train.deterministic=true", "batch.global_batch_size=16", "batch.micro_batch_size=8",
                "train.max_steps=5", "train.checkpoint_every=4"]
    assert len(load_prepared(PreparedData(run_dir / "prepare-data"))[0]["train"]) == 48
    reference = tmp_path / "uninterrupted"
    shutil.copytree(run_dir, reference)
    train(reference, *settings, "batch.num_workers=0")
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 4)
        with pytest.raises(Stopped):
            train(run_dir, *settings, "batch.num_workers=2")
    train(run_dir, *settings, "batch.num_workers=2", "train.resume=auto")
    assert read_manifest(run_dir / "distill")["resumed_from"].endswith("step-4")
    resumed, uninterrupted = final_weights(run_dir), final_weights(reference)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name
    assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in metrics(reference)]


def test_a_fresh_run_does_not_reuse_checkpoints_of_an_interrupted_one(run_dir, monkeypatch):
    with monkeypatch.context() as patch:
        stop_after_checkpoint(patch, 2)
        with pytest.raises(Stopped):
            train(run_dir, "train.max_steps=3")
    assert (run_dir / "distill" / "checkpoints" / "step-2").is_dir()
    train(run_dir, "train.max_steps=1")  # resume=never (the default) starts over from step 0
    assert read_manifest(run_dir / "distill")["resumed_from"] is None
    assert [p.name for p in (run_dir / "distill" / "checkpoints").iterdir()] == ["step-1"]
    assert [r["step"] for r in metrics(run_dir)] == [1]


def test_mlm_only_loads_no_teacher(run_dir):
    train(run_dir, "train.max_steps=1", experiment="mlm_only")
    manifest = read_manifest(run_dir / "distill")
    assert not [i for i in manifest["inputs"] if i.get("role") == "teacher"]
    assert set(metrics(run_dir)[0]) == {"step", "loss", "loss_mlm", "lr", "tokens_per_s", "tokens_seen"}
    assert json.loads((run_dir / "distill" / "validation.json").read_text())["teacher"] is None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # skipped updates
def test_non_finite_loss_stops_with_a_clear_message(run_dir, monkeypatch):
    inject_non_finite_losses(monkeypatch)
    with pytest.raises(UsageError, match=r"training diverged: non-finite loss at 2 steps.*max_bad_steps=1"):
        train(run_dir, "train.max_bad_steps=1")
    assert read_manifest(run_dir / "distill")["status"] == "failed"


def test_headless_teacher_is_refused_for_logit_losses(tmp_path, tiny_teacher):
    run_dir = tmp_path / "run"
    headless = build_tiny_bert(tmp_path / "headless", num_layers=4, with_mlm_head=False)
    prepare_data(run_dir, headless, tmp_path, n_lines=16)
    init_student(run_dir, headless, "student.num_layers=2")
    with pytest.raises(UsageError, match="no MLM head.*alpha_ce=0"):
        train(run_dir)
    assert read_manifest(run_dir / "distill")["status"] == "failed"


def test_hidden_and_attention_losses_train_a_narrower_student_through_a_projection(tmp_path, inputs_run,
                                                                                   tiny_teacher):
    run_dir = tmp_path / "run"
    shutil.copytree(inputs_run / "prepare-data", run_dir / "prepare-data")
    init_student(run_dir, tiny_teacher, "student.num_layers=2", "student.hidden_size=16", "init=random")
    train(run_dir, "train.max_steps=2", "loss.alpha_ce=0", "loss.alpha_mlm=0", "loss.alpha_cos=0",
          "loss.alpha_hidden=1.0", "loss.alpha_attn=1.0")
    manifest = read_manifest(run_dir / "distill")
    assert manifest["layer_pairs"] == [[0, 5], [1, 11]]  # a random student: the uniform TinyBERT map
    assert set(metrics(run_dir)[0]) == {"step", "loss", "loss_hidden", "loss_attn", "lr", "tokens_per_s",
                                        "tokens_seen"}
    checkpoint = load_file(run_dir / "distill" / "checkpoints" / "step-2" / "model.safetensors")
    assert checkpoint["projections.hidden.weight"].shape == (32, 16)  # learned with the student, not saved in final/
    assert not any(name.startswith("projection") for name in final_weights(run_dir))


def test_teacher_with_another_vocabulary_is_refused(run_dir, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    other = tmp_path / "other-teacher"
    BertForMaskedLM(BertConfig(vocab_size=len(tiny_vocab()) + 7, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(other)
    with pytest.raises(UsageError, match="vocabularies differ"):
        train(run_dir, f"teacher.name_or_path={other}")


@pytest.mark.parametrize(("override", "message"), [
    ("batch.global_batch_size=5", "not a multiple of batch.micro_batch_size=2"),
    ("train.epochs=1", "set exactly one training budget"),
    ("train.mixed_precision=fp32", "train.mixed_precision='fp32': input should be 'no', 'bf16' or 'fp16'"),
])
def test_impossible_settings_exit_2_before_any_work(run_dir, override, message):
    result = CliRunner().invoke(app, ["train", *TINY, f"run_dir={run_dir}", override])
    assert result.exit_code == 2 and message in result.output
    assert not (run_dir / "distill").exists()


def test_wandb_offline_needs_no_account_and_writes_under_the_run_dir(run_dir, tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb login
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(run_dir, "logger=wandb", "logger.mode=offline")
    (offline_run,) = (run_dir / "distill" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("*.wandb")), sorted(p.name for p in offline_run.iterdir())


def test_missing_input_stage_exits_2_and_leaves_no_distill_stage(tmp_path):
    result = CliRunner().invoke(app, ["train", *TINY, f"run_dir={tmp_path}"])
    assert result.exit_code == 2 and f"input stage prepare-data not found: {tmp_path / 'prepare-data'}" in result.output
    assert not (tmp_path / "distill").exists()


@pytest.mark.slow
def test_two_processes_take_one_process_gradients_and_losses_and_resume_exactly(run_dir, tmp_path, monkeypatch):
    """Micro batch 2 x 2 processes against micro batch 2 x accumulation 2 on 1 process: the same gradients at the
    first step (compared before clipping, which would hide their scale: a first Adam step is about lr x sign(g), so
    comparing weights would not see gradients summed over processes or not divided by the accumulation) and the
    same logged losses. The 2-process run, killed after its step-2 checkpoint and resumed, ends bitwise where it
    does uninterrupted."""
    settings = ["train.deterministic=true", "optim.max_grad_norm=null", "batch.global_batch_size=4",
                "batch.micro_batch_size=2"]
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_step", recording_train_step(engine.train_step, single))
        train(single, *settings)
    root = tmp_path / "two"
    for name in ("uninterrupted", "resumed"):
        shutil.copytree(run_dir, root / name)
    run_on_two_processes("train", root, [*TINY, *settings])
    two = root / "uninterrupted"
    assert [(m["world_size"], m["accumulation"]) for m in map(read_manifest, (two / "distill", single / "distill"))] \
        == [(2, 1), (1, 2)]
    assert_first_step_gradients_match(single, two)
    for ours, theirs in zip(metrics(two), metrics(single), strict=True):
        assert {k: v for k, v in ours.items() if k.startswith("loss")} == pytest.approx(
            {k: v for k, v in theirs.items() if k.startswith("loss")}, rel=1e-5, abs=1e-7)

    assert read_manifest(root / "resumed" / "distill")["resumed_from"].endswith("step-2")
    resumed, uninterrupted = final_weights(root / "resumed"), final_weights(two)
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_each_input_manifest_is_read_once_per_reason(run_dir, monkeypatch):
    """distil train asks the run for prepare-data's and init-student's manifests many times (is it complete, its
    files, its facts, its teacher); the run reads each file three times, each for a reason of its own: to find the
    stage (before any lock file is made for it), again once its read lock is held (a writer may have replaced it in
    between), and at the end (is it still what the outputs were made from)."""
    from distilbert_cli import rundir

    reads = []
    real_read = rundir.read_manifest
    monkeypatch.setattr(rundir, "read_manifest", lambda stage_dir: reads.append(Path(stage_dir).name)
                        or real_read(stage_dir))
    train(run_dir, "train.max_steps=1")
    assert reads.count("init-student") == 3 and reads.count("prepare-data") == 3
