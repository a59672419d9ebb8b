"""Distillation throughput and memory: the engine's `distil train` step against a plain reference-style loop, same
models and data; mixed precision and the teacher's dtype; the loss after N steps in each precision.

    python scripts/bench_distill.py                                   # BERT-base teacher, 6-layer student
    python scripts/bench_distill.py --precision no bf16 --seq 128 --steps 6 --quality-steps 50   # CPU bf16 vs fp32
    python scripts/bench_distill.py --layers 24 --hidden 1024 --heads 16 --teacher-dtype fp32 bf16 \
        --skip-reference --seq 128                                    # a BERT-large-shaped teacher's memory
    python scripts/bench_distill.py --hidden 256 --heads 4 --steps 4 --seq 128   # a quick run, reduced size

For each sequence length it times, in one process:
  reference  the reference code's loop: fp32, eager attention, randomly batched (padded) sequences,
             teacher and student logits over the full vocabulary at every position, KL at every non-pad token;
  engine     `distil train`'s step, `training.engine.train_step` (length-grouped micro batches, sdpa, logits only at
             the rows the loss needs, teacher under no_grad in teacher.dtype, autocast in `--precision`, the
             non-finite guard, clipping, fused AdamW on a GPU) at the paper's objective, then with
             loss.restrict_ce_to_mask=true (KL at the masked positions only).
Every loop processes the same `--steps x --micro-batch` sequences after one untimed warm-up step. Tokens/s counts
real (non-pad) tokens. Memory: the teacher's weights as held (bytes of its tensors), and the peak of the process
during the loop (GPU: torch.cuda.max_memory_allocated; CPU: the resident-set high-water mark, reset before each
loop). On a GPU it also prints the model FLOPs utilisation (matmul FLOPs of the teacher forward and the student
forward + backward, over --peak-tflops). With --quality-steps N, each precision also trains N steps from the same
initialisation on the same batches and prints its logged loss (mean of the last 10 steps) beside fp32's.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from distilbert_cli.bench.measure import peak_rss_bytes, reset_peak_rss
from distilbert_cli.config import compose_config
from distilbert_cli.training import setup
from distilbert_cli.training.batches import StepBatches, StepLayout
from distilbert_cli.training.checkpoint import TrainerState
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses
from distilbert_cli.training.engine import EngineSettings, MetricsLog, TrainingJob, train_step
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import MaskedSequences, MaskingSpec, collate_masked, token_probabilities

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased ids
SPECIAL_IDS = [PAD, 100, CLS, SEP, MASK]
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="maximum sequence lengths")
    parser.add_argument("--layers", type=int, default=12, help="teacher layers")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro batch")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per loop")
    parser.add_argument("--accumulation", type=int, default=1, help="micro batches per optimizer step")
    parser.add_argument("--min-length", type=int, default=12, help="sequence lengths are uniform in [min, seq]")
    parser.add_argument("--precision", nargs="+", default=None, choices=["no", "bf16", "fp16"],
                        help="train.mixed_precision of the engine loops (default: bf16 on a GPU, no on a CPU)")
    parser.add_argument("--teacher-dtype", nargs="+", default=["auto"], choices=["auto", "fp32", "bf16", "fp16"],
                        help="teacher.dtype (auto: the precision's type)")
    parser.add_argument("--compile", action="store_true", help="torch.compile student and teacher (train.compile)")
    parser.add_argument("--skip-reference", action="store_true", help="time the engine loops only")
    parser.add_argument("--quality-steps", type=int, default=0, help="train this many steps per precision and "
                        "compare the logged loss (0: skip)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak dense bf16 (H100/H200: 989)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(args.seed)
    teacher = BertForMaskedLM(BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                         intermediate_size=4 * args.hidden))
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=args.vocab, dim=args.hidden,
                                                     n_layers=args.student_layers, n_heads=args.heads,
                                                     hidden_dim=4 * args.hidden))
    return teacher, student


def synthetic_data(args, max_length: int, sequences: int) -> tuple[Dataset, MaskingSpec]:
    """`sequences` random sequences with lengths uniform in [--min-length, max_length]."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_length, max_length + 1, sequences)
    rows = [[CLS, *rng.integers(1000, args.vocab, n - 2).tolist(), SEP] for n in lengths]
    counts = rng.zipf(1.3, args.vocab).astype(np.int64)  # Zipf-like token counts for the smoothing
    spec = MaskingSpec(token_probabilities(counts, SPECIAL_IDS, 0.7), mlm_probability=0.15, mask_fraction=0.8,
                       random_fraction=0.1, mask_token_id=MASK, pad_token_id=PAD, vocab_size=args.vocab)
    return Dataset.from_dict({"input_ids": rows, "length": lengths}), spec


def matmul_flops(layers: int, hidden: int, vocab: int, tokens: int, attention_pairs: int, logit_rows: int) -> float:
    """Forward matmul FLOPs of an encoder (FFN 4 x hidden) over `tokens` real tokens, with attention over
    `attention_pairs` query-key pairs, plus its MLM head (transform + vocabulary projection) at `logit_rows`."""
    per_token = layers * 2 * (4 * hidden * hidden + 2 * hidden * 4 * hidden)
    return per_token * tokens + layers * 2 * 2 * hidden * attention_pairs + 2 * (hidden + vocab) * hidden * logit_rows


