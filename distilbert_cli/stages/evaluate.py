"""`distil evaluate` (alias `eval-glue`): score fine-tuned models on their tasks' dev splits and write the
paper's tables (Table 1 for GLUE, Table 2 for IMDb and SQuAD, a table for your own data) beside the published rows.

    distil evaluate run_dir=runs/exp1                          # everything under <run_dir>/finetune/
    distil evaluate task=rte task.data_dir=path/to/glue_data 'eval.model_dirs=[path/to/fine-tuned-rte]'
    distil evaluate task=squad 'eval.model_dirs=[path/to/fine-tuned-squad]' run_dir=runs/squad

Scores come from the dev predictions that finetune saved (or, with `eval.model_dirs`, from running
already fine-tuned models on dev), with each task's metric; the median over seeds, as in the paper.
Writes `<run_dir>/evaluate/results.json` and `results.md`: our rows, the paper's rows (published), the
student/teacher retention of each table (the paper's "97%"), and notes on the data (rows skipped, shortcuts,
truncation and window settings).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from distilbert_cli import artifacts
from distilbert_cli.downstream.prediction import encode_splits, evaluate, first_rows
from distilbert_cli.downstream.task_models import check_length, forward_inputs, load_finetuned
from distilbert_cli.errors import UsageError, invalid_entry, unreadable
from distilbert_cli.models.loading import load_config, load_tokenizer
from distilbert_cli.rundir import MANIFEST, Run, write_json_atomic
from distilbert_cli.schema import Evaluate, Finetune
from distilbert_cli.tasks import get_task, get_tasks
from distilbert_cli.tasks.base import Task
from distilbert_cli.tasks.results import by_table, collect_finetuned, render_markdown, retention, summarize

log = logging.getLogger(__name__)


def describe_data(tasks: Sequence[Task], settings) -> str:
    return "; ".join(dict.fromkeys(task.describe_data(settings) for task in tasks))


def evaluated_tasks(tasks: Sequence[Task], records: list[dict]) -> list[Task]:
    return [task for task in tasks if task.name in {record["task"] for record in records}]


def settings_notes(tasks: Sequence[Task], settings) -> list[str]:
    """How the tasks were encoded (truncation, windows), one note per setting with the tasks it applies to."""
    notes: dict[str, list[str]] = {}
    for task in tasks:
        if (note := task.describe_settings(settings)) is not None:
            notes.setdefault(note, []).append(task.title)
    return [f"{', '.join(titles)}: {note}" for note, titles in notes.items()]


def problem_notes(problems: dict) -> list[str]:
    """{task: {split: {what: count}}} in words."""
    return [f"{get_task(task).title} {split}: skipped " + ", ".join(f"{count} {what}" for what, count in found.items())
            for task, splits in problems.items() for split, found in splits.items()]


def resolve_model_dirs(cfg: Evaluate, tasks: Sequence[Task]) -> list[tuple[str, Task, tuple | None]]:
    """Each `eval.model_dirs` entry with the task it was fine-tuned on and its classes, checked before any work."""
    resolved = []
    for entry in map(str, cfg.eval.model_dirs):
        config = load_config(entry, trust_remote_code=cfg.trust_remote_code, role="fine-tuned model")
        # finetune records the task in config.json; a foreign checkpoint needs task.names to name one task.
        task_name = getattr(config, "finetuning_task", None)
        if task_name is None and len(tasks) != 1:
            raise UsageError(f"cannot tell which task {entry} was fine-tuned on: set task.names=[<that task>]")
        task = get_task(task_name) if task_name is not None else tasks[0]
        if task.name not in [t.name for t in tasks]:
            raise UsageError(f"{entry} was fine-tuned on {task.name}, which is not in task.names")
        if not any(name.endswith(task.head.architecture_suffix) for name in config.architectures or ()):
            raise UsageError(f"{entry} is not a fine-tuned {task.head.words} checkpoint "
                             f"(architectures {config.architectures})")
        try:
            label_names = task.model_label_names(config)
        except UsageError as exc:
            raise UsageError(f"{entry}: {exc}") from None
        resolved.append((entry, task, label_names))
    return resolved


def evaluate_model_dirs(cfg: Evaluate, model_dirs: list, out_dir: Path) -> tuple[list[dict], dict]:
    """Run each fine-tuned model on its task's dev splits; predictions go to out_dir/model-<i>/. Returns the
    records and the rows the data loader skipped ({task: {split: {what: count}}})."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    records, problems = [], {}
    for index, (entry, task, label_names) in enumerate(model_dirs):
        tokenizer = load_tokenizer(entry, trust_remote_code=cfg.trust_remote_code, role="fine-tuned model")
        model = load_finetuned(entry, task, cfg.trust_remote_code, "fine-tuned model")
        check_length(model, *task.input_length(cfg.task), f"fine-tuned model {entry}")
        data = first_rows(task.load(cfg.task, task.eval_splits(cfg.task), label_names), None, cfg.eval.max_samples)
        if data.skipped:
            problems[task.name] = data.skipped
        dev = encode_splits(task, data, data.splits, tokenizer, cfg.task, "token_type_ids" in forward_inputs(model))
        metrics = evaluate(task, accelerator.prepare_model(model, evaluation_mode=True), tokenizer, dev, cfg.task,
                           cfg.eval.batch_size, accelerator, artifacts.FinetuneRun(out_dir / f"model-{index}"))
        records.append({"model": entry, "task": task.name, "seed": None, "metrics": metrics})
    return records, problems


