"""`make reproduce`: the paper's general-distillation ablations (its Table 4) at a budget where students move, on the
demo's teacher, corpus and stand-in task, and docs/results-cpu.md written from the run's report.

    .venv/bin/python scripts/reproduce.py [--root runs/reproduce] [--steps 800] [--seeds 1,2,3] [--dry-run]

1. The demo's teacher (runs/demo/teacher-mlm; built as `make demo` builds it when missing) and its corpus, prepared
   again in <root> (so that the sweep's members read it in place).
2. One `distil sweep` over +experiment=triple_loss,no_ce,no_cos,mlm_only,random_init: each member's student
   initialised from the teacher (random_init: at random), distilled for --steps steps (10x the demo's 80), fine-tuned
   on the stand-in with each of --seeds at its own best budget (the held-out split, early stopping, as the demo), and
   evaluated (the median over the seeds, as the paper reports).
3. `distil report <root>`: one row per member against triple_loss, with paired-bootstrap intervals over the dev
   examples, validation MLM, and the paper's published Table 4 deltas beside them.
4. docs/results-cpu.md: the command, the machine, the wall time and the report, as the report says it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from demo import (
    BATCH,
    FINETUNE,
    STANDIN_NOTE,
    TRAIN_COMMON,
    TRANSFORMER_TRAINING,
    Demo,
    prepare_corpus,
)

REPO = Path(__file__).resolve().parent.parent
MEMBERS = ("triple_loss", "no_ce", "no_cos", "mlm_only", "random_init")


def results_markdown(report: Path, command: str, seconds: float) -> str:
    """docs/results-cpu.md: how the figures were made, then the report's own text (headings one level down, paths
    relative to the repository, its charts left in the run's report folder)."""
    import torch

    lines = ["# General distillation on a CPU: the paper's Table 4 at laptop scale", "",
             f"Made by `make reproduce` ({command}) on {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, in {seconds / 60:.0f} minutes of wall time "
             "(the script's start to its end). Every figure below is the run's own report (`distil report`), copied "
             "as it is; its charts are in the run's `report/` folder.", ""]
    lines += ["#" + line if line.startswith("#") else line for line in report.read_text().splitlines()
              if not line.startswith("![")]
    return "\n".join(lines).replace(f"{REPO}/", "") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/reproduce"), help="the sweep's run directory")
    parser.add_argument("--demo-root", type=Path, default=Path("runs/demo"), help="where the demo's teacher is")
    parser.add_argument("--steps", type=int, default=800, help="distillation steps of every member")
    parser.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds of every member")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results-cpu.md")
    parser.add_argument("--dry-run", action="store_true", help="check the commands without running them")
    args = parser.parse_args()
    started = time.perf_counter()

    demo = Demo(args.demo_root, args.dry_run)
    corpus, teacher_run, data = demo.assets_and_teacher()
    root = args.root.resolve()
    demo.distil("prepare-data", root, "prepare-data", *prepare_corpus(corpus, str(teacher_run / "distill" / "final")))
    demo.command(["distil", "sweep", f"run_dir={root}", "sweep.stages=[init-student,train,finetune,evaluate]",
                  "+experiment=" + ",".join(MEMBERS), f"teacher.name_or_path={teacher_run / 'distill' / 'final'}",
                  "student.num_layers=3", *BATCH, *TRAIN_COMMON, f"train.max_steps={args.steps}", data,
                  "finetune.models=[student]", *FINETUNE, *TRANSFORMER_TRAINING, f"finetune.seeds=[{args.seeds}]",
                  STANDIN_NOTE])
    demo.command(["distil", "report", f"run_dir={root}", "overwrite=true", "report.reference=triple_loss"])
    if not args.dry_run:
        command = shlex.join([Path(sys.executable).name, *sys.argv])
        args.results.write_text(results_markdown(root / "report" / "report.md", command,
                                                 time.perf_counter() - started))
        print(f"[reproduce] {args.results}", flush=True)


if __name__ == "__main__":
    main()
