"""SQuAD: the committed fixture, data problems, windows and offsets against hand-checked spans, answer decoding on
crafted logits across windows, the official EM/F1 and the QA losses against hand values."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from builders import SQUAD_DIR, build_tiny_bert

from distilbert_cli.config import compose_config
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.squad import best_answer, em_f1, exact_match, f1, most_context_windows, normalize_answer

SQUAD, SQUAD_V2 = get_task("squad"), get_task("squad_v2")


def settings(*overrides: str):
    return compose_config("finetune", ["task=squad", f"task.data_dir={SQUAD_DIR}", *overrides]).task


# ---- data -----------------------------------------------------------------------------------------------------

def test_the_fixture_reads_with_every_gold_answer_and_the_v2_questions_without_one():
    v1 = SQUAD.load(settings(), ("train", "dev"))
    assert {split: len(data) for split, data in v1.splits.items()} == {"train": 8, "dev": 8} and not v1.skipped
    dev = v1.splits["dev"]
    assert dev.column_names == ["id", "context", "question", "answers", "answer_starts"]
    second = dev[1]
    assert second["id"] == "56ddde6b9a695914005b9629"
    assert second["answers"] == ["10th and 11th centuries", "in the 10th and 11th centuries",
                                 "10th and 11th centuries", "10th and 11th centuries"]
    assert second["answer_starts"] == [94, 87, 94, 94]
    assert v1.splits["train"][1]["answers"] == ["10th and 11th centuries"]  # one answer per training question
    v2 = SQUAD_V2.load(settings(), ("dev",)).splits["dev"]
    assert len(v2) == 14 and sum(not answers for answers in v2["answers"]) == 6


def _write_squad(path, qas, context="The Normans gave their name to Normandy, a region in France."):
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": context, "qas": qas}]}]}))
    return path


def test_answers_off_their_context_are_counted_and_skipped(tmp_path, caplog):
    _write_squad(tmp_path / "dev-v1.1.json", [
        {"id": "a", "question": "Where is Normandy?", "answers": [{"text": "France", "answer_start": 53},
                                                                  {"text": "France", "answer_start": 3}]},
        {"id": "b", "question": "Who?", "answers": [{"text": "The Normans", "answer_start": 5}]},  # wrong start
        {"id": "c", "question": "What?", "answers": [{"text": "Normandy", "answer_start": 31}]},
    ])
    with caplog.at_level(logging.WARNING, logger="distilbert_cli"):
        data = SQUAD.load(settings(f"task.data_dir={tmp_path}"), ("dev",))
    assert data.splits["dev"]["id"] == ["a", "c"]
    assert data.splits["dev"][0]["answers"] == ["France"]  # the wrong second offset dropped
    assert data.skipped == {"dev": {"answers whose text is not at their answer_start in the context": 2,
                                    "questions left without an answer": 1}}
    assert "skipped 2 answers whose text is not at their answer_start" in caplog.text


@pytest.mark.parametrize(("content", "message"), [
    ({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "c",
                                                                "qas": [{"id": "a", "answers": []}]}]}]},
     r"not in the SQuAD JSON layout: data\[0\].paragraphs\[0\].qas\[0\].question is missing"),
    ({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"qas": []}]}]},
     r"data\[0\].paragraphs\[0\].context is missing"),
    ({"version": "1.1"}, "data is missing"),
    ({"version": "1.1", "data": [{"paragraphs": [{"context": "c", "qas": {"id": "a"}}]}]},
     r"data\[0\].paragraphs\[0\].qas is not a list"),
    ({"version": "1.1", "data": []}, "SQuAD v1.1 dev split is empty"),
])
def test_a_file_out_of_layout_or_empty_is_an_error(tmp_path, content, message):
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        SQUAD.load(settings(f"task.data_dir={tmp_path}"), ("dev",))


def test_missing_files_are_named_with_the_official_layout(tmp_path):
    with pytest.raises(UsageError, match=r"SQuAD v2.0 train file not found: .*train-v2.0.json \(expected the official"):
        SQUAD_V2.check_files(settings(f"task.data_dir={tmp_path}"), SQUAD_V2.splits)


# ---- windows --------------------------------------------------------------------------------------------------

CONTEXT = "the city is on the river and the school is in the city of music"  # 15 one-token words
QUESTION = "where is the school"  # 4 tokens


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_bert(tmp_path_factory.mktemp("qa-bert"), num_layers=1))


def _examples(answer: str = "the school", start: int = 29):
    from datasets import Dataset

    return Dataset.from_list([{"id": "q", "context": CONTEXT, "question": "  " + QUESTION, "answers": [answer],
                               "answer_starts": [start]}])


def test_windows_step_doc_stride_context_tokens_and_hold_the_answer_span(tokenizer):
    # 16 tokens = [CLS] + 4 question + [SEP] + 9 context + [SEP]; windows start at context tokens 0, 4 and 8.
    qa = settings("task.qa.max_seq_length=16", "task.qa.doc_stride=4", "task.qa.max_query_length=8")
    train = SQUAD.encode(_examples(), tokenizer, qa, with_token_type_ids=True, training=True)
    assert len(train) == 3
    words = CONTEXT.split()
    for window, first in enumerate((0, 4, 8)):
        ids = train[window]["input_ids"]
        assert tokenizer.decode(ids[1:5]) == QUESTION  # the leading spaces of the question are gone
        assert tokenizer.decode(ids[6:-1]) == " ".join(words[first:first + 9])
        assert train[window]["token_type_ids"] == [0] * 6 + [1] * (len(ids) - 6)
    # "the school" is context tokens 7-8: positions 6 + 7 - first in windows 0 and 1; not all in window 2.
    assert [(f["start_positions"], f["end_positions"]) for f in train] == [(13, 14), (9, 10), (0, 0)]
    evaluation = SQUAD.encode(_examples(), tokenizer, qa, with_token_type_ids=False, training=False)
    assert evaluation.column_names == ["input_ids", "attention_mask", "example_index", "offset_mapping"]
    offsets = evaluation[1]["offset_mapping"]
    assert offsets[:6] == [None] * 6 and offsets[-1] is None  # [CLS], question, [SEP]s: not context
    assert [CONTEXT[start:end] for start, end in offsets[6:-1]] == words[4:13]
    assert evaluation["example_index"] == [0, 0, 0]


def test_long_questions_are_cut_to_max_query_length(tokenizer):
    qa = settings("task.qa.max_seq_length=16", "task.qa.doc_stride=4", "task.qa.max_query_length=2")
    features = SQUAD.encode(_examples(), tokenizer, qa, with_token_type_ids=False, training=True)
    assert tokenizer.decode(features[0]["input_ids"][1:3]) == "where is"
    assert features[0]["input_ids"][3] == tokenizer.sep_token_id
    assert len(features) == 2  # 11 context tokens per window: starts 0 and 4 cover all 15


# ---- answers from logits ---------------------------------------------------------------------------------------

# "alpha beta gamma delta epsilon zeta": two windows of four context tokens each, sharing gamma and delta.
TEXT = "alpha beta gamma delta epsilon zeta"
SPANS = [(0, 5), (6, 10), (11, 16), (17, 22), (23, 30), (31, 35)]
WINDOW_A = [None, None, None, *SPANS[0:4], None]  # [CLS] q [SEP] alpha beta gamma delta [SEP]
WINDOW_B = [None, None, None, *SPANS[2:6], None]  # [CLS] q [SEP] gamma delta epsilon zeta [SEP]


def _logits(length: int, starts: dict, ends: dict, width: int = 10) -> np.ndarray:
    """[width, 2] logits: -5 everywhere but the given positions; rows past `length` are padding."""
    logits = np.full((width, 2), -5.0, dtype=np.float32)
    logits[length:] = -1e4
    for position, value in starts.items():
        logits[position, 0] = value
    for position, value in ends.items():
        logits[position, 1] = value
    return logits


def test_the_best_span_over_every_window_wins():
    a = _logits(8, {4: 5.0}, {5: 5.0})  # "beta gamma", 10
    b = _logits(8, {5: 6.0}, {6: 6.0})  # "epsilon zeta", 12
    assert best_answer(TEXT, [(a, WINDOW_A), (b, WINDOW_B)], 20, 30, None) == "epsilon zeta"
    assert best_answer(TEXT, [(a, WINDOW_A)], 20, 30, None) == "beta gamma"


def test_spans_must_be_in_context_in_order_and_short_enough():
    # The best start and end are [CLS] and a question token, then an end before its start: all refused.
    logits = _logits(8, {0: 9.0, 5: 3.0, 6: 1.0}, {1: 9.0, 4: 7.5, 6: 2.0})
    assert best_answer(TEXT, [(logits, WINDOW_A)], 20, 30, None) == "gamma delta"  # 3 + 2 beats 1 + 2, -5 + 7.5
    assert best_answer(TEXT, [(logits, WINDOW_A)], 20, 1, None) == "delta"  # one token: 1 + 2 beats -5 + 7.5
    assert best_answer(TEXT, [(logits, WINDOW_A)], 1, 30, None) == ""  # only [CLS] and a question token


def test_a_start_counts_in_the_window_where_it_has_the_most_context():
    # gamma is the 3rd of 4 context tokens in window A (1 token each side at least) and the 1st in B (0): A is its
    # home, so B's "gamma delta" (score 20) is not a candidate and A's own "gamma" (score 8) beats B's "delta" (5).
    assert most_context_windows([WINDOW_A, WINDOW_B]) == {SPANS[0]: 0, SPANS[1]: 0, SPANS[2]: 0, SPANS[3]: 1,
                                                         SPANS[4]: 1, SPANS[5]: 1}
    a = _logits(8, {5: 4.0}, {5: 4.0})
    b = _logits(8, {3: 10.0}, {4: 10.0})
    assert best_answer(TEXT, [(a, WINDOW_A), (b, WINDOW_B)], 20, 30, None) == "gamma"


def test_squad_v2_answers_nothing_when_the_null_score_beats_the_best_span():
    a = _logits(8, {0: 4.0, 4: 3.0}, {0: 4.0, 5: 3.0})  # null 8, "beta gamma" 6
    b = _logits(8, {0: 2.0}, {0: 1.0})  # null 3: the lowest null score of the windows counts
    assert best_answer(TEXT, [(a, WINDOW_A), (b, WINDOW_B)], 20, 30, 0.0) == "beta gamma"  # 3 - 6 < 0
    assert best_answer(TEXT, [(a, WINDOW_A)], 20, 30, 0.0) == ""  # 8 - 6 > 0
    assert best_answer(TEXT, [(a, WINDOW_A)], 20, 30, 2.5) == "beta gamma"  # 8 - 6 < 2.5


def test_decode_maps_windows_back_to_their_question(tokenizer):
    examples = _examples()
    qa = settings("task.qa.max_seq_length=16", "task.qa.doc_stride=4", "task.qa.max_query_length=8")
    features = SQUAD.encode(examples, tokenizer, qa, with_token_type_ids=False, training=False)
    # Window 1 (context tokens 4-12) scores "the school" (positions 9-10) highest.
    outputs = [np.stack([_logits(16, {}, {}, width=16), _logits(16, {9: 5.0}, {10: 5.0}, width=16)]),
               np.stack([_logits(14, {}, {}, width=16)])]
    assert SQUAD.decode(outputs, features, examples, qa) == ["the school"]


# ---- the official EM/F1 ----------------------------------------------------------------------------------------

def test_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel Tower", "Eiffel Tower.") == 1.0
    assert f1("a big red dog", "the red dog barks") == pytest.approx(2 / 3)  # 2 common of 3 and 3 tokens
    assert f1("Paris", "London") == 0.0
    # several golds: the best one counts (6/7 against the first, 1/2 against the second)
    assert em_f1("Denmark and Norway", ("Denmark, Iceland and Norway", "Norway")) == pytest.approx((0.0, 6 / 7))
    assert em_f1("Norway", ("Denmark, Iceland and Norway", "norway!")) == (1.0, 1.0)
    # SQuAD v2: no gold answer means the empty answer is right
    assert em_f1("", ()) == (1.0, 1.0) and em_f1("France", ()) == (0.0, 0.0) and em_f1("", ("France",)) == (0, 0)


def test_metrics_of_a_split_are_means_in_percent():
    metrics = SQUAD.compute_metrics(["France", "Denmark and Norway", "nothing"],
                                    [["France"], ["Denmark, Iceland and Norway"], ["Rollo"]])
    assert metrics == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(100 * (1 + 6 / 7) / 3)}
    assert SQUAD.score(metrics) == pytest.approx((metrics["exact_match"] + metrics["f1"]) / 2)
    assert SQUAD.table_cell(metrics) == (metrics["exact_match"], metrics["f1"])


# ---- losses ----------------------------------------------------------------------------------------------------

def test_the_task_loss_is_the_mean_of_the_start_and_end_cross_entropies():
    outputs = torch.zeros(1, 4, 2)
    outputs[0, 1, 0] = math.log(3.0)  # start: p(1) = 3 / 6
    batch = {"start_positions": torch.tensor([1]), "end_positions": torch.tensor([2])}
    assert SQUAD.loss(outputs, batch).item() == pytest.approx((math.log(2) + math.log(4)) / 2)


def test_the_d_loss_by_hand():
    # start: teacher [ln 3, 0] at T=2 -> p = [sqrt3, 1] / (sqrt3 + 1) against the student's uniform; end: equal.
    p = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    kl_start = sum(pi * math.log(pi / 0.5) for pi in p)
    teacher = torch.zeros(1, 2, 2)
    teacher[0, 0, 0] = math.log(3.0)
    loss = SQUAD.soft_target_loss(torch.zeros(1, 2, 2), teacher, temperature=2.0)
    assert loss.item() == pytest.approx((kl_start + 0.0) / 2 * 2.0**2, rel=1e-5)
