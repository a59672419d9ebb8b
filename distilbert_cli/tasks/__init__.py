"""Downstream tasks by name, across task families. Adding a family = its module here (with a `TASKS` dict of
`Task`s) and one entry in FAMILIES."""

from __future__ import annotations

from collections.abc import Sequence

from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import glue
from distilbert_cli.tasks.base import Task

FAMILIES = (glue,)
TASKS: dict[str, Task] = {name: task for family in FAMILIES for name, task in family.TASKS.items()}


def get_task(name: str) -> Task:
    """The task called `name` ("sst2", "SST-2" and "sst-2" all work), or a UsageError listing the known ones."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def get_tasks(names: Sequence[str]) -> list[Task]:
    tasks = [get_task(name) for name in names]
    if not tasks:
        raise UsageError("task.names is empty; name at least one task, e.g. task.names=[rte]")
    if len({task.name for task in tasks}) != len(tasks):
        raise UsageError(f"task.names names a task twice: {list(names)}")
    return tasks
