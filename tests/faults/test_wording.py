"""Class 9, wording: an error says what is wrong with the user's setting or file in the project's words, not a
library's internal message (transformers' "Unrecognized model", the override grammar's "no viable alternative",
pydantic's class names) and not the opposite of the truth (a wider student called narrower)."""

from __future__ import annotations

import json
import shutil

import pytest
from faults.harness import assert_refused, distil

pytestmark = pytest.mark.faults


def test_a_wider_student_is_called_wider(tmp_path, tiny_teacher):
    result = distil("init-student", f"run_dir={tmp_path / 'run'}", f"teacher.name_or_path={tiny_teacher}",
                    "student.hidden_size=64", "student.num_attention_heads=2")
    line = assert_refused(result, "error: student.hidden_size=64 (the teacher's 32): a student wider than the "
                          "teacher can only be built with init.strategy=random")
    assert "narrower" not in line


def test_a_config_without_a_model_type_says_so(tmp_path, tiny_teacher):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.pop("model_type")
    (teacher / "config.json").write_text(json.dumps(config))
    line = assert_refused(distil("init-student", f"run_dir={tmp_path / 'run'}", f"teacher.name_or_path={teacher}"),
                          f"error: teacher {teacher}: config.json names no model_type")
    assert "Unrecognized model" not in line


def test_an_override_that_does_not_parse_is_named(tmp_path):
    line = assert_refused(distil("train", f"run_dir={tmp_path}", "loss.temperature=[1,2"),
                          "error: cannot parse the override 'loss.temperature=[1,2'", "quote a value")
    assert "See https://" not in line


def test_a_squad_entry_of_the_wrong_type_names_no_internal_class(tmp_path):
    from distilbert_cli.errors import UsageError
    from distilbert_cli.tasks.squad import read_squad_json

    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [5]}]}]}))
    with pytest.raises(UsageError) as refused:
        read_squad_json(path)
    assert str(refused.value) == f"{path} is not in the SQuAD JSON layout: data[0].paragraphs[0].qas[0] is not a " \
                                 "JSON object"
