"""Fine-tuning one model on one task with one seed, and predicting a task's dev splits: the machinery of the
finetune and evaluation stages, with everything task-specific asked of the `Task`."""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli.artifacts import FinetuneRun
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_config, load_model, load_tokenizer
from distilbert_cli.tasks.base import Task

log = logging.getLogger(__name__)


def forward_inputs(model) -> set[str]:
    """Tensor inputs the model's forward() names (DistilBERT has no token_type_ids, BERT has)."""
    return {name for name in inspect.signature(model.forward).parameters
            if name not in ("self", "labels", "kwargs", "inputs_embeds")}


def first_rows(dataset, limit: int | None):
    return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=DataCollatorWithPadding(tokenizer))


@torch.no_grad()
def predict(task: Task, model, loader, accelerator) -> np.ndarray:
    """The task's predictions for every row of `loader`, in order, gathered from every process."""
    model.eval()
    accepted = forward_inputs(accelerator.unwrap_model(model))
    outputs = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not accelerator.is_local_main_process):
        logits = model(**{k: v for k, v in batch.items() if k in accepted}).logits
        outputs.append(accelerator.gather_for_metrics(task.predictions(logits)))
    return torch.cat(outputs).cpu().numpy()


def evaluate(task: Task, model, tokenizer, dev_splits: dict, batch_size: int, accelerator,
             predictions_path: Path) -> dict[str, float]:
    """Predict every encoded dev split, write the predictions (JSON lines), return the flat metrics."""
    metrics, lines = {}, []
    for split, dataset in dev_splits.items():
        loader = accelerator.prepare(make_loader(dataset, tokenizer, batch_size, shuffle=False, seed=0))
        predictions = predict(task, model, loader, accelerator)
        labels = np.asarray(dataset["labels"])
        for name, value in task.compute_metrics(predictions, labels).items():
            metrics[task.metric_key(split, name)] = value
        lines += [json.dumps({"split": split, "index": i, "label": label.item(), "prediction": prediction.item()})
                  for i, (label, prediction) in enumerate(zip(labels, predictions, strict=True))]
    if accelerator.is_main_process:
        predictions_path.write_text("\n".join(lines) + "\n")
    return metrics


def check_task_model(name_or_path: str, role: str, trust_remote_code: bool):
    """The checkpoint's config, if transformers can put a sequence-classification head on that architecture."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = load_config(name_or_path, trust_remote_code=trust_remote_code, role=role)
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING and not trust_remote_code:
        raise UsageError(f"{role} {name_or_path!r} ({config.model_type}) has no sequence-classification "
                         f"architecture in transformers; pass a BERT-family checkpoint")
    return config


def load_task_model(source: str, task: Task, trust_remote_code: bool, role: str):
    """The encoder of `source` with a fresh head sized for `task`; the task's name is saved in its config."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(AutoModelForSequenceClassification, source, trust_remote_code=trust_remote_code, role=role,
                       **task.head_config())
    model.config.finetuning_task = task.name  # saved in config.json: the evaluation stage reads it
    return model


def load_soft_teacher(path: str, task: Task, student_config, trust_remote_code: bool):
    """A model fine-tuned on `task` whose outputs become the student's soft targets."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(AutoModelForSequenceClassification, path, trust_remote_code=trust_remote_code,
                       role="soft-target teacher")
    num_labels = task.head_config()["num_labels"]
    if model.config.num_labels != num_labels or model.config.vocab_size != student_config.vocab_size:
        raise UsageError(f"soft-target teacher {path!r} does not fit {task.title}: {model.config.num_labels} labels "
                         f"and vocab {model.config.vocab_size} vs {num_labels} and {student_config.vocab_size}")
    return model.eval()


def finetune_one(ft: DictConfig, task: Task, name: str, source: str, seed: int, epochs: int, raw_train,
                 raw_dev: dict, accelerator, out: FinetuneRun, soft_teacher, trust_remote_code: bool
                 ) -> tuple[object, dict[str, float]]:
    """Fine-tune `source` on `task` with `seed` (settings `ft`, a finetune config section); write model/,
    predictions.jsonl and metrics.json into `out`; return the fine-tuned model and its dev metrics.
    `soft_teacher` (a model, a path or None) gives the "(D)" soft targets."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    soft = ft.soft_targets
    set_seed(seed)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, role=f"model {name}")
    model = load_task_model(source, task, trust_remote_code, f"model {name}")
    if isinstance(soft_teacher, str):
        soft_teacher = load_soft_teacher(soft_teacher, task, model.config, trust_remote_code)
    needed = forward_inputs(model) | (forward_inputs(soft_teacher) if soft_teacher is not None else set())
    with_types = "token_type_ids" in needed
    train = task.encode(raw_train, tokenizer, ft.max_seq_length, with_types)
    dev = {split: task.encode(data, tokenizer, ft.max_seq_length, with_types) for split, data in raw_dev.items()}
    per_process_batch = ft.batch_size // accelerator.num_processes

    optimizer = torch.optim.AdamW(model.parameters(), lr=ft.learning_rate, weight_decay=ft.weight_decay)
    loader = make_loader(train, tokenizer, per_process_batch, shuffle=True, seed=seed)
    # Accelerate steps a prepared scheduler once per process per update: count in unsharded batches.
    schedule_steps = epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(ft.warmup_ratio * schedule_steps), schedule_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if soft_teacher is not None:
        soft_teacher = accelerator.prepare_model(soft_teacher, evaluation_mode=True)
    student_inputs = forward_inputs(accelerator.unwrap_model(model))
    teacher_inputs = forward_inputs(accelerator.unwrap_model(soft_teacher)) if soft_teacher is not None else set()

    out.path.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    progress = tqdm(total=epochs * len(loader), desc=f"{name} {task.name} seed {seed}",
                    disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k in student_inputs}).logits
            loss = task.loss(logits, batch["labels"])
            if soft_teacher is not None:
                with torch.no_grad():
                    teacher_logits = soft_teacher(**{k: v for k, v in batch.items() if k in teacher_inputs}).logits
                loss = soft.alpha_task * loss + soft.alpha_ce * task.soft_target_loss(logits, teacher_logits,
                                                                                      soft.temperature)
            accelerator.backward(loss)
            if ft.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), ft.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.4f}")
    progress.close()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    metrics = evaluate(task, model, tokenizer, dev, per_process_batch, accelerator, out.predictions)
    eval_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        if ft.save_models:
            unwrapped.save_pretrained(out.model)
            tokenizer.save_pretrained(out.model)
        summary = {"model": name, "source": source, "task": task.name, "seed": seed,
                   "metrics": metrics, "score": task.score(metrics), "epochs": epochs,
                   "train_examples": len(train), "dev_examples": {s: len(d) for s, d in dev.items()},
                   "soft_targets": soft_teacher is not None, "train_seconds": round(train_seconds, 2),
                   "eval_seconds": round(eval_seconds, 2)}
        out.metrics.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s %s seed %d: %s (train %.1fs, eval %.1fs)", name, task.name, seed,
             ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), train_seconds, eval_seconds)
    accelerator.free_memory()  # drop Accelerate's references to this run's optimizer, loaders and model
    return unwrapped.eval(), metrics
