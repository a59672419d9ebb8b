"""`distil task-distill`: task-specific distillation (Tang et al. 2019; TinyBERT's task stage): a student learns a
fine-tuned teacher's outputs on the task's training examples and augmented copies of them.

    distil task-distill task=sst2 task.data_dir=path/to/glue_data run_dir=runs/exp1        # after distil finetune
    distil task-distill augment=tang task_distill.learning_rate=1e-3 run_dir=runs/lstm     # a BiLSTM run
    distil task-distill +experiment=tinybert_task run_dir=runs/tinybert                    # TinyBERT's two steps
    distil task-distill task_distill.eval_every=100 task_distill.early_stopping=5 run_dir=runs/exp1  # to convergence
    accelerate launch -m distilbert_cli task-distill task_distill.mixed_precision=bf16 run_dir=runs/exp1

Reads the teacher (`task_distill.teacher`: the run's `finetune/teacher/<task>/seed-<seed>/model`, or any directory
fine-tuned on the task), the student (`task_distill.student`: the run's distill/final, or init-student's model for a
BiLSTM, or any model sharing the teacher's vocabulary), the task's training and dev splits and, for
augment=tinybert, a masked LM (the run's teacher). Builds the transfer set once: the examples, their augmented
copies (deterministic given `seed`), tokenized, with the teacher's outputs computed in one pass (`transfer/`, Arrow;
its settings, counts, time and size in `transfer.json`; another run's can be reused with task_distill.transfer_set).
Then trains the student on it for each of `task_distill.seeds` and scores it on dev, into
`student/<task>/seed-<s>/` in finetune's layout (model/, predictions.jsonl, metrics.json, and the loss terms over
the steps in metrics.jsonl): the evaluation stage (`eval.model_dirs`), bench-cpu and the report read it like a
fine-tuned model. With task_distill.eval_every, a validation split is held out of the training examples before
augmentation (so no copy of it is trained on) and the student's best weights there are kept.
Both training steps run through the engine (training/engine.py), on several processes too (the teacher's outputs
are computed by every process, a share each); `task_distill.resume=auto` keeps the transfer set and the finished
students of an interrupted stage and resumes the others exactly.

Classification, text-pair classification and regression tasks (GLUE, IMDb, your own data). Question answering is
left out: word replacement moves and breaks the answer spans its labels point at, and a span teacher's outputs are
per window, not per example.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ValidationError

from distilbert_cli import artifacts
from distilbert_cli.downstream.prediction import VALIDATION, first_rows, hold_out
from distilbert_cli.downstream.task_distillation import build_transfer_set, check_loss, distill_one
from distilbert_cli.downstream.task_models import check_task_model, load_finetuned
from distilbert_cli.downstream.task_training import accumulation_steps, completed_run
from distilbert_cli.errors import UsageError, invalid_entry, unreadable
from distilbert_cli.logs import distributed_state
from distilbert_cli.models.families import find_family
from distilbert_cli.models.loading import load_masked_lm, load_tokenizer
from distilbert_cli.models.run_models import resolve_models
from distilbert_cli.rundir import Run, fingerprint
from distilbert_cli.schema import TaskDistill
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import SequenceClassificationTask
from distilbert_cli.training.engine import check_mixed_precision, check_resume
from distilbert_cli.training.task_losses import TaskLossPlan

log = logging.getLogger(__name__)


def source_fingerprint(name_or_path: str) -> str:
    """A local model's content fingerprint, or the hub name it is loaded by."""
    path = Path(name_or_path).expanduser()
    return fingerprint(path) if path.exists() else name_or_path


def teacher_source(cfg: TaskDistill, run_dir: Run, task) -> tuple[str, bool]:
    """The teacher's directory, and whether it is the run's own (finetune/teacher/<task>/seed-<seed>/model)."""
    if cfg.task_distill.teacher != "teacher":
        return str(cfg.task_distill.teacher), False
    finetune_dir = run_dir.require(artifacts.FINETUNE)
    run = artifacts.FinetuneRun.of(finetune_dir, "teacher", task.name, cfg.seed)
    if not run.model.is_dir():
        raise UsageError(f"task_distill.teacher=teacher: the run's finetune stage has no fine-tuned teacher at "
                         f"{run.model} (fine-tune it with finetune.models=[teacher,...] and seed {cfg.seed}, or set "
                         "task_distill.teacher to a directory)")
    return str(run.model), True


