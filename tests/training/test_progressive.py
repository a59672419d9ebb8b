"""Progressive knowledge transfer: the stage schedule, and the parameters each stage trains."""

from __future__ import annotations

import pytest
import torch
from builders import loss_config

from distilbert_cli.errors import UsageError
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.progressive import enter, stages

PAIRS = [(0, 0), (1, 1), (2, 2)]
MOBILEBERT = LossPlan.from_config(loss_config(alpha_ce=0.5, alpha_mlm=0.5, alpha_hidden=1.0, alpha_attn_kl=1.0))


def test_without_progressive_transfer_one_stage_trains_everything():
    (stage,) = stages(MOBILEBERT, PAIRS, 0.0, total_steps=10)
    assert (stage.name, stage.end, stage.plan, stage.pairs, stage.layer) == (None, 10, MOBILEBERT, PAIRS, None)


def test_one_stage_per_layer_on_the_layerwise_terms_then_the_others():
    schedule = stages(MOBILEBERT, PAIRS, 0.5, total_steps=20)  # 10 steps: 3 per layer, the rest for the last stage
    assert [(s.name, s.end, s.pairs, s.layer) for s in schedule] == [
        ("layer 0", 3, [(0, 0)], 0), ("layer 1", 6, [(1, 1)], 1), ("layer 2", 9, [(2, 2)], 2),
        ("pretraining distillation", 20, PAIRS, None)]
    assert all(s.plan.used == ["hidden", "attn_kl"] for s in schedule[:3])
    assert schedule[3].plan.used == ["mlm", "ce"]


@pytest.mark.parametrize(("plan", "share", "steps", "message"), [
    (MOBILEBERT, 0.5, 5, "leaves no step per layer"),
    (MOBILEBERT, 0.9, 3, "0.9 of 3 steps leaves no step per layer"),
    (LossPlan.from_config(loss_config(alpha_hidden=1.0)), 0.5, 20, "needs a layer-wise term"),
    (LossPlan.from_config(loss_config(alpha_mlm=1.0, alpha_hidden=1.0, teacher_layer=-1)), 0.5, 20,
     "needs every layer paired"),
])
def test_schedules_that_cannot_be_kept_are_refused(plan, share, steps, message):
    with pytest.raises(UsageError, match=message):
        stages(plan, PAIRS, share, steps)


def test_a_layer_stage_updates_that_layer_only():
    from transformers import MobileBertConfig, MobileBertForMaskedLM

    torch.manual_seed(0)
    model = MobileBertForMaskedLM(MobileBertConfig(vocab_size=40, num_hidden_layers=3, hidden_size=32,
                                                   intra_bottleneck_size=16, num_attention_heads=2,
                                                   intermediate_size=32, embedding_size=16))
    schedule = stages(MOBILEBERT, PAIRS, 0.5, total_steps=20)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step, layer in ((0, 0), (3, 1)):  # stage "layer 0", then stage "layer 1"
        assert enter(schedule, step, model).layer == layer
        hidden = model.mobilebert(input_ids=torch.tensor([[2, 5, 7, 3]]), output_hidden_states=True).hidden_states
        hidden[layer + 1].pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and all(name.startswith(("mobilebert.embeddings.", "mobilebert.encoder.layer.0.",
                                          "mobilebert.encoder.layer.1.")) for name in moved)
    assert any(name.startswith("mobilebert.encoder.layer.1.") for name in moved)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        name for name, _ in model.named_parameters() if name.startswith("mobilebert.encoder.layer.1.")}
    assert enter(schedule, 5, model).name == "layer 1"  # a run resumed mid-stage re-enters its stage
    enter(schedule, 9, model)  # the last stage trains everything again
    assert all(p.requires_grad for p in model.parameters())


def test_head_only_steps_train_the_mlm_head_alone_then_everything():
    from transformers import BertConfig, BertForMaskedLM

    plan = LossPlan.from_config(loss_config(alpha_mlm=1.0))
    schedule = stages(plan, PAIRS, 0.0, total_steps=10, head_only_steps=4)
    assert [(s.name, s.end, s.head_only) for s in schedule] == [("MLM head only", 4, True), ("whole model", 10, False)]
    model = BertForMaskedLM(BertConfig(vocab_size=40, num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                       intermediate_size=32))
    enter(schedule, 0, model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("cls.") for name in trainable)  # the head; the tied decoder is frozen
    enter(schedule, 4, model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("plan", "share", "head_only", "message"), [
    (LossPlan.from_config(loss_config(alpha_mlm=1.0)), 0.5, 2, "two schedules: set one"),
    (LossPlan.from_config(loss_config(alpha_cos=1.0)), 0.0, 2, "no term of the loss uses"),
    (LossPlan.from_config(loss_config(alpha_mlm=1.0)), 0.0, 10, "leaves none of the 10 steps"),
])
def test_head_only_schedules_that_cannot_be_kept_are_refused(plan, share, head_only, message):
    with pytest.raises(UsageError, match=message):
        stages(plan, PAIRS, share, 10, head_only)
