"""Class 5, model folders holding pickled weights or shipping their own code: every place a model is read goes
through models/loading.py, so each refuses a folder whose weights are only pytorch_model.bin with one line saying how
to convert it (nothing is unpickled), and a config with an auto_map under trust_remote_code=false whatever its
model_type."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from builders import GLUE_DIR, build_tiny_bert
from faults.harness import assert_refused, distil
from safetensors.torch import load_file

pytestmark = pytest.mark.faults
PICKLED = "holds pickled weights (pytorch_model.bin), which are not loaded because unpickling can run code: " \
          "convert it to safetensors"


def pickled(source: Path, target: Path) -> Path:
    """A copy of a saved model with its weights as a pickle (what older checkpoints ship)."""
    shutil.copytree(source, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_teacher) -> dict[str, Path]:
    """The tiny teacher, a tiny model fine-tuned on RTE (its head as saved), and pickled copies of both."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("pickled")
    rte = build_tiny_bert(root / "rte", num_layers=2)
    labels = ("entailment", "not_entailment")
    model = BertForSequenceClassification.from_pretrained(rte, num_labels=2, id2label=dict(enumerate(labels)),
                                                          label2id={label: i for i, label in enumerate(labels)})
    model.config.finetuning_task = "rte"
    model.save_pretrained(rte)
    return {"teacher": tiny_teacher, "rte": rte, "pickled teacher": pickled(tiny_teacher, root / "p-teacher"),
            "pickled rte": pickled(rte, root / "p-rte")}


RTE = ["task.names=[rte]", f"task.data_dir={GLUE_DIR}", "task.max_seq_length=32"]
TASK_DISTILL = ["task-distill", *RTE, "task_distill.max_train_samples=4", "task_distill.max_eval_samples=4",
                "task_distill.epochs=null", "task_distill.max_steps=1", "task_distill.teacher_batch_size=4"]
SITES = {  # every place a model is read: the command, and the role its error names
    "init-student teacher": (lambda m: ["init-student", f"teacher.name_or_path={m['pickled teacher']}",
                                        "student.num_layers=2"], "teacher"),
    "finetune model": (lambda m: ["finetune", *RTE, f"finetune.models=[pk:{m['pickled teacher']}]",
                                  "finetune.max_train_samples=4"], "model pk"),
    "bench-cpu model": (lambda m: ["bench-cpu", f"bench.models=[pk:{m['pickled teacher']}]", "task=stsb",
                                   f"task.data_dir={GLUE_DIR}", "bench.max_examples=4"], "model pk"),
    "evaluate model dir": (lambda m: ["evaluate", *RTE, f"eval.model_dirs=[{m['pickled rte']}]"],
                           "fine-tuned model"),
    "task-distill teacher": (lambda m: [*TASK_DISTILL, "augment=none", f"task_distill.teacher={m['pickled rte']}",
                                        f"task_distill.student={m['teacher']}"], "teacher"),
    "task-distill student": (lambda m: [*TASK_DISTILL, "augment=none", f"task_distill.teacher={m['rte']}",
                                        f"task_distill.student={m['pickled teacher']}"], "student"),
    "augmentation masked LM": (lambda m: [*TASK_DISTILL, "augment=tinybert", "augment.copies=1",
                                          f"augment.masked_lm={m['pickled teacher']}",
                                          f"task_distill.teacher={m['rte']}", f"task_distill.student={m['teacher']}"],
                               "augmentation masked LM"),
}


@pytest.mark.parametrize("site", SITES)
def test_pickled_weights_are_one_line_wherever_a_model_is_read(models, tmp_path, site, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    arguments, role = SITES[site]
    result = distil(*arguments(models), f"run_dir={tmp_path / 'run'}")
    assert_refused(result, f"error: {role} ", PICKLED, "then remove pytorch_model.bin")


def test_pickled_weights_of_the_teacher_train_reads(run_dir, models):
    result = distil("train", "+debug=tiny", f"run_dir={run_dir}", f"teacher.name_or_path={models['pickled teacher']}")
    assert_refused(result, f"error: teacher {models['pickled teacher']} {PICKLED}", stage_dir=run_dir / "distill")


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_shipped_code_of_a_known_model_type_is_refused(tmp_path, tiny_teacher, file):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    config = json.loads((teacher / file).read_text())
    (teacher / file).write_text(json.dumps({**config, "auto_map": {"AutoModelForMaskedLM": "modeling.Evil"}}))
    (teacher / "modeling.py").write_text("raise RuntimeError('custom code must not run')\n")
    assert json.loads((teacher / "config.json").read_text())["model_type"] == "bert"  # a type transformers knows
    result = distil("init-student", f"run_dir={tmp_path / 'run'}", f"teacher.name_or_path={teacher}")
    assert_refused(result, f"error: teacher {teacher} ({file}) ships its own model code (auto_map "
                   "['AutoModelForMaskedLM']), which runs only with trust_remote_code=true")
