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
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from distilbert_cli import artifacts
from distilbert_cli.errors import UsageError
from distilbert_cli.logs import distributed_state
from distilbert_cli.models.loading import load_config, load_tokenizer
from distilbert_cli.rundir import Run, remove_tree, save_arrays_atomic, temporary_path, write_json_atomic
from distilbert_cli.schema import Train
from distilbert_cli.training import setup
from distilbert_cli.training.distiller import distillation_losses, layer_pairs
from distilbert_cli.training.engine import EngineSettings, Phase, TrainingJob, fit, open_tracker, restore, resume_point
from distilbert_cli.training.losses import LossPlan
from distilbert_cli.training.mlm_eval import mlm_figures, score_targets, validation_batches
from distilbert_cli.training.progressive import enter, stages

log = logging.getLogger(__name__)


def validate(student, teacher, corpus: setup.Corpus, validation_spec, cfg: Train,
             accelerator) -> tuple[dict, dict[str, np.ndarray]]:
    """Held-out MLM loss and accuracy of the student and the teacher (None: no teacher with a head) on the same
    fixed masks, whatever masks the run trained on: targets drawn with probability ~ count^-validation.
    smoothing_exponent (the reference's smoothing: frequent tokens masked less), and, under "uniform", drawn
    uniformly over the real tokens (BERT's own objective; the smoothed masks pick rare tokens and are far harder);
    the student's agreement with the teacher's top-1 prediction. Returns those figures (validation.json) and every
    target's label, loss and prediction of each model (validation_targets.safetensors: what the report's intervals and
    paired comparisons between runs resample)."""
    uniform = replace(validation_spec, token_weights=(validation_spec.token_weights > 0).float())  # specials stay 0
    scores: dict = {"smoothing_exponent": cfg.validation.smoothing_exponent, "student": {},
                    "teacher": {} if teacher is not None else None}
    targets: dict[str, np.ndarray] = {}
    for masks, masking in (("smoothed", validation_spec), ("uniform", uniform)):
        batches = validation_batches(corpus.validation, masking, cfg.validation.max_sequences,
                                     cfg.validation.batch_size, cfg.validation.seed)
        scored = {name: score_targets(model, batches, accelerator.device, accelerator.autocast)
                  for name, model in (("student", student), ("teacher", teacher)) if model is not None}
        targets[f"{masks}_labels"] = scored["student"]["labels"]
        for name, found in scored.items():
            figures = mlm_figures(found)
            if name == "student" and "teacher" in scored:
                figures["teacher_agreement"] = float(np.mean(found["predictions"] == scored["teacher"]["predictions"]))
            (scores[name] if masks == "smoothed" else scores[name].setdefault("uniform", {})).update(figures)
            targets[f"{name}_{masks}_losses"], targets[f"{name}_{masks}_predictions"] = (found["losses"],
                                                                                       found["predictions"])
    return scores, targets


