"""The distillation losses as pure functions, and the plan that says which ones a config needs.

total = alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos + alpha_mse * L_mse
        + alpha_hidden * L_hidden + alpha_attn * L_attn

A weight of 0 removes its term and everything only it needs: `LossPlan` tells the training step which
model outputs to compute (teacher logits, hidden states, attention maps, the teacher at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distilbert_cli.errors import UsageError

LOSS_NAMES = ("ce", "mlm", "cos", "mse", "hidden", "attn")


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """L_ce: KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary, averaged over rows, times T^2.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., 2015).
    """
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def mlm_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """L_mlm: cross-entropy of the student's logits at the masked positions against the original tokens."""
    return F.cross_entropy(student_logits.float(), labels)


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """L_cos: mean of 1 - cos(s, t) over rows (torch's CosineEmbeddingLoss with target +1)."""
    return (1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def logits_mse_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """L_mse: squared error between logits summed over the vocabulary, averaged over rows (the reference)."""
    return F.mse_loss(student_logits.float(), teacher_logits.float(), reduction="sum") / student_logits.size(0)


def hidden_mse_loss(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]) -> Tensor:
    """L_hidden (TinyBERT): MSE between paired (already projected) hidden states, averaged over the pairs."""
    per_layer = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_states, teacher_states, strict=True)]
    return torch.stack(per_layer).mean()


def attention_mse_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], attention_mask: Tensor
                       ) -> Tensor:
    """L_attn (TinyBERT): MSE between paired attention maps [B, heads, L, L] over real (query, key) pairs,
    averaged over the pairs of layers. Pad queries and keys are left out."""
    pair_mask = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).float()  # [B, 1, L, L]
    per_layer = []
    for s, t in zip(student_maps, teacher_maps, strict=True):
        squared = (s.float() - t.float()).pow(2) * pair_mask
        per_layer.append(squared.sum() / (pair_mask.sum() * s.size(1)))
    return torch.stack(per_layer).mean()


@dataclass(frozen=True)
class LossPlan:
    """The loss weights and what they need computed."""

    weights: Mapping[str, float]  # LOSS_NAMES -> alpha
    temperature: float
    restrict_ce_to_mask: bool

    @classmethod
    def from_config(cls, loss_cfg) -> LossPlan:
        weights = {name: float(loss_cfg[f"alpha_{name}"]) for name in LOSS_NAMES}
        if any(w < 0 for w in weights.values()):
            raise UsageError(f"loss weights must be >= 0, got {weights}")
        if not any(weights.values()):
            raise UsageError("every loss weight is 0: set at least one of loss.alpha_{ce,mlm,cos,mse,hidden,attn}")
        if loss_cfg.temperature <= 0:
            raise UsageError(f"loss.temperature must be > 0, got {loss_cfg.temperature}")
        return cls(weights, float(loss_cfg.temperature), bool(loss_cfg.restrict_ce_to_mask))

    def uses(self, name: str) -> bool:
        return self.weights[name] > 0

    @property
    def teacher_logits(self) -> bool:
        return self.uses("ce") or self.uses("mse")

    @property
    def student_logits(self) -> bool:
        return self.teacher_logits or self.uses("mlm")

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_logits or any(self.uses(n) for n in ("cos", "hidden", "attn"))

    @property
    def hidden_states(self) -> bool:
        return self.uses("hidden")

    @property
    def attentions(self) -> bool:
        return self.uses("attn")

    @property
    def logits_at_targets_only(self) -> bool:
        """Logits are needed at the masked positions only: for L_mlm alone, or with restrict_ce_to_mask."""
        return self.restrict_ce_to_mask or not self.teacher_logits


def compute_losses(plan: LossPlan, student: Mapping, teacher: Mapping | None, batch: Mapping) -> dict[str, Tensor]:
    """Every loss term the plan uses, and their weighted sum as "loss".

    `student` / `teacher` hold what the models computed for this plan: "logits" at the rows given by
    `plan.logits_at_targets_only` (batch["target_rows"], else batch["token_rows"]), "last_hidden"
    [B, L, d], and the paired "hidden_states" / "attentions" lists when the plan uses them.
    """
    losses = {}
    if plan.uses("mlm"):
        target_logits = (student["logits"] if plan.logits_at_targets_only
                         else student["logits"][batch["targets_in_tokens"]])
        losses["mlm"] = mlm_loss(target_logits, batch["target_labels"])
    if plan.uses("ce"):
        losses["ce"] = soft_target_loss(student["logits"], teacher["logits"], plan.temperature)
    if plan.uses("mse"):
        losses["mse"] = logits_mse_loss(student["logits"], teacher["logits"])
    if plan.uses("cos"):
        token_rows = batch["token_rows"]
        losses["cos"] = cosine_loss(student["last_hidden"].flatten(0, 1)[token_rows],
                                    teacher["last_hidden"].flatten(0, 1)[token_rows])
    if plan.uses("hidden"):
        token_rows = batch["token_rows"]
        losses["hidden"] = hidden_mse_loss([s.flatten(0, 1)[token_rows] for s in student["hidden_states"]],
                                           [t.flatten(0, 1)[token_rows] for t in teacher["hidden_states"]])
    if plan.uses("attn"):
        losses["attn"] = attention_mse_loss(student["attentions"], teacher["attentions"], batch["attention_mask"])
    losses["loss"] = sum(plan.weights[name] * value for name, value in losses.items())
    return losses
