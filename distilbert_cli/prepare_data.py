"""`distil prepare-data`: tokenize a corpus into the training set that the distill stage reads.

    distil prepare-data data=local 'data.paths=[corpus/*.txt]' run_dir=runs/exp1
    distil prepare-data run_dir=runs/exp1      # English Wikipedia + BookCorpus from the hub (needs network)

Writes `<run_dir>/prepare-data/`:
- `dataset/`: a `datasets.DatasetDict` (`save_to_disk`) with splits `train` and `validation`, columns
  `input_ids` ([CLS] ... [SEP], at most `max_seq_length` ids) and `length`;
- `token_counts.npy`: int64 counts of every token id over the train split (special tokens included), for the
  masking stage's frequency smoothing;
- `tokenizer/`: the teacher's tokenizer, so later stages can check vocabulary compatibility;
- `stats.json`: documents read, sequences and tokens written, what was dropped and why, a length histogram,
  throughput and the bad-lines policy.

The corpus never sits in Python memory: local files are streamed into an Arrow file, hub datasets are Arrow
already, and tokenization runs as a batched, multi-process `datasets.map` over memory-mapped data. BERT-style
tokenizers are memoized word by word (`DocumentEncoder`), which gives the same ids several times faster.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli.errors import UsageError
from distilbert_cli.logs import is_main_process
from distilbert_cli.models import load_tokenizer
from distilbert_cli.rundir import open_stage, require_complete, write_json_atomic

log = logging.getLogger(__name__)

STAGE = "prepare-data"
DATASET_DIR = "dataset"
TOKEN_COUNTS = "token_counts.npy"
TOKENIZER_DIR = "tokenizer"
STATS = "stats.json"

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_SPLITS = ("line", "blank_line")
BAD_LINE_POLICIES = ("skip", "fail")

# Why a tokenized row is not written (the `drop` column of the intermediate dataset).
KEEP, EMPTY_DOCUMENT, MOSTLY_UNKNOWN, TOO_SHORT = 0, 1, 2, 3
DROP_REASONS = {EMPTY_DOCUMENT: "empty_documents", MOSTLY_UNKNOWN: "mostly_unknown", TOO_SHORT: "too_short"}

_SNIFF_BYTES = 8192
_PROGRESS_BYTES = 1 << 20
_WRITE_CHUNK_CHARS = 1 << 23  # text per Arrow record batch while streaming a corpus to disk
_HISTOGRAM_BINS = 16


def load_prepared(run_dir: str | Path):
    """The `(DatasetDict with train/validation, int64 train token counts)` of a complete prepare-data stage."""
    from datasets import load_from_disk

    stage_dir = require_complete(run_dir, STAGE)
    return load_from_disk(str(stage_dir / DATASET_DIR)), np.load(stage_dir / TOKEN_COUNTS)


# ---------------------------------------------------------------------------------------------- config


def _check_settings(cfg: DictConfig) -> None:
    """Impossible values fail here, before any file is read."""
    prepare, data = cfg.prepare, cfg.data
    if not isinstance(prepare.max_seq_length, int) or prepare.max_seq_length < 3:
        raise UsageError(f"prepare.max_seq_length must be an integer >= 3 ([CLS], a token, [SEP]), "
                         f"got {prepare.max_seq_length}")
    if not isinstance(prepare.min_seq_length, int) or not 0 <= prepare.min_seq_length <= prepare.max_seq_length:
        raise UsageError(f"prepare.min_seq_length must be an integer between 0 and prepare.max_seq_length "
                         f"({prepare.max_seq_length}), got {prepare.min_seq_length}")
    if not 0 < prepare.max_unk_fraction <= 1:
        raise UsageError(f"prepare.max_unk_fraction must be in (0, 1], got {prepare.max_unk_fraction}")
    size = prepare.validation_size
    if not ((isinstance(size, float) and 0 < size < 1) or (isinstance(size, int) and size >= 1)):
        raise UsageError(f"prepare.validation_size must be a fraction in (0, 1) or a number of sequences >= 1, "
                         f"got {size}")
    if prepare.num_proc is not None and (not isinstance(prepare.num_proc, int) or prepare.num_proc < 1):
        raise UsageError(f"prepare.num_proc must be null (one per CPU core) or an integer >= 1, got {prepare.num_proc}")
    if not isinstance(prepare.batch_size, int) or prepare.batch_size < 1:
        raise UsageError(f"prepare.batch_size must be an integer >= 1, got {prepare.batch_size}")
    if data.source not in ("local", "hub"):
        raise UsageError(f"data.source must be local or hub, got {data.source!r}")
    if data.bad_lines not in BAD_LINE_POLICIES:
        raise UsageError(f"data.bad_lines must be one of {', '.join(BAD_LINE_POLICIES)}, got {data.bad_lines!r}")
    if data.source == "local" and data.txt_split not in TXT_SPLITS:
        raise UsageError(f"data.txt_split must be one of {', '.join(TXT_SPLITS)}, got {data.txt_split!r}")
    if data.source == "hub" and not data.datasets:
        raise UsageError("data.datasets is empty: list the hub datasets to read (name, config, split, ...)")


def _check_tokenizer(tokenizer, cfg: DictConfig) -> None:
    name = cfg.teacher.name_or_path
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UsageError(f"tokenizer {name!r} has no [CLS]/[SEP] (cls_token/sep_token) tokens to frame sequences")
    if cfg.prepare.max_seq_length > tokenizer.model_max_length:
        raise UsageError(f"prepare.max_seq_length={cfg.prepare.max_seq_length} exceeds the model_max_length "
                         f"{tokenizer.model_max_length} of tokenizer {name!r}")


def _validation_count(validation_size: float | int, sequences: int) -> int:
    count = max(1, round(validation_size * sequences)) if isinstance(validation_size, float) else validation_size
    if count >= sequences:
        raise UsageError(f"prepare.validation_size={validation_size} leaves no training sequences: the corpus "
                         f"gave only {sequences} sequence(s)")
    return count


# ------------------------------------------------------------------------------------------ local files


def resolve_corpus_files(paths: Sequence[str]) -> list[Path]:
    """The files named by `data.paths`: files, directories (searched recursively) and globs, in a stable order."""
    if not paths:
        raise UsageError("data.paths is empty: give files, directories or globs of .txt, .jsonl or .parquet")
    kinds = ", ".join(LOCAL_SUFFIXES)
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise UsageError(f"unsupported corpus file {entry}: expected one of {kinds}")
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise UsageError(f"no {kinds} files in directory {entry}")
        elif any(char in str(entry) for char in "*?["):
            found = sorted(p for p in map(Path, glob.glob(str(path), recursive=True))
                           if p.is_file() and p.suffix in LOCAL_SUFFIXES)
            if not found:
                raise UsageError(f"no {kinds} files match {entry}")
        else:
            raise UsageError(f"corpus path not found: {entry}")
        files.extend(found)
    return list(dict.fromkeys(files))


def _check_corpus_file(path: Path, text_field: str) -> None:
    """Refuse files that cannot be a corpus (binary, unreadable Parquet, wrong field) before any heavy work."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"{path} is not a readable Parquet file: {str(exc).splitlines()[0]}") from exc
        if text_field not in schema.names:
            raise UsageError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}; "
                             f"set data.text_field)")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise UsageError(f"{path}: column {text_field!r} is {column_type}, not text")
        return
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\0" in head:
        raise UsageError(f"{path} is not a text file (it contains NUL bytes)")
    if path.suffix == ".jsonl":
        for raw in head.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue  # an unreadable line is the bad-lines policy's business
            if isinstance(record, dict) and text_field not in record:
                raise UsageError(f"{path}: records have no field {text_field!r} (fields: {', '.join(record)}; "
                                 f"set data.text_field)")
            return


