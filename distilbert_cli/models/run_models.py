"""Model lists of finetune, task-distill and bench-cpu: `student` and `teacher` mean the run's own models, anything
else is a local directory or a hub name, optionally named: `name:path` (a directory's own name is often just
`model` or `final`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import Run, folder_name_problem

# The run's own models.
RUN_MODELS = ("student", "teacher")
# The student kind that distil train does not distill (it has no MLM head): the run's student is init-student's.
TASK_ONLY_STUDENTS = ("bilstm",)
# `name:path`: a name of two or more characters (so a Windows drive letter is not taken for one).
NAMED_ENTRY = re.compile(r"(?P<name>[A-Za-z0-9_.-]{2,}):(?P<source>.+)")


@dataclass(frozen=True)
class ModelChoice:
    name: str  # folder and display name
    source: str  # local directory or hub name
    role: str  # student, teacher or other
    stage: str | None = None  # the stage of the run this model comes from (None for an outside model)


def run_student(run: Run) -> ModelChoice:
    """The run's student: <run_dir>/distill/final, or init-student's model for a student that distil train does not
    distill (a BiLSTM: task-distill distills it per task)."""
    init_dir = run.complete(artifacts.INIT_STUDENT)
    if init_dir is not None and run.manifest(artifacts.INIT_STUDENT).get("student_arch") in TASK_ONLY_STUDENTS:
        return ModelChoice("student", str(artifacts.InitStudentOutputs(init_dir).model), "student",
                           artifacts.INIT_STUDENT)
    final = artifacts.DistillOutputs(run.require(artifacts.DISTILL)).final
    return ModelChoice("student", str(final), "student", artifacts.DISTILL)


def split_entry(entry: str) -> tuple[str, str]:
    """(name, source) of a model list entry other than `student` and `teacher`: `name:path`, or a path or hub name
    named by its last component (an existing path with a colon is a path)."""
    named = NAMED_ENTRY.fullmatch(entry) if not Path(entry).exists() else None
    return (named["name"], named["source"]) if named else (Path(entry).name, entry)


def entry_name_problem(entry: str) -> str | None:
    """Why an entry's name cannot be the folder its runs are stored in (finetune/<name>/...), or None: the schema
    refuses such entries before any work."""
    if entry in RUN_MODELS:
        return None
    name, source = split_entry(entry)
    if (problem := folder_name_problem(name)) is None:
        return None
    return (f"entry {entry!r} is stored by the name {name!r}, which cannot be a folder ({problem}): name it, as in "
            f"my-model:{source}")


def resolve_models(run: Run, entries: Sequence[str], setting: str) -> list[ModelChoice]:
    """Model list entries: `student` = the run's student (see run_student), `teacher` = the run's teacher, or any
    path/hub name, as `name:path` to choose the name it is shown and stored by."""
    from distilbert_cli.models.loading import check_name_or_path  # transformers: not for the schema's name checks

    choices = []
    for entry in map(str, entries):
        if entry == "student":
            choices.append(run_student(run))
        elif entry == "teacher":
            choices.append(ModelChoice(entry, artifacts.recorded_teacher(run), entry, artifacts.INIT_STUDENT))
        else:
            if (problem := entry_name_problem(entry)) is not None:
                raise UsageError(f"{setting}: {problem}")
            name, source = split_entry(entry)
            check_name_or_path(source, "model")
            # Folders named "student" or "teacher" elsewhere must not pass for this run's models.
            choices.append(ModelChoice(f"model-{name}" if name in RUN_MODELS else name, source, "other"))
    names = [choice.name for choice in choices]
    if not choices or len(set(names)) != len(names):
        raise UsageError(f"{setting} must name each model once (names {names}); e.g. {setting}=[student,teacher]")
    return choices
