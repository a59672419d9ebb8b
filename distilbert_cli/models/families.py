"""The architecture families: one entry per family says where its layers, embeddings and MLM head live,
which inputs it takes and how a student's weights map from a teacher's. init-student, train, finetune and
bench-cpu get everything family-specific from here.

Adding a family = one `Family(...)` in FAMILIES (and its tests). Names are module paths relative to the
masked LM (`BertForMaskedLM`: "bert.encoder.layer", "cls.predictions.transform", ...); parameters outside the base
model (`model.base_model_prefix`) belong to the MLM head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from distilbert_cli.errors import UsageError

MlmHead = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values of the family
    layers: str  # the ModuleList of transformer layers, e.g. "bert.encoder.layer"
    head_transform: tuple[str, ...]  # the head's transform (dense + LayerNorm before the decoder)
    mlm_head: Callable[[nn.Module], MlmHead]  # last hidden states -> vocabulary logits
    token_type_embeddings: str | None = None  # None: the family has no segment embeddings
    position_embeddings: str | None = None
    # The inputs the family's models take besides input_ids and attention_mask.
    extra_inputs: tuple[str, ...] = ()
    # DistilBERT module name -> this family's module name ({i}: layer index), for a DistilBERT student of it.
    distilbert_names: Mapping[str, str] = field(default_factory=dict)
    # The attention's query, key and value Linear modules inside a layer (None: not in the table), whose outputs
    # the attention and relation losses capture with forward hooks.
    attention_query: str | None = None
    attention_key: str | None = None
    attention_value: str | None = None

    def layer_pattern(self) -> re.Pattern:
        """Matches a parameter of layer i: group 1 is i."""
        return re.compile(rf"^{re.escape(self.layers)}\.(\d+)\.")

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", *self.extra_inputs)


def _bert_head(model: nn.Module) -> MlmHead:
    return lambda hidden: model.cls(hidden)


def _lm_head(model: nn.Module) -> MlmHead:
    return lambda hidden: model.lm_head(hidden)


def _distilbert_head(model: nn.Module) -> MlmHead:
    return lambda hidden: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))


# The attention projections of BERT's layer code (shared by RoBERTa and MobileBERT).
BERT_ATTENTION = {"attention_query": "attention.self.query", "attention_key": "attention.self.key",
                  "attention_value": "attention.self.value"}

BERT = Family(
    name="bert", model_types=("bert",), layers="bert.encoder.layer",
    head_transform=("cls.predictions.transform.",), mlm_head=_bert_head,
    token_type_embeddings="bert.embeddings.token_type_embeddings",
    position_embeddings="bert.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    **BERT_ATTENTION,
    distilbert_names={
        "distilbert.embeddings.word_embeddings": "bert.embeddings.word_embeddings",
        "distilbert.embeddings.position_embeddings": "bert.embeddings.position_embeddings",
        "distilbert.embeddings.LayerNorm": "bert.embeddings.LayerNorm",
        "distilbert.transformer.layer.{i}.attention.q_lin": "bert.encoder.layer.{i}.attention.self.query",
        "distilbert.transformer.layer.{i}.attention.k_lin": "bert.encoder.layer.{i}.attention.self.key",
        "distilbert.transformer.layer.{i}.attention.v_lin": "bert.encoder.layer.{i}.attention.self.value",
        "distilbert.transformer.layer.{i}.attention.out_lin": "bert.encoder.layer.{i}.attention.output.dense",
        "distilbert.transformer.layer.{i}.sa_layer_norm": "bert.encoder.layer.{i}.attention.output.LayerNorm",
        "distilbert.transformer.layer.{i}.ffn.lin1": "bert.encoder.layer.{i}.intermediate.dense",
        "distilbert.transformer.layer.{i}.ffn.lin2": "bert.encoder.layer.{i}.output.dense",
        "distilbert.transformer.layer.{i}.output_layer_norm": "bert.encoder.layer.{i}.output.LayerNorm",
        "vocab_transform": "cls.predictions.transform.dense",
        "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
        "vocab_projector": "cls.predictions.decoder",
    },
)

# RoBERTa and the models built on its code (XLM-R, CamemBERT): BERT's layers, a `lm_head`.
ROBERTA = Family(
    name="roberta", model_types=("roberta", "xlm-roberta", "camembert"), layers="roberta.encoder.layer",
    head_transform=("lm_head.dense.", "lm_head.layer_norm."), mlm_head=_lm_head,
    token_type_embeddings="roberta.embeddings.token_type_embeddings",
    position_embeddings="roberta.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    **BERT_ATTENTION,
)

DISTILBERT = Family(
    name="distilbert", model_types=("distilbert",), layers="distilbert.transformer.layer",
    head_transform=("vocab_transform.", "vocab_layer_norm."), mlm_head=_distilbert_head,
    position_embeddings="distilbert.embeddings.position_embeddings",
    attention_query="attention.q_lin", attention_key="attention.k_lin", attention_value="attention.v_lin",
)

# MobileBERT (a student kind): bottleneck blocks whose queries and keys come from the shared bottleneck and
# values from the block input; the head's decoder is the 128-wide embedding plus an extra dense part.
MOBILEBERT = Family(
    name="mobilebert", model_types=("mobilebert",), layers="mobilebert.encoder.layer",
    head_transform=("cls.predictions.transform.",), mlm_head=_bert_head,
    token_type_embeddings="mobilebert.embeddings.token_type_embeddings",
    position_embeddings="mobilebert.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    **BERT_ATTENTION,
)

FAMILIES: tuple[Family, ...] = (BERT, ROBERTA, DISTILBERT, MOBILEBERT)
# Families a student can be initialised from (DistilBERT as a teacher is not supported yet).
TEACHER_FAMILIES: tuple[Family, ...] = (BERT, ROBERTA)


def family_of(config, among: tuple[Family, ...] = FAMILIES, role: str = "model") -> Family:
    """The family of a transformers config, or a UsageError naming the supported model types."""
    for family in among:
        if config.model_type in family.model_types:
            return family
    supported = ", ".join(t for family in among for t in family.model_types)
    raise UsageError(f"{role} is a {config.model_type!r} model, which is not supported (supported: {supported})")


def mlm_head(model: nn.Module) -> MlmHead | None:
    """The function from last hidden states to vocabulary logits of `model`, or None for a headless encoder.
    A plain function, so the head's weights stay registered once (in `model`)."""
    if model is model.base_model:
        return None
    return family_of(model.config).mlm_head(model)


def attention_projection(model: nn.Module, layer: int, kind: str) -> nn.Module:
    """The `kind` ("query", "key" or "value") projection of the attention of `model`'s layer `layer`, a masked LM
    or its headless encoder."""
    family = family_of(model.config)
    path = getattr(family, f"attention_{kind}")
    if path is None:
        raise UsageError(f"the {family.name} family has no attention {kind} module in the family table, so the "
                         f"attention and relation losses cannot read it")
    layers = family.layers.removeprefix(f"{model.base_model_prefix}.")  # relative to the encoder
    return model.base_model.get_submodule(f"{layers}.{layer}.{path}")
