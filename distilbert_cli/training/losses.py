"""The distillation losses as pure functions, and the plan that says which ones a config needs.

total = alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos + alpha_mse * L_mse
        + alpha_hidden * L_hidden + alpha_attn * L_attn

A weight of 0 removes its term and everything only it needs: `LossPlan` derives from the registry
(`LOSS_TERMS`) which model outputs the training step computes (teacher logits, hidden states, attention maps,
the teacher at all). The metrics log and the report take their loss names from the registry too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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


def _target_logits(plan: LossPlan, student: Mapping, batch: Mapping) -> Tensor:
    """The student's logits at the MLM targets, whichever rows the plan computed logits at."""
    return student["logits"] if plan.logits_at_targets_only else student["logits"][batch["targets_in_tokens"]]


def _token_rows(states: Tensor, batch: Mapping) -> Tensor:
    """[B, L, d] -> [real tokens, d]."""
    return states.flatten(0, 1)[batch["token_rows"]]


@dataclass(frozen=True)
class LossTerm:
    """A registered loss: its pure function applied to the step's outputs, and the outputs it needs computed.

    Needs: "student_logits", "teacher_logits" (at the plan's logit rows), "teacher_hidden" (the teacher's last
    hidden states; the student's are always there), "hidden_states" and "attentions" (paired layers of both).
    """

    name: str  # config key alpha_<name>, metrics key loss_<name>
    needs: frozenset[str]
    compute: Callable[[LossPlan, Mapping, Mapping | None, Mapping], Tensor]  # (plan, student, teacher, batch)


# The registry, in the order the terms are computed and summed. Adding a loss = its pure function above, one
# entry here and its `alpha_<name>` key in conf/loss/.
LOSS_TERMS: dict[str, LossTerm] = {term.name: term for term in (
    LossTerm("mlm", frozenset({"student_logits"}),
             lambda plan, s, t, batch: mlm_loss(_target_logits(plan, s, batch), batch["target_labels"])),
    LossTerm("ce", frozenset({"student_logits", "teacher_logits"}),
             lambda plan, s, t, batch: soft_target_loss(s["logits"], t["logits"], plan.temperature)),
    LossTerm("mse", frozenset({"student_logits", "teacher_logits"}),
             lambda plan, s, t, batch: logits_mse_loss(s["logits"], t["logits"])),
    LossTerm("cos", frozenset({"teacher_hidden"}),
             lambda plan, s, t, batch: cosine_loss(_token_rows(s["last_hidden"], batch),
                                                   _token_rows(t["last_hidden"], batch))),
    LossTerm("hidden", frozenset({"hidden_states"}),
             lambda plan, s, t, batch: hidden_mse_loss([_token_rows(x, batch) for x in s["hidden_states"]],
                                                       [_token_rows(x, batch) for x in t["hidden_states"]])),
    LossTerm("attn", frozenset({"attentions"}),
             lambda plan, s, t, batch: attention_mse_loss(s["attentions"], t["attentions"], batch["attention_mask"])),
)}
# Outputs that only a teacher can give.
TEACHER_NEEDS = frozenset({"teacher_logits", "teacher_hidden", "hidden_states", "attentions"})


@dataclass(frozen=True)
class LossPlan:
    """The loss weights and what they need computed."""

    weights: Mapping[str, float]  # LOSS_TERMS name -> alpha
    temperature: float
    restrict_ce_to_mask: bool

    @classmethod
    def from_config(cls, loss_cfg) -> LossPlan:
        """The plan of a (schema-checked) `loss` config section."""
        weights = {name: float(loss_cfg[f"alpha_{name}"]) for name in LOSS_TERMS}
        return cls(weights, float(loss_cfg.temperature), bool(loss_cfg.restrict_ce_to_mask))

    def uses(self, name: str) -> bool:
        return self.weights[name] > 0

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(term.needs for name, term in LOSS_TERMS.items() if self.uses(name)))

    @property
    def teacher_logits(self) -> bool:
        return "teacher_logits" in self.needs

    @property
    def student_logits(self) -> bool:
        return "student_logits" in self.needs

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs & TEACHER_NEEDS)

    @property
    def hidden_states(self) -> bool:
        return "hidden_states" in self.needs

    @property
    def attentions(self) -> bool:
        return "attentions" in self.needs

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
    losses = {name: term.compute(plan, student, teacher, batch) for name, term in LOSS_TERMS.items()
              if plan.uses(name)}
    losses["loss"] = sum(plan.weights[name] * value for name, value in losses.items())
    return losses
