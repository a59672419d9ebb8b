"""Tokenizing a corpus into framed training sequences: a word-memoized fast tokenizer (`DocumentEncoder`) and
the vectorised chunking, framing, packing and filtering of documents (`tokenize_documents`), run as a batched,
multi-process `datasets.map` over memory-mapped Arrow data."""

from __future__ import annotations

import json
import re
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from distilbert_cli.schema import Prepare

# Why a tokenized row is not written (the `drop` column of the intermediate dataset).
KEEP, EMPTY_DOCUMENT, MOSTLY_UNKNOWN, TOO_SHORT = 0, 1, 2, 3
DROP_REASONS = {EMPTY_DOCUMENT: "empty_documents", MOSTLY_UNKNOWN: "mostly_unknown", TOO_SHORT: "too_short"}


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions starts[0] .. starts[0]+lengths[0]-1, starts[1] .. , ... as one flat int64 array."""
    lengths = lengths.astype(np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def _character_class(chars: list[str]) -> str:
    """An RE2 character class of `chars`."""
    return "[" + "".join(f"\\x{{{ord(char):x}}}" for char in chars) + "]"


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


# Tokenizer parts (their `type` in tokenizer.json) that work within a whitespace-separated word, so that a
# document's ids can be the concatenation of its words' ids. Replace, Metaspace and Sequence are checked further.
_WORD_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Precompiled",
                     "Strip", "Replace", "Sequence"}
_WORD_PRE_TOKENIZERS = {"BertPreTokenizer", "WhitespaceSplit", "Whitespace", "Punctuation", "Digits",
                        "UnicodeScripts", "Metaspace", "Sequence"}
_WORD_MODELS = {"WordPiece", "Unigram", "BPE", "WordLevel"}
_KNOWN_CROSS_WORD = {"ByteLevel": "byte-level BPE attaches each space to the word after it"}
# A regex of whitespace only (such as " {2,}" or "\\s{2,}|[\\n\\r\\t]"): a Replace of whitespace by whitespace.
_WHITESPACE_REGEX = re.compile(r"(?:\\[srnt]|\s|[][|+*?()]|\{\d*,?\d*\})+")


def _cross_word_part(spec: dict | None, allowed: set[str], kind: str) -> str | None:
    """The first part of a normalizer or pre-tokenizer spec that could make a word's ids depend on the text around
    it, as a short description, or None when every part works within a word."""
    if spec is None:
        return None
    if spec["type"] not in allowed:
        return _KNOWN_CROSS_WORD.get(spec["type"], f"the {kind} {spec['type']} is not known to work word by word")
    if spec["type"] == "Sequence":
        parts = spec.get("normalizers") or spec.get("pretokenizers") or []
        return next(filter(None, (_cross_word_part(part, allowed, kind) for part in parts)), None)
    if spec["type"] == "Replace":
        pattern, content = next(iter(spec["pattern"].values())), spec["content"]
        in_word = "String" in spec["pattern"] and not any(c.isspace() for c in pattern + content)
        spaces = _WHITESPACE_REGEX.fullmatch(pattern) is not None and content.isspace()
        return None if in_word or spaces else f"the {kind} Replace({pattern!r}, {content!r}) may work across words"
    if spec["type"] == "Metaspace" and (spec.get("prepend_scheme", "always") != "always"
                                        or not spec.get("split", True)):
        return f"the {kind} Metaspace marks only the first word"
    return None


def _probe_texts(tokenizer) -> list[str]:
    """Short texts on which word-by-word and whole-document ids must agree: every pair of whitespace characters
    between two words, whitespace at both ends, and mixed text with the tokenizer's special tokens."""
    chars = [*SPLIT_CHARACTERS, "x"]
    specials = " ".join(f"a{token}b {token}" for token in tokenizer.all_special_tokens)
    return ([f"a{first}{second}b" for first in chars for second in chars] + [f"{c}a b{c}" for c in chars]
            + ["Hello, World! It's 3.14 km\u00b2 \u2014 na\u00efve caf\u00e9 \u6771\u4eac \U0001f600 e\u0301 \ufb01 "
               "\u00df \u0130 (x) [y] x-y", specials])


