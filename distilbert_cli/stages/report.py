"""`distil report`: the paper's Tables 1, 3 and 4 for one run, beside its baselines and the published figures.

    distil report runs/exp1
    distil report run_dir=runs/demo/triple_loss 'report.baselines=[runs/demo/mlm_only,runs/demo/random_init]'

Reads the complete stages of `run_dir` (init-student, distill, evaluate, bench-cpu; each one that is
missing is left out of the report and said so) and of each baseline run, and writes
`<run_dir>/report/report.md` with the PNG loss curves it embeds. Whether the student's downstream score beats a
baseline's is judged with a paired bootstrap over the dev examples of finetune's saved predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.reporting import downstream_comparison, plot_losses, render, run_summary, verdict
from distilbert_cli.rundir import open_stage

log = logging.getLogger(__name__)


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> Path:
    run_dir = Path(cfg.run_dir)
    baseline_dirs = [Path(p) for p in cfg.report.baselines]
    for path in [run_dir, *baseline_dirs]:
        if not path.is_dir():
            raise UsageError(f"run directory not found: {path}")
    if artifacts.complete_stage(run_dir, artifacts.DISTILL) is None:
        raise UsageError(f"nothing to report: {run_dir / artifacts.DISTILL} is not a complete distill stage")
    with open_stage(cfg, artifacts.REPORT, overrides) as stage:
        main = run_summary(run_dir)
        baselines = [run_summary(path) for path in baseline_dirs]
        has_curves = plot_losses([main, *baselines], stage.path / "loss_curves.png")
        resamples = cfg.report.bootstrap_resamples
        comparisons = [downstream_comparison(main, baseline, resamples, cfg.seed) if resamples else None
                       for baseline in baselines]
        verdict_lines = verdict(main, baselines, comparisons)
        report = stage.path / "report.md"
        report.write_text(render(main, baselines, verdict_lines, run_dir, stage.path, cfg.report.teacher_note,
                                 has_curves))
        stage.update(baselines=[str(p) for p in baseline_dirs], verdict=verdict_lines,
                     downstream_comparisons=comparisons)
        log.info("report written: %s", report)
    return report
