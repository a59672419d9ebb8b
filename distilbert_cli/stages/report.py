"""`distil report`: the paper's Tables 1, 3 and 4 for one run, beside its baselines and the published figures.

    distil report runs/exp1
    distil report run_dir=runs/demo/triple_loss 'report.baselines=[runs/demo/mlm_only,runs/demo/bilstm]'
    distil report runs/t4 report.reference=triple_loss     # over a sweep (distil sweep ran in runs/t4)

Reads the complete stages of `run_dir` (init-student, distill, finetune, task-distill, evaluate, bench-cpu; each
one that is missing is left out of the report and said so) and of each baseline run, and writes
`<run_dir>/report/report.md` with the PNG charts it embeds (loss curves, accuracy vs CPU latency). Each run's
held-out MLM loss, accuracy and agreement with the teacher, on uniform masks (BERT's objective, compared first) and
on frequency-smoothed ones, come with 95% bootstrap intervals over the masked targets, and two runs scored on the
same targets are compared target by target. Whether the student's downstream score beats a baseline's, and whether
a task-distilled student beats the same student fine-tuned on labels alone, is judged with a paired bootstrap over
the dev examples of the saved predictions; each verdict says how the arms were trained (each at its own best
budget chosen on held-out training examples, or at equal steps) and the report states each arm's budget.

Over a sweep's run directory (`<run_dir>/sweep/sweep.json`), the report is the members' table instead: each
member's objective, validation MLM and downstream score against `report.reference` with its paired-bootstrap
interval and the protocol of the fine-tuning, the paper's Table 4 deltas beside its ablations, the members' held-out
MLM with intervals (each compared with the reference on the same targets), their fine-tuning budgets, the metric
charted against each swept numeric value, and the members' loss curves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.held_out import held_out_mlm, paired_mlm
from distilbert_cli.reporting import (
    STAGE_READS,
    accuracy_latency,
    accuracy_latency_lines,
    distillation_lines,
    downstream_comparison,
    downstream_protocol,
    plot_accuracy_latency,
    plot_losses,
    render,
    run_summary,
    task_distillation,
    task_distillation_lines,
    verdict,
)
from distilbert_cli.rundir import Run, Stage
from distilbert_cli.schema import Report
from distilbert_cli.sweep_report import sweep_record, write_sweep_report

log = logging.getLogger(__name__)


def check_sections(stage: Stage, main: dict, text: str) -> None:
    """The report shows the run's own distillation figures, and every chart it links was drawn."""
    if main.get("validation", {}).get("student", {}).get("mlm_loss") is None:
        raise stage.no_work(f"the distillation section has no validation figures for {main['path']}")
    for chart in re.findall(r"\]\(([^)\s]+\.png)\)", text):
        if not (stage.path / chart).is_file():
            raise stage.no_work(f"report.md shows the chart {chart}, which was not drawn")


def run(cfg: Report, overrides: Sequence[str] = ()) -> Path:
    run_dir = Run.of(cfg)
    if (record := sweep_record(run_dir)) is not None:
        with run_dir.open_stage(artifacts.REPORT, cfg, overrides) as stage:
            facts = write_sweep_report(run_dir, record, stage.path, cfg.report.reference,
                                       cfg.report.bootstrap_resamples, cfg.seed)
            stage.update(**facts)
            log.info("sweep report written: %s", stage.path / "report.md")
        return stage.path / "report.md"
    baseline_dirs = [Run(Path(p)) for p in cfg.report.baselines]
    for each in [run_dir, *baseline_dirs]:
        if not each.path.is_dir():
            raise UsageError(f"run directory not found: {each.path}")
    if run_dir.complete(artifacts.DISTILL) is None:
        raise UsageError(f"nothing to report: {run_dir.stage_dir(artifacts.DISTILL)} is not a complete distill stage")
    with run_dir.open_stage(artifacts.REPORT, cfg, overrides) as stage:
        stage.expect("report.md")
        for each in [run_dir, *baseline_dirs]:  # read-locked and verified while the report is written
            for name, reads in STAGE_READS.items():
                if each.complete(name) is not None:
                    stage.use_stage(name, reads, run=each)
        main = run_summary(run_dir)
        baselines = [run_summary(each) for each in baseline_dirs]
        has_curves = plot_losses([main, *baselines], stage.path / "loss_curves.png")
        resamples = cfg.report.bootstrap_resamples
        for each in [main, *baselines]:
            each["held_out"] = held_out_mlm(each, resamples, cfg.seed)
        mlm_pairs = [paired_mlm(main, baseline, resamples, cfg.seed) for baseline in baselines]
        comparisons = [downstream_comparison(main, baseline, resamples, cfg.seed) if resamples else None
                       for baseline in baselines]
        verdict_lines = verdict(main, baselines, comparisons, mlm_pairs)
        task_distilled = task_distillation([main, *baselines], resamples, cfg.seed)
        points = accuracy_latency(main, [main, *baselines], task_distilled)
        if points:
            plot_accuracy_latency(points, stage.path / "accuracy_latency.png")
        report = stage.path / "report.md"
        text = render(main, baselines, distillation_lines(main, baselines, verdict_lines, resamples), run_dir,
                      stage.path, cfg.report.teacher_note, has_curves, task_distillation_lines(task_distilled),
                      accuracy_latency_lines(points))
        check_sections(stage, main, text)
        report.write_text(text)
        stage.update(baselines=[str(each.path) for each in baseline_dirs], verdict=verdict_lines,
                     held_out_mlm=[{"run": each["name"], **each["held_out"]} for each in [main, *baselines]],
                     mlm_comparisons=mlm_pairs, downstream_comparisons=comparisons,
                     downstream_protocols=[downstream_protocol(main, baseline) for baseline in baselines],
                     accuracy_latency=points,
                     task_distillation=[{"run": entry["run"]["name"], "labels": entry["labels"],
                                         "distilled": entry["distilled"], "comparison": entry["comparison"],
                                         "protocol": entry["protocol"]} for entry in task_distilled])
        log.info("report written: %s", report)
    return report