@dataclass
class BadLines:
    """Lines that are not valid UTF-8 (or not a JSON record with text): skipped and counted, or fatal."""

    policy: str
    count: int = 0

    def handle(self, where: str, why: str, count: int = 1) -> None:
        if self.policy == "fail":
            raise UsageError(f"{where}: {why} (data.bad_lines=fail; use skip to drop such lines)")
        self.count += count


def _decoded_lines(path: Path, bad: BadLines, progress: tqdm) -> Iterator[tuple[int, str]]:
    unreported = 0  # bytes read since the progress bar last moved (moving it for every line would cost more)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            unreported += len(raw)
            if unreported >= _PROGRESS_BYTES:
                progress.update(unreported)
                unreported = 0
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.handle(f"{path}:{number}", "not valid UTF-8")
    progress.update(unreported)


def _txt_documents(path: Path, txt_split: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    if txt_split == "line":
        for _, line in _decoded_lines(path, bad, progress):
            if text := line.strip():
                yield text
        return
    paragraph: list[str] = []
    for _, line in _decoded_lines(path, bad, progress):
        if line.strip():
            paragraph.append(line.rstrip("\r\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl_documents(path: Path, text_field: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    for number, line in _decoded_lines(path, bad, progress):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.handle(f"{path}:{number}", "not valid JSON")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield text
        else:
            bad.handle(f"{path}:{number}", f"not a JSON object with a string field {text_field!r}")


def _parquet_documents(path: Path, text_field: str, bad: BadLines, progress: tqdm) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    bytes_per_row = path.stat().st_size / max(parquet.metadata.num_rows, 1)
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for offset, text in enumerate(batch.column(0).to_pylist()):
            if text is None:
                bad.handle(f"{path} row {row + offset + 1}", f"no {text_field!r} value")
            else:
                yield text
        row += batch.num_rows
        progress.update(round(bytes_per_row * batch.num_rows))


def _local_documents(files: list[Path], data: DictConfig, bad: BadLines) -> Iterator[str]:
    with tqdm(total=sum(path.stat().st_size for path in files), unit="B", unit_scale=True, desc="Reading",
              disable=not is_main_process()) as progress:
        for path in files:
            before = bad.count
            if path.suffix == ".txt":
                yield from _txt_documents(path, data.txt_split, bad, progress)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, data.text_field, bad, progress)
            else:
                yield from _parquet_documents(path, data.text_field, bad, progress)
            if bad.count > before:
                log.warning("%s: skipped %d bad line(s)", path, bad.count - before)


def _write_text_arrow(documents: Iterable[str], path: Path) -> None:
    """Stream documents into an Arrow file that `datasets` memory-maps, a record batch at a time."""
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[str] = []
        chars = 0
        for text in documents:
            batch.append(text)
            chars += len(text)
            if chars >= _WRITE_CHUNK_CHARS:
                writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))
                batch, chars = [], 0
        writer.write_batch(pa.record_batch([pa.array(batch, pa.string())], schema=schema))


