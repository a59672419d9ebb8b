"""`distil train` (alias `distill`): distill the frozen teacher into the student, into <run_dir>/distill/.

    distil train +experiment=triple_loss run_dir=runs/exp1
    accelerate launch --config_file scripts/accelerate_8gpu.yaml -m distilbert_cli train +experiment=triple_loss \
        run_dir=runs/exp1

Reads prepare-data/ (tokenized train and validation splits, token counts) and init-student/ (the student,
and which teacher it came from). Writes `final/` (the distilled student and its tokenizer),
`metrics.jsonl`, `validation.json` and `checkpoints/step-N/` (model, optimizer, scheduler and the data
position, in safetensors and JSON; `train.resume=auto` continues from the latest). The inputs are verified against
the digests their stages recorded. A run whose every step was skipped as non-finite, or whose student has a
non-finite validation loss, fails.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace

from omegaconf import DictConfig

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.logs import distributed_state
from distilbert_cli.rundir import Run, temporary_path, write_json_atomic
from distilbert_cli.training import setup
from distilbert_cli.training.loop import train
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.mlm_eval import evaluate_mlm, validation_batches

log = logging.getLogger(__name__)


def validate(student, teacher, distillation: setup.Distillation, cfg: DictConfig, accelerator) -> dict:
    """Held-out MLM loss and accuracy of the student and the teacher (None: no teacher with a head) on the same
    fixed masks, whatever masks the run trained on: targets drawn with probability ~ count^-validation.
    smoothing_exponent (the reference's smoothing: frequent tokens masked less), and, under "uniform", drawn
    uniformly over the real tokens (the smoothed masks pick rare tokens and are far harder)."""
    smoothed = distillation.validation_spec
    uniform = replace(smoothed, token_weights=(smoothed.token_weights > 0).float())  # specials stay unmasked
    scores: dict = {"smoothing_exponent": cfg.validation.smoothing_exponent}
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            scores[name] = None
            continue
        scores[name] = {}
        for masks, masking in (("smoothed", smoothed), ("uniform", uniform)):
            batches = validation_batches(distillation.validation, masking, cfg.validation.max_sequences,
                                         cfg.validation.batch_size, cfg.validation.seed)
            found = evaluate_mlm(model, batches, accelerator.device, accelerator.autocast)
            scores[name].update(found if masks == "smoothed" else {"uniform": found})
    return scores


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    plan = LossPlan.from_config(cfg.loss)
    accumulation = setup.accumulation_steps(cfg, distributed_state().num_processes)
    run_dir = Run.of(cfg)
    for stage_name in (artifacts.PREPARE_DATA, artifacts.INIT_STUDENT):  # a missing input leaves no stage behind
        run_dir.require(stage_name)
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
    # DDP must not wait for gradients of a head that no loss uses, or of parameters a stage freezes.
    unused_parameters = not plan.student_logits or cfg.train.progressive_transfer > 0 or cfg.train.head_only_steps > 0
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, gradient_accumulation_steps=accumulation,
                              step_scheduler_with_optimizer=False,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])
    set_seed(cfg.seed, deterministic=cfg.train.deterministic)

    with run_dir.open_stage(artifacts.DISTILL, cfg, overrides, keep_partial=True,
                            unfingerprinted=artifacts.UNFINGERPRINTED[artifacts.DISTILL]) as stage:
        out = artifacts.DistillOutputs(stage.path)
        distillation = setup.build(cfg, stage, accelerator, plan, accumulation)
        tracker = setup.open_tracker(cfg, stage.path, accelerator.is_main_process)
        try:
            state = train(distillation, cfg, accelerator, out, tracker)
        finally:
            if tracker is not None:
                tracker.finish()

        # The distilled student, then held-out MLM loss and accuracy of student and teacher on the same masks
        result = {"steps": distillation.total_steps, "tokens_seen": state.tokens_seen}
        if accelerator.is_main_process:
            student = accelerator.unwrap_model(distillation.student).model
            tmp = temporary_path(out.final)
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp)
            distillation.tokenizer.save_pretrained(tmp)
            if out.final.exists():  # left by an attempt that stopped after saving it
                shutil.rmtree(out.final)
            os.replace(tmp, out.final)
            log.info("distilled student: %s", out.final)
            teacher = distillation.teacher.model if distillation.teacher is not None else None
            validation = validate(student, teacher if distillation.teacher_has_mlm_head else None, distillation, cfg,
                                  accelerator)
            write_json_atomic(out.validation, validation)
            log.info("validation: %s", validation)
            if not math.isfinite(validation["student"]["mlm_loss"]):
                raise UsageError(f"the distilled student's validation MLM loss is {validation['student']['mlm_loss']}"
                                 f": its weights are unusable (see {out.validation}); lower optim.lr or check the "
                                 "inputs")
            result["validation"] = validation
            stage.update(tokens_seen=state.tokens_seen, bad_steps=state.bad_steps, validation=validation)
        accelerator.wait_for_everyone()
        return result
