"""The bench-cpu workload: a task's dev sentences (or a labelled generated stand-in), encoded once by the task's
own `encode` (so `task.max_seq_length`, `task.truncation` and `task.head_tokens` mean here what they mean in
finetune and export) and cut into padded batches before any timing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from distilbert_cli.deploy.onnx_models import pad_batch
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import Task

if TYPE_CHECKING:
    from distilbert_cli.schema import BenchCpu

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
    examples: object  # a datasets.Dataset in the task's columns: sentence1 (sentence2 for pairs), label

    def __len__(self) -> int:
        return len(self.examples)



def generated_workload(seed: int, reason: str) -> Workload:
    rng = np.random.default_rng(seed)

    def sentence() -> str:
        return " ".join(rng.choice(GENERATED_WORDS, size=rng.integers(*GENERATED_LENGTHS))).capitalize() + "."

    from datasets import Dataset

    first, second = zip(*[(sentence(), sentence()) for _ in range(GENERATED_PAIRS)], strict=True)
    low, high = GENERATED_LENGTHS
    examples = Dataset.from_dict({"sentence1": list(first), "sentence2": list(second),
                                  "label": [0.0] * GENERATED_PAIRS})
    return Workload(f"GENERATED: {GENERATED_PAIRS} random pairs of {low}-{high - 1} common English words, not "
                    f"real sentences ({reason})", True, examples)


def load_workload(cfg: BenchCpu) -> Workload:
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
    return Workload(f"{task.title} {split}, {len(dataset)} {'pairs' if pairs else 'sentences'} ({where})",
                    False, dataset)


def timed_indices(size: int, max_examples: int | None, seed: int) -> np.ndarray:
    """Every example, or a seeded random sample (dev sets are ordered by source; a prefix would be biased)."""
    if max_examples is None or max_examples >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=max_examples, replace=False))


def encode(task: Task, tokenizer, workload: Workload, indices: np.ndarray, input_names: Sequence[str],
           settings) -> list[dict[str, np.ndarray]]:
    """Each selected example encoded once by the task (truncated as the task settings say, unpadded), as int64
    arrays of the model's inputs."""
    features = task.encode(workload.examples.select(indices), tokenizer, settings, "token_type_ids" in input_names,
                           training=False)
    return [{name: np.asarray(row[name], dtype=np.int64) for name in input_names}
            for row in features.select_columns(list(input_names)).to_list()]


def make_batches(examples: list[dict[str, np.ndarray]], batch_size: int, pad_to: int | None,
                 pad_token_id: int) -> list[dict[str, np.ndarray]]:
    """Consecutive examples padded to the batch's longest (`pad_to` None) or to `pad_to` tokens."""
    return [pad_batch(examples[start:start + batch_size], list(examples[0]), pad_token_id, pad_to)
            for start in range(0, len(examples), batch_size)]
