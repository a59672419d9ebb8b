"""The bench-cpu workload: a task's dev sentences (or a labelled generated stand-in), tokenized once and cut
into padded batches before any timing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task

log = logging.getLogger(__name__)

PADDING = ("longest", "max_length")

# The fallback workload: as many pairs as STS-B dev, sentences of 4-18 common words (STS-B averages ~10).
GENERATED_PAIRS = 1500
GENERATED_WORDS = (
    "a man woman child dog cat people group city street car train house water food music game film book "
    "is are was were has have will can playing riding eating walking talking sitting running cutting "
    "the of and to in on with at for from by about after before over under near into this that some "
    "new old big small young red black white green two three many one other first last good great local "
    "said says told reports government police president market year day week time world country news"
).split()
GENERATED_LENGTHS = (4, 19)  # [low, high) words per sentence


@dataclass(frozen=True)
class Workload:
    description: str
    generated: bool
    texts: tuple[list[str], list[str] | None]  # first sentences, second sentences (None: single-sentence task)

    def __len__(self) -> int:
        return len(self.texts[0])



def generated_workload(seed: int, reason: str) -> Workload:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(GENERATED_WORDS, size=rng.integers(*GENERATED_LENGTHS))).capitalize() + "."

    first, second = zip(*[(sentence(), sentence()) for _ in range(GENERATED_PAIRS)], strict=True)
    low, high = GENERATED_LENGTHS
    return Workload(f"GENERATED: {GENERATED_PAIRS} random pairs of {low}-{high - 1} common English words, not "
                    f"real sentences ({reason})", True, (list(first), list(second)))


def load_workload(cfg: DictConfig) -> Workload:
    """The task's first dev split; with task.data_dir null and the hub unreachable, a labelled generated one."""
    task = get_task(cfg.task.names[0])
    split = task.dev_splits[0]
    try:
        dataset = task.load(cfg.task, (split,)).splits[split]
    except UsageError as exc:
        if task.local_files(cfg.task, (split,)):
            raise  # local files the user named must be right
        log.warning("%s; timing a generated workload instead", exc)
        return generated_workload(cfg.seed, f"{task.title} {split} unreachable on the hub")
    where = task.describe_data(cfg.task)
    pairs = "sentence2" in dataset.column_names
    second = dataset["sentence2"] if pairs else None
    return Workload(f"{task.title} {split}, {len(dataset)} {'pairs' if pairs else 'sentences'} ({where})",
                    False, (dataset["sentence1"], second))


def timed_indices(size: int, max_examples: int | None, seed: int) -> np.ndarray:
    """Every example, or a seeded random sample (dev sets are ordered by source; a prefix would be biased)."""
    if max_examples is None or max_examples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_examples, replace=False))


def encode(tokenizer, workload: Workload, indices: np.ndarray, input_names: Sequence[str],
           max_seq_length: int) -> list[dict[str, np.ndarray]]:
    """Each selected example tokenized once (truncated, unpadded), as int64 arrays."""
    first, second = workload.texts
    texts = ([first[i] for i in indices],) + (([second[i] for i in indices],) if second is not None else ())
    encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length, return_attention_mask=True,
                        return_token_type_ids="token_type_ids" in input_names)
    return [{name: np.asarray(encoded[name][row], dtype=np.int64) for name in input_names}
            for row in range(len(indices))]


def make_batches(examples: list[dict[str, np.ndarray]], batch_size: int, pad_to: int | None,
                 pad_token_id: int) -> list[dict[str, np.ndarray]]:
    """Consecutive examples padded to the batch's longest (`pad_to` None) or to `pad_to` tokens."""
    batches = []
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        width = pad_to or max(len(row["input_ids"]) for row in rows)
        batch = {}
        for name in rows[0]:
            fill = pad_token_id if name == "input_ids" else 0
            batch[name] = np.full((len(rows), width), fill, dtype=np.int64)
            for i, row in enumerate(rows):
                batch[name][i, :len(row[name])] = row[name]
        batches.append(batch)
    return batches


