"""A task's data as the training stages use it (capped rows, a validation split held out of the training
examples), and predicting and scoring its splits on one or several processes: every example counts once, the
uneven last batch of a split included."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from distilbert_cli.artifacts import FinetuneRun
from distilbert_cli.downstream.task_models import forward_inputs
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks.base import Task, TaskData

# The split held out of the training examples for model selection (never a scored dev split).
VALIDATION = "heldout"
# Pads the outputs of the processes to one width before they are gathered: a very low logit, never a best span.
_PAD_LOGIT = -1e4


def first_rows(data: TaskData, train: int | None, evaluation: int | None) -> TaskData:
    """Only the first `train` training examples and `evaluation` examples of the other splits (None: all)."""
    def first(dataset, limit):
        return dataset if limit is None or limit >= len(dataset) else dataset.select(range(limit))

    return replace(data, splits={split: first(dataset, train if split == "train" else evaluation)
                                 for split, dataset in data.splits.items()})


def hold_out(data: TaskData, fraction: float, seed: int, setting: str) -> TaskData:
    """`data` with a seeded `fraction` of its training examples moved to the split VALIDATION, for model selection
    (never a scored dev split), each part in its original order: the same examples for every model and seed of a
    run given the run's seed, so every arm of a comparison is chosen on the same split."""
    train = data.splits["train"]
    count = max(1, round(fraction * len(train)))
    if count >= len(train):
        raise UsageError(f"{setting}={fraction} leaves none of the {len(train)} training examples to train on")
    held = np.sort(np.random.default_rng(seed).choice(len(train), size=count, replace=False))
    kept = np.setdiff1d(np.arange(len(train)), held)
    return replace(data, splits={**data.splits, "train": train.select(kept), VALIDATION: train.select(held)})


def scored_splits(data: TaskData) -> list[str]:
    """The splits a model is scored on: all but the training examples and the held-out validation split."""
    return [split for split in data.splits if split not in ("train", VALIDATION)]


def make_loader(dataset, tokenizer, batch_size: int):
    """In order, padded per batch: for prediction (training batches come from training.batches)."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=DataCollatorWithPadding(tokenizer))


@torch.no_grad()
def predict(task: Task, model, loader, accelerator) -> list[np.ndarray]:
    """The task outputs of every feature of `loader` (prepared by the accelerator: each process runs a share), in
    order, one array per batch, gathered from every process without the padding of an uneven last batch."""
    model.eval()
    accepted = forward_inputs(accelerator.unwrap_model(model))
    outputs = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=not accelerator.is_local_main_process):
        output = task.outputs(model(**{k: v for k, v in batch.items() if k in accepted})).float()
        output = accelerator.pad_across_processes(output, dim=1, pad_index=_PAD_LOGIT)
        outputs.append(accelerator.gather_for_metrics(output).cpu().numpy())
    return outputs


def encode_splits(task: Task, data: TaskData, splits, tokenizer, settings, with_types: bool) -> dict:
    """{split: (examples, evaluation features)} of `splits`."""
    return {split: (data.splits[split], task.encode(data.splits[split], tokenizer, settings, with_types,
                                                     training=False)) for split in splits}


def predict_splits(task: Task, model, tokenizer, splits: dict, settings, batch_size: int, accelerator) -> dict:
    """{split: (examples, predictions)} for every split of `splits` ({split: (examples, features)})."""
    accepted = forward_inputs(accelerator.unwrap_model(model))
    found = {}
    for split, (examples, features) in splits.items():
        inputs = features.select_columns([name for name in features.column_names if name in accepted])
        loader = accelerator.prepare(make_loader(inputs, tokenizer, batch_size))
        found[split] = examples, task.decode(predict(task, model, loader, accelerator), features, examples, settings)
    return found


def selection_score(task: Task, examples, predictions) -> dict:
    """A held-out split's metrics, and the score model selection compares: the mean of the task's metrics."""
    metrics = task.compute_metrics(predictions, task.gold(examples))
    return {**metrics, "score": float(np.mean([metrics[name] for name in task.metrics]))}


def _plain(value):
    """numpy scalars as Python values, for JSON."""
    return value.item() if isinstance(value, np.generic) else value


def evaluate(task: Task, model, tokenizer, dev: dict, settings, batch_size: int, accelerator,
             out: FinetuneRun) -> dict[str, float]:
    """Predict every dev split ({split: (examples, features)}), write the predictions (JSON lines, and the task's
    official format if it has one), return the flat metrics."""
    metrics, lines, official = {}, [], {}
    for split, (examples, predictions) in predict_splits(task, model, tokenizer, dev, settings, batch_size,
                                                         accelerator).items():
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
