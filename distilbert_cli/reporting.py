"""The report's content: what each run's stages say (objective, init, validation MLM, downstream scores, task
distillation), the loss curves, the ablation table (the paper's Table 4 at this scale), the held-out MLM figures on
uniform and smoothed masks with bootstrap intervals over the masked targets, the verdict of each comparison (on
uniform masks first; paired bootstraps saying whether an MLM or a downstream difference is beyond the noise; the
protocol each arm was trained under, and its budget), and every model's accuracy beside its CPU latency."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distilbert_cli import artifacts  # noqa: E402
from distilbert_cli.artifacts import read_arrays, read_json, read_jsonl  # noqa: E402
from distilbert_cli.budgets import arm, budget_table, protocol  # noqa: E402
from distilbert_cli.errors import UsageError  # noqa: E402
from distilbert_cli.held_out import held_out_table, masks_note, mlm_checks, mlm_columns  # noqa: E402
from distilbert_cli.models.run_models import run_student  # noqa: E402
from distilbert_cli.rundir import MANIFEST, Run  # noqa: E402
from distilbert_cli.tasks import get_tasks  # noqa: E402
from distilbert_cli.tasks.results import finetuned_runs, noise_verdict, paired_bootstrap, runs_score  # noqa: E402
from distilbert_cli.training.losses import LOSS_TERMS  # noqa: E402
from distilbert_cli.training.task_losses import TASK_LOSS_TERMS  # noqa: E402

# The loss curves: what distil train and distil task-distill log, one panel each.
LOSS_COMPONENTS = {"distill": ("loss", *(f"loss_{name}" for name in LOSS_TERMS)),
                   "task-distill": ("loss", *(f"loss_{name}" for name in {**LOSS_TERMS, **TASK_LOSS_TERMS}))}
# The paper's Table 4: GLUE macro-score change of each ablation against the triple loss.
PUBLISHED_ABLATIONS = {"no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}
# The latency the accuracy chart plots: eager PyTorch fp32 (the paper's Table 3 setting) at the smallest batch.
CHART_BACKEND = "eager"
# The heading of a sweep report's member table (distil sweep prints the section that follows it).
MEMBER_TABLE_HEADING = "## Sweep members"

# What the report reads of each complete stage of a run (its own and each baseline's), as the glob of the files it
# verifies: each such stage is held read-locked and verified while the report is written. Timings and logs
# (metrics.jsonl, finetune's metrics.json) are read too but are no stage's fingerprinted output.
STAGE_READS = {
    artifacts.INIT_STUDENT: MANIFEST,  # its manifest's facts only
    artifacts.DISTILL: "validation*",  # validation.json, validation_targets.safetensors
    artifacts.FINETUNE: artifacts.FINETUNE_PREDICTIONS,
    artifacts.TASK_DISTILL: f"{artifacts.TASK_DISTILLED_MODEL}/*/{artifacts.PREDICTIONS_JSONL}",
    artifacts.EVALUATE: "*",
    artifacts.BENCH_CPU: "*",
}


def run_summary(run_dir: Run) -> dict:
    """What one run's stages say: objective, init, validation MLM, downstream scores, parameters, task distillation.
    `run` keeps the run directory itself (for the stages other sections read)."""
    summary = {"name": run_dir.path.name, "path": str(run_dir.path), "run": run_dir}
    if run_dir.complete(artifacts.INIT_STUDENT):
        init = artifacts.init_student_facts(run_dir)
        summary.update(teacher=init.teacher, init_strategy=init.strategy, layer_map=init.layer_map,
                       param_counts=init.param_counts, student_arch=init.student_arch,
                       student_class=init.student_class)
    if distill_dir := run_dir.complete(artifacts.DISTILL):
        manifest = run_dir.manifest(artifacts.DISTILL)
        config = manifest["config"]
        summary["experiment"] = next((o.split("=", 1)[1] for o in manifest["overrides"]
                                      if o.lstrip("+").startswith("experiment=")), None)
        # the weights the run recorded (a run from before a term existed has no key for it)
        summary["loss_weights"] = {key: value for key, value in config["loss"].items()
                                   if key.startswith("alpha_") and value}
        distilled = artifacts.DistillOutputs(distill_dir)
        summary["validation"] = read_json(distilled.validation)
        # every held-out target's label, loss and prediction (a run from before the file existed has none)
        summary["validation_targets"] = (read_arrays(distilled.validation_targets)
                                         if distilled.validation_targets.is_file() else None)
        summary["metrics"] = read_jsonl(distilled.metrics)
    if eval_dir := run_dir.complete(artifacts.EVALUATE):
        results = read_json(eval_dir / artifacts.RESULTS_JSON)
        summary["downstream"] = {model: row["score"] for model, row in results["models"].items()}
        summary["downstream_tasks"] = {model: sorted(row["tasks"]) for model, row in results["models"].items()}
        summary["downstream_notes"] = results["notes"]
        summary["retention"] = results["retention"]
    summary["finetune_arm"] = arm(run_dir, artifacts.FINETUNE, "student")  # the student on labels alone
    if td_dir := run_dir.complete(artifacts.TASK_DISTILL):
        manifest = run_dir.manifest(artifacts.TASK_DISTILL)
        config = manifest["config"]
        task, seeds = config["task"]["names"][0], config["task_distill"]["seeds"]
        first = artifacts.TaskDistillOutputs(td_dir).run(get_tasks([task])[0].name, seeds[0])
        summary["task_distill"] = {
            "task": task, "scores": manifest["scores"], "transfer": manifest["transfer"]["stats"],
            "augment": config["augment"], "settings": config["task_distill"],
            "training": read_json(first.metrics), "metrics": read_jsonl(first.loss_log),
            "arm": arm(run_dir, artifacts.TASK_DISTILL, artifacts.TASK_DISTILLED_MODEL)}
    return summary


def plot_losses(runs: list[dict], path: Path) -> bool:
    """One panel per logged loss component (of distil train, and of distil task-distill), every run that logged it
    overlaid on the panel's shared scale, over optimizer steps; the end of each training stage (progressive
    transfer, a head-only start, TinyBERT's intermediate step) dotted in the run's colour."""
    curves: dict[str, dict[str, list[dict]]] = {}  # panel -> run -> metrics lines
    for run in runs:
        logs = {"distill": run.get("metrics"), "task-distill": run.get("task_distill", {}).get("metrics")}
        for stage, lines in logs.items():
            for component in LOSS_COMPONENTS[stage] if lines else ():
                if any(component in line for line in lines):
                    curves.setdefault(f"{stage}: {component}", {})[run["name"]] = lines
    if not curves:
        return False
    colours = {run["name"]: f"C{i}" for i, run in enumerate(runs)}
    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.4 * rows), squeeze=False)
    for axis, (panel, by_run) in zip(axes.flat, curves.items(), strict=False):
        component = panel.split(": ")[1]
        values = []
        for name, lines in by_run.items():
            points = [(line["step"], line[component]) for line in lines if component in line]
            values += [value for _, value in points]
            axis.plot(*zip(*points, strict=True), label=name, color=colours[name],
                      marker="." if len(points) == 1 else None)
            for before, after in zip(lines, lines[1:], strict=False):
                if before.get("stage") != after.get("stage"):
                    axis.axvline(before["step"], color=colours[name], linestyle=":", linewidth=0.8)
        axis.set(title=panel, xlabel="step", yscale="log" if min(values) > 0 else "linear")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(curves):]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def student_label(run: dict) -> str:
    """The student's class and size: methods side by side distill different students."""
    if "student_class" not in run:
        return "–"
    return f"{run['student_class'].removesuffix('ForMaskedLM')} {run['param_counts']['student'] / 1e6:.1f}M"