def run(cfg: Train, overrides: Sequence[str] = ()) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    plan = LossPlan.from_config(cfg.loss)
    setup.check_machine(cfg.train, cfg.teacher)
    accumulation = setup.accumulation_steps(cfg.batch, distributed_state().num_processes)
    run_dir = Run.of(cfg)
    trust = run_dir.trust_remote_code
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
        stage.expect(out.final / "config.json", out.final / "model.safetensors", out.validation,
                     out.validation_targets, out.metrics)
        # Inputs, and every check on the models' configs before anything heavy is loaded
        inputs = setup.read_inputs(stage)
        corpus = setup.load_corpus(inputs.prepared)
        student_config = load_config(str(inputs.student_dir), trust, role="student")
        teacher_name = teacher_config = None
        if plan.needs_teacher:  # mlm_only loads no teacher at all
            teacher_name = cfg.teacher.name_or_path or inputs.init.teacher
            teacher_config = load_config(teacher_name, trust, role="teacher")
        setup.check_compatible(student_config, teacher_config, inputs.init.teacher_has_mlm_head, plan,
                               len(corpus.tokenizer), int(corpus.lengths.max()))

        # Schedule: global = micro x accumulation x world size; the budget in optimizer steps; the stages
        layout = setup.step_layout(cfg.batch, accumulation, accelerator.num_processes, len(corpus.lengths))
        steps = setup.total_steps(cfg.train, layout.steps_per_epoch,
                                  float(corpus.lengths.mean()) * cfg.batch.global_batch_size)
        warmup_steps = math.ceil(cfg.optim.warmup_fraction * steps)
        log.info("effective batch %d sequences = micro %d x accumulation %d x %d process(es); %d steps "
                 "(%.2f epochs of %d), warmup %d; losses %s", cfg.batch.global_batch_size, layout.micro_batch_size,
                 accumulation, layout.world_size, steps, steps / layout.steps_per_epoch, layout.steps_per_epoch,
                 warmup_steps, {k: v for k, v in plan.weights.items() if v})
        pairs = layer_pairs(student_config.num_hidden_layers, teacher_config.num_hidden_layers,
                            inputs.init.layer_map, plan.teacher_layer) if teacher_config is not None else []
        run_stages = stages(plan, pairs, cfg.train.progressive_transfer, steps, cfg.train.head_only_steps)

        # Where training starts: what must not change across a resume, and the checkpoint to resume from
        resume_state = {
            "seed": cfg.seed, "loss": cfg.loss.model_dump(), "masking": cfg.masking.model_dump(),
            "optim": cfg.optim.model_dump(), "mixed_precision": cfg.train.mixed_precision,
            "progressive_transfer": cfg.train.progressive_transfer, "head_only_steps": cfg.train.head_only_steps,
            "batch": cfg.batch.model_dump(include={"global_batch_size", "micro_batch_size", "group_window"}),
            "world_size": layout.world_size, "total_steps": steps,
            "inputs": {entry["stage"]: entry["fingerprint"] for entry in stage.inputs if "stage" in entry},
        }
        checkpoint, state = resume_point(cfg.train.resume, out.checkpoints, resume_state, "train", accelerator,
                                         [out.final, out.metrics])

        # Models, optimizer, micro batches
        student = setup.load_student(inputs.student_dir, cfg.train, trust)
        teacher = None
        if teacher_name is not None:
            stage.use_model(teacher_name, role="teacher")
            teacher = setup.load_teacher(teacher_name, cfg.teacher, cfg.train, inputs.init.teacher_has_mlm_head, trust)
            setup.check_attention_projections(student, teacher, plan, pairs)
        spec, validation_spec = setup.masking_specs(cfg.masking, cfg.validation.smoothing_exponent, corpus,
                                                    student.config.vocab_size)
        student_rows, teacher_rows = setup.wrap(student, teacher, plan)
        if teacher_rows is not None:
            teacher_rows.to(accelerator.device)
        optimizer, scheduler = setup.optimizer_and_schedule(
            cfg.optim, [p for p in student_rows.parameters() if p.requires_grad], steps,
            fused=accelerator.device.type == "cuda")
        if cfg.train.compile:
            student_rows.compile(dynamic=True)
            if teacher_rows is not None:
                teacher_rows.compile(dynamic=True)
        student_rows, optimizer, scheduler = accelerator.prepare(student_rows, optimizer, scheduler)
        stage.update(world_size=layout.world_size, accumulation=accumulation, total_steps=steps,
                     warmup_steps=warmup_steps, resumed_from=str(checkpoint) if checkpoint else None,
                     layer_pairs=pairs, stages=[{"name": s.name, "end_step": s.end, "losses": s.plan.used}
                                                for s in run_stages])

        # Train: each stage of the schedule is a phase of the engine (its loss terms, layer pairs and trainable
        # parameters, entered from the step alone, so a resumed run re-enters the stage it stopped in)
        current = {}

        def enter_stage(step: int) -> None:
            current["stage"] = enter(run_stages, step, accelerator.unwrap_model(student_rows).model)

        def losses(batch: dict) -> dict:
            return distillation_losses(student_rows, teacher_rows, batch, current["stage"].plan,
                                       current["stage"].pairs, accelerator.autocast)

        job = TrainingJob(student_rows, optimizer, scheduler,
                          setup.micro_batches(corpus, spec, layout, cfg.batch, cfg.seed, accelerator.process_index,
                                              state.step, steps),
                          losses, resume_state, out.checkpoints, out.metrics, "distill",
                          phases=[Phase(s.name, s.end, enter_stage) for s in run_stages],
                          num_workers=cfg.batch.num_workers)
        restore(checkpoint, state, job, accelerator)
        settings = EngineSettings("train", cfg.seed, steps, cfg.optim.max_grad_norm, cfg.train.max_bad_steps,
                                  cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.keep_last)
        tracker = open_tracker(cfg.logger, stage.path, "distill", cfg.model_dump(mode="json"),
                               accelerator.is_main_process)
        try:
            state = fit(job, settings, state, accelerator, tracker)
        finally:
            if tracker is not None:
                tracker.finish()

        # The distilled student, then held-out MLM loss and accuracy of student and teacher on the same masks
        result = {"steps": steps, "tokens_seen": state.tokens_seen}
        if accelerator.is_main_process:
            student = accelerator.unwrap_model(student_rows).model
            tmp = temporary_path(out.final)
            remove_tree(tmp)
            student.save_pretrained(tmp)
            load_tokenizer(str(inputs.student_dir), trust).save_pretrained(tmp)  # the student's (init-student's)
            if out.final.exists():  # left by an attempt that stopped after saving it
                remove_tree(out.final)
            os.replace(tmp, out.final)
            log.info("distilled student: %s", out.final)
            teacher_model = teacher_rows.model if teacher_rows is not None else None
            validation, targets = validate(student, teacher_model if inputs.init.teacher_has_mlm_head else None,
                                           corpus, validation_spec, cfg, accelerator)
            write_json_atomic(out.validation, validation)
            save_arrays_atomic(out.validation_targets, targets)
            log.info("validation: %s", validation)
            if not math.isfinite(validation["student"]["mlm_loss"]):
                raise UsageError(f"the distilled student's validation MLM loss is {validation['student']['mlm_loss']}"
                                 f": its weights are unusable (see {out.validation}); lower optim.lr or check the "
                                 "inputs")
            result["validation"] = validation
            stage.update(tokens_seen=state.tokens_seen, bad_steps=state.bad_steps, validation=validation)
        accelerator.wait_for_everyone()
        return result
