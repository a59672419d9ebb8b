"""The run's steps in stages: progressive knowledge transfer (MobileBERT, Sun et al. 2020), or a fresh MLM head
trained alone first.

Without either (`train.progressive_transfer=0`, `train.head_only_steps=0`) a run is one stage: every loss term on
every layer pair, every parameter trained. With `train.head_only_steps=N` the first N steps train the MLM head
alone, the encoder frozen (a head that a headless teacher's encoder got fresh learns to read it before the encoder
moves), then everything trains. With progressive transfer, the first `progressive_transfer` share of the steps is
split equally into one stage per student layer: stage l trains layer l alone on the layer-wise loss terms of its own
pair, with the layers below it frozen (stage 0 also trains the embeddings, which here have no teacher counterpart to
copy); the last stage trains the whole student on the other terms (MobileBERT's pre-training distillation: MLM +
logit KD). A stage follows from the step alone, so a resumed run re-enters the stage it stopped in.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import family_of
from distilbert_cli.training.losses import LOSS_TERMS, LossPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingStage:
    name: str | None  # metrics.jsonl's "stage" (None: a run without stages)
    end: int  # the step after its last one
    plan: LossPlan
    pairs: list[tuple[int, int]]
    layer: int | None  # the only student layer trained (None: every parameter, or the head alone)
    head_only: bool = False  # the MLM head alone (the encoder frozen)


def stages(plan: LossPlan, pairs: Sequence[tuple[int, int]], share: float, total_steps: int,
           head_only_steps: int = 0) -> list[TrainingStage]:
    """The run's stages, in order (see the module docstring); UsageError where the schedule cannot be kept."""
    if head_only_steps:
        if share:
            raise UsageError("train.head_only_steps and train.progressive_transfer are two schedules: set one")
        if not plan.student_logits:
            raise UsageError(f"train.head_only_steps trains the MLM head alone, which no term of the loss uses "
                             f"({', '.join(plan.used)}): add loss.alpha_mlm or loss.alpha_ce")
        if head_only_steps >= total_steps:
            raise UsageError(f"train.head_only_steps={head_only_steps} leaves none of the {total_steps} steps to "
                             "the whole model")
        return [TrainingStage("MLM head only", head_only_steps, plan, list(pairs), None, head_only=True),
                TrainingStage("whole model", total_steps, plan, list(pairs), None)]
    if share == 0:
        return [TrainingStage(None, total_steps, plan, list(pairs), None)]
    layer_plan, final_plan = plan.only(layerwise=True), plan.only(layerwise=False)
    layerwise = [f"loss.alpha_{name}" for name, term in LOSS_TERMS.items() if term.layerwise]
    if not layer_plan.used or not final_plan.used:
        raise UsageError(f"train.progressive_transfer needs a layer-wise term ({', '.join(layerwise)}) for the "
                         "layer stages and another term (e.g. loss.alpha_mlm) for the last stage; the loss uses "
                         f"{', '.join(plan.used)}")
    if plan.teacher_layer is not None:
        raise UsageError("train.progressive_transfer trains every student layer in turn: it needs every layer "
                         "paired (loss.teacher_layer=null)")
    per_layer = int(share * total_steps) // len(pairs)  # share < 1 leaves the last stage a step or more
    if per_layer == 0:
        raise UsageError(f"train.progressive_transfer={share} of {total_steps} steps leaves no step per layer "
                         f"({len(pairs)} layers): raise the budget or the share")
    layer_stages = [TrainingStage(f"layer {s}", (s + 1) * per_layer, layer_plan, [(s, t)], s) for s, t in pairs]
    return [*layer_stages, TrainingStage("pretraining distillation", total_steps, final_plan, list(pairs), None)]


def enter(run_stages: Sequence[TrainingStage], step: int, model: nn.Module) -> TrainingStage:
    """The stage of `step`, with `model`'s parameters (a masked LM) frozen or trainable as that stage says."""
    stage = next(s for s in run_stages if step < s.end)
    if stage.name is not None:
        log.info("stage %s: steps %d-%d, losses %s", stage.name, step + 1, stage.end, stage.plan.used)
    pattern = family_of(model.config).layer_pattern()
    base = f"{model.base_model_prefix}."
    for name, parameter in model.named_parameters():
        match = pattern.match(name)
        if stage.head_only:
            trainable = not name.startswith(base)
        elif stage.layer is None:
            trainable = True
        elif match:
            trainable = int(match.group(1)) == stage.layer
        else:  # the embeddings train with the first layer; the MLM head only in the last stage
            trainable = stage.layer == 0 and name.startswith(base)
        parameter.requires_grad_(trainable)
    return stage
