"""Models with a task head: loading a checkpoint for a task (a fresh head, or the head it was fine-tuned with), and
the checks that a model fits a task before any work."""

from __future__ import annotations

import inspect

from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import max_sequence_length
from distilbert_cli.models.loading import load_config, load_model
from distilbert_cli.tasks.base import Task

# Arguments of a model's forward() that are not inputs of a batch.
_NOT_INPUTS = ("self", "labels", "start_positions", "end_positions", "kwargs", "inputs_embeds")


def forward_inputs(model) -> set[str]:
    """Tensor inputs the model's forward() names (DistilBERT has no token_type_ids, BERT has)."""
    return {name for name in inspect.signature(model.forward).parameters if name not in _NOT_INPUTS}


def check_task_model(name_or_path: str, task: Task, role: str, trust_remote_code: bool):
    """The checkpoint's config, if transformers can put the task's head on that architecture."""
    import transformers

    config = load_config(name_or_path, trust_remote_code=trust_remote_code, role=role)
    if type(config) not in getattr(transformers, task.head.mapping) and not trust_remote_code:
        raise UsageError(f"{role} {name_or_path!r} ({config.model_type}) has no {task.head.words} architecture in "
                         f"transformers; pass a BERT-family checkpoint")
    return config


def load_task_model(source: str, task: Task, label_names, trust_remote_code: bool, role: str):
    """The encoder of `source` with a fresh head sized for `task`; the task's name is saved in its config."""
    import transformers

    model = load_model(getattr(transformers, task.head.auto_class), source, trust_remote_code=trust_remote_code,
                       role=role, **task.head_config(label_names))
    model.config.finetuning_task = task.name  # saved in config.json: the evaluation stage reads it
    return model


def load_finetuned(path: str, task: Task, trust_remote_code: bool, role: str):
    """A model fine-tuned on `task` (its head as saved)."""
    import transformers

    return load_model(getattr(transformers, task.head.auto_class), path, trust_remote_code=trust_remote_code,
                      role=role)


def load_soft_teacher(path: str, task: Task, label_names, student_config, trust_remote_code: bool):
    """A model fine-tuned on `task` whose outputs become the student's soft targets."""
    model = load_finetuned(path, task, trust_remote_code, "soft-target teacher")
    if task.model_label_names(model.config) != (tuple(label_names) if label_names is not None else None):
        raise UsageError(f"soft-target teacher {path!r} was fine-tuned on other classes than the student's: "
                         f"{task.model_label_names(model.config)} vs {label_names}")
    if model.config.vocab_size != student_config.vocab_size:
        raise UsageError(f"soft-target teacher {path!r} does not fit the student: vocab {model.config.vocab_size} "
                         f"vs {student_config.vocab_size}")
    return model.eval().requires_grad_(False)


def check_length(model, length: int, setting: str, role: str) -> None:
    """A model must have a position for every token of the task's inputs (RoBERTa's 514 positions take 512)."""
    if (longest := max_sequence_length(model.config)) is not None and length > longest:
        raise UsageError(f"{setting}={length} exceeds the {longest} tokens {role} takes")
