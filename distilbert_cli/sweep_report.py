"""A report over a sweep (`distil report <run_dir>` where `distil sweep` ran): one row per member, each member's
downstream score against a reference member's with a paired-bootstrap interval and the protocol the students were
fine-tuned under, the paper's Table 4 deltas beside the members that are its ablations, the members' held-out MLM
figures with their intervals and paired comparisons against the reference (uniform masks first), each member's
fine-tuning budget, and the metric charted against each swept numeric value."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from distilbert_cli import artifacts
from distilbert_cli.artifacts import read_json
from distilbert_cli.budgets import budget_table
from distilbert_cli.errors import UsageError
from distilbert_cli.held_out import held_out_mlm, held_out_table, masks_note, mlm_checks, mlm_columns, paired_mlm
from distilbert_cli.reporting import (
    MEMBER_TABLE_HEADING,
    PUBLISHED_ABLATIONS,
    comparison_lines,
    downstream_comparison,
    downstream_protocol,
    fmt,
    init_label,
    plot_losses,
    published_ablation,
    run_summary,
    student_label,
    trains_head,
)
from distilbert_cli.rundir import Run
from distilbert_cli.tasks.results import noise_verdict

# The paper's Table 4 compares each ablation with the triple loss.
TABLE4_REFERENCE = "triple_loss"


def sweep_record(root: Run) -> dict | None:
    """`<run_dir>/sweep/sweep.json` (None for a run that is not a sweep's)."""
    path = artifacts.SweepOutputs(root.stage_dir(artifacts.SWEEP)).record
    return read_json(path) if path.is_file() else None


def member_summaries(root: Run, record: dict) -> list[dict]:
    """Each member's `run_summary` (its run reading the sweep's shared stages), its swept values and the state its
    last attempt ended in."""
    sweep_dir = artifacts.SweepOutputs(root.stage_dir(artifacts.SWEEP))
    members = []
    for entry in record["members"]:
        summary = run_summary(Run(Path(entry["run_dir"]), root.trust_remote_code, upstream=root))
        outcome_path = sweep_dir.member_record(entry["name"])
        outcome = read_json(outcome_path) if outcome_path.is_file() else {"status": "pending"}
        summary.update(name=entry["name"], swept=entry["swept"], state=outcome["status"], error=outcome.get("error"))
        members.append(summary)
    return members


def reference_member(members: list[dict], reference: str | None) -> dict:
    """The member named `reference`, or the one member with it as a swept value; by default the triple-loss member
    of a Table 4 sweep, else the first."""
    if reference is None:
        table4 = [m for m in members if TABLE4_REFERENCE in m["swept"].values()]
        if table4 and any(published_ablation(m) is not None for m in members):
            return table4[0]
        return members[0]
    found = [m for m in members if m["name"] == reference] or [m for m in members if reference in m["swept"].values()]
    if len(found) != 1:
        names = ", ".join(m["name"] for m in members)
        raise UsageError(f"report.reference={reference}: {'no' if not found else 'more than one'} member of the sweep "
                         f"is named so or has it as a swept value (members: {names})")
    return found[0]


def compare(members: list[dict], reference: dict, resamples: int, seed: int) -> dict[str, dict | None]:
    """Each other member's paired bootstrap of its downstream score minus the reference's."""
    return {m["name"]: downstream_comparison(m, reference, resamples, seed) if resamples and m is not reference
            else None for m in members}


def member_table(members: list[dict], reference: dict, comparisons: dict[str, dict | None]) -> list[str]:
    """One row per member: state, objective, student, validation MLM, downstream score, its difference from the
    reference with the 95% interval and whether that is beyond the noise, and the paper's Table 4 delta."""
    lines = [MEMBER_TABLE_HEADING, "",
             f"Reference: {reference['name']}. Δ: a member's downstream score minus the reference's, with its 95% "
             "paired-bootstrap interval over the dev examples.", "",
             "| member | state | objective (weights) | student | init | val MLM loss (uniform / smoothed) | "
             "val MLM acc (uniform / smoothed) | downstream | Δ vs reference | 95% interval | verdict | "
             "published Δ GLUE (paper Table 4) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = reference.get("downstream", {}).get("student")
    table4 = any(published_ablation(m) is not None for m in members)
    for member in members:
        score = member.get("downstream", {}).get("student")
        delta = None if score is None or base is None or member is reference else score - base
        comparison = comparisons.get(member["name"])
        interval = "–" if comparison is None else f"[{comparison['low']:+.1f}, {comparison['high']:+.1f}]"
        verdict = "–" if comparison is None else noise_verdict(comparison)
        weights = ", ".join(f"{k.removeprefix('alpha_')} {v:g}" for k, v in member.get("loss_weights", {}).items())
        published, mlm = published_ablation(member), mlm_columns(member.get("validation", {}).get("student"))
        published_cell = (f"{published:+.2f}" if published is not None
                          else "0 (reference)" if table4 and member.get("experiment") == TABLE4_REFERENCE else "–")
        state = member["state"] + (f": {member['error']}" if member["state"] == "failed" and member["error"] else "")
        lines.append(f"| {member['name']} | {state} | {weights or '–'} | {student_label(member)} | "
                     f"{init_label(member)} | {mlm} | {fmt(score, 1)} | "
                     f"{'–' if delta is None else f'{delta:+.1f}'} | {interval} | {verdict} | {published_cell} |")
    protocols = {member["name"]: downstream_protocol(member, reference) for member in members
                 if comparisons.get(member["name"]) is not None}
    if len(set(protocols.values())) == 1:
        lines += ["", f"Δ compares students fine-tuned {next(iter(protocols.values()))}."]
    elif protocols:
        lines += ["", "Δ compares students fine-tuned:", *(f"- {name}: {words}" for name, words in protocols.items())]
    if table4:
        lines += ["", "The published deltas are GLUE macro-score changes after full general distillation (Sanh et al. "
                      f"2019, Table 4: {', '.join(f'{k} {v:+.2f}' for k, v in PUBLISHED_ABLATIONS.items())}); ours "
                      "are on this run's tasks and budget."]
    return lines


def held_out_lines(members: list[dict], reference: dict, resamples: int, seed: int) -> tuple[list[str], dict]:
    """The members' held-out MLM figures with their intervals, and each member whose objective trains the MLM head
    compared target by target with the reference, uniform masks first; the paired comparisons, by member."""
    for member in members:
        member["held_out"] = held_out_mlm(member, resamples, seed)
    compared = [m for m in members if m is not reference and trains_head(m) and trains_head(reference)]
    pairs = {m["name"]: paired_mlm(m, reference, resamples, seed) for m in compared}
    checks = [line for m in compared for line in comparison_lines(f"{m['name']} vs {reference['name']}",
                                                                   mlm_checks(m, reference, pairs[m["name"]]))]
    lines = [*held_out_table(members, reference, resamples), *masks_note(reference), *checks]
    return (["## Held-out masked-token prediction", "", *lines, ""] if lines else []), pairs


def budget_lines(members: list[dict]) -> list[str]:
    """Each member's student fine-tuning budget: the steps given and chosen, early stops, wall time."""
    table = budget_table({member["name"]: member.get("finetune_arm") for member in members})
    return ["## Fine-tuning budgets (one value per seed)", "", *table, ""] if table else []


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def metric(member: dict) -> tuple[str, float] | None:
    """What the chart plots: the downstream score, else the validation MLM loss."""
    if (score := member.get("downstream", {}).get("student")) is not None:
        return "downstream score", score
    if (loss := member.get("validation", {}).get("student", {}).get("mlm_loss")) is not None:
        return "validation MLM loss", loss
    return None


def plot_swept_values(members: list[dict], path: Path) -> list[str]:
    """One panel per swept key whose values are all numbers (two or more of them): the metric against the value, a
    line per combination of the other swept values. Returns the keys plotted (none: no chart written)."""
    scored = [(m, metric(m)) for m in members if metric(m) is not None]
    if not scored:
        return []
    name = "downstream score" if any(found[0] == "downstream score" for _, found in scored) else "validation MLM loss"
    scored = [(m, value) for m, (kind, value) in scored if kind == name]
    keys = [key for key in scored[0][0]["swept"]
            if all(_number(m["swept"][key]) is not None for m, _ in scored)
            and len({m["swept"][key] for m, _ in scored}) > 1]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=True):
        lines: dict[str, list[tuple[float, float]]] = {}
        for member, value in scored:
            others = ", ".join(f"{k}={v}" for k, v in member["swept"].items() if k != key)
            lines.setdefault(others, []).append((_number(member["swept"][key]), value))
        for label, points in lines.items():
            axis.plot(*zip(*sorted(points), strict=True), marker="o", label=label or None)
        axis.set(xlabel=key.lstrip("+~"), ylabel=name, title=f"{name} vs {key.lstrip('+~')}")
        if any(lines):
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return keys


def render_sweep(root: Run, record: dict, members: list[dict], reference: dict, comparisons: dict,
                 sections: list[str], charted: list[str], has_curves: bool) -> str:
    failed = [m["name"] for m in members if m["state"] == "failed"]
    lines = [f"# Sweep report: {root.path.name}", "",
             f"Run directory `{root.path}`: {len(members)} member(s) in `{root.stage_dir(artifacts.SWEEP)}`, each "
             f"running {', '.join(record['stages'])}; shared by every member, in place: "
             f"{', '.join(record['shared']) or 'nothing'}.", ""]
    if failed:
        lines += [f"Failed: {', '.join(failed)} (their errors are in the table).", ""]
    lines += [*member_table(members, reference, comparisons), ""]
    if any(comparisons.values()):
        lines += ["The intervals resample the dev examples only: the spread between fine-tuning seeds comes on top.",
                  ""]
    lines += sections
    if charted:
        lines += ["## The metric against each swept value", "", "![metric vs swept values](sweep_values.png)", ""]
    if has_curves:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines) + "\n"


def write_sweep_report(root: Run, record: dict, out_dir: Path, reference_name: str | None, resamples: int,
                       seed: int) -> dict:
    """report.md and its charts for a sweep's run directory; the facts for the report's manifest."""
    members = member_summaries(root, record)
    reference = reference_member(members, reference_name)
    comparisons = compare(members, reference, resamples, seed)
    held_out, pairs = held_out_lines(members, reference, resamples, seed)
    charted = plot_swept_values(members, out_dir / "sweep_values.png")
    has_curves = plot_losses(members, out_dir / "loss_curves.png")
    (out_dir / "report.md").write_text(render_sweep(root, record, members, reference, comparisons,
                                                    [*held_out, *budget_lines(members)], charted, has_curves))
    return {"reference": reference["name"], "members": [m["name"] for m in members],
            "downstream_comparisons": comparisons,
            "downstream_protocols": {m["name"]: downstream_protocol(m, reference) for m in members
                                     if m is not reference},
            "held_out_mlm": {m["name"]: m["held_out"] for m in members}, "mlm_comparisons": pairs,
            "charted": charted}
