"""Downstream tasks by name, across task families. Adding a family = its module here (with a `TASKS` dict of
`Task`s) and one entry in FAMILIES."""

from __future__ import annotations

from collections.abc import Sequence

from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import glue, squad, text
from distilbert_cli.tasks.base import Task

FAMILIES = (glue, text, squad)
TASKS: dict[str, Task] = {name: task for family in FAMILIES for name, task in family.TASKS.items()}


def _key(name: str) -> str:
    return str(name).lower().replace("-", "").replace("_", "")


_BY_KEY = {_key(name): task for name, task in TASKS.items()}


def get_task(name: str) -> Task:
    """The task called `name` ("sst2", "SST-2" and "sst-2" all work), or a UsageError listing the known ones."""
    if _key(name) not in _BY_KEY:
        raise UsageError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return _BY_KEY[_key(name)]


def get_tasks(names: Sequence[str]) -> list[Task]:
    tasks = [get_task(name) for name in names]
    if not tasks:
        raise UsageError("task.names is empty; name at least one task, e.g. task.names=[rte]")
    if len({task.name for task in tasks}) != len(tasks):
        raise UsageError(f"task.names names a task twice: {list(names)}")
    return tasks
