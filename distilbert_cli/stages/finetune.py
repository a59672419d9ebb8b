"""`distil finetune`: fine-tune the student (and/or the teacher, or any model) on downstream tasks, several seeds.

    distil finetune task=small task.data_dir=path/to/glue_data run_dir=runs/exp1
    distil finetune 'finetune.models=[student,teacher]' 'finetune.seeds=[1,2,3,4,5]' run_dir=runs/exp1
    distil finetune task=squad 'finetune.models=[teacher,student]' finetune.soft_targets.teacher=teacher run_dir=runs/sq
    distil finetune task=text_classification task.data.train=train.csv task.data.validation=dev.csv run_dir=runs/exp1
    accelerate launch -m distilbert_cli finetune finetune.mixed_precision=fp16 run_dir=runs/exp1

Tasks: GLUE, IMDb, SQuAD v1.1 / v2.0 and your own data (distilbert_cli.tasks). Writes
`<run_dir>/finetune/<model>/<task>/seed-<s>/` with `model/` (weights, tokenizer, the task's classes),
`predictions.jsonl` (every dev example: split, index, [id,] label, prediction), `metrics.json` and, for SQuAD,
`predictions-dev.json` in the official format. Rows the data loader had to skip are counted in the log and the
manifest (`data_problems`).
`student` is `<run_dir>/distill/final`, `teacher` the run's teacher (from init-student); any other entry
is a local directory or a hub name. There is one finetune stage per run directory, so list every model
to compare in one run. The optional "(D)" variant adds a fine-tuned teacher's soft targets to the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.models.run_models import ModelChoice, resolve_models
from distilbert_cli.rundir import Run
from distilbert_cli.tasks import get_task, get_tasks
from distilbert_cli.tasks.base import Task
from distilbert_cli.tasks.finetuning import check_task_model, finetune_one, first_rows

log = logging.getLogger(__name__)

def epochs_for(cfg: DictConfig, task: Task) -> int:
    long_tasks = {get_task(name).name for name in cfg.finetune.long_tasks}
    return cfg.finetune.long_task_epochs if task.name in long_tasks else cfg.finetune.epochs


def soft_teacher_path(cfg: DictConfig, task: Task, seed: int) -> str:
    template = str(cfg.finetune.soft_targets.teacher)
    try:
        return template.format(task=task.name, seed=seed)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"finetune.soft_targets.teacher={template!r}: only {{task}} and {{seed}} may be "
                         f"filled in ({type(exc).__name__}: {exc})") from exc


def soft_teacher_for(cfg: DictConfig, task: Task, choice: ModelChoice, seed: int, tuned_teachers: dict):
    """Where the (D) soft targets come from for this run: None (plain fine-tuning), a model or a path."""
    teacher = cfg.finetune.soft_targets.teacher
    if teacher is None or choice.role == "teacher":
        return None
    if teacher == "teacher":
        return tuned_teachers[seed]
    return soft_teacher_path(cfg, task, seed)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Fine-tune every model on every task for every seed; return {model: {task: {seed: task score}}}."""
    from accelerate import Accelerator

    tasks = get_tasks(cfg.task.names)
    for name in cfg.finetune.long_tasks:
        get_task(name)  # a known task
    for task in tasks:
        task.check_files(cfg.task, ("train", *task.eval_splits(cfg.task)))
    run_dir = Run.of(cfg)
    choices = resolve_models(run_dir, cfg.finetune.models, "finetune.models")
    trust = cfg.trust_remote_code
    for choice in choices:
        for task in tasks:
            check_task_model(choice.source, task, f"model {choice.name}", trust)
    if cfg.finetune.soft_targets.teacher not in (None, "teacher"):
        for task in tasks:
            for seed in cfg.finetune.seeds:
                check_task_model(soft_teacher_path(cfg, task, seed), task, "soft-target teacher", trust)
    # The fine-tuned teacher must exist before the students that learn from it.
    if cfg.finetune.soft_targets.teacher == "teacher":
        choices.sort(key=lambda choice: choice.role != "teacher")
    accelerator = Accelerator(mixed_precision=cfg.finetune.mixed_precision)
    if cfg.finetune.batch_size % accelerator.num_processes:
        raise UsageError(f"finetune.batch_size={cfg.finetune.batch_size} is not divisible by the "
                         f"{accelerator.num_processes} processes")

    with run_dir.open_stage(artifacts.FINETUNE, cfg, overrides,
                            unfingerprinted=artifacts.UNFINGERPRINTED[artifacts.FINETUNE]) as stage:
        for choice in choices:
            if choice.stage is not None:
                stage.use_stage(choice.stage)
            stage.use_model(choice.source, f"model {choice.name}")
        log.info("fine-tuning %s on %s, seeds %s, batch %d (%d per process x %d)",
                 [c.name for c in choices], [t.name for t in tasks], list(cfg.finetune.seeds),
                 cfg.finetune.batch_size, cfg.finetune.batch_size // accelerator.num_processes,
                 accelerator.num_processes)
        scores: dict = {choice.name: {} for choice in choices}
        problems: dict = {}
        for task in tasks:
            data = first_rows(task.load(cfg.task, ("train", *task.eval_splits(cfg.task))),
                              cfg.finetune.max_train_samples, cfg.finetune.max_eval_samples)
            if data.skipped:
                problems[task.name] = data.skipped
                stage.update(data_problems=problems)
            tuned_teachers: dict[int, object] = {}  # seed -> fine-tuned teacher, for soft_targets.teacher=teacher
            for choice in choices:
                scores[choice.name][task.name] = {}
                for seed in cfg.finetune.seeds:
                    out = artifacts.FinetuneRun.of(stage.path, choice.name, task.name, seed)
                    model, metrics = finetune_one(cfg.finetune, cfg.task, task, data, choice.name, choice.source,
                                                  seed, epochs_for(cfg, task), accelerator, out,
                                                  soft_teacher_for(cfg, task, choice, seed, tuned_teachers), trust)
                    if choice.role == "teacher" and cfg.finetune.soft_targets.teacher == "teacher":
                        tuned_teachers[seed] = model
                    scores[choice.name][task.name][seed] = task.score(metrics)
        stage.update(models={c.name: c.source for c in choices}, scores=scores, data_problems=problems)
    return scores
