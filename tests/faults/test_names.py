"""Class 3, names are never paths: a model's name (of `name:path`, or a path's last component) becomes the folder
finetune/<name>/, so the schema refuses any name that is not a single safe path component, naming the key, before
anything is written."""

from __future__ import annotations

import pytest
from faults.harness import assert_refused, distil

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(("command", "setting", "entry", "name"), [
    ("finetune", "finetune.models", "[student,..:{model}]", ".."),
    ("finetune", "finetune.models", "[{model}/..]", ".."),
    ("finetune", "finetune.models", "['.tmp-x:{model}']", ".tmp-x"),
    ("bench-cpu", "bench.models", "[..:{model}]", ".."),
    ("task-distill", "task_distill.student", "...:{model}", "..."),
])
def test_a_name_that_is_not_one_folder_is_refused_naming_the_key(tmp_path, tiny_teacher, command, setting, entry,
                                                                    name):
    run_dir = tmp_path / "deep" / "run"
    value = entry.format(model=tiny_teacher)
    line = assert_refused(distil(command, f"run_dir={run_dir}", f"{setting}={value}"), f"error: {setting}=",
                          f"is stored by the name {name!r}, which cannot be a folder")
    assert "name it, as in my-model:" in line
    assert not (tmp_path / "deep").exists()  # nothing written, inside the run directory or beside it
