"""One training step of each distillation method on the same teacher and batch: tokens/s and peak memory.

    python scripts/bench_methods.py                                  # BERT-base-shaped teacher, 8 x 128 tokens
    python scripts/bench_methods.py --layers 4 --hidden 96 --vocab 3000 --steps 2   # a quick run, reduced size

The teacher is a randomly initialised BERT-base-shaped masked LM (12 x 768, 12 heads, vocabulary 30522); each
method's student, loss plan and layer pairs come from its experiment (conf/experiment/<name>.yaml, composed as
`distil init-student` and `distil train` compose them) and are built the way `distil train` builds them
(training.setup: MaskedLMRows, the projections to the teacher's width, the progressive-transfer stages).
MobileBERT is timed in two of its stages: a layer stage (layer 0 and the embeddings trained, the loss on layer 0
alone) and the pre-training distillation stage. A step = the teacher's forward (no grad), the student's forward
and backward and an AdamW update, on one micro batch of `--batch` random sequences with lengths uniform in
[--min-length, --seq]; tokens/s counts real tokens over the median of `--steps` timed steps after one warm-up.
Each method runs in its own process, so its peak memory is its own: on CPU the process's peak RSS (models,
optimizer state, activations) and the rise over the RSS before the first step; on a GPU the peak allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from distilbert_cli.config import compose_config
from distilbert_cli.models.loading import count_parameters
from distilbert_cli.models.student import student_config
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses, layer_pairs
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import MaskingSpec, collate_masked, token_probabilities
from distilbert_cli.training.progressive import enter, stages

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased ids
# (row, experiment, progressive-transfer stage timed: None = the run's only stage, 0 = the first, -1 = the last)
ROWS = [("triple_loss (DistilBERT)", "triple_loss", None), ("tinybert_general", "tinybert_general", None),
        ("mobilebert: layer stage", "mobilebert", 0), ("mobilebert: pre-training distillation", "mobilebert", -1),
        ("minilm", "minilm", None), ("minilmv2", "minilmv2", None)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="teacher layers")
    parser.add_argument("--hidden", type=int, default=768, help="teacher width")
    parser.add_argument("--heads", type=int, default=12, help="teacher attention heads")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="maximum sequence length")
    parser.add_argument("--min-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--row", type=int, help=argparse.SUPPRESS)  # internal: time one row, print JSON
    return parser.parse_args()


def batch(args) -> dict:
    """The same micro batch for every method: random tokens, masked as distil train masks them."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_length, args.seq + 1, args.batch)
    sequences = [[CLS, *rng.integers(1000, args.vocab, n - 2).tolist(), SEP] for n in lengths]
    spec = MaskingSpec(token_probabilities(np.ones(args.vocab, dtype=np.int64), [PAD, 100, CLS, SEP, MASK], 0.0),
                       mlm_probability=0.15, mask_fraction=0.8, random_fraction=0.1, mask_token_id=MASK,
                       pad_token_id=PAD, vocab_size=args.vocab)
    return collate_masked(sequences, spec, torch.Generator().manual_seed(args.seed))


def time_row(args) -> dict:
    label, experiment, stage_index = ROWS[args.row]
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    torch.manual_seed(args.seed)
    teacher_config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, intermediate_size=4 * args.hidden)
    teacher = BertForMaskedLM(teacher_config).eval().requires_grad_(False)
    shape = compose_config("init_student", [f"+experiment={experiment}"]).student
    loss_cfg = compose_config("train", [f"+experiment={experiment}"])
    student = AutoModelForMaskedLM.from_config(student_config(
        teacher_config, shape.arch, shape.num_layers or args.layers, shape.hidden_size, shape.num_attention_heads,
        shape.intermediate_size))
    plan = LossPlan.from_config(loss_cfg.loss)
    pairs = layer_pairs(student.config.num_hidden_layers, args.layers, None, plan.teacher_layer)
    schedule = stages(plan, pairs, loss_cfg.train.progressive_transfer, total_steps=100)
    index = (stage_index or 0) % len(schedule)
    stage = enter(schedule, schedule[index - 1].end if index else 0, student)  # its loss and trainable parameters
    projections = nn.ModuleDict({name: nn.Linear(student.config.hidden_size, args.hidden)
                                 for name, used in (("embed", plan.embeddings), ("hidden", plan.hidden_states))
                                 if used and student.config.hidden_size != args.hidden})
    teacher_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    teacher_rows = MaskedLMRows(teacher).to(device, teacher_dtype)
    student_rows = MaskedLMRows(student, projections)
    optimizer = torch.optim.AdamW(student_rows.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                  fused=device.type == "cuda")
    student_rows, optimizer = accelerator.prepare(student_rows, optimizer)
    student_rows.train()
    micro = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch(args).items()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(args.steps + 1):  # a warm-up, then the timed steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = distillation_losses(student_rows, teacher_rows, micro, stage.plan, stage.pairs, accelerator.autocast)
        accelerator.backward(losses["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    student_shape = (f"{type(student).__name__.removesuffix('ForMaskedLM')} {student.config.num_hidden_layers}x"
                     f"{student.config.hidden_size} {count_parameters(student) / 1e6:.1f}M")
    return {"label": label, "student": student_shape, "losses": " + ".join(stage.plan.used),
            "tokens_per_s": micro["n_tokens"] / statistics.median(seconds), "peak_mib": peak,
            "rise_mib": peak - rss_before if device.type != "cuda" else None, "device": str(device),
            "threads": torch.get_num_threads()}


def main() -> None:
    args = parse_args()
    if args.row is not None:
        print(json.dumps(time_row(args)))
        return
    results = []
    for row in range(len(ROWS)):
        command = [sys.executable, __file__, *sys.argv[1:], "--row", str(row)]
        process = subprocess.run(command, capture_output=True, text=True)
        if process.returncode:
            sys.exit(f"error: {ROWS[row][0]} failed:\n{process.stderr[-2000:]}")
        results.append(json.loads(process.stdout.strip().splitlines()[-1]))
        print(f"... {results[-1]['label']}", file=sys.stderr, flush=True)
    first = results[0]
    memory = "peak alloc MiB" if first["rise_mib"] is None else "peak RSS MiB (rise)"
    print(f"teacher BERT {args.layers}x{args.hidden} ({args.heads} heads, vocab {args.vocab}) | batch {args.batch} "
          f"sequences, lengths uniform in [{args.min_length}, {args.seq}] | {first['device']}, "
          f"{first['threads']} threads | median of {args.steps} steps after a warm-up")
    print(f"| method | student | losses of the step | tokens/s | {memory} |")
    print("|---|---|---|---|---|")
    for r in results:
        rise = "" if r["rise_mib"] is None else f" ({r['rise_mib']:+.0f})"
        print(f"| {r['label']} | {r['student']} | {r['losses']} | {r['tokens_per_s']:.0f} | "
              f"{r['peak_mib']:.0f}{rise} |")


if __name__ == "__main__":
    main()
