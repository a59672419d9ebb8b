"""Checkpoints of the distill stage and exact resume.

A checkpoint is `checkpoints/step-N/`: Accelerate's state (model, optimizer, scheduler, RNG) plus
`trainer_state.json` (the step, which is also the data position, tokens seen, skipped steps, and the settings
that change the maths). It is written under a temporary name and renamed once complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from distilbert_cli.artifacts import DistillOutputs
from distilbert_cli.errors import UsageError
from distilbert_cli.rundir import write_json_atomic

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where training stands: steps done (the data position), real tokens seen, updates skipped."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0


def checkpoints(out: DistillOutputs) -> list[Path]:
    """Complete checkpoints (a partial one still has its temporary name), oldest first."""
    found = [p for p in out.checkpoints.glob("step-*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resume_checkpoint(resume: str, out: DistillOutputs) -> Path | None:
    """The checkpoint `train.resume` names: None for never (or auto without one), the latest for auto."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(out)
        return found[-1] if found else None
    return Path(resume)


def clear_earlier_attempt(out: DistillOutputs, resume: str) -> None:
    """Starting over: remove what an interrupted attempt left (checkpoints, final student, metrics)."""
    for path in (out.checkpoints, out.final, out.metrics):
        if path.exists():
            log.warning("train.resume=%s: removing %s of an earlier attempt", resume, path)
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_checkpoint(checkpoint: Path, resume_state: dict) -> TrainerState:
    """The trainer state saved with `checkpoint`, after checking that the settings that change the maths (loss,
    masking, batch, optimiser, schedule, data, seed) are the checkpoint's."""
    saved = json.loads((checkpoint / TRAINER_STATE).read_text())
    saved_flat, current_flat = _flatten(saved["resume_state"]), _flatten(resume_state)
    differing = sorted(k for k in saved_flat.keys() | current_flat.keys() if saved_flat.get(k) != current_flat.get(k))
    if differing:
        changes = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in differing)
        raise UsageError(f"cannot resume from {checkpoint}: settings differ from the checkpoint ({changes}); "
                         "restore them or pass train.resume=never to start over")
    return TrainerState(saved["step"], saved["tokens_seen"], saved["bad_steps"])


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_checkpoint(accelerator, out: DistillOutputs, state: TrainerState, resume_state: dict, keep_last: int) -> None:
    """Model, optimizer, scheduler and RNG states plus trainer_state.json under a temporary name, renamed to
    checkpoints/step-N once complete; only the last `keep_last` are kept."""
    final = out.checkpoint(state.step)
    tmp = final.with_name(f".tmp-{final.name}")
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE, {**asdict(state), "resume_state": resume_state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()
