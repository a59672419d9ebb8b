"""The steps that make a distillation run ready for the engine, each taking only its own config section: the
inputs of the run (prepare-data, init-student), the checks that the models and data fit together, the batch
arithmetic and budget, the models (the student, the frozen teacher), the optimizer and schedule, and the micro
batches. stages/train.py calls them in order."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from distilbert_cli import artifacts
from distilbert_cli.artifacts import InitStudentFacts, PreparedData
from distilbert_cli.data.prepared import load_prepared
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import attention_projection, max_sequence_length
from distilbert_cli.models.loading import load_frozen_teacher, load_model, load_tokenizer
from distilbert_cli.rundir import Stage
from distilbert_cli.training.batches import StepBatches, StepLayout
from distilbert_cli.training.distiller import MaskedLMRows
from distilbert_cli.training.engine import check_mixed_precision, check_resume
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import MaskedSequences, MaskingSpec, masking_spec, token_probabilities

if TYPE_CHECKING:
    from distilbert_cli.schema import Batch, Masking, Optim, TrainSettings, TrainTeacher

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# teacher.dtype=auto: the teacher's weights in the type its forward pass runs in under train.mixed_precision
AUTO_TEACHER_DTYPES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Inputs:
    """What a distillation run reads: prepare-data's outputs (verified), init-student's model and facts."""

    prepared: PreparedData
    student_dir: Path
    init: InitStudentFacts


@dataclass(frozen=True)
class Corpus:
    """prepare-data's splits, loaded memory-mapped."""

    tokenizer: object  # prepare-data's (the teacher's)
    train: object
    validation: object
    token_counts: np.ndarray
    lengths: np.ndarray  # of every train sequence


def accumulation_steps(batch: Batch, world_size: int) -> int:
    """The accumulation steps that make `batch.global_batch_size` on `world_size` processes."""
    accumulation, remainder = divmod(batch.global_batch_size, batch.micro_batch_size * world_size)
    if remainder or accumulation == 0:
        raise UsageError(f"batch.global_batch_size={batch.global_batch_size} is not a multiple of "
                         f"batch.micro_batch_size={batch.micro_batch_size} x {world_size} process(es)")
    return accumulation


def check_machine(train: TrainSettings, teacher: TrainTeacher) -> None:
    """What the schema cannot know: whether this machine has what the settings need, and the resume checkpoint."""
    check_mixed_precision(train.mixed_precision, "train.mixed_precision")
    check_mixed_precision(teacher.dtype, "teacher.dtype")
    check_resume(train.resume, "train.resume")


def read_inputs(stage: Stage) -> Inputs:
    """The run's complete prepare-data and init-student stages, verified against their digests and recorded."""
    prepared = PreparedData(stage.use_stage(artifacts.PREPARE_DATA))
    init_dir = stage.use_stage(artifacts.INIT_STUDENT)
    return Inputs(prepared, artifacts.InitStudentOutputs(init_dir).model, artifacts.init_student_facts(stage.run))


def load_corpus(prepared: PreparedData) -> Corpus:
    tokenizer = load_tokenizer(str(prepared.tokenizer))
    splits, token_counts = load_prepared(prepared)
    if len(splits["validation"]) == 0:
        raise UsageError(f"prepare-data's validation split is empty: {prepared.path}")
    # One slice, converted from Arrow at once: iterating the column (datasets' lazy Column) decodes row by row, 48 s
    # for 609k sequences (0.4 s this way), hours for a full-size corpus.
    lengths = splits["train"].with_format("numpy", columns=["length"])[:]["length"]
    return Corpus(tokenizer, splits["train"], splits["validation"], token_counts, lengths)


