"""`distil finetune`: fine-tune the student (and/or the teacher, or any model) on downstream tasks, several seeds.

    distil finetune task=small task.data_dir=path/to/glue_data run_dir=runs/exp1
    distil finetune 'finetune.models=[student,teacher]' 'finetune.seeds=[1,2,3,4,5]' run_dir=runs/exp1
    distil finetune task=squad 'finetune.models=[teacher,student]' finetune.soft_targets.teacher=teacher run_dir=runs/sq
    distil finetune task=text_classification task.data.train=train.csv task.data.validation=dev.csv run_dir=runs/exp1
    distil finetune finetune.eval_every=50 finetune.early_stopping=3 run_dir=runs/exp1   # the best on held-out rows
    accelerate launch -m distilbert_cli finetune finetune.mixed_precision=fp16 run_dir=runs/exp1

Tasks: GLUE, IMDb, SQuAD v1.1 / v2.0 and your own data (distilbert_cli.tasks). Writes
`<run_dir>/finetune/<model>/<task>/seed-<s>/` with `model/` (weights, tokenizer, the task's classes),
`predictions.jsonl` (every dev example: split, index, [id,] label, prediction), `metrics.json` (the scores, the
budget and the one model selection chose, the times), `metrics.jsonl` (the loss over the steps, and each
evaluation on the held-out split) and, for SQuAD, `predictions-dev.json` in the official format. Rows the data loader
had to skip are counted in the log and the manifest (`data_problems`).
`student` is `<run_dir>/distill/final`, `teacher` the run's teacher (from init-student); any other entry
is a local directory or a hub name. There is one finetune stage per run directory, so list every model
to compare in one run. The optional "(D)" variant adds a fine-tuned teacher's soft targets to the loss.
Every run trains through the engine (training/engine.py): on several processes, with the non-finite guard, the
tracker, and checkpoints in each run's `checkpoints/` (removed once the run is finished); `finetune.resume=auto`
keeps the finished runs of an interrupted stage and resumes the others exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from distilbert_cli import artifacts
from distilbert_cli.downstream.finetuning import finetune_one
from distilbert_cli.downstream.prediction import first_rows, hold_out
from distilbert_cli.downstream.task_models import check_task_model
from distilbert_cli.downstream.task_training import accumulation_steps, completed_run
from distilbert_cli.errors import UsageError
from distilbert_cli.logs import distributed_state
from distilbert_cli.models.run_models import ModelChoice, resolve_models
from distilbert_cli.rundir import Run
from distilbert_cli.schema import Finetune
from distilbert_cli.tasks import get_task, get_tasks
from distilbert_cli.tasks.base import Task
from distilbert_cli.training.engine import check_mixed_precision, check_resume

log = logging.getLogger(__name__)


def epochs_for(cfg: Finetune, task: Task) -> int:
    long_tasks = {get_task(name).name for name in cfg.finetune.long_tasks}
    return cfg.finetune.long_task_epochs if task.name in long_tasks else cfg.finetune.epochs


def soft_teacher_path(cfg: Finetune, task: Task, seed: int) -> str:
    template = str(cfg.finetune.soft_targets.teacher)
    try:
        return template.format(task=task.name, seed=seed)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"finetune.soft_targets.teacher={template!r}: only {{task}} and {{seed}} may be "
                         f"filled in ({type(exc).__name__}: {exc})") from exc


def soft_teacher_for(cfg: Finetune, task: Task, choice: ModelChoice, seed: int, tuned_teachers: dict):
    """Where the (D) soft targets come from for this run: None (plain fine-tuning), a model or a path."""
    teacher = cfg.finetune.soft_targets.teacher
    if teacher is None or choice.role == "teacher":
        return None
    if teacher == "teacher":
        return tuned_teachers[seed]
    return soft_teacher_path(cfg, task, seed)


def run(cfg: Finetune, overrides: Sequence[str] = ()) -> dict:
    """Fine-tune every model on every task for every seed; return {model: {task: {seed: task score}}}."""
    from accelerate import Accelerator

    ft = cfg.finetune
    tasks = get_tasks(cfg.task.names)
    for name in ft.long_tasks:
        get_task(name)  # a known task
    for task in tasks:
        task.check_files(cfg.task, ("train", *task.eval_splits(cfg.task)))
    run_dir = Run.of(cfg)
    trust = run_dir.trust_remote_code
    choices = resolve_models(run_dir, ft.models, "finetune.models")
    for choice in choices:
        for task in tasks:
            check_task_model(choice.source, task, f"model {choice.name}", trust)
    if ft.soft_targets.teacher not in (None, "teacher"):
        for task in tasks:
            for seed in ft.seeds:
                check_task_model(soft_teacher_path(cfg, task, seed), task, "soft-target teacher", trust)
    # The fine-tuned teacher must exist before the students that learn from it.
    if ft.soft_targets.teacher == "teacher":
        choices.sort(key=lambda choice: choice.role != "teacher")
    check_mixed_precision(ft.mixed_precision, "finetune.mixed_precision")
    check_resume(ft.resume, "finetune.resume")
    processes = distributed_state().num_processes
    accumulation = accumulation_steps(ft, "finetune", processes)
    accelerator = Accelerator(mixed_precision=ft.mixed_precision, gradient_accumulation_steps=accumulation,
                              step_scheduler_with_optimizer=False)

    with run_dir.open_stage(artifacts.FINETUNE, cfg, overrides, keep_partial=ft.resume != "never",
                            unfingerprinted=artifacts.UNFINGERPRINTED[artifacts.FINETUNE]) as stage:
        for choice in choices:
            if choice.stage is not None:
                stage.use_stage(choice.stage)
            stage.use_model(choice.source, f"model {choice.name}")
        if ft.soft_targets.teacher not in (None, "teacher"):
            for path in {soft_teacher_path(cfg, task, seed) for task in tasks for seed in ft.seeds}:
                stage.use_model(path, "soft-target teacher")
        log.info("fine-tuning %s on %s, seeds %s, batch %d (micro %d x accumulation %d x %d process(es))%s",
                 [c.name for c in choices], [t.name for t in tasks], list(ft.seeds), ft.batch_size,
                 ft.batch_size // accumulation // processes, accumulation, processes,
                 f"; the best of every {ft.eval_every} steps on {ft.validation_split:.0%} of the training examples"
                 if ft.eval_every else "")
        scores: dict = {choice.name: {} for choice in choices}
        problems: dict = {}
        for task in tasks:
            data = first_rows(task.load(cfg.task, ("train", *task.eval_splits(cfg.task))), ft.max_train_samples,
                              ft.max_eval_samples)
            if data.skipped:
                problems[task.name] = data.skipped
                stage.update(data_problems=problems)
            if ft.eval_every is not None:  # the same held-out examples for every model and seed (the run's seed)
                data = hold_out(data, ft.validation_split, cfg.seed, "finetune.validation_split")
            tuned_teachers: dict[int, object] = {}  # seed -> fine-tuned teacher, for soft_targets.teacher=teacher
            for choice in choices:
                scores[choice.name][task.name] = {}
                for seed in ft.seeds:
                    out = artifacts.FinetuneRun.of(stage.path, choice.name, task.name, seed)
                    stage.expect(out.metrics, out.predictions, *([out.model] if ft.save_models else []))
                    summary = completed_run(out) if ft.resume != "never" else None
                    if summary is not None:
                        log.info("%s %s seed %d: finished in an earlier attempt, kept", choice.name, task.name, seed)
                        model = str(out.model)  # a soft-target teacher is loaded from its folder
                    else:
                        model, summary = finetune_one(ft, cfg.task, cfg.logger, task, data, choice.name, choice.source,
                                                      seed, epochs_for(cfg, task), accelerator, out,
                                                      soft_teacher_for(cfg, task, choice, seed, tuned_teachers), trust)
                    if choice.role == "teacher" and ft.soft_targets.teacher == "teacher":
                        tuned_teachers[seed] = model
                    scores[choice.name][task.name][seed] = summary["score"]
        stage.update(models={c.name: c.source for c in choices}, scores=scores, data_problems=problems)
    return scores
