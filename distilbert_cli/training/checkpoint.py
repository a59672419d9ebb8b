"""Checkpoints of the distill stage and exact resume.

A checkpoint is `checkpoints/step-N/`, and nothing in it needs unpickling (so loading one cannot run code):
- `model.safetensors`: the trained module (the student, and the hidden-state projection when there is one);
- `optimizer.safetensors`: the optimizer's tensors (AdamW's moments and step counts), its param groups as JSON in
  the file's metadata;
- `scheduler.json` (and `grad_scaler.json` under fp16): the learning-rate schedule's state;
- `trainer_state.json`: the step (which is also the data position), tokens seen, skipped steps, the metrics summed
  since the last log line, and the settings that change the maths.
No RNG state: every micro batch reseeds its masks and dropout from (seed, micro-batch number). The checkpoint is
written under a temporary name and renamed once complete. A checkpoint of the old pickle format (Accelerate's
`*.bin` / `*.pkl`) is refused, and an unreadable file is one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from distilbert_cli.artifacts import DistillOutputs
from distilbert_cli.errors import UsageError, invalid_entry, unreadable
from distilbert_cli.rundir import temporary_path

log = logging.getLogger(__name__)

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.json"
GRAD_SCALER = "grad_scaler.json"
TRAINER_STATE = "trainer_state.json"
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


@dataclass
class TrainerState:
    """Where training stands: steps done (the data position), real tokens seen, updates skipped, and the metrics
    window still open (MetricsLog.window: summed loss terms per process since the last log line; None if empty)."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    log_window: dict | None = None


class _LogWindow(BaseModel):
    micro_batches: Annotated[int, Field(strict=True, ge=0)]
    names: list[str]
    sums: list[list[float]]


class _SavedState(BaseModel):
    """The types trainer_state.json must hold (what a resume reads from it)."""

    step: Annotated[int, Field(strict=True, ge=0)]
    tokens_seen: Annotated[int, Field(strict=True, ge=0)]
    bad_steps: Annotated[int, Field(strict=True, ge=0)]
    log_window: _LogWindow | None
    resume_state: dict


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


def _read(path: Path, load):
    """`load(path)`, with a missing or corrupt file as one line naming it."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise unreadable(path, "missing")
    try:
        return load(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:
        raise unreadable(path, exc) from exc


def _read_json(path: Path):
    return _read(path, lambda p: json.loads(p.read_text()))


def read_checkpoint(checkpoint: Path, resume_state: dict) -> TrainerState:
    """The trainer state saved with `checkpoint`, after checking that its files are there and that the settings
    that change the maths (loss, masking, batch, optimiser, schedule, data, seed) are the checkpoint's."""
    if pickles := sorted(p.name for p in checkpoint.iterdir() if p.suffix in _PICKLE_SUFFIXES):
        raise UsageError(f"{checkpoint} is in the old pickle format ({', '.join(pickles)}), which is not loaded "
                         "because unpickling can run code: pass train.resume=never to start over")
    for name in (MODEL, OPTIMIZER, SCHEDULER):
        if not (checkpoint / name).is_file():
            raise unreadable(checkpoint / name, "missing")
    path = checkpoint / TRAINER_STATE
    saved = _read_json(path)
    expected = [field.name for field in fields(TrainerState)] + ["resume_state"]
    if not isinstance(saved, dict) or (missing := [key for key in expected if key not in saved]):
        raise unreadable(path, f"it lacks {', '.join(missing)}" if isinstance(saved, dict) else "not an object")
    try:
        _SavedState.model_validate(saved)
    except ValidationError as exc:
        raise unreadable(path, invalid_entry(exc)) from None
    saved_flat, current_flat = _flatten(saved["resume_state"]), _flatten(resume_state)
    differing = sorted(k for k in saved_flat.keys() | current_flat.keys() if saved_flat.get(k) != current_flat.get(k))
    if differing:
        changes = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {current_flat.get(k)!r}" for k in differing)
        raise UsageError(f"cannot resume from {checkpoint}: settings differ from the checkpoint ({changes}); "
                         "restore them or pass train.resume=never to start over")
    return TrainerState(**{field.name: saved[field.name] for field in fields(TrainerState)})


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _save_optimizer(state_dict: dict, path: Path) -> None:
    from safetensors.torch import save_file

    # AdamW's per-parameter state is all tensors (its step count included): "<param index>.<name>" -> tensor.
    tensors = {f"{param}.{name}": value.contiguous() for param, values in state_dict["state"].items()
               for name, value in values.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(state_dict["param_groups"])})


