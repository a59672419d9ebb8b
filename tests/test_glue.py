"""GLUE tasks: loaders (real TSV files, malformed rows, the hub layout), metrics against hand-computed values."""

from __future__ import annotations

import logging
import math

import pytest
from conftest import GLUE_DIR

from distilbert_cli import glue
from distilbert_cli.errors import UsageError

# Official GLUE split sizes of the files in ../shared/glue (QNLI: dev only).
SIZES = [("cola", "train", 8551), ("cola", "dev", 1043), ("sst2", "train", 67349), ("sst2", "dev", 872),
         ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("stsb", "train", 5749), ("stsb", "dev", 1500),
         ("rte", "train", 2490), ("rte", "dev", 277), ("wnli", "train", 635), ("wnli", "dev", 71),
         ("qnli", "dev", 5463)]


@pytest.mark.parametrize(("task", "split", "rows"), SIZES)
def test_tsv_row_counts_match_official_sizes(task, split, rows):
    assert len(glue.load_split(task, split, str(GLUE_DIR))) == rows


def test_columns_are_normalised_across_tasks():
    cola = glue.load_split("cola", "dev", str(GLUE_DIR))
    assert cola.column_names == ["sentence1", "label"]
    assert cola[0] == {"sentence1": "The sailors rode the breeze clear of the rocks.", "label": 1}
    rte = glue.load_split("rte", "dev", str(GLUE_DIR))
    assert rte.column_names == ["sentence1", "sentence2", "label"]
    assert rte[0]["label"] == 1  # "not_entailment" is class 1, as in the hub's ClassLabel
    assert rte[0]["sentence2"] == "Christopher Reeve had an accident."
    assert sorted(set(rte["label"])) == [0, 1] and rte["label"].count(0) == 146  # 146 entailment in dev
    stsb = glue.load_split("stsb", "dev", str(GLUE_DIR))
    assert stsb[1]["label"] == pytest.approx(4.75) and stsb.features["label"].dtype == "float32"
    mrpc = glue.load_split("mrpc", "dev", str(GLUE_DIR))  # header with a UTF-8 BOM
    assert mrpc[0]["label"] == 1 and mrpc[0]["sentence1"].startswith("He said the foodservice pie")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_malformed_rows_are_skipped_counted_and_reported(tmp_path, caplog):
    rows = ["index\tsentence1\tsentence2\tlabel",
            "0\tA man sleeps.\tSomeone sleeps.\tentailment",
            "1\tA cat.\tA dog.\tnot_entailment",
            "2\ttoo\tmany\tfields\tentailment",  # 5 fields
            "3\tA.\tB.\tmaybe",  # not a label of RTE
            "4\t \tB.\tentailment",  # empty text
            "5\tIt rains.\tIt is wet.\tentailment",
            ""]
    _write(tmp_path / "RTE" / "dev.tsv", "\n".join(rows))
    with caplog.at_level(logging.WARNING, logger="distilbert_cli"):
        dataset = glue.load_split("rte", "dev", str(tmp_path))
    assert dataset["label"] == [0, 1, 0]
    assert dataset["sentence1"] == ["A man sleeps.", "A cat.", "It rains."]
    assert "skipped 3 malformed row(s)" in caplog.text and "first at line 4" in caplog.text


def test_mostly_malformed_file_is_an_error(tmp_path):
    rows = ["index\tsentence1\tsentence2\tscore", "0\ta\tb\t7.5", "1\ta\tb\tx", "2\ta\tb\t1.0"]  # 7.5 > 5
    _write(tmp_path / "STS-B" / "dev.tsv", "\n".join(rows) + "\n")
    with pytest.raises(UsageError, match="2 of 3 rows are malformed"):
        glue.load_split("stsb", "dev", str(tmp_path))


def test_header_without_the_task_columns_is_an_error(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv", "text\tlabel\nfine .\t1\n")
    with pytest.raises(UsageError, match="not a GLUE SST-2 file"):
        glue.load_split("sst2", "dev", str(tmp_path))


def test_unknown_task_missing_split_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="unknown GLUE task 'sst3'"):
        glue.load_split("sst3", "dev", str(GLUE_DIR))
    with pytest.raises(UsageError, match="no split 'dev'"):
        glue.load_split("mnli", "dev", str(GLUE_DIR))
    with pytest.raises(UsageError, match=r"MNLI dev_matched file not found: .*MNLI/dev_matched.tsv"):
        glue.check_local_files(glue.get_tasks(["rte", "mnli"]), GLUE_DIR, dev_only=True)
    with pytest.raises(UsageError, match="QNLI train file not found"):
        glue.check_local_files(glue.get_tasks(["qnli"]), GLUE_DIR)
    assert glue.get_task("SST-2") is glue.get_task("sst2")


def test_hub_layout_is_normalised(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                                      "idx": datasets.Value("int32")})
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]},
                                          features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = glue.load_split("mnli", "dev_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert dataset.column_names == ["sentence1", "sentence2", "label"]
    assert dataset[0] == {"sentence1": "p", "sentence2": "h", "label": 2}


def test_hub_failure_is_a_usage_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="cannot load nyu-mll/glue rte train .* glue.data_dir"):
        glue.load_split("rte", "train", None)


# ---- metrics, by hand ---------------------------------------------------------------------------
# predictions [1, 1, 0, 1, 0] vs labels [1, 0, 0, 1, 1]: TP 2, FP 1, TN 1, FN 1.
PREDICTIONS, LABELS = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    assert glue.compute_metrics(task, PREDICTIONS, LABELS) == {"accuracy": pytest.approx(60.0)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_tasks(task):
    # precision 2/3, recall 2/3 -> F1 2/3
    metrics = glue.compute_metrics(task, PREDICTIONS, LABELS)
    assert metrics == {"f1": pytest.approx(200 / 3), "accuracy": pytest.approx(60.0)}
    assert glue.task_score(task, metrics) == pytest.approx((200 / 3 + 60) / 2)


def test_cola_matthews_correlation():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert glue.compute_metrics("cola", PREDICTIONS, LABELS) == {"matthews_correlation": pytest.approx(100 / 6)}


def test_stsb_pearson_and_spearman():
    # x = [1, 2, 3], y = [1, 2, 4]: deviations [-1, 0, 1] and [-4/3, -1/3, 5/3]; cov sum 3,
    # |x| = sqrt(2), |y| = sqrt(42)/3 -> r = 9 / sqrt(84); the ranks agree exactly -> Spearman 1.
    metrics = glue.compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics == {"pearson": pytest.approx(100 * 9 / math.sqrt(84)), "spearman": pytest.approx(100.0)}
    assert glue.task_score("stsb", metrics) == pytest.approx((100 * 9 / math.sqrt(84) + 100) / 2)


def test_mnli_matched_and_mismatched():
    task = glue.get_task("mnli")
    matched = glue.compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 0])  # 3/4
    mismatched = glue.compute_metrics("mnli", [0, 0], [0, 1])  # 1/2
    metrics = {glue.metric_key(task, "dev_matched", "accuracy"): matched["accuracy"],
               glue.metric_key(task, "dev_mismatched", "accuracy"): mismatched["accuracy"]}
    assert metrics == {"dev_matched_accuracy": 75.0, "dev_mismatched_accuracy": 50.0}
    assert glue.task_score("mnli", metrics) == 62.5


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="predictions"):
        glue.compute_metrics("rte", [0, 1], [0])


def test_published_distilbert_score_is_the_mean_of_its_tasks():
    row = glue.PUBLISHED["DistilBERT"]
    assert round(sum(row[name] for name in glue.TASKS) / len(glue.TASKS), 1) == row["score"]