def transfer_settings(cfg: TaskDistill, task, teacher: str | None, masked_lm: str | None) -> dict:
    """What the transfer set depends on: a reused one must have been built from the same."""
    td = cfg.task_distill
    data = [source_fingerprint(str(path)) for path in task.local_files(cfg.task, ("train",)).values()]
    return {"task": task.name, "data": data or task.describe_data(cfg.task),
            "max_train_samples": td.max_train_samples,
            "held_out": td.validation_split if td.eval_every is not None else None,
            "encoding": cfg.task.model_dump(include={"max_seq_length", "truncation", "head_tokens"}),
            "augment": cfg.augment.model_dump(), "seed": cfg.seed,
            "teacher": source_fingerprint(teacher) if teacher is not None else None,
            "masked_lm": source_fingerprint(masked_lm) if masked_lm is not None else None}


class _TransferRecord(BaseModel):
    """What transfer.json must hold: the settings the set was built with, and what building it did."""

    settings: dict
    stats: dict


def reused_transfer(path: Path, settings: dict) -> dict:
    """Check that another run's transfer set was built as this run would build it; return its record."""
    info_path = artifacts.TaskDistillOutputs(path.parent).transfer_info
    if not path.is_dir() or not info_path.is_file():
        raise UsageError(f"task_distill.transfer_set={path}: not a task-distill transfer set (it needs {info_path})")
    info = artifacts.read_json(info_path)
    try:
        _TransferRecord.model_validate(info)
    except ValidationError as exc:
        raise unreadable(info_path, invalid_entry(exc)) from None
    if differ := [key for key in settings if info["settings"].get(key) != settings[key]]:
        found = "; ".join(f"{key}: {info['settings'].get(key)} vs {settings[key]}" for key in differ)
        raise UsageError(f"task_distill.transfer_set={path} was built with other {', '.join(differ)} than this run "
                         f"would use ({found})")
    return info


