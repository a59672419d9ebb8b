"""Fine-tuning one model on one task with one seed, and predicting a task's dev splits: the machinery of the
finetune and evaluation stages, with everything task-specific (head, features, loss, decoding, metrics) asked
of the `Task`."""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import replace

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli.artifacts import FinetuneRun
from distilbert_cli.errors import UsageError
from distilbert_cli.models.loading import load_config, load_model, load_tokenizer
from distilbert_cli.tasks.base import Task, TaskData

log = logging.getLogger(__name__)


# Arguments of a model's forward() that are not inputs of a batch.
_NOT_INPUTS = ("self", "labels", "start_positions", "end_positions", "kwargs", "inputs_embeds")


def forward_inputs(model) -> set[str]:
    """Tensor inputs the model's forward() names (DistilBERT has no token_type_ids, BERT has)."""
    return {name for name in inspect.signature(model.forward).parameters if name not in _NOT_INPUTS}


def first_rows(data: TaskData, train: int | None, evaluation: int | None) -> TaskData:
    """Only the first `train` training examples and `evaluation` examples of the other splits (None: all)."""
    def first(dataset, limit):
        return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))

    return replace(data, splits={split: first(dataset, train if split == "train" else evaluation)
                                 for split, dataset in data.splits.items()})


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=DataCollatorWithPadding(tokenizer))


# Pads the outputs of the processes to one width before they are gathered: a very low logit, never a best span.
_PAD_LOGIT = -1e4


@torch.no_grad()
def predict(task: Task, model, loader, accelerator) -> list[np.ndarray]:
    """The task outputs of every feature of `loader`, in order, one array per batch, gathered from every process."""
    model.eval()
    accepted = forward_inputs(accelerator.unwrap_model(model))
    outputs = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not accelerator.is_local_main_process):
        output = task.outputs(model(**{k: v for k, v in batch.items() if k in accepted})).float()
        output = accelerator.pad_across_processes(output, dim=1, pad_index=_PAD_LOGIT)
        outputs.append(accelerator.gather_for_metrics(output).cpu().numpy())
    return outputs


def _plain(value):
    """numpy scalars as Python values, for JSON."""
    return value.item() if isinstance(value, np.generic) else value


def evaluate(task: Task, model, tokenizer, dev: dict, settings, batch_size: int, accelerator,
             out: FinetuneRun) -> dict[str, float]:
    """Predict every dev split ({split: (examples, features)}), write the predictions (JSON lines, and the task's
    official format if it has one), return the flat metrics."""
    metrics, lines, official = {}, [], {}
    accepted = forward_inputs(accelerator.unwrap_model(model))
    for split, (examples, features) in dev.items():
        inputs = features.select_columns([name for name in features.column_names if name in accepted])
        loader = accelerator.prepare(make_loader(inputs, tokenizer, batch_size, shuffle=False, seed=0))
        predictions = task.decode(predict(task, model, loader, accelerator), features, examples, settings)
        gold = task.gold(examples)
        for name, value in task.compute_metrics(predictions, gold).items():
            metrics[task.metric_key(split, name)] = value
        ids = task.example_ids(examples) or [None] * len(gold)
        lines += [json.dumps({"split": split, "index": i, **({"id": id_} if id_ is not None else {}),
                              "label": _plain(label), "prediction": _plain(prediction)})
                  for i, (id_, label, prediction) in enumerate(zip(ids, gold, predictions, strict=True))]
        if (answers := task.official_predictions(examples, predictions)) is not None:
            official[split] = answers
    if accelerator.is_main_process:
        out.path.mkdir(parents=True, exist_ok=True)
        out.predictions.write_text("\n".join(lines) + "\n")
        for split, answers in official.items():
            out.official_predictions(split).write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
    return metrics


def check_task_model(name_or_path: str, task: Task, role: str, trust_remote_code: bool):
    """The checkpoint's config, if transformers can put the task's head on that architecture."""
    import transformers

    config = load_config(name_or_path, trust_remote_code=trust_remote_code, role=role)
    if type(config) not in getattr(transformers, task.head.mapping) and not trust_remote_code:
        raise UsageError(f"{role} {name_or_path!r} ({config.model_type}) has no {task.head.words} architecture in "
                         f"transformers; pass a BERT-family checkpoint")
    return config


def load_task_model(source: str, task: Task, label_names, trust_remote_code: bool, role: str):
    """The encoder of `source` with a fresh head sized for `task`; the task's name is saved in its config."""
    import transformers

    model = load_model(getattr(transformers, task.head.auto_class), source, trust_remote_code=trust_remote_code,
                       role=role, **task.head_config(label_names))
    model.config.finetuning_task = task.name  # saved in config.json: the evaluation stage reads it
    return model


def load_finetuned(path: str, task: Task, trust_remote_code: bool, role: str):
    """A model fine-tuned on `task` (its head as saved)."""
    import transformers

    return load_model(getattr(transformers, task.head.auto_class), path, trust_remote_code=trust_remote_code,
                      role=role)


def load_soft_teacher(path: str, task: Task, label_names, student_config, trust_remote_code: bool):
    """A model fine-tuned on `task` whose outputs become the student's soft targets."""
    model = load_finetuned(path, task, trust_remote_code, "soft-target teacher")
    if task.model_label_names(model.config) != (tuple(label_names) if label_names is not None else None):
        raise UsageError(f"soft-target teacher {path!r} was fine-tuned on other classes than the student's: "
                         f"{task.model_label_names(model.config)} vs {label_names}")
    if model.config.vocab_size != student_config.vocab_size:
        raise UsageError(f"soft-target teacher {path!r} does not fit the student: vocab {model.config.vocab_size} "
                         f"vs {student_config.vocab_size}")
    return model.eval().requires_grad_(False)


