"""Dynamic masking (15%, 80/10/10, frequency smoothing) and length-grouped micro batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from distilbert_cli.training.batches import StepBatches, StepLayout, derived_seed, epoch_micro_batches
from distilbert_cli.training.masking import (
    MaskedSequences,
    MaskingSpec,
    collate_masked,
    masking_spec,
    token_probabilities,
)

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIALS = [PAD, 1, CLS, SEP, MASK]
VOCAB = 50


def spec(counts=None, exponent=0.7, mask_fraction=0.8, random_fraction=0.1) -> MaskingSpec:
    counts = np.ones(VOCAB, dtype=np.int64) if counts is None else counts
    return MaskingSpec(token_probabilities(counts, SPECIALS, exponent), mlm_probability=0.15,
                       mask_fraction=mask_fraction, random_fraction=random_fraction, mask_token_id=MASK,
                       pad_token_id=PAD, vocab_size=VOCAB)


def sequences(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[CLS, *rng.integers(5, VOCAB, n - 2).tolist(), SEP] for n in lengths]


def test_derived_seeds_are_64_bit_and_differ_per_part():
    seeds = [derived_seed(3, number) for number in range(16)]
    assert len(set(seeds)) == 16 and max(seeds) >= 2**32  # a 32-bit state would never reach 2^32
    assert derived_seed(3, 0) == derived_seed(3, 0) != derived_seed(4, 0) != derived_seed(3, 0, 1)


def test_masking_spec_reads_the_config_the_tokenizer_and_the_counts():
    from types import SimpleNamespace

    cfg = SimpleNamespace(mlm_probability=0.2, mask_fraction=0.7, random_fraction=0.2, smoothing_exponent=1.0)
    tokenizer = SimpleNamespace(all_special_ids=[0, 4], mask_token_id=4, pad_token_id=0)
    made = masking_spec(cfg, tokenizer, np.array([3, 1, 8, 0, 5]), vocab_size=5)
    assert_close(made.token_weights, torch.tensor([0.0, 1.0, 1 / 8, 1.0, 0.0]))
    assert (made.mlm_probability, made.mask_fraction, made.random_fraction) == (0.2, 0.7, 0.2)
    assert (made.mask_token_id, made.pad_token_id, made.vocab_size) == (4, 0, 5)


def test_token_probabilities_follow_count_to_the_minus_exponent():
    weights = token_probabilities(np.array([0, 1, 8, 4, 7]), special_ids=[4], exponent=1.0)
    assert_close(weights, torch.tensor([1.0, 1.0, 1 / 8, 1 / 4, 0.0]))  # unseen counts as 1; specials 0


def test_targets_are_15_percent_of_real_tokens_never_special_and_labelled():
    batch_sequences = sequences([20, 13, 7])
    batch = collate_masked(batch_sequences, spec(), torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (3, 20) and batch["n_tokens"] == 40
    assert batch["attention_mask"].sum() == 40 and batch["input_ids"][2, 7:].eq(PAD).all()
    assert len(batch["target_rows"]) == math.ceil(0.15 * 40)
    original = torch.full((3, 20), PAD)
    for row, seq in enumerate(batch_sequences):
        original[row, : len(seq)] = torch.tensor(seq)
    assert torch.equal(batch["target_labels"], original.flatten()[batch["target_rows"]])
    assert not np.isin(batch["target_labels"].numpy(), SPECIALS).any()
    assert torch.equal(batch["token_rows"][batch["targets_in_tokens"]], batch["target_rows"])
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[batch["target_rows"]] = False
    assert torch.equal(batch["input_ids"].flatten()[untouched], original.flatten()[untouched])


@pytest.mark.parametrize(("mask_fraction", "random_fraction"), [(0.8, 0.1), (0.6, 0.3)])
def test_mask_random_keep_split_of_targets(mask_fraction, random_fraction):
    # The random replacement is uniform over the VOCAB ids, so it is [MASK] 1/VOCAB of the time (then it counts as
    # masked) and the original token 1/VOCAB of the time (then it counts as kept); a target is never special.
    expected = {"masked": mask_fraction + random_fraction / VOCAB,
                "random": random_fraction * (VOCAB - 2) / VOCAB,  # 0.096 for 80/10/10
                "kept": 1 - mask_fraction - random_fraction + random_fraction / VOCAB}  # 0.102 for 80/10/10
    s = spec(mask_fraction=mask_fraction, random_fraction=random_fraction)
    counts = dict.fromkeys(expected, 0)
    generator = torch.Generator().manual_seed(1)
    for seed in range(60):
        batch = collate_masked(sequences([128] * 64, seed=seed), s, generator)
        now = batch["input_ids"].flatten()[batch["target_rows"]]
        counts["masked"] += int((now == MASK).sum())
        counts["kept"] += int((now == batch["target_labels"]).sum())
        counts["random"] += int(((now != MASK) & (now != batch["target_labels"])).sum())
    total = sum(counts.values())
    assert total == 60 * math.ceil(0.15 * 64 * 128)
    for name, share in expected.items():
        # within 4 standard errors of a binomial share (about 0.004 here): 0.088 or 0.112 would be 7-9 away
        assert abs(counts[name] / total - share) < 4 * math.sqrt(share * (1 - share) / total), (name, counts)


def test_target_count_is_the_ceiling_of_15_percent_and_at_most_the_maskable_tokens():
    batch = collate_masked(sequences([20, 13, 8]), spec(), torch.Generator().manual_seed(0))
    assert batch["n_tokens"] == 41 and len(batch["target_rows"]) == 7  # ceil(6.15), not round or floor (6)
    # Specials are never targets: 10 x [CLS, SEP] and one real token (row 10, padded to 3) give 23 tokens
    # but one maskable position.
    only_one = collate_masked([[CLS, SEP]] * 10 + [[CLS, 7, SEP]], spec(), torch.Generator().manual_seed(0))
    assert only_one["target_rows"].tolist() == [10 * 3 + 1] and only_one["target_labels"].tolist() == [7]
    # 62 tokens -> ceil(9.3) = 10 targets, all 10 maskable positions, each drawn once (without replacement)
    every = collate_masked([[CLS, SEP]] * 25 + [[CLS, *range(5, 15), SEP]], spec(), torch.Generator().manual_seed(0))
    assert every["target_rows"].tolist() == [25 * 12 + 1 + i for i in range(10)]


def test_frequent_tokens_are_masked_less_often():
    counts = np.ones(VOCAB, dtype=np.int64)
    counts[5] = 10_000  # a very frequent token
    frequent_share = []
    for exponent in (0.0, 0.7):
        s = spec(counts, exponent)
        generator = torch.Generator().manual_seed(0)
        hits = total = 0
        seqs = [[CLS, *([5] * 10), *range(10, 20), SEP]] * 4
        for _ in range(100):
            batch = collate_masked(seqs, s, generator)
            hits += int((batch["target_labels"] == 5).sum())
            total += len(batch["target_labels"])
        frequent_share.append(hits / total)
    assert 0.4 < frequent_share[0] < 0.6  # uniform: half the maskable tokens are the frequent one
    assert frequent_share[1] < 0.01  # smoothed: 10000^-0.7 = 0.0016 of a rare token's weight


def test_same_seed_same_masks():
    seqs = sequences([30, 25])
    first = collate_masked(seqs, spec(), torch.Generator().manual_seed(7))
    again = collate_masked(seqs, spec(), torch.Generator().manual_seed(7))
    other = collate_masked(seqs, spec(), torch.Generator().manual_seed(8))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["target_rows"], other["target_rows"])


def test_epoch_micro_batches_cover_each_sequence_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(12, 512, size=1003)
    grouped = epoch_micro_batches(lengths, micro_batch_size=5, seed=1, epoch=0, group_window=50)
    assert grouped.shape == (200, 5) and len(np.unique(grouped)) == 1000
    assert np.array_equal(grouped, epoch_micro_batches(lengths, 5, seed=1, epoch=0, group_window=50))
    assert not np.array_equal(grouped, epoch_micro_batches(lengths, 5, seed=1, epoch=1, group_window=50))
    ungrouped = epoch_micro_batches(lengths, 5, seed=1, epoch=0, group_window=1)

    def padding(batches):
        return float((lengths[batches].max(1, keepdims=True) - lengths[batches]).sum() / lengths[batches].sum())

    assert padding(grouped) < 0.05 < 0.5 < padding(ungrouped)


def test_one_process_with_accumulation_and_two_processes_share_each_step():
    one = StepLayout(micro_batch_size=2, accumulation=4, world_size=1, steps_per_epoch=3)
    two = StepLayout(micro_batch_size=2, accumulation=2, world_size=2, steps_per_epoch=3)
    for step in range(7):
        on_one = {one.locate(step, a, 0) for a in range(4)}
        on_two = {two.locate(step, a, r) for a in range(2) for r in range(2)}
        assert on_one == on_two
    assert one.locate(3, 0, 0) == (1, 0, 12)  # step 3 starts epoch 1 at its first micro batch


def unmasked(batch) -> list[tuple[int, ...]]:
    """The sequences of a micro batch before masking, with their padding."""
    flat = batch["input_ids"].flatten().clone()
    flat[batch["target_rows"]] = batch["target_labels"]
    return [tuple(row) for row in flat.view_as(batch["input_ids"]).tolist()]


def test_masks_differ_per_micro_batch_and_per_epoch_and_not_per_resume():
    from datasets import Dataset

    # Eight distinct sequences of one length: uniform token weights, so only the seed decides the target positions.
    data = Dataset.from_dict({"input_ids": sequences([30] * 8)})
    layout = StepLayout(micro_batch_size=2, accumulation=1, world_size=1, steps_per_epoch=4)

    def batches(start_step):
        return StepBatches(np.full(8, 30), layout, MaskedSequences(data, spec()), seed=3, group_window=1, rank=0,
                           start_step=start_step, end_step=8)

    items = [batches(0)[j] for j in range(8)]  # two epochs of four micro batches
    assert [item["number"] for item in items] == list(range(8))
    assert len({tuple(item["target_rows"].tolist()) for item in items}) == 8  # each draws its own masks
    epochs = [[unmasked(item) for item in items[start:start + 4]] for start in (0, 4)]
    for epoch in epochs:  # every sequence once per epoch ...
        assert sorted(row for batch in epoch for row in batch) == sorted(map(tuple, data["input_ids"]))
    assert epochs[0] != epochs[1]  # ... in another order in the next epoch
    # A run resumed at step 5 sees exactly the micro batch the uninterrupted run saw at step 5.
    resumed = batches(5)[0]
    assert len(batches(0)) == 8 and len(resumed_batches := batches(5)) == 3
    assert resumed["number"] == 5 and torch.equal(resumed["input_ids"], items[5]["input_ids"])
    assert torch.equal(resumed["target_rows"], items[5]["target_rows"])
    assert [resumed_batches[j]["number"] for j in range(3)] == [5, 6, 7]
    # Another run seed draws other masks for the same micro batch number.
    other_seed = StepBatches(np.full(8, 30), layout, MaskedSequences(data, spec()), seed=4, group_window=1, rank=0,
                             start_step=0, end_step=8)[0]
    assert not torch.equal(other_seed["target_rows"], items[0]["target_rows"])


def test_step_tokens_count_the_real_tokens_every_process_trains_on_in_a_step():
    from datasets import Dataset

    lengths = np.random.default_rng(0).integers(5, 40, size=24)
    data = Dataset.from_dict({"input_ids": sequences(lengths)})
    layout = StepLayout(micro_batch_size=2, accumulation=2, world_size=2, steps_per_epoch=3)  # 2 epochs in 6 steps
    ranks = [StepBatches(lengths, layout, MaskedSequences(data, spec()), seed=1, group_window=2, rank=rank,
                         start_step=0, end_step=6) for rank in (0, 1)]
    assert len(ranks[0]) == 12  # 6 steps x 2 accumulation steps
    for step in range(6):
        seen = sum(ranks[rank][step * 2 + a]["n_tokens"] for rank in (0, 1) for a in (0, 1))
        assert ranks[0].step_tokens(step) == ranks[1].step_tokens(step) == seen
