"""Model lists of finetune and bench-cpu: `student` and `teacher` mean the run's own models, anything else is a
local directory or a hub name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import check_name_or_path
from distilbert_cli.rundir import require_complete

# The run's own models, by the stage each comes from.
RUN_MODELS = {"student": artifacts.DISTILL, "teacher": artifacts.INIT_STUDENT}


@dataclass(frozen=True)
class ModelChoice:
    name: str  # folder and display name
    source: str  # local directory or hub name
    role: str  # student, teacher or other

    @property
    def stage(self) -> str | None:
        """The stage of the run this model comes from (None for an outside model)."""
        return RUN_MODELS.get(self.role)


def resolve_models(run_dir: str | Path, entries: Sequence[str], setting: str) -> list[ModelChoice]:
    """Model list entries: `student` = <run_dir>/distill/final, `teacher` = the run's teacher, or any path/hub name."""
    choices = []
    for entry in map(str, entries):
        if entry == "student":
            final = artifacts.DistillOutputs(require_complete(run_dir, artifacts.DISTILL)).final
            choices.append(ModelChoice(entry, str(final), entry))
        elif entry == "teacher":
            choices.append(ModelChoice(entry, artifacts.recorded_teacher(run_dir), entry))
        else:
            check_name_or_path(entry, "model")
            name = Path(entry).name
            # Folders named "student" or "teacher" elsewhere must not pass for this run's models.
            choices.append(ModelChoice(f"model-{name}" if name in RUN_MODELS else name, entry, "other"))
    names = [choice.name for choice in choices]
    if not choices or len(set(names)) != len(names):
        raise UsageError(f"{setting} must name each model once (names {names}); e.g. {setting}=[student,teacher]")
    return choices