class DocumentEncoder:
    """The teacher's fast tokenizer, memoized word by word where that provably changes nothing.

    `encoder(texts)` takes a batch of documents (an Arrow string array) and gives every document's token ids
    concatenated (int32) and the number of tokens of each: the tokenizer's ids of the document stripped of
    leading and trailing whitespace (as the line reader strips lines; a SentencePiece tokenizer would otherwise
    give a trailing space a token of its own).

    When the tokenizer's normalizer, pre-tokenizer and model all work within whitespace-separated words
    (WordPiece as in BERT, SentencePiece-style Unigram with a Metaspace that marks every word, as in XLM-R), a
    document's ids are the concatenation of the ids of its words. Natural text repeats its words (Zipf), so
    splitting and deduplicating words in Arrow, looking each distinct word up once in a bounded memo and
    gathering ids with NumPy is several times faster than running the Rust pipeline (normalize with alignments,
    pre-tokenize, the model, build an Encoding) on every occurrence. A start-up probe finds what the tokenizer does
    with each of SPLIT_CHARACTERS between two words (splits there, deletes it as BERT deletes \\v and \\x1c, or
    keeps it inside the word), and the memo is used only if it then gives the tokenizer's own ids on every probe
    text (`_probe_texts`). Documents with an added token (such as <mask>) written in them, and every document of
    any other tokenizer (byte-level BPE, which attaches each space to the next word), are tokenized whole.
    `memo_note` says which, and why.
    """

    MEMO_WORDS = 1 << 19  # per process; once full, new words are tokenized for their batch only
    WORDS_PER_ENCODING = 1024

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        # The Rust tokenizer itself, without the per-call Python of `tokenizer(...)` and with the settings that
        # call would apply: no truncation, no padding, the same treatment of special tokens written in the text.
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.split_special_tokens = bool(tokenizer.split_special_tokens)
        self.backend.encode_special_tokens = self.split_special_tokens
        self.memoize = False
        spec = json.loads(self.backend.to_str())
        blocker = (_cross_word_part(spec["normalizer"], _WORD_NORMALIZERS, "normalizer")
                   or _cross_word_part(spec["pre_tokenizer"], _WORD_PRE_TOKENIZERS, "pre-tokenizer"))
        if spec["model"]["type"] not in _WORD_MODELS:
            blocker = f"the model {spec['model']['type']} is not known to work word by word"
        if spec["pre_tokenizer"] is None:
            blocker = "there is no pre-tokenizer (the model sees whole documents)"
        if any(char.isspace() for token in tokenizer.added_tokens_decoder.values() for char in token.content):
            blocker = "an added token contains whitespace"
        blocker = blocker or self._probe(tokenizer)
        self.memoize = blocker is None
        self.memo_note = ("word by word: the start-up probe gave the tokenizer's own ids" if self.memoize
                          else f"whole documents: {blocker}")

    def _probe(self, tokenizer) -> str | None:
        """Set up the memo from what the tokenizer does with each whitespace character; None if the memo then
        encodes every probe text exactly as the tokenizer does, else what differs."""
        import pyarrow.compute as pc

        split, joined = self.encode_whole(["a b", "ab"])
        if split == joined:
            return "the probe cannot tell a split from a join with this vocabulary"
        probes = self.encode_whole([f"a{space}b" for space in SPLIT_CHARACTERS])
        deleted = [space for space, ids in zip(SPLIT_CHARACTERS, probes, strict=True) if ids == joined]
        splitting = [space for space, ids in zip(SPLIT_CHARACTERS, probes, strict=True) if ids == split]
        # RE2 character classes for `pyarrow.compute`: deleted before splitting; split on only where the tokenizer
        # splits (Arrow's own whitespace split when that is everywhere it does not delete).
        self.deleted_pattern = _character_class(deleted) if deleted else None
        self.split_pattern = (None if len(deleted) + len(splitting) == len(SPLIT_CHARACTERS)
                              else _character_class(splitting) + "+")
        added = [token.content for token in tokenizer.added_tokens_decoder.values()]
        self.added_pattern = "(?i)" + "|".join(map(re.escape, added)) if added else None
        self._empty_memo()
        self.memoize = True
        texts = pa.array(_probe_texts(tokenizer))
        expected = self.encode_whole(pc.utf8_trim_whitespace(texts).to_pylist())
        flat, lengths = self(texts)
        self.memoize = False
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for text, ids, start, stop in zip(texts.to_pylist(), expected, bounds[:-1], bounds[1:], strict=True):
            if flat[start:stop].tolist() != ids:
                return f"the probe text {text!r} tokenizes differently word by word"
        self._empty_memo()  # the probe's words are not worth their slots
        return None

    def _empty_memo(self) -> None:
        self.slots = _Slots()  # word -> its slot in the arrays below, which grow as needed
        self.slot_start = np.zeros(0, dtype=np.int64)
        self.slot_length = np.zeros(0, dtype=np.int64)
        self.store = np.zeros(0, dtype=np.int32)  # the ids of every memoized word, back to back

    def __setstate__(self, state: dict) -> None:
        # A pickled Rust tokenizer comes back with encode_special_tokens off (tokenizers 0.23): the copy each
        # tokenizing process gets would read "[SEP]" written in the text as the special token.
        self.__dict__.update(state)
        self.backend.encode_special_tokens = self.split_special_tokens

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

        texts = pc.utf8_trim_whitespace(texts)
        if not self.memoize:
            return _flatten(self.encode_whole(texts.to_pylist()))
        whole = (pc.match_substring_regex(texts, self.added_pattern).to_numpy(zero_copy_only=False)
                 if self.added_pattern is not None else np.zeros(len(texts), dtype=bool))
        if not whole.any():
            return self._encode_memoized(texts)
        # Documents with an added token written in them take the whole-document path: around an added token a
        # SentencePiece tokenizer keeps the space before it as a token of its own.
        memo_flat, memo_lengths = self._encode_memoized(texts.filter(pa.array(~whole)))
        whole_flat, whole_lengths = _flatten(self.encode_whole(texts.filter(pa.array(whole)).to_pylist()))
        lengths = np.empty(len(texts), dtype=np.int64)
        lengths[~whole], lengths[whole] = memo_lengths, whole_lengths
        starts = np.cumsum(lengths) - lengths
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        flat[ragged_positions(starts[~whole], memo_lengths)] = memo_flat
        flat[ragged_positions(starts[whole], whole_lengths)] = whole_flat
        return flat, lengths

    def _encode_memoized(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        import pyarrow.compute as pc

        if self.deleted_pattern is not None:
            texts = pc.replace_substring_regex(texts, self.deleted_pattern, "")
        words_of_docs = (pc.utf8_split_whitespace(texts) if self.split_pattern is None
                         else pc.split_pattern_regex(texts, self.split_pattern))
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



def train_token_counts(dataset_dir: Path, vocab_size: int) -> np.ndarray:
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



def tokenize_corpus(corpus, tokenizer, encoder: DocumentEncoder, prepare: Prepare, work_dir: Path, num_proc: int):
    """Rows of (input_ids, length, drop) for the whole corpus, written by `num_proc` processes into `work_dir`."""
    return corpus.with_format("arrow").map(
        tokenize_documents, batched=True, batch_size=prepare.batch_size, input_columns="text",
        remove_columns=corpus.column_names, features=_row_features(),
        fn_kwargs={"encoder": encoder, "cls_id": tokenizer.cls_token_id,
                   "sep_id": tokenizer.sep_token_id, "unk_id": tokenizer.unk_token_id,
                   "max_seq_length": prepare.max_seq_length, "min_seq_length": prepare.min_seq_length,
                   "max_unk_fraction": prepare.max_unk_fraction, "pack": prepare.pack},
        num_proc=num_proc if num_proc > 1 else None, cache_file_name=str(work_dir / "tokenized.arrow"),
        load_from_cache_file=False,
        new_fingerprint="prepare-data-tokenized",  # a fresh work dir: nothing to reuse, so skip hashing the tokenizer
        desc="Tokenizing",
    ).with_format(None)  # the Arrow format only feeds the batches; the saved splits read back as plain Python

