"""Distillation throughput: the `distil train` step against a plain reference-style loop, same models and data.

    python scripts/bench_distill.py                                   # BERT-base teacher, 6-layer student
    python scripts/bench_distill.py --hidden 256 --heads 4 --steps 4 --seq 128  # a quick run, reduced size

For each sequence length it times, in one process:
  reference  the reference code's loop: fp32, eager attention, randomly batched (padded) sequences,
             teacher and student logits over the full vocabulary at every position, KL at every non-pad token;
  pipeline   the `distil train` step of distilbert_cli.training (length-grouped batches, sdpa, logits only at the
             rows the loss needs, teacher under no_grad, bf16 on a GPU) at the paper's objective,
  restricted the same with loss.restrict_ce_to_mask=true (KL at the masked positions only).
Both loops process the same `--steps x --micro-batch` sequences (after one untimed warm-up micro batch):
forward of both models and backward of the student per micro batch, an AdamW step every `--accumulation`
micro batches. Tokens/s counts real (non-pad) tokens. On a GPU it also prints the model FLOPs utilisation
(matmul FLOPs of the teacher forward and the student forward + backward, over --peak-tflops).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import Dataset
from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

from distilbert_cli.config import compose_config
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import (
    DistillationBatches,
    MaskingSpec,
    StepLayout,
    collate_masked,
    token_probabilities,
)

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased ids
SPECIAL_IDS = [PAD, 100, CLS, SEP, MASK]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="maximum sequence lengths")
    parser.add_argument("--layers", type=int, default=12, help="teacher layers")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8, help="timed micro batches per loop")
    parser.add_argument("--accumulation", type=int, default=4, help="micro batches per optimizer step")
    parser.add_argument("--min-length", type=int, default=12, help="sequence lengths are uniform in [min, seq]")
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


def synthetic_data(args, max_length: int) -> tuple[Dataset, MaskingSpec]:
    """`--steps x --micro-batch` random sequences with lengths uniform in [--min-length, max_length]."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_length, max_length + 1, args.steps * args.micro_batch)
    sequences = [[CLS, *rng.integers(1000, args.vocab, n - 2).tolist(), SEP] for n in lengths]
    counts = rng.zipf(1.3, args.vocab).astype(np.int64)  # Zipf-like token counts for the smoothing
    spec = MaskingSpec(token_probabilities(counts, SPECIAL_IDS, 0.7), mlm_probability=0.15, mask_fraction=0.8,
                       random_fraction=0.1, mask_token_id=MASK, pad_token_id=PAD, vocab_size=args.vocab)
    return Dataset.from_dict({"input_ids": sequences, "length": lengths}), spec


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


def time_reference(args, student, teacher, dataset, spec, device) -> tuple[float, int]:
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
        model.to(device)
    student.train()
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    order = np.random.default_rng(args.seed).permutation(len(dataset))  # random batches: no length grouping
    micro_batches = [order[:args.micro_batch]] + np.array_split(order, args.steps)  # a warm-up, then every sequence
    tokens, start = 0, None
    for step, indices in enumerate(micro_batches):
        if step == 1:
            sync(device)
            start = time.perf_counter()
        batch = collate_masked(dataset[indices.tolist()]["input_ids"], spec, torch.Generator().manual_seed(step))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        (reference_loss(student, teacher, batch) / args.accumulation).backward()
        if step % args.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        tokens += batch["n_tokens"] if step else 0
    sync(device)
    return time.perf_counter() - start, tokens


def time_pipeline(args, student, teacher, dataset, spec, accelerator, restrict: bool) -> tuple[float, int, float]:
    plan = LossPlan.from_config(compose_config("train", ["+experiment=triple_loss",
                                                         f"loss.restrict_ce_to_mask={str(restrict).lower()}"]).loss)
    teacher_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    teacher_rows = MaskedLMRows(copy.deepcopy(teacher)).to(accelerator.device, teacher_dtype).eval()
    student_rows = MaskedLMRows(copy.deepcopy(student))
    optimizer = torch.optim.AdamW(student_rows.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                  fused=accelerator.device.type == "cuda")
    student_rows, optimizer = accelerator.prepare(student_rows, optimizer)
    student_rows.train()
    # The training stage's batches: every sequence of the set once, grouped by length (one window).
    lengths = np.asarray(dataset.with_format("numpy")["length"])
    layout = StepLayout(args.micro_batch, accumulation=1, world_size=1, steps_per_epoch=args.steps)
    batches = DistillationBatches(dataset, lengths, layout, spec, args.seed, group_window=args.steps, rank=0,
                                  start_step=0, end_step=args.steps)
    tokens, flops, start = 0, 0.0, None
    for step, index in enumerate([0, *range(args.steps)]):  # a warm-up, then every sequence
        if step == 1:
            sync(accelerator.device)
            start = time.perf_counter()
        batch = {k: v.to(accelerator.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batches[index].items()}
        losses = distillation_losses(student_rows, teacher_rows, batch, plan, [], accelerator.autocast)
        accelerator.backward(losses["loss"] / args.accumulation)
        if step % args.accumulation == 0:
            accelerator.clip_grad_norm_(student_rows.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if step:
            tokens += batch["n_tokens"]
            seq_lengths = batch["attention_mask"].sum(1)
            pairs = int((seq_lengths**2).sum())
            rows = len(batch["target_rows"] if plan.logits_at_targets_only else batch["token_rows"])
            flops += (matmul_flops(args.layers, args.hidden, args.vocab, batch["n_tokens"], pairs, rows)
                      + 3 * matmul_flops(args.student_layers, args.hidden, args.vocab, batch["n_tokens"], pairs, rows))
    sync(accelerator.device)
    return time.perf_counter() - start, tokens, flops


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    teacher, student = build_models(args)
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({hardware})"
          f" | teacher {args.layers}x{args.hidden}, student {args.student_layers}x{args.hidden}, vocab {args.vocab}"
          f" | micro batch {args.micro_batch}, lengths uniform in [{args.min_length}, seq]"
          f" | {args.steps} timed micro batches, accumulation {args.accumulation}"
          f" | pipeline precision {accelerator.mixed_precision}")
    header = f"{'seq':>4}  {'loop':<58}{'tokens/s':>10}  {'vs reference':>12}"
    print(header + ("  MFU" if device.type == "cuda" else ""))
    for max_length in args.seq:
        dataset, spec = synthetic_data(args, max_length)
        seconds, tokens = time_reference(args, student, teacher, dataset, spec, device)
        reference_rate = tokens / seconds
        print(f"{max_length:>4}  {'reference (fp32, eager attention, padded, full-vocab KL)':<58}"
              f"{reference_rate:>10.0f}  {1.0:>11.2f}x")
        for label, restrict in (("pipeline (paper objective)", False),
                                ("pipeline (restrict_ce_to_mask=true)", True)):
            seconds, tokens, flops = time_pipeline(args, student, teacher, dataset, spec, accelerator, restrict)
            rate = tokens / seconds
            mfu = f"  {100 * flops / seconds / (args.peak_tflops * 1e12):.1f}%" if device.type == "cuda" else ""
            print(f"{max_length:>4}  {label:<58}{rate:>10.0f}  {rate / reference_rate:>11.2f}x{mfu}")


if __name__ == "__main__":
    main()
