"""The report's logic as functions: the verdict of each comparison (held-out MLM on uniform masks first, the
downstream score with the protocol of its arms), the ablation table's deltas, the tasks two runs are compared on,
and each arm's budget beside the verdicts."""

from __future__ import annotations

import json

import pytest
from builders import open_stage, plant_trained_runs, selected_metrics

from distilbert_cli import artifacts
from distilbert_cli.budgets import arm, protocol
from distilbert_cli.config import compose_config
from distilbert_cli.held_out import held_out_mlm
from distilbert_cli.reporting import (
    ablation_table,
    distillation_lines,
    downstream_comparison,
    task_distillation_lines,
    verdict,
)
from distilbert_cli.rundir import Run


def run(name: str, mlm_loss: float | None = None, score: float | None = None, uniform: float | None = None,
        **extra) -> dict:
    """A `run_summary`-shaped run: validation MLM loss (smoothed masks; `uniform`: and uniform ones) and downstream
    score of its student, its held-out figures as the report scores them (point figures: no per-target file)."""
    summary = {"name": name, **extra}
    if mlm_loss is not None:
        summary["validation"] = {"student": {"mlm_loss": mlm_loss, "mlm_accuracy": 0.5}}
        if uniform is not None:
            summary["validation"]["student"]["uniform"] = {"mlm_loss": uniform, "mlm_accuracy": 0.25}
    if score is not None:
        summary["downstream"] = {"student": score}
    summary["held_out"] = held_out_mlm(summary, resamples=0, seed=0)
    return summary


TRIPLE = {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}
SMOOTHED = "validation MLM on smoothed masks (rare tokens)"
UNRECORDED = "fine-tuned with budgets not recorded"


def test_verdict_says_better_or_not_on_each_figure():
    main = run("triple_loss", mlm_loss=2.0, score=70.0, loss_weights=TRIPLE)
    lines = verdict(main, [run("worse", 2.5, 65.0, loss_weights=TRIPLE), run("better", 1.5, 75.0, loss_weights=TRIPLE),
                           run("tied", 2.0, 70.0, loss_weights=TRIPLE)], [None, None, None], [{}, {}, {}])
    assert lines == [
        "- triple_loss vs worse:",
        f"  - {SMOOTHED}: loss 2.000 vs 2.500 (better), accuracy 50.0% vs 50.0% (NOT better); point figures only, "
        "no interval",
        f"  - downstream 70.0 vs 65.0 (better), {UNRECORDED}",
        "- triple_loss vs better:",
        f"  - {SMOOTHED}: loss 2.000 vs 1.500 (NOT better), accuracy 50.0% vs 50.0% (NOT better); point figures "
        "only, no interval",
        f"  - downstream 70.0 vs 75.0 (NOT better), {UNRECORDED}",
        "- triple_loss vs tied:",
        f"  - {SMOOTHED}: loss 2.000 vs 2.000 (NOT better), accuracy 50.0% vs 50.0% (NOT better); point figures "
        "only, no interval",
        f"  - downstream 70.0 vs 70.0 (NOT better), {UNRECORDED}",
    ]  # lower loss is better, higher accuracy and score are better, a tie is not better; no comparison, no noise


def test_verdict_compares_on_uniform_masks_first():
    main = run("triple_loss", 7.0, uniform=5.0, loss_weights=TRIPLE)
    lines = verdict(main, [run("mlm_only", 6.5, uniform=6.0, loss_weights=TRIPLE)], [None], [{}])
    assert [line.split(":")[0] for line in lines] == ["- triple_loss vs mlm_only",
                                                      "  - validation MLM on uniform masks (BERT's objective)",
                                                      f"  - {SMOOTHED}"]
    assert "loss 5.000 vs 6.000 (better)" in lines[1] and "loss 7.000 vs 6.500 (NOT better)" in lines[2]


def test_verdict_leaves_out_the_mlm_loss_of_a_run_whose_objective_does_not_train_the_head():
    tinybert = run("tinybert_general", 9.0, 60.0, loss_weights={"alpha_hidden": 1.0, "alpha_attn_scores": 1.0})
    lines = verdict(run("triple_loss", 2.0, 70.0, loss_weights=TRIPLE), [tinybert], [None], [{}])
    assert lines == ["- triple_loss vs tinybert_general:", f"  - downstream 70.0 vs 60.0 (better), {UNRECORDED}"]


@pytest.mark.parametrize(("low", "high", "noise"), [(1.0, 9.0, "beyond noise"), (-1.0, 9.0, "within noise"),
                                                     (0.0, 0.0, "within noise"), (-9.0, -1.0, "beyond noise")])
