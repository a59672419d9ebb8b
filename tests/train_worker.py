"""What the distill tests record inside a run, and a worker that makes the same records on 2 processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train_worker.py ROOT [OVERRIDES...]

On every process of the group the worker trains `ROOT/uninterrupted` (a copy of a run directory after
prepare-data and init-student) with OVERRIDES, saving each process's gradients of the first optimizer step, then
trains `ROOT/resumed` with the same settings, killed right after its step-2 checkpoint and resumed from it.
`--standalone` lets torchrun's own store pick a free port (nothing is probed, so no other process can take it).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from distilbert_cli.config import compose_config
from distilbert_cli.logs import distributed_state
from distilbert_cli.stages import train as train_stage
from distilbert_cli.training import loop, setup


def gradients_file(directory: Path, rank: int) -> Path:
    return directory / f"first-step-gradients-rank{rank}.pt"


def recording_build(real_build, directory: Path):
    """`setup.build` that also saves the student's gradients (by parameter name, before any clipping or update)
    just before the run's first optimizer step."""
    def build(*args, **kwargs):
        run = real_build(*args, **kwargs)
        real_step, rank = run.optimizer.step, distributed_state().process_index

        def save_then_step(*step_args, **step_kwargs):
            path = gradients_file(directory, rank)
            if not path.exists():
                model = getattr(run.student, "module", run.student)  # DDP wraps it on 2 processes
                torch.save({name: p.grad.detach().clone() for name, p in model.named_parameters()
                            if p.grad is not None}, path)
            return real_step(*step_args, **step_kwargs)

        run.optimizer.step = save_then_step
        return run
    return build


def save_then_stop(real_save, step: int):
    """`save_checkpoint` that stops the run (as if killed) right after the checkpoint of `step` is written."""
    def save(accelerator, out, state, *args):
        real_save(accelerator, out, state, *args)
        if state.step == step:
            raise KeyboardInterrupt
    return save


def train(run_dir: Path, overrides: list[str]) -> None:
    overrides = [*overrides, f"run_dir={run_dir}"]
    train_stage.run(compose_config("train", overrides), overrides)


def main(root: Path, overrides: list[str]) -> None:
    real_build, real_save = setup.build, loop.save_checkpoint
    setup.build = recording_build(real_build, root / "uninterrupted")
    train(root / "uninterrupted", overrides)
    setup.build = real_build
    loop.save_checkpoint = save_then_stop(real_save, 2)
    with contextlib.suppress(KeyboardInterrupt):  # killed after the step-2 checkpoint
        train(root / "resumed", overrides)
    loop.save_checkpoint = real_save
    train(root / "resumed", [*overrides, "train.resume=auto"])


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
