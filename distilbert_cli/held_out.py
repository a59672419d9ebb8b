"""The report's held-out MLM figures (distil train's validation.json and validation_targets.safetensors): each run's
masked-token loss, accuracy and top-1 agreement with the teacher on uniform masks (BERT's objective, compared first)
and on frequency-smoothed ones, each with a 95% bootstrap interval over the masked targets; two runs scored on the
same targets compared target by target (a paired bootstrap); the table, the note on why uniform masks come first,
and the verdict lines."""

from __future__ import annotations

import numpy as np

from distilbert_cli.tasks.results import bootstrap_mean, noise_verdict

# distil train's validation masks, in the order runs are compared on them: uniform over the real tokens (BERT's own
# objective) first, then frequency-smoothed (mostly rare tokens: they rank runs but do not measure language modelling).
MASKS = ("uniform", "smoothed")
MASKS_WORDS = {"uniform": "uniform masks (BERT's objective)", "smoothed": "smoothed masks (rare tokens)"}
# validation.json's figures of a model on one set of masks (agreement: the student's top-1 = the teacher's).
MLM_METRICS = ("mlm_loss", "mlm_accuracy", "teacher_agreement")


def mlm_columns(model: dict | None) -> str:
    """A model's validation MLM loss and accuracy (its entry of validation.json) as two table cells, uniform masks
    first: "5.010 / 7.231 | 25.3% / 9.1%" (a run from before the uniform masks shows "–" for them)."""
    model = model or {}
    figures = [model.get("uniform", {}), model]

    def cell(metric: str, percent: bool) -> str:
        values = [found.get(metric) for found in figures]
        if all(value is None for value in values):
            return "–"
        return " / ".join("–" if value is None else f"{100 * value:.1f}%" if percent else f"{value:.3f}"
                          for value in values)

    return f"{cell('mlm_loss', False)} | {cell('mlm_accuracy', True)}"


def target_values(targets: dict | None, masks: str) -> dict | None:
    """Per held-out target of one set of masks (validation_targets.safetensors): each model's loss, hit (top-1 =
    label) and, for the student, agreement with the teacher's top-1; None without that set's targets."""
    if targets is None or not len(targets.get(f"{masks}_labels", ())):
        return None
    labels, found = targets[f"{masks}_labels"], {}
    for model in ("student", "teacher"):
        if f"{model}_{masks}_losses" in targets:
            found[model] = {"mlm_loss": targets[f"{model}_{masks}_losses"],
                            "mlm_accuracy": targets[f"{model}_{masks}_predictions"] == labels}
    if "teacher" in found:
        found["student"]["teacher_agreement"] = (targets[f"student_{masks}_predictions"]
                                                 == targets[f"teacher_{masks}_predictions"])
    return found


def held_out_mlm(run: dict, resamples: int, seed: int) -> dict:
    """The run's validation MLM figures per set of masks (uniform first): student's and teacher's loss and accuracy,
    the student's top-1 agreement with the teacher, each the mean over the masked targets with its 95% bootstrap
    interval over them ({"mean", "low", "high", ...}); only validation.json's point figures ({"mean"}) for a run
    without validation_targets.safetensors (older) or with resampling off. "intervals" says which."""
    validation, found = run.get("validation") or {}, {}
    for masks in MASKS:
        student, teacher = validation.get("student") or {}, validation.get("teacher")
        if masks == "uniform":
            student, teacher = student.get("uniform"), (teacher or {}).get("uniform")
        if not student:
            continue
        values = target_values(run.get("validation_targets"), masks) if resamples else None
        figures = {}
        for model, points in (("student", student), ("teacher", teacher)):
            if points:
                per_target = (values or {}).get(model, {})
                figures[model] = {metric: (bootstrap_mean(per_target[metric], resamples, seed) if metric in per_target
                                           else None) or {"mean": points[metric]}
                                  for metric in MLM_METRICS if metric in points}
        found[masks] = {**figures, "intervals": values is not None,
                        "targets": None if values is None else len(values["student"]["mlm_loss"])}
    return found


def paired_mlm(ours: dict, theirs: dict, resamples: int, seed: int) -> dict[str, dict | None]:
    """Per set of masks, the students' MLM loss and accuracy compared target by target where both runs were scored
    on the same targets (identical labels): ours minus theirs with its 95% paired-bootstrap interval; None where
    they were not (or one run has no per-target file, or resampling is off)."""
    found: dict[str, dict | None] = {}
    for masks in MASKS:
        values = [target_values(run.get("validation_targets"), masks) for run in (ours, theirs)]
        if not resamples or None in values or not np.array_equal(
                *(run["validation_targets"][f"{masks}_labels"] for run in (ours, theirs))):
            found[masks] = None
            continue
        a, b = (each["student"] for each in values)
        pair = {metric: bootstrap_mean(a[metric].astype(np.float64) - b[metric].astype(np.float64), resamples, seed)
                for metric in ("mlm_loss", "mlm_accuracy")}
        found[masks] = pair if None not in pair.values() else None  # None: a non-finite loss, nothing to resample
    return found


