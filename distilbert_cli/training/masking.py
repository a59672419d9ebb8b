"""Dynamic MLM masking and length-grouped micro batches for the distill stage.

Every random choice here is a pure function of (seed, micro-batch number): the data order of an epoch
comes from (seed, epoch) and the masks of a micro batch from (seed, its global number). A resumed run
or a run on another number of processes therefore sees exactly the same batches and masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


def derived_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (run seed, micro-batch number, stream...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


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


def epoch_micro_batches(lengths: np.ndarray, micro_batch_size: int, seed: int, epoch: int,
                        group_window: int) -> np.ndarray:
    """The micro batches of one epoch as an int array [n_batches, micro_batch_size] of sequence indices.

    A random permutation (from seed and epoch) is cut into windows of `group_window` micro batches; each
    window is sorted by length before being cut, so a micro batch holds sequences of similar length
    (little padding), and the micro batches are then shuffled. `group_window=1` means no grouping. The
    last sequences that do not fill a micro batch are left out of this epoch.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = order[: len(order) - len(order) % micro_batch_size]
    window = np.arange(len(order)) // (micro_batch_size * group_window)
    order = order[np.lexsort((-lengths[order], window))]  # by window, then longest first within it
    batches = order.reshape(-1, micro_batch_size)
    return batches[rng.permutation(len(batches))]


@dataclass(frozen=True)
class StepLayout:
    """How micro batches map to optimizer steps: step s, accumulation a, process r -> global micro batch.

    Each step consumes `accumulation x world_size` consecutive micro batches of the epoch's list; within a
    step the micro batch `a x world_size + r` goes to process r at accumulation step a. The epoch's tail
    that does not fill a step is skipped.
    """

    micro_batch_size: int
    accumulation: int
    world_size: int
    steps_per_epoch: int

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation * self.world_size

    def locate(self, step: int, accumulation_index: int, rank: int) -> tuple[int, int, int]:
        """(epoch, index in the epoch's micro-batch list, global micro-batch number)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        index = step_in_epoch * self.micro_batches_per_step + accumulation_index * self.world_size + rank
        return epoch, index, step * self.micro_batches_per_step + accumulation_index * self.world_size + rank


class DistillationBatches(Dataset):
    """The masked micro batches one process trains on, from `start_step` to `end_step` (map-style, so a
    DataLoader with workers prefetches them; item j is the j-th micro batch of this process)."""

    def __init__(self, sequences, lengths: np.ndarray, layout: StepLayout, spec: MaskingSpec, seed: int,
                 group_window: int, rank: int, start_step: int, end_step: int):
        self.sequences = sequences  # a datasets.Dataset with an `input_ids` column
        self.lengths = lengths
        self.layout = layout
        self.spec = spec
        self.seed = seed
        self.group_window = group_window
        self.rank = rank
        self.start_step = start_step
        self.end_step = end_step
        self._epoch = None
        self._epoch_batches = None

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.layout.accumulation

    def batches_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # one epoch's order is kept; each DataLoader worker keeps its own
            self._epoch = epoch
            self._epoch_batches = epoch_micro_batches(self.lengths, self.layout.micro_batch_size, self.seed, epoch,
                                                      self.group_window)
        return self._epoch_batches

    def __getitem__(self, item: int) -> dict:
        step, accumulation_index = divmod(item, self.layout.accumulation)
        epoch, index, number = self.layout.locate(self.start_step + step, accumulation_index, self.rank)
        indices = self.batches_of(epoch)[index]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, number))
        batch = collate_masked(self.sequences[indices.tolist()]["input_ids"], self.spec, generator)
        batch["number"] = number
        return batch

    def step_tokens(self, step: int) -> int:
        """Real tokens in one optimizer step over all processes (every process knows every micro batch)."""
        total = 0
        for accumulation_index in range(self.layout.accumulation):
            for rank in range(self.layout.world_size):
                epoch, index, _ = self.layout.locate(step, accumulation_index, rank)
                total += int(self.lengths[self.batches_of(epoch)[index]].sum())
        return total
