"""Scores of fine-tuned runs: per-seed metrics from the dev predictions finetune saved, medians over seeds, the
student's retention of the teacher's score, the percentile bootstrap (of two models' score difference on the same dev
examples; of the mean of per-item values, such as held-out MLM targets), and the results tables
(the tasks of one published table together: GLUE's Table 1, IMDb and SQuAD's Table 2, your own data) beside
the published rows."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.tasks import get_task
from distilbert_cli.tasks.base import Published, Task

OUR_ROWS = {"student": "student (ours)", "teacher": "teacher (ours)"}


def as_array(values: list) -> np.ndarray:
    """Numbers as a numeric array; texts and lists of texts (SQuAD's answers, as tuples) as an object array, so
    that resampling indexes examples, not characters."""
    if all(isinstance(value, int | float) for value in values):
        return np.asarray(values)
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = tuple(value) if isinstance(value, list) else value
    return array


def read_predictions(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """predictions.jsonl back as {split: (predictions, labels)}."""
    by_split: dict[str, tuple[list, list]] = {}
    for row in artifacts.read_jsonl(path):
        predictions, labels = by_split.setdefault(row["split"], ([], []))
        predictions.append(row["prediction"])
        labels.append(row["label"])
    return {split: (as_array(p), as_array(y)) for split, (p, y) in by_split.items()}


def split_metrics(task: Task, by_split: dict, where: Path) -> dict[str, float]:
    """Flat metrics of one run from its {split: (predictions, labels)}."""
    if not set(task.dev_splits) <= set(by_split):
        raise UsageError(f"{where}: predictions cover splits {sorted(by_split)}, {task.title} needs "
                         f"{list(task.dev_splits)}")
    return {task.metric_key(split, name): value
            for split, (predictions, labels) in by_split.items()
            for name, value in task.compute_metrics(predictions, labels).items()}


def finetuned_runs(finetune_dir: Path, tasks: Sequence[Task], models: Sequence[str] | None = None) -> list[dict]:
    """Every <model>/<task>/seed-<s>/ under the finetune stage with its dev {split: (predictions, labels)}."""
    runs = []
    for model in artifacts.finetuned_models(finetune_dir):
        if models is not None and model not in models:
            continue
        for task in tasks:
            for run in artifacts.finetune_runs(finetune_dir, model, task.name):
                if not run.predictions.is_file():
                    raise UsageError(f"fine-tuned run without dev predictions: {run.predictions} is missing")
                runs.append({"model": model, "task": task, "seed": run.seed,
                             "by_split": read_predictions(run.predictions), "where": run.path})
    return runs


def collect_finetuned(finetune_dir: Path, tasks: Sequence[Task]) -> list[dict]:
    """One record per <model>/<task>/seed-<s>/predictions.jsonl under the finetune stage."""
    records = [{"model": run["model"], "task": run["task"].name, "seed": run["seed"],
                "metrics": split_metrics(run["task"], run["by_split"], run["where"])}
               for run in finetuned_runs(finetune_dir, tasks)]
    if not records:
        found = sorted({path.parent.name for path in finetune_dir.glob("*/*/seed-*")})
        raise UsageError(f"no fine-tuned runs for {[t.name for t in tasks]} under {finetune_dir} "
                         + (f"(it has {found}: pass those task.names)" if found else
                            "(run `distil finetune` with those task.names first)"))
    return records


def summarize(records: list[dict]) -> dict:
    """Median over seeds per metric, the task score from the medians, and the mean over tasks per model."""
    models: dict[str, dict] = {}
    for record in records:
        runs = models.setdefault(record["model"], {}).setdefault(record["task"], [])
        runs.append(record)
    summary = {}
    for model, by_task in models.items():
        task_rows = {}
        for task, runs in by_task.items():
            medians = {key: float(np.median([run["metrics"][key] for run in runs])) for key in runs[0]["metrics"]}
            task_rows[task] = {"seeds": [run["seed"] for run in runs], "metrics": medians,
                               "score": get_task(task).score(medians)}
        summary[model] = {"tasks": task_rows, "score": float(np.mean([row["score"] for row in task_rows.values()]))}
    return summary


def retention(summary: dict, tasks: Sequence[str] | None = None) -> dict | None:
    """Student score / teacher score on the tasks (of `tasks`, default all) both were fine-tuned on, in percent
    (the paper: 97% on GLUE); None without both, or for a teacher score of 0."""
    if "student" not in summary or "teacher" not in summary:
        return None
    common = set(summary["student"]["tasks"]) & set(summary["teacher"]["tasks"])
    common = sorted(common if tasks is None else common & set(tasks))
    if not common:
        return None
    student, teacher = ([summary[m]["tasks"][t]["score"] for t in common] for m in ("student", "teacher"))
    if np.mean(teacher) == 0:
        return None
    return {"tasks": common, "student": float(np.mean(student)), "teacher": float(np.mean(teacher)),
            "percent": float(100 * np.mean(student) / np.mean(teacher))}


def published_retention(published: Published, tasks: Sequence[str]) -> float | None:
    """The paper's student / teacher score on the same tasks, in percent, if its rows have them all."""
    rows = [published.rows.get(model or "", {}) for model in (published.student, published.teacher)]
    if not all(task in row for row in rows for task in tasks):
        return None
    student, teacher = ([float(np.mean(row[task])) for task in tasks] for row in rows)
    return float(100 * np.mean(student) / np.mean(teacher))


def by_table(tasks: Sequence[Task]) -> dict[str, list[Task]]:
    """The tasks of each published table, tables in the order of their first task."""
    tables: dict[str, list[Task]] = {}
    for task in tasks:
        tables.setdefault(task.published.title, []).append(task)
    return tables


def runs_score(runs: list[dict], draws: dict | None = None) -> float:
    """The score of one model's `finetuned_runs` as the results table scores them (median over seeds, mean over
    tasks), on the dev examples `draws` picks ({(task, split): example indices}; None: all of them)."""
    records = []
    for run in runs:
        task = run["task"]
        picked = {split: (predictions, labels) if draws is None else (predictions[draws[task.name, split]],
                                                                      labels[draws[task.name, split]])
                  for split, (predictions, labels) in run["by_split"].items()}
        records.append({"model": "", "task": task.name, "seed": run["seed"],
                        "metrics": split_metrics(task, picked, run["where"])})
    return summarize(records)[""]["score"]


def percentile_bootstrap(statistic: Callable[[dict | None], float], sizes: dict, resamples: int, seed: int,
                         description: str | None = None) -> dict | None:
    """The statistic on all items (`statistic(None)`) and its 95% percentile interval: `resamples` times, the items
    of each group (`sizes`: group -> item count) are drawn with replacement, one array of indices per group, and
    `statistic(draws)` is recomputed. None when the observed value, or every resample, is not finite. With a
    `description`, a progress bar (for a slow statistic)."""
    rng = np.random.default_rng(seed)
    observed = statistic(None)
    found = np.asarray([statistic({key: rng.integers(0, size, size) for key, size in sizes.items()})
                        for _ in tqdm(range(resamples), desc=description, leave=False,
                                     disable=description is None)], dtype=np.float64)
    found = found[np.isfinite(found)]
    if not found.size or not np.isfinite(observed):
        return None
    low, high = np.percentile(found, [2.5, 97.5])
    return {"observed": float(observed), "low": float(low), "high": float(high), "resamples": int(found.size)}


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int) -> dict | None:
    """The mean of per-item values (per-target losses, 0/1 hits; for a paired comparison, one run's value minus
    the other's on the same items) and its 95% percentile-bootstrap interval over the items; None without items."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size:
        return None
    found = percentile_bootstrap(lambda draws: float(np.mean(values if draws is None else values[draws["items"]])),
                                 {"items": values.size}, resamples, seed)
    return None if found is None else {"mean": found["observed"], "low": found["low"], "high": found["high"],
                                       "resamples": found["resamples"], "items": int(values.size)}


def paired_bootstrap(ours: list[dict], theirs: list[dict], resamples: int, seed: int) -> dict | None:
    """How sure is score(ours) - score(theirs)? Both lists are `finetuned_runs` of one model each, scored as the
    table scores them (`runs_score`). The dev examples are resampled with replacement, the same draws for both
    models (a paired bootstrap), `resamples` times; returns the observed difference and its 95% percentile
    interval, or None when the two were not evaluated on the same dev examples (or no resample could be
    scored)."""
    if not ours or {run["task"].name for run in ours} != {run["task"].name for run in theirs}:
        return None
    gold = {}
    for run in [*ours, *theirs]:
        for split, (_, labels) in run["by_split"].items():
            if not np.array_equal(gold.setdefault((run["task"].name, split), labels), labels):
                return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant predictions make Pearson undefined: such resamples are dropped
        found = percentile_bootstrap(lambda draws: runs_score(ours, draws) - runs_score(theirs, draws),
                                     {key: len(values) for key, values in gold.items()}, resamples, seed,
                                     "paired bootstrap")
    if found is None:
        return None
    return {"difference": found["observed"], "low": found["low"], "high": found["high"],
            "resamples": found["resamples"], "dev_examples": int(sum(len(values) for values in gold.values()))}


def noise_verdict(comparison: dict | None) -> str:
    """Whether a 95% interval of a difference holds 0 ("within noise") or not ("beyond noise")."""
    if comparison is None:
        return "not tested"
    return "within noise" if comparison["low"] <= 0 <= comparison["high"] else "beyond noise"


def _cell(values: Sequence[float] | None, published: bool = False) -> str:
    """One cell: "–" when absent, "77.7/85.8" for several metrics; published figures as printed in the paper."""
    if values is None:
        return "–"
    return "/".join(f"{value:g}" if published else f"{value:.1f}" for value in np.atleast_1d(values))


def render_markdown(summary: dict, kept: dict, tasks: Sequence[Task], data: str, notes: list[str],
                    soft_targets: bool = False) -> str:
    """Our rows beside the published ones, one table per published table (with its retention, `kept` by table
    title), then every metric. With `soft_targets` the student's row is the "(D)" one."""
    lines = ["# Downstream results", "", f"Data: {data}.", *(f"Note: {note}" for note in notes)]
    ours = sorted(summary, key=lambda m: (list(OUR_ROWS).index(m) if m in OUR_ROWS else len(OUR_ROWS), m))
    names = {**OUR_ROWS, **({"student": "student (D) (ours)"} if soft_targets else {})}
    for title, columns in by_table(tasks).items():
        published = columns[0].published
        averaged = published.own_scores is not None
        header = ["Model", *(["Score"] if averaged else []), *(task.heading for task in columns)]
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in ours:
            rows = summary[model]["tasks"]
            cells = [_cell(t.table_cell(rows[t.name]["metrics"]) if t.name in rows else None) for t in columns]
            scores = [rows[t.name]["score"] for t in columns if t.name in rows]
            score = [_cell(float(np.mean(scores)) if scores else None)] if averaged else []
            lines.append("| " + " | ".join([names.get(model, model), *score, *cells]) + " |")
        for name, row in published.rows.items():
            complete = all(t.name in row for t in columns)
            score = [_cell(float(np.mean([np.mean(row[t.name]) for t in columns])) if complete else None)
                     ] if averaged else []
            cells = [_cell(row.get(t.name), published=True) for t in columns]
            lines.append("| " + " | ".join([f"{name} (published)", *score, *cells]) + " |")
        own = (" Their own scores are " + " and ".join(f"{name} {value}" for name, value in
                                                        published.own_scores.items()) + ".") if averaged else ""
        score_line = "Score: the mean of the row's task scores. " if averaged else ""
        source = f" Published rows: {published.source}.{own}" if published.rows else ""
        lines += ["", f"{score_line}{published.score_note}{source}"]
        if (table_kept := kept.get(title)) is not None:
            paper = published_retention(published, table_kept["tasks"])
            lines += ["", f"Retention (student / teacher on {', '.join(table_kept['tasks'])}): "
                      f"{table_kept['percent']:.1f}% ({table_kept['student']:.1f} / {table_kept['teacher']:.1f})"
                      + (f"; the paper on the same tasks: {paper:.1f}%." if paper is not None else ".")]
    lines += ["", "## Every metric (median over seeds)", "", "| Model | Task | Seeds | Metrics |", "|---|---|---|---|"]
    for model in ours:
        for task in tasks:
            if (row := summary[model]["tasks"].get(task.name)) is not None:
                metrics = ", ".join(f"{key} {value:.2f}" for key, value in row["metrics"].items())
                seeds = ", ".join(str(seed) for seed in row["seeds"] if seed is not None) or "–"
                lines.append(f"| {names.get(model, model)} | {task.title} | {seeds} | {metrics} |")
    return "\n".join(lines) + "\n"
