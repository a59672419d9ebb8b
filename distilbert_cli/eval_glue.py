"""`distil eval-glue`: score fine-tuned models on GLUE dev and write the paper's Table 1.

    distil eval-glue run_dir=runs/exp1                          # everything under <run_dir>/finetune/
    distil eval-glue glue=rte glue.data_dir=path/to/glue_data 'eval.model_dirs=[path/to/fine-tuned-rte]'

Scores come from the dev predictions that finetune saved (or, with `eval.model_dirs`, from running
already fine-tuned models on dev), with each task's GLUE metric; the median over seeds, as in the paper.
Writes `<run_dir>/eval-glue/results.json` and `results.md`: our rows, the paper's BERT-base and
DistilBERT rows (published), and the student/teacher retention (the paper's "97%").
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from distilbert_cli import glue
from distilbert_cli.errors import UsageError
from distilbert_cli.finetune import evaluate, first_rows, forward_inputs, read_predictions, tokenize
from distilbert_cli.models import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import open_stage, read_manifest, require_complete, write_json_atomic

log = logging.getLogger(__name__)

OUR_ROWS = {"student": "student (ours)", "teacher": "teacher (ours)"}


def describe_data(data_dir: str | None) -> str:
    return f"Hugging Face `{glue.HUB_DATASET}`" if data_dir is None else f"GLUE-layout TSV files in `{data_dir}`"


# ---- collecting per-seed metrics --------------------------------------------------------------------

def split_metrics(task: glue.GlueTask, by_split: dict, where: Path) -> dict[str, float]:
    """Flat metrics of one run from its {split: (predictions, labels)}."""
    if sorted(by_split) != sorted(task.dev_splits):
        raise UsageError(f"{where}: predictions cover splits {sorted(by_split)}, {task.title} needs "
                         f"{list(task.dev_splits)}")
    return {glue.metric_key(task, split, name): value
            for split, (predictions, labels) in by_split.items()
            for name, value in glue.compute_metrics(task.name, predictions, labels).items()}


def finetuned_runs(finetune_dir: Path, tasks: Sequence[glue.GlueTask],
                   models: Sequence[str] | None = None) -> list[dict]:
    """Every <model>/<task>/seed-<s>/ under the finetune stage with its dev {split: (predictions, labels)}."""
    runs = []
    for model_dir in sorted(p for p in finetune_dir.iterdir() if p.is_dir()):
        if models is not None and model_dir.name not in models:
            continue
        for task in tasks:
            for seed_dir in sorted((model_dir / task.name).glob("seed-*")):
                predictions = seed_dir / "predictions.jsonl"
                if not predictions.is_file():
                    raise UsageError(f"fine-tuned run without dev predictions: {predictions} is missing")
                runs.append({"model": model_dir.name, "task": task, "seed": int(seed_dir.name.removeprefix("seed-")),
                             "by_split": read_predictions(predictions), "where": seed_dir})
    return runs


def collect_finetuned(finetune_dir: Path, tasks: Sequence[glue.GlueTask]) -> list[dict]:
    """One record per <model>/<task>/seed-<s>/predictions.jsonl under the finetune stage."""
    records = [{"model": run["model"], "task": run["task"].name, "seed": run["seed"],
                "metrics": split_metrics(run["task"], run["by_split"], run["where"])}
               for run in finetuned_runs(finetune_dir, tasks)]
    if not records:
        raise UsageError(f"no fine-tuned runs for {[t.name for t in tasks]} under {finetune_dir} "
                         f"(run `distil finetune` with those glue.tasks first)")
    return records


def resolve_model_dirs(cfg: DictConfig, tasks: Sequence[glue.GlueTask]) -> list[tuple[str, glue.GlueTask]]:
    """Each `eval.model_dirs` entry with the task it was fine-tuned on, checked before any work."""
    resolved = []
    for entry in cfg.eval.model_dirs:
        entry = str(entry)
        config = load_config(entry, trust_remote_code=bool(cfg.eval.trust_remote_code), role="fine-tuned model")
        if not any(name.endswith("ForSequenceClassification") for name in config.architectures or ()):
            raise UsageError(f"{entry} is not a fine-tuned sequence-classification checkpoint "
                             f"(architectures {config.architectures})")
        # finetune records the task in config.json; a foreign checkpoint needs glue.tasks to name one task.
        task_name = getattr(config, "glue_task", None)
        if task_name is None and len(tasks) != 1:
            raise UsageError(f"cannot tell which GLUE task {entry} was fine-tuned on: set glue.tasks=[<that task>]")
        task = glue.get_task(task_name) if task_name is not None else tasks[0]
        if task.name not in [t.name for t in tasks]:
            raise UsageError(f"{entry} was fine-tuned on {task.name}, which is not in glue.tasks")
        if config.num_labels != task.num_labels:
            raise UsageError(f"{entry} has {config.num_labels} labels; {task.title} has {task.num_labels}")
        resolved.append((entry, task))
    return resolved


def evaluate_model_dirs(cfg: DictConfig, model_dirs: list[tuple[str, glue.GlueTask]], out_dir: Path) -> list[dict]:
    """Run each fine-tuned model on its task's dev splits; predictions go to out_dir/model-<i>/."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    accelerator = Accelerator()
    trust = bool(cfg.eval.trust_remote_code)
    records = []
    for index, (entry, task) in enumerate(model_dirs):
        tokenizer = load_tokenizer(entry, trust_remote_code=trust, role="fine-tuned model")
        model = load_model(AutoModelForSequenceClassification, entry, trust_remote_code=trust,
                           role="fine-tuned model")
        with_types = "token_type_ids" in forward_inputs(model)
        dev = {split: tokenize(first_rows(glue.load_split(task.name, split, cfg.glue.data_dir), cfg.eval.max_samples),
                               tokenizer, cfg.eval.max_seq_length, with_types) for split in task.dev_splits}
        run_dir = out_dir / f"model-{index}"
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = evaluate(task, accelerator.prepare_model(model, evaluation_mode=True), tokenizer, dev,
                           cfg.eval.batch_size, accelerator, run_dir)
        records.append({"model": entry, "task": task.name, "seed": None, "metrics": metrics})
    return records