def _load_optimizer(path: Path) -> dict:
    from safetensors import safe_open

    state: dict[int, dict] = {}
    with safe_open(path, "pt") as handle:
        param_groups = json.loads((handle.metadata() or {})["param_groups"])
        for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            param, name = key.split(".", 1)
            state.setdefault(int(param), {})[name] = handle.get_tensor(key)
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(accelerator, out: DistillOutputs, state: TrainerState, resume_state: dict, keep_last: int,
                    model, optimizer, scheduler) -> None:
    """Model, optimizer and scheduler states plus trainer_state.json under a temporary name, renamed to
    checkpoints/step-N once complete; only the last `keep_last` are kept. The main process writes (the states
    are the same on every process)."""
    from safetensors.torch import save_model

    if accelerator.is_main_process:
        final = out.checkpoint(state.step)
        tmp = temporary_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(accelerator.unwrap_model(model), str(tmp / MODEL))
        _save_optimizer(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
        if accelerator.scaler is not None:
            (tmp / GRAD_SCALER).write_text(json.dumps(accelerator.scaler.state_dict()))
        (tmp / TRAINER_STATE).write_text(json.dumps({**asdict(state), "resume_state": resume_state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep_last]:
            shutil.rmtree(old)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> None:
    """Restore what save_checkpoint wrote into the prepared model, optimizer and scheduler (on every process)."""
    from safetensors.torch import load_model

    device = accelerator.device  # safetensors takes "cpu", not the "cpu:0" of a multi-process CPU run
    _read(checkpoint / MODEL, lambda p: load_model(accelerator.unwrap_model(model), p, strict=True,
                                                   device="cpu" if device.type == "cpu" else str(device)))
    _read(checkpoint / OPTIMIZER, lambda p: optimizer.load_state_dict(_load_optimizer(p)))
    scheduler.load_state_dict(read_state_json(checkpoint / SCHEDULER, scheduler.state_dict()))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read_state_json(checkpoint / GRAD_SCALER, accelerator.scaler.state_dict()))


def read_state_json(path: Path, like: dict) -> dict:
    """A saved state (scheduler, grad scaler) whose values have the types of `like`, the fresh object's own state:
    `load_state_dict` takes any dict, and a wrong value would only fail steps later."""
    saved = _read_json(path)
    if (problem := _shape_problem(saved, like, "")) is not None:
        raise unreadable(path, problem)
    return saved


def _shape_problem(saved, like, where: str) -> str | None:
    """Where `saved` differs in shape from `like` (lengths, value types; an int stands for a float), or None."""
    if isinstance(like, dict):  # keys only the saved state has are left alone (another torch version's state)
        if not isinstance(saved, dict) or (missing := sorted(like.keys() - saved.keys())):
            return f"{where or 'the top level'} " + (f"lacks {', '.join(missing)}" if isinstance(saved, dict)
                                                     else "is not a JSON object")
        found = (_shape_problem(saved[key], like[key], f"{where}.{key}".lstrip(".")) for key in like)
    elif isinstance(like, list):
        if not isinstance(saved, list) or len(saved) != len(like):
            return f"{where} is not a list of {len(like)}"
        found = (_shape_problem(item, model, f"{where}[{index}]")
                 for index, (item, model) in enumerate(zip(saved, like, strict=True)))
    else:
        kinds = (int, float) if isinstance(like, float) else (type(like),)
        fits = like is None or isinstance(saved, kinds) and isinstance(saved, bool) == isinstance(like, bool)
        return None if fits else f"{where} is {type(saved).__name__}, not {type(like).__name__}"
    return next(filter(None, found), None)