def init_label(run: dict) -> str:
    """How the student started: init-student's strategy (a BiLSTM copies no layers, only the embeddings)."""
    if run.get("student_arch") == "bilstm":
        return "random" if run["init_strategy"] == "random" else "teacher's embeddings, PCA"
    return run.get("init_strategy", "–")


def ablation_table(main: dict, baselines: list[dict]) -> list[str]:
    """Table 4 at this scale: validation MLM and downstream score of each run, with deltas vs this run."""
    lines = ["| run | objective (weights) | student | init | val MLM loss (uniform / smoothed) | "
             "val MLM acc (uniform / smoothed) | downstream score | Δ downstream vs this run | "
             "published Δ GLUE (paper Table 4) |", "|---|---|---|---|---|---|---|---|---|"]
    base_score = main.get("downstream", {}).get("student")
    for run in [main, *baselines]:
        score = run.get("downstream", {}).get("student")
        delta = None if score is None or base_score is None or run is main else score - base_score
        weights = ", ".join(f"{k.removeprefix('alpha_')} {v:g}" for k, v in run.get("loss_weights", {}).items())
        published, mlm = published_ablation(run), mlm_columns(run.get("validation", {}).get("student"))
        lines.append(f"| {run['name']} | {weights or '–'} | {student_label(run)} | {init_label(run)} | {mlm} | "
                     f"{fmt(score, 1)} | {'–' if delta is None else f'{delta:+.1f}'} | "
                     f"{'–' if published is None else f'{published:+.2f} (published)'} |")
    if teacher := main.get("validation", {}).get("teacher"):
        lines.append(f"| teacher | – | – | – | {mlm_columns(teacher)} | "
                     f"{fmt(main.get('downstream', {}).get('teacher'), 1)} | – | – |")
    if untrained := [run["name"] for run in [main, *baselines] if "loss_weights" in run and not trains_head(run)]:
        lines += ["", f"Not trained by the objective (no term needs the student's logits), the MLM head of "
                      f"{', '.join(untrained)} is as initialised: those validation MLM figures do not measure the "
                      "encoder; compare those runs downstream."]
    return lines


