"""Scores of fine-tuned runs: medians over seeds, retention, the paired bootstrap and the bootstrap of a mean,
against hand values."""

from __future__ import annotations

import numpy as np
import pytest

from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.results import bootstrap_mean, noise_verdict, paired_bootstrap, retention, summarize


def test_median_over_seeds_task_scores_and_retention():
    records = [{"model": "student", "task": "rte", "seed": s, "metrics": {"accuracy": a}}
               for s, a in [(1, 50.0), (2, 70.0), (3, 60.0)]]
    records += [{"model": "student", "task": "mrpc", "seed": s, "metrics": {"f1": f1, "accuracy": acc}}
                for s, f1, acc in [(1, 80.0, 70.0), (2, 90.0, 60.0)]]
    records += [{"model": "teacher", "task": "rte", "seed": 1, "metrics": {"accuracy": 80.0}}]
    summary = summarize(records)
    student = summary["student"]
    assert student["tasks"]["rte"]["score"] == 60.0  # median of 50, 70, 60
    assert student["tasks"]["mrpc"]["metrics"] == {"f1": 85.0, "accuracy": 65.0}  # medians of two seeds
    assert student["tasks"]["mrpc"]["score"] == 75.0
    assert student["score"] == 67.5
    kept = retention(summary)
    assert kept == {"tasks": ["rte"], "student": 60.0, "teacher": 80.0, "percent": 75.0}  # common tasks only


def seed_runs(task: str, *predictions_by_seed, labels) -> list[dict]:
    """`finetuned_runs`-shaped runs of one model: one per seed, all on the same dev labels."""
    return [{"model": "m", "task": get_task(task), "seed": seed, "where": f"seed-{seed}",
             "by_split": {"dev": (np.asarray(predictions), np.asarray(labels))}}
            for seed, predictions in enumerate(predictions_by_seed)]


def test_paired_bootstrap_of_identical_and_of_opposite_models():
    labels = [0, 1] * 20
    same = paired_bootstrap(seed_runs("rte", labels, labels=labels), seed_runs("rte", labels, labels=labels),
                                      resamples=50, seed=0)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "resamples": 50, "dev_examples": 40}
    wrong = [1 - y for y in labels]
    opposite = paired_bootstrap(seed_runs("rte", labels, labels=labels),
                                          seed_runs("rte", wrong, labels=labels), resamples=50, seed=0)
    assert (opposite["difference"], opposite["low"], opposite["high"]) == (100.0, 100.0, 100.0)


def test_paired_bootstrap_scores_as_the_table_does_and_separates_signal_from_noise():
    labels = np.arange(200) % 2
    baseline = np.where(np.arange(200) < 140, labels, 1 - labels)  # 70% right
    one_more = baseline.copy()
    one_more[140] = labels[140]  # right on one more example: 70.5%
    many_more = np.where(np.arange(200) < 180, labels, 1 - labels)  # 90% right
    # Three seeds: the median seed decides, as in the table (70.5 vs 70.0 here).
    ours = seed_runs("rte", baseline, one_more, many_more, labels=labels)
    theirs = seed_runs("rte", baseline, baseline, baseline, labels=labels)
    close = paired_bootstrap(ours, theirs, resamples=300, seed=0)
    assert close["difference"] == pytest.approx(0.5) and close["low"] <= 0 <= close["high"]
    far = paired_bootstrap(seed_runs("rte", many_more, labels=labels), theirs[:1], resamples=300, seed=0)
    assert far["difference"] == pytest.approx(20.0) and 10 < far["low"] < 20 < far["high"] < 30


def test_paired_bootstrap_needs_the_same_dev_examples_and_a_defined_score():
    ours = seed_runs("rte", [0, 1, 1], labels=[0, 1, 1])
    assert paired_bootstrap(ours, seed_runs("rte", [0, 1, 1], labels=[0, 1, 0]), 10, 0) is None
    assert paired_bootstrap(ours, seed_runs("sst2", [0, 1, 1], labels=[0, 1, 1]), 10, 0) is None
    constant = seed_runs("stsb", [2.0, 2.0, 2.0], labels=[1.0, 2.5, 4.0])  # Pearson of a constant: undefined
    assert paired_bootstrap(constant, constant, 10, 0) is None
    # Two examples: Pearson is defined on both, but with seed 4 each of the 3 resamples draws one example twice.
    two = seed_runs("stsb", [1.0, 2.0], labels=[1.0, 2.0])
    assert paired_bootstrap(two, two, resamples=3, seed=4) is None




def test_paired_bootstrap_resamples_squad_questions(tmp_path):
    import json

    from distilbert_cli.tasks.results import as_array, read_predictions

    golds = [["France"], ["10th and 11th centuries", "in the 10th and 11th centuries"], ["Rollo"], ["1066"]] * 10
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"split": "dev", "index": i, "id": str(i), "label": gold,
                                        "prediction": gold[-1] if i % 2 else "nothing"}) + "\n"
                            for i, gold in enumerate(golds)))
    by_split = read_predictions(path)
    predictions, labels = by_split["dev"]
    assert labels.dtype == object and labels[1] == ("10th and 11th centuries", "in the 10th and 11th centuries")
    half = [{"model": "m", "task": get_task("squad"), "seed": 1, "where": "seed-1", "by_split": by_split}]
    perfect = [{**half[0], "by_split": {"dev": (as_array([gold[0] for gold in golds]), labels)}}]
    result = paired_bootstrap(perfect, half, resamples=200, seed=0)
    # Right on every question vs right on every other one: EM and F1 both 100 vs 50, a 50-point difference.
    assert result["difference"] == pytest.approx(50.0) and result["dev_examples"] == 40
    assert 25 < result["low"] < 50 < result["high"] < 75


