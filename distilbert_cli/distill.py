"""`distil train` (alias `distill`): distill the frozen teacher into the student, into <run_dir>/distill/.

    distil train +experiment=triple_loss run_dir=runs/exp1
    accelerate launch --config_file scripts/accelerate_8gpu.yaml -m distilbert_cli train +experiment=triple_loss \
        run_dir=runs/exp1

Reads prepare-data/ (tokenized train and validation splits, token counts) and init-student/ (the student,
and which teacher it came from). Writes `final/` (the distilled student and its tokenizer),
`metrics.jsonl`, `validation.json` and `checkpoints/step-N/` (model, optimizer, scheduler and the data
position; `train.resume=auto` continues from the latest).

Every micro batch's randomness (its masks, the student's dropout) derives from (seed, micro-batch
number) and the data order from (seed, epoch), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from distilbert_cli import prepare_data
from distilbert_cli.errors import UsageError
from distilbert_cli.logs import distributed_state
from distilbert_cli.losses import LOSS_NAMES, LossPlan, compute_losses
from distilbert_cli.masking import (
    DistillationBatches,
    MaskingSpec,
    StepLayout,
    collate_masked,
    derived_seed,
    token_probabilities,
)
from distilbert_cli.models import load_config, load_model, load_tokenizer
from distilbert_cli.rundir import open_stage, read_manifest, recorded_teacher, require_complete, write_json_atomic

log = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
TEACHER_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# derived_seed(seed, micro batch) seeds a micro batch's masks (masking.py); this extra part seeds its dropout.
DROPOUT_STREAM = 1


def mlm_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function from last hidden states to vocabulary logits of a BERT-family masked LM, or None for
    a headless encoder. A plain function, so the head's weights stay registered once (in `model`)."""
    if hasattr(model, "cls"):  # BERT
        return lambda hidden: model.cls(hidden)
    if hasattr(model, "lm_head"):  # RoBERTa, XLM-R, CamemBERT
        return lambda hidden: model.lm_head(hidden)
    if hasattr(model, "vocab_projector"):  # DistilBERT
        return lambda hidden: model.vocab_projector(
            model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))
    return None