def published_ablation(run: dict) -> float | None:
    """The paper's Table 4 delta for a run of one of its ablations (its `+experiment`, else its folder's name)."""
    return PUBLISHED_ABLATIONS.get(run.get("experiment") or run["name"])


def trains_head(run: dict) -> bool:
    """Whether the run's objective trains the student's MLM head (some term needs the student's logits)."""
    names = [key.removeprefix("alpha_") for key in run.get("loss_weights", {})]
    return any("student_logits" in LOSS_TERMS[name].needs for name in names if name in LOSS_TERMS)


def downstream_comparison(main: dict, baseline: dict, resamples: int, seed: int) -> dict | None:
    """Paired bootstrap of the student's downstream score against the baseline's student, on their common tasks."""
    tasks = sorted(set(main.get("downstream_tasks", {}).get("student", ()))
                   & set(baseline.get("downstream_tasks", {}).get("student", ())))
    finetune_dirs = [run["run"].complete(artifacts.FINETUNE) for run in (main, baseline)]
    if not tasks or None in finetune_dirs:
        return None
    ours, theirs = (finetuned_runs(path, get_tasks(tasks), models=["student"]) for path in finetune_dirs)
    return paired_bootstrap(ours, theirs, resamples, seed)


def downstream_protocol(ours: dict, theirs: dict) -> str:
    """How the two runs' students were fine-tuned for a downstream comparison."""
    return protocol({ours["name"]: ours.get("finetune_arm"), theirs["name"]: theirs.get("finetune_arm")})


def comparison_lines(title: str, checks: list[str]) -> list[str]:
    """A comparison's checks as a list item with one sub-item each (nothing without checks)."""
    return [f"- {title}:", *(f"  - {check}" for check in checks)] if checks else []


def verdict(main: dict, baselines: list[dict], comparisons: list[dict | None],
            mlm_pairs: list[dict[str, dict | None]]) -> list[str]:
    """Say in words whether the distilled student beats each baseline: held-out MLM on uniform masks first, then on
    smoothed masks (each with its paired interval where the runs share targets), then the downstream score with
    whether the difference is beyond the noise of the dev set and how both students were fine-tuned."""
    lines = []
    for run, comparison, paired in zip(baselines, comparisons, mlm_pairs, strict=True):
        checks = []
        if trains_head(main) and trains_head(run):  # an untrained head's MLM says nothing
            checks += mlm_checks(main, run, paired)
        ours, theirs = main.get("downstream", {}).get("student"), run.get("downstream", {}).get("student")
        if ours is not None and theirs is not None:
            noise = ""
            if comparison is not None:
                noise = (f"; difference {comparison['difference']:+.1f}, 95% paired-bootstrap interval "
                         f"[{comparison['low']:+.1f}, {comparison['high']:+.1f}] over {comparison['dev_examples']} "
                         f"dev examples: {noise_verdict(comparison)}")
            checks.append(f"downstream {ours:.1f} vs {theirs:.1f} ({'better' if ours > theirs else 'NOT better'}"
                          f"{noise}), fine-tuned {downstream_protocol(main, run)}")
        lines += comparison_lines(f"{main['name']} vs {run['name']}", checks)
    if any(comparisons):
        lines += ["", "The intervals resample the dev examples only: the spread between fine-tuning seeds comes on "
                      "top (fine-tune with several `finetune.seeds`: the score is then the median over seeds)."]
    return lines


