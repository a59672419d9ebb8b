"""What a downstream task provides to finetune, the evaluation stage, bench-cpu and the report.

A task knows its data (splits, where they come from), how to encode it for a model (one feature per example,
or several windows of one example for question answering), its head, its loss and soft-target "(D)" loss, how
a split's model outputs become one prediction per example, its metrics and one score per run, and the
published rows it is compared with. `SequenceClassificationTask` implements everything for single-text and
text-pair classification and regression; a task family (GLUE, IMDb and your own data, SQuAD) adds where its
data comes from and which metrics it reports.

Task settings (`settings`) are the composed `task` config section (conf/task_settings.yaml): the data
directory, the sequence length and truncation policy, the question-answering windows, your own data's files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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

    title: str  # the table's heading, e.g. "GLUE dev (the paper's Table 1)"
    source: str  # e.g. "Sanh et al. 2019, Table 1 (published)"
    # model -> {task name: its cell: one score, or several metrics (SQuAD: EM, F1)}; a task a row lacks is "–"
    rows: Mapping[str, Mapping[str, float | tuple[float, ...]]]
    teacher: str | None  # the rows of the teacher and of the student, for the paper's retention
    student: str | None
    score_note: str  # how a task's score is formed from its metrics
    # The paper's own average of each row (Table 1's Score column); None: the table has no Score column.
    own_scores: Mapping[str, float] | None = None


# The paper's Table 2 spans two task families: IMDb (tasks.text) and SQuAD (tasks.squad).
TABLE2 = Published(
    "IMDb and SQuAD (the paper's Table 2)",
    "Sanh et al. 2019, Table 2 (published: IMDb test accuracy, SQuAD v1.1 dev EM/F1)", {
        "BERT-base": {"imdb": 93.46, "squad": (81.2, 88.5)},
        "DistilBERT": {"imdb": 92.82, "squad": (77.7, 85.8)},
        "DistilBERT (D)": {"squad": (79.1, 86.9)},
    }, teacher="BERT-base", student="DistilBERT",
    score_note="Cells are medians over seeds: IMDb accuracy, SQuAD exact match / F1 (a SQuAD score, for retention, "
               "is the mean of the two). DistilBERT (D) adds the soft targets of a SQuAD-fine-tuned BERT "
               "(`finetune.soft_targets`).")


@dataclass(frozen=True)
class Head:
    """The transformers head a task puts on the encoder."""

    auto_class: str  # e.g. "AutoModelForSequenceClassification"
    mapping: str  # the config -> model class mapping of that auto class
    words: str  # in messages, e.g. "sequence-classification"

    @property
    def architecture_suffix(self) -> str:  # e.g. "ForSequenceClassification"
        return self.auto_class.removeprefix("AutoModel")


SEQUENCE_CLASSIFICATION = Head("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
                               "sequence-classification")
QUESTION_ANSWERING = Head("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING",
                          "question-answering")


@dataclass(frozen=True)
class TaskData:
    """The loaded splits of a task, one row per example in the task's normalised columns."""

    splits: dict  # split -> datasets.Dataset
    label_names: tuple[str, ...] | None = None  # class names in class-id order (None: regression, QA)
    # split -> {what was wrong: rows left out}; logged when loaded and recorded in the stage manifest
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)


