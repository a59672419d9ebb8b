"""The nine GLUE tasks: what each one is, how to read it (hub `nyu-mll/glue` or local TSV files), how to score it.

Every split comes back with the same columns whatever its source: `sentence1`, `sentence2` (pair tasks
only) and `label` (int class id in the hub's label order, or the float similarity score for STS-B).
Metrics follow GLUE and are reported on its 0-100 scale (the sequence-classification scorers of tasks.base).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from distilbert_cli.errors import UsageError
from distilbert_cli.tasks.base import Published, SequenceClassificationTask, TaskData

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
_HUB_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
               "dev_mismatched": "validation_mismatched"}
# More bad rows than this means the wrong file (or a wrong layout), not a few damaged lines.
_MAX_MALFORMED_FRACTION = 0.5
_STSB_RANGE = (0.0, 5.0)

# The paper's Table 1 (GLUE dev, median of 5 seeds).
PUBLISHED = Published(
    "GLUE dev (the paper's Table 1)", "Sanh et al. 2019, Table 1 (published)", {
    "BERT-base": {"cola": 56.3, "mnli": 86.7, "mrpc": 88.6, "qnli": 91.8, "qqp": 89.6, "rte": 69.3, "sst2": 92.7,
                  "stsb": 89.0, "wnli": 53.5},
    "DistilBERT": {"cola": 51.3, "mnli": 82.2, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5, "rte": 59.9, "sst2": 91.3,
                   "stsb": 86.9, "wnli": 56.3},
    }, teacher="BERT-base", student="DistilBERT",
    score_note="A task score is the median over seeds of its GLUE metric (MRPC, QQP: mean of F1 and accuracy; "
               "STS-B: of Pearson and Spearman; MNLI: of matched and mismatched accuracy).",
    own_scores={"BERT-base": 79.5, "DistilBERT": 77.0})


@dataclass(frozen=True)
class GlueTask(SequenceClassificationTask):
    name: str  # config name, e.g. "sst2"
    title: str  # as printed in the paper's table, e.g. "SST-2"
    tsv_dir: str  # <data_dir>/<tsv_dir>/train.tsv
    hub_text_columns: tuple[str, ...]  # one column for single-sentence tasks, two for pairs
    tsv_text_columns: tuple[str | int, ...]  # header names, or column numbers for header-less CoLA
    tsv_label_column: str | int
    tsv_columns: int | None  # column count of a header-less file (None: the header says)
    tsv_labels: tuple[str, ...] | None  # label strings in class-id order; None: regression
    label_names: tuple[str, ...] | None  # human names in class-id order (the hub's ClassLabel names)
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)

    published: ClassVar[Published] = PUBLISHED

    @property
    def is_pair(self) -> bool:
        return len(self.hub_text_columns) == 2

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    def tsv_path(self, split: str, data_dir: str | Path) -> Path:
        return Path(data_dir).expanduser() / self.tsv_dir / f"{split}.tsv"

    def layout(self, settings) -> str:
        return f"expected the GLUE layout <data_dir>/{self.tsv_dir}/<split>.tsv"

    def local_files(self, settings, splits: Sequence[str]) -> dict[str, Path]:
        return {} if settings.data_dir is None else {split: self.tsv_path(split, settings.data_dir) for split in splits}

    def load(self, settings, splits: Sequence[str], label_names: Sequence[str] | None = None) -> TaskData:
        return TaskData({split: self.load_split(split, settings.data_dir) for split in splits}, self.label_names)

    def load_split(self, split: str, data_dir: str | None):
        """`data_dir` None reads the Hugging Face `glue` dataset; a directory reads `<data_dir>/<TASK>/<split>.tsv`."""
        if split not in self.splits:
            raise UsageError(f"GLUE {self.title} has no split {split!r}; its splits are {', '.join(self.splits)}")
        if data_dir is None:
            return _load_hub_split(self, split)
        return _load_tsv_split(self, self.tsv_path(split, data_dir))

    def describe_data(self, settings) -> str:
        return (f"Hugging Face `{HUB_DATASET}`" if settings.data_dir is None
                else f"GLUE-layout TSV files in `{settings.data_dir}`")


_BINARY = ("0", "1")
TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", "CoLA", "CoLA", ("sentence",), (3,), 1, 4, _BINARY, ("unacceptable", "acceptable"),
             ("matthews_correlation",)),
    GlueTask("sst2", "SST-2", "SST-2", ("sentence",), ("sentence",), "label", None, _BINARY,
             ("negative", "positive"), ("accuracy",)),
    GlueTask("mrpc", "MRPC", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", None,
             _BINARY, ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    GlueTask("stsb", "STS-B", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None,
             None, None, ("pearson", "spearman")),
    GlueTask("qqp", "QQP", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", None,
             _BINARY, ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    GlueTask("mnli", "MNLI", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label", None,
             ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
             ("accuracy",), ("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", None,
             ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("rte", "RTE", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", None,
             ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",)),
    GlueTask("wnli", "WNLI", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", None,
             _BINARY, ("not_entailment", "entailment"), ("accuracy",)),
)}


def _normalized_features(task: GlueTask):
    from datasets import Features, Value

    columns = {"sentence1": Value("string")}
    if task.is_pair:
        columns["sentence2"] = Value("string")
    columns["label"] = Value("float32" if task.is_regression else "int64")
    return Features(columns)


def _load_hub_split(task: GlueTask, split: str):
    import datasets

    try:
        dataset = datasets.load_dataset(HUB_DATASET, task.name, split=_HUB_SPLITS[split])
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load {HUB_DATASET} {task.name} {split} from the Hugging Face hub: {first_line} "
                         f"(or pass task.data_dir=<dir with the GLUE TSV files>)") from exc
    renames = dict(zip(task.hub_text_columns, ("sentence1", "sentence2"), strict=False))
    dataset = dataset.select_columns([*task.hub_text_columns, "label"]).rename_columns(renames)
    return dataset.cast(_normalized_features(task))


def _parse_label(task: GlueTask, text: str) -> int | float | None:
    """The label of one TSV row, or None when it is not a valid label for the task."""
    text = text.strip()
    if task.tsv_labels is not None:
        return task.tsv_labels.index(text) if text in task.tsv_labels else None
    try:
        score = float(text)
    except ValueError:
        return None
    low, high = _STSB_RANGE
    return score if low <= score <= high else None


def _is_utf8(row: list[str]) -> bool:
    try:
        "".join(row).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _rows(reader, path: Path):
    """The rows of a csv reader; what the csv module cannot split (a field over its size limit) is one line."""
    try:
        yield from reader
    except csv.Error as exc:
        raise UsageError(f"{path}:{reader.line_num}: not a GLUE TSV row ({exc})") from exc


def read_tsv(task: GlueTask, path: Path) -> tuple[dict[str, list], list[int]]:
    """The normalised columns of a GLUE TSV file and the line numbers of the malformed rows it skipped.

    A row is malformed when it has the wrong number of fields, an empty text, a label that is not one of the
    task's labels, or bytes that are not UTF-8; it is never given a label it does not have.
    """
    if not path.is_file():
        raise UsageError(f"GLUE {task.title} file not found: {path}")
    # Undecodable bytes become lone surrogates (surrogateescape), which mark their row malformed below.
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.tsv_columns is None:
            header = next(_rows(rows, path), None)
            if header is None:
                raise UsageError(f"GLUE {task.title} file is empty: {path}")
            wanted = [*task.tsv_text_columns, task.tsv_label_column]
            if missing := [name for name in wanted if name not in header]:
                raise UsageError(f"{path} is not a GLUE {task.title} file: its header lacks {missing}")
            positions = [header.index(name) for name in wanted]
            width, first_line = len(header), 2
        else:
            positions, width, first_line = [*task.tsv_text_columns, task.tsv_label_column], task.tsv_columns, 1
        names = ["sentence1", "sentence2"][:len(task.tsv_text_columns)]
        columns: dict[str, list] = {name: [] for name in [*names, "label"]}
        malformed = []
        for line_number, row in enumerate(_rows(rows, path), start=first_line):
            if not row:
                continue  # a blank line (e.g. at the end of the file) is not a row
            texts = [row[position] for position in positions[:-1]] if len(row) == width else []
            label = _parse_label(task, row[positions[-1]]) if texts else None
            if label is None or not all(text.strip() for text in texts) or not _is_utf8(row):
                malformed.append(line_number)
                continue
            for name, text in zip(names, texts, strict=True):
                columns[name].append(text)
            columns["label"].append(label)
    return columns, malformed


def _load_tsv_split(task: GlueTask, path: Path):
    from datasets import Dataset

    columns, malformed = read_tsv(task, path)
    good = len(columns["label"])
    if good == 0 or len(malformed) > _MAX_MALFORMED_FRACTION * (good + len(malformed)):
        where = f" (first at line {malformed[0]})" if malformed else ""
        raise UsageError(f"{path} does not look like a GLUE {task.title} file: {len(malformed)} of "
                         f"{good + len(malformed)} rows are malformed{where}")
    if malformed:
        log.warning("%s: skipped %d malformed row(s) (wrong field count, empty text, unknown label or not UTF-8), "
                    "first at line %d", path, len(malformed), malformed[0])
    return Dataset.from_dict(columns, features=_normalized_features(task))