def task_distillation(runs: list[dict], resamples: int, seed: int) -> list[dict]:
    """For each run with a task-distill stage and its student fine-tuned on labels alone (finetune): both scores,
    the paired bootstrap of task-distilled minus labels alone on the same dev examples, and both arms' budgets and
    the protocol they were trained under."""
    found = []
    for run in runs:
        td_dir, finetune_dir = run["run"].complete(artifacts.TASK_DISTILL), run["run"].complete(artifacts.FINETUNE)
        if td_dir is None or finetune_dir is None:
            continue
        tasks = get_tasks([run["task_distill"]["task"]])
        labels = finetuned_runs(finetune_dir, tasks, models=["student"])
        distilled = finetuned_runs(td_dir, tasks, models=[artifacts.TASK_DISTILLED_MODEL])
        if not labels or not distilled:
            continue
        arms = {"labels alone": run["finetune_arm"], "task-distilled": run["task_distill"]["arm"]}
        found.append({"run": run, "labels": runs_score(labels), "distilled": runs_score(distilled),
                      "labels_training": read_json(artifacts.FinetuneRun(labels[0]["where"]).metrics),
                      "comparison": paired_bootstrap(distilled, labels, resamples, seed) if resamples else None,
                      "arms": arms, "protocol": protocol(arms)})
    return found