def test_verdict_says_whether_the_downstream_difference_is_beyond_the_noise(low, high, noise):
    comparison = {"difference": 5.0, "low": low, "high": high, "dev_examples": 277, "resamples": 300}
    lines = verdict(run("main", score=70.0), [run("base", score=65.0)], [comparison], [{}])
    assert lines[1] == (f"  - downstream 70.0 vs 65.0 (better; difference +5.0, 95% paired-bootstrap interval "
                        f"[{low:+.1f}, {high:+.1f}] over 277 dev examples: {noise}), {UNRECORDED}")
    assert lines[2:] and "the spread between fine-tuning seeds comes on top" in lines[-1]


def test_ablation_table_deltas_are_each_run_minus_this_run():
    main = run("triple_loss", 2.0, 80.0, uniform=1.5, loss_weights=TRIPLE, init_strategy="every_other",
               student_class="DistilBertForMaskedLM", param_counts={"student": 66_955_010})
    no_ce = run("no_ce", 2.25, 77.0, loss_weights={"alpha_mlm": 2.0, "alpha_cos": 1.0}, init_strategy="every_other")
    random_init = run("random_init", 3.5, 81.5, init_strategy="random")
    no_downstream = run("no_mlm", 2.1)
    header, rule, *rows = ablation_table(main, [no_ce, random_init, no_downstream])
    assert "val MLM loss (uniform / smoothed)" in header
    assert rows == [
        "| triple_loss | ce 5, mlm 2, cos 1 | DistilBert 67.0M | every_other | 1.500 / 2.000 | 25.0% / 50.0% | "
        "80.0 | – | – |",
        "| no_ce | mlm 2, cos 1 | – | every_other | – / 2.250 | – / 50.0% | 77.0 | -3.0 | -2.96 (published) |",
        "| random_init | – | – | random | – / 3.500 | – / 50.0% | 81.5 | +1.5 | -3.69 (published) |",
        "| no_mlm | – | – | – | – / 2.100 | – / 50.0% | – | – | -0.31 (published) |",
    ]


def test_the_report_states_each_arms_budget_and_protocol_next_to_the_verdict(tmp_path):
    selection = ["finetune.eval_every=10", "finetune.early_stopping=3"]
    main_run = plant_trained_runs(tmp_path / "main", artifacts.FINETUNE, selection,
                                  {1: selected_metrics(100, 40, True, 12.0)})
    base_run = plant_trained_runs(tmp_path / "base", artifacts.FINETUNE, selection,
                                  {1: selected_metrics(100, 100, False, 30.0)})
    main = run("main", score=70.0, finetune_arm=arm(main_run, artifacts.FINETUNE, "student"))
    base = run("base", score=65.0, finetune_arm=arm(base_run, artifacts.FINETUNE, "student"))
    selected = "20 held-out training examples (eval every 10 steps, early stopping after 3)"
    verdict_lines = verdict(main, [base], [None], [{}])
    assert verdict_lines[1] == ("  - downstream 70.0 vs 65.0 (better), fine-tuned each arm at its own best budget, "
                                f"chosen on {selected}")
    lines = distillation_lines(main, [base], verdict_lines, resamples=0)
    budgets = lines[lines.index("Each downstream arm's budget (one value per seed):"):]
    assert budgets[4:6] == [
        f"| main: student fine-tuned | rte | 1 | 100 | 40 | yes, at 70 | {selected} | 12.0 |",
        f"| base: student fine-tuned | rte | 1 | 100 | 100 | no | {selected} | 30.0 |"]
    # task distillation: labels alone at its best budget, the task-distilled student at a fixed budget
    distilled = plant_trained_runs(tmp_path / "main", artifacts.TASK_DISTILL, [], {1: {
        "steps": {"intermediate": 0, "prediction": 500}, "train_seconds": 50.0, "validation_examples": 0,
        "budget": {"total_steps": 500, "trained_steps": 500, "chosen_step": 500, "stopped_early": False,
                   "validation_score": None}}})
    arms = {"labels alone": main["finetune_arm"], "task-distilled": arm(distilled, artifacts.TASK_DISTILL, "student")}
    main["task_distill"] = {"augment": {"method": "tang", "copies": 1}, "transfer": {"rows": 640},
                            "training": {"losses": {"mse": 1.0}, "temperature": 1.0}}
    entry = {"run": main, "labels": 70.0, "distilled": 74.0, "labels_training": {"train_examples": 64},
             "comparison": {"difference": 4.0, "low": 1.0, "high": 7.0, "dev_examples": 100},
             "arms": arms, "protocol": protocol(arms)}
    lines = task_distillation_lines([entry])
    assert ("- main: task-distilled 74.0 vs labels alone 70.0 (better); difference +4.0, 95% paired-bootstrap "
            "interval [+1.0, +7.0] over 100 dev examples: beyond noise; trained differently: labels alone at "
            f"its own best budget, chosen on {selected}; task-distilled at a fixed 500 "
            "steps (no model selection)") in lines
    assert lines[-2:] == [
        f"| main: labels alone | rte | 1 | 100 | 40 | yes, at 70 | {selected} | 12.0 |",
        "| main: task-distilled | rte | 1 | 500 | 500 | no | none (the last step's model) | 50.0 |"]


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