class MaskedLMRows(nn.Module):
    """A BERT-family model that computes vocabulary logits only at the rows a loss needs.

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


def layer_pairs(student_layers: int, teacher_layers: int, layer_map: Sequence[int] | None) -> list[tuple[int, int]]:
    """(student, teacher) layer pairs for L_hidden / L_attn: student layer i with the teacher layer it was
    initialised from (init-student's layer_map), or the uniform TinyBERT map when there is none."""
    if layer_map is None or len(layer_map) != student_layers or None in layer_map:  # None: a random layer
        layer_map = [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]
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


def validation_batches(dataset, spec: MaskingSpec, max_sequences: int, batch_size: int, seed: int) -> list[dict]:
    """Fixed masked batches of the validation split: the first `max_sequences` sequences sorted by length,
    masks drawn from (seed, batch number), so every model evaluated on a run sees the same targets."""
    count = min(max_sequences, len(dataset))
    lengths = np.asarray(dataset.with_format("numpy")["length"][:count])
    order = np.argsort(lengths, kind="stable")
    batches = []
    for number, start in enumerate(range(0, count, batch_size)):
        sequences = dataset[order[start:start + batch_size].tolist()]["input_ids"]
        batches.append(collate_masked(sequences, spec, torch.Generator().manual_seed(derived_seed(seed, number))))
    return batches


@torch.no_grad()
def evaluate_mlm(model: nn.Module, batches: Iterable[dict], device: torch.device,
                 autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """MLM loss (mean cross-entropy over all targets) and accuracy of a masked LM on masked `batches`."""
    was_training = model.training
    model.eval()
    rows_model = MaskedLMRows(model)
    loss_sum, correct, targets = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            logits = rows_model(batch["input_ids"], batch["attention_mask"], batch["target_rows"])["logits"].float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["target_labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["target_labels"]).sum())
        targets += batch["target_labels"].numel()
    model.train(was_training)
    return {"mlm_loss": loss_sum / targets, "mlm_accuracy": correct / targets}


def validate_masked_lm(model: nn.Module, run_dir: str | Path, cfg: DictConfig, device: str | torch.device = "cpu",
                       autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, float]:
    """Held-out MLM loss and accuracy of a masked LM (e.g. the initialised student, as a baseline) on the run's
    validation split, with the masks of distill's validation.json (`cfg`: a train config, for its `masking`
    and `validation` sections)."""
    prepared_dir = require_complete(run_dir, "prepare-data")
    tokenizer = load_tokenizer(str(prepared_dir / prepare_data.TOKENIZER_DIR))
    splits, token_counts = prepare_data.load_prepared(run_dir)
    spec = masking_spec(cfg.masking, tokenizer, token_counts, model.config.vocab_size)
    batches = validation_batches(splits["validation"], spec, cfg.validation.max_sequences, cfg.validation.batch_size,
                                 cfg.validation.seed)
    return evaluate_mlm(model, batches, torch.device(device), autocast)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def masking_spec(masking_cfg: DictConfig, tokenizer, token_counts: np.ndarray, vocab_size: int) -> MaskingSpec:
    return MaskingSpec(
        token_weights=token_probabilities(token_counts, tokenizer.all_special_ids, masking_cfg.smoothing_exponent),
        mlm_probability=masking_cfg.mlm_probability,
        mask_fraction=masking_cfg.mask_fraction,
        random_fraction=masking_cfg.random_fraction,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
    )


def check_config(cfg: DictConfig, world_size: int) -> int:
    """Validate the values a user can get wrong before anything heavy; return the accumulation steps."""
    batch, train, masking = cfg.batch, cfg.train, cfg.masking
    if batch.micro_batch_size < 1 or batch.global_batch_size < 1 or batch.group_window < 1:
        raise UsageError("batch.global_batch_size, batch.micro_batch_size and batch.group_window must be >= 1")
    accumulation, remainder = divmod(batch.global_batch_size, batch.micro_batch_size * world_size)
    if remainder or accumulation == 0:
        raise UsageError(f"batch.global_batch_size={batch.global_batch_size} is not a multiple of "
                         f"batch.micro_batch_size={batch.micro_batch_size} x {world_size} process(es)")
    budgets = {k: train[k] for k in ("max_steps", "epochs", "max_tokens") if train[k] is not None}
    if len(budgets) != 1 or next(iter(budgets.values())) <= 0:
        raise UsageError(f"set exactly one positive training budget among train.max_steps, train.epochs, "
                         f"train.max_tokens (the others null); got {budgets or 'none'}")
    if train.mixed_precision not in MIXED_PRECISION:
        raise UsageError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                         f"got {train.mixed_precision!r}")
    if train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("train.mixed_precision=fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    if not 0 < masking.mlm_probability <= 1:
        raise UsageError(f"masking.mlm_probability must be in (0, 1], got {masking.mlm_probability}")
    if masking.mask_fraction < 0 or masking.random_fraction < 0 or masking.mask_fraction + masking.random_fraction > 1:
        raise UsageError("masking.mask_fraction and masking.random_fraction must be >= 0 and sum to <= 1")
    if train.log_every < 1 or train.checkpoint_every < 1 or train.keep_last < 1 or train.max_bad_steps < 0:
        raise UsageError("train.log_every, train.checkpoint_every and train.keep_last must be >= 1, "
                         "train.max_bad_steps >= 0")
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


def checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints (a partial one still has its temporary name), oldest first."""
    found = [p for p in (stage_dir / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resume_checkpoint(resume: str, stage_dir: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(stage_dir)
        return found[-1] if found else None
    return Path(resume)


def check_resumable(saved: dict, current: dict, checkpoint: Path) -> None:
    """Keys that change the maths (loss, masking, batch, optimiser, schedule, data, seed) must match."""
    saved_flat = _flatten(saved)
    current_flat = _flatten(current)
    differing = sorted(k for k in saved_flat.keys() | current_flat.keys() if saved_flat.get(k) != current_flat.get(k))
    if differing:
        changes = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in differing)
        raise UsageError(f"cannot resume from {checkpoint}: settings differ from the checkpoint ({changes}); "
                         "restore them or pass train.resume=never to start over")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_checkpoint(accelerator, stage_dir: Path, step: int, trainer_state: dict, keep_last: int) -> None:
    """Model, optimizer, scheduler and RNG states plus trainer_state.json (step = the data position) under a
    temporary name, renamed to checkpoints/step-N once complete; only the last `keep_last` are kept."""
    final = stage_dir / "checkpoints" / f"step-{step}"
    tmp = final.with_name(f".tmp-step-{step}")
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / "trainer_state.json", trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(stage_dir)[:-keep_last]:
            shutil.rmtree(old)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()


def open_tracker(logger_cfg: DictConfig, cfg: DictConfig, stage_dir: Path, is_main: bool):
    """A wandb run (files under the stage folder), or None for logger=none and on non-main processes."""
    if logger_cfg.name == "none" or not is_main:
        return None
    if logger_cfg.name != "wandb":
        raise UsageError(f"unknown logger {logger_cfg.name!r} (wandb or none)")
    import wandb

    return wandb.init(project=logger_cfg.project, mode=logger_cfg.mode, dir=str(stage_dir),
                      config=OmegaConf.to_container(cfg, resolve=True))


def load_teacher(name_or_path: str, has_mlm_head: bool, trust_remote_code: bool, attn_implementation: str,
                 dtype: torch.dtype) -> nn.Module:
    """The frozen teacher in eval mode: a masked LM, or a plain encoder when its checkpoint has no MLM head."""
    from transformers import AutoModel, AutoModelForMaskedLM

    teacher = load_model(AutoModelForMaskedLM if has_mlm_head else AutoModel, name_or_path, trust_remote_code,
                         role="teacher", attn_implementation=attn_implementation, dtype=dtype)
    teacher.eval().requires_grad_(False)
    return teacher


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
    if plan.attentions and student_config.num_attention_heads != teacher_config.num_attention_heads:
        raise UsageError(f"loss.alpha_attn needs equal head counts (student {student_config.num_attention_heads}, "
                         f"teacher {teacher_config.num_attention_heads})")


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import AutoModelForMaskedLM, get_linear_schedule_with_warmup

    plan = LossPlan.from_config(cfg.loss)
    world_size = distributed_state().num_processes
    accumulation = check_config(cfg, world_size)
    for stage_name in ("prepare-data", "init-student"):  # a missing input leaves no distill stage behind
        require_complete(cfg.run_dir, stage_name)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    # DDP must not wait for gradients of a head that no loss uses.
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=accumulation,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=not plan.student_logits)])
    set_seed(cfg.seed, deterministic=cfg.train.deterministic)

    with open_stage(cfg, "distill", overrides, keep_partial=True) as stage:
        prepared_dir = stage.use_stage(cfg.run_dir, "prepare-data")
        init_dir = stage.use_stage(cfg.run_dir, "init-student")
        init_manifest = read_manifest(init_dir)
        checkpoint = resume_checkpoint(cfg.train.resume, stage.path)
        if checkpoint is None and accelerator.is_main_process:
            for leftover in ("checkpoints", "final", "metrics.jsonl"):  # of an earlier, interrupted attempt
                path = stage.path / leftover
                if path.exists():
                    log.warning("train.resume=%s: removing %s of an earlier attempt", cfg.train.resume, path)
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        accelerator.wait_for_everyone()

        # Data, and the configs of the models: every check before anything heavy is loaded
        tokenizer = load_tokenizer(str(prepared_dir / prepare_data.TOKENIZER_DIR))
        splits, token_counts = prepare_data.load_prepared(cfg.run_dir)
        train_split, validation_split = splits["train"], splits["validation"]
        if len(validation_split) == 0:
            raise UsageError(f"prepare-data's validation split is empty: {prepared_dir}")
        lengths = np.asarray(train_split.with_format("numpy")["length"])
        student_dir, trust_remote_code = str(init_dir / "model"), cfg.teacher.trust_remote_code
        student_config = load_config(student_dir, trust_remote_code, role="student")
        teacher_name = teacher_config = None
        if plan.needs_teacher:  # mlm_only loads no teacher at all
            teacher_name = cfg.teacher.name_or_path or recorded_teacher(cfg.run_dir)
            teacher_config = load_config(teacher_name, trust_remote_code, role="teacher")
        teacher_has_mlm_head = init_manifest["teacher_has_mlm_head"]
        check_compatible(student_config, teacher_config, teacher_has_mlm_head, plan, len(tokenizer))

        # Schedule: global = micro x accumulation x world size; the budget in optimizer steps
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

        # What must not change across a resume
        resume_state = {
            "seed": cfg.seed, "loss": OmegaConf.to_container(cfg.loss), "masking": OmegaConf.to_container(cfg.masking),
            "optim": OmegaConf.to_container(cfg.optim), "mixed_precision": cfg.train.mixed_precision,
            "batch": {k: cfg.batch[k] for k in ("global_batch_size", "micro_batch_size", "group_window")},
            "world_size": world_size, "total_steps": steps,
            "inputs": {entry["stage"]: entry["fingerprint"] for entry in stage.inputs if "stage" in entry},
        }
        start_step, tokens_seen, bad_steps = 0, 0, 0
        if checkpoint is not None:
            saved = json.loads((checkpoint / "trainer_state.json").read_text())
            check_resumable(saved["resume_state"], resume_state, checkpoint)
            start_step, tokens_seen, bad_steps = saved["step"], saved["tokens_seen"], saved["bad_steps"]

        # Models
        attn_implementation = "eager" if plan.attentions else cfg.train.attn_implementation
        if plan.attentions and cfg.train.attn_implementation != "eager":
            log.info("loss.alpha_attn > 0: attention maps need eager attention (not %s)",
                     cfg.train.attn_implementation)
        student = load_model(AutoModelForMaskedLM, student_dir, trust_remote_code, role="student",
                             attn_implementation=attn_implementation, dtype=torch.float32)
        teacher = None
        if teacher_name is not None:
            stage.use_model(teacher_name, role="teacher")
            teacher = load_teacher(teacher_name, teacher_has_mlm_head, trust_remote_code, attn_implementation,
                                   TEACHER_DTYPES[cfg.train.mixed_precision])
        spec = masking_spec(cfg.masking, tokenizer, token_counts, student.config.vocab_size)
        pairs = layer_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers,
                            init_manifest.get("layer_map")) if teacher is not None else []
        projection = None
        if plan.hidden_states and student.config.hidden_size != teacher.config.hidden_size:
            projection = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
        distiller = MaskedLMRows(student, projection)
        teacher_rows = MaskedLMRows(teacher).to(accelerator.device) if teacher is not None else None

        optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                      betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                      weight_decay=cfg.optim.weight_decay,
                                      fused=accelerator.device.type == "cuda")
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, steps)
        if cfg.train.compile:
            distiller.compile(dynamic=True)
            if teacher_rows is not None:
                teacher_rows.compile(dynamic=True)
        distiller, optimizer, scheduler = accelerator.prepare(distiller, optimizer, scheduler)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            log.info("resuming from %s at step %d", checkpoint, start_step)
        stage.update(world_size=world_size, accumulation=accumulation, total_steps=steps, warmup_steps=warmup_steps,
                     resumed_from=str(checkpoint) if checkpoint else None, layer_pairs=pairs)

        batches = DistillationBatches(train_split, lengths, layout, spec, cfg.seed, cfg.batch.group_window,
                                      accelerator.process_index, start_step, steps)
        loader = iter(DataLoader(batches, batch_size=None, num_workers=cfg.batch.num_workers,
                                 pin_memory=accelerator.device.type == "cuda"))
        metrics_path = stage.path / "metrics.jsonl"
        if accelerator.is_main_process and metrics_path.exists():  # drop what was logged after the checkpoint
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            metrics_path.write_text("".join(line + "\n" for line in kept))

        tracker = open_tracker(cfg.logger, cfg, stage.path, accelerator.is_main_process)
        try:
            distiller.train()
            sums = {}  # loss terms summed over micro batches since the last log
            logged_at, logged_tokens, logged_steps = time.perf_counter(), tokens_seen, 0
            progress = tqdm(total=steps, initial=start_step, desc="distill", unit="step",
                            disable=not accelerator.is_main_process)
            for step in range(start_step, steps):
                step_loss = torch.zeros((), device=accelerator.device)
                for _ in range(accumulation):
                    batch = to_device(next(loader), accelerator.device)
                    torch.manual_seed(derived_seed(cfg.seed, batch["number"], DROPOUT_STREAM))
                    with accelerator.accumulate(distiller):
                        losses = distillation_losses(distiller, teacher_rows, batch, plan, pairs,
                                                     accelerator.autocast)
                        accelerator.backward(losses["loss"])
                    step_loss += losses["loss"].detach()
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + value.detach()
                lr = scheduler.get_last_lr()[0]
                if bool(accelerator.gather(torch.isfinite(step_loss).float().reshape(1)).all()):
                    accelerator.clip_grad_norm_(distiller.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                else:
                    bad_steps += 1
                    log.warning("step %d: non-finite loss %s, update skipped (%d so far)", step + 1,
                                step_loss.item(), bad_steps)
                    if bad_steps > cfg.train.max_bad_steps:
                        raise UsageError(f"training diverged: non-finite loss at {bad_steps} steps, the last at step "
                                         f"{step + 1} (train.max_bad_steps={cfg.train.max_bad_steps}); lower "
                                         "optim.lr or check the data")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += batches.step_tokens(step)
                logged_steps += 1
                progress.update()

                done = step + 1
                if done % cfg.train.log_every == 0 or done == steps:
                    means = {name: accelerator.reduce(total, "mean").item() / (logged_steps * accumulation)
                             for name, total in sums.items()}
                    elapsed = time.perf_counter() - logged_at
                    record = {"step": done, "loss": means.pop("loss"),
                              **{f"loss_{name}": means[name] for name in LOSS_NAMES if name in means},
                              "lr": lr, "tokens_per_s": (tokens_seen - logged_tokens) / elapsed,
                              "tokens_seen": tokens_seen}
                    if accelerator.is_main_process:
                        with metrics_path.open("a") as handle:
                            handle.write(json.dumps(record) + "\n")
                        if tracker is not None:
                            tracker.log(record, step=done)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    sums, logged_at, logged_tokens, logged_steps = {}, time.perf_counter(), tokens_seen, 0
                if done % cfg.train.checkpoint_every == 0 or done == steps:
                    save_checkpoint(accelerator, stage.path, done, {
                        "step": done, "tokens_seen": tokens_seen, "bad_steps": bad_steps,
                        "resume_state": resume_state}, cfg.train.keep_last)
            progress.close()
        finally:
            if tracker is not None:
                tracker.finish()

        # The distilled student, then held-out MLM loss and accuracy of student and teacher on the same masks
        result = {"steps": steps, "tokens_seen": tokens_seen}
        if accelerator.is_main_process:
            final, tmp = stage.path / "final", stage.path / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            accelerator.unwrap_model(distiller).model.save_pretrained(tmp)
            load_tokenizer(str(init_dir / "model"), cfg.teacher.trust_remote_code).save_pretrained(tmp)
            if final.exists():  # left by an attempt that stopped after saving it
                shutil.rmtree(final)
            os.replace(tmp, final)
            log.info("distilled student: %s", final)
            validation = {
                "student": validate_masked_lm(accelerator.unwrap_model(distiller).model, cfg.run_dir, cfg,
                                              accelerator.device, accelerator.autocast),
                "teacher": (validate_masked_lm(teacher, cfg.run_dir, cfg, accelerator.device, accelerator.autocast)
                            if teacher is not None and teacher_has_mlm_head else None),
            }
            write_json_atomic(stage.path / "validation.json", validation)
            log.info("validation: %s", validation)
            result["validation"] = validation
            stage.update(tokens_seen=tokens_seen, bad_steps=bad_steps, validation=validation)
        accelerator.wait_for_everyone()
        return result
