"""What a downstream task provides to finetune, the evaluation stage, bench-cpu and the report.

A task knows its data (splits, where they come from), how to encode it for a model, its head, its loss and
soft-target (D) loss, how model outputs become predictions, its metrics and one score per run, and the
published rows it is compared with. `SequenceClassificationTask` implements everything for single-sentence
and sentence-pair classification and regression; a task family (GLUE, ...) adds where its data comes from and
which metrics it reports.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distilbert_cli.errors import UsageError
from distilbert_cli.training.losses import soft_target_loss

TEXT_COLUMNS = ("sentence1", "sentence2")


@dataclass(frozen=True)
class Published:
    """A paper's table of published scores, to print beside ours."""

    title: str  # the table's heading, e.g. "GLUE (the paper's Table 1)"
    source: str  # e.g. "Sanh et al. 2019, Table 1 (published)"
    rows: Mapping[str, Mapping[str, float]]  # model -> {task name: score, "score": the paper's own average}
    teacher: str  # the row of the teacher and of the student, for the paper's retention
    student: str
    score_note: str  # how a task's score is formed from its metrics


class Task(ABC):
    """One downstream task. Splits are "train" plus `dev_splits`; every split reads as a `datasets.Dataset`
    with text columns `sentence1` (and `sentence2` for pairs) and `label`."""

    name: str  # config name, e.g. "rte"
    title: str  # as printed in tables, e.g. "RTE"
    family: str  # the task family, e.g. "glue": tasks of a family share a table
    dev_splits: tuple[str, ...]
    metrics: tuple[str, ...]  # the metric names of one split
    published: Published  # the published rows of the task's family
    layout: str  # the local data layout in words, for error messages

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits)

    # ---- data
    @abstractmethod
    def local_files(self, data_dir: str, splits: Sequence[str]) -> list[Path]:
        """The files of `splits` under a local data directory, in the task's standard layout."""

    def check_files(self, data_dir: str | None, splits: Sequence[str]) -> None:
        """Fail before any work if a local file of `splits` is missing (nothing to check for the hub)."""
        if data_dir is None:
            return
        for split, path in zip(splits, self.local_files(data_dir, splits), strict=True):
            if not path.is_file():
                raise UsageError(f"{self.title} {split} file not found: {path} ({self.layout})")

    @abstractmethod
    def load_split(self, split: str, data_dir: str | None):
        """One split as a `datasets.Dataset` with the normalised columns."""

    @abstractmethod
    def describe_data(self, data_dir: str | None) -> str:
        """Where the data came from, in words, for the results table."""

    # ---- model
    @abstractmethod
    def head_config(self) -> dict:
        """Keyword arguments of `from_pretrained` that size the task head."""

    @abstractmethod
    def encode(self, dataset, tokenizer, max_seq_length: int, with_token_type_ids: bool):
        """Model inputs plus `labels`, truncated and not padded (the collator pads each batch)."""

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The task loss of a batch."""

    @abstractmethod
    def soft_target_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> torch.Tensor:
        """The "(D)" term: match a fine-tuned teacher's outputs."""

    @abstractmethod
    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """A batch's logits -> the predictions that are saved and scored."""

    # ---- scores
    @abstractmethod
    def compute_metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        """The task's metrics on one split, in percent."""

    def metric_key(self, split: str, metric: str) -> str:
        """Flat metric names: "accuracy" for a task with one dev split, "dev_matched_accuracy" for MNLI."""
        return metric if self.dev_splits == ("dev",) else f"{split}_{metric}"

    def score(self, metrics: Mapping[str, float]) -> float:
        """One number per task, as in the paper's tables: the mean of its metrics over its dev splits."""
        return float(np.mean([metrics[self.metric_key(split, metric)]
                              for split in self.dev_splits for metric in self.metrics]))


class SequenceClassificationTask(Task):
    """Classification (class ids) or regression (one score) of a sentence or a sentence pair."""

    label_names: tuple[str, ...] | None  # class names in class-id order; None: regression
    is_pair: bool

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    def head_config(self) -> dict:
        labels = self.label_names or ("score",)
        return {"num_labels": self.num_labels, "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)},
                "problem_type": "regression" if self.is_regression else "single_label_classification"}

    def encode(self, dataset, tokenizer, max_seq_length: int, with_token_type_ids: bool):
        texts = [name for name in TEXT_COLUMNS if name in dataset.column_names]

        def encode(batch):
            encoded = tokenizer(*(batch[name] for name in texts), truncation=True, max_length=max_seq_length,
                                return_token_type_ids=with_token_type_ids)
            return {**encoded, "labels": batch["label"]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class ids, or mean squared error on the score of a regression task."""
        if self.is_regression:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def soft_target_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> torch.Tensor:
        """The distill stage's KL(softmax(t/T) || softmax(s/T)) * T^2 on class logits. A regression head has no
        distribution to soften, so it matches the teacher's score (MSE) instead."""
        if self.is_regression:
            return F.mse_loss(student_logits.float(), teacher_logits.float())
        return soft_target_loss(student_logits, teacher_logits, temperature)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1)
