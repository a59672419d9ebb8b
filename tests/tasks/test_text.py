"""IMDb and your own data: reading local files (CSV, TSV, JSON lines, parquet) and the hub, label names and ids,
data problems (one UsageError, or rows skipped and counted), head+tail truncation and the metrics by hand."""

from __future__ import annotations

import json

import pytest
from builders import GLUE_DIR, REVIEWS_DIR, build_tiny_bert

from distilbert_cli.config import compose_config
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task

IMDB, TEXT, PAIRS, REGRESSION = (get_task(name) for name in ("imdb", "text_classification",
                                                              "text_pair_classification", "text_regression"))


def settings(task: str, *overrides: str):
    return compose_config("finetune", [f"task={task}", *overrides]).task


def own(train, validation, *overrides: str, task: str = "text_classification"):
    return settings(task, f"task.data.train={train}", f"task.data.validation={validation}", *overrides)


def _csv(path, rows: list[str]):
    path.write_text("\n".join(rows) + "\n")
    return path


# ---- IMDb -------------------------------------------------------------------------------------------------------

def test_imdb_reads_the_review_fixture_with_neg_pos_labels():
    data = IMDB.load(settings("imdb", f"task.data_dir={REVIEWS_DIR}"), IMDB.splits)
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 24, "test": 12}
    assert data.label_names == ("neg", "pos") and not data.skipped
    train = data.splits["train"]
    assert train.column_names == ["sentence1", "label"] and train["label"][:2] == [1, 0]
    assert IMDB.dev_splits == ("test",)  # the paper reports IMDb test accuracy
    assert IMDB.describe_data(settings("imdb")) == "Hugging Face `stanfordnlp/imdb`"