def check_compatible(student_config, teacher_config, teacher_has_mlm_head: bool, plan: LossPlan,
                     data_vocab_size: int, data_max_length: int) -> None:
    """Refuse models and data that cannot be distilled together (teacher_config is None without a teacher)."""
    if data_vocab_size > student_config.vocab_size:
        raise UsageError(f"prepare-data's vocabulary ({data_vocab_size}) is larger than the student's "
                         f"({student_config.vocab_size}): prepare the data with the teacher's tokenizer")
    for role, config in (("student", student_config), ("teacher", teacher_config)):
        if config is not None and (longest := max_sequence_length(config)) is not None and data_max_length > longest:
            raise UsageError(f"prepare-data's sequences reach {data_max_length} tokens, more than the {longest} the "
                             f"{role} takes: prepare the data again with prepare.max_seq_length={longest}")
    if teacher_config is None:
        return
    if plan.teacher_logits and not teacher_has_mlm_head:
        raise UsageError("the teacher has no MLM head, so it has no logits to distill: set loss.alpha_ce=0 and "
                         "loss.alpha_mse=0 (e.g. +experiment=no_ce keeps the cos and mlm terms)")
    if student_config.vocab_size != teacher_config.vocab_size:
        raise UsageError(f"teacher and student vocabularies differ ({teacher_config.vocab_size} vs "
                         f"{student_config.vocab_size} tokens): distill a student built from this teacher")
    if plan.uses("cos") and student_config.hidden_size != teacher_config.hidden_size:
        raise UsageError(f"loss.alpha_cos needs equal hidden sizes (student {student_config.hidden_size}, teacher "
                         f"{teacher_config.hidden_size}); set loss.alpha_cos=0 (alpha_hidden learns a projection)")
    student_heads, teacher_heads = student_config.num_attention_heads, teacher_config.num_attention_heads
    for name in ("attn", "attn_scores"):
        if plan.uses(name) and student_heads != teacher_heads:
            raise UsageError(f"loss.alpha_{name} needs equal head counts (student {student_heads}, teacher "
                             f"{teacher_heads}); loss.alpha_attn_kl matches fewer student heads to groups of "
                             "teacher heads")
    if plan.uses("attn_kl") and teacher_heads % student_heads:
        raise UsageError(f"loss.alpha_attn_kl: the student's {student_heads} attention heads must divide the "
                         f"teacher's {teacher_heads} (each student head learns the mean of a group of teacher "
                         "heads); set student.num_attention_heads at init-student")
    layers = teacher_config.num_hidden_layers
    if plan.teacher_layer is not None and not -layers <= plan.teacher_layer < layers:
        raise UsageError(f"loss.teacher_layer={plan.teacher_layer}: the teacher has layers 0..{layers - 1} "
                         "(negative counts from the top: -1 is the last)")


def check_attention_projections(student: nn.Module, teacher: nn.Module, plan: LossPlan,
                                pairs: list[tuple[int, int]]) -> None:
    """The modules the attention and relation losses hook must be in the family table, and the relation heads
    (the same number for both models) must divide each model's query, key or value width."""
    (student_layer, teacher_layer), heads = pairs[0], plan.relation_heads or teacher.config.num_attention_heads
    for kind in plan.projections:
        widths = (attention_projection(student, student_layer, kind).out_features,
                  attention_projection(teacher, teacher_layer, kind).out_features)
        if plan.uses(f"{kind}_relation") and (widths[0] % heads or widths[1] % heads):
            raise UsageError(f"loss.alpha_{kind}_relation: {heads} relation heads (loss.relation_heads) do not "
                             f"divide the {kind} width of the student ({widths[0]}) and the teacher ({widths[1]})")


def step_layout(batch: Batch, accumulation: int, world_size: int, sequences: int) -> StepLayout:
    """global batch = micro batch x accumulation x world size; an epoch is the steps the train split fills."""
    layout = StepLayout.of(sequences, batch.micro_batch_size, accumulation, world_size)
    if layout.steps_per_epoch == 0:
        raise UsageError(f"prepare-data's train split has {sequences} sequences, fewer than one global batch "
                         f"of {batch.global_batch_size}")
    return layout


