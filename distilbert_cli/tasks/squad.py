"""SQuAD v1.1 and v2.0 (extractive question answering): the hub datasets `rajpurkar/squad` and
`rajpurkar/squad_v2`, or local files in the official JSON layout; the reference recipe's windows over long
contexts, answer decoding over every window of a question, and the official EM/F1.

Every split comes back with the columns `id`, `context`, `question`, `answers` (the gold answer texts; none for
a v2 question without an answer) and `answer_starts` (their character offsets in the context). An answer whose
offset does not point at its text in the context is left out, and a question left without an answer is skipped:
both are counted in `TaskData.skipped` (the stage log and manifest).
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from distilbert_cli.errors import UsageError, first_line, invalid_entry
from distilbert_cli.tasks.base import QUESTION_ANSWERING, TABLE2, Published, Task, TaskData
from distilbert_cli.training.losses import soft_target_loss

log = logging.getLogger(__name__)

_HUB_SPLITS = {"train": "train", "dev": "validation"}
BAD_START = "answers whose text is not at their answer_start in the context"
NO_ANSWER_LEFT = "questions left without an answer"


@dataclass(frozen=True)
class SquadTask(Task):
    name: str
    title: str
    hub_dataset: str
    version: str  # "1.1" or "2.0", as in the official file names
    with_negative: bool  # v2: questions may have no answer

    dev_splits: ClassVar[tuple[str, ...]] = ("dev",)
    metrics: ClassVar[tuple[str, ...]] = ("exact_match", "f1")
    published: ClassVar[Published] = TABLE2
    head = QUESTION_ANSWERING
    target_columns = ("start_positions", "end_positions")

    @property
    def heading(self) -> str:
        return f"{self.title} (EM/F1)"

    # ---- data
    def local_files(self, settings, splits: Sequence[str]) -> dict[str, Path]:
        if settings.data_dir is None:
            return {}
        return {split: Path(settings.data_dir).expanduser() / f"{split}-v{self.version}.json" for split in splits}

    def layout(self, settings) -> str:
        return f"expected the official SQuAD files <data_dir>/train-v{self.version}.json and dev-v{self.version}.json"

    def load(self, settings, splits: Sequence[str], label_names: Sequence[str] | None = None) -> TaskData:
        from datasets import Dataset

        files = self.local_files(settings, splits)
        loaded, skipped = {}, {}
        for split in splits:
            rows = read_squad_json(files[split]) if files else self._hub_rows(split)
            rows, problems = check_answers(rows, self.with_negative)
            if problems:
                log.warning("%s %s: skipped %s", self.title, split,
                            ", ".join(f"{count} {what}" for what, count in problems.items()))
                skipped[split] = problems
            if not rows:
                raise UsageError(f"{self.title} {split} split is empty" + (f": {files[split]}" if files else ""))
            loaded[split] = Dataset.from_list(rows)
        return TaskData(loaded, skipped=skipped)

    def _hub_rows(self, split: str) -> list[dict]:
        import datasets

        try:
            dataset = datasets.load_dataset(self.hub_dataset, split=_HUB_SPLITS[split])
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot load {self.hub_dataset} {split} from the Hugging Face hub: {first_line} "
                             f"(or pass task.data_dir=<dir with {split}-v{self.version}.json>)") from exc
        return [{"id": row["id"], "context": row["context"], "question": row["question"],
                 "answers": row["answers"]["text"], "answer_starts": row["answers"]["answer_start"]}
                for row in dataset]

    def describe_data(self, settings) -> str:
        return (f"Hugging Face `{self.hub_dataset}`" if settings.data_dir is None
                else f"official SQuAD v{self.version} JSON files in `{settings.data_dir}`")

    def describe_settings(self, settings) -> str:
        qa = settings.qa
        null = (f"; no answer when the null score beats the best span by more than {qa.null_score_diff_threshold}"
                if self.with_negative else "")
        return (f"windows of {qa.max_seq_length} tokens every {qa.doc_stride} context tokens, "
                f"questions cut to {qa.max_query_length} tokens; answers from the {qa.n_best_size} best starts and "
                f"ends of every window, at most {qa.max_answer_length} tokens{null}")

    # ---- model
    def input_length(self, settings) -> tuple[int, str]:
        return settings.qa.max_seq_length, "task.qa.max_seq_length"

    def encode(self, dataset, tokenizer, settings, with_token_type_ids: bool, training: bool):
        qa = settings.qa
        if qa.max_query_length + tokenizer.num_special_tokens_to_add(pair=True) >= qa.max_seq_length:
            raise UsageError(f"task.qa.max_query_length={qa.max_query_length} leaves no room for the context in "
                             f"task.qa.max_seq_length={qa.max_seq_length}")

        def encode(batch, indices):
            return windows(tokenizer, batch, indices, qa, with_token_type_ids, training)

        return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                           desc="windows")

    def outputs(self, model_output) -> torch.Tensor:
        return torch.stack([model_output.start_logits, model_output.end_logits], dim=-1)

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The mean of the start and end cross-entropies (the models' own QA loss)."""
        outputs = outputs.float()
        return (torch.nn.functional.cross_entropy(outputs[..., 0], batch["start_positions"])
                + torch.nn.functional.cross_entropy(outputs[..., 1], batch["end_positions"])) / 2

    def soft_target_loss(self, student_outputs: torch.Tensor, teacher_outputs: torch.Tensor,
                         temperature: float) -> torch.Tensor:
        """(KL_start + KL_end) / 2 * T^2 over the positions of each window (the reference's SQuAD (D))."""
        return (soft_target_loss(student_outputs[..., 0], teacher_outputs[..., 0], temperature)
                + soft_target_loss(student_outputs[..., 1], teacher_outputs[..., 1], temperature)) / 2

    def decode(self, outputs: list[np.ndarray], features, examples, settings) -> list[str]:
        logits = [row for batch in outputs for row in batch]
        by_example = defaultdict(list)
        for feature, example in enumerate(features["example_index"]):
            by_example[example].append(feature)
        offsets = features["offset_mapping"]
        qa = settings.qa
        return [best_answer(context, [(logits[f], offsets[f]) for f in by_example[example]], qa.n_best_size,
                            qa.max_answer_length, qa.null_score_diff_threshold if self.with_negative else None)
                for example, context in enumerate(examples["context"])]

    def gold(self, examples) -> list:
        return list(examples["answers"])

    def example_ids(self, examples) -> list[str]:
        return list(examples["id"])

    def official_predictions(self, examples, predictions: Sequence) -> dict:
        return dict(zip(examples["id"], predictions, strict=True))

    # ---- scores
    def compute_metrics(self, predictions: Sequence, golds: Sequence) -> dict[str, float]:
        """Exact match and F1 in percent, each the best over a question's gold answers."""
        if len(predictions) != len(golds) or len(predictions) == 0:
            raise ValueError(f"{self.title}: {len(predictions)} predictions for {len(golds)} questions")
        scores = np.array([em_f1(str(prediction), tuple(gold)) for prediction, gold in zip(predictions, golds,
                                                                                           strict=True)])
        return {"exact_match": 100.0 * float(scores[:, 0].mean()), "f1": 100.0 * float(scores[:, 1].mean())}

    def table_cell(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(metrics[self.metric_key("dev", metric)] for metric in self.metrics)


TASKS: dict[str, SquadTask] = {task.name: task for task in (
    SquadTask("squad", "SQuAD v1.1", "rajpurkar/squad", "1.1", with_negative=False),
    SquadTask("squad_v2", "SQuAD v2.0", "rajpurkar/squad_v2", "2.0", with_negative=True),
)}


# ---- data ----------------------------------------------------------------------------------------------------

class _Answer(BaseModel):
    model_config = ConfigDict(strict=True)
    text: str
    answer_start: int


class _Question(BaseModel):
    model_config = ConfigDict(strict=True)
    id: str
    question: str
    answers: list[_Answer] | None = None  # v2: none (or an empty list) for a question without an answer
    is_impossible: bool = False

    @field_validator("id", mode="before")
    @classmethod
    def _number_as_text(cls, value):  # some files number their questions
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _answered(self):
        if self.answers is None and not self.is_impossible:
            raise ValueError("a question that is not is_impossible needs its 'answers'")
        return self


class _Paragraph(BaseModel):
    model_config = ConfigDict(strict=True)
    context: str
    qas: list[_Question]


class _Article(BaseModel):
    model_config = ConfigDict(strict=True)
    paragraphs: list[_Paragraph]


class _SquadFile(BaseModel):
    """The official SQuAD layout (other keys, such as titles and v2's plausible answers, are ignored)."""

    model_config = ConfigDict(strict=True)
    data: list[_Article]


def read_squad_json(path: Path) -> list[dict]:
    """The questions of an official SQuAD JSON file, one row each; a file not in that layout is a UsageError naming
    the first entry that is not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot read {path} as JSON: {first_line(exc)}") from exc
    try:
        squad = _SquadFile.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{path} is not in the SQuAD JSON layout: {invalid_entry(exc)}") from None
    return [{"id": qa.id, "context": paragraph.context, "question": qa.question,
             "answers": [answer.text for answer in qa.answers or ()] if not qa.is_impossible else [],
             "answer_starts": [answer.answer_start for answer in qa.answers or ()] if not qa.is_impossible else []}
            for article in squad.data for paragraph in article.paragraphs for qa in paragraph.qas]


def check_answers(rows: list[dict], with_negative: bool) -> tuple[list[dict], dict[str, int]]:
    """Rows without the answers whose offset does not match the context, and without the questions left with no
    answer (all of them in v1.1; in v2 those whose every answer was wrong); what was left out, counted."""
    kept, problems = [], Counter()
    for row in rows:
        context = row["context"]
        good = [(text, start) for text, start in zip(row["answers"], row["answer_starts"], strict=True)
                if start >= 0 and context[start:start + len(text)] == text and text.strip()]
        problems[BAD_START] += len(row["answers"]) - len(good)
        if not good and (row["answers"] or not with_negative):
            problems[NO_ANSWER_LEFT] += 1
            continue
        kept.append({**row, "answers": [text for text, _ in good], "answer_starts": [start for _, start in good]})
    return kept, {what: count for what, count in problems.items() if count}


# ---- features: windows over the context ------------------------------------------------------------------------

def windows(tokenizer, batch: Mapping[str, list], indices: Sequence[int], qa, with_token_type_ids: bool,
            training: bool) -> dict[str, list]:
    """Each question with its context cut into windows of `qa.max_seq_length` tokens, `qa.doc_stride` context
    tokens apart (the reference recipe: BERT's run_squad), the question cut to `qa.max_query_length` tokens.
    Training features get the answer's token span (the [CLS] position when the window does not hold it);
    evaluation features keep their example's index and the character span of each context token (None elsewhere).
    """
    questions = [question.lstrip() for question in batch["question"]]  # some v2 questions start with spaces
    for i, offsets in enumerate(tokenizer(questions, add_special_tokens=False,
                                          return_offsets_mapping=True)["offset_mapping"]):
        if len(offsets) > qa.max_query_length:
            questions[i] = questions[i][:offsets[qa.max_query_length - 1][1]]
    lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    by_length = defaultdict(list)  # one tokenizer call per question length: the overlap depends on it
    for i, length in enumerate(lengths):
        by_length[length].append(i)

    inputs = ["input_ids", "attention_mask", *(["token_type_ids"] if with_token_type_ids else [])]
    extra = ["start_positions", "end_positions"] if training else ["example_index", "offset_mapping"]
    out: dict[str, list] = {name: [] for name in [*inputs, *extra]}
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for length, members in sorted(by_length.items()):
        room = qa.max_seq_length - length - specials
        step = min(qa.doc_stride, room)
        encoded = tokenizer([questions[i] for i in members], [batch["context"][i] for i in members],
                            truncation="only_second", max_length=qa.max_seq_length, stride=room - step,
                            return_overflowing_tokens=True, return_offsets_mapping=True,
                            return_token_type_ids=with_token_type_ids)
        for feature, member in enumerate(encoded["overflow_to_sample_mapping"]):
            row = members[member]
            offsets = encoded["offset_mapping"][feature]
            in_context = [sequence == 1 for sequence in encoded.sequence_ids(feature)]
            for name in inputs:
                out[name].append(encoded[name][feature])
            if training:
                start, end = answer_span(offsets, in_context, batch["answers"][row], batch["answer_starts"][row],
                                         encoded["input_ids"][feature].index(tokenizer.cls_token_id)
                                         if tokenizer.cls_token_id in encoded["input_ids"][feature] else 0)
                out["start_positions"].append(start)
                out["end_positions"].append(end)
            else:
                out["example_index"].append(indices[row])
                out["offset_mapping"].append([list(span) if inside else None
                                              for span, inside in zip(offsets, in_context, strict=True)])
    return out


def answer_span(offsets: Sequence, in_context: Sequence[bool], answers: Sequence[str], starts: Sequence[int],
                cls_index: int) -> tuple[int, int]:
    """The token span of the first answer in one window, or (cls_index, cls_index) when the window does not hold
    all of it (or the question has no answer)."""
    if not answers:
        return cls_index, cls_index
    first_char, end_char = starts[0], starts[0] + len(answers[0])
    context = [i for i, inside in enumerate(in_context) if inside]
    if not context or offsets[context[0]][0] > first_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = max(i for i in context if offsets[i][0] <= first_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end


# ---- answers: the best span over every window of a question ---------------------------------------------------

def best_answer(context: str, windows: Sequence[tuple[np.ndarray, Sequence]], n_best: int, max_answer_length: int,
                null_threshold: float | None) -> str:
    """The answer text of one question from its windows' logits ([tokens, 2]: start, end; rows past the window's
    own length are padding) and character spans (None outside the context). Spans are scored start + end logit
    over the `n_best` best starts and ends of each window, at most `max_answer_length` tokens, starting at a
    token in the window where it has the most context on both sides (BERT's rule for overlapping windows).
    With `null_threshold` (SQuAD v2) the answer is empty when the lowest [CLS] score of the windows beats the best
    span's by more than the threshold."""
    home = most_context_windows([offsets for _, offsets in windows])
    best_score, best_span, null_score = -np.inf, None, np.inf
    for window, (logits, offsets) in enumerate(windows):
        starts, ends = logits[:len(offsets), 0], logits[:len(offsets), 1]
        null_score = min(null_score, float(starts[0] + ends[0]))
        for start in np.argsort(starts)[::-1][:n_best]:
            if offsets[start] is None or home[tuple(offsets[start])] != window:
                continue
            for end in np.argsort(ends)[::-1][:n_best]:
                if offsets[end] is None or not 0 <= end - start < max_answer_length:
                    continue
                if (score := float(starts[start] + ends[end])) > best_score:
                    best_score, best_span = score, (offsets[start][0], offsets[end][1])
    if best_span is None or null_threshold is not None and null_score - best_score > null_threshold:
        return ""
    return context[best_span[0]:best_span[1]]


def most_context_windows(windows: Sequence[Sequence]) -> dict[tuple[int, int], int]:
    """For each context token (by its character span), the window where it has the most context: the largest
    min(tokens left, tokens right) + 0.01 * window length, the first such window on ties."""
    home: dict[tuple[int, int], tuple[float, int]] = {}
    for window, offsets in enumerate(windows):
        context = [i for i, span in enumerate(offsets) if span is not None]
        if not context:
            continue
        first, last = context[0], context[-1]
        for i in context:
            score = min(i - first, last - i) + 0.01 * len(context)
            span = tuple(offsets[i])
            if span not in home or score > home[span][0]:
                home[span] = (score, window)
    return {span: window for span, (_, window) in home.items()}


# ---- the official EM/F1 ---------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; 1 when both are empty, 0 when one is (the v2.0 script)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1 << 17)  # the paired bootstrap scores the same questions hundreds of times
def em_f1(prediction: str, golds: tuple[str, ...]) -> tuple[float, float]:
    """EM and F1 of one question: the best over its gold answers; a question without one (v2) is answered by the
    empty string."""
    golds = tuple(gold for gold in golds if normalize_answer(gold)) or ("",)
    return max(exact_match(prediction, gold) for gold in golds), max(f1(prediction, gold) for gold in golds)
