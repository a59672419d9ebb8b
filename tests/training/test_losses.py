"""The distillation losses against hand-computed values, and what a weight of 0 leaves uncomputed."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from distilbert_cli.training.distiller import distillation_losses
from distilbert_cli.training.losses import (
    LossPlan,
    attention_mse_loss,
    compute_losses,
    cosine_loss,
    hidden_mse_loss,
    logits_mse_loss,
    mlm_loss,
    soft_target_loss,
)

# softmax([ln 3, 0]) = [0.75, 0.25] against [0.5, 0.5]: KL = 0.75 ln 1.5 + 0.25 ln 0.5
KL_3_TO_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


def loss_config(**weights) -> OmegaConf:
    values = {"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0, "alpha_mse": 0.0, "alpha_hidden": 0.0,
              "alpha_attn": 0.0, "temperature": 2.0, "restrict_ce_to_mask": False}
    values.update(weights)
    return OmegaConf.create(values)


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


def test_hidden_mse_averages_the_layer_pairs():
    student = [torch.zeros(2, 3), torch.ones(2, 3)]
    teacher = [torch.full((2, 3), 2.0), torch.ones(2, 3)]
    assert_close(hidden_mse_loss(student, teacher), torch.tensor((4.0 + 0.0) / 2))


def test_attention_mse_ignores_padded_queries_and_keys():
    attention_mask = torch.tensor([[1, 0]])
    teacher = torch.full((1, 1, 2, 2), 9.0)
    teacher[0, 0, 0, 0] = 0.5  # the only real (query, key) pair
    assert_close(attention_mse_loss([torch.zeros(1, 1, 2, 2)], [teacher], attention_mask), torch.tensor(0.25))


def test_attention_mse_averages_over_heads_and_real_pairs_of_each_layer():
    attention_mask = torch.tensor([[1, 1, 0]])  # 4 real (query, key) pairs of 9
    student = torch.full((1, 2, 3, 3), 0.25)
    teacher = torch.full((1, 2, 3, 3), 9.0)  # every pair involving the padded position is ignored
    teacher[0, 0, :2, :2] = 0.5  # head 0: (0.25 - 0.5)^2 = 1/16 on the 4 real pairs
    teacher[0, 1, :2, :2] = 1.25  # head 1: (0.25 - 1.25)^2 = 1 on them
    layer = (4 * 1 / 16 + 4 * 1.0) / (4 * 2)
    assert_close(attention_mse_loss([student, student], [teacher, torch.full_like(teacher, 0.25)], attention_mask),
                 torch.tensor((layer + 0.0) / 2))


def test_layer_losses_refuse_unpaired_layers():
    with pytest.raises(ValueError):
        hidden_mse_loss([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)] * 3)
    with pytest.raises(ValueError):
        attention_mse_loss([torch.zeros(1, 1, 2, 2)] * 3, [torch.zeros(1, 1, 2, 2)] * 2, torch.ones(1, 2))


def test_plan_needs_only_what_nonzero_weights_use():
    mlm_only = LossPlan.from_config(loss_config(alpha_mlm=1.0))
    assert not mlm_only.needs_teacher and not mlm_only.teacher_logits and mlm_only.logits_at_targets_only
    no_ce = LossPlan.from_config(loss_config(alpha_mlm=2.0, alpha_cos=1.0))
    assert no_ce.needs_teacher and not no_ce.teacher_logits and not no_ce.attentions and not no_ce.hidden_states
    triple = LossPlan.from_config(loss_config(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0))
    assert triple.teacher_logits and not triple.logits_at_targets_only
    restricted = LossPlan.from_config(loss_config(alpha_ce=5.0, restrict_ce_to_mask=True))
    assert restricted.teacher_logits and restricted.logits_at_targets_only
    hidden_only = LossPlan.from_config(loss_config(alpha_hidden=1.0))
    assert hidden_only.needs_teacher and not hidden_only.student_logits and hidden_only.hidden_states


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


def test_every_weight_scales_its_own_term():
    # Each registered term alone at weight 1 against its hand value, then all at once with distinct weights.
    weights = {"mlm": 2.0, "ce": 5.0, "mse": 0.5, "cos": 3.0, "hidden": 7.0, "attn": 11.0}
    student_hidden = torch.tensor([[[1.0, 0.0]] * 3, [[0.0, 1.0]] * 3])  # rows 3-4 orthogonal to the teacher's
    teacher_hidden = torch.ones(2, 3, 2) * torch.tensor([1.0, 0.0])

    def losses(**alphas):
        plan = LossPlan.from_config(loss_config(**{f"alpha_{name}": w for name, w in alphas.items()}))
        rows = 2 if plan.logits_at_targets_only else 5  # the models compute logits at the plan's rows only
        student = {"logits": torch.zeros(rows, 2), "last_hidden": student_hidden, "hidden_states": [student_hidden],
                   "attentions": [torch.zeros(2, 1, 3, 3)]}
        teacher = {"logits": torch.tensor([[math.log(3.0), 0.0]] * rows), "last_hidden": teacher_hidden,
                   "hidden_states": [teacher_hidden], "attentions": [torch.ones(2, 1, 3, 3)]}
        return compute_losses(plan, student, teacher, small_batch())

    # T = 2: the teacher's softmax([ln 3, 0] / 2) = [sqrt 3, 1] / (sqrt 3 + 1) against the student's uniform one
    soft = [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)]
    by_hand = {"mlm": math.log(2.0), "ce": 4 * sum(p * math.log(2 * p) for p in soft), "mse": math.log(3.0) ** 2,
               "cos": 2 / 5, "hidden": (0 + 0 + 0 + 2 + 2) / 10, "attn": 13 / 13}
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

    def forward(self, input_ids, attention_mask, logit_rows=None, hidden_layers=(), attention_layers=()):
        self.calls.append({"logit_rows": logit_rows, "hidden_layers": list(hidden_layers),
                           "attention_layers": list(attention_layers)})
        batch, length = input_ids.shape
        out = {"last_hidden": self.weight * torch.ones(batch, length, self.width)}
        if logit_rows is not None:
            out["logits"] = self.weight * torch.zeros(len(logit_rows), self.vocab)
        if hidden_layers:
            out["hidden_states"] = [out["last_hidden"] for _ in hidden_layers]
        if attention_layers:
            out["attentions"] = [self.weight * torch.ones(batch, 1, length, length) for _ in attention_layers]
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
    student, teacher, losses = run_step(alpha_hidden=1.0, alpha_attn=1.0)
    # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
    assert student["hidden_layers"] == [0, 1, 2] and teacher["hidden_layers"] == [0, 2, 4]
    assert student["attention_layers"] == [0, 1] and teacher["attention_layers"] == [1, 3]
    assert student["logit_rows"] is None and teacher["logit_rows"] is None
    assert set(losses) == {"hidden", "attn", "loss"}


def test_mlm_only_runs_without_a_teacher():
    student = RecordingModel()
    losses = distillation_losses(student, None, small_batch(), LossPlan.from_config(loss_config(alpha_mlm=1.0)),
                                 pairs=[], autocast=nullcontext)
    assert_close(losses["loss"], torch.tensor(math.log(4.0)))  # zero logits over 4 tokens
