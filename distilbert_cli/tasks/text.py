"""IMDb and your own data: classification and regression of texts (or text pairs) read from local CSV, TSV,
JSON lines or parquet files, or from any hub dataset.

    task=imdb                      stanfordnlp/imdb (test accuracy, as in the paper's Table 2), or
                                   task.data_dir with train.* and test.* (text, label: neg/pos or 0/1)
    task=text_classification       task.data.train / validation / test: files, or split names of task.data.hub
    task=text_pair_classification  the same with a second text (task.data.text_pair_field)
    task=text_regression           a score per text (or per pair when task.data.text_pair_field is set)

Every split comes back as `sentence1` (`sentence2`), `label`. Class labels may be names or ids: integer labels are
class ids; names are mapped to ids by `task.data.label_names`, or else by the sorted names of the training split.
The classes are saved with the model (its config's id2label). Rows with an empty text or label are skipped and
counted; a missing field, a label that is not a class, or an empty split is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distilbert_cli.errors import UsageError, first_line
from distilbert_cli.tasks.base import TABLE2, Published, SequenceClassificationTask, TaskData

log = logging.getLogger(__name__)

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
EMPTY_ROWS = "rows with an empty text or label"
_MAX_CLASS_ID = 100_000  # integer labels above it are not class ids (a head that wide is a mistake)

OWN_DATA = Published(
    "Your own data", "none (no paper reports your data)", {}, teacher=None, student=None,
    score_note="A task score is the median over seeds of the mean of its metrics on validation (classification: "
               "accuracy and macro-F1; regression: Pearson and Spearman); a test split is scored beside it.")


@dataclass(frozen=True)
class Fields:
    """Which columns of a source hold the text, the second text (None: single texts) and the label."""

    text: str
    text_pair: str | None
    label: str


@dataclass(frozen=True)
class TextTask(SequenceClassificationTask):
    name: str
    title: str
    is_regression: bool
    is_pair: bool  # pairs always (text_pair_classification)
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...]
    published: Published
    hub_dataset: str | None = None  # a fixed dataset (IMDb); None: your own, from task.data
    label_names: tuple[str, ...] | None = None  # fixed classes (IMDb); None: from the data

    @property
    def own_data(self) -> bool:
        return self.hub_dataset is None

    def reads_pairs(self, settings) -> bool:
        return self.is_pair or self.own_data and self.is_regression and settings.data.text_pair_field is not None

    def eval_splits(self, settings) -> tuple[str, ...]:
        extra = ("test",) if self.own_data and settings.data.test is not None else ()
        return (*self.dev_splits, *extra)

    def fields(self, settings) -> Fields:
        if not self.own_data:
            return Fields("text", None, "label")
        data = settings.data
        if self.is_pair and data.text_pair_field is None:
            raise UsageError(f"task {self.name} reads text pairs: set task.data.text_pair_field")
        if not self.reads_pairs(settings) and data.text_pair_field is not None:
            raise UsageError(f"task {self.name} reads one text, but task.data.text_pair_field="
                             f"{data.text_pair_field!r} is set (pairs: task=text_pair_classification)")
        return Fields(data.text_field, data.text_pair_field if self.reads_pairs(settings) else None, data.label_field)

    # ---- where the data is
    def hub(self, settings) -> tuple[str, str | None] | None:
        """(dataset, config) on the hub, or None for local files."""
        if not self.own_data:
            return (self.hub_dataset, None) if settings.data_dir is None else None
        return None if settings.data.hub is None else (settings.data.hub, settings.data.hub_config)

    def split_source(self, settings, split: str) -> str:
        """The hub split name or the local file of `split`."""
        if not self.own_data:
            return split if settings.data_dir is None else str(find_file(Path(settings.data_dir).expanduser(), split))
        source = getattr(settings.data, split)
        if source is None:
            where = "split names of task.data.hub" if settings.data.hub else "local .csv/.tsv/.jsonl/.parquet files"
            raise UsageError(f"task {self.name} needs task.data.{split} ({where})")
        return str(source)

    def local_files(self, settings, splits: Sequence[str]) -> dict[str, Path]:
        if self.hub(settings) is not None:
            return {}
        return {split: Path(self.split_source(settings, split)).expanduser() for split in splits}

    def layout(self, settings) -> str:
        if self.own_data:
            return "task.data names the files"
        return f"expected <data_dir>/train and test files ({', '.join(SUFFIXES)}) with text and label"

    def describe_data(self, settings) -> str:
        hub = self.hub(settings)
        if hub is not None:
            return f"Hugging Face `{hub[0]}`" + (f" ({hub[1]})" if hub[1] else "")
        if not self.own_data:
            return f"local {self.title} files in `{settings.data_dir}`"
        splits = ("train", *self.eval_splits(settings))
        return "local files " + ", ".join(f"`{getattr(settings.data, split)}`" for split in splits)

    # ---- reading
    def load(self, settings, splits: Sequence[str], label_names: Sequence[str] | None = None) -> TaskData:
        fields = self.fields(settings)
        tables = {split: self.read(settings, split) for split in splits}
        if not self.is_regression:
            label_names = tuple(label_names or self.label_names or settings.data.label_names or ())
            if not label_names:
                train = tables.get("train") or self.read(settings, "train")
                label_names = classes_in(train[0], fields.label, train[2])
        loaded, skipped = {}, {}
        for split, (table, where, class_names) in tables.items():
            dataset, empty = normalise(table, where, fields, None if self.is_regression else label_names,
                                       class_names)
            if empty:
                log.warning("%s %s: skipped %d %s", self.title, split, empty, EMPTY_ROWS)
                skipped[split] = {EMPTY_ROWS: empty}
            loaded[split] = dataset
        return TaskData(loaded, None if self.is_regression else label_names, skipped)

    def read(self, settings, split: str) -> tuple[dict[str, list], str, tuple[str, ...] | None]:
        """A split's columns, where it came from (for messages) and the class names the source declares."""
        source, hub = self.split_source(settings, split), self.hub(settings)
        if hub is None:
            return read_table(Path(source).expanduser()), source, None
        import datasets

        try:
            dataset = datasets.load_dataset(hub[0], hub[1], split=source)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "task.data_dir=<dir with train and test files>" if not self.own_data else "local files in task.data"
            raise UsageError(f"cannot load {hub[0]} {source} from the Hugging Face hub: {first_line} "
                             f"(or pass {hint})") from exc
        label = dataset.features.get(self.fields(settings).label)
        names = tuple(label.names) if isinstance(label, datasets.ClassLabel) else None
        return dataset.to_dict(), f"{hub[0]} {source}", names