def total_steps(train: TrainSettings, steps_per_epoch: int, mean_tokens_per_step: float) -> int:
    """The run length in optimizer steps, from whichever budget is set."""
    if train.max_steps is not None:
        return train.max_steps
    if train.epochs is not None:
        return max(1, round(train.epochs * steps_per_epoch))
    return max(1, math.ceil(train.max_tokens / mean_tokens_per_step))


def load_student(student_dir: Path, train: TrainSettings, trust_remote_code: bool) -> nn.Module:
    """init-student's masked LM in fp32 (autocast gives the mixed precision), gradient checkpointing if asked."""
    from transformers import AutoModelForMaskedLM

    student = load_model(AutoModelForMaskedLM, str(student_dir), trust_remote_code, role="student",
                         attn_implementation=train.attn_implementation, dtype=torch.float32)
    if train.gradient_checkpointing:
        if not student.supports_gradient_checkpointing:
            raise UsageError(f"train.gradient_checkpointing: {type(student).__name__} does not support it")
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return student


def load_teacher(name: str, teacher: TrainTeacher, train: TrainSettings, has_mlm_head: bool,
                 trust_remote_code: bool) -> nn.Module:
    """The frozen teacher, its weights in teacher.dtype (auto: the type of train.mixed_precision)."""
    dtype = teacher.dtype if teacher.dtype != "auto" else AUTO_TEACHER_DTYPES[train.mixed_precision]
    return load_frozen_teacher(name, has_mlm_head, trust_remote_code, attn_implementation=train.attn_implementation,
                               dtype=TORCH_DTYPES[dtype])


def projections(plan: LossPlan, student_width: int, teacher_width: int) -> nn.ModuleDict:
    """TinyBERT's W_e (embedding output) and W_h (layer outputs) to the teacher's width, dropped after training."""
    return nn.ModuleDict({name: nn.Linear(student_width, teacher_width)
                          for name, used in (("embed", plan.embeddings), ("hidden", plan.hidden_states))
                          if used and student_width != teacher_width})


def optimizer_and_schedule(optim: Optim, parameters, steps: int, fused: bool):
    """AdamW and a linear warmup over optim.warmup_fraction of the steps, then linear decay to 0."""
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=fused)
    return optimizer, get_linear_schedule_with_warmup(optimizer, math.ceil(optim.warmup_fraction * steps), steps)


def masking_specs(masking: Masking, validation_exponent: float, corpus: Corpus,
                  vocab_size: int) -> tuple[MaskingSpec, MaskingSpec]:
    """The masking of the training batches, and the same with the validation's smoothing exponent."""
    spec = masking_spec(masking, corpus.tokenizer, corpus.token_counts, vocab_size)
    return spec, replace(spec, token_weights=token_probabilities(
        corpus.token_counts, corpus.tokenizer.all_special_ids, validation_exponent))


def micro_batches(corpus: Corpus, spec: MaskingSpec, layout: StepLayout, batch: Batch, seed: int, rank: int,
                  start_step: int, end_step: int) -> StepBatches:
    """This process's masked, length-grouped micro batches from `start_step`."""
    return StepBatches(corpus.lengths, layout, MaskedSequences(corpus.train, spec), seed, batch.group_window, rank,
                       start_step, end_step)


def wrap(student: nn.Module, teacher: nn.Module | None, plan: LossPlan) -> tuple[MaskedLMRows, MaskedLMRows | None]:
    """The student (with its projections to the teacher's width) and the teacher as MaskedLMRows: vocabulary logits
    only at the rows a loss needs, the layer outputs and attention projections the plan asks for."""
    width = teacher.config.hidden_size if teacher is not None else student.config.hidden_size
    student_rows = MaskedLMRows(student, projections(plan, student.config.hidden_size, width))
    return student_rows, MaskedLMRows(teacher) if teacher is not None else None
