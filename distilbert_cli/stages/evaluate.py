"""`distil evaluate` (alias `eval-glue`): score fine-tuned models on their tasks' dev splits and write the
paper's tables (Table 1 for GLUE) beside the published rows.

    distil evaluate run_dir=runs/exp1                          # everything under <run_dir>/finetune/
    distil evaluate task=rte task.data_dir=path/to/glue_data 'eval.model_dirs=[path/to/fine-tuned-rte]'

Scores come from the dev predictions that finetune saved (or, with `eval.model_dirs`, from running
already fine-tuned models on dev), with each task's metric; the median over seeds, as in the paper.
Writes `<run_dir>/evaluate/results.json` and `results.md`: our rows, the paper's rows (published), and the
student/teacher retention (the paper's "97%").
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import open_stage, read_manifest, require_complete, write_json_atomic
from distilbert_cli.tasks import get_task, get_tasks
from distilbert_cli.tasks.base import Task
from distilbert_cli.tasks.finetuning import evaluate, first_rows, forward_inputs
from distilbert_cli.tasks.results import collect_finetuned, render_markdown, retention, summarize

log = logging.getLogger(__name__)


def describe_data(tasks: Sequence[Task], data_dir: str | None) -> str:
    return "; ".join(dict.fromkeys(task.describe_data(data_dir) for task in tasks))


def resolve_model_dirs(cfg: DictConfig, tasks: Sequence[Task]) -> list[tuple[str, Task]]:
    """Each `eval.model_dirs` entry with the task it was fine-tuned on, checked before any work."""
    resolved = []
    for entry in map(str, cfg.eval.model_dirs):
        config = load_config(entry, trust_remote_code=cfg.trust_remote_code, role="fine-tuned model")
        if not any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
            raise UsageError(f"{entry} is not a fine-tuned sequence-classification checkpoint "
                             f"(architectures {config.architectures})")
        # finetune records the task in config.json; a foreign checkpoint needs task.names to name one task.
        task_name = getattr(config, "finetuning_task", None)
        if task_name is None and len(tasks) != 1:
            raise UsageError(f"cannot tell which task {entry} was fine-tuned on: set task.names=[<that task>]")
        task = get_task(task_name) if task_name is not None else tasks[0]
        if task.name not in [t.name for t in tasks]:
            raise UsageError(f"{entry} was fine-tuned on {task.name}, which is not in task.names")
        if config.num_labels != task.head_config()["num_labels"]:
            raise UsageError(f"{entry} has {config.num_labels} labels; {task.title} has "
                             f"{task.head_config()['num_labels']}")
        resolved.append((entry, task))
    return resolved


def evaluate_model_dirs(cfg: DictConfig, model_dirs: list[tuple[str, Task]], out_dir: Path) -> list[dict]:
    """Run each fine-tuned model on its task's dev splits; predictions go to out_dir/model-<i>/."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    accelerator = Accelerator()
    records = []
    for index, (entry, task) in enumerate(model_dirs):
        tokenizer = load_tokenizer(entry, trust_remote_code=cfg.trust_remote_code, role="fine-tuned model")
        model = load_model(AutoModelForSequenceClassification, entry, trust_remote_code=cfg.trust_remote_code,
                           role="fine-tuned model")
        with_types = "token_type_ids" in forward_inputs(model)
        dev = {split: task.encode(first_rows(task.load_split(split, cfg.task.data_dir), cfg.eval.max_samples),
                                  tokenizer, cfg.eval.max_seq_length, with_types) for split in task.dev_splits}
        run_dir = out_dir / f"model-{index}"
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = evaluate(task, accelerator.prepare_model(model, evaluation_mode=True), tokenizer, dev,
                           cfg.eval.batch_size, accelerator, run_dir / "predictions.jsonl")
        records.append({"model": entry, "task": task.name, "seed": None, "metrics": metrics})
    return records


def finetune_notes(finetune_dir: Path, tasks: Sequence[Task]) -> tuple[str, list[str]]:
    """The data source and any shortcut (capped rows) of the finetune stage, for an honest table."""
    config = read_manifest(finetune_dir)["config"]
    notes = [f"finetune.{key}={config['finetune'][key]} (not the full split)"
             for key in ("max_train_samples", "max_eval_samples") if config["finetune"][key] is not None]
    return describe_data(tasks, config["task"]["data_dir"]), notes


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Score, tabulate and write results.{json,md}; return the results.json payload."""
    tasks = get_tasks(cfg.task.names)
    model_dirs = resolve_model_dirs(cfg, tasks)
    for _, task in model_dirs:
        task.check_files(cfg.task.data_dir, task.dev_splits)
    if not model_dirs:
        require_complete(cfg.run_dir, artifacts.FINETUNE)

    with open_stage(cfg, artifacts.EVALUATE, overrides) as stage:
        if model_dirs:
            for entry, _ in model_dirs:
                stage.use_model(entry, "fine-tuned model")
            records = evaluate_model_dirs(cfg, model_dirs, stage.path)
            data, notes = describe_data(tasks, cfg.task.data_dir), []
        else:
            finetune_dir = stage.use_stage(cfg.run_dir, artifacts.FINETUNE, reads=artifacts.FINETUNE_PREDICTIONS)
            records = collect_finetuned(finetune_dir, tasks)
            data, notes = finetune_notes(finetune_dir, tasks)
        if cfg.eval.note is not None:
            notes.append(str(cfg.eval.note))
        summary = summarize(records)
        kept = retention(summary)
        evaluated = {record["task"] for record in records}
        columns = sorted((task for task in tasks if task.name in evaluated), key=lambda task: task.title)
        results = {"data": data, "notes": notes, "models": summary, "retention": kept,
                   "published": {task.family: {"source": task.published.source, "rows": task.published.rows}
                                 for task in columns}}
        write_json_atomic(stage.path / artifacts.RESULTS_JSON, results)
        (stage.path / artifacts.RESULTS_MD).write_text(render_markdown(summary, kept, columns, data, notes))
        stage.update(scores={model: row["score"] for model, row in summary.items()}, retention=kept)
        log.info("downstream scores: %s%s", ", ".join(f"{m} {r['score']:.1f}" for m, r in summary.items()),
                 f"; retention {kept['percent']:.1f}%" if kept else "")
    return results
