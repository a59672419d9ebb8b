"""The report's logic as functions: the verdict of each comparison, the ablation table's deltas, and the tasks two
runs are compared on."""

from __future__ import annotations

import json

import pytest
from builders import open_stage

from distilbert_cli import artifacts
from distilbert_cli.config import compose_config
from distilbert_cli.reporting import ablation_table, downstream_comparison, verdict
from distilbert_cli.rundir import Run


def run(name: str, mlm_loss: float | None = None, score: float | None = None, **extra) -> dict:
    """A `run_summary`-shaped run: validation MLM loss and downstream score of its student."""
    summary = {"name": name, **extra}
    if mlm_loss is not None:
        summary["validation"] = {"student": {"mlm_loss": mlm_loss, "mlm_accuracy": 0.5}}
    if score is not None:
        summary["downstream"] = {"student": score}
    return summary


TRIPLE = {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}


def test_verdict_says_better_or_not_on_each_figure():
    main = run("triple_loss", mlm_loss=2.0, score=70.0, loss_weights=TRIPLE)
    lines = verdict(main, [run("worse", 2.5, 65.0, loss_weights=TRIPLE), run("better", 1.5, 75.0, loss_weights=TRIPLE),
                           run("tied", 2.0, 70.0, loss_weights=TRIPLE)], [None, None, None])
    assert lines == [
        "- triple_loss vs worse: validation MLM loss 2.000 vs 2.500 (better); downstream 70.0 vs 65.0 (better)",
        "- triple_loss vs better: validation MLM loss 2.000 vs 1.500 (NOT better); downstream 70.0 vs 75.0 "
        "(NOT better)",
        "- triple_loss vs tied: validation MLM loss 2.000 vs 2.000 (NOT better); downstream 70.0 vs 70.0 (NOT better)",
    ]  # lower loss is better, higher score is better, a tie is not better; no comparison, no noise clause


def test_verdict_leaves_out_the_mlm_loss_of_a_run_whose_objective_does_not_train_the_head():
    tinybert = run("tinybert_general", 9.0, 60.0, loss_weights={"alpha_hidden": 1.0, "alpha_attn_scores": 1.0})
    lines = verdict(run("triple_loss", 2.0, 70.0, loss_weights=TRIPLE), [tinybert], [None])
    assert lines == ["- triple_loss vs tinybert_general: downstream 70.0 vs 60.0 (better)"]


@pytest.mark.parametrize(("low", "high", "noise"), [(1.0, 9.0, "beyond noise"), (-1.0, 9.0, "within noise"),
                                                     (0.0, 0.0, "within noise"), (-9.0, -1.0, "beyond noise")])
def test_verdict_says_whether_the_downstream_difference_is_beyond_the_noise(low, high, noise):
    comparison = {"difference": 5.0, "low": low, "high": high, "dev_examples": 277, "resamples": 300}
    lines = verdict(run("main", score=70.0), [run("base", score=65.0)], [comparison])
    assert lines[0] == (f"- main vs base: downstream 70.0 vs 65.0 (better; difference +5.0, 95% paired-bootstrap "
                        f"interval [{low:+.1f}, {high:+.1f}] over 277 dev examples: {noise})")
    assert lines[1:] and "the spread between fine-tuning seeds comes on top" in lines[-1]


def test_ablation_table_deltas_are_each_run_minus_this_run():
    main = run("triple_loss", 2.0, 80.0, loss_weights=TRIPLE, init_strategy="every_other",
               student_class="DistilBertForMaskedLM", param_counts={"student": 66_955_010})
    no_ce = run("no_ce", 2.25, 77.0, loss_weights={"alpha_mlm": 2.0, "alpha_cos": 1.0}, init_strategy="every_other")
    random_init = run("random_init", 3.5, 81.5, init_strategy="random")
    no_downstream = run("no_mlm", 2.1)
    header, rule, *rows = ablation_table(main, [no_ce, random_init, no_downstream])
    assert rows == [
        "| triple_loss | ce 5, mlm 2, cos 1 | DistilBert 67.0M | every_other | 2.000 | 0.500 | 80.0 | – | – |",
        "| no_ce | mlm 2, cos 1 | – | every_other | 2.250 | 0.500 | 77.0 | -3.0 | -2.96 (published) |",
        "| random_init | – | – | random | 3.500 | 0.500 | 81.5 | +1.5 | -3.69 (published) |",
        "| no_mlm | – | – | – | 2.100 | 0.500 | – | – | -0.31 (published) |",
    ]


def write_finetuned(run_dir, predictions: dict[str, list[tuple[int, int]]]) -> None:
    """A complete finetune stage: the student's dev (prediction, label) pairs per task, seed 1."""
    with open_stage(compose_config("finetune", [f"run_dir={run_dir}"]), artifacts.FINETUNE) as stage:
        for task, rows in predictions.items():
            out = artifacts.FinetuneRun.of(stage.path, "student", task, 1)
            out.path.mkdir(parents=True)
            out.predictions.write_text("".join(json.dumps({"split": "dev", "index": i, "label": y, "prediction": p})
                                               + "\n" for i, (p, y) in enumerate(rows)))


def test_downstream_comparison_uses_the_tasks_both_runs_were_fine_tuned_on(tmp_path):
    labels = [0, 1] * 10
    right = lambda n: [(y if i < n else 1 - y, y) for i, y in enumerate(labels)]  # noqa: E731  right on the first n
    write_finetuned(tmp_path / "main", {"rte": right(16), "mrpc": right(20)})
    write_finetuned(tmp_path / "base", {"rte": right(14), "sst2": right(0)})
    main = {"run": Run(tmp_path / "main"), "downstream_tasks": {"student": ["mrpc", "rte"]}}
    base = {"run": Run(tmp_path / "base"), "downstream_tasks": {"student": ["rte", "sst2"]}}
    comparison = downstream_comparison(main, base, resamples=50, seed=0)
    assert comparison["difference"] == pytest.approx(10.0) and comparison["dev_examples"] == 20  # RTE: 80% vs 70%
    assert downstream_comparison(main, {**base, "downstream_tasks": {"student": ["sst2"]}}, 50, 0) is None
