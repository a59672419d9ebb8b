"""One distillation step's forward pass: the teacher (frozen, no grad) and the student on a micro batch, each
computing only the outputs the loss plan needs, then the loss terms."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from distilbert_cli.models.families import attention_projection, mlm_head
from distilbert_cli.models.student import uniform_layers
from distilbert_cli.training.losses import LossPlan, compute_losses


class MaskedLMRows(nn.Module):
    """A masked LM (or a headless encoder) that computes vocabulary logits only at the rows a loss needs, and
    whatever else the loss plan asks of its layers.

    The vocabulary projection dominates a small model's cost, so the hidden states are gathered at the
    chosen rows of the flattened [B*L] batch BEFORE the head. `projections` holds the learned linear maps to the
    teacher's width (TinyBERT's W_e for the embedding output, W_h for the layer outputs), trained with the
    student and never saved with it. The attention projections' outputs are captured by forward hooks on the
    modules the family table names (no model code patched), for the requested layers only.
    """

    def __init__(self, model: nn.Module, projections: nn.ModuleDict | None = None):
        super().__init__()
        self.model = model
        self.projections = projections if projections is not None else nn.ModuleDict()
        self.head = mlm_head(model)
        self.takes_token_types = "token_type_ids" in inspect.signature(model.base_model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_rows: torch.Tensor | None = None,
                embeddings: bool = False, hidden_layers: Sequence[int] = (), attention_layers: Sequence[int] = (),
                projections: Sequence[str] = (), token_type_ids: torch.Tensor | None = None) -> dict:
        """Outputs for the loss terms: "last_hidden" always; "logits" at `logit_rows`; the "embeddings" output
        and the outputs of `hidden_layers` (projected to the teacher's width where a projection is set); the
        "query" / "key" / "value" projections (any of `projections`) of `attention_layers`, with the model's
        attention "heads". `token_type_ids` (sentence pairs) reach a model that takes them."""
        captured = {kind: [None] * len(attention_layers) for kind in projections}
        hooks = [attention_projection(self.model, layer, kind).register_forward_hook(_store(captured[kind], i))
                 for i, layer in enumerate(attention_layers) for kind in projections]
        types = {"token_type_ids": token_type_ids} if token_type_ids is not None and self.takes_token_types else {}
        try:
            outputs = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                            output_hidden_states=embeddings or bool(hidden_layers), **types)
        finally:
            for hook in hooks:
                hook.remove()
        result = {"last_hidden": outputs.last_hidden_state, **captured}
        if logit_rows is not None:
            result["logits"] = self.head(outputs.last_hidden_state.flatten(0, 1)[logit_rows])
        # hidden_states[0] is the embedding output, so layer i's output is index i + 1.
        if embeddings:
            result["embeddings"] = self._project("embed", outputs.hidden_states[0])
        if hidden_layers:
            result["hidden_states"] = [self._project("hidden", outputs.hidden_states[i + 1]) for i in hidden_layers]
        if projections:
            result["heads"] = self.model.config.num_attention_heads
        return result

    def _project(self, name: str, states: torch.Tensor) -> torch.Tensor:
        return self.projections[name](states) if name in self.projections else states


def _store(slots: list, index: int):
    def hook(module, inputs, output):
        slots[index] = output
    return hook


def layer_pairs(student_layers: int, teacher_layers: int, layer_map: Sequence[int | None] | None,
                teacher_layer: int | None = None) -> list[tuple[int, int]]:
    """(student, teacher) layer pairs for the layer-wise losses: with `teacher_layer` (MiniLM), the student's
    last layer and that teacher layer (negative: from the top); otherwise student layer i with the teacher layer
    it was initialised from (init-student's layer_map), or the uniform TinyBERT map when there is none."""
    if teacher_layer is not None:
        return [(student_layers - 1, teacher_layer % teacher_layers)]
    if layer_map is None or len(layer_map) != student_layers or None in layer_map:  # None: a random layer
        layer_map = uniform_layers(teacher_layers, student_layers)
    return [(i, int(t)) for i, t in enumerate(layer_map)]


def distillation_losses(student: nn.Module, teacher: nn.Module | None, batch: dict, plan: LossPlan,
                        pairs: Sequence[tuple[int, int]], autocast: Callable[[], AbstractContextManager]) -> dict:
    """Forward the teacher (frozen, no grad) and the student on one micro batch; return the loss terms."""
    logit_rows = None
    if plan.student_logits or plan.teacher_logits:
        logit_rows = batch["target_rows"] if plan.logits_at_targets_only else batch["token_rows"]
    layers = [s for s, _ in pairs], [t for _, t in pairs]
    requests = [{"embeddings": plan.embeddings, "hidden_layers": side if plan.hidden_states else [],
                 "attention_layers": side if plan.projections else [], "projections": plan.projections,
                 "token_type_ids": batch.get("token_type_ids")} for side in layers]
    teacher_outputs = None
    if teacher is not None:
        with torch.no_grad(), autocast():
            teacher_outputs = teacher(batch["input_ids"], batch["attention_mask"],
                                      logit_rows if plan.teacher_logits else None, **requests[1])
    student_outputs = student(batch["input_ids"], batch["attention_mask"],
                              logit_rows if plan.student_logits else None, **requests[0])
    return compute_losses(plan, student_outputs, teacher_outputs, batch)