def task_distillation_lines(found: list[dict]) -> list[str]:
    """The table of labels alone vs task-distilled, per student, the verdicts in words with the protocol of each
    comparison, and every arm's budget."""
    if not found:
        return []
    lines = ["| run | student | labels alone | task-distilled | Δ | 95% interval | verdict | training |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for entry in found:
        run, comparison, td = entry["run"], entry["comparison"], entry["run"]["task_distill"]
        delta = entry["distilled"] - entry["labels"]
        interval = "–" if comparison is None else f"[{comparison['low']:+.1f}, {comparison['high']:+.1f}]"
        augment = td["augment"]
        copies = f", N={augment['copies']}" if "copies" in augment else ""
        weights = ", ".join(f"{name} {weight:g}" for name, weight in td["training"]["losses"].items())
        training = (f"labels: {entry['labels_training']['train_examples']} examples; distilled: "
                    f"{td['transfer']['rows']} rows (augment={augment['method']}{copies}; {weights}, "
                    f"T {td['training']['temperature']:g}); budgets below")
        lines.append(f"| {run['name']} | {student_label(run)} | {entry['labels']:.1f} | {entry['distilled']:.1f} | "
                     f"{delta:+.1f} | {interval} | {noise_verdict(comparison)} | {training} |")
        noise = ("" if comparison is None else f"; difference {delta:+.1f}, 95% paired-bootstrap interval {interval} "
                 f"over {comparison['dev_examples']} dev examples: {noise_verdict(comparison)}")
        verdicts.append(f"- {run['name']}: task-distilled {entry['distilled']:.1f} vs labels alone "
                        f"{entry['labels']:.1f} ({'better' if delta > 0 else 'NOT better'}){noise}; trained "
                        f"{entry['protocol']}")
    groups = {"ahead, beyond the noise of the dev set": [], "behind, beyond the noise of the dev set": [],
              "within the noise (no effect shown either way)": []}
    for entry in found:
        if (verdict := noise_verdict(entry["comparison"])) == "within noise":
            groups["within the noise (no effect shown either way)"].append(entry["run"]["name"])
        elif verdict == "beyond noise":
            ahead = entry["distilled"] > entry["labels"]
            groups[f"{'ahead' if ahead else 'behind'}, beyond the noise of the dev set"].append(entry["run"]["name"])
    summary = [f"{words}: {', '.join(names)}" for words, names in groups.items() if names]
    budgets = budget_table({f"{entry['run']['name']}: {name}": found_arm for entry in found
                            for name, found_arm in entry["arms"].items()})
    return [*lines, "", *verdicts, *(["", "Task-distilled students against the same students on labels alone: "
                                      + "; ".join(summary) + "."] if summary else []),
            *(["", "Each arm's budget (one value per seed):", "", *budgets] if budgets else [])]


def _architecture(source: str) -> dict | None:
    """What decides a model's speed: its config's type and sizes (the same for every student of one shape)."""
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    keys = ("model_type", "vocab_size", "n_layers", "num_hidden_layers", "dim", "hidden_size", "hidden_dim",
            "intermediate_size", "embedding_size", "n_heads", "num_attention_heads")
    return {key: config[key] for key in keys if key in config}


def accuracy_latency(main: dict, runs: list[dict], found: list[dict]) -> list[dict]:
    """Every model of the report with its downstream score and the median latency bench-cpu measured for its
    architecture (the teacher; each run's student on labels alone and task-distilled): the points of the chart."""
    bench_dir = main["run"].complete(artifacts.BENCH_CPU)
    if bench_dir is None:
        return []
    results = read_json(bench_dir / artifacts.RESULTS_JSON)
    size = min(results["method"]["batch_sizes"])
    latency = {row["model"]: row["latency_ms"]["median"] for row in results["results"]
               if row["status"] == "ok" and row["backend"] == CHART_BACKEND and row["batch_size"] == size}
    timed = [(model, _architecture(model["source"])) for model in results["models"] if model["name"] in latency]

    def measured(source: str, role: str) -> tuple[float, str] | None:
        for model, _ in timed:
            if model["name"] == role or Path(model["source"]).resolve() == Path(source).resolve():
                return latency[model["name"]], model["name"]
        for model, architecture in timed:  # a student of the same shape runs as fast
            if architecture is not None and architecture == _architecture(source):
                return latency[model["name"]], model["name"]
        return None

    points = []
    if (score := main.get("downstream", {}).get("teacher")) is not None and (timing := measured(main["teacher"],
                                                                                                  "teacher")):
        points.append({"name": "teacher", "accuracy": score, "latency_ms": timing[0], "timed_as": timing[1]})
    distilled = {entry["run"]["name"]: entry["distilled"] for entry in found}
    for run in runs:
        if "student_arch" not in run:
            continue
        try:
            source = run_student(run["run"]).source
        except UsageError:  # a run without its student (no distill stage): nothing to place
            continue
        timing = measured(source, "student" if run is main else "")
        if timing is None:
            continue
        for label, score in ((f"{run['name']} (labels)", run.get("downstream", {}).get("student")),
                             (f"{run['name']} (task-distilled)", distilled.get(run["name"]))):
            if score is not None:
                points.append({"name": label, "accuracy": score, "latency_ms": timing[0], "timed_as": timing[1]})
    return points


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both latency (lower) and accuracy (higher), fastest first."""
    front = [p for p in points if not any(q["latency_ms"] <= p["latency_ms"] and q["accuracy"] >= p["accuracy"]
                                          and (q["latency_ms"], q["accuracy"]) != (p["latency_ms"], p["accuracy"])
                                          for q in points)]
    return sorted(front, key=lambda p: p["latency_ms"])


def plot_accuracy_latency(points: list[dict], path: Path) -> None:
    front = pareto_front(points)
    fig, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([p["latency_ms"] for p in points], [p["accuracy"] for p in points], color="C0", zorder=2)
    axis.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], color="C3", marker="o",
              linestyle="--", label="Pareto front (nothing both faster and more accurate)", zorder=3)
    for point in points:
        axis.annotate(point["name"], (point["latency_ms"], point["accuracy"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    axis.set(xlabel=f"CPU latency, batch 1, {CHART_BACKEND} fp32 (median ms)", ylabel="dev score",
             title="Accuracy vs CPU latency")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_latency_lines(points: list[dict]) -> list[str]:
    if not points:
        return []
    front = {p["name"] for p in pareto_front(points)}
    lines = ["| model | dev score | CPU latency (ms) | timed as | Pareto front |", "|---|---|---|---|---|"]
    for point in sorted(points, key=lambda p: p["latency_ms"]):
        lines.append(f"| {point['name']} | {point['accuracy']:.1f} | {point['latency_ms']:.2f} | {point['timed_as']} | "
                     f"{'yes' if point['name'] in front else ''} |")
    return [*lines, "", f"Latency: bench-cpu's median at batch size 1 ({CHART_BACKEND}, fp32) of the model of the same "
            "architecture (a task head aside, students of one shape run alike: their weights differ, not their "
            "work).", "", "![accuracy vs latency](accuracy_latency.png)"]


def exported_lines(run_dir: Run) -> list[str]:
    """The run's exported models: their variants and parity verdicts, each linked to its model card (publish)."""
    exported = artifacts.exported_models(run_dir)
    published = run_dir.complete(artifacts.PUBLISH)
    lines = []
    for name, facts in exported.items():
        card = run_dir.stage_dir(artifacts.PUBLISH) / name / artifacts.MODEL_CARD
        link = (f"[model card](../{artifacts.PUBLISH}/{name}/{artifacts.MODEL_CARD})"
                if published is not None and card.exists() else "no model card (run `distil publish`)")
        parity = read_json(artifacts.ExportedModel(run_dir.stage_dir(artifacts.EXPORT) / name).parity)
        verdicts = ", ".join(f"{variant} {entry['status']}" + ("" if entry["metric"] is None else
                                                               f" ({entry['metric']:.1f})")
                             for variant, entry in parity["variants"].items())
        metric = "" if parity["metric"] is None else f"; PyTorch {parity['metric']} {parity['pytorch']['metric']:.1f}"
        lines.append(f"- `{name}` ({facts['architecture']}, {facts['export_task']}): {link}. Parity on "
                     f"{parity['examples']} {parity['data_task']} {parity['split']} rows{metric}: {verdicts}.")
    return lines


def stage_markdown(run_dir: Run, stage: str, out_dir: Path) -> list[str]:
    """Another stage's own results.md, headings demoted, its PNGs copied beside the report."""
    stage_dir = run_dir.complete(stage)
    if stage_dir is None or not (stage_dir / artifacts.RESULTS_MD).exists():
        return [f"_No complete `{stage}` stage in {run_dir.path}._"]
    text = (stage_dir / artifacts.RESULTS_MD).read_text()
    charts = []
    for image in sorted(stage_dir.glob("*.png")):
        shutil.copy2(image, out_dir / f"{stage}-{image.name}")
        if f"({image.name})" in text:
            text = text.replace(f"({image.name})", f"({stage}-{image.name})")
        else:
            charts.append(f"![{stage} {image.stem}]({stage}-{image.name})")
    return ["##" + line if line.startswith("#") else line for line in text.splitlines()] + ["", *charts]


def distillation_lines(main: dict, baselines: list[dict], verdict_lines: list[str], resamples: int) -> list[str]:
    """What follows the ablation table: every run's held-out MLM figures with their intervals and why uniform masks
    come first, the verdicts, and the budget of each downstream arm (each run's student fine-tuned on labels)."""
    runs = [main, *baselines]
    budgets = budget_table({f"{run['name']}: student fine-tuned": run.get("finetune_arm") for run in runs})
    held_out = held_out_table(runs, main, resamples)
    return [*(["### Held-out masked-token prediction", "", *held_out] if held_out else []), *masks_note(main),
            *(["### Verdicts", "", *verdict_lines, ""] if verdict_lines else []),
            *(["Each downstream arm's budget (one value per seed):", "", *budgets, ""] if budgets else [])]


def render(main: dict, baselines: list[dict], distillation: list[str], run_dir: Run, out_dir: Path,
           teacher_note: str | None, has_curves: bool, task_lines: list[str], speed_lines: list[str]) -> str:
    counts = main.get("param_counts", {})
    lines = [f"# DistilBERT report: {main['name']}", "",
             f"Run directory `{run_dir.path}`; baselines: {', '.join(b['name'] for b in baselines) or 'none'}.", ""]
    if "teacher" in main:
        lines += [f"- Teacher: `{main['teacher']}`" + (f" — {teacher_note}" if teacher_note else ""),
                  f"- Student: {main['student_arch']}, init `{main['init_strategy']}`, layer map {main['layer_map']}",
                  f"- Parameters: teacher {counts['teacher'] / 1e6:.1f}M, student {counts['student'] / 1e6:.1f}M "
                  f"({100 * counts['student'] / counts['teacher']:.0f}% of the teacher; the paper: 66M / 110M = 60%)",
                  ""]
    lines += ["## Distillation: validation MLM and downstream score (the paper's Table 4, at this scale)", "",
              *ablation_table(main, baselines), "", *distillation]
    if task_lines:
        lines += ["## Task-specific distillation: labels alone vs a fine-tuned teacher's outputs on augmented data",
                  "", *task_lines, ""]
    if speed_lines:
        lines += ["## Accuracy beside CPU latency", "", *speed_lines, ""]
    if exported := exported_lines(run_dir):
        lines += ["## Exported models (ONNX, int8 checked on the task)", "", *exported, ""]
    if has_curves:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Downstream (the paper's Tables 1 and 2, at this scale)", "",
              *stage_markdown(run_dir, artifacts.EVALUATE, out_dir), "",
              "## CPU inference (the paper's Table 3)", "", *stage_markdown(run_dir, artifacts.BENCH_CPU, out_dir), ""]
    return "\n".join(lines) + "\n"