class _FinetuneManifest(BaseModel):
    """What the evaluation reads of the finetune stage's manifest."""

    config: Finetune
    data_problems: dict[str, dict[str, dict[str, int]]] = {}  # {task: {split: {what: count}}}


def finetune_notes(manifest: dict, manifest_path: Path, tasks: Sequence[Task]) -> tuple[str, list[str], bool]:
    """The data source, the settings and any shortcut (capped rows, skipped rows) of the finetune stage (its
    manifest, read as the finetune config it records), for an honest table, and whether its models learned from soft
    targets ("(D)")."""
    try:
        read = _FinetuneManifest.model_validate(manifest)
    except ValidationError as exc:
        raise unreadable(manifest_path, f"not a finetune manifest: {invalid_entry(exc)}") from None
    config, problems = read.config, read.data_problems
    notes = [f"finetune.{key}={getattr(config.finetune, key)} (not the full split)"
             for key in ("max_train_samples", "max_eval_samples") if getattr(config.finetune, key) is not None]
    notes += problem_notes(problems) + settings_notes(tasks, config.task)
    soft = config.finetune.soft_targets
    if soft.teacher is not None:
        notes.append(f"(D): every model but the teacher learned from the soft targets of the fine-tuned "
                     f"{soft.teacher!r} (alpha_ce {soft.alpha_ce}, alpha_task {soft.alpha_task}, "
                     f"temperature {soft.temperature})")
    return describe_data(tasks, config.task), notes, soft.teacher is not None


def run(cfg: Evaluate, overrides: Sequence[str] = ()) -> dict:
    """Score, tabulate and write results.{json,md}; return the results.json payload."""
    tasks = get_tasks(cfg.task.names)
    model_dirs = resolve_model_dirs(cfg, tasks)
    for _, task, _ in model_dirs:
        task.check_files(cfg.task, task.eval_splits(cfg.task))
    run_dir = Run.of(cfg)
    if not model_dirs:
        run_dir.require(artifacts.FINETUNE)

    with run_dir.open_stage(artifacts.EVALUATE, cfg, overrides) as stage:
        stage.expect(artifacts.RESULTS_JSON, artifacts.RESULTS_MD)
        if model_dirs:
            for entry, _, _ in model_dirs:
                stage.use_model(entry, "fine-tuned model")
            records, problems = evaluate_model_dirs(cfg, model_dirs, stage.path)
            stage.update(data_problems=problems)
            columns = evaluated_tasks(tasks, records)
            data, notes = describe_data(columns, cfg.task), problem_notes(problems) + settings_notes(columns, cfg.task)
            soft_targets = False  # unknown for outside models: their rows are named by their paths
        else:
            finetune_dir = stage.use_stage(artifacts.FINETUNE, reads=artifacts.FINETUNE_PREDICTIONS)
            records = collect_finetuned(finetune_dir, tasks)
            columns = evaluated_tasks(tasks, records)
            data, notes, soft_targets = finetune_notes(run_dir.manifest(artifacts.FINETUNE),
                                                       finetune_dir / MANIFEST, columns)
        if cfg.eval.note is not None:
            notes.append(str(cfg.eval.note))
        if not records:
            raise stage.no_work(f"no fine-tuned model of {', '.join(task.name for task in tasks)} to score")
        summary = summarize(records)
        tables = by_table(columns)
        kept = {title: found for title, table in tables.items()
                if (found := retention(summary, [task.name for task in table])) is not None}
        results = {"data": data, "notes": notes, "models": summary, "retention": kept,
                   "published": {title: {"source": table[0].published.source, "rows": table[0].published.rows}
                                 for title, table in tables.items()}}
        write_json_atomic(stage.path / artifacts.RESULTS_JSON, results)
        (stage.path / artifacts.RESULTS_MD).write_text(render_markdown(summary, kept, columns, data, notes,
                                                                         soft_targets))
        stage.update(scores={model: row["score"] for model, row in summary.items()}, retention=kept)
        log.info("downstream scores: %s%s", ", ".join(f"{m} {r['score']:.1f}" for m, r in summary.items()),
                 "".join(f"; retention {row['percent']:.1f}% ({title})" for title, row in kept.items()))
    return results