def check_length(model, length: int, setting: str, role: str) -> None:
    """A model must have a position for every token of the task's inputs."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise UsageError(f"{setting}={length} exceeds the {positions} positions of {role}")


def training_schedule(parameters, settings, steps: int):
    """AdamW (fused: one kernel per step, several times faster than the per-tensor loop on a CPU) and a linear
    warmup then decay over `steps`, from a settings section with learning_rate, weight_decay and warmup_ratio.
    Returns (optimizer, scheduler, steps)."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps), steps


def finish_run(task: Task, model, tokenizer, dev: dict, settings, batch_size: int, accelerator, out: FinetuneRun,
               save_model: bool, summary: dict) -> dict[str, float]:
    """After training: predict and score the dev splits (predictions into `out`), save the model and its tokenizer
    (`save_model`), write metrics.json (`summary` with the metrics, the score and the evaluation time); return the
    metrics."""
    started = time.perf_counter()
    metrics = evaluate(task, model, tokenizer, dev, settings, batch_size, accelerator, out)
    eval_seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if save_model:
            accelerator.unwrap_model(model).save_pretrained(out.model)
            tokenizer.save_pretrained(out.model)
        summary = {**summary, "metrics": metrics, "score": task.score(metrics), "eval_seconds": round(eval_seconds, 2)}
        out.metrics.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%s %s seed %d: %s (eval %.1fs)", summary["model"], task.name, summary["seed"],
             ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), eval_seconds)
    return metrics


def encode_splits(task: Task, data: TaskData, splits, tokenizer, settings, with_types: bool) -> dict:
    """{split: (examples, evaluation features)} of `splits`."""
    return {split: (data.splits[split], task.encode(data.splits[split], tokenizer, settings, with_types,
                                                     training=False)) for split in splits}


def finetune_one(ft: DictConfig, settings: DictConfig, task: Task, data: TaskData, name: str, source: str, seed: int,
                 epochs: int, accelerator, out: FinetuneRun, soft_teacher, trust_remote_code: bool
                 ) -> tuple[object, dict[str, float]]:
    """Fine-tune `source` on `task` with `seed` (settings `ft`, a finetune config section; `settings`, the task
    section) on `data` (train and the evaluation splits); write model/, predictions and metrics.json into `out`;
    return the fine-tuned model and its metrics. `soft_teacher` (a model, a path or None) gives the "(D)" soft
    targets."""
    from accelerate.utils import set_seed

    soft = ft.soft_targets
    set_seed(seed)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, role=f"model {name}")
    model = load_task_model(source, task, data.label_names, trust_remote_code, f"model {name}")
    if isinstance(soft_teacher, str):
        soft_teacher = load_soft_teacher(soft_teacher, task, data.label_names, model.config, trust_remote_code)
    length, setting = task.input_length(settings)
    for role, checked in ((f"model {name}", model), ("the soft-target teacher", soft_teacher)):
        if checked is not None:
            check_length(checked, length, setting, role)
    needed = forward_inputs(model) | (forward_inputs(soft_teacher) if soft_teacher is not None else set())
    with_types = "token_type_ids" in needed
    train = task.encode(data.splits["train"], tokenizer, settings, with_types, training=True)
    dev = encode_splits(task, data, [split for split in data.splits if split != "train"], tokenizer, settings,
                        with_types)
    per_process_batch = ft.batch_size // accelerator.num_processes

    loader = make_loader(train, tokenizer, per_process_batch, shuffle=True, seed=seed)
    # Accelerate steps a prepared scheduler once per process per update: count in unsharded batches.
    optimizer, scheduler, _ = training_schedule(model.parameters(), ft, epochs * len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if soft_teacher is not None:
        soft_teacher = accelerator.prepare_model(soft_teacher, evaluation_mode=True)
    student_inputs = forward_inputs(accelerator.unwrap_model(model))
    teacher_inputs = forward_inputs(accelerator.unwrap_model(soft_teacher)) if soft_teacher is not None else set()

    out.path.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    progress = tqdm(total=epochs * len(loader), desc=f"{name} {task.name} seed {seed}",
                    disable=not accelerator.is_local_main_process)
    for _ in range(epochs):
        model.train()
        for batch in loader:
            outputs = task.outputs(model(**{k: v for k, v in batch.items() if k in student_inputs}))
            loss = task.loss(outputs, batch)
            if soft_teacher is not None:
                with torch.no_grad():
                    teacher_outputs = task.outputs(soft_teacher(**{k: v for k, v in batch.items()
                                                                   if k in teacher_inputs}))
                loss = soft.alpha_task * loss + soft.alpha_ce * task.soft_target_loss(outputs, teacher_outputs,
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
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    log.info("%s %s seed %d: trained in %.1fs", name, task.name, seed, train_seconds)
    metrics = finish_run(task, model, tokenizer, dev, settings, per_process_batch, accelerator, out, ft.save_models, {
        "model": name, "source": source, "task": task.name, "seed": seed, "epochs": epochs,
        "steps": len(loader) * epochs,
        "train_examples": len(data.splits["train"]), "train_features": len(train),
        "dev_examples": {split: len(examples) for split, (examples, _) in dev.items()},
        "soft_targets": soft_teacher is not None, "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2)})
    unwrapped = accelerator.unwrap_model(model)
    accelerator.free_memory()  # drop Accelerate's references to this run's optimizer, loaders and model
    return unwrapped.eval(), metrics