def run(cfg: TaskDistill, overrides: Sequence[str] = ()) -> dict:
    """Build (or reuse) the transfer set and distill the student for every seed; return {seed: task score}."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from datasets import load_from_disk

    td = cfg.task_distill
    run_dir = Run.of(cfg)
    trust = run_dir.trust_remote_code
    task = get_task(cfg.task.names[0])
    if not isinstance(task, SequenceClassificationTask):
        raise UsageError(f"task-distill distills classification and regression tasks; {task.title} is question "
                         "answering (left out: word replacement breaks the answer spans)")
    task.check_files(cfg.task, ("train", *task.eval_splits(cfg.task)))
    plan = TaskLossPlan.from_config(td.loss, task.is_regression)
    check_loss(plan, task)
    check_mixed_precision(td.mixed_precision, "task_distill.mixed_precision")
    check_resume(td.resume, "task_distill.resume")
    (student,) = resolve_models(run_dir, [td.student], "task_distill.student")
    student_config = check_task_model(student.source, task, "student", trust)
    if td.intermediate.epochs > 0 and find_family(student_config) is None:
        raise UsageError(f"task_distill.intermediate matches transformer layers; the student is a "
                         f"{student_config.model_type!r} model (set task_distill.intermediate.epochs=0)")
    needs_teacher = plan.uses_teacher or td.intermediate.epochs > 0
    teacher, own_teacher = teacher_source(cfg, run_dir, task) if needs_teacher else (None, False)
    if teacher is not None:
        check_task_model(teacher, task, "teacher", trust)
    masked_lm = None
    if cfg.augment.method == "tinybert":
        masked_lm = (artifacts.recorded_teacher(run_dir) if cfg.augment.masked_lm == "teacher"
                     else str(cfg.augment.masked_lm))
    tokenizer = load_tokenizer(teacher or student.source, trust, role="teacher tokenizer")
    if teacher is not None and load_tokenizer(student.source, trust).get_vocab() != tokenizer.get_vocab():
        raise UsageError(f"the student {student.source} does not share the teacher's vocabulary: task-distill gives "
                         "both the same token ids (a student built from this teacher does)")
    settings = transfer_settings(cfg, task, teacher if plan.uses_teacher else None, masked_lm)
    reused = reused_transfer(Path(td.transfer_set), settings) if td.transfer_set is not None else None
    accumulation = accumulation_steps(td, "task_distill", distributed_state().num_processes)
    # The intermediate step trains no task head (DDP must not wait for its gradients).
    accelerator = Accelerator(mixed_precision=td.mixed_precision, gradient_accumulation_steps=accumulation,
                              step_scheduler_with_optimizer=False, kwargs_handlers=[
                                  DistributedDataParallelKwargs(find_unused_parameters=td.intermediate.epochs > 0)])

    with run_dir.open_stage(artifacts.TASK_DISTILL, cfg, overrides, keep_partial=td.resume != "never",
                            unfingerprinted=artifacts.UNFINGERPRINTED[artifacts.TASK_DISTILL]) as stage:
        out = artifacts.TaskDistillOutputs(stage.path)
        if own_teacher:
            stage.use_stage(artifacts.FINETUNE, reads=f"teacher/{task.name}/*")
        if student.stage is not None:
            stage.use_stage(student.stage)
        stage.use_model(student.source, "student")
        if teacher is not None:
            stage.use_model(teacher, "teacher")
        data = first_rows(task.load(cfg.task, ("train", *task.eval_splits(cfg.task))), td.max_train_samples,
                          td.max_eval_samples)
        if data.skipped:
            stage.update(data_problems={task.name: data.skipped})
        if td.eval_every is not None:  # held out before augmentation: no copy of a held-out example is trained on
            data = hold_out(data, td.validation_split, cfg.seed, "task_distill.validation_split")
        teacher_model = load_finetuned(teacher, task, trust, "teacher").eval() if teacher is not None else None
        if teacher_model is not None and task.model_label_names(teacher_model.config) != data.label_names:
            raise UsageError(f"the teacher {teacher} was fine-tuned on other classes: "
                             f"{task.model_label_names(teacher_model.config)} vs {data.label_names}")
        if reused is not None:
            transfer_dir, info = stage.use_path(td.transfer_set, "transfer set"), reused
            log.info("reusing the transfer set %s (%d rows)", transfer_dir, info["stats"]["rows"])
        elif td.resume != "never" and out.transfer_info.is_file():  # built by an earlier attempt of this stage
            transfer_dir, info = out.transfer, reused_transfer(out.transfer, settings)
            log.info("keeping the transfer set an earlier attempt built (%d rows)", info["stats"]["rows"])
        else:
            language_model, mlm_tokenizer = None, tokenizer  # tang splits words with the transfer set's tokenizer
            if masked_lm is not None:
                stage.use_model(masked_lm, "augmentation masked LM")
                language_model, has_head = load_masked_lm(masked_lm, trust, role="augmentation masked LM")
                if not has_head:
                    raise UsageError(f"augment.masked_lm {masked_lm!r} has no MLM head, so its predictions would be "
                                     "random: name a masked LM (augment.masked_lm=...)")
                mlm_tokenizer = load_tokenizer(masked_lm, trust, role="augmentation masked LM")
            info = build_transfer_set(task, data.splits["train"], cfg.task, cfg.augment, cfg.seed,
                                      teacher_model if plan.uses_teacher else None, tokenizer, language_model,
                                      mlm_tokenizer, td.teacher_batch_size, accelerator, out, settings)
            transfer_dir = out.transfer
        stage.expect(out.transfer_info if reused is None else transfer_dir)
        stage.update(transfer=info, held_out=len(data.splits[VALIDATION]) if VALIDATION in data.splits else 0)
        transfer = load_from_disk(str(transfer_dir))
        scores = {}
        for seed in td.seeds:
            run_out = out.run(task.name, seed)
            stage.expect(run_out.metrics, run_out.predictions, run_out.model)
            summary = completed_run(run_out) if td.resume != "never" else None
            if summary is None:
                summary = distill_one(td, cfg.task, cfg.logger, task, data, transfer, student.source, seed, plan,
                                      teacher_model, accelerator, run_out, trust)
            else:
                log.info("student seed %d: finished in an earlier attempt, kept", seed)
            scores[seed] = summary["score"]
        stage.update(student=student.source, teacher=teacher, scores=scores)
        log.info("task-distilled student on %s: %s", task.name, json.dumps(scores))
    return scores
