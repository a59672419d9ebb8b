"""Class 8, values and structures the schema used to let through: a sequence length beyond the teacher's positions
when its tokenizer records no maximum, a seed the generators cannot take, a field of the wrong type inside a SQuAD
file, a manifest or a checkpoint's JSON. Each is one line naming the key or the entry (tests/fuzz/ generates many
more)."""

from __future__ import annotations

import json
import shutil

import pytest
from builders import SQUAD_DIR
from faults.harness import assert_refused, distil, prepare_args, train

pytestmark = pytest.mark.faults


def test_a_length_beyond_the_teachers_positions_is_refused_when_the_tokenizer_records_no_maximum(
        tmp_path, tiny_teacher, corpus):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    tokenizer = json.loads((teacher / "tokenizer_config.json").read_text())
    tokenizer.pop("model_max_length")  # transformers then records no maximum (a huge number)
    (teacher / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    result = distil(*prepare_args(tmp_path / "run", teacher, corpus, "prepare.max_seq_length=100"))
    assert_refused(result, f"error: prepare.max_seq_length=100 exceeds the 64 tokens the teacher '{teacher}' has "
                   "positions for")


@pytest.mark.parametrize("setting", ["seed=4294967296", "validation.seed=-1"])
def test_a_seed_the_generators_cannot_take_is_refused(run_dir, setting):
    key, value = setting.split("=")
    assert_refused(train(run_dir, setting), f"error: {key}={value}: input should be")


def test_a_squad_question_list_that_is_not_a_list_is_one_line(tmp_path, tiny_teacher):
    data = tmp_path / "squad"
    shutil.copytree(SQUAD_DIR, data)
    dev = json.loads((data / "dev-v1.1.json").read_text())
    dev["data"][0]["paragraphs"][0]["qas"] = {"id": "a", "question": "q"}
    (data / "dev-v1.1.json").write_text(json.dumps(dev))
    result = distil("finetune", f"run_dir={tmp_path / 'run'}", "task=squad", f"task.data_dir={data}",
                    f"finetune.models=[tiny:{tiny_teacher}]")
    assert_refused(result, f"error: {data / 'dev-v1.1.json'} is not in the SQuAD JSON layout: "
                   "data[0].paragraphs[0].qas is not a list", stage_dir=tmp_path / "run" / "finetune")


def test_a_manifest_whose_files_are_not_an_object_is_one_line(run_dir):
    manifest = run_dir / "prepare-data" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": 5}))
    assert_refused(train(run_dir), f"error: {manifest} is unreadable (not a stage manifest: files is not a JSON "
                   "object)", stage_dir=run_dir / "distill")


@pytest.mark.parametrize(("change", "problem"), [
    ({"step": "2"}, "step is not an integer"),
    ({"log_window": {"micro_batches": 2, "names": "loss", "sums": []}}, "log_window.names is not a list"),
    ({"resume_state": []}, "resume_state is not a JSON object"),
])
def test_a_checkpoint_field_of_the_wrong_type_is_one_line(interrupted, change, problem):
    state = interrupted / "distill" / "checkpoints" / "step-2" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), **change}))
    assert_refused(train(interrupted, "train.resume=auto"), f"error: {state} is unreadable ({problem})",
                   stage_dir=interrupted / "distill")


def test_a_scheduler_state_of_the_wrong_type_is_one_line(interrupted):
    scheduler = interrupted / "distill" / "checkpoints" / "step-2" / "scheduler.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "last_epoch": "2"}))
    assert_refused(train(interrupted, "train.resume=auto"), f"error: {scheduler} is unreadable (last_epoch is str, "
                   "not int)", stage_dir=interrupted / "distill")