def figure_cell(figure: dict | None, percent: bool) -> str:
    """A mean with its 95% interval where there is one: "5.010 [4.950, 5.070]", "25.3% [24.2, 26.4]"."""
    if figure is None:
        return "–"
    scale, digits, unit = (100, 1, "%") if percent else (1, 3, "")
    text = f"{scale * figure['mean']:.{digits}f}{unit}"
    if "low" in figure:
        text += f" [{scale * figure['low']:.{digits}f}, {scale * figure['high']:.{digits}f}]"
    return text


def held_out_table(runs: list[dict], teacher_of: dict, resamples: int) -> list[str]:
    """Each run's held-out MLM figures (its `held_out`), uniform masks first, then the teacher's (of `teacher_of`),
    each with its interval; which runs have point figures only, and why."""
    rows = []
    for name, held_out, model in [*((run["name"], run.get("held_out", {}), "student") for run in runs),
                                  ("teacher", teacher_of.get("held_out", {}), "teacher")]:
        for masks, figures in held_out.items():
            if model in figures:
                found = figures[model]
                rows.append(f"| {name} | {masks} | {figures['targets'] or '–'} | "
                            f"{figure_cell(found.get('mlm_loss'), False)} | "
                            f"{figure_cell(found.get('mlm_accuracy'), True)} | "
                            f"{figure_cell(found.get('teacher_agreement'), True)} |")
    if not rows:
        return []
    lines = ["| run | masks | targets | MLM loss [95% interval] | MLM accuracy [95% interval] | "
             "top-1 agreement with the teacher [95% interval] |", "|---|---|---|---|---|---|", *rows, ""]
    points = [run["name"] for run in runs if run.get("held_out") and not any(
        figures["intervals"] for figures in run["held_out"].values())]
    if resamples:
        lines.append(f"Intervals: 95% bootstrap over the masked targets ({resamples} resamples; "
                     "validation_targets.safetensors).")
    if points:
        reason = ("resampling is off (report.bootstrap_resamples=0)" if not resamples else
                  "no validation_targets.safetensors: a run from before distil train wrote it")
        lines.append(f"Point figures only for {', '.join(points)}: {reason}.")
    return [*lines, ""]


def masks_note(main: dict) -> list[str]:
    """Why runs are compared on uniform masks first, with the teacher's figures on both sets of masks (`main`'s)."""
    validation = main.get("validation", {})
    teacher = validation.get("teacher")
    if "smoothing_exponent" not in validation:
        return []
    teacher_words = ""
    if teacher and "uniform" in teacher:
        teacher_words = (f": the teacher predicts {100 * teacher['uniform']['mlm_accuracy']:.1f}% of masked tokens "
                         f"drawn uniformly (loss {teacher['uniform']['mlm_loss']:.3f}) but "
                         f"{100 * teacher['mlm_accuracy']:.1f}% of those drawn with frequency smoothing (loss "
                         f"{teacher['mlm_loss']:.3f})")
    lines = ["Runs are compared on uniform masks first: those are BERT's own objective (every real token as likely to "
             f"be masked). The smoothed masks (probability ~ count^-{validation['smoothing_exponent']:g}) pick rare "
             f"tokens{teacher_words}, so they rank runs but do not measure language modelling."]
    if teacher_words:
        lines.append("Read a student's soft targets as coming from a teacher that is right on about "
                     f"{100 * teacher['uniform']['mlm_accuracy']:.0f}% of ordinary masked words.")
    return [" ".join(lines), ""]


def difference(interval: dict, percent: bool) -> str:
    """A paired difference with its interval and verdict: "-0.970 [-1.020, -0.920] (beyond noise)", accuracies
    in points."""
    scale, digits, unit = (100, 1, " points") if percent else (1, 3, "")
    return (f"{scale * interval['mean']:+.{digits}f}{unit} [{scale * interval['low']:+.{digits}f}, "
            f"{scale * interval['high']:+.{digits}f}] ({noise_verdict(interval)})")


def mlm_checks(ours: dict, theirs: dict, paired: dict[str, dict | None]) -> list[str]:
    """One line per set of masks both runs were scored on, uniform first: the students' MLM loss and accuracy, which
    is better, and the paired difference with its interval (`paired_mlm`) where both were scored on the same
    targets."""
    lines = []
    for masks in MASKS:
        figures = [run.get("held_out", {}).get(masks, {}).get("student") for run in (ours, theirs)]
        if not all(figures):
            continue
        (loss, accuracy), (their_loss, their_accuracy) = ((found["mlm_loss"]["mean"], found["mlm_accuracy"]["mean"])
                                                          for found in figures)
        line = (f"validation MLM on {MASKS_WORDS[masks]}: loss {loss:.3f} vs {their_loss:.3f} "
                f"({'better' if loss < their_loss else 'NOT better'}), accuracy {100 * accuracy:.1f}% vs "
                f"{100 * their_accuracy:.1f}% ({'better' if accuracy > their_accuracy else 'NOT better'})")
        if (pair := paired.get(masks)) is not None:
            line += (f"; paired over {pair['mlm_loss']['items']} targets: loss {difference(pair['mlm_loss'], False)}, "
                     f"accuracy {difference(pair['mlm_accuracy'], True)}")
        elif all(run["held_out"][masks]["intervals"] for run in (ours, theirs)):
            line += "; not paired: the runs were scored on different targets (compare their intervals above)"
        else:
            line += "; point figures only, no interval"
        lines.append(line)
    return lines
