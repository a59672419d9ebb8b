"""The report's content: what each run's stages say (objective, init, validation MLM, downstream scores), the
loss curves, the ablation table (the paper's Table 4 at this scale) and the verdict of each comparison, with
the paired bootstrap saying whether a downstream difference is beyond the noise of the dev set."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from distilbert_cli import artifacts  # noqa: E402
from distilbert_cli.artifacts import complete_stage, read_json, read_jsonl  # noqa: E402
from distilbert_cli.rundir import read_manifest  # noqa: E402
from distilbert_cli.tasks import get_tasks  # noqa: E402
from distilbert_cli.tasks.results import finetuned_runs, paired_bootstrap  # noqa: E402
from distilbert_cli.training.losses import LOSS_TERMS  # noqa: E402

LOSS_COMPONENTS = ("loss", *(f"loss_{name}" for name in LOSS_TERMS))
# The paper's Table 4: GLUE macro-score change of each ablation against the triple loss.
PUBLISHED_ABLATIONS = {"no_ce": -2.96, "no_cos": -1.46, "no_mlm": -0.31, "random_init": -3.69}


def run_summary(run_dir: Path) -> dict:
    """What one run's stages say: objective, init, validation MLM, downstream scores, parameters."""
    summary = {"name": run_dir.name, "path": str(run_dir)}
    if complete_stage(run_dir, artifacts.INIT_STUDENT):
        init = artifacts.init_student_facts(run_dir)
        summary.update(teacher=init.teacher, init_strategy=init.strategy, layer_map=init.layer_map,
                       param_counts=init.param_counts, student_arch=init.student_arch,
                       student_class=init.student_class)
    if distill_dir := complete_stage(run_dir, artifacts.DISTILL):
        config = read_manifest(distill_dir)["config"]
        # the weights the run recorded (a run from before a term existed has no key for it)
        summary["loss_weights"] = {key: value for key, value in config["loss"].items()
                                   if key.startswith("alpha_") and value}
        distilled = artifacts.DistillOutputs(distill_dir)
        summary["validation"] = read_json(distilled.validation)
        summary["metrics"] = read_jsonl(distilled.metrics)
    if eval_dir := complete_stage(run_dir, artifacts.EVALUATE):
        results = read_json(eval_dir / artifacts.RESULTS_JSON)
        summary["downstream"] = {model: row["score"] for model, row in results["models"].items()}
        summary["downstream_tasks"] = {model: sorted(row["tasks"]) for model, row in results["models"].items()}
        summary["downstream_notes"] = results["notes"]
        summary["retention"] = results["retention"]
    return summary


def plot_losses(runs: list[dict], path: Path) -> bool:
    """One panel per run: every logged loss component over optimizer steps (a component only where it was
    logged), and the end of each training stage (progressive transfer) as a dotted line."""
    runs = [r for r in runs if r.get("metrics")]
    if not runs:
        return False
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for axis, run in zip(axes[0], runs, strict=True):
        for component in LOSS_COMPONENTS:
            points = [(m["step"], m[component]) for m in run["metrics"] if component in m]
            if points:
                axis.plot(*zip(*points, strict=True), label=component, marker="." if len(points) == 1 else None)
        for before, after in itertools.pairwise(run["metrics"]):
            if before.get("stage") != after.get("stage"):
                axis.axvline(before["step"], color="grey", linestyle=":", linewidth=0.8)
        axis.set(title=run["name"], xlabel="step", ylabel="loss", yscale="log")
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _student(run: dict) -> str:
    """The student's class and size: methods side by side distill different students."""
    if "student_class" not in run:
        return "–"
    return f"{run['student_class'].removesuffix('ForMaskedLM')} {run['param_counts']['student'] / 1e6:.1f}M"


def ablation_table(main: dict, baselines: list[dict]) -> list[str]:
    """Table 4 at this scale: validation MLM and downstream score of each run, with deltas vs this run."""
    lines = ["| run | objective (weights) | student | init | val MLM loss | val MLM acc | downstream score | "
             "Δ downstream vs this run | published Δ GLUE (paper Table 4) |", "|---|---|---|---|---|---|---|---|---|"]
    base_score = main.get("downstream", {}).get("student")
    for run in [main, *baselines]:
        student = run.get("validation", {}).get("student", {})
        score = run.get("downstream", {}).get("student")
        delta = None if score is None or base_score is None or run is main else score - base_score
        weights = ", ".join(f"{k.removeprefix('alpha_')} {v:g}" for k, v in run.get("loss_weights", {}).items())
        published = PUBLISHED_ABLATIONS.get(run["name"])
        lines.append(f"| {run['name']} | {weights or '–'} | {_student(run)} | {run.get('init_strategy', '–')} | "
                     f"{_fmt(student.get('mlm_loss'))} | {_fmt(student.get('mlm_accuracy'))} | "
                     f"{_fmt(score, 1)} | {'–' if delta is None else f'{delta:+.1f}'} | "
                     f"{'–' if published is None else f'{published:+.2f} (published)'} |")
    teacher = main.get("validation", {}).get("teacher") or {}
    if teacher:
        lines.append(f"| teacher | – | – | – | {_fmt(teacher.get('mlm_loss'))} | {_fmt(teacher.get('mlm_accuracy'))} | "
                     f"{_fmt(main.get('downstream', {}).get('teacher'), 1)} | – | – |")
    if untrained := [run["name"] for run in [main, *baselines] if "loss_weights" in run and not _trains_head(run)]:
        lines += ["", f"Not trained by the objective (no term needs the student's logits), the MLM head of "
                      f"{', '.join(untrained)} is as initialised: those validation MLM figures do not measure the "
                      "encoder; compare those runs downstream."]
    return lines