class Task(ABC):
    """One downstream task. Its splits are "train" plus `dev_splits` (scored) plus any `extra_splits` the
    settings name (predicted and scored too, outside the task score)."""

    name: str  # config name, e.g. "rte"
    title: str  # as printed in tables, e.g. "RTE"
    dev_splits: tuple[str, ...]  # the splits the score comes from
    metrics: tuple[str, ...]  # the metric names of one split
    published: Published  # the table the task is printed in, with the paper's rows
    head: Head
    target_columns: tuple[str, ...]  # training features' targets (not model inputs)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.dev_splits)

    @property
    def heading(self) -> str:
        """The task's column heading in its results table."""
        return self.title

    def eval_splits(self, settings) -> tuple[str, ...]:
        """The splits to predict and score: the dev splits and any extra split the settings name."""
        return self.dev_splits

    # ---- data
    def local_files(self, settings, splits: Sequence[str]) -> dict[str, Path]:
        """The local file of each of `splits` (none when the data comes from the hub)."""
        return {}

    def check_files(self, settings, splits: Sequence[str]) -> None:
        """Fail before any work if a local file of `splits` is missing."""
        for split, path in self.local_files(settings, splits).items():
            if not path.is_file():
                raise UsageError(f"{self.title} {split} file not found: {path} ({self.layout(settings)})")

    @abstractmethod
    def layout(self, settings) -> str:
        """The local data layout in words, for error messages."""

    @abstractmethod
    def load(self, settings, splits: Sequence[str], label_names: Sequence[str] | None = None) -> TaskData:
        """`splits` in the task's normalised columns. `label_names` (a fine-tuned model's classes) fixes the
        class ids of a task whose classes come from the data."""

    @abstractmethod
    def describe_data(self, settings) -> str:
        """Where the data came from, in words, for the results table."""

    def describe_settings(self, settings) -> str | None:
        """The settings a reader of the results needs (truncation, windows), in words (tasks with the same
        words share one note)."""
        return None

    # ---- model
    def head_config(self, label_names: Sequence[str] | None) -> dict:
        """Keyword arguments of `from_pretrained` that size the task head."""
        return {}

    @abstractmethod
    def input_length(self, settings) -> tuple[int, str]:
        """The longest input the task encodes, and the setting that says so."""

    def model_label_names(self, config) -> tuple[str, ...] | None:
        """The class names of a model fine-tuned on this task (its config), or a UsageError if its head does
        not fit the task."""
        return None

    @abstractmethod
    def encode(self, dataset, tokenizer, settings, with_token_type_ids: bool, training: bool):
        """Features of the examples, truncated and not padded (the collator pads each batch): model inputs, plus
        `target_columns` for training, or what `decode` needs for evaluation."""

    @abstractmethod
    def outputs(self, model_output) -> torch.Tensor:
        """The model output the task scores and distills, as one tensor ([B, classes], or [B, L, 2] for spans)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task loss of a batch."""

    @abstractmethod
    def soft_target_loss(self, student_outputs: torch.Tensor, teacher_outputs: torch.Tensor,
                         temperature: float) -> torch.Tensor:
        """The "(D)" term: match a fine-tuned teacher's outputs."""

    @abstractmethod
    def decode(self, outputs: list[np.ndarray], features, examples, settings) -> list:
        """A split's model outputs (one array per batch of features, in feature order) -> one prediction per
        example, as saved and scored."""

    @abstractmethod
    def gold(self, examples) -> list:
        """The reference of each example, as scored against its prediction."""

    def example_ids(self, examples) -> list[str] | None:
        """The dataset's own id of each example, when it has them."""
        return None

    def official_predictions(self, examples, predictions: Sequence) -> dict | None:
        """The predictions in the task's official format (SQuAD: {id: answer text}), if it has one."""
        return None

    # ---- scores
    @abstractmethod
    def compute_metrics(self, predictions: Sequence, golds: Sequence) -> dict[str, float]:
        """The task's metrics on one split, in percent."""

    def metric_key(self, split: str, metric: str) -> str:
        """Flat metric names: "accuracy" for a task scored on one split, "dev_matched_accuracy" for MNLI,
        "test_accuracy" for an extra split."""
        return metric if self.dev_splits == (split,) else f"{split}_{metric}"

    def score(self, metrics: Mapping[str, float]) -> float:
        """One number per task, as in the paper's tables: the mean of its metrics over its dev splits."""
        return float(np.mean([metrics[self.metric_key(split, metric)]
                              for split in self.dev_splits for metric in self.metrics]))

    def table_cell(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        """What the task's column of the results table shows: its score (SQuAD: EM and F1)."""
        return (self.score(metrics),)


# ---- sequence classification and regression ---------------------------------------------------------------

def _scorers() -> dict[str, Callable]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": accuracy_score,
        "f1": f1_score,  # of the positive class (binary tasks)
        "macro_f1": lambda labels, predictions: f1_score(labels, predictions, average="macro"),
        "matthews_correlation": matthews_corrcoef,
        "pearson": lambda labels, predictions: pearsonr(predictions, labels)[0],
        "spearman": lambda labels, predictions: spearmanr(predictions, labels)[0],
    }