def test_imdb_from_the_hub_keeps_its_class_ids(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["neg", "pos"])})
        return datasets.Dataset.from_dict({"text": ["great", "awful"], "label": [1, 0]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = IMDB.load(settings("imdb"), ("test",))
    assert calls == [("stanfordnlp/imdb", None, "test")]
    assert data.splits["test"][:] == {"sentence1": ["great", "awful"], "label": [1, 0]}


def test_imdb_hub_failure_is_a_usage_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/imdb' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="cannot load stanfordnlp/imdb test .* task.data_dir"):
        IMDB.load(settings("imdb"), ("test",))


def test_imdb_files_missing_are_named(tmp_path):
    with pytest.raises(UsageError, match=r"IMDb train file not found: .*train.csv \(expected <data_dir>/train"):
        IMDB.check_files(settings("imdb", f"task.data_dir={tmp_path}"), IMDB.splits)


# ---- your own data ----------------------------------------------------------------------------------------------

def test_label_names_become_sorted_class_ids_from_train():
    data = TEXT.load(own(REVIEWS_DIR / "train.csv", REVIEWS_DIR / "test.csv"), ("train", "validation"))
    assert data.label_names == ("neg", "pos")
    assert data.splits["validation"]["label"][:2] == [1, 0]
    assert TEXT.head_config(data.label_names)["id2label"] == {0: "neg", 1: "pos"}  # saved with the model


def test_jsonl_parquet_and_tsv_files_read_the_same_way(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"review": "good", "stars": "five"}, {"review": "bad", "stars": "one"}, {"review": "fine", "stars": "five"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dev.parquet")
    _csv(tmp_path / "test.tsv", ["review\tstars", 'a "quoted" one\tone'])
    cfg = own(tmp_path / "train.jsonl", tmp_path / "dev.parquet", f"task.data.test={tmp_path / 'test.tsv'}",
              "task.data.text_field=review", "task.data.label_field=stars")
    assert TEXT.eval_splits(cfg) == ("validation", "test")
    data = TEXT.load(cfg, ("train", "validation", "test"))
    assert data.label_names == ("five", "one")
    assert data.splits["validation"][:] == {"sentence1": ["good", "bad", "fine"], "label": [0, 1, 0]}
    assert data.splits["test"][0] == {"sentence1": 'a "quoted" one', "label": 1}  # TSV: no quoting
    assert TEXT.metric_key("test", "accuracy") == "test_accuracy" and TEXT.metric_key("validation", "accuracy") == (
        "accuracy")


def test_integer_labels_are_class_ids_and_given_names_fix_the_order(tmp_path):
    _csv(tmp_path / "train.csv", ["text,label", "a,0", "b,2", "c,1"])
    _csv(tmp_path / "dev.csv", ["text,label", "d,2"])
    data = TEXT.load(own(tmp_path / "train.csv", tmp_path / "dev.csv"), ("train", "validation"))
    assert data.label_names == ("0", "1", "2") and data.splits["train"]["label"] == [0, 2, 1]
    _csv(tmp_path / "named.csv", ["text,label", "a,low", "b,high", "c,mid"])
    data = TEXT.load(own(tmp_path / "named.csv", tmp_path / "named.csv", "task.data.label_names=[low,mid,high]"),
                     ("train",))
    assert data.splits["train"]["label"] == [0, 2, 1]


def test_rows_with_an_empty_text_or_label_are_skipped_and_counted(tmp_path):
    _csv(tmp_path / "train.csv", ["text,label", "a,pos", ",neg", "b,", "c,neg"])
    data = TEXT.load(own(tmp_path / "train.csv", tmp_path / "train.csv"), ("train",))
    assert data.splits["train"]["sentence1"] == ["a", "c"]
    assert data.skipped == {"train": {"rows with an empty text or label": 2}}


@pytest.mark.parametrize(("train", "dev", "overrides", "message"), [
    (["text,label", "a,pos", "b,neg"], ["text,label", "c,pos", "d,meh"], [],
     r"label 'meh' \(row 2\) is not one of the classes \['neg', 'pos'\]"),
    (["text,label", "a,0", "b,1"], ["text,label", "c,5"], [], r"label id 5 \(row 1\) is not one of the 2 classes"),
    (["text,label", "a,pos"], ["text,label", "c,pos"], ["task.data.label_field=stars"],
     r"has no field 'stars' \(its fields: 'text', 'label'\)"),
    (["text,label", "a,pos"], ["text,label"], [], r"dev.csv is empty"),
    (["text,label", "a,pos"], ["text,label", ",pos"], [], r"dev.csv is empty \(1 rows with an empty text"),
])
def test_data_problems_are_one_usage_error(tmp_path, train, dev, overrides, message):
    cfg = own(_csv(tmp_path / "train.csv", train), _csv(tmp_path / "dev.csv", dev), *overrides)
    with pytest.raises(UsageError, match=message):
        TEXT.load(cfg, ("train", "validation"))


def test_settings_that_do_not_fit_the_task_are_refused(tmp_path):
    with pytest.raises(UsageError, match="needs task.data.train"):
        TEXT.load(settings("text_classification"), ("train",))
    with pytest.raises(UsageError, match="reads text pairs: set task.data.text_pair_field"):
        PAIRS.load(own("a.csv", "b.csv", "task.data.text_pair_field=null", task="text_pair_classification"),
                   ("train",))
    with pytest.raises(UsageError, match="reads one text, but task.data.text_pair_field='x' is set"):
        TEXT.load(own("a.csv", "b.csv", "task.data.text_pair_field=x"), ("train",))
    with pytest.raises(UsageError, match=r"a data file must end in \.csv"):
        TEXT.load(own(_csv(tmp_path / "train.txt", ["x"]), "b.csv"), ("train",))


def test_pairs_and_regression_read_glue_files():
    rte = GLUE_DIR / "RTE"
    pairs = PAIRS.load(own(rte / "train.tsv", rte / "dev.tsv", "task.data.text_field=sentence1",
                           "task.data.text_pair_field=sentence2", task="text_pair_classification"), ("validation",))
    assert pairs.label_names == ("entailment", "not_entailment")
    assert pairs.splits["validation"][0]["sentence2"] == "Christopher Reeve had an accident."
    stsb = GLUE_DIR / "STS-B"
    cfg = own(stsb / "train.tsv", stsb / "dev.tsv", "task.data.text_field=sentence1",
              "task.data.text_pair_field=sentence2", "task.data.label_field=score", task="text_regression")
    scores = REGRESSION.load(cfg, ("validation",))
    assert scores.label_names is None and REGRESSION.reads_pairs(cfg)
    assert scores.splits["validation"][0]["label"] == pytest.approx(5.0)
    assert scores.splits["validation"].features["label"].dtype == "float32"


def test_a_regression_label_must_be_a_number(tmp_path):
    cfg = own(_csv(tmp_path / "train.csv", ["text,label", "a,0.5", "b,high"]), "b.csv", task="text_regression")
    with pytest.raises(UsageError, match=r"label 'high' \(row 2\) is not a number"):
        REGRESSION.load(cfg, ("train",))


# ---- truncation and metrics -------------------------------------------------------------------------------------

def test_head_tail_keeps_the_first_and_the_last_tokens(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_bert(tmp_path / "bert", num_layers=1))
    words = "the of and to a in is was for on as with by he she it that at from his".split()  # 20 tokens
    examples = Dataset.from_dict({"sentence1": [" ".join(words), "the city"], "label": [0, 1]})
    cut = settings("imdb", "task.max_seq_length=10", "task.truncation=head_tail", "task.head_tokens=3")
    encoded = IMDB.encode(examples, tokenizer, cut, with_token_type_ids=True, training=True)
    # [CLS] + 3 head + 5 tail + [SEP] = 10 tokens; a short text is left whole
    assert tokenizer.decode(encoded[0]["input_ids"]) == "[CLS] the of and it that at from his [SEP]"
    assert encoded[0]["token_type_ids"] == [0] * 10 and encoded[0]["attention_mask"] == [1] * 10
    assert tokenizer.decode(encoded[1]["input_ids"]) == "[CLS] the city [SEP]" and encoded["labels"] == [0, 1]
    head = IMDB.encode(examples, tokenizer, settings("imdb", "task.max_seq_length=10"), True, training=True)
    assert tokenizer.decode(head[0]["input_ids"]) == "[CLS] the of and to a in is was [SEP]"
    assert "head+tail (the first 3 tokens" in IMDB.describe_settings(cut)


def test_accuracy_and_macro_f1_by_hand():
    # class 0: P 1/2, R 1 -> 2/3; class 1: P 1, R 2/3 -> 4/5; class 2: 1 -> macro-F1 (2/3 + 4/5 + 1) / 3
    metrics = TEXT.compute_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 2])
    assert metrics == {"accuracy": pytest.approx(80.0), "macro_f1": pytest.approx(100 * (2 / 3 + 0.8 + 1) / 3)}
    assert REGRESSION.compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])["spearman"] == pytest.approx(100.0)
