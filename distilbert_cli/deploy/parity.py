"""Whether an exported variant still does the model's job: each variant against the PyTorch model on real dev rows
of the task, through the task's own encoding, decoding and metric.

Per variant: the largest absolute difference of its outputs from PyTorch's (real tokens only, for outputs per
token), how often it agrees with PyTorch (the same label; Spearman of the scores for a regression; the same answer
span for question answering; the same top token for a masked LM; the cosine of the mean-pooled states for an
encoder) and the task metric. A variant whose metric falls more than `max_metric_drop` points below PyTorch's is
`not_recommended` (int8 accuracy collapses on some encoders: onnxruntime issues 11286 and 9599).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from distilbert_cli.deploy.onnx_models import pad_batch
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks.base import QUESTION_ANSWERING, SequenceClassificationTask, Task

# The export tasks (the Hub's pipeline tags) and the transformers head each loads.
AUTO_CLASSES = {"text-classification": "AutoModelForSequenceClassification",
                "question-answering": "AutoModelForQuestionAnswering",
                "fill-mask": "AutoModelForMaskedLM",
                "feature-extraction": "AutoModel"}
EXPORT_TASKS = tuple(AUTO_CLASSES)
_HEADS = {"ForSequenceClassification": "text-classification", "ForQuestionAnswering": "question-answering",
          "ForMaskedLM": "fill-mask"}
SCORED = ("text-classification", "question-answering")  # export tasks with a task metric
OK, NOT_RECOMMENDED, UNCHECKED = "ok", "not_recommended", "unchecked"

Outputs = dict[str, np.ndarray]


def head_task(config) -> str:
    """The export task of a checkpoint's head (its config's architectures); a plain encoder: feature-extraction."""
    for architecture in config.architectures or ():
        for suffix, task in _HEADS.items():
            if architecture.endswith(suffix):
                return task
    return "feature-extraction"


def check_task_fits(export_task: str, task: Task) -> None:
    """The data task of a scored export must be of the same kind (classes or spans)."""
    if export_task == "question-answering" and task.head is not QUESTION_ANSWERING:
        raise UsageError(f"a question-answering export is checked on a question-answering task; {task.name} is not")
    if export_task == "text-classification" and not isinstance(task, SequenceClassificationTask):
        raise UsageError(f"a text-classification export is checked on a classification task; {task.name} is not")


@dataclass
class DevRows:
    """Encoded dev rows of a task, batched as the models take them."""

    task: Task
    split: str
    examples: object  # datasets.Dataset, the task's columns
    features: object  # datasets.Dataset, task.encode's features
    batches: list[dict[str, np.ndarray]]

    @property
    def size(self) -> int:
        return len(self.examples)


def batches_of(features, names: Sequence[str], pad_token_id: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    rows = features.select_columns(list(names)).to_list()
    return [pad_batch(rows[start:start + batch_size], names, pad_token_id)
            for start in range(0, len(rows), batch_size)]


def torch_runner(model) -> Callable[[dict[str, np.ndarray]], Outputs]:
    @torch.inference_mode()
    def run(batch):
        outputs = model(**{name: torch.from_numpy(array) for name, array in batch.items()})
        return {name: value.numpy() for name, value in outputs.items() if isinstance(value, torch.Tensor)}

    return run


def run_all(runner: Callable[[dict[str, np.ndarray]], Outputs], batches: list[dict[str, np.ndarray]],
            what: str) -> list[Outputs]:
    return [runner(batch) for batch in tqdm(batches, desc=f"parity: {what}", leave=False)]


def _max_abs_diff(outputs: list[Outputs], reference: list[Outputs], batches: list[dict[str, np.ndarray]],
                  names: Sequence[str]) -> float:
    """Over every compared output; outputs per token only at real tokens (padding positions mean nothing)."""
    largest = 0.0
    for got, expected, batch in zip(outputs, reference, batches, strict=True):
        real = batch["attention_mask"].astype(bool)
        for name in names:
            diff = np.abs(got[name].astype(np.float64) - expected[name].astype(np.float64))
            if diff.ndim >= 2 and diff.shape[:2] == real.shape:
                diff = diff[real]
            largest = max(largest, float(diff.max(initial=0.0)))
    return largest


def _task_predictions(rows: DevRows, outputs: list[Outputs], settings) -> list:
    arrays = [rows.task.outputs(SimpleNamespace(**{k: torch.from_numpy(v) for k, v in batch.items()})).numpy()
              for batch in outputs]
    return rows.task.decode(arrays, rows.features, rows.examples, settings)


def _split_score(task: Task, predictions: list, gold: list) -> tuple[float, dict[str, float]]:
    metrics = task.compute_metrics(predictions, gold)
    return float(np.mean([metrics[name] for name in task.metrics])), metrics


def _agreement(export_task: str, rows: DevRows, got: list[Outputs], reference: list[Outputs], predictions: list,
               reference_predictions: list) -> tuple[float, str]:
    if export_task == "text-classification":
        if rows.task.is_regression:
            from scipy.stats import spearmanr

            return float(spearmanr(predictions, reference_predictions)[0]), "Spearman with PyTorch's scores"
        same = np.asarray(predictions) == np.asarray(reference_predictions)
        return 100.0 * float(same.mean()), "% of examples with PyTorch's label"
    if export_task == "question-answering":
        same = [a == b for a, b in zip(predictions, reference_predictions, strict=True)]
        return 100.0 * float(np.mean(same)), "% of questions with PyTorch's answer span (exact match)"
    if export_task == "fill-mask":
        same, total = 0, 0
        for g, r, batch in zip(got, reference, rows.batches, strict=True):
            real = batch["attention_mask"].astype(bool)
            same += int((g["logits"].argmax(-1) == r["logits"].argmax(-1))[real].sum())
            total += int(real.sum())
        return 100.0 * same / total, "% of tokens with PyTorch's top prediction"
    cosines = []
    for g, r, batch in zip(got, reference, rows.batches, strict=True):
        pooled = [_sentence_vector(out, batch["attention_mask"]) for out in (g, r)]
        cosines += list((pooled[0] * pooled[1]).sum(-1)
                        / (np.linalg.norm(pooled[0], axis=-1) * np.linalg.norm(pooled[1], axis=-1)))
    return float(np.min(cosines)), "lowest cosine of the sentence vectors with PyTorch's"


def _sentence_vector(outputs: Outputs, attention_mask: np.ndarray) -> np.ndarray:
    """The encoder's own pooled output (BERT's pooler, the BiLSTM's max-pooled states), else its token states
    averaged over the real tokens."""
    if "pooler_output" in outputs:
        return outputs["pooler_output"].astype(np.float64)
    weights = attention_mask[..., None].astype(np.float64)
    return (outputs["last_hidden_state"] * weights).sum(1) / weights.sum(1)


def parity(export_task: str, rows: DevRows, reference: list[Outputs], variants: dict[str, list[Outputs]],
           settings, max_metric_drop: float) -> dict:
    """parity.json: PyTorch's metric, and each variant's differences, agreement, metric and verdict."""
    compared = list(reference[0])
    scored = export_task in SCORED
    gold = rows.task.gold(rows.examples) if scored else None
    result = {"export_task": export_task, "data_task": rows.task.name, "split": rows.split, "examples": rows.size,
              "features": len(rows.features), "outputs": compared, "max_metric_drop": max_metric_drop}
    if scored:
        reference_predictions = _task_predictions(rows, reference, settings)
        score, metrics = _split_score(rows.task, reference_predictions, gold)
        result["metric"] = " / ".join(rows.task.metrics)
        result["pytorch"] = {"metric": score, "metrics": metrics}
    else:
        reference_predictions = None
        result["metric"] = None
        result["pytorch"] = {"metric": None, "metrics": {}}
    result["variants"] = {}
    for name, outputs in variants.items():
        predictions = _task_predictions(rows, outputs, settings) if scored else None
        agreement, kind = _agreement(export_task, rows, outputs, reference, predictions, reference_predictions)
        entry = {"max_abs_diff": _max_abs_diff(outputs, reference, rows.batches, compared), "agreement": agreement,
                 "agreement_kind": kind}
        if scored:
            score, metrics = _split_score(rows.task, predictions, gold)
            drop = result["pytorch"]["metric"] - score
            entry.update(metric=score, metrics=metrics, metric_drop=drop,
                         status=NOT_RECOMMENDED if drop > max_metric_drop else OK)
        else:
            entry.update(metric=None, metrics={}, metric_drop=None, status=UNCHECKED)
        result["variants"][name] = entry
    return result


def recommended(parity_json: dict) -> list[str]:
    """The variants a user may be told to use: every one not marked not_recommended."""
    return [name for name, entry in parity_json["variants"].items() if entry["status"] != NOT_RECOMMENDED]
