"""The report over a sweep, on members made by hand: which member is the reference, the member table's differences,
intervals, verdicts, protocol and published Table 4 deltas, the held-out MLM comparisons against the reference, the
members' fine-tuning budgets, and which swept values are charted."""

from __future__ import annotations

import pytest
from builders import plant_trained_runs, planted_validation, selected_metrics

from distilbert_cli import artifacts
from distilbert_cli.budgets import arm
from distilbert_cli.errors import UsageError
from distilbert_cli.sweep_report import budget_lines, held_out_lines, member_table, plot_swept_values, reference_member


def member(name: str, swept: dict, score: float | None = None, mlm: float | None = None, state: str = "complete",
           error: str | None = None, experiment: str | None = None) -> dict:
    found = {"name": name, "swept": swept, "state": state, "error": error, "experiment": experiment}
    if score is not None:
        found["downstream"] = {"student": score}
    if mlm is not None:
        found["validation"] = {"student": {"mlm_loss": mlm, "mlm_accuracy": 0.25}}
    return found


def table4() -> list[dict]:
    return [member(f"+experiment={e}", {"+experiment": e}, score, experiment=e)
            for e, score in (("triple_loss", 70.0), ("no_ce", 66.5), ("random_init", 71.25))]


def rows(lines: list[str]) -> dict[str, list[str]]:
    return {line.split(" | ")[0].lstrip("| "): [cell.strip() for cell in line.strip("|").split("|")]
            for line in lines if line.startswith("| +") or line.startswith("| lr")}


def test_the_reference_is_the_triple_loss_of_a_table4_sweep_else_the_first_or_the_one_named():
    members = table4()[::-1]
    assert reference_member(members, None)["name"] == "+experiment=triple_loss"
    assert reference_member(members, "no_ce")["name"] == "+experiment=no_ce"  # a swept value
    assert reference_member(members, "+experiment=random_init")["name"] == "+experiment=random_init"
    plain = [member("lr=1", {"lr": "1"}), member("lr=2", {"lr": "2"})]
    assert reference_member(plain, None)["name"] == "lr=1"
    with pytest.raises(UsageError, match="report.reference=nope: no member of the sweep"):
        reference_member(plain, "nope")


def test_the_member_table_gives_each_difference_its_interval_verdict_and_the_published_delta():
    members = table4()
    comparisons = {"+experiment=triple_loss": None,
                   "+experiment=no_ce": {"difference": -3.5, "low": -5.0, "high": -1.0},
                   "+experiment=random_init": {"difference": 1.25, "low": -0.5, "high": 3.0}}
    found = rows(member_table(members, members[0], comparisons))
    # cells: member, state, objective, student, init, val loss, val acc, downstream, delta, interval, verdict, published
    assert found["+experiment=triple_loss"][7:] == ["70.0", "–", "–", "–", "0 (reference)"]
    assert found["+experiment=no_ce"][7:] == ["66.5", "-3.5", "[-5.0, -1.0]", "beyond noise", "-2.96"]  # 66.5 - 70
    assert found["+experiment=random_init"][7:] == ["71.2", "+1.2", "[-0.5, +3.0]", "within noise", "-3.69"]


def test_a_failed_member_is_named_with_its_error():
    members = [*table4(), member("+experiment=nope", {"+experiment": "nope"}, state="failed", error="no such preset")]
    found = rows(member_table(members, members[0], {}))
    assert found["+experiment=nope"][1] == "failed: no such preset" and found["+experiment=nope"][7] == "–"


def test_the_chart_plots_the_metric_against_each_numeric_swept_key(tmp_path):
    members = [member(f"lr={lr},+experiment={e}", {"lr": lr, "+experiment": e}, mlm=loss)
               for lr, e, loss in (("1e-4", "a", 3.0), ("5e-4", "a", 2.5), ("1e-4", "b", 3.2), ("5e-4", "b", 2.9))]
    assert plot_swept_values(members, tmp_path / "chart.png") == ["lr"]  # the experiment is not a number
    assert (tmp_path / "chart.png").stat().st_size > 0
    same = [member("lr=1", {"lr": "1"}, mlm=2.0)]
    assert plot_swept_values(same, tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()


def test_the_member_table_says_how_the_students_were_fine_tuned(tmp_path):
    members = table4()
    for i, found in enumerate(members):
        run = plant_trained_runs(tmp_path / str(i), artifacts.FINETUNE, ["finetune.eval_every=5"],
                                 {1: selected_metrics(60, 10 * (i + 1), False, 3.0 + i)})
        found["finetune_arm"] = arm(run, artifacts.FINETUNE, "student")
    comparisons = {"+experiment=no_ce": {"difference": -3.5, "low": -5.0, "high": -1.0}}
    lines = member_table(members, members[0], comparisons)
    assert ("Δ compares students fine-tuned each arm at its own best budget, chosen on 20 held-out training examples "
            "(eval every 5 steps, no early stopping).") in lines
    budgets = budget_lines(members)
    assert budgets[0] == "## Fine-tuning budgets (one value per seed)"
    assert "| +experiment=no_ce | rte | 1 | 60 | 20 | no | 20 held-out training examples (eval every 5 steps, no " \
           "early stopping) | 4.0 |" in budgets


def test_members_are_compared_with_the_reference_on_the_same_held_out_targets_uniform_masks_first():
    triple = {**planted_validation("+experiment=triple_loss", [1.0, 1.5, 2.0, 2.5], [5, 6, 7, 8]),
              "loss_weights": {"alpha_ce": 5.0, "alpha_mlm": 2.0, "alpha_cos": 1.0}}
    mlm_only = {**planted_validation("+experiment=mlm_only", [2.0, 2.5, 3.0, 3.5], [5, 6, 7, 8]),
                "loss_weights": {"alpha_mlm": 1.0}}
    tinybert = {**planted_validation("+experiment=tinybert", [9.0] * 4, [0] * 4), "loss_weights": {"alpha_hidden": 1.0}}
    lines, pairs = held_out_lines([triple, mlm_only, tinybert], triple, resamples=2000, seed=0)
    assert set(pairs) == {"+experiment=mlm_only"}  # tinybert's untrained head says nothing
    start = lines.index("- +experiment=mlm_only vs +experiment=triple_loss:")
    # every target's loss is 1 higher: a constant paired difference, its interval that constant
    assert lines[start + 1] == (
        "  - validation MLM on uniform masks (BERT's objective): loss 2.750 vs 1.750 (NOT better), accuracy 100.0% "
        "vs 100.0% (NOT better); paired over 4 targets: loss +1.000 [+1.000, +1.000] (beyond noise), accuracy +0.0 "
        "points [+0.0, +0.0] (within noise)")
    assert lines[start + 2].startswith("  - validation MLM on smoothed masks (rare tokens): loss 4.750 vs 3.750")
    assert "| +experiment=tinybert | uniform | 4 | 9.000 [9.000, 9.000] | 0.0% [0.0, 0.0] | 50.0% [0.0, 100.0] |" \
        in lines