def test_table_2_shows_em_f1_cells_beside_the_paper_and_its_retention_on_the_same_tasks():
    from distilbert_cli.tasks.results import render_markdown

    records = [{"model": model, "task": "squad", "seed": 1, "metrics": {"exact_match": em, "f1": f1}}
               for model, em, f1 in [("student", 70.0, 80.0), ("teacher", 75.0, 85.0)]]
    records.append({"model": "student", "task": "imdb", "seed": 1, "metrics": {"accuracy": 90.0}})
    summary = summarize(records)
    tasks = [get_task("imdb"), get_task("squad")]
    kept = {"IMDb and SQuAD (the paper's Table 2)": retention(summary, ["imdb", "squad"])}
    table = render_markdown(summary, kept, tasks, "the fixture", ["a note"], soft_targets=True)
    assert "| Model | IMDb | SQuAD v1.1 (EM/F1) |" in table
    assert "| student (D) (ours) | 90.0 | 70.0/80.0 |" in table and "| teacher (ours) | – | 75.0/85.0 |" in table
    assert "| BERT-base (published) | 93.46 | 81.2/88.5 |" in table
    assert "| DistilBERT (D) (published) | – | 79.1/86.9 |" in table
    # squad only (the teacher has no IMDb run): 75 / 80; the paper's (77.7 + 85.8) / (81.2 + 88.5) = 96.3%
    assert "Retention (student / teacher on squad): 93.8% (75.0 / 80.0); the paper on the same tasks: 96.3%." in table


def test_paired_bootstrap_is_the_95_percent_percentile_interval_of_paired_resamples():
    # One task, one split: each resample draws len(dev) example indices once, and both models are scored on them.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    ours = np.where(rng.random(300) < 0.8, labels, 1 - labels)
    theirs = np.where(rng.random(300) < 0.6, labels, 1 - labels)
    result = paired_bootstrap(seed_runs("rte", ours, labels=labels), seed_runs("rte", theirs, labels=labels),
                              resamples=200, seed=7)
    draws = np.random.default_rng(7)
    differences = []
    for _ in range(200):
        sample = draws.integers(0, 300, 300)
        differences.append(100 * (np.mean(ours[sample] == labels[sample]) - np.mean(theirs[sample] == labels[sample])))
    low, high = np.percentile(differences, [2.5, 97.5])
    assert result == {"difference": pytest.approx(100 * (np.mean(ours == labels) - np.mean(theirs == labels))),
                      "low": pytest.approx(low), "high": pytest.approx(high), "resamples": 200, "dev_examples": 300}


def test_pairing_cancels_the_noise_the_two_models_share():
    # Both right on the same 140 of 200 examples, ours also on 12 more: every resample favours ours by
    # 0.5 x (draws among those 12) >= 0, so the paired 95% interval is about [3.0, 9.5] (Binomial(200, 0.06) / 2).
    # Resampling the two models independently would add the noise of each accuracy (about +-8.7 at 95%).
    labels = np.arange(200) % 2
    theirs = np.where(np.arange(200) < 140, labels, 1 - labels)
    ours = np.where(np.arange(200) < 152, labels, 1 - labels)
    result = paired_bootstrap(seed_runs("rte", ours, labels=labels), seed_runs("rte", theirs, labels=labels),
                              resamples=300, seed=0)
    assert result["difference"] == pytest.approx(6.0)
    assert 2.0 <= result["low"] <= 4.0 and 8.5 <= result["high"] <= 10.5, result


def test_bootstrap_mean_of_a_constant_is_that_constant_and_of_one_hit_in_four_is_hand_computed():
    assert bootstrap_mean(np.full(4, -0.5), resamples=50, seed=0) == {
        "mean": -0.5, "low": -0.5, "high": -0.5, "resamples": 50, "items": 4}
    # One hit in four: k hits in a resample of 4 is Binomial(4, 1/4). P(k = 0) = 0.32 covers the 2.5th percentile;
    # P(k >= 3) = 0.051 > 2.5% > P(k = 4) = 0.004 puts the 97.5th at 3/4.
    found = bootstrap_mean(np.array([True, False, False, False]), resamples=2000, seed=0)
    assert (found["mean"], found["low"], found["high"]) == (0.25, 0.0, 0.75)
    assert bootstrap_mean(np.array([]), 10, 0) is None


@pytest.mark.parametrize(("low", "high", "words"), [(-1.0, 2.0, "within noise"), (0.0, 0.0, "within noise"),
                                                    (0.5, 2.0, "beyond noise"), (-2.0, -0.5, "beyond noise")])
def test_an_interval_holding_zero_is_within_the_noise(low, high, words):
    assert noise_verdict({"low": low, "high": high}) == words
    assert noise_verdict(None) == "not tested"
