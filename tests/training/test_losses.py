"""The distillation losses against hand-computed values, and what a weight of 0 leaves uncomputed."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from builders import loss_config
from torch import nn
from torch.testing import assert_close

from distilbert_cli.training.distiller import distillation_losses
from distilbert_cli.training.losses import (
    LossPlan,
    attention_kl_loss,
    attention_mse_loss,
    attention_probabilities,
    compute_losses,
    cosine_loss,
    head_scores,
    hidden_mse_loss,
    logits_mse_loss,
    mlm_loss,
    relation_kl_loss,
    soft_target_loss,
)

# softmax([ln 3, 0]) = [0.75, 0.25] against [0.5, 0.5]: KL = 0.75 ln 1.5 + 0.25 ln 0.5
KL_3_TO_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(5, 11)
    assert_close(soft_target_loss(logits, logits.clone(), temperature=2.0), torch.tensor(0.0))


def test_kl_matches_hand_computed_value_and_is_averaged_over_rows():
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])  # second row identical: contributes 0
    assert_close(soft_target_loss(student, teacher, temperature=1.0), torch.tensor(KL_3_TO_1 / 2))


def test_kl_is_scaled_by_temperature_squared():
    # Doubling the logits and T leaves the softmaxes unchanged, so only the T^2 factor remains.
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert_close(soft_target_loss(student, teacher, temperature=2.0), torch.tensor(4 * KL_3_TO_1))


def test_kl_gradient_flows_to_the_student_only():
    student = torch.zeros(1, 2, requires_grad=True)
    soft_target_loss(student, torch.tensor([[math.log(3.0), 0.0]]), temperature=1.0).backward()
    # d KL / d s = softmax(s) - softmax(t) = [0.5 - 0.75, 0.5 - 0.25]
    assert_close(student.grad, torch.tensor([[-0.25, 0.25]]))


def test_mlm_loss_is_cross_entropy():
    assert_close(mlm_loss(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]), torch.tensor([1, 0])),
                 torch.tensor((math.log(2.0) + math.log(4 / 3)) / 2))


def test_cosine_loss_of_identical_states_is_zero_and_one_minus_cos_on_average():
    states = torch.randn(4, 8)
    assert_close(cosine_loss(states, 3 * states), torch.tensor(0.0), atol=1e-6, rtol=0)
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]])  # cos 0, -1, 1/sqrt(2)
    assert_close(cosine_loss(student, teacher), torch.tensor((1 + 2 + (1 - 2**-0.5)) / 3))


def test_logits_mse_is_summed_over_the_vocabulary_and_averaged_over_rows():
    student = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert_close(logits_mse_loss(student, torch.zeros(2, 2)), torch.tensor((1 + 4) / 2))


def test_hidden_mse_sums_the_layer_pairs():
    student = [torch.zeros(2, 3), torch.ones(2, 3)]
    teacher = [torch.full((2, 3), 2.0), torch.full((2, 3), 2.0)]
    assert_close(hidden_mse_loss(student, teacher), torch.tensor(4.0 + 1.0))  # TinyBERT's code sums the layers


def test_attention_mse_ignores_padded_queries_and_keys_and_sums_the_layers():
    attention_mask = torch.tensor([[1, 0]])
    teacher = torch.full((1, 1, 2, 2), 9.0)
    teacher[0, 0, 0, 0] = 0.5  # the only real (query, key) pair
    assert_close(attention_mse_loss([torch.zeros(1, 1, 2, 2)], [teacher], attention_mask), torch.tensor(0.25))
    assert_close(attention_mse_loss([torch.zeros(1, 1, 2, 2)] * 2, [teacher] * 2, attention_mask), torch.tensor(0.5))


def test_head_scores_are_scaled_dot_products_per_head():
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, L=2, d=2]
    keys = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    # One head of width 2: q.k / sqrt(2)
    assert_close(head_scores(queries, keys, heads=1), torch.tensor([[[[2.0, 1.0], [0.0, 1.0]]]]) / math.sqrt(2))
    # Two heads of width 1: head h multiplies the h-th coordinates
    assert_close(head_scores(queries, keys, heads=2), torch.tensor([[[[2.0, 1.0], [0.0, 0.0]],
                                                                     [[0.0, 0.0], [0.0, 1.0]]]]))


def test_attention_probabilities_give_pad_keys_nothing():
    probabilities = attention_probabilities(torch.zeros(1, 1, 2, 3), torch.tensor([[1, 1, 0]]))
    assert_close(probabilities, torch.tensor([0.5, 0.5, 0.0]).expand(1, 1, 2, 3))


def test_attention_kl_matches_hand_computed_value_over_real_queries_and_keys():
    mask = torch.tensor([[1, 1, 0]])  # position 2 is padding
    teacher = torch.full((1, 1, 3, 3), 7.0)  # garbage at the pad query (row 2) and the pad key (column 2)
    teacher[0, 0, 0, :2] = torch.tensor([math.log(3.0), 0.0])  # query 0: [0.75, 0.25]
    teacher[0, 0, 1, :2] = 0.0  # query 1: uniform, like the student
    student = torch.zeros(1, 1, 3, 3)
    # KL 3:1 against 1:1 at query 0, 0 at query 1: averaged over the 2 real queries and the head
    assert_close(attention_kl_loss([student], [teacher], mask), torch.tensor(KL_3_TO_1 / 2))
    assert_close(attention_kl_loss([student] * 2, [teacher] * 2, mask), torch.tensor(KL_3_TO_1))  # summed layers


def test_attention_kl_averages_groups_of_teacher_heads_for_fewer_student_heads():
    mask = torch.ones(1, 2, dtype=torch.long)
    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, 0, :, 0] = math.log(3.0)  # head 0 attends 3:1 to key 0, head 1 3:1 to key 1: their mean is uniform
    teacher[0, 1, :, 1] = math.log(3.0)
    uniform_student = torch.zeros(1, 1, 2, 2)
    assert_close(attention_kl_loss([uniform_student], [teacher], mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(attention_kl_loss([torch.zeros(1, 2, 2, 2)], [teacher], mask), torch.tensor(KL_3_TO_1))


def test_relation_kl_matches_hand_computed_value():
    mask = torch.ones(1, 2, dtype=torch.long)
    # One relation head of width 2: t0.t0 / sqrt(2) = ln 3, every other product 0, so query 0's relation is
    # softmax([ln 3, 0]) = [0.75, 0.25] and query 1's is uniform.
    teacher = torch.tensor([[[math.sqrt(math.sqrt(2) * math.log(3.0)), 0.0], [0.0, 0.0]]])
    assert_close(relation_kl_loss([torch.zeros(1, 2, 2)], [teacher], heads=1, attention_mask=mask),
                 torch.tensor(KL_3_TO_1 / 2))


def test_relation_kl_is_invariant_to_the_students_width():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    teacher, student = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    # A student twice as wide whose every relation head holds its head twice, scaled by 2^-1/4, has the same
    # relations (x.x / sqrt(2 d) = 2 * 2^-1/2 * x.x / sqrt(2) / sqrt(d)), so the same loss.
    wider = torch.cat([student.unflatten(-1, (2, 4))] * 2, dim=-1).flatten(-2) * 2**-0.25
    assert wider.shape == (2, 5, 16)
    assert_close(relation_kl_loss([wider], [teacher], heads=2, attention_mask=mask),
                 relation_kl_loss([student], [teacher], heads=2, attention_mask=mask))
    copy = torch.cat([teacher.unflatten(-1, (2, 4))] * 2, dim=-1).flatten(-2) * 2**-0.25
    assert_close(relation_kl_loss([copy], [teacher], heads=2, attention_mask=mask), torch.tensor(0.0),
                 atol=1e-6, rtol=0)


def test_attention_and_relation_terms_read_the_captured_projections():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    student = {**{kind: [torch.randn(2, 3, 4)] for kind in ("query", "key", "value")}, "heads": 2}
    teacher = {**{kind: [torch.randn(2, 3, 8)] for kind in ("query", "key", "value")}, "heads": 4}
    plan = LossPlan.from_config(loss_config(alpha_attn_kl=1.0, alpha_value_relation=2.0))
    losses = compute_losses(plan, student, teacher, {"attention_mask": mask})
    assert_close(losses["attn_kl"], attention_kl_loss([head_scores(student["query"][0], student["key"][0], 2)],
                                                      [head_scores(teacher["query"][0], teacher["key"][0], 4)], mask))
    # relation_heads null: the teacher's 4 attention heads (MiniLM's per-head value relation)
    assert_close(losses["value_relation"], relation_kl_loss(student["value"], teacher["value"], 4, mask))
    assert_close(losses["loss"], losses["attn_kl"] + 2 * losses["value_relation"])
    with_heads = LossPlan.from_config(loss_config(alpha_value_relation=1.0, relation_heads=2))
    assert_close(compute_losses(with_heads, student, teacher, {"attention_mask": mask})["value_relation"],
                 relation_kl_loss(student["value"], teacher["value"], 2, mask))


def test_attention_mse_averages_over_heads_and_real_pairs_and_sums_the_layers():
    attention_mask = torch.tensor([[1, 1, 0]])  # 4 real (query, key) pairs of 9
    student = torch.full((1, 2, 3, 3), 0.25)
    teacher = torch.full((1, 2, 3, 3), 9.0)  # every pair involving the padded position is ignored
    teacher[0, 0, :2, :2] = 0.5  # head 0: (0.25 - 0.5)^2 = 1/16 on the 4 real pairs
    teacher[0, 1, :2, :2] = 1.25  # head 1: (0.25 - 1.25)^2 = 1 on them
    layer = (4 * 1 / 16 + 4 * 1.0) / (4 * 2)
    # the layers' terms are summed, as TinyBERT's code does
    assert_close(attention_mse_loss([student, student], [teacher, torch.full_like(teacher, 0.25)], attention_mask),
                 torch.tensor(layer + 0.0))


def test_layer_losses_refuse_unpaired_layers():
    with pytest.raises(ValueError):
        hidden_mse_loss([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)] * 3)
    with pytest.raises(ValueError):
        attention_mse_loss([torch.zeros(1, 1, 2, 2)] * 3, [torch.zeros(1, 1, 2, 2)] * 2, torch.ones(1, 2))


def test_plan_needs_only_what_nonzero_weights_use():
    mlm_only = LossPlan.from_config(loss_config(alpha_mlm=1.0))
    assert not mlm_only.needs_teacher and not mlm_only.teacher_logits and mlm_only.logits_at_targets_only
    no_ce = LossPlan.from_config(loss_config(alpha_mlm=2.0, alpha_cos=1.0))
    assert no_ce.needs_teacher and not no_ce.teacher_logits and not no_ce.projections and not no_ce.hidden_states
    triple = LossPlan.from_config(loss_config(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0))
    assert triple.teacher_logits and not triple.logits_at_targets_only
    restricted = LossPlan.from_config(loss_config(alpha_ce=5.0, restrict_ce_to_mask=True))
    assert restricted.teacher_logits and restricted.logits_at_targets_only
    hidden_only = LossPlan.from_config(loss_config(alpha_hidden=1.0))
    assert hidden_only.needs_teacher and not hidden_only.student_logits and hidden_only.hidden_states
    assert hidden_only.projections == () and not hidden_only.embeddings
    tinybert = LossPlan.from_config(loss_config(alpha_embed=1.0, alpha_hidden=1.0, alpha_attn_scores=1.0))
    assert tinybert.embeddings and tinybert.projections == ("query", "key") and not tinybert.teacher_logits
    minilmv2 = LossPlan.from_config(loss_config(alpha_query_relation=1.0, alpha_value_relation=1.0))
    assert minilmv2.projections == ("query", "value") and not minilmv2.hidden_states


def test_a_progressive_stage_plan_keeps_the_layerwise_terms_or_the_others():
    plan = LossPlan.from_config(loss_config(alpha_ce=0.5, alpha_mlm=0.5, alpha_hidden=1.0, alpha_attn_kl=1.0))
    assert plan.only(layerwise=True).used == ["hidden", "attn_kl"]
    assert plan.only(layerwise=False).used == ["mlm", "ce"]
    assert not plan.only(layerwise=True).student_logits and plan.only(layerwise=False).teacher_logits


def small_batch() -> dict:
    """Two sequences of lengths 3 and 2 (L = 3, flat rows 0..5, row 5 is padding); targets at rows 1 and 3."""
    token_rows = torch.tensor([0, 1, 2, 3, 4])
    target_rows = torch.tensor([1, 3])
    return {
        "input_ids": torch.tensor([[2, 7, 3], [2, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "token_rows": token_rows,
        "target_rows": target_rows,
        "target_labels": torch.tensor([0, 1]),
        "targets_in_tokens": torch.searchsorted(token_rows, target_rows),
    }


def test_mlm_term_uses_the_masked_rows_only():
    plan = LossPlan.from_config(loss_config(alpha_mlm=1.0, alpha_ce=1.0))  # logits at every real token
    logits = torch.full((5, 2), 50.0)
    logits[:, 1] = -50.0  # confidently wrong for label 1 ...
    logits[1] = torch.tensor([math.log(3.0), 0.0])  # ... except at the two targets
    logits[3] = torch.tensor([0.0, 0.0])
    losses = compute_losses(plan, {"logits": logits}, {"logits": logits.clone()}, small_batch())
    assert_close(losses["mlm"], torch.tensor((math.log(4 / 3) + math.log(2.0)) / 2))
    assert_close(losses["ce"], torch.tensor(0.0))


def test_total_is_the_weighted_sum_and_cosine_skips_padding():
    plan = LossPlan.from_config(loss_config(alpha_mlm=2.0, alpha_cos=3.0, restrict_ce_to_mask=True))
    student_hidden = torch.tensor([[[1.0, 0.0]] * 3, [[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    teacher_hidden = torch.ones(2, 3, 2) * torch.tensor([1.0, 0.0])  # the padded row 5 is opposite: ignored
    target_logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    losses = compute_losses(plan, {"logits": target_logits, "last_hidden": student_hidden},
                            {"last_hidden": teacher_hidden}, small_batch())
    assert_close(losses["cos"], torch.tensor(0.0))
    assert_close(losses["loss"], 2.0 * torch.tensor(math.log(2.0)))
    assert set(losses) == {"mlm", "cos", "loss"}


def test_two_nonzero_terms_are_each_scaled_by_their_own_weight():
    # The cosine term is 0.5 here (not 0), so a wrong or missing alpha_cos shows in the total.
    plan = LossPlan.from_config(loss_config(alpha_mlm=2.0, alpha_cos=3.0, restrict_ce_to_mask=True))
    student_hidden = torch.tensor([[[1.0, 0.0]] * 3, [[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    teacher_hidden = torch.ones(2, 3, 2) * torch.tensor([1.0, 0.0])
    # real rows 0..4: cos 1, 1, 1, 1, 0 -> L_cos = (0 + 0 + 0 + 0 + 1) / 5; the padded row 5 is left out
    target_logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # labels 0, 1: L_mlm = (ln 4/3 + ln 2) / 2
    losses = compute_losses(plan, {"logits": target_logits, "last_hidden": student_hidden},
                            {"last_hidden": teacher_hidden}, small_batch())
    mlm = (math.log(4 / 3) + math.log(2.0)) / 2
    assert_close(losses["cos"], torch.tensor(0.2))
    assert_close(losses["mlm"], torch.tensor(mlm))
    assert_close(losses["loss"], torch.tensor(2.0 * mlm + 3.0 * 0.2))


def test_each_weight_scales_its_own_term():
    # The logit and hidden-state terms alone at weight 1 against their hand values, then all at once with distinct
    # weights (the attention and relation terms, which read captured queries and keys, have their own tests).
    weights = {"mlm": 2.0, "ce": 5.0, "mse": 0.5, "cos": 3.0, "hidden": 7.0}
    student_hidden = torch.tensor([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])  # rows 3-4 orthogonal to the teacher's
    teacher_hidden = torch.ones(2, 3, 2) * torch.tensor([1.0, 0.0])

    def losses(**alphas):
        plan = LossPlan.from_config(loss_config(**{f"alpha_{name}": w for name, w in alphas.items()}))
        rows = 2 if plan.logits_at_targets_only else 5  # the models compute logits at the plan's rows only
        student = {"logits": torch.zeros(rows, 2), "last_hidden": student_hidden, "hidden_states": [student_hidden]}
        teacher = {"logits": torch.tensor([[math.log(3.0), 0.0]] * rows), "last_hidden": teacher_hidden,
                   "hidden_states": [teacher_hidden]}
        return compute_losses(plan, student, teacher, small_batch())

    # T = 2: the teacher's softmax([ln 3, 0] / 2) = [sqrt 3, 1] / (sqrt 3 + 1) against the student's uniform one
    soft = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    by_hand = {"mlm": math.log(2.0), "ce": 4 * sum(p * math.log(2 * p) for p in soft), "mse": math.log(3.0) ** 2,
               "cos": 2 / 5, "hidden": (0 + 0 + 0 + 2 + 2) / 10}
    alone = {name: losses(**{name: 1.0})["loss"] for name in weights}
    for name, value in by_hand.items():
        assert_close(alone[name], torch.tensor(value), msg=name)
    assert_close(losses(**weights)["loss"], torch.tensor(sum(w * by_hand[name] for name, w in weights.items())))


class RecordingModel(nn.Module):
    """Stands in for MaskedLMRows: records what it was asked to compute and returns tensors of that shape."""

    def __init__(self, vocab: int = 4, width: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.vocab, self.width, self.calls = vocab, width, []

    def forward(self, input_ids, attention_mask, logit_rows=None, embeddings=False, hidden_layers=(),
                attention_layers=(), projections=(), token_type_ids=None):
        self.calls.append({"logit_rows": logit_rows, "embeddings": embeddings, "hidden_layers": list(hidden_layers),
                           "attention_layers": list(attention_layers), "projections": tuple(projections)})
        batch, length = input_ids.shape
        out = {"last_hidden": self.weight * torch.ones(batch, length, self.width), "heads": 1}
        if logit_rows is not None:
            out["logits"] = self.weight * torch.zeros(len(logit_rows), self.vocab)
        if embeddings:
            out["embeddings"] = out["last_hidden"]
        if hidden_layers:
            out["hidden_states"] = [out["last_hidden"] for _ in hidden_layers]
        for kind in projections:
            out[kind] = [out["last_hidden"] for _ in attention_layers]
        return out


def run_step(**weights):
    student, teacher = RecordingModel(), RecordingModel()
    losses = distillation_losses(student, teacher, small_batch(), LossPlan.from_config(loss_config(**weights)),
                                 pairs=[(0, 1), (1, 3)], autocast=nullcontext)
    return student.calls[0], teacher.calls[0], losses


def test_zero_weights_skip_teacher_logits_hidden_states_and_attentions():
    student, teacher, losses = run_step(alpha_mlm=2.0, alpha_cos=1.0)  # no_ce
    assert teacher["logit_rows"] is None and teacher["attention_layers"] == [] and teacher["hidden_layers"] == []
    assert torch.equal(student["logit_rows"], small_batch()["target_rows"])
    assert set(losses) == {"mlm", "cos", "loss"}


def test_logits_at_every_real_token_unless_restricted_to_the_masked_positions():
    student, teacher, _ = run_step(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0)
    assert torch.equal(student["logit_rows"], small_batch()["token_rows"])
    assert torch.equal(teacher["logit_rows"], small_batch()["token_rows"])
    student, teacher, _ = run_step(alpha_ce=5.0, alpha_mlm=2.0, restrict_ce_to_mask=True)
    assert torch.equal(student["logit_rows"], small_batch()["target_rows"])
    assert torch.equal(teacher["logit_rows"], small_batch()["target_rows"])


def test_hidden_and_attention_terms_request_the_paired_layers():
    student, teacher, losses = run_step(alpha_embed=1.0, alpha_hidden=1.0, alpha_attn_scores=1.0)
    assert student["embeddings"] and teacher["embeddings"]
    assert student["hidden_layers"] == [0, 1] and teacher["hidden_layers"] == [1, 3]
    assert student["attention_layers"] == [0, 1] and teacher["attention_layers"] == [1, 3]
    assert student["projections"] == teacher["projections"] == ("query", "key")
    assert student["logit_rows"] is None and teacher["logit_rows"] is None
    assert set(losses) == {"embed", "hidden", "attn_scores", "loss"}


def test_value_relation_requests_the_values_only():
    student, teacher, losses = run_step(alpha_value_relation=1.0)
    assert student["projections"] == teacher["projections"] == ("value",)
    assert student["hidden_layers"] == [] and not student["embeddings"]
    assert set(losses) == {"value_relation", "loss"}


def test_mlm_only_runs_without_a_teacher():
    student = RecordingModel()
    losses = distillation_losses(student, None, small_batch(), LossPlan.from_config(loss_config(alpha_mlm=1.0)),
                                 pairs=[], autocast=nullcontext)
    assert_close(losses["loss"], torch.tensor(math.log(4.0)))  # zero logits over 4 tokens
