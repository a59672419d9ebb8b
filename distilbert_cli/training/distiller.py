"""One distillation step's forward pass: the teacher (frozen, no grad) and the student on a micro batch, each
computing only the outputs the loss plan needs, then the loss terms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from distilbert_cli.models.families import mlm_head
from distilbert_cli.models.student import uniform_layers
from distilbert_cli.training.losses import LossPlan, compute_losses


class MaskedLMRows(nn.Module):
    """A masked LM (or a headless encoder) that computes vocabulary logits only at the rows a loss needs.

    The vocabulary projection dominates a small model's cost, so the hidden states are gathered at the
    chosen rows of the flattened [B*L] batch BEFORE the head. `projection` (a learned linear map to the
    teacher's width, for L_hidden) is applied to the returned hidden states.
    """

    def __init__(self, model: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.projection = projection
        self.head = mlm_head(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logit_rows: torch.Tensor | None = None,
                hidden_layers: Sequence[int] = (), attention_layers: Sequence[int] = ()) -> dict:
        outputs = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        output_hidden_states=bool(hidden_layers),
                                        output_attentions=bool(attention_layers))
        result = {"last_hidden": outputs.last_hidden_state}
        if logit_rows is not None:
            result["logits"] = self.head(outputs.last_hidden_state.flatten(0, 1)[logit_rows])
        if hidden_layers:
            states = [outputs.hidden_states[i] for i in hidden_layers]
            result["hidden_states"] = [self.projection(s) for s in states] if self.projection else states
        if attention_layers:
            result["attentions"] = [outputs.attentions[i] for i in attention_layers]
        return result


def layer_pairs(student_layers: int, teacher_layers: int, layer_map: Sequence[int | None] | None
                ) -> list[tuple[int, int]]:
    """(student, teacher) layer pairs for L_hidden / L_attn: student layer i with the teacher layer it was
    initialised from (init-student's layer_map), or the uniform TinyBERT map when there is none."""
    if layer_map is None or len(layer_map) != student_layers or None in layer_map:  # None: a random layer
        layer_map = uniform_layers(teacher_layers, student_layers)
    return [(i, int(t)) for i, t in enumerate(layer_map)]


def distillation_losses(student: nn.Module, teacher: nn.Module | None, batch: dict, plan: LossPlan,
                        pairs: Sequence[tuple[int, int]], autocast: Callable[[], AbstractContextManager]) -> dict:
    """Forward the teacher (frozen, no grad) and the student on one micro batch; return the loss terms."""
    logit_rows = batch["target_rows"] if plan.logits_at_targets_only else batch["token_rows"]
    # hidden_states[0] is the embedding output, so layer i's output is index i + 1; attentions[i] is layer i.
    student_hidden = [0] + [s + 1 for s, _ in pairs] if plan.hidden_states else []
    teacher_hidden = [0] + [t + 1 for _, t in pairs] if plan.hidden_states else []
    teacher_outputs = None
    if teacher is not None:
        with torch.no_grad(), autocast():
            teacher_outputs = teacher(batch["input_ids"], batch["attention_mask"],
                                      logit_rows if plan.teacher_logits else None, teacher_hidden,
                                      [t for _, t in pairs] if plan.attentions else [])
    student_outputs = student(batch["input_ids"], batch["attention_mask"],
                              logit_rows if plan.student_logits else None, student_hidden,
                              [s for s, _ in pairs] if plan.attentions else [])
    return compute_losses(plan, student_outputs, teacher_outputs, batch)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