def reference_loss(student, teacher, batch, temperature=2.0) -> torch.Tensor:
    """The reference code's loss on one micro batch (fp32, full-vocab logits, KL at every non-pad token)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(input_ids, -100).flatten()
    labels[batch["target_rows"]] = batch["target_labels"]
    student_out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    with torch.no_grad():
        teacher_out = teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    vocab = student_out.logits.size(-1)
    mask = attention_mask.bool().unsqueeze(-1)
    s_logits = torch.masked_select(student_out.logits, mask.expand_as(student_out.logits)).view(-1, vocab)
    t_logits = torch.masked_select(teacher_out.logits, mask.expand_as(teacher_out.logits)).view(-1, vocab)
    loss_ce = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.softmax(t_logits / temperature, -1),
                       reduction="batchmean") * temperature**2
    loss_mlm = F.cross_entropy(student_out.logits.view(-1, vocab), labels.view(-1), ignore_index=-100)
    dim = student_out.hidden_states[-1].size(-1)
    s_hidden = torch.masked_select(student_out.hidden_states[-1], mask.expand(-1, -1, dim)).view(-1, dim)
    t_hidden = torch.masked_select(teacher_out.hidden_states[-1], mask.expand(-1, -1, dim)).view(-1, dim)
    loss_cos = F.cosine_embedding_loss(s_hidden, t_hidden, s_hidden.new_ones(s_hidden.size(0)))
    return 5.0 * loss_ce + 2.0 * loss_mlm + 1.0 * loss_cos


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()


def time_reference(args, student, teacher, dataset, spec, device) -> tuple[float, int]:
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
        model.to(device)
    student.train()
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    micro_batches = args.steps * args.accumulation
    order = np.random.default_rng(args.seed).permutation(len(dataset))  # random batches: no length grouping
    batches = [order[:args.micro_batch]] + np.array_split(order[:micro_batches * args.micro_batch], micro_batches)
    tokens, start = 0, None
    for number, indices in enumerate(batches):  # a warm-up, then every sequence
        if number == 1:
            sync(device)
            start = time.perf_counter()
        batch = collate_masked(dataset[indices.tolist()]["input_ids"], spec, torch.Generator().manual_seed(number))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        (reference_loss(student, teacher, batch) / args.accumulation).backward()
        if number % args.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += batch["n_tokens"] if number else 0
    sync(device)
    return time.perf_counter() - start, tokens


def engine_run(args, student, teacher, dataset, spec, precision: str, teacher_dtype: str, restrict: bool,
               steps: int, workdir: Path) -> dict:
    """`steps` optimizer steps of the engine after a warm-up one: seconds, real tokens, model FLOPs, the teacher's
    weight bytes, peak memory and the logged losses."""
    AcceleratorState._reset_state()  # one process, several precisions: accelerate keeps its first otherwise
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=args.accumulation,
                              step_scheduler_with_optimizer=False)
    cfg = compose_config("train", ["+experiment=triple_loss", f"loss.restrict_ce_to_mask={str(restrict).lower()}"])
    plan = LossPlan.from_config(cfg.loss)
    dtype = teacher_dtype if teacher_dtype != "auto" else setup.AUTO_TEACHER_DTYPES[precision]
    reset_peak(accelerator.device)
    teacher_rows = MaskedLMRows(copy.deepcopy(teacher).to(TEACHER_DTYPES[dtype]).eval().requires_grad_(False))
    teacher_rows.to(accelerator.device)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher_rows.parameters())
    student_rows = MaskedLMRows(copy.deepcopy(student))
    optimizer, scheduler = setup.optimizer_and_schedule(cfg.optim, student_rows.parameters(), steps + 1,
                                                        fused=accelerator.device.type == "cuda")
    if args.compile:
        student_rows.compile(dynamic=True)
        teacher_rows.compile(dynamic=True)
    student_rows, optimizer, scheduler = accelerator.prepare(student_rows, optimizer, scheduler)
    # The training stage's micro batches: grouped by length over the whole set (one window).
    lengths = np.asarray(dataset.with_format("numpy")["length"])
    layout = StepLayout.of(len(dataset), args.micro_batch, args.accumulation, 1)
    batches = StepBatches(lengths, layout, MaskedSequences(dataset, spec), args.seed, layout.steps_per_epoch, 0, 0,
                          steps + 1)
    job = TrainingJob(student_rows, optimizer, scheduler, batches,
                      lambda batch: distillation_losses(student_rows, teacher_rows, batch, plan, [],
                                                        accelerator.autocast),
                      {}, workdir / "checkpoints", workdir / "metrics.jsonl", "bench")
    settings = EngineSettings("train", args.seed, steps + 1, cfg.optim.max_grad_norm, 10, 1, 10**9, 1)
    state, loader = TrainerState(), iter(torch.utils.data.DataLoader(batches, batch_size=None))
    metrics = MetricsLog(job.metrics, None, accelerator, state)
    student_rows.train()
    losses, flops, tokens, start = [], 0.0, 0, None
    for step in range(steps + 1):  # a warm-up step, then the timed ones
        if step == 1:
            sync(accelerator.device)
            start = time.perf_counter()
        train_step(job, settings, state, accelerator, loader, metrics, step)
        state.step, state.tokens_seen = step + 1, state.tokens_seen + batches.step_tokens(step)
        losses.append(metrics.write(state, 0.0, None)["loss"])
        if step:
            for accumulation_index in range(args.accumulation):
                epoch, index, _ = layout.locate(step, accumulation_index, 0)
                rows = lengths[batches.batches_of(epoch)[index]]
                logit_rows = math.ceil(0.15 * rows.sum()) if plan.logits_at_targets_only else int(rows.sum())
                pairs = int((rows.astype(np.int64) ** 2).sum())
                flops += (matmul_flops(args.layers, args.hidden, args.vocab, int(rows.sum()), pairs, logit_rows)
                          + 3 * matmul_flops(args.student_layers, args.hidden, args.vocab, int(rows.sum()), pairs,
                                             logit_rows))
            tokens += batches.step_tokens(step)
    sync(accelerator.device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "flops": flops, "teacher_bytes": teacher_bytes,
            "peak_bytes": peak_bytes(accelerator.device), "losses": losses}


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    precisions = args.precision or (["bf16"] if cuda else ["no"])
    device = torch.device("cuda" if cuda else "cpu")
    teacher, student = build_models(args)
    hardware = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {hardware}, torch {torch.__version__}"
          f" | teacher {args.layers}x{args.hidden}, student {args.student_layers}x{args.hidden}, vocab {args.vocab}"
          f" | micro batch {args.micro_batch} x accumulation {args.accumulation}, lengths uniform in "
          f"[{args.min_length}, seq] | {args.steps} timed steps{' | compiled' if args.compile else ''}")
    print(f"{'seq':>4}  {'loop':<40}{'precision':>10}{'teacher':>8}{'tokens/s':>10}{'vs ref':>8}"
          f"{'teacher MB':>11}{'peak MB':>9}" + ("   MFU" if cuda else ""))
    with tempfile.TemporaryDirectory() as tmp:
        for max_length in args.seq:
            dataset, spec = synthetic_data(args, max_length, (args.steps + 1) * args.accumulation * args.micro_batch)
            reference_rate = None
            if not args.skip_reference:
                reset_peak(device)
                seconds, tokens = time_reference(args, student, teacher, dataset, spec, device)
                reference_rate = tokens / seconds
                print(f"{max_length:>4}  {'reference (padded, full-vocab KL)':<40}{'fp32':>10}{'fp32':>8}"
                      f"{reference_rate:>10.0f}{1.0:>7.2f}x{'':>11}{peak_bytes(device) / 2**20:>9.0f}")
            for precision in precisions:
                for teacher_dtype in args.teacher_dtype:
                    for label, restrict in (("engine (paper objective)", False),
                                            ("engine (restrict_ce_to_mask=true)", True)):
                        found = engine_run(args, student, teacher, dataset, spec, precision, teacher_dtype, restrict,
                                           args.steps, Path(tmp))
                        rate = found["tokens"] / found["seconds"]
                        dtype = teacher_dtype if teacher_dtype != "auto" else setup.AUTO_TEACHER_DTYPES[precision]
                        versus = f"{rate / reference_rate:>7.2f}x" if reference_rate else f"{'':>8}"
                        mfu = (f"  {100 * found['flops'] / found['seconds'] / (args.peak_tflops * 1e12):.1f}%"
                               if cuda else "")
                        print(f"{max_length:>4}  {label:<40}{precision:>10}{dtype:>8}{rate:>10.0f}{versus}"
                              f"{found['teacher_bytes'] / 2**20:>11.0f}{found['peak_bytes'] / 2**20:>9.0f}{mfu}")
        if args.quality_steps:
            dataset, spec = synthetic_data(args, args.seq[0], args.quality_steps * args.accumulation * args.micro_batch)
            print(f"\nloss after {args.quality_steps} steps (seq {args.seq[0]}, the same initialisation and batches; "
                  "mean of the logged loss over the last 10 steps):")
            means = {}
            for precision in ["no", *[p for p in precisions if p != "no"]]:
                found = engine_run(args, student, teacher, dataset, spec, precision, "auto", False,
                                   args.quality_steps - 1, Path(tmp))
                means[precision] = float(np.mean(found["losses"][-10:]))
                difference = "" if precision == "no" else (f"  ({means[precision] - means['no']:+.4f} vs fp32, "
                                                           f"{100 * (means[precision] / means['no'] - 1):+.2f}%)")
                print(f"  {precision:>4}: first {found['losses'][0]:.4f}, last-10 mean {means[precision]:.4f}"
                      f"{difference}")


if __name__ == "__main__":
    main()