# ---- the table ------------------------------------------------------------------------------------

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
                               "score": glue.task_score(task, medians)}
        summary[model] = {"tasks": task_rows, "score": float(np.mean([row["score"] for row in task_rows.values()]))}
    return summary


def retention(summary: dict) -> dict | None:
    """Student score / teacher score on the tasks both were fine-tuned on, in percent (the paper: 97%)."""
    if "student" not in summary or "teacher" not in summary:
        return None
    common = sorted(set(summary["student"]["tasks"]) & set(summary["teacher"]["tasks"]))
    if not common:
        return None
    student, teacher = ([summary[m]["tasks"][t]["score"] for t in common] for m in ("student", "teacher"))
    return {"tasks": common, "student": float(np.mean(student)), "teacher": float(np.mean(teacher)),
            "percent": float(100 * np.mean(student) / np.mean(teacher))}


def paired_bootstrap(ours: list[dict], theirs: list[dict], resamples: int, seed: int) -> dict | None:
    """How sure is score(ours) - score(theirs)? Both lists are `finetuned_runs` of one model each, scored as the
    table scores them (median over seeds, mean over tasks). The dev examples are resampled with replacement,
    the same draws for both models (a paired bootstrap), `resamples` times; returns the observed difference and
    its 95% percentile interval, or None when the two were not evaluated on the same dev examples (or no
    resample could be scored)."""
    def score(runs, draws):
        records = []
        for run in runs:
            task = run["task"]
            resampled = {split: (predictions[draws[task.name, split]], labels[draws[task.name, split]])
                         for split, (predictions, labels) in run["by_split"].items()}
            records.append({"model": "", "task": task.name, "seed": run["seed"],
                            "metrics": split_metrics(task, resampled, run["where"])})
        return summarize(records)[""]["score"]

    if not ours or {run["task"].name for run in ours} != {run["task"].name for run in theirs}:
        return None
    gold = {}
    for run in [*ours, *theirs]:
        for split, (_, labels) in run["by_split"].items():
            if not np.array_equal(gold.setdefault((run["task"].name, split), labels), labels):
                return None
    identity = {key: np.arange(len(values)) for key, values in gold.items()}
    rng = np.random.default_rng(seed)
    differences = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant predictions make Pearson undefined: such resamples are dropped
        observed = score(ours, identity) - score(theirs, identity)
        for _ in tqdm(range(resamples), desc="paired bootstrap", leave=False):
            draws = {key: rng.integers(0, len(values), len(values)) for key, values in gold.items()}
            differences.append(score(ours, draws) - score(theirs, draws))
    differences = np.asarray(differences)
    differences = differences[np.isfinite(differences)]
    if not differences.size or not np.isfinite(observed):
        return None
    low, high = np.percentile(differences, [2.5, 97.5])
    return {"difference": float(observed), "low": float(low), "high": float(high), "resamples": int(differences.size),
            "dev_examples": int(sum(len(values) for values in gold.values()))}


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def render_markdown(summary: dict, kept: dict | None, columns: list[glue.GlueTask], data: str, notes: list[str]) -> str:
    header = ["Model", "Score", *(task.title for task in columns)]
    lines = ["# GLUE dev results", "", f"Data: {data}.", *(f"Note: {note}" for note in notes), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ours = sorted(summary, key=lambda m: (list(OUR_ROWS).index(m) if m in OUR_ROWS else len(OUR_ROWS), m))
    for model in ours:
        tasks = summary[model]["tasks"]
        cells = [_cell(tasks[t.name]["score"] if t.name in tasks else None) for t in columns]
        lines.append(f"| {OUR_ROWS.get(model, model)} | {_cell(summary[model]['score'])} | " + " | ".join(cells) + " |")
    for name, published in glue.PUBLISHED.items():
        score = float(np.mean([published[t.name] for t in columns]))
        lines.append(f"| {name} (published) | {_cell(score)} | " + " | ".join(_cell(published[t.name]) for t in columns)
                     + " |")
    lines += ["", "Score: the mean of the row's task scores. A task score is the median over seeds of "
              "its GLUE metric (MRPC, QQP: mean of F1 and accuracy; STS-B: of Pearson and Spearman; MNLI: of "
              "matched and mismatched accuracy). Published rows: "
              f"{glue.PUBLISHED_SOURCE}; their nine-task scores are BERT-base {glue.PUBLISHED['BERT-base']['score']} "
              f"and DistilBERT {glue.PUBLISHED['DistilBERT']['score']}."]
    paper = 100 * glue.PUBLISHED["DistilBERT"]["score"] / glue.PUBLISHED["BERT-base"]["score"]
    if kept is not None:
        lines += ["", f"Retention (student / teacher on {', '.join(kept['tasks'])}): {kept['percent']:.1f}% "
                  f"({kept['student']:.1f} / {kept['teacher']:.1f}); the paper: {paper:.1f}%."]
    lines += ["", "## Every metric (median over seeds)", "", "| Model | Task | Seeds | Metrics |", "|---|---|---|---|"]
    for model in ours:
        for task in columns:
            if (row := summary[model]["tasks"].get(task.name)) is not None:
                metrics = ", ".join(f"{key} {value:.2f}" for key, value in row["metrics"].items())
                seeds = ", ".join(str(seed) for seed in row["seeds"] if seed is not None) or "–"
                lines.append(f"| {OUR_ROWS.get(model, model)} | {task.title} | {seeds} | {metrics} |")
    return "\n".join(lines) + "\n"


def finetune_notes(finetune_dir: Path) -> tuple[str, list[str]]:
    """The data source and any shortcut (capped rows) of the finetune stage, for an honest table."""
    config = read_manifest(finetune_dir)["config"]
    notes = [f"finetune.{key}={config['finetune'][key]} (not the full split)"
             for key in ("max_train_samples", "max_eval_samples") if config["finetune"][key] is not None]
    return describe_data(config["glue"]["data_dir"]), notes


def check_eval_config(cfg: DictConfig) -> None:
    for key in ("max_seq_length", "batch_size"):
        if cfg.eval[key] <= 0:
            raise UsageError(f"eval.{key} must be positive, got {cfg.eval[key]}")
    if cfg.eval.max_samples is not None and cfg.eval.max_samples <= 0:
        raise UsageError(f"eval.max_samples must be positive or null, got {cfg.eval.max_samples}")


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    """Score, tabulate and write results.{json,md}; return the results.json payload."""
    tasks = glue.get_tasks(cfg.glue.tasks)
    check_eval_config(cfg)
    model_dirs = resolve_model_dirs(cfg, tasks)
    if model_dirs and cfg.glue.data_dir is not None:
        glue.check_local_files([task for _, task in model_dirs], cfg.glue.data_dir, dev_only=True)
    if not model_dirs:
        require_complete(cfg.run_dir, "finetune")

    with open_stage(cfg, "eval-glue", overrides) as stage:
        if model_dirs:
            for entry, _ in model_dirs:
                stage.use_model(entry, "fine-tuned model")
            records = evaluate_model_dirs(cfg, model_dirs, stage.path)
            data, notes = describe_data(cfg.glue.data_dir), []
        else:
            finetune_dir = stage.use_stage(cfg.run_dir, "finetune")
            records = collect_finetuned(finetune_dir, tasks)
            data, notes = finetune_notes(finetune_dir)
        if cfg.eval.note is not None:
            notes.append(str(cfg.eval.note))
        summary = summarize(records)
        kept = retention(summary)
        evaluated = {record["task"] for record in records}
        columns = sorted((task for task in tasks if task.name in evaluated), key=lambda task: task.title)
        results = {"data": data, "notes": notes, "models": summary, "retention": kept,
                   "published": {"source": glue.PUBLISHED_SOURCE, "rows": glue.PUBLISHED}}
        write_json_atomic(stage.path / "results.json", results)
        (stage.path / "results.md").write_text(render_markdown(summary, kept, columns, data, notes))
        stage.update(scores={model: row["score"] for model, row in summary.items()}, retention=kept)
        log.info("GLUE scores: %s%s", ", ".join(f"{m} {r['score']:.1f}" for m, r in summary.items()),
                 f"; retention {kept['percent']:.1f}%" if kept else "")
    return results
