"""The architecture families: one entry per family says where its layers, embeddings and MLM head live,
which inputs it takes and how a student's weights map from a teacher's. init-student, train, finetune and
bench-cpu get everything family-specific from here.

Adding a family = one `Family(...)` in FAMILIES (and its tests). Names are module paths relative to the
masked LM (`BertForMaskedLM`: "bert.encoder.layer", "cls.predictions.transform", ...); parameters outside the base
model (`model.base_model_prefix`) belong to the MLM head.

How a student's weights map (models/student.py): a student of the teacher's own class (`same_arch`) takes every
tensor of the same name, with the layer index mapped through the layer map, so embeddings, embedding
projections, norms and relative-position tables outside the layers are copied whole; a DistilBERT student of a
BERT teacher renames through `distilbert_names`. Config attributes with one entry per layer follow the layer
map (`per_layer_config`), so each copied layer keeps the settings it was trained with.
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
    position_embeddings: str | None = None  # None: relative or rotary positions only
    # The inputs the family's models take besides input_ids and attention_mask.
    extra_inputs: tuple[str, ...] = ()
    # DistilBERT module name -> this family's module name ({i}: layer index), for a DistilBERT student of it.
    distilbert_names: Mapping[str, str] = field(default_factory=dict)
    # The student kind `student.arch=auto` builds (models/student.py STUDENT_ARCHS).
    auto_student: str = "same_arch"
    # Config attributes holding one value per layer: a student's follow its layer map.
    per_layer_config: tuple[str, ...] = ()
    # The config attribute of the feed-forward width.
    intermediate_size: str = "intermediate_size"
    # Position ids start after the padding id (RoBERTa's padding_idx + 1), so the position table holds
    # pad_token_id + 1 more rows than the longest input.
    positions_after_padding: bool = False
    # Config overrides for other MLM head layouts the family's checkpoints use, tried in order when the default
    # layout finds no head in a checkpoint (models/loading.py load_masked_lm).
    head_layouts: tuple[Mapping[str, object], ...] = ()
    # The attention's query, key and value Linear modules inside a layer (None: not in the table), whose outputs
    # the attention and relation losses capture with forward hooks.
    attention_query: str | None = None
    attention_key: str | None = None
    attention_value: str | None = None
    # The model type of ONNX Runtime's transformer optimizer whose fusions (attention, SkipLayerNormalization, GELU)
    # fit the family's exported graph (onnxruntime.transformers.optimizer); None: its graph is left unfused.
    onnx_fusions: str | None = None

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


def _electra_head(model: nn.Module) -> MlmHead:
    return lambda hidden: model.generator_lm_head(model.generator_predictions(hidden))


def _deberta_head(model: nn.Module) -> MlmHead:
    if model.legacy:  # config.legacy: BERT's head layout (`cls.predictions`)
        return lambda hidden: model.cls(hidden)
    return lambda hidden: model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings)


def _modernbert_head(model: nn.Module) -> MlmHead:
    return lambda hidden: model.decoder(model.head(hidden))


# The attention projections of BERT's layer code (shared by RoBERTa and MobileBERT).
BERT_ATTENTION = {"attention_query": "attention.self.query", "attention_key": "attention.self.key",
                  "attention_value": "attention.self.value"}

# BERT (and the sentence-embedding BERTs): embeddings in bert.embeddings (word, position, token type,
# LayerNorm); the paper's student is DistilBERT, which drops the token types (folded into the positions by
# init-student) and renames every tensor through `distilbert_names`.
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
    auto_student="distilbert", onnx_fusions="bert",
)

# RoBERTa and the models built on its code (XLM-R, CamemBERT): BERT's layers, a `lm_head`. Position ids start
# after the padding id (padding_idx + 1, hence 514 positions for 512 tokens); the student keeps the teacher's
# pad_token_id and its whole position table, so every token keeps its position embedding.
ROBERTA = Family(
    name="roberta", model_types=("roberta", "xlm-roberta", "camembert"), layers="roberta.encoder.layer",
    head_transform=("lm_head.dense.", "lm_head.layer_norm."), mlm_head=_lm_head,
    token_type_embeddings="roberta.embeddings.token_type_embeddings",
    position_embeddings="roberta.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    positions_after_padding=True, onnx_fusions="bert",
    **BERT_ATTENTION,
)

# ELECTRA: BERT's layers under `electra`; embeddings of `embedding_size` projected to the hidden size by
# electra.embeddings_project when the two differ (copied whole). The generator (ElectraForMaskedLM) has an MLM
# head (generator_predictions + generator_lm_head); the discriminator (ElectraForPreTraining) has none and is a
# headless teacher.
ELECTRA = Family(
    name="electra", model_types=("electra",), layers="electra.encoder.layer",
    head_transform=("generator_predictions.",), mlm_head=_electra_head,
    token_type_embeddings="electra.embeddings.token_type_embeddings",
    position_embeddings="electra.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    onnx_fusions="bert", **BERT_ATTENTION,
)

# DeBERTa-v2/v3: disentangled attention over relative positions, whose table (deberta.encoder.rel_embeddings,
# with deberta.encoder.LayerNorm) is shared by all layers and copied whole; the student keeps the teacher's
# position_buckets and max_relative_positions, so the table and the bucketing stay consistent. No absolute
# positions (position_biased_input=false) and no token types in v3 (type_vocab_size=0). Two head layouts:
# `cls.predictions` (config.legacy, transformers' default) or `lm_predictions.lm_head` (decoder = the word
# embeddings), which the original checkpoints hold and which loads with legacy=false. Its attention adds
# relative-position terms to Q K^T, so the attention and relation losses, which rebuild the scores from the
# captured queries and keys, are not offered for it (no attention_* fields).
DEBERTA_V2 = Family(
    name="deberta-v2", model_types=("deberta-v2",), layers="deberta.encoder.layer",
    head_transform=("cls.predictions.transform.", "lm_predictions.lm_head.dense.", "lm_predictions.lm_head.LayerNorm."),
    mlm_head=_deberta_head, token_type_embeddings="deberta.embeddings.token_type_embeddings",
    extra_inputs=("token_type_ids",), head_layouts=({"legacy": False},),
)

# ModernBERT: layers in model.layers, rotary positions, its own embedding norm (model.embeddings.norm) and a
# final norm (model.final_norm), both copied. Layers alternate global and local (sliding-window) attention
# (config.layer_types); each student layer keeps the attention of the teacher layer it is copied from. Its
# first layer has no pre-attention norm (the embedding norm precedes it): a teacher layer moved into first place
# # loses its attn_norm, and teacher layer 0 moved up gets a fresh one (init-student names both). Its queries, keys
# and values come out of one fused Linear (Wqkv), so the attention and relation losses are not offered for it.
MODERNBERT = Family(
    name="modernbert", model_types=("modernbert",), layers="model.layers",
    head_transform=("head.",), mlm_head=_modernbert_head, per_layer_config=("layer_types",),
)

# DistilBERT: as a teacher too (DistilBERT -> 3 layers); no token types, learned (or sinusoidal) positions.
DISTILBERT = Family(
    name="distilbert", model_types=("distilbert",), layers="distilbert.transformer.layer",
    head_transform=("vocab_transform.", "vocab_layer_norm."), mlm_head=_distilbert_head,
    position_embeddings="distilbert.embeddings.position_embeddings", intermediate_size="hidden_dim",
    attention_query="attention.q_lin", attention_key="attention.k_lin", attention_value="attention.v_lin",
    onnx_fusions="bert",
)

# MobileBERT (a student kind, +experiment=mobilebert): bottleneck blocks whose queries and keys come from the
# shared bottleneck and values from the block input; the head's decoder is the 128-wide embedding plus an extra
# dense part.
MOBILEBERT = Family(
    name="mobilebert", model_types=("mobilebert",), layers="mobilebert.encoder.layer",
    head_transform=("cls.predictions.transform.",), mlm_head=_bert_head,
    token_type_embeddings="mobilebert.embeddings.token_type_embeddings",
    position_embeddings="mobilebert.embeddings.position_embeddings", extra_inputs=("token_type_ids",),
    **BERT_ATTENTION,
)

FAMILIES: tuple[Family, ...] = (BERT, ROBERTA, ELECTRA, DEBERTA_V2, MODERNBERT, DISTILBERT, MOBILEBERT)
# The families a teacher may come from: MobileBERT is a student kind here (its bottleneck blocks and stacked FFNs
# are not distilled from).
TEACHER_FAMILIES: tuple[Family, ...] = tuple(family for family in FAMILIES if family is not MOBILEBERT)


def find_family(config) -> Family | None:
    """The family of a transformers config, or None for a model type outside the table."""
    return next((family for family in FAMILIES if config.model_type in family.model_types), None)


def family_of(config, role: str = "model", among: tuple[Family, ...] = FAMILIES) -> Family:
    """The family of a transformers config (one of `among`), or a UsageError naming the supported model types."""
    if (family := find_family(config)) in among:
        return family
    supported = ", ".join(t for family in among for t in family.model_types)
    raise UsageError(f"{role} is a {config.model_type!r} model, which is not supported (supported: {supported})")


def family_of_model(model: nn.Module, role: str = "model") -> Family:
    """The family of a loaded masked LM, checked against its modules: a class from custom code
    (trust_remote_code) under a supported model_type must still have the family's layout for the weight map."""
    family = family_of(model.config, role)
    try:
        layers = model.get_submodule(family.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList) or len(layers) != model.config.num_hidden_layers:
        raise UsageError(f"{role} is a {type(model).__name__} without the {family.name} layout (no "
                         f"{model.config.num_hidden_layers} layers at {family.layers}); custom code is only supported "
                         f"where it keeps the transformers layout of its model_type")
    return family


def max_sequence_length(config) -> int | None:
    """The most tokens a model takes: its position table, less the rows before the first position (RoBERTa's
    514 positions take 512 tokens). Models outside the table: their position table; None for a model without
    one (the BiLSTM takes any length)."""
    if getattr(config, "max_position_embeddings", None) is None:
        return None
    family = find_family(config)
    offset = config.pad_token_id + 1 if family is not None and family.positions_after_padding else 0
    return config.max_position_embeddings - offset


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