def _trains_head(run: dict) -> bool:
    """Whether the run's objective trains the student's MLM head (some term needs the student's logits)."""
    names = [key.removeprefix("alpha_") for key in run.get("loss_weights", {})]
    return any("student_logits" in LOSS_TERMS[name].needs for name in names if name in LOSS_TERMS)


def downstream_comparison(main: dict, baseline: dict, resamples: int, seed: int) -> dict | None:
    """Paired bootstrap of the student's downstream score against the baseline's student, on their common tasks."""
    tasks = sorted(set(main.get("downstream_tasks", {}).get("student", ()))
                   & set(baseline.get("downstream_tasks", {}).get("student", ())))
    finetune_dirs = [complete_stage(Path(run["path"]), artifacts.FINETUNE) for run in (main, baseline)]
    if not tasks or None in finetune_dirs:
        return None
    ours, theirs = (finetuned_runs(path, get_tasks(tasks), models=["student"]) for path in finetune_dirs)
    return paired_bootstrap(ours, theirs, resamples, seed)


def verdict(main: dict, baselines: list[dict], comparisons: list[dict | None]) -> list[str]:
    """Say in words whether the distilled student beats each baseline, with the figures and, for the downstream
    score, whether the difference is beyond the noise of the dev set."""
    lines = []
    for run, comparison in zip(baselines, comparisons, strict=True):
        checks = []
        ours, theirs = main.get("validation", {}).get("student"), run.get("validation", {}).get("student")
        if ours and theirs and _trains_head(main) and _trains_head(run):  # an untrained head's MLM says nothing
            better = ours["mlm_loss"] < theirs["mlm_loss"]
            checks.append(f"validation MLM loss {ours['mlm_loss']:.3f} vs {theirs['mlm_loss']:.3f} "
                          f"({'better' if better else 'NOT better'})")
        ours, theirs = main.get("downstream", {}).get("student"), run.get("downstream", {}).get("student")
        if ours is not None and theirs is not None:
            noise = ""
            if comparison is not None:
                within = comparison["low"] <= 0 <= comparison["high"]
                noise = (f"; difference {comparison['difference']:+.1f}, 95% paired-bootstrap interval "
                         f"[{comparison['low']:+.1f}, {comparison['high']:+.1f}] over {comparison['dev_examples']} "
                         f"dev examples: {'within noise' if within else 'beyond noise'}")
            checks.append(f"downstream {ours:.1f} vs {theirs:.1f} ({'better' if ours > theirs else 'NOT better'}"
                          f"{noise})")
        if checks:
            lines.append(f"- {main['name']} vs {run['name']}: " + "; ".join(checks))
    if any(comparisons):
        lines += ["", "The intervals resample the dev examples only: the spread between fine-tuning seeds comes on "
                      "top (fine-tune with several `finetune.seeds`: the score is then the median over seeds)."]
    return lines


def stage_markdown(run_dir: Path, stage: str, out_dir: Path) -> list[str]:
    """Another stage's own results.md, headings demoted, its PNGs copied beside the report."""
    stage_dir = complete_stage(run_dir, stage)
    if stage_dir is None or not (stage_dir / artifacts.RESULTS_MD).exists():
        return [f"_No complete `{stage}` stage in {run_dir}._"]
    text = (stage_dir / artifacts.RESULTS_MD).read_text()
    charts = []
    for image in sorted(stage_dir.glob("*.png")):
        shutil.copy2(image, out_dir / f"{stage}-{image.name}")
        if f"({image.name})" in text:
            text = text.replace(f"({image.name})", f"({stage}-{image.name})")
        else:
            charts.append(f"![{stage} {image.stem}]({stage}-{image.name})")
    return ["##" + line if line.startswith("#") else line for line in text.splitlines()] + ["", *charts]


def render(main: dict, baselines: list[dict], verdict_lines: list[str], run_dir: Path, out_dir: Path,
           teacher_note: str | None, has_curves: bool) -> str:
    counts = main.get("param_counts", {})
    lines = [f"# DistilBERT report: {main['name']}", "",
             f"Run directory `{run_dir}`; baselines: {', '.join(b['name'] for b in baselines) or 'none'}.", ""]
    if "teacher" in main:
        lines += [f"- Teacher: `{main['teacher']}`" + (f" — {teacher_note}" if teacher_note else ""),
                  f"- Student: {main['student_arch']}, init `{main['init_strategy']}`, layer map {main['layer_map']}",
                  f"- Parameters: teacher {counts['teacher'] / 1e6:.1f}M, student {counts['student'] / 1e6:.1f}M "
                  f"({100 * counts['student'] / counts['teacher']:.0f}% of the teacher; the paper: 66M / 110M = 60%)",
                  ""]
    lines += ["## Distillation: validation MLM and downstream score (the paper's Table 4, at this scale)", "",
              *ablation_table(main, baselines), "", *verdict_lines, ""]
    if has_curves:
        lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    lines += ["## Downstream (the paper's Tables 1 and 2, at this scale)", "",
              *stage_markdown(run_dir, artifacts.EVALUATE, out_dir), "",
              "## CPU inference (the paper's Table 3)", "", *stage_markdown(run_dir, artifacts.BENCH_CPU, out_dir), ""]
    return "\n".join(lines) + "\n"


