"""Task-specific distillation losses (distil task-distill) as pure functions, and the plan of their weights.

total = alpha_mse * L_mse + alpha_soft * L_soft + alpha_hard * L_hard over a batch of the transfer set:
- L_mse (Tang et al. 2019): squared error between the student's and the teacher's logits, summed over the
  outputs, averaged over the examples (for a regression, the squared error of the score);
- L_soft (Hinton et al. 2015; TinyBERT's prediction layer): the soft cross-entropy to the teacher's distribution
  at temperature T, times T^2 (computed as the KL divergence, which differs from it by the teacher's entropy, a
  constant: the same gradients, and 0 when the student matches);
- L_hard: the task loss on the gold labels (cross-entropy, or squared error for a regression), over the batch's
  original examples only: an augmented copy has no label of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distilbert_cli.training.losses import logits_mse_loss, soft_target_loss


def hard_label_loss(student_logits: Tensor, labels: Tensor, original: Tensor, regression: bool) -> Tensor:
    """L_hard: cross-entropy on class ids (squared error on scores) averaged over the rows marked `original`;
    0 for a batch without one."""
    if not bool(original.any()):
        return student_logits.sum() * 0.0  # keeps the graph (and the device) of the batch
    logits, labels = student_logits[original].float(), labels[original]
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


@dataclass(frozen=True)
class TaskLossTerm:
    name: str  # config key task_distill.loss.alpha_<name>, metrics key loss_<name>
    uses_teacher: bool  # needs the teacher's outputs on the transfer set
    classes_only: bool  # needs a distribution over classes (not defined for a regression)
    compute: Callable[[TaskLossPlan, Tensor, Mapping[str, Tensor]], Tensor]  # (plan, student logits, batch)


TASK_LOSS_TERMS: dict[str, TaskLossTerm] = {term.name: term for term in (
    TaskLossTerm("mse", True, False, lambda plan, s, batch: logits_mse_loss(s, batch["teacher_logits"])),
    TaskLossTerm("soft", True, True,
                 lambda plan, s, batch: soft_target_loss(s, batch["teacher_logits"], plan.temperature)),
    TaskLossTerm("hard", False, False,
                 lambda plan, s, batch: hard_label_loss(s, batch["labels"], ~batch["augmented"], plan.regression)),
)}


@dataclass(frozen=True)
class TaskLossPlan:
    weights: Mapping[str, float]  # TASK_LOSS_TERMS name -> alpha
    temperature: float
    regression: bool

    @classmethod
    def from_config(cls, loss_cfg, regression: bool) -> TaskLossPlan:
        """The plan of a (schema-checked) `task_distill.loss` section for a classification or regression task."""
        return cls({name: getattr(loss_cfg, f"alpha_{name}") for name in TASK_LOSS_TERMS}, loss_cfg.temperature,
                   regression)

    @property
    def used(self) -> list[str]:
        return [name for name, weight in self.weights.items() if weight > 0]

    @property
    def uses_teacher(self) -> bool:
        return any(TASK_LOSS_TERMS[name].uses_teacher for name in self.used)

    @property
    def classes_only(self) -> list[str]:
        """The terms used that need class probabilities."""
        return [name for name in self.used if TASK_LOSS_TERMS[name].classes_only]


def compute_task_losses(plan: TaskLossPlan, student_logits: Tensor, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every term the plan uses and their weighted sum as "loss". `batch` holds "teacher_logits" (when a term
    uses the teacher), "labels" and "augmented" (True for an augmented copy)."""
    losses = {name: TASK_LOSS_TERMS[name].compute(plan, student_logits, batch) for name in plan.used}
    losses["loss"] = torch.stack([plan.weights[name] * value for name, value in losses.items()]).sum()
    return losses
