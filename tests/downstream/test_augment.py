"""Augmentation for task distillation: deterministic given the seed; the replacement probability and the copy count
as configured (statistical bounds); the label and special tokens never changed; a word of several pieces replaced
as a whole; Tang et al.'s masking and n-grams."""

from __future__ import annotations

import numpy as np
import pytest
from builders import build_tiny_bert
from omegaconf import OmegaConf

from distilbert_cli.downstream.augment import augmentor, example_words, splice, whole_words
from distilbert_cli.models.loading import load_masked_lm, load_tokenizer

# Words of the tiny vocabulary that are not stop words: every one is replaceable.
CONTENT = "history science computer student teacher model movie story music river language film team game book"
TINYBERT = {"method": "tinybert", "copies": 20, "replace_probability": 0.4, "candidates": 15, "masked_lm": "teacher",
            "batch_size": 16}
TANG = {"method": "tang", "copies": 20, "mask_probability": 0.1, "ngram_probability": 0.25, "max_ngram": 5}


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    path = build_tiny_bert(tmp_path_factory.mktemp("mlm"), num_layers=1)
    return load_masked_lm(str(path))[0], load_tokenizer(str(path))


def tinybert(masked_lm, seed: int = 56, **settings):
    model, tokenizer = masked_lm
    return augmentor(OmegaConf.create({**TINYBERT, **settings}), tokenizer, seed, 64, model)


def examples(*texts: str, pairs: tuple[str, ...] | None = None) -> dict:
    rows = {"sentence1": list(texts), "label": list(range(len(texts)))}
    return rows if pairs is None else {**rows, "sentence2": list(pairs)}


def test_the_same_seed_gives_the_same_transfer_set_and_another_seed_another(masked_lm):
    data = examples(CONTENT, "the movie was a great story", pairs=("a good film", "the river"))
    first, again = tinybert(masked_lm).augment(data), tinybert(masked_lm).augment(data)
    assert first.rows == again.rows
    other = tinybert(masked_lm, seed=57).augment(data)
    assert other.rows["sentence1"] != first.rows["sentence1"]
    # Each example draws from its own generator (seed, its index): one more example changes no other's copies.
    more = tinybert(masked_lm).augment(examples(CONTENT, "the movie was a great story", "a new book",
                                                pairs=("a good film", "the river", "music")))
    kept = [i for i, origin in enumerate(more.rows["origin"]) if origin < 2]
    assert [more.rows["sentence1"][i] for i in kept] == first.rows["sentence1"]
    assert [more.rows["sentence2"][i] for i in kept] == first.rows["sentence2"]


def test_each_word_is_replaced_with_the_configured_probability(masked_lm):
    augment, (_, tokenizer) = tinybert(masked_lm), masked_lm
    text = " ".join([CONTENT] * 4)  # 60 words
    (_, words), rng = example_words(tokenizer, [[text]], 512), np.random.default_rng(0)
    candidates = [["other"] for _ in words[0]]
    draws = 400
    replaced = sum(augment.copy([text], words[0], candidates, rng)[0].split().count("other") for _ in range(draws))
    # 24,000 Bernoulli(0.4) trials: sd 0.0032; 5 sd either side.
    assert abs(replaced / (draws * 60) - 0.4) < 0.016


def test_every_example_gets_the_configured_number_of_copies(masked_lm):
    data = examples(CONTENT, " ".join(reversed(CONTENT.split())))
    result = tinybert(masked_lm, copies=7).augment(data)
    # Fifteen replaceable words each: a duplicate copy has odds below 1e-6, so every draw is kept.
    assert result.drawn == 14 and result.duplicates == 0
    assert result.rows["origin"] == [0] * 8 + [1] * 8
    assert result.rows["augmented"] == [False] + [True] * 7 + [False] + [True] * 7
    assert all(copy != CONTENT for copy in result.rows["sentence1"][1:8])


def test_labels_and_special_tokens_never_change(masked_lm):
    text = "the [MASK] movie [SEP] was a great [UNK] story"
    result = tinybert(masked_lm, copies=10, replace_probability=1.0).augment(examples(text))
    assert result.rows["label"] == [0] * len(result.rows["label"]) and len(result.rows["label"]) > 1
    for copy in result.rows["sentence1"]:
        assert [word for word in copy.split() if word.startswith("[")] == ["[MASK]", "[SEP]", "[UNK]"]
    _, tokenizer = masked_lm
    for ids in tokenizer(result.rows["sentence1"])["input_ids"]:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id


def test_a_word_of_several_pieces_is_replaced_as_a_whole(masked_lm):
    _, tokenizer = masked_lm
    assert len(tokenizer.tokenize("xylophone")) > 1  # spelled in pieces by the tiny vocabulary
    result = tinybert(masked_lm, copies=10, replace_probability=1.0).augment(examples("the xylophone story"))
    vocabulary = set(whole_words(tokenizer).values())
    middle = {copy.split()[1] for copy in result.rows["sentence1"][1:]}
    assert middle and "xylophone" not in middle and middle <= vocabulary  # a whole word, never a piece


def test_candidates_come_from_the_masked_lm_and_the_embedding_space(masked_lm):
    _, tokenizer = masked_lm
    augment = tinybert(masked_lm, candidates=15)
    texts = [["the movie xylophone"]]
    input_ids, words = example_words(tokenizer, texts, 64)
    movie, xylophone = augment.candidates(input_ids, words, [texts[0]])[0][1:]
    assert 0 < len(movie) <= 15 and "movie" not in movie  # the top 15 predictions' whole words, not itself
    assert len(xylophone) == 15  # its 15 nearest whole words (mean of its pieces' embeddings)


def test_splice_replaces_spans_and_reports_where_words_went(masked_lm):
    _, tokenizer = masked_lm
    (_, words) = example_words(tokenizer, [["a bb, ccc."]], 64)  # words: a, bb, ",", ccc, "."
    text, spans = splice("a bb, ccc.", words[0], {1: "x", 3: "dddd"})
    assert text == "a x, dddd." and [text[s:e] for s, e in spans] == ["a", "x", ",", "dddd", "."]


def test_tang_masks_words_with_the_configured_probability_and_cuts_ngrams(masked_lm):
    _, tokenizer = masked_lm
    text = " ".join(["story"] * 40)
    tang = augmentor(OmegaConf.create({**TANG, "ngram_probability": 0.0}), tokenizer, 0, 64)
    (_, words), rng = example_words(tokenizer, [[text]], 64), np.random.default_rng(0)
    candidates = tang.candidates([], words, [[text]])[0]
    masks = sum(tang.copy([text], words[0], candidates, rng)[0].split().count("[MASK]") for _ in range(200))
    assert abs(masks / (200 * 40) - 0.1) < 0.017  # 8,000 trials: sd 0.0034; 5 sd either side
    cut = augmentor(OmegaConf.create({**TANG, "mask_probability": 0.0, "ngram_probability": 1.0}), tokenizer, 0,
                    64).augment(examples(CONTENT))
    for copy in cut.rows["sentence1"][1:]:
        assert 1 <= len(copy.split()) <= 5 and copy in CONTENT  # a contiguous run of 1 to 5 of its words
