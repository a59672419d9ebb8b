"""Checkpoints of every training stage and exact resume.

A checkpoint is `<checkpoints>/step-N/`, and nothing in it needs unpickling (so loading one cannot run code):
- `model.safetensors`: the trained module (the student, and the learned projections when there are any);
- `optimizer.safetensors`: the optimizer's tensors (AdamW's moments and step counts), its param groups as JSON in
  the file's metadata;
- `scheduler.json` (and `grad_scaler.json` under fp16): the learning-rate schedule's state;
- `trainer_state.json`: the step (which is also the data position), tokens seen, skipped steps, the metrics summed
  since the last log line, where model selection stands, and the settings that change the maths.
No RNG state: every micro batch reseeds its masks and dropout from (seed, micro-batch number). The checkpoint is
written under a temporary name and renamed once complete. With evaluation on a validation split, the best model
so far is kept apart in `<checkpoints>/best/`. A checkpoint of the old pickle format (Accelerate's `*.bin` /
`*.pkl`) is refused, and an unreadable file is one line naming it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, ValidationError

from distilbert_cli.errors import UsageError, invalid_entry, unreadable
from distilbert_cli.models.loading import PICKLE_SUFFIXES
from distilbert_cli.rundir import remove_tree, temporary_path

log = logging.getLogger(__name__)

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
SCHEDULER = "scheduler.json"
GRAD_SCALER = "grad_scaler.json"
TRAINER_STATE = "trainer_state.json"
BEST = "best"  # the best model on the validation split, beside the step-N checkpoints


@dataclass
class TrainerState:
    """Where training stands: steps done (the data position), real tokens seen, updates skipped, the metrics window
    still open (MetricsLog.window: summed loss terms per process since the last log line; None if empty), and model
    selection on the validation split (the best score and its step, evaluations since it improved, whether training
    stopped early)."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    log_window: dict | None = None
    best_score: float | None = None
    best_step: int | None = None
    stale_evaluations: int = 0
    stopped_early: bool = False


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
    best_score: float | None
    best_step: Annotated[int, Field(strict=True, ge=0)] | None
    stale_evaluations: Annotated[int, Field(strict=True, ge=0)]
    stopped_early: Annotated[bool, Field(strict=True)]
    resume_state: dict


def step_dir(checkpoints_dir: Path, step: int) -> Path:
    return checkpoints_dir / f"step-{step}"


def checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (a partial one still has its temporary name), oldest first."""
    found = [p for p in checkpoints_dir.glob("step-*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def resume_checkpoint(resume: str, checkpoints_dir: Path) -> Path | None:
    """The checkpoint a `resume` setting gives the run whose checkpoints are in `checkpoints_dir`: None for never
    (or auto without one), the latest for auto; a checkpoint directory when it is this run's, else this run's
    latest (the setting names the checkpoint of another run of the stage)."""
    if resume == "never":
        return None
    if resume != "auto" and Path(resume).resolve().parent == checkpoints_dir.resolve():
        return Path(resume)
    found = checkpoints(checkpoints_dir)
    return found[-1] if found else None


def clear_earlier_attempt(paths: list[Path], setting: str) -> None:
    """Starting over: remove what an interrupted attempt left (its checkpoints, final model, metrics)."""
    for path in paths:
        if path.exists():
            log.warning("%s: removing %s of an earlier attempt", setting, path)
            remove_tree(path)


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


def read_checkpoint(checkpoint: Path, resume_state: dict, setting: str) -> TrainerState:
    """The trainer state saved with `checkpoint`, after checking that its files are there and that the settings
    that change the maths (loss, masking, batch, optimiser, schedule, data, seed) are the checkpoint's. `setting`
    names the resume setting (train.resume, finetune.resume...) in the errors."""
    if pickles := sorted(p.name for p in checkpoint.iterdir() if p.name.endswith(PICKLE_SUFFIXES)):
        raise UsageError(f"{checkpoint} is in the old pickle format ({', '.join(pickles)}), which is not loaded "
                         f"because unpickling can run code: pass {setting}=never to start over")
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
                         f"restore them or pass {setting}=never to start over")
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


def _write_directory(final: Path, write) -> None:
    """`write(folder)` into a temporary folder, renamed to `final` once complete (replacing it)."""
    tmp = temporary_path(final)
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        remove_tree(final)
    os.replace(tmp, final)


def _save_weights(accelerator, model, folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(accelerator.unwrap_model(model), str(folder / MODEL))


def _load_weights(accelerator, model, folder: Path) -> None:
    from safetensors.torch import load_model

    device = accelerator.device  # safetensors takes "cpu", not the "cpu:0" of a multi-process CPU run
    _read(folder / MODEL, lambda p: load_model(accelerator.unwrap_model(model), p, strict=True,
                                               device="cpu" if device.type == "cpu" else str(device)))


def save_checkpoint(accelerator, checkpoints_dir: Path, state: TrainerState, resume_state: dict, keep_last: int,
                    model, optimizer, scheduler) -> None:
    """Model, optimizer and scheduler states plus trainer_state.json under a temporary name, renamed to
    <checkpoints_dir>/step-N once complete; only the last `keep_last` are kept. The main process writes (the
    states are the same on every process)."""
    def write(folder: Path) -> None:
        _save_weights(accelerator, model, folder)
        _save_optimizer(optimizer.state_dict(), folder / OPTIMIZER)
        (folder / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
        if accelerator.scaler is not None:
            (folder / GRAD_SCALER).write_text(json.dumps(accelerator.scaler.state_dict()))
        (folder / TRAINER_STATE).write_text(json.dumps({**asdict(state), "resume_state": resume_state}, indent=2))

    if accelerator.is_main_process:
        final = step_dir(checkpoints_dir, state.step)
        _write_directory(final, write)
        for old in checkpoints(checkpoints_dir)[:-keep_last]:
            remove_tree(old)
        log.info("checkpoint: %s", final)
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> None:
    """Restore what save_checkpoint wrote into the prepared model, optimizer and scheduler (on every process)."""
    _load_weights(accelerator, model, checkpoint)
    _read(checkpoint / OPTIMIZER, lambda p: optimizer.load_state_dict(_load_optimizer(p)))
    scheduler.load_state_dict(read_state_json(checkpoint / SCHEDULER, scheduler.state_dict()))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read_state_json(checkpoint / GRAD_SCALER, accelerator.scaler.state_dict()))


def save_best(accelerator, checkpoints_dir: Path, model) -> None:
    """The model's weights as the best so far on the validation split (<checkpoints_dir>/best/)."""
    if accelerator.is_main_process:
        _write_directory(checkpoints_dir / BEST, lambda folder: _save_weights(accelerator, model, folder))
    accelerator.wait_for_everyone()


def load_best(accelerator, checkpoints_dir: Path, model) -> None:
    """Restore the weights save_best kept (on every process)."""
    _load_weights(accelerator, model, checkpoints_dir / BEST)


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
