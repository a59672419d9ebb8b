"""The report over a sweep, on members made by hand: which member is the reference, the member table's differences,
intervals, verdicts and published Table 4 deltas, and which swept values are charted."""

from __future__ import annotations

import pytest

from distilbert_cli.errors import UsageError
from distilbert_cli.sweep_report import member_table, plot_swept_values, reference_member


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
