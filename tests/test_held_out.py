"""The report's held-out MLM figures on planted targets: each figure's bootstrap interval over the masked targets,
the paired comparison of two runs on the same targets, uniform masks before smoothed ones, and an older run (no
validation_targets.safetensors) kept to its point figures."""

from __future__ import annotations

import numpy as np
from builders import planted_validation

from distilbert_cli.held_out import held_out_mlm, held_out_table, masks_note, mlm_checks, mlm_columns, paired_mlm

RESAMPLES = 2000  # enough for the hand-computed percentiles of four 0/1 values to hold


def scored(*args, **kwargs) -> dict:
    """A planted run with its held-out figures as the report scores them."""
    run = planted_validation(*args, **kwargs)
    run["held_out"] = held_out_mlm(run, RESAMPLES, seed=0)
    return run


def test_each_figure_has_its_bootstrap_interval_over_the_masked_targets():
    run = scored("ours", [1.0, 1.5, 2.0, 2.5], [5, 0, 0, 0])
    student = run["held_out"]["uniform"]["student"]
    # One hit in four: k hits of a resample is Binomial(4, 1/4); P(k = 0) = 0.32 > 2.5% puts the low end at 0,
    # P(k >= 3) = 0.051 > 2.5% > P(k = 4) = 0.004 the high end at 3/4. Agreement (3 in 4) mirrors it.
    assert {key: student["mlm_accuracy"][key] for key in ("mean", "low", "high", "items")} == {
        "mean": 0.25, "low": 0.0, "high": 0.75, "items": 4}
    assert (student["teacher_agreement"]["low"], student["teacher_agreement"]["high"]) == (0.25, 1.0)
    loss = student["mlm_loss"]
    assert loss["mean"] == 1.75 and 1.0 <= loss["low"] < 1.75 < loss["high"] <= 2.5  # within the targets' range
    assert run["held_out"]["uniform"]["teacher"]["mlm_accuracy"]["mean"] == 0.5
    assert list(run["held_out"]) == ["uniform", "smoothed"] and run["held_out"]["smoothed"]["targets"] == 4
    rows = held_out_table([run], run, RESAMPLES)
    assert f"| ours | uniform | 4 | 1.750 [{loss['low']:.3f}, {loss['high']:.3f}] | 25.0% [0.0, 75.0] | " \
           "75.0% [25.0, 100.0] |" in rows
    assert any(row.startswith("| teacher | uniform | 4 | 2.000 [1.000, 3.000] | 50.0% [0.0, 100.0] | – |")
               for row in rows)
    assert f"Intervals: 95% bootstrap over the masked targets ({RESAMPLES} resamples; " \
           "validation_targets.safetensors)." in rows


def test_two_runs_on_the_same_targets_are_compared_target_by_target_uniform_masks_first():
    ours = scored("ours", [1.0, 1.5, 2.0, 2.5], [5, 0, 0, 0])
    theirs = scored("theirs", [1.5, 2.0, 2.5, 3.0], [0, 0, 0, 0])
    paired = paired_mlm(ours, theirs, RESAMPLES, seed=0)
    # Every target's loss is 0.5 lower: a constant difference, its interval that constant. One more hit in four:
    # +25 points with the interval of one hit in four, [0, 75], which holds 0.
    assert (paired["uniform"]["mlm_loss"]["mean"], paired["uniform"]["mlm_loss"]["low"],
            paired["uniform"]["mlm_loss"]["high"]) == (-0.5, -0.5, -0.5)
    assert (paired["uniform"]["mlm_accuracy"]["low"], paired["uniform"]["mlm_accuracy"]["high"]) == (0.0, 0.75)
    assert mlm_checks(ours, theirs, paired) == [
        "validation MLM on uniform masks (BERT's objective): loss 1.750 vs 2.250 (better), accuracy 25.0% vs 0.0% "
        "(better); paired over 4 targets: loss -0.500 [-0.500, -0.500] (beyond noise), accuracy +25.0 points "
        "[+0.0, +75.0] (within noise)",
        "validation MLM on smoothed masks (rare tokens): loss 3.750 vs 4.250 (better), accuracy 0.0% vs 0.0% "
        "(NOT better); paired over 4 targets: loss -0.500 [-0.500, -0.500] (beyond noise), accuracy +0.0 points "
        "[+0.0, +0.0] (within noise)"]
    note = " ".join(masks_note(ours))
    assert note.startswith("Runs are compared on uniform masks first: those are BERT's own objective")
    assert ("The smoothed masks (probability ~ count^-0.7) pick rare tokens: the teacher predicts 50.0% of masked "
            "tokens drawn uniformly (loss 2.000) but 0.0% of those drawn with frequency smoothing (loss 4.000), so "
            "they rank runs but do not measure language modelling.") in note


def test_runs_on_different_targets_are_not_paired():
    ours = scored("ours", [1.0, 1.5, 2.0, 2.5], [5, 0, 0, 0])
    elsewhere = scored("elsewhere", [1.0, 1.0, 1.0, 1.0], [9, 9, 9, 9], labels=np.array([9, 9, 9, 9]))
    paired = paired_mlm(ours, elsewhere, RESAMPLES, seed=0)
    assert paired == {"uniform": None, "smoothed": None}
    assert mlm_checks(ours, elsewhere, paired)[0].endswith(
        "; not paired: the runs were scored on different targets (compare their intervals above)")
    assert paired_mlm(ours, ours, resamples=0, seed=0) == {"uniform": None, "smoothed": None}  # resampling off


def test_a_run_without_validation_targets_keeps_its_point_figures():
    old = scored("old", [1.5, 2.0, 2.5, 3.0], [0, 0, 0, 0], targets=False)
    ours = scored("ours", [1.0, 1.5, 2.0, 2.5], [5, 0, 0, 0])
    assert old["held_out"]["uniform"]["student"]["mlm_loss"] == {"mean": 2.25}
    assert not old["held_out"]["uniform"]["intervals"] and old["held_out"]["uniform"]["targets"] is None
    rows = held_out_table([ours, old], ours, RESAMPLES)
    assert "| old | uniform | – | 2.250 | 0.0% | 50.0% |" in rows
    assert ("Point figures only for old: no validation_targets.safetensors: a run from before distil train wrote "
            "it.") in rows
    paired = paired_mlm(ours, old, RESAMPLES, seed=0)
    assert paired == {"uniform": None, "smoothed": None}
    assert mlm_checks(ours, old, paired)[0] == (
        "validation MLM on uniform masks (BERT's objective): loss 1.750 vs 2.250 (better), accuracy 25.0% vs 0.0% "
        "(better); point figures only, no interval")


def test_a_run_from_before_the_uniform_masks_is_compared_on_its_smoothed_masks_only():
    old = planted_validation("older", [1.5, 2.0, 2.5, 3.0], [0, 0, 0, 0], targets=False)
    for model in ("student", "teacher"):
        del old["validation"][model]["uniform"]
    old["held_out"] = held_out_mlm(old, RESAMPLES, seed=0)
    assert list(old["held_out"]) == ["smoothed"]
    assert mlm_columns(old["validation"]["student"]) == "– / 4.250 | – / 0.0%"
    ours = scored("ours", [1.0, 1.5, 2.0, 2.5], [5, 0, 0, 0])
    assert mlm_columns(ours["validation"]["student"]) == "1.750 / 3.750 | 25.0% / 0.0%"
    checks = mlm_checks(ours, old, paired_mlm(ours, old, RESAMPLES, seed=0))
    assert len(checks) == 1 and checks[0].startswith("validation MLM on smoothed masks (rare tokens): loss 3.750 vs "
                                                     "4.250 (better)")
