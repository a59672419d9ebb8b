"""Each arm's budget as the report states it, from planted finetune and task-distill stages: the steps given and
chosen, early stops and wall times per seed, the model selection each stage was configured with, and the protocol
of a comparison in words."""

from __future__ import annotations

from builders import plant_trained_runs, selected_metrics

from distilbert_cli import artifacts
from distilbert_cli.budgets import arm, budget_table, protocol

SELECTION = ["finetune.eval_every=10", "finetune.early_stopping=3"]


def planted_arm(run_dir, stage: str, overrides: list[str], seeds: dict[int, dict]) -> dict | None:
    return arm(plant_trained_runs(run_dir, stage, overrides, seeds), stage, "student")


def test_an_arm_with_model_selection_states_each_seed_and_its_protocol(tmp_path):
    run = plant_trained_runs(tmp_path / "run", artifacts.FINETUNE, SELECTION,
                             {1: selected_metrics(100, 40, True, 12.31), 2: selected_metrics(100, 100, False, 30.0)})
    found = arm(run, artifacts.FINETUNE, "student")
    assert found["selection"] == {"validation_examples": [20], "eval_every": 10, "early_stopping": 3}
    assert budget_table({"labels alone": found})[2:] == [
        "| labels alone | rte | 1, 2 | 100 | 40 / 100 | yes, at 70 / no | 20 held-out training examples (eval every 10 "
        "steps, early stopping after 3) | 12.3 / 30.0 |"]
    assert protocol({"a": found, "b": found}) == ("each arm at its own best budget, chosen on 20 held-out training "
                                                  "examples (eval every 10 steps, early stopping after 3)")
    assert arm(run, artifacts.TASK_DISTILL, "student") is None and arm(run, artifacts.FINETUNE, "teacher") is None
    other = planted_arm(tmp_path / "other", artifacts.FINETUNE, ["finetune.eval_every=50"],
                        {1: selected_metrics(100, 50, False, 1.0)})
    assert protocol({"a": found, "b": other}) == (
        "each arm at its own best budget, chosen on a: 20 held-out training examples (eval every 10 steps, early "
        "stopping after 3); b: 20 held-out training examples (eval every 50 steps, no early stopping)")


def test_a_run_before_model_selection_kept_its_last_step_and_compares_at_equal_steps(tmp_path):
    old = {"steps": 250, "train_seconds": 8.0}  # metrics.json from before `budget` existed
    found = planted_arm(tmp_path / "run", artifacts.FINETUNE, [], {56: old})
    assert found["selection"] is None
    assert budget_table({"old": found})[2:] == ["| old | rte | 56 | 250 | 250 | no | none (the last step's model) | "
                                                "8.0 |"]
    assert protocol({"a": found, "b": found}) == "at equal steps (no model selection: 250 steps each)"


def test_task_distillation_steps_and_arms_trained_differently_are_said_as_such(tmp_path):
    labels = planted_arm(tmp_path / "a", artifacts.FINETUNE, SELECTION, {1: selected_metrics(100, 40, True, 1.0)})
    distilled_metrics = {"steps": {"intermediate": 30, "prediction": 500}, "train_seconds": 2.0,
                         "validation_examples": 0, "budget": {"total_steps": 500, "trained_steps": 500,
                                                              "chosen_step": 500, "stopped_early": False,
                                                              "validation_score": None}}
    distilled = planted_arm(tmp_path / "b", artifacts.TASK_DISTILL, [], {1: distilled_metrics})
    assert budget_table({"td": distilled})[2] == ("| td | rte | 1 | 30 intermediate + 500 | 500 | no | "
                                                  "none (the last step's model) | 2.0 |")
    assert protocol({"labels alone": labels, "task-distilled": distilled}) == (
        "differently: labels alone at its own best budget, chosen on 20 held-out training examples (eval "
        "every 10 steps, early stopping after 3); task-distilled at a fixed 30 intermediate + 500 steps (no model "
        "selection)")
    fixed = planted_arm(tmp_path / "c", artifacts.FINETUNE, [], {1: {"steps": 250, "train_seconds": 1.0}})
    assert protocol({"labels alone": fixed, "task-distilled": distilled}) == (
        "at fixed, unequal budgets (no model selection: labels alone 250 steps, task-distilled 30 intermediate + 500 "
        "steps)")
    assert protocol({"labels alone": fixed, "task-distilled": None}) == "with budgets not recorded"