class SequenceClassificationTask(Task):
    """Classification (class ids) or regression (one score) of a text or a text pair. Its examples have the
    columns `sentence1` (`sentence2` for pairs) and `label` (class id, or score)."""

    is_regression: bool
    is_pair: bool  # text pairs (a task whose settings decide overrides `reads_pairs`)
    label_names: tuple[str, ...] | None  # the task's own classes in id order; None: from the data, or regression
    head = SEQUENCE_CLASSIFICATION
    target_columns = ("labels",)

    def head_config(self, label_names: Sequence[str] | None) -> dict:
        labels = ("score",) if self.is_regression else tuple(label_names)
        return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                "label2id": {label: i for i, label in enumerate(labels)},
                "problem_type": "regression" if self.is_regression else "single_label_classification"}

    def input_length(self, settings) -> tuple[int, str]:
        return settings.max_seq_length, "task.max_seq_length"

    def model_label_names(self, config) -> tuple[str, ...] | None:
        if self.is_regression or self.label_names is not None:
            wanted = 1 if self.is_regression else len(self.label_names)
            if config.num_labels != wanted:
                raise UsageError(f"the model has {config.num_labels} labels; {self.title} has {wanted}")
            return self.label_names
        return tuple(config.id2label[i] for i in range(config.num_labels))

    def reads_pairs(self, settings) -> bool:
        """Whether the examples are text pairs."""
        return self.is_pair

    def describe_settings(self, settings) -> str | None:
        policy = (f"head+tail (the first {settings.head_tokens} tokens and the last ones, Sun et al. 2019)"
                  if settings.truncation == "head_tail" else "head (the first tokens)")
        cut = "the longer text of a pair loses tokens first" if self.reads_pairs(settings) else f"truncation {policy}"
        return f"inputs cut to {settings.max_seq_length} tokens; {cut}"

    def encode(self, dataset, tokenizer, settings, with_token_type_ids: bool, training: bool):
        texts = [name for name in TEXT_COLUMNS if name in dataset.column_names]
        head_tail = settings.truncation == "head_tail" and len(texts) == 1
        if head_tail and settings.head_tokens > settings.max_seq_length - tokenizer.num_special_tokens_to_add():
            raise UsageError(f"task.head_tokens={settings.head_tokens} leaves no room in task.max_seq_length="
                             f"{settings.max_seq_length}")

        def encode(batch):
            if head_tail:
                encoded = head_and_tail(tokenizer, batch[texts[0]], settings.max_seq_length, settings.head_tokens,
                                        with_token_type_ids)
            else:
                encoded = tokenizer(*(batch[name] for name in texts), truncation=True,
                                    max_length=settings.max_seq_length, return_token_type_ids=with_token_type_ids)
            return {**encoded, "labels": batch["label"]}

        return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenize")

    def outputs(self, model_output) -> torch.Tensor:
        return model_output.logits

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy on class ids, or mean squared error on the score of a regression task."""
        if self.is_regression:
            return F.mse_loss(outputs.float().squeeze(-1), batch["labels"].float())
        return F.cross_entropy(outputs.float(), batch["labels"])

    def soft_target_loss(self, student_outputs: torch.Tensor, teacher_outputs: torch.Tensor,
                         temperature: float) -> torch.Tensor:
        """The distill stage's KL(softmax(t/T) || softmax(s/T)) * T^2 on class logits. A regression head has no
        distribution to soften, so it matches the teacher's score (MSE) instead."""
        if self.is_regression:
            return F.mse_loss(student_outputs.float(), teacher_outputs.float())
        return soft_target_loss(student_outputs, teacher_outputs, temperature)

    def decode(self, outputs: list[np.ndarray], features, examples, settings) -> list:
        logits = np.concatenate(outputs)
        return (logits[:, 0] if self.is_regression else logits.argmax(-1)).tolist()

    def gold(self, examples) -> list:
        return list(examples["label"])

    def compute_metrics(self, predictions: Sequence, golds: Sequence) -> dict[str, float]:
        """The task's metrics on one split, in percent: class ids (or scores) vs gold labels."""
        predictions, golds = np.asarray(predictions), np.asarray(golds)
        if predictions.shape != golds.shape or predictions.size == 0:
            raise ValueError(f"{self.title}: {predictions.shape} predictions for {golds.shape} labels")
        scorers = _scorers()
        return {metric: 100.0 * float(scorers[metric](golds, predictions)) for metric in self.metrics}


def head_and_tail(tokenizer, texts: Sequence[str], max_length: int, head_tokens: int, with_token_type_ids: bool
                  ) -> dict[str, list]:
    """Tokenize single texts keeping, of one longer than `max_length` tokens, its first `head_tokens` tokens and
    its last ones (Sun et al. 2019, "head+tail"). Special tokens stay where the tokenizer puts them."""
    encoded = tokenizer(list(texts), truncation=False, return_special_tokens_mask=True, verbose=False,
                        return_token_type_ids=with_token_type_ids)
    kept: dict[str, list] = {name: [] for name in encoded if name != "special_tokens_mask"}
    for row, special in enumerate(encoded["special_tokens_mask"]):
        keep = range(len(special))
        if len(special) > max_length:
            content = [i for i, is_special in enumerate(special) if not is_special]
            tail = max_length - (len(special) - len(content)) - head_tokens
            dropped = set(content[head_tokens:len(content) - tail])
            keep = [i for i in keep if i not in dropped]
        for name in kept:
            kept[name].append([encoded[name][row][i] for i in keep])
    return kept