# ----------------------------------------------------------------------------------------- hub datasets


def _hub_corpus(data: DictConfig, work_dir: Path, bad: BadLines, batch_size: int):
    """The configured hub datasets as one `text` column: memory-mapped Arrow, or streamed into an Arrow file."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    parts = []
    for source in data.datasets:
        label = f"{source.name} ({source.config}, split {source.split})"
        try:
            part = load_dataset(source.name, source.config, split=source.split, revision=source.revision,
                                streaming=data.streaming)
        except Exception as exc:  # offline, unknown name or config, legacy script...: this source cannot be read
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot load dataset {label}: {first_line}") from exc
        if part.column_names is not None and source.text_field not in part.column_names:
            raise UsageError(f"dataset {label} has no column {source.text_field!r} "
                             f"(columns: {', '.join(part.column_names)})")
        part = part.select_columns([source.text_field])
        parts.append(part.rename_column(source.text_field, "text") if source.text_field != "text" else part)
    corpus = concatenate_datasets(parts)
    if data.streaming:
        path = work_dir / "corpus.arrow"
        _write_text_arrow(_streamed_texts(corpus, bad, batch_size), path)
        return Dataset.from_file(str(path))
    if missing := corpus.data.column("text").null_count:
        bad.handle("hub datasets", "records without text", count=missing)
    return corpus


def _streamed_texts(corpus, bad: BadLines, batch_size: int) -> Iterator[str]:
    with tqdm(desc="Streaming", unit=" records", disable=not is_main_process()) as progress:
        for batch in corpus.iter(batch_size=batch_size):
            texts = batch["text"]
            if missing := texts.count(None):
                bad.handle("hub datasets (streamed)", "records without text", count=missing)
            yield from (text for text in texts if text is not None)
            progress.update(len(texts))


# ----------------------------------------------------------------------------------------- tokenization


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions starts[0] .. starts[0]+lengths[0]-1, starts[1] .. , ... as one flat int64 array."""
    lengths = lengths.astype(np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())), lengths


