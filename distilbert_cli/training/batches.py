"""Which examples each process trains on at each optimizer step, for every training stage.

Every choice here is a pure function of (seed, step): the order of an epoch comes from (seed, epoch), a step
takes the next `accumulation x processes` micro batches of that order, and a micro batch's own randomness (its
masks, its dropout) comes from (seed, its global number). So a run resumed at step s, or run on another number of
processes with the same global batch, sees exactly the same micro batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


def derived_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (run seed, micro-batch number, stream...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def epoch_micro_batches(lengths: np.ndarray, micro_batch_size: int, seed: int, epoch: int,
                        group_window: int, fill: int | None = None) -> np.ndarray:
    """The micro batches of one epoch as an int array [n_batches, micro_batch_size] of example indices.

    A random permutation (from seed and epoch) is cut into windows of `group_window` micro batches; each
    window is sorted by length before being cut, so a micro batch holds examples of similar length
    (little padding), and the micro batches are then shuffled. `group_window=1` means no grouping. The
    last examples that do not fill a micro batch are left out of this epoch; with `fill`, the permutation is
    instead continued from its start up to `fill` examples (a multiple of the micro batch), so every example is
    seen in every epoch and a few twice, as torch's DistributedSampler pads.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    order = np.resize(order, fill) if fill is not None else order[: len(order) - len(order) % micro_batch_size]
    window = np.arange(len(order)) // (micro_batch_size * group_window)
    order = order[np.lexsort((-lengths[order], window))]  # by window, then longest first within it
    batches = order.reshape(-1, micro_batch_size)
    return batches[rng.permutation(len(batches))]


@dataclass(frozen=True)
class StepLayout:
    """How micro batches map to optimizer steps: step s, accumulation a, process r -> global micro batch.

    Each step consumes `accumulation x world_size` consecutive micro batches of the epoch's list; within a
    step the micro batch `a x world_size + r` goes to process r at accumulation step a. The epoch's tail
    that does not fill a step is skipped, or, with `fills_last`, filled with the epoch's first examples again
    (task data: every example is trained on in every epoch, and a task smaller than a batch still trains).
    """

    micro_batch_size: int
    accumulation: int
    world_size: int
    steps_per_epoch: int
    fills_last: bool = False

    @classmethod
    def of(cls, examples: int, micro_batch_size: int, accumulation: int, world_size: int,
           fills_last: bool = False) -> StepLayout:
        """The layout of an epoch of `examples` (a step takes micro x accumulation x world_size of them)."""
        per_step = micro_batch_size * accumulation * world_size
        steps = -(-examples // per_step) if fills_last else examples // per_step
        return cls(micro_batch_size, accumulation, world_size, steps, fills_last)

    @property
    def filled_epoch(self) -> int | None:
        """The examples an epoch takes when its last step is filled (None: its tail is skipped)."""
        return self.steps_per_epoch * self.global_batch_size if self.fills_last else None

    @property
    def micro_batches_per_step(self) -> int:
        return self.accumulation * self.world_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches_per_step

    def locate(self, step: int, accumulation_index: int, rank: int) -> tuple[int, int, int]:
        """(epoch, index in the epoch's micro-batch list, global micro-batch number)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        index = step_in_epoch * self.micro_batches_per_step + accumulation_index * self.world_size + rank
        return epoch, index, step * self.micro_batches_per_step + accumulation_index * self.world_size + rank


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# collate(example indices, the micro batch's generator) -> the micro batch's tensors
Collate = Callable[[np.ndarray, torch.Generator], dict]


class StepBatches(Dataset):
    """The micro batches one process trains on, from `start_step` to `end_step` (map-style, so a DataLoader with
    workers prepares them ahead of the model; item j is the j-th micro batch of this process). Each batch carries
    its global micro-batch `number`, which seeds its dropout in the engine."""

    def __init__(self, lengths: np.ndarray, layout: StepLayout, collate: Collate, seed: int, group_window: int,
                 rank: int, start_step: int, end_step: int):
        self.lengths = lengths  # real tokens of every example
        self.layout = layout
        self.collate = collate
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
                                                      self.group_window, self.layout.filled_epoch)
        return self._epoch_batches

    def __getitem__(self, item: int) -> dict:
        step, accumulation_index = divmod(item, self.layout.accumulation)
        epoch, index, number = self.layout.locate(self.start_step + step, accumulation_index, self.rank)
        generator = torch.Generator().manual_seed(derived_seed(self.seed, number))
        batch = self.collate(self.batches_of(epoch)[index], generator)
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


@dataclass(frozen=True)
class PaddedRows:
    """Collate for task data: the rows of `features` (a datasets.Dataset of model inputs, labels and the like),
    padded by `collator` (transformers' DataCollatorWithPadding); no randomness of its own."""

    features: object
    collator: Callable[[list[dict]], dict]

    def __call__(self, indices: np.ndarray, generator: torch.Generator) -> dict:
        columns = self.features[indices.tolist()]
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return dict(self.collator(rows))
