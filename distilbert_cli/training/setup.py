"""Everything the distillation loop needs, built and checked before the first step: the batch arithmetic and
budget, the data, the models (student, frozen teacher), optimizer and schedule, and the resume point."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from distilbert_cli import artifacts
from distilbert_cli.artifacts import DistillOutputs, PreparedData
from distilbert_cli.data.prepared import load_prepared
from distilbert_cli.errors import UsageError
from distilbert_cli.models.families import attention_projection
from distilbert_cli.models.loading import load_config, load_frozen_teacher, load_model, load_tokenizer
from distilbert_cli.rundir import Stage
from distilbert_cli.training.checkpoint import (
    TrainerState,
    clear_earlier_attempt,
    load_checkpoint,
    read_checkpoint,
    resume_checkpoint,
)
from distilbert_cli.training.distiller import MaskedLMRows, layer_pairs
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.masking import (
    DistillationBatches,
    MaskingSpec,
    StepLayout,
    masking_spec,
    token_probabilities,
)
from distilbert_cli.training.progressive import TrainingStage, stages

log = logging.getLogger(__name__)

TEACHER_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Distillation:
    """A distillation run ready to train: what the loop reads and what validation reuses afterwards."""

    layout: StepLayout
    total_steps: int
    student: nn.Module  # MaskedLMRows over the student (and the projections to the teacher's width), prepared
    teacher: nn.Module | None  # MaskedLMRows over the frozen teacher; None when no loss needs it
    teacher_has_mlm_head: bool
    stages: list[TrainingStage]  # the loss plan and layer pairs of each stage: one, or the progressive schedule
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: DistillationBatches
    state: TrainerState  # where training starts (0, or the resumed checkpoint's)
    resume_state: dict  # the settings a resume must match, saved with each checkpoint
    checkpoint: Path | None
    tokenizer: object  # the student's (init-student's), saved with the final model
    validation: object  # prepare-data's validation split
    validation_spec: MaskingSpec  # the masking of the training batches, with validation.smoothing_exponent

    @property
    def accumulation(self) -> int:
        return self.layout.accumulation


def accumulation_steps(cfg: DictConfig, world_size: int) -> int:
    """The accumulation steps for `world_size` processes, after the checks the schema cannot make (it does not
    know the processes, the machine or the files)."""
    batch, train = cfg.batch, cfg.train
    accumulation, remainder = divmod(batch.global_batch_size, batch.micro_batch_size * world_size)
    if remainder or accumulation == 0:
        raise UsageError(f"batch.global_batch_size={batch.global_batch_size} is not a multiple of "
                         f"batch.micro_batch_size={batch.micro_batch_size} x {world_size} process(es)")
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.mixed_precision=fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    if train.resume not in ("never", "auto") and not (Path(train.resume) / "trainer_state.json").is_file():
        raise UsageError(f"train.resume must be never, auto or a checkpoint directory; {train.resume!r} "
                         "has no trainer_state.json")
    return accumulation


def total_steps(train_cfg: DictConfig, steps_per_epoch: int, mean_tokens_per_step: float) -> int:
    """The run length in optimizer steps, from whichever budget is set."""
    if train_cfg.max_steps is not None:
        return int(train_cfg.max_steps)
    if train_cfg.epochs is not None:
        return max(1, round(train_cfg.epochs * steps_per_epoch))
    return max(1, math.ceil(train_cfg.max_tokens / mean_tokens_per_step))


def check_compatible(student_config, teacher_config, teacher_has_mlm_head: bool, plan: LossPlan,
                     data_vocab_size: int) -> None:
    """Refuse models and data that cannot be distilled together (teacher_config is None without a teacher)."""
    if data_vocab_size > student_config.vocab_size:
        raise UsageError(f"prepare-data's vocabulary ({data_vocab_size}) is larger than the student's "
                         f"({student_config.vocab_size}): prepare the data with the teacher's tokenizer")
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


def open_tracker(cfg: DictConfig, stage_dir: Path, is_main: bool):
    """A wandb run (files under the stage folder), or None for logger=none and on non-main processes."""
    if cfg.logger.name == "none" or not is_main:
        return None
    if cfg.logger.name != "wandb":
        raise UsageError(f"unknown logger {cfg.logger.name!r} (wandb or none)")
    import wandb

    return wandb.init(project=cfg.logger.project, mode=cfg.logger.mode, dir=str(stage_dir),
                      config=cfg.model_dump(mode="json"))


def build(cfg: DictConfig, stage: Stage, accelerator, plan: LossPlan, accumulation: int) -> Distillation:
    """Read the inputs, check them against each other, then load the models and restore the resume point."""
    from transformers import AutoModelForMaskedLM, get_linear_schedule_with_warmup

    prepared = PreparedData(stage.use_stage(artifacts.PREPARE_DATA))
    init_dir = stage.use_stage(artifacts.INIT_STUDENT)
    init = artifacts.init_student_facts(stage.run)
    out = DistillOutputs(stage.path)
    checkpoint = resume_checkpoint(cfg.train.resume, out)
    if checkpoint is None and accelerator.is_main_process:
        clear_earlier_attempt(out, cfg.train.resume)
    accelerator.wait_for_everyone()

    # Data, and the configs of the models: every check before anything heavy is loaded
    trust = cfg.trust_remote_code
    student_dir = str(artifacts.InitStudentOutputs(init_dir).model)
    data_tokenizer = load_tokenizer(str(prepared.tokenizer))
    splits, token_counts = load_prepared(prepared)
    train_split, validation_split = splits["train"], splits["validation"]
    if len(validation_split) == 0:
        raise UsageError(f"prepare-data's validation split is empty: {prepared.path}")
    # One slice, converted from Arrow at once: iterating the column (datasets' lazy Column) decodes row by row, 48 s
    # for 609k sequences (0.4 s this way), hours for a full-size corpus.
    lengths = train_split.with_format("numpy", columns=["length"])[:]["length"]
    student_config = load_config(student_dir, trust, role="student")
    teacher_name = teacher_config = None
    if plan.needs_teacher:  # mlm_only loads no teacher at all
        teacher_name = cfg.teacher.name_or_path or init.teacher
        teacher_config = load_config(teacher_name, trust, role="teacher")
    check_compatible(student_config, teacher_config, init.teacher_has_mlm_head, plan, len(data_tokenizer))

    # Schedule: global = micro x accumulation x world size; the budget in optimizer steps
    world_size = accelerator.num_processes
    layout = StepLayout(cfg.batch.micro_batch_size, accumulation, world_size,
                        steps_per_epoch=len(lengths) // cfg.batch.micro_batch_size // (accumulation * world_size))
    if layout.steps_per_epoch == 0:
        raise UsageError(f"prepare-data's train split has {len(lengths)} sequences, fewer than one global batch "
                         f"of {cfg.batch.global_batch_size}")
    steps = total_steps(cfg.train, layout.steps_per_epoch, float(lengths.mean()) * cfg.batch.global_batch_size)
    warmup_steps = math.ceil(cfg.optim.warmup_fraction * steps)
    log.info("effective batch %d sequences = micro %d x accumulation %d x %d process(es); %d steps "
             "(%.2f epochs of %d), warmup %d; losses %s", cfg.batch.global_batch_size, layout.micro_batch_size,
             accumulation, world_size, steps, steps / layout.steps_per_epoch, layout.steps_per_epoch,
             warmup_steps, {k: v for k, v in plan.weights.items() if v})

    pairs = layer_pairs(student_config.num_hidden_layers, teacher_config.num_hidden_layers, init.layer_map,
                        plan.teacher_layer) if teacher_config is not None else []
    run_stages = stages(plan, pairs, cfg.train.progressive_transfer, steps, cfg.train.head_only_steps)

    # What must not change across a resume
    resume_state = {
        "seed": cfg.seed, "loss": cfg.loss.model_dump(), "masking": cfg.masking.model_dump(),
        "optim": cfg.optim.model_dump(), "mixed_precision": cfg.train.mixed_precision,
        "progressive_transfer": cfg.train.progressive_transfer, "head_only_steps": cfg.train.head_only_steps,
        "batch": cfg.batch.model_dump(include={"global_batch_size", "micro_batch_size", "group_window"}),
        "world_size": world_size, "total_steps": steps,
        "inputs": {entry["stage"]: entry["fingerprint"] for entry in stage.inputs if "stage" in entry},
    }
    state = read_checkpoint(checkpoint, resume_state) if checkpoint is not None else TrainerState()

    # Models
    attn_implementation = cfg.train.attn_implementation  # attention maps come from hooks, not the kernel
    student = load_model(AutoModelForMaskedLM, student_dir, trust, role="student",
                         attn_implementation=attn_implementation, dtype=torch.float32)
    teacher = None
    if teacher_name is not None:
        stage.use_model(teacher_name, role="teacher")
        teacher = load_frozen_teacher(teacher_name, init.teacher_has_mlm_head, trust,
                                      attn_implementation=attn_implementation,
                                      dtype=TEACHER_DTYPES[cfg.train.mixed_precision])
    spec = masking_spec(cfg.masking, data_tokenizer, token_counts, student.config.vocab_size)
    validation_spec = replace(spec, token_weights=token_probabilities(
        token_counts, data_tokenizer.all_special_ids, cfg.validation.smoothing_exponent))
    if teacher is not None:
        check_attention_projections(student, teacher, plan, pairs)
    # TinyBERT's W_e (embedding output) and W_h (layer outputs) to the teacher's width, dropped after training
    projections = nn.ModuleDict({
        name: nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
        for name, used in (("embed", plan.embeddings), ("hidden", plan.hidden_states))
        if used and student.config.hidden_size != teacher.config.hidden_size})
    distiller = MaskedLMRows(student, projections)
    teacher_rows = MaskedLMRows(teacher).to(accelerator.device) if teacher is not None else None

    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=accelerator.device.type == "cuda")
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, steps)
    if cfg.train.compile:
        distiller.compile(dynamic=True)
        if teacher_rows is not None:
            teacher_rows.compile(dynamic=True)
    distiller, optimizer, scheduler = accelerator.prepare(distiller, optimizer, scheduler)
    if checkpoint is not None:
        load_checkpoint(checkpoint, accelerator, distiller, optimizer, scheduler)
        log.info("resuming from %s at step %d", checkpoint, state.step)
    stage.update(world_size=world_size, accumulation=accumulation, total_steps=steps, warmup_steps=warmup_steps,
                 resumed_from=str(checkpoint) if checkpoint else None, layer_pairs=pairs,
                 stages=[{"name": s.name, "end_step": s.end, "losses": s.plan.used} for s in run_stages])

    batches = DistillationBatches(train_split, lengths, layout, spec, cfg.seed, cfg.batch.group_window,
                                  accelerator.process_index, state.step, steps)
    return Distillation(layout, steps, distiller, teacher_rows, init.teacher_has_mlm_head, run_stages, optimizer,
                        scheduler, batches, state, resume_state, checkpoint, load_tokenizer(student_dir, trust),
                        validation_split, validation_spec)


def data_loader(run: Distillation, num_workers: int, pin_memory: bool):
    """The process's micro batches in order (workers pad and mask ahead of the model)."""
    return iter(DataLoader(run.batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory))
