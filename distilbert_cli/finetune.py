"""`distil finetune`: fine-tune the student (and/or the teacher, or any model) on GLUE tasks, several seeds.

    distil finetune glue=small glue.data_dir=path/to/glue_data run_dir=runs/exp1
    distil finetune 'finetune.models=[student,teacher]' 'finetune.seeds=[1,2,3,4,5]' run_dir=runs/exp1
    accelerate launch -m distilbert_cli finetune finetune.mixed_precision=fp16 run_dir=runs/exp1

Writes `<run_dir>/finetune/<model>/<task>/seed-<s>/` with `model/` (weights and tokenizer),
`predictions.jsonl` (every dev row: split, index, label, prediction) and `metrics.json`.
`student` is `<run_dir>/distill/final`, `teacher` the run's teacher (from init-student); any other entry
is a local directory or a hub name. There is one finetune stage per run directory, so list every model
to compare in one run. The optional "(D)" variant adds a fine-tuned teacher's soft targets to the loss.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli import glue
from distilbert_cli.errors import UsageError
from distilbert_cli.losses import soft_target_loss
from distilbert_cli.models import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import ModelChoice, open_stage
from distilbert_cli.rundir import resolve_models as resolve_run_models

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


# ---- losses --------------------------------------------------------------------------------------

def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy on class ids, or mean squared error on the score for a regression task (STS-B)."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def fine_tuning_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                                  regression: bool) -> torch.Tensor:
    """The "(D)" soft-target term: the distill stage's KL(softmax(t/T) || softmax(s/T)) * T^2 on class logits.

    A regression head has no distribution to soften, so it matches the teacher's score (MSE) instead.
    """
    if regression:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return soft_target_loss(student_logits, teacher_logits, temperature)


# ---- inputs ---------------------------------------------------------------------------------------

def forward_inputs(model) -> set[str]:
    """Tensor inputs the model's forward() names (DistilBERT has no token_type_ids, BERT has)."""
    return {name for name in inspect.signature(model.forward).parameters
            if name not in ("self", "labels", "kwargs", "inputs_embeds")}


def tokenize(dataset, tokenizer, max_seq_length: int, with_token_type_ids: bool):
    """Truncated (not padded: the collator pads each batch to its longest row) inputs plus `labels`."""
    texts = [name for name in ("sentence1", "sentence2") if name in dataset.column_names]

    def encode(batch):
        encoded = tokenizer(*(batch[name] for name in texts), truncation=True, max_length=max_seq_length,
                            return_token_type_ids=with_token_type_ids)
        return {**encoded, "labels": batch["label"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")


def first_rows(dataset, limit: int | None):
    return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=DataCollatorWithPadding(tokenizer))


@torch.no_grad()
def predict(model, loader, accelerator, regression: bool) -> np.ndarray:
    """Class ids (or scores) for every row of `loader`, in order, gathered from every process."""
    model.eval()
    accepted = forward_inputs(accelerator.unwrap_model(model))
    outputs = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not accelerator.is_local_main_process):
        logits = model(**{k: v for k, v in batch.items() if k in accepted}).logits
        outputs.append(accelerator.gather_for_metrics(logits.squeeze(-1) if regression else logits.argmax(-1)))
    return torch.cat(outputs).float().cpu().numpy() if regression else torch.cat(outputs).cpu().numpy()


def evaluate(task: glue.GlueTask, model, tokenizer, dev_splits: dict, batch_size: int, accelerator,
             out_dir: Path) -> dict[str, float]:
    """Predict every tokenized dev split, write predictions.jsonl into `out_dir`, return the flat metrics."""
    metrics, lines = {}, []
    for split, dataset in dev_splits.items():
        loader = accelerator.prepare(make_loader(dataset, tokenizer, batch_size, shuffle=False, seed=0))
        predictions = predict(model, loader, accelerator, task.is_regression)
        labels = np.asarray(dataset["labels"])
        for name, value in glue.compute_metrics(task.name, predictions, labels).items():
            metrics[glue.metric_key(task, split, name)] = value
        lines += [json.dumps({"split": split, "index": i, "label": label.item(), "prediction": prediction.item()})
                  for i, (label, prediction) in enumerate(zip(labels, predictions, strict=True))]
    if accelerator.is_main_process:
        (out_dir / "predictions.jsonl").write_text("\n".join(lines) + "\n")
    return metrics


