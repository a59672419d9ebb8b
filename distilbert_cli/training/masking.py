"""Dynamic MLM masking for the distill stage: each micro batch's targets are drawn from its own generator, seeded
from (seed, its global micro-batch number) by training/batches.py, so a resumed run or a run on another number of
processes sees exactly the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def token_probabilities(token_counts: np.ndarray, special_ids: Sequence[int], exponent: float) -> torch.Tensor:
    """Masking weight per vocabulary id: count^-exponent (frequent tokens masked less), 0 for special tokens.

    Unseen tokens count as seen once, as in the reference (their weight would otherwise be infinite).
    """
    weights = np.maximum(token_counts.astype(np.float64), 1.0) ** -exponent
    weights[list(special_ids)] = 0.0
    return torch.from_numpy(weights).float()


@dataclass(frozen=True)
class MaskingSpec:
    """What the masking needs to know, read once from the config and the tokenizer."""

    token_weights: torch.Tensor  # [vocab] float, 0 for special tokens
    mlm_probability: float
    mask_fraction: float
    random_fraction: float
    mask_token_id: int
    pad_token_id: int
    vocab_size: int


def masking_spec(masking_cfg, tokenizer, token_counts: np.ndarray, vocab_size: int) -> MaskingSpec:
    """The spec of a train config's `masking` section for a tokenizer and the corpus token counts."""
    return MaskingSpec(
        token_weights=token_probabilities(token_counts, tokenizer.all_special_ids, masking_cfg.smoothing_exponent),
        mlm_probability=masking_cfg.mlm_probability,
        mask_fraction=masking_cfg.mask_fraction,
        random_fraction=masking_cfg.random_fraction,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
    )


def collate_masked(sequences: Sequence[Sequence[int]], spec: MaskingSpec, generator: torch.Generator) -> dict:
    """Pad `sequences` into a micro batch and choose its MLM targets.

    Targets: ceil(mlm_probability x real tokens) positions, drawn without replacement with probability
    proportional to `token_weights` (the reference's mlm_smoothing); of those, `mask_fraction` become
    [MASK], `random_fraction` a random token, the rest keep their token. Besides the padded tensors the
    batch carries flat row indices, so that the model heads and losses run only on the rows they need:
    `token_rows` (every non-pad position of the flattened [B*L] batch), `target_rows` (the MLM targets,
    sorted), `target_labels` (their original ids) and `targets_in_tokens` (where each target sits in
    `token_rows`).
    """
    lengths = torch.tensor([len(s) for s in sequences])
    input_ids = torch.full((len(sequences), int(lengths.max())), spec.pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    attention_mask = (torch.arange(input_ids.size(1)) < lengths[:, None]).long()

    flat_ids = input_ids.flatten()
    weights = spec.token_weights[flat_ids] * attention_mask.flatten()
    n_targets = min(math.ceil(spec.mlm_probability * int(lengths.sum())), int((weights > 0).sum()))
    target_rows = torch.multinomial(weights, n_targets, replacement=False, generator=generator).sort().values
    target_labels = flat_ids[target_rows].clone()

    action = torch.rand(n_targets, generator=generator)
    random_tokens = torch.randint(spec.vocab_size, (n_targets,), generator=generator)
    replaced = torch.where(action < spec.mask_fraction, spec.mask_token_id, target_labels)
    replaced = torch.where((action >= spec.mask_fraction) & (action < spec.mask_fraction + spec.random_fraction),
                           random_tokens, replaced)
    flat_ids = flat_ids.clone()
    flat_ids[target_rows] = replaced

    token_rows = attention_mask.flatten().nonzero().squeeze(1)
    return {
        "input_ids": flat_ids.view_as(input_ids),
        "attention_mask": attention_mask,
        "token_rows": token_rows,
        "target_rows": target_rows,
        "target_labels": target_labels,
        "targets_in_tokens": torch.searchsorted(token_rows, target_rows),
        "n_tokens": int(lengths.sum()),
    }


@dataclass(frozen=True)
class MaskedSequences:
    """Collate for the distill stage: the token sequences of `sequences` (a datasets.Dataset with an `input_ids`
    column) at the micro batch's indices, padded and masked (collate_masked)."""

    sequences: object
    spec: MaskingSpec

    def __call__(self, indices: np.ndarray, generator: torch.Generator) -> dict:
        return collate_masked(self.sequences[indices.tolist()]["input_ids"], self.spec, generator)
