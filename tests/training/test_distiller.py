"""What MaskedLMRows captures of its layers: the attention projections' outputs (by hooks on the modules the
family table names), the scores recomputed from them; which (student, teacher) layers the layer-wise losses pair."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from distilbert_cli.errors import UsageError
from distilbert_cli.models.student import select_layers
from distilbert_cli.training.distiller import MaskedLMRows, layer_pairs
from distilbert_cli.training.losses import attention_probabilities, head_scores, relation_kl_loss

IDS = torch.tensor([[2, 9, 14, 30, 3], [2, 17, 3, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def tiny(kind: str, heads: int = 4, seed: int = 0):
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        DistilBertConfig,
        DistilBertForMaskedLM,
        MobileBertConfig,
        MobileBertForMaskedLM,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    torch.manual_seed(seed)
    common = {"vocab_size": 40, "attn_implementation": "eager"}
    if kind == "bert":
        return BertForMaskedLM(BertConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=heads,
                                          intermediate_size=32, **common)).eval()
    if kind == "roberta":
        return RobertaForMaskedLM(RobertaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=heads,
                                                intermediate_size=32, pad_token_id=1, **common)).eval()
    if kind == "distilbert":
        return DistilBertForMaskedLM(DistilBertConfig(n_layers=3, dim=16, n_heads=heads, hidden_dim=32,
                                                      **common)).eval()
    return MobileBertForMaskedLM(MobileBertConfig(num_hidden_layers=3, hidden_size=32, intra_bottleneck_size=16,
                                                  num_attention_heads=heads, intermediate_size=32,
                                                  embedding_size=16, **common)).eval()


# Each family's query and key Linear modules, named here independently of the family table.
QUERY_KEY = {"bert": ("bert.encoder.layer.{}.attention.self.query", "bert.encoder.layer.{}.attention.self.key"),
             "roberta": ("roberta.encoder.layer.{}.attention.self.query",
                         "roberta.encoder.layer.{}.attention.self.key"),
             "distilbert": ("distilbert.transformer.layer.{}.attention.q_lin",
                            "distilbert.transformer.layer.{}.attention.k_lin"),
             "mobilebert": ("mobilebert.encoder.layer.{}.attention.self.query",
                            "mobilebert.encoder.layer.{}.attention.self.key")}


@pytest.mark.parametrize("kind", list(QUERY_KEY))
def test_captured_scores_equal_a_manual_recomputation_and_give_the_models_attention(kind):
    model = tiny(kind)
    out = MaskedLMRows(model)(IDS, MASK, attention_layers=[2, 0], projections=("query", "key"))
    inputs, hooks = {}, []
    for layer in (2, 0):  # record what each query / key Linear is given ...
        for path in QUERY_KEY[kind]:
            module = model.get_submodule(path.format(layer))
            hooks.append(module.register_forward_hook(lambda m, i, o, path=path.format(layer): inputs.update(
                {path: i[0]})))
    reference = model.base_model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    for hook in hooks:
        hook.remove()
    for index, layer in enumerate([2, 0]):
        q, k = (inputs[path.format(layer)] @ model.get_submodule(path.format(layer)).weight.T
                + model.get_submodule(path.format(layer)).bias for path in QUERY_KEY[kind])  # ... and apply it
        width = q.size(-1) // 4
        manual = torch.stack([q[..., h * width:(h + 1) * width] @ k[..., h * width:(h + 1) * width].transpose(1, 2)
                              for h in range(4)], dim=1) / math.sqrt(width)
        scores = head_scores(out["query"][index], out["key"][index], out["heads"])
        assert_close(scores, manual)
        # softmax over the real keys is the attention the model computed (eager)
        assert_close(attention_probabilities(scores, MASK), reference.attentions[layer])


def test_only_the_requested_layers_and_projections_are_hooked():
    model = tiny("bert")
    rows = MaskedLMRows(model)
    out = rows(IDS, MASK, attention_layers=[1], projections=("value",))
    assert set(out) == {"last_hidden", "value", "heads"} and out["value"][0].shape == (2, 5, 16)
    assert not any(module._forward_hooks for module in model.modules())  # removed after the forward


def test_hidden_states_and_embeddings_go_through_their_projections():
    model = tiny("bert")
    projections = torch.nn.ModuleDict({"embed": torch.nn.Linear(16, 7), "hidden": torch.nn.Linear(16, 9)})
    out = MaskedLMRows(model, projections)(IDS, MASK, embeddings=True, hidden_layers=[0, 2])
    reference = model.base_model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
    assert_close(out["embeddings"], projections["embed"](reference.hidden_states[0]))
    assert_close(out["hidden_states"][1], projections["hidden"](reference.hidden_states[3]))  # layer 2's output


def test_relation_losses_do_not_depend_on_the_students_attention_heads():
    """The same weights read as 2 or 4 attention heads give the same query/value relations in 8 relation heads."""
    teacher = MaskedLMRows(tiny("bert", heads=4, seed=1))
    teacher_out = teacher(IDS, MASK, attention_layers=[2], projections=("query", "value"))
    losses = []
    for heads in (2, 4):
        student = MaskedLMRows(tiny("bert", heads=heads, seed=2))
        out = student(IDS, MASK, attention_layers=[2], projections=("query", "value"))
        losses.append([relation_kl_loss(out[kind], teacher_out[kind], 8, MASK) for kind in ("query", "value")])
    assert_close(losses[0], losses[1])
    assert all(loss > 0 for loss in losses[0])


def test_a_family_without_attention_modules_in_the_table_is_refused(monkeypatch):
    from distilbert_cli.models import families

    bare = families.Family(name="bare", model_types=("bert",), layers="bert.encoder.layer", head_transform=(),
                           mlm_head=families.BERT.mlm_head)
    monkeypatch.setattr(families, "family_of", lambda config, *args, **kwargs: bare)
    with pytest.raises(UsageError, match="the bare family has no attention key module in the family table"):
        MaskedLMRows(tiny("bert"))(IDS, MASK, attention_layers=[0], projections=("key",))


def test_layer_pairs():
    assert layer_pairs(4, 12, None) == [(0, 2), (1, 5), (2, 8), (3, 11)]  # TinyBERT: m <- m * N / M
    assert layer_pairs(3, 12, [0, 5, 11]) == [(0, 0), (1, 5), (2, 11)]  # the layers init-student copied
    assert layer_pairs(6, 6, [None] * 6) == [(i, i) for i in range(6)]  # MobileBERT: as deep as the teacher
    assert layer_pairs(6, 12, None, teacher_layer=-1) == [(5, 11)]  # MiniLM: last <- last
    assert layer_pairs(6, 24, None, teacher_layer=-4) == [(5, 20)]  # MiniLMv2, a large teacher: the 21st of 24


@pytest.mark.parametrize("layer_map", [None, [None] * 5, [0, 1, 2]])  # no map, a random student, a map of 3 layers
def test_without_a_usable_layer_map_12_to_5_pairs_like_init_uniform(layer_map):
    # floor((i + 1) * 12 / 5) - 1 = [1, 3, 6, 8, 11]: the teacher layers init=uniform copies (round: [1, 4, 6, 9, 11])
    assert layer_pairs(5, 12, layer_map) == [(0, 1), (1, 3), (2, 6), (3, 8), (4, 11)]
    assert [t for _, t in layer_pairs(5, 12, layer_map)] == select_layers("uniform", 12, 5)


def test_a_student_initialised_from_teacher_layers_is_paired_with_them():
    assert layer_pairs(3, 12, [0, 5, 11]) == [(0, 0), (1, 5), (2, 11)]
    assert layer_pairs(6, 12, select_layers("every_other", 12, 6)) == [(0, 0), (1, 2), (2, 4), (3, 7), (4, 9),
                                                                       (5, 11)]