def read_predictions(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """predictions.jsonl back as {split: (predictions, labels)}."""
    by_split: dict[str, tuple[list, list]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        predictions, labels = by_split.setdefault(row["split"], ([], []))
        predictions.append(row["prediction"])
        labels.append(row["label"])
    return {split: (np.asarray(p), np.asarray(y)) for split, (p, y) in by_split.items()}


# ---- models ---------------------------------------------------------------------------------------

def check_sequence_classification(name_or_path: str, role: str, trust_remote_code: bool):
    """The checkpoint's config, if AutoModelForSequenceClassification can build that architecture."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = load_config(name_or_path, trust_remote_code=trust_remote_code, role=role)
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not trust_remote_code:
        raise UsageError(f"{role} {name_or_path!r} ({config.model_type}) has no sequence-classification "
                         f"architecture in transformers; pass a BERT-family checkpoint")
    return config


def resolve_models(cfg: DictConfig) -> list[ModelChoice]:
    """`finetune.models` entries as (folder name, source, role), checked to exist before any work."""
    return resolve_run_models(cfg.run_dir, cfg.finetune.models, "finetune.models")


def load_classifier(source: str, task: glue.GlueTask, trust_remote_code: bool, role: str):
    """A sequence-classification model with a fresh head sized for `task` (the encoder from `source`)."""
    from transformers import AutoModelForSequenceClassification

    labels = task.label_names or ("score",)
    model = load_model(AutoModelForSequenceClassification, source, trust_remote_code=trust_remote_code, role=role,
                       num_labels=task.num_labels, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)},
                       problem_type="regression" if task.is_regression else "single_label_classification")
    model.config.glue_task = task.name  # saved in config.json: eval-glue reads which task a model is for
    return model


def load_soft_teacher(path: str, task: glue.GlueTask, student_config, trust_remote_code: bool):
    """A fine-tuned classifier for `task` whose logits become the student's soft targets."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(AutoModelForSequenceClassification, path, trust_remote_code=trust_remote_code,
                       role="soft-target teacher")
    if model.config.num_labels != task.num_labels or model.config.vocab_size != student_config.vocab_size:
        raise UsageError(f"soft-target teacher {path!r} does not fit {task.title}: {model.config.num_labels} labels "
                         f"and vocab {model.config.vocab_size} vs {task.num_labels} and {student_config.vocab_size}")
    return model.eval()


# ---- validation -----------------------------------------------------------------------------------

def check_finetune_config(cfg: DictConfig) -> None:
    ft = cfg.finetune
    if not ft.seeds or len(set(ft.seeds)) != len(ft.seeds):
        raise UsageError(f"finetune.seeds must list distinct seeds, got {list(ft.seeds)}")
    for key in ("max_seq_length", "batch_size", "epochs", "long_task_epochs"):
        if ft[key] <= 0:
            raise UsageError(f"finetune.{key} must be positive, got {ft[key]}")
    for name in ft.long_tasks:
        glue.get_task(name)
    for key in ("max_train_samples", "max_eval_samples"):
        if ft[key] is not None and ft[key] <= 0:
            raise UsageError(f"finetune.{key} must be positive or null, got {ft[key]}")
    if ft.learning_rate <= 0 or not 0 <= ft.warmup_ratio < 1:
        raise UsageError("finetune.learning_rate must be > 0 and finetune.warmup_ratio in [0, 1)")
    if ft.mixed_precision not in MIXED_PRECISION:
        raise UsageError(f"finetune.mixed_precision must be one of {MIXED_PRECISION}, got {ft.mixed_precision!r}")
    soft = ft.soft_targets
    if soft.teacher is not None:
        if soft.temperature <= 0 or soft.alpha_ce < 0 or soft.alpha_task < 0:
            raise UsageError("finetune.soft_targets needs temperature > 0 and non-negative alpha_ce, alpha_task")
        if soft.teacher == "teacher" and "teacher" not in ft.models:
            raise UsageError("finetune.soft_targets.teacher=teacher needs teacher in finetune.models")


def epochs_for(cfg: DictConfig, task: glue.GlueTask) -> int:
    long_tasks = {glue.get_task(name).name for name in cfg.finetune.long_tasks}
    return cfg.finetune.long_task_epochs if task.name in long_tasks else cfg.finetune.epochs


# ---- the stage ------------------------------------------------------------------------------------

def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Fine-tune every model on every task for every seed; return {model: {task: {seed: task score}}}."""
    from accelerate import Accelerator

    tasks = glue.get_tasks(cfg.glue.tasks)
    check_finetune_config(cfg)
    if cfg.glue.data_dir is not None:
        glue.check_local_files(tasks, cfg.glue.data_dir)
    choices = resolve_models(cfg)
    trust = bool(cfg.finetune.trust_remote_code)
    for choice in choices:
        check_sequence_classification(choice.source, f"model {choice.name}", trust)
    if cfg.finetune.soft_targets.teacher not in (None, "teacher"):
        for task in tasks:
            for seed in cfg.finetune.seeds:
                check_sequence_classification(soft_teacher_path(cfg, task, seed), "soft-target teacher", trust)
    # The fine-tuned teacher must exist before the students that learn from it.
    if cfg.finetune.soft_targets.teacher == "teacher":
        choices.sort(key=lambda choice: choice.role != "teacher")
    accelerator = Accelerator(mixed_precision=cfg.finetune.mixed_precision)
    if cfg.finetune.batch_size % accelerator.num_processes:
        raise UsageError(f"finetune.batch_size={cfg.finetune.batch_size} is not divisible by the "
                         f"{accelerator.num_processes} processes")

    with open_stage(cfg, "finetune", overrides) as stage:
        for choice in choices:
            if choice.role == "student":
                stage.use_stage(cfg.run_dir, "distill")
            elif choice.role == "teacher":
                stage.use_stage(cfg.run_dir, "init-student")
            stage.use_model(choice.source, f"model {choice.name}")
        log.info("fine-tuning %s on %s, seeds %s, batch %d (%d per process x %d)",
                 [c.name for c in choices], [t.name for t in tasks], list(cfg.finetune.seeds),
                 cfg.finetune.batch_size, cfg.finetune.batch_size // accelerator.num_processes,
                 accelerator.num_processes)
        scores: dict = {choice.name: {} for choice in choices}
        for task in tasks:
            raw_train = first_rows(glue.load_split(task.name, "train", cfg.glue.data_dir),
                                   cfg.finetune.max_train_samples)
            raw_dev = {split: first_rows(glue.load_split(task.name, split, cfg.glue.data_dir),
                                         cfg.finetune.max_eval_samples) for split in task.dev_splits}
            tuned_teachers: dict[int, object] = {}  # seed -> fine-tuned teacher, for soft_targets.teacher=teacher
            for choice in choices:
                scores[choice.name][task.name] = {}
                for seed in cfg.finetune.seeds:
                    out_dir = stage.path / choice.name / task.name / f"seed-{seed}"
                    model, metrics = finetune_one(cfg, task, choice, seed, raw_train, raw_dev, accelerator,
                                                  out_dir, soft_teacher_for(cfg, task, choice, seed, tuned_teachers))
                    if choice.role == "teacher" and cfg.finetune.soft_targets.teacher == "teacher":
                        tuned_teachers[seed] = model
                    scores[choice.name][task.name][seed] = glue.task_score(task.name, metrics)
        stage.update(models={c.name: c.source for c in choices}, scores=scores)
    return scores


def soft_teacher_for(cfg: DictConfig, task: glue.GlueTask, choice: ModelChoice, seed: int, tuned_teachers: dict):
    """Where the (D) soft targets come from for this run: None (plain fine-tuning), a model or a path."""
    teacher = cfg.finetune.soft_targets.teacher
    if teacher is None or choice.role == "teacher":
        return None
    if teacher == "teacher":
        return tuned_teachers[seed]
    return soft_teacher_path(cfg, task, seed)


def soft_teacher_path(cfg: DictConfig, task: glue.GlueTask, seed: int) -> str:
    template = str(cfg.finetune.soft_targets.teacher)
    try:
        return template.format(task=task.name, seed=seed)
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"finetune.soft_targets.teacher={template!r}: only {{task}} and {{seed}} may be "
                         f"filled in ({type(exc).__name__}: {exc})") from exc


def finetune_one(cfg: DictConfig, task: glue.GlueTask, choice: ModelChoice, seed: int, raw_train, raw_dev: dict,
                 accelerator, out_dir: Path, soft_teacher) -> tuple[object, dict[str, float]]:
    """Fine-tune one model on one task with one seed; write model/, predictions.jsonl and metrics.json."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    ft, soft = cfg.finetune, cfg.finetune.soft_targets
    set_seed(seed)
    trust = bool(ft.trust_remote_code)
    tokenizer = load_tokenizer(choice.source, trust_remote_code=trust, role=f"model {choice.name}")
    model = load_classifier(choice.source, task, trust, f"model {choice.name}")
    if isinstance(soft_teacher, str):
        soft_teacher = load_soft_teacher(soft_teacher, task, model.config, trust)
    needed = forward_inputs(model) | (forward_inputs(soft_teacher) if soft_teacher is not None else set())
    with_types = "token_type_ids" in needed
    train = tokenize(raw_train, tokenizer, ft.max_seq_length, with_types)
    dev = {split: tokenize(data, tokenizer, ft.max_seq_length, with_types) for split, data in raw_dev.items()}
    per_process_batch = ft.batch_size // accelerator.num_processes

    optimizer = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, weight_decay=ft.weight_decay)
    loader = make_loader(train, tokenizer, per_process_batch, shuffle=True, seed=seed)
    epochs = epochs_for(cfg, task)
    # Accelerate steps a prepared scheduler once per process per update: count in unsharded batches.
    schedule_steps = epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(ft.warmup_ratio * schedule_steps), schedule_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if soft_teacher is not None:
        soft_teacher = accelerator.prepare_model(soft_teacher, evaluation_mode=True)
    student_inputs = forward_inputs(accelerator.unwrap_model(model))
    teacher_inputs = forward_inputs(accelerator.unwrap_model(soft_teacher)) if soft_teacher is not None else set()

    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = tqdm(total=epochs * len(loader), desc=f"{choice.name} {task.name} seed {seed}",
                    disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k in student_inputs}).logits
            loss = task_loss(logits, batch["labels"], task.is_regression)
            if soft_teacher is not None:
                with torch.no_grad():
                    teacher_logits = soft_teacher(**{k: v for k, v in batch.items() if k in teacher_inputs}).logits
                loss = soft.alpha_task * loss + soft.alpha_ce * fine_tuning_distillation_loss(
                    logits, teacher_logits, soft.temperature, task.is_regression)
            accelerator.backward(loss)
            if ft.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), ft.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    metrics = evaluate(task, model, tokenizer, dev, ft.batch_size // accelerator.num_processes, accelerator, out_dir)
    eval_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if ft.save_models:
            unwrapped.save_pretrained(out_dir / "model")
            tokenizer.save_pretrained(out_dir / "model")
        summary = {"model": choice.name, "source": choice.source, "task": task.name, "seed": seed,
                   "metrics": metrics, "score": glue.task_score(task.name, metrics), "epochs": epochs,
                   "train_examples": len(train), "dev_examples": {s: len(d) for s, d in dev.items()},
                   "soft_targets": soft_teacher is not None, "train_seconds": round(train_seconds, 2),
                   "eval_seconds": round(eval_seconds, 2)}
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s %s seed %d: %s (train %.1fs, eval %.1fs)", choice.name, task.name, seed,
             ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), train_seconds, eval_seconds)
    accelerator.free_memory()  # drop Accelerate's references to this run's optimizer, loaders and model
    return unwrapped.eval(), metrics