# What `pyarrow.compute.utf8_split_whitespace` splits on: exactly the characters of Python's `str.isspace`.
SPLIT_CHARACTERS = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


class _Slots(dict):
    """Word -> memo slot; -1 for a word not memoized yet (a plain dict lookup on hits, no Python call)."""

    def __missing__(self, word: str) -> int:
        return -1


class DocumentEncoder:
    """The teacher's fast tokenizer, memoized word by word where that provably changes nothing.

    `encoder(texts)` takes a batch of documents (an Arrow string array) and gives every document's token ids
    concatenated (int32) and the number of tokens of each.

    BERT's normalizer and pre-tokenizer never join text across whitespace, so a document's ids are the
    concatenation of the ids of its whitespace-separated words. Natural text repeats its words (Zipf), so
    splitting and deduplicating words in Arrow, looking each distinct word up once in a bounded memo and
    gathering ids with NumPy is several times faster than running the Rust pipeline (normalize with alignments,
    pre-tokenize, WordPiece, build an Encoding) on every occurrence. The memo is used only for BertNormalizer +
    BertPreTokenizer + WordPiece tokenizers, after probing that the tokenizer splits on each of
    SPLIT_CHARACTERS or deletes it (BERT deletes control characters such as \\v and \\x1c, so those are deleted
    before splitting). Any other tokenizer tokenizes whole documents.
    """

    MEMO_WORDS = 1 << 19  # per process; once full, new words are tokenized for their batch only
    WORDS_PER_ENCODING = 1024

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        # The Rust tokenizer itself, without the per-call Python of `tokenizer(...)` and with the settings that
        # call would apply: no truncation, no padding, the same treatment of special tokens written in the text.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
        self.memoize = False
        spaced_added_token = any(char.isspace() for token in tokenizer.added_tokens_decoder.values()
                                 for char in token.content)
        if (isinstance(self.backend.normalizer, normalizers.BertNormalizer)
                and isinstance(self.backend.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
                and isinstance(self.backend.model, models.WordPiece) and not spaced_added_token):
            split, joined = self.encode_whole(["a b", "ab"])
            probes = self.encode_whole([f"a{space}b" for space in SPLIT_CHARACTERS])
            self.memoize = all(ids in (split, joined) for ids in probes)
            deleted = [space for space, ids in zip(SPLIT_CHARACTERS, probes, strict=True) if ids == joined]
            # An RE2 character class for `pyarrow.compute.replace_substring_regex`.
            self.deleted_pattern = "[" + "".join(f"\\x{{{ord(char):x}}}" for char in deleted) + "]" if deleted else None
            self.slots = _Slots()  # word -> its slot in the arrays below, which grow as needed
            self.slot_start = np.zeros(0, dtype=np.int64)
            self.slot_length = np.zeros(0, dtype=np.int64)
            self.store = np.zeros(0, dtype=np.int32)  # the ids of every memoized word, back to back

    def encode_whole(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_words(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of each word, as if tokenized alone: groups of words go in pre-tokenized, which costs far less
        than one encoding per word, and each token's word index says where it came from."""
        ids, lengths = [], []
        groups = [words[start:start + self.WORDS_PER_ENCODING] for start in range(0, len(words),
                                                                                 self.WORDS_PER_ENCODING)]
        for group, encoding in zip(groups, self.backend.encode_batch(groups, is_pretokenized=True,
                                                                     add_special_tokens=False), strict=True):
            ids.append(np.array(encoding.ids, dtype=np.int32))
            lengths.append(np.bincount(np.array(encoding.word_ids, dtype=np.int64), minlength=len(group)))
        return np.concatenate(ids), np.concatenate(lengths)

    def __call__(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        if not self.memoize:
            return _flatten(self.encode_whole(texts.to_pylist()))
        if self.deleted_pattern is not None:
            texts = pc.replace_substring_regex(texts, self.deleted_pattern, "")
        words_of_docs = pc.utf8_split_whitespace(texts)
        words = pc.dictionary_encode(pc.list_flatten(words_of_docs))
        distinct = words.dictionary.to_pylist()
        distinct_slots = np.fromiter(map(self.slots.__getitem__, distinct), dtype=np.int64, count=len(distinct))
        new = np.flatnonzero(distinct_slots < 0)
        if new.size:
            self._memoize([distinct[index] for index in new.tolist()], distinct_slots, new)
        slots = distinct_slots[words.indices.to_numpy(zero_copy_only=False)]
        lengths = self.slot_length[slots]
        flat = self.store[ragged_positions(self.slot_start[slots], lengths)]
        tokens_before_word = np.concatenate([[0], np.cumsum(lengths)])
        word_bounds = words_of_docs.offsets.to_numpy() - words_of_docs.offsets[0].as_py()
        return flat, tokens_before_word[word_bounds[1:]] - tokens_before_word[word_bounds[:-1]]

    def _memoize(self, new_words: list[str], distinct_slots: np.ndarray, new: np.ndarray) -> None:
        """Tokenize words seen for the first time into slots after the memoized ones; they keep their slots (and
        stay known) while the memo has room, else only for this batch."""
        ids, lengths = self.encode_words(new_words)
        memoized = len(self.slots)
        stored = int(self.slot_start[memoized - 1] + self.slot_length[memoized - 1]) if memoized else 0
        if stored + len(ids) > len(self.store):
            self.store = np.resize(self.store, max(2 * len(self.store), stored + len(ids)))
        if memoized + len(new_words) > len(self.slot_start):
            size = max(2 * len(self.slot_start), memoized + len(new_words))
            self.slot_start, self.slot_length = np.resize(self.slot_start, size), np.resize(self.slot_length, size)
        extra = np.arange(memoized, memoized + len(new_words))
        self.store[stored:stored + len(ids)] = ids
        self.slot_start[extra] = stored + np.cumsum(lengths) - lengths
        self.slot_length[extra] = lengths
        distinct_slots[new] = extra
        self.slots.update(islice(zip(new_words, extra.tolist(), strict=True), max(0, self.MEMO_WORDS - memoized)))


def tokenize_documents(texts: pa.Array | pa.ChunkedArray, encoder: DocumentEncoder, cls_id: int, sep_id: int,
                       unk_id: int | None, max_seq_length: int, min_seq_length: int, max_unk_fraction: float,
                       pack: bool) -> pa.Table:
    """One batch of documents -> rows of (input_ids, length, drop), all in NumPy.

    A document's tokens are cut into chunks of at most `max_seq_length - 2`; a chunk that is mostly [UNK] is
    dropped; each remaining chunk becomes [CLS] chunk [SEP], or with `pack` the chunks are packed greedily in
    order, [CLS] a [SEP] b [SEP] ..., up to `max_seq_length`; sequences under `min_seq_length` are dropped.
    Dropped rows keep their length and reason but no ids, so the statistics can say what was lost.
    """
    flat, doc_lengths = encoder(texts.combine_chunks().drop_null() if isinstance(texts, pa.ChunkedArray)
                                else texts.drop_null())
    chunk_size = max_seq_length - 2
    chunks_per_doc = np.maximum(1, -(-doc_lengths // chunk_size))  # an empty document is one empty chunk
    chunk_doc = np.repeat(np.arange(len(doc_lengths)), chunks_per_doc)
    chunk_in_doc = np.arange(len(chunk_doc)) - np.repeat(np.cumsum(chunks_per_doc) - chunks_per_doc, chunks_per_doc)
    chunk_start = (np.cumsum(doc_lengths) - doc_lengths)[chunk_doc] + chunk_in_doc * chunk_size
    chunk_length = np.minimum(chunk_size, doc_lengths[chunk_doc] - chunk_in_doc * chunk_size)

    chunk_drop = np.where(chunk_length == 0, EMPTY_DOCUMENT, KEEP).astype(np.int8)
    if unk_id is not None:
        unk_before = np.concatenate([[0], np.cumsum(flat == unk_id)])
        unknown = unk_before[chunk_start + chunk_length] - unk_before[chunk_start]
        chunk_drop[(chunk_length > 0) & (unknown / (chunk_length + 2) >= max_unk_fraction)] = MOSTLY_UNKNOWN
    usable = chunk_drop == KEEP
    starts, lengths = chunk_start[usable], chunk_length[usable]

    if pack:
        group, sequence, used = np.empty(len(lengths), dtype=np.int64), 0, 1
        for index, length in enumerate(lengths.tolist()):
            if used + length + 1 > max_seq_length:
                sequence, used = sequence + 1, 1
            group[index] = sequence
            used += length + 1
    else:
        group = np.arange(len(lengths))
    sequences = int(group[-1]) + 1 if len(group) else 0
    sequence_length = 1 + np.bincount(group, weights=lengths + 1, minlength=sequences).astype(np.int64)
    kept = sequence_length >= min_seq_length
    ids_length = np.where(kept, sequence_length, 0)
    sequence_offset = np.cumsum(ids_length) - ids_length

    # Where each chunk goes: after [CLS] and the chunks before it in its sequence, each followed by [SEP].
    before_chunk = np.cumsum(lengths + 1) - (lengths + 1)
    first_of_group = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else group
    destination = sequence_offset[group] + 1 + before_chunk - before_chunk[first_of_group][group]
    written = kept[group]
    values = np.empty(int(ids_length.sum()), dtype=np.int32)
    values[sequence_offset[kept]] = cls_id
    values[ragged_positions(destination[written], lengths[written])] = flat[
        ragged_positions(starts[written], lengths[written])]
    values[destination[written] + lengths[written]] = sep_id

    dropped = ~usable
    row_ids_length = np.concatenate([ids_length, np.zeros(int(dropped.sum()), dtype=np.int64)])
    offsets = np.concatenate([[0], np.cumsum(row_ids_length)]).astype(np.int32)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "length": pa.array(np.concatenate([sequence_length, np.where(
            chunk_drop[dropped] == EMPTY_DOCUMENT, 0, chunk_length[dropped] + 2)]).astype(np.int32)),
        "drop": pa.array(np.concatenate([np.where(kept, KEEP, TOO_SHORT), chunk_drop[dropped]]).astype(np.int8)),
    })


def _row_features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "length": Value("int32"), "drop": Value("int8")})


def _train_token_counts(dataset_dir: Path, vocab_size: int) -> np.ndarray:
    """Counts of every id in the saved train split, read a record batch at a time (not memory-mapped, so the pass
    does not leave the whole split resident)."""
    import pyarrow.compute as pc
    from datasets import load_from_disk

    counts = np.zeros(vocab_size, dtype=np.int64)
    for cache_file in load_from_disk(str(dataset_dir))["train"].cache_files:
        with pa.OSFile(cache_file["filename"]) as source:
            for batch in pa.ipc.open_stream(source):
                counts += np.bincount(pc.list_flatten(batch.column("input_ids")).to_numpy(), minlength=vocab_size)
    return counts


# --------------------------------------------------------------------------------------------- the stage


def _paths(data: DictConfig) -> list[str]:
    return [data.paths] if isinstance(data.paths, str) else list(data.paths)


def _record_corpus(stage, data: DictConfig) -> None:
    if data.source == "hub":
        for source in data.datasets:
            revision = f"@{source.revision}" if source.revision else ""
            stage.use_reference(f"{source.name}/{source.config}:{source.split}{revision}", "corpus")
        return
    for entry in _paths(data):
        path = Path(entry).expanduser()
        if path.exists():
            stage.use_path(path, "corpus")
        else:
            stage.use_reference(entry, "corpus glob")


def _usable_cpus() -> int:
    """The CPU cores this process may run on (a container or `taskset` can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_corpus(cfg: DictConfig, files: list[Path], work_dir: Path, bad: BadLines):
    from datasets import Dataset

    if cfg.data.source == "hub":
        return _hub_corpus(cfg.data, work_dir, bad, cfg.prepare.batch_size)
    path = work_dir / "corpus.arrow"
    _write_text_arrow(_local_documents(files, cfg.data, bad), path)
    return Dataset.from_file(str(path))


def _tokenize(corpus, tokenizer, cfg: DictConfig, work_dir: Path, num_proc: int):
    """Rows of (input_ids, length, drop) for the whole corpus, written by `num_proc` processes into `work_dir`."""
    prepare = cfg.prepare
    return corpus.with_format("arrow").map(
        tokenize_documents, batched=True, batch_size=prepare.batch_size, input_columns="text",
        remove_columns=corpus.column_names, features=_row_features(),
        fn_kwargs={"encoder": DocumentEncoder(tokenizer), "cls_id": tokenizer.cls_token_id,
                   "sep_id": tokenizer.sep_token_id, "unk_id": tokenizer.unk_token_id,
                   "max_seq_length": prepare.max_seq_length, "min_seq_length": prepare.min_seq_length,
                   "max_unk_fraction": prepare.max_unk_fraction, "pack": prepare.pack},
        num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(work_dir / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint="prepare-data-tokenized",  # a fresh work dir: nothing to reuse, so skip hashing the tokenizer
        desc="Tokenizing",
    ).with_format(None)  # the Arrow format only feeds the batches; the saved splits read back as plain Python


def _split(kept: np.ndarray, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers of the train and validation sequences: a seeded draw, each split kept in corpus order."""
    size = _validation_count(cfg.prepare.validation_size, kept.size)
    validation = np.random.default_rng(cfg.seed).choice(kept, size=size, replace=False)
    validation.sort()
    return np.setdiff1d(kept, validation, assume_unique=True), validation


def _stats(cfg: DictConfig, documents: int, bad: BadLines, drop: np.ndarray, lengths: np.ndarray,
           splits: dict[str, np.ndarray], phases: dict[str, float], num_proc: int) -> dict:
    tokens = {name: int(lengths[rows].sum()) for name, rows in splits.items()}
    kept = drop == KEEP
    prepare = cfg.prepare
    edges = np.unique(np.linspace(0, prepare.max_seq_length, _HISTOGRAM_BINS + 1).round().astype(np.int64))
    rules = {EMPTY_DOCUMENT: "documents without any token",
             MOSTLY_UNKNOWN: f"sequences whose [UNK] tokens are >= {prepare.max_unk_fraction} of their length",
             TOO_SHORT: f"sequences shorter than prepare.min_seq_length={prepare.min_seq_length} tokens"}
    seconds = sum(phases.values())
    return {
        "source": cfg.data.source,
        "documents_read": documents,
        "bad_lines": {"policy": cfg.data.bad_lines, "count": bad.count,
                      "rule": "lines that are not valid UTF-8, and records without text (bad JSON, a missing or "
                              "null field), " + ("are skipped and counted" if cfg.data.bad_lines == "skip"
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
    }


def _prepare(cfg: DictConfig, tokenizer, files: list[Path], out_dir: Path, work_dir: Path,
             setup_seconds: float) -> dict:
    from datasets import DatasetDict

    phases = {"setup": setup_seconds}
    clock = time.perf_counter()
    bad = BadLines(cfg.data.bad_lines)
    corpus = _read_corpus(cfg, files, work_dir, bad)
    documents = len(corpus) - corpus.data.column("text").null_count
    if documents == 0:
        skipped = f" ({bad.count} bad line(s) skipped)" if bad.count else ""
        raise UsageError(f"empty corpus: no text in {', '.join(map(str, files)) or 'the hub datasets'}{skipped}")
    phases["read"], clock = time.perf_counter() - clock, time.perf_counter()
    log.info("read %d documents in %.2f s", documents, phases["read"])

    num_proc = cfg.prepare.num_proc or _usable_cpus()
    tokenized = _tokenize(corpus, tokenizer, cfg, work_dir, num_proc)
    drop = tokenized.data.column("drop").to_numpy()
    lengths = tokenized.data.column("length").to_numpy().astype(np.int64)
    kept = np.flatnonzero(drop == KEEP)
    if kept.size == 0:
        raise UsageError(f"no sequences left after the filters (prepare.min_seq_length={cfg.prepare.min_seq_length}, "
                         f"prepare.max_unk_fraction={cfg.prepare.max_unk_fraction}) from {documents} document(s)")
    phases["tokenize"], clock = time.perf_counter() - clock, time.perf_counter()

    train, validation = _split(kept, cfg)
    sequences = tokenized.remove_columns("drop")
    DatasetDict(train=sequences.select(train), validation=sequences.select(validation)).save_to_disk(
        str(out_dir / DATASET_DIR))
    np.save(out_dir / TOKEN_COUNTS, _train_token_counts(out_dir / DATASET_DIR, len(tokenizer)))
    phases["write"] = time.perf_counter() - clock
    return _stats(cfg, documents, bad, drop, lengths, {"train": train, "validation": validation}, phases, num_proc)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    """Tokenize the configured corpus into `<run_dir>/prepare-data/`; returns that directory."""
    started = time.perf_counter()
    _check_settings(cfg)
    files = resolve_corpus_files(_paths(cfg.data)) if cfg.data.source == "local" else []
    for path in files:
        _check_corpus_file(path, cfg.data.text_field)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path, cfg.teacher.trust_remote_code, role="teacher tokenizer")
    _check_tokenizer(tokenizer, cfg)

    with open_stage(cfg, STAGE, overrides) as stage:
        stage.use_model(cfg.teacher.name_or_path, "tokenizer")
        _record_corpus(stage, cfg.data)
        stage.update(tokenizer=cfg.teacher.name_or_path, vocab_size=len(tokenizer),
                     max_seq_length=cfg.prepare.max_seq_length)
        work_dir = stage.path / ".work"
        work_dir.mkdir()
        try:
            stats = _prepare(cfg, tokenizer, files, stage.path, work_dir, time.perf_counter() - started)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        tokenizer.save_pretrained(stage.path / TOKENIZER_DIR)
        write_json_atomic(stage.path / STATS, stats)
        stage.update(sequences=stats["sequences_written"], tokens=stats["tokens_written"])
        log.info("wrote %d train + %d validation sequences (%d tokens) from %d documents in %.1f s "
                 "(%.0f tokens/s); dropped: %s", stats["sequences_written"]["train"],
                 stats["sequences_written"]["validation"], stats["tokens_written"]["total"],
                 stats["documents_read"], stats["seconds"], stats["tokens_per_second"],
                 ", ".join(f"{name} {d['count']}" for name, d in stats["dropped"].items()))
    return stage.path