TASKS: dict[str, TextTask] = {task.name: task for task in (
    TextTask("imdb", "IMDb", is_regression=False, is_pair=False, metrics=("accuracy",), dev_splits=("test",),
             published=TABLE2, hub_dataset="stanfordnlp/imdb", label_names=("neg", "pos")),
    TextTask("text_classification", "text classification", is_regression=False, is_pair=False,
             metrics=("accuracy", "macro_f1"), dev_splits=("validation",), published=OWN_DATA),
    TextTask("text_pair_classification", "text-pair classification", is_regression=False, is_pair=True,
             metrics=("accuracy", "macro_f1"), dev_splits=("validation",), published=OWN_DATA),
    TextTask("text_regression", "text regression", is_regression=True, is_pair=False,
             metrics=("pearson", "spearman"), dev_splits=("validation",), published=OWN_DATA),
)}


def find_file(directory: Path, split: str) -> Path:
    """<directory>/<split>.<suffix> for the first suffix that exists (the .csv name when none does)."""
    candidates = [directory / f"{split}{suffix}" for suffix in SUFFIXES]
    return next((path for path in candidates if path.is_file()), candidates[0])


def read_table(path: Path) -> dict[str, list]:
    """The columns of a local CSV, TSV (no quoting), JSON lines or parquet file."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pa_parquet

    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"cannot read {path}: a data file must end in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    try:
        if suffix in (".jsonl", ".json"):
            return _json_lines(path)
        if suffix == ".parquet":
            table = pa_parquet.read_table(path)
        else:
            parse = pa_csv.ParseOptions(delimiter="\t", quote_char=False) if suffix == ".tsv" else None
            table = pa_csv.read_csv(path, parse_options=parse)
        return table.to_pydict()
    except UnicodeDecodeError as exc:  # text (a column name) that is not UTF-8
        raise UsageError(f"cannot read {path}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (pa.ArrowException, OSError) as exc:
        raise UsageError(f"cannot read {path}: {first_line(exc)}") from exc


def _json_lines(path: Path) -> dict[str, list]:
    """The columns of a JSON lines file, one object per line (pyarrow's JSON reader crashes the process on some
    malformed files, e.g. a blank line then `null`: pyarrow 26, found by tests/fuzz)."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise UsageError(f"cannot read {path}: line {number} is not JSON ({first_line(exc)})") from exc
            if not isinstance(row, dict):
                raise UsageError(f"cannot read {path}: line {number} is not a JSON object")
            rows.append(row)
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _missing(value) -> bool:
    return value is None or isinstance(value, str) and not value.strip() or isinstance(value, float) and value != value


