"""FLOPs per token of one distil train step of the paper's recipe, counted, not estimated: the figures docs/scaling.md
derives GPU throughput, hours and cost from.

    .venv/bin/python scripts/flops_per_token.py                 # BERT-base teacher -> 6 x 768 DistilBERT, seq 128, 512
    .venv/bin/python scripts/flops_per_token.py --layers 2 --hidden 64 --vocab 3000   # a quick run, reduced size

The teacher is a randomly initialised BERT-base-shaped masked LM (12 x 768, vocabulary 30522), the student the
DistilBERT `distil init-student` builds from it (every other layer), the step the triple loss as `distil train`
computes it (training.distiller: the teacher's forward without gradients, the student's forward and backward, the
vocabulary logits at every real token since loss.restrict_ce_to_mask is false). torch's FlopCounterMode counts the
floating-point operations of every matrix product and attention kernel the step runs (2 per multiply-add; norms,
activations and the optimizer's elementwise work are left out: well under 1%). Attention runs eagerly here (plain
matrix products, which the counter sees; the fused SDPA kernel on CPU is not counted, and does the same products).
The batch holds full-length sequences, so every token is a real one.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from distilbert_cli.config import compose_config
from distilbert_cli.models.loading import count_parameters
from distilbert_cli.models.student import student_config
from distilbert_cli.training.distiller import MaskedLMRows, distillation_losses, layer_pairs
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import MaskingSpec, collate_masked, token_probabilities

PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased ids


def count(args, seq: int) -> dict:
    torch.manual_seed(0)
    teacher_config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                max_position_embeddings=max(512, seq), attn_implementation="eager")
    teacher = BertForMaskedLM(teacher_config).eval().requires_grad_(False)
    layer_map = list(range(0, args.layers, 2))
    student = AutoModelForMaskedLM.from_config(student_config(teacher_config, "auto", layer_map),
                                               attn_implementation="eager")
    plan = LossPlan.from_config(compose_config("train", ["+experiment=triple_loss"]).loss)
    pairs = layer_pairs(len(layer_map), args.layers, layer_map, plan.teacher_layer)
    rng = np.random.default_rng(0)
    sequences = [[CLS, *rng.integers(1000, args.vocab, seq - 2).tolist(), SEP] for _ in range(args.batch)]
    spec = MaskingSpec(token_probabilities(np.ones(args.vocab, dtype=np.int64), [PAD, 100, CLS, SEP, MASK], 0.0),
                       mlm_probability=0.15, mask_fraction=0.8, random_fraction=0.1, mask_token_id=MASK,
                       pad_token_id=PAD, vocab_size=args.vocab)
    batch = collate_masked(sequences, spec, torch.Generator().manual_seed(0))
    student_rows, teacher_rows = MaskedLMRows(student).train(), MaskedLMRows(teacher)
    with FlopCounterMode(display=False) as forwards:
        distillation_losses(student_rows, teacher_rows, batch, plan, pairs, contextlib.nullcontext)
    with FlopCounterMode(display=False) as step:
        losses = distillation_losses(student_rows, teacher_rows, batch, plan, pairs, contextlib.nullcontext)
        losses["loss"].backward()
    tokens = batch["n_tokens"]
    forward = forwards.get_total_flops()
    return {"seq": seq, "tokens": tokens, "step": step.get_total_flops() / tokens,
            "forwards": forward / tokens, "student_params": count_parameters(student),
            "teacher_params": count_parameters(teacher)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="teacher layers")
    parser.add_argument("--hidden", type=int, default=768, help="teacher width")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--batch", type=int, default=2, help="sequences counted (FLOPs per token do not depend on it)")
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="sequence lengths")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [count(args, seq) for seq in args.seq]
    first = rows[0]
    print(f"teacher BERT {args.layers}x{args.hidden} ({first['teacher_params'] / 1e6:.1f}M), student DistilBERT "
          f"{args.layers // 2 + args.layers % 2}x{args.hidden} ({first['student_params'] / 1e6:.1f}M), triple loss, "
          "logits at every token")
    print("| sequence length | FLOPs per token, whole step | of which the forward passes (teacher + student) | "
          "6 x student params + 2 x teacher params (the usual estimate) |")
    print("|---|---|---|---|")
    estimate = 6 * first["student_params"] + 2 * first["teacher_params"]
    for row in rows:
        print(f"| {row['seq']} | {row['step'] / 1e9:.3f} G | {row['forwards'] / 1e9:.3f} G | {estimate / 1e9:.3f} G |")


if __name__ == "__main__":
    main()
