"""GLUE tasks: loaders (real TSV files, malformed rows, the hub layout), metrics against hand-computed values."""

from __future__ import annotations

import logging
import math

import pytest
from builders import GLUE_DIR

from distilbert_cli.config import compose_config
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task, get_tasks, glue

# The committed fixture: the first 128 train and 64 dev rows of each task's real file (QNLI: dev only).
SIZES = [(task, split, 128 if split == "train" else 64) for task in ("cola", "sst2", "mrpc", "stsb", "rte", "wnli")
         for split in ("train", "dev")] + [("qnli", "dev", 64)]


@pytest.mark.parametrize(("task", "split", "rows"), SIZES)
def test_every_row_of_the_fixture_files_is_read(task, split, rows):
    assert len(get_task(task).load_split(split, str(GLUE_DIR))) == rows


def test_columns_are_normalised_across_tasks():
    cola = get_task("cola").load_split("dev", str(GLUE_DIR))
    assert cola.column_names == ["sentence1", "label"]
    assert cola[0] == {"sentence1": "The sailors rode the breeze clear of the rocks.", "label": 1}
    rte = get_task("rte").load_split("dev", str(GLUE_DIR))
    assert rte.column_names == ["sentence1", "sentence2", "label"]
    assert rte[0]["label"] == 1  # "not_entailment" is class 1, as in the hub's ClassLabel
    assert rte[0]["sentence2"] == "Christopher Reeve had an accident."
    assert sorted(set(rte["label"])) == [0, 1] and rte["label"].count(0) == 32  # entailment rows
    stsb = get_task("stsb").load_split("dev", str(GLUE_DIR))
    assert stsb[1]["label"] == pytest.approx(4.75) and stsb.features["label"].dtype == "float32"
    mrpc = get_task("mrpc").load_split("dev", str(GLUE_DIR))  # header with a UTF-8 BOM
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
        dataset = get_task("rte").load_split("dev", str(tmp_path))
    assert dataset["label"] == [0, 1, 0]
    assert dataset["sentence1"] == ["A man sleeps.", "A cat.", "It rains."]
    assert "skipped 3 malformed row(s)" in caplog.text and "first at line 4" in caplog.text


def test_mostly_malformed_file_is_an_error(tmp_path):
    rows = ["index\tsentence1\tsentence2\tscore", "0\ta\tb\t7.5", "1\ta\tb\tx", "2\ta\tb\t1.0"]  # 7.5 > 5
    _write(tmp_path / "STS-B" / "dev.tsv", "\n".join(rows) + "\n")
    with pytest.raises(UsageError, match="2 of 3 rows are malformed"):
        get_task("stsb").load_split("dev", str(tmp_path))


def test_header_without_the_task_columns_is_an_error(tmp_path):
    _write(tmp_path / "SST-2" / "dev.tsv", "text\tlabel\nfine .\t1\n")
    with pytest.raises(UsageError, match="not a GLUE SST-2 file"):
        get_task("sst2").load_split("dev", str(tmp_path))


def test_unknown_task_missing_split_and_missing_files(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'sst3'"):
        get_task("sst3").load_split("dev", str(GLUE_DIR))
    with pytest.raises(UsageError, match="no split 'dev'"):
        get_task("mnli").load_split("dev", str(GLUE_DIR))
    settings = compose_config("finetune", [f"task.data_dir={GLUE_DIR}"]).task
    with pytest.raises(UsageError, match=r"MNLI dev_matched file not found: .*MNLI/dev_matched.tsv"):
        for task in get_tasks(["rte", "mnli"]):
            task.check_files(settings, task.dev_splits)
    with pytest.raises(UsageError, match="QNLI train file not found"):
        get_task("qnli").check_files(settings, get_task("qnli").splits)
    assert get_task("SST-2") is get_task("sst2")


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
    dataset = get_task("mnli").load_split("dev_mismatched", None)
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert dataset.column_names == ["sentence1", "sentence2", "label"]
    assert dataset[0] == {"sentence1": "p", "sentence2": "h", "label": 2}


def test_hub_failure_is_a_usage_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="cannot load nyu-mll/glue rte train .* task.data_dir"):
        get_task("rte").load_split("train", None)


# ---- metrics, by hand ---------------------------------------------------------------------------
# predictions [1, 1, 0, 1, 0] vs labels [1, 0, 0, 1, 1]: TP 2, FP 1, TN 1, FN 1.
PREDICTIONS, LABELS = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    assert get_task(task).compute_metrics(PREDICTIONS, LABELS) == {"accuracy": pytest.approx(60.0)}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_tasks(task):
    # precision 2/3, recall 2/3 -> F1 2/3
    metrics = get_task(task).compute_metrics(PREDICTIONS, LABELS)
    assert metrics == {"f1": pytest.approx(200 / 3), "accuracy": pytest.approx(60.0)}
    assert get_task(task).score(metrics) == pytest.approx((200 / 3 + 60) / 2)


def test_cola_matthews_correlation():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
    assert get_task("cola").compute_metrics(PREDICTIONS, LABELS) == {"matthews_correlation": pytest.approx(100 / 6)}


def test_stsb_pearson_and_spearman():
    # x = [1, 2, 3], y = [1, 2, 4]: deviations [-1, 0, 1] and [-4/3, -1/3, 5/3]; cov sum 3,
    # |x| = sqrt(2), |y| = sqrt(42)/3 -> r = 9 / sqrt(84); the ranks agree exactly -> Spearman 1.
    metrics = get_task("stsb").compute_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics == {"pearson": pytest.approx(100 * 9 / math.sqrt(84)), "spearman": pytest.approx(100.0)}
    assert get_task("stsb").score(metrics) == pytest.approx((100 * 9 / math.sqrt(84) + 100) / 2)


def test_mnli_matched_and_mismatched():
    task = get_task("mnli")
    matched = get_task("mnli").compute_metrics([0, 1, 2, 2], [0, 1, 2, 0])  # 3/4
    mismatched = get_task("mnli").compute_metrics([0, 0], [0, 1])  # 1/2
    metrics = {task.metric_key("dev_matched", "accuracy"): matched["accuracy"],
               task.metric_key("dev_mismatched", "accuracy"): mismatched["accuracy"]}
    assert metrics == {"dev_matched_accuracy": 75.0, "dev_mismatched_accuracy": 50.0}
    assert get_task("mnli").score(metrics) == 62.5


def test_metrics_reject_mismatched_lengths_and_no_predictions():
    with pytest.raises(ValueError, match=r"RTE: \(2,\) predictions for \(1,\) labels"):
        get_task("rte").compute_metrics([0, 1], [0])
    with pytest.raises(ValueError, match=r"RTE: \(0,\) predictions for \(0,\) labels"):
        get_task("rte").compute_metrics([], [])
    assert get_task("rte").compute_metrics([1], [1]) == {"accuracy": 100.0}  # one example is a dev set


def test_published_distilbert_score_is_the_mean_of_its_tasks():
    row = glue.PUBLISHED.rows["DistilBERT"]
    assert round(sum(row[name] for name in glue.TASKS) / len(glue.TASKS), 1) == glue.PUBLISHED.own_scores["DistilBERT"]
