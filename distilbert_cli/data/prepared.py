"""prepare-data's dataset: the tokenized corpus split into train and validation, saved with the train token
counts (for the masking's frequency smoothing) and the statistics of what was kept and dropped."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distilbert_cli.artifacts import PreparedData
from distilbert_cli.data.corpus import BadLines, read_corpus
from distilbert_cli.data.tokenize import (
    DROP_REASONS,
    EMPTY_DOCUMENT,
    KEEP,
    MOSTLY_UNKNOWN,
    TOO_SHORT,
    DocumentEncoder,
    tokenize_corpus,
    train_token_counts,
)
from distilbert_cli.errors import UsageError

if TYPE_CHECKING:
    from distilbert_cli.schema import HubData, LocalData, Prepare

log = logging.getLogger(__name__)

_HISTOGRAM_BINS = 16


def load_prepared(prepared: PreparedData):
    """The `(DatasetDict with train/validation, int64 train token counts)` of a prepare-data stage."""
    from datasets import load_from_disk

    return load_from_disk(str(prepared.dataset)), np.load(prepared.token_counts)


def _validation_count(validation_size: float | int, sequences: int) -> int:
    count = max(1, round(validation_size * sequences)) if isinstance(validation_size, float) else validation_size
    if count >= sequences:
        raise UsageError(f"prepare.validation_size={validation_size} leaves no training sequences: the corpus "
                         f"gave only {sequences} sequence(s)")
    return count



def usable_cpus() -> int:
    """The CPU cores this process may run on (a container or `taskset` can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1



def _split(kept: np.ndarray, validation_size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the train and validation sequences: a seeded draw, each split kept in corpus order."""
    size = _validation_count(validation_size, kept.size)
    validation = np.random.default_rng(seed).choice(kept, size=size, replace=False)
    validation.sort()
    return np.setdiff1d(kept, validation, assume_unique=True), validation


def _stats(data: LocalData | HubData, prepare: Prepare, documents: int, bad: BadLines, drop: np.ndarray,
           lengths: np.ndarray, splits: dict[str, np.ndarray], phases: dict[str, float], num_proc: int,
           encoder: DocumentEncoder) -> dict:
    tokens = {name: int(lengths[rows].sum()) for name, rows in splits.items()}
    kept = drop == KEEP
    edges = np.unique(np.linspace(0, prepare.max_seq_length, _HISTOGRAM_BINS + 1).round().astype(np.int64))
    rules = {EMPTY_DOCUMENT: "documents without any token",
             MOSTLY_UNKNOWN: f"sequences whose [UNK] tokens are >= {prepare.max_unk_fraction} of their length",
             TOO_SHORT: f"sequences shorter than prepare.min_seq_length={prepare.min_seq_length} tokens"}
    seconds = sum(phases.values())
    return {
        "source": data.source,
        "documents_read": documents,
        "bad_lines": {"policy": data.bad_lines, "count": bad.count,
                      "rule": "lines that are binary (a NUL byte) or not valid UTF-8, and records without text (bad "
                              "JSON, a missing or null field), "
                              + ("are skipped and counted" if data.bad_lines == "skip"
                                 else "stop the stage with an error")},
        "sequences_written": {**{name: int(rows.size) for name, rows in splits.items()}, "total": int(kept.sum())},
        "tokens_written": {**tokens, "total": sum(tokens.values())},
        "dropped": {name: {"count": int((drop == code).sum()), "tokens": int(lengths[drop == code].sum()),
                           "rule": rules[code]} for code, name in DROP_REASONS.items()},
        "length_histogram": {"bin_edges": edges.tolist(),
                             "counts": np.histogram(lengths[kept], bins=edges)[0].tolist()},
        "seconds": round(seconds, 3),
        "phase_seconds": {name: round(value, 3) for name, value in phases.items()},
        "tokens_per_second": round(sum(tokens.values()) / seconds, 1),
        "num_proc": num_proc,
        "word_memo": {"used": encoder.memoize, "note": encoder.memo_note},
    }


def build_prepared(data: LocalData | HubData, prepare: Prepare, seed: int, tokenizer, files: list[Path],
                   out: PreparedData, work_dir: Path, setup_seconds: float) -> dict:
    """Read (`data`), tokenize (`prepare`), split (`seed`) and save the corpus into `out` (intermediate files in
    `work_dir`); the statistics."""
    from datasets import DatasetDict

    phases = {"setup": setup_seconds}
    clock = time.perf_counter()
    bad = BadLines(data.bad_lines)
    corpus = read_corpus(data, prepare.batch_size, files, work_dir, bad)
    documents = len(corpus) - corpus.data.column("text").null_count
    if documents == 0:
        skipped = f" ({bad.count} bad line(s) skipped)" if bad.count else ""
        raise UsageError(f"empty corpus: no text in {', '.join(map(str, files)) or 'the hub datasets'}{skipped}")
    phases["read"], clock = time.perf_counter() - clock, time.perf_counter()
    log.info("read %d documents in %.2f s", documents, phases["read"])

    num_proc = prepare.num_proc or usable_cpus()
    encoder = DocumentEncoder(tokenizer)
    log.info("tokenizing %s", encoder.memo_note)
    tokenized = tokenize_corpus(corpus, tokenizer, encoder, prepare, work_dir, num_proc)
    drop = tokenized.data.column("drop").to_numpy()
    lengths = tokenized.data.column("length").to_numpy().astype(np.int64)
    kept = np.flatnonzero(drop == KEEP)
    if kept.size == 0:
        raise UsageError(f"no sequences left after the filters (prepare.min_seq_length={prepare.min_seq_length}, "
                         f"prepare.max_unk_fraction={prepare.max_unk_fraction}) from {documents} document(s)")
    phases["tokenize"], clock = time.perf_counter() - clock, time.perf_counter()

    train, validation = _split(kept, prepare.validation_size, seed)
    sequences = tokenized.remove_columns("drop")
    # Written by num_proc processes, shard by shard: each maps and reads only its shard of the tokenized rows, so
    # the pages it reads leave with it (read here, every page of the memory-mapped rows would stay resident).
    DatasetDict(train=sequences.select(train), validation=sequences.select(validation)).save_to_disk(
        str(out.dataset), num_proc=num_proc if num_proc > 1 else None)
    np.save(out.token_counts, train_token_counts(out.dataset, len(tokenizer)))
    phases["write"] = time.perf_counter() - clock
    return _stats(data, prepare, documents, bad, drop, lengths, {"train": train, "validation": validation}, phases,
                  num_proc, encoder)