def classes_in(columns: dict[str, list], label_field: str, declared: tuple[str, ...] | None) -> tuple[str, ...]:
    """The classes of a training split: those its source declares, "0".."n-1" for integer ids, or else the sorted
    label names."""
    if declared:
        return declared
    labels = [value for value in columns.get(label_field, []) if not _missing(value)]
    if labels and all(_is_id(value) for value in labels):
        if max(labels) >= _MAX_CLASS_ID:
            raise UsageError(f"label id {max(labels)} is too large for a class id (integer labels are class ids "
                             "0..n-1; name the classes with task.data.label_names)")
        return tuple(str(i) for i in range(max(labels) + 1))
    return tuple(sorted({str(value) for value in labels}))


def normalise(columns: dict[str, list], where: str, fields: Fields, label_names: Sequence[str] | None,
              declared: tuple[str, ...] | None):
    """The split as a Dataset of `sentence1` (`sentence2`) and `label` (class id, or float score for a regression:
    `label_names` None), and the number of rows skipped for an empty text or label."""
    from datasets import Dataset, Features, Value

    wanted = [fields.text, *([fields.text_pair] if fields.text_pair else []), fields.label]
    if missing := [name for name in wanted if name not in columns]:
        raise UsageError(f"{where} has no field {missing[0]!r} (its fields: {', '.join(map(repr, columns)) or 'none'});"
                         f" name the right one in task.data (text_field, text_pair_field, label_field)")
    if declared and label_names and tuple(declared) != tuple(label_names):
        raise UsageError(f"{where} declares the classes {list(declared)}, not {list(label_names)}")
    names = ["sentence1", "sentence2"][:len(wanted) - 1]
    out: dict[str, list] = {name: [] for name in [*names, "label"]}
    empty = 0
    for row, values in enumerate(zip(*(columns[name] for name in wanted), strict=True), start=1):
        if any(_missing(value) for value in values):
            empty += 1
            continue
        for name, value in zip(wanted, values, strict=True):
            if not isinstance(value, str | int | float):  # a list, an object, bytes: not a text or a label
                raise UsageError(f"{where}: field {name!r} of row {row} holds {str(value)[:40]!r}, not a text or a "
                                 "label")
        for name, text in zip(names, values, strict=False):
            out[name].append(str(text))
        out["label"].append(_label(values[-1], label_names, where, row))
    if not out["label"]:
        raise UsageError(f"{where} is empty" + (f" ({empty} {EMPTY_ROWS})" if empty else ""))
    features = Features({**{name: Value("string") for name in names},
                         "label": Value("float32" if label_names is None else "int64")})
    return Dataset.from_dict(out, features=features), empty


def _label(value, label_names: Sequence[str] | None, where: str, row: int) -> int | float:
    """A class id (a label name looked up in `label_names`, or an id) or a regression score."""
    if label_names is None:
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = float("nan")
        if score != score or score in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: label {value!r} (row {row}) is not a number, and the task is a regression")
        return score
    if _is_id(value):
        if not 0 <= value < len(label_names):
            raise UsageError(f"{where}: label id {value} (row {row}) is not one of the {len(label_names)} classes "
                             f"{list(label_names)}")
        return value
    if str(value) not in label_names:
        raise UsageError(f"{where}: label {value!r} (row {row}) is not one of the classes {list(label_names)} "
                         f"(set task.data.label_names to name every class)")
    return list(label_names).index(str(value))
