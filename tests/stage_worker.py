"""What the training tests record inside a run, and a worker that makes the same records on several processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/stage_worker.py STAGE ROOT [OVERRIDES...]

On every process of the group the worker runs the training stage STAGE (train, finetune or task_distill: its
config name) on `ROOT/uninterrupted` (a copy of a run directory holding the stage's inputs) with OVERRIDES, saving
each process's gradients of the first optimizer step, then runs it on `ROOT/resumed` with the same settings,
stopped right after its step-2 checkpoint (as if killed) and resumed from it. `--standalone` lets torchrun's own
store pick a free port (nothing is probed, so no other process can take it).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from distilbert_cli.config import compose_config
from distilbert_cli.logs import distributed_state
from distilbert_cli.training import engine

# The config section of each training stage (its resume setting).
SECTIONS = {"train": "train", "finetune": "finetune", "task_distill": "task_distill"}


class Stopped(Exception):
    """Stands for a kill right after a checkpoint."""


def gradients_file(directory: Path, rank: int) -> Path:
    return directory / f"first-step-gradients-rank{rank}.pt"


def recording_train_step(real_train_step, directory: Path):
    """`engine.train_step` that also saves the model's gradients (by parameter name, before any clipping or update)
    just before the first optimizer step of the run (of the first training run of a stage that has several)."""
    def train_step(job, *args, **kwargs):
        path = gradients_file(directory, distributed_state().process_index)
        real_step = job.optimizer.step

        def save_then_step(*step_args, **step_kwargs):
            if not path.exists():
                model = getattr(job.model, "module", job.model)  # DDP wraps it on several processes
                torch.save({name: p.grad.detach().clone() for name, p in model.named_parameters()
                            if p.grad is not None}, path)
            return real_step(*step_args, **step_kwargs)

        job.optimizer.step = save_then_step
        try:
            return real_train_step(job, *args, **kwargs)
        finally:
            job.optimizer.step = real_step
    return train_step


def save_then_stop(real_save, step: int):
    """`engine.save_checkpoint` that stops the run (as if killed) right after the checkpoint of `step` is written."""
    def save(accelerator, checkpoints_dir, state, *args):
        real_save(accelerator, checkpoints_dir, state, *args)
        if state.step == step:
            raise Stopped
    return save


def run_on_two_processes(stage: str, root: Path, overrides: list[str]) -> None:
    """This worker on 2 processes (torchrun --standalone, gloo on the CPU), on ROOT/uninterrupted and ROOT/resumed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             __file__, stage, str(root), *overrides], capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_first_step_gradients_match(single: Path, two: Path, min_norm: float = 0.1) -> None:
    """Rank 0 of the 2-process run has the gradients of the 1-process run (to float tolerance), and both ranks the
    same (averaged over the processes); they are real gradients, their norm at least `min_norm`, far above the
    tolerance."""
    import torch

    one_process = torch.load(gradients_file(single, 0))
    rank0, rank1 = (torch.load(gradients_file(two, rank)) for rank in (0, 1))
    assert one_process.keys() == rank0.keys() == rank1.keys() and len(one_process) > 10
    for name, gradient in one_process.items():
        torch.testing.assert_close(rank0[name], gradient, rtol=1e-4, atol=1e-7, msg=lambda text, name=name:
                                   f"{name}: {text}")
        assert torch.equal(rank0[name], rank1[name]), name
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in one_process.values()]))
    assert norm > min_norm, norm


def run_stage(stage: str, run_dir: Path, overrides: list[str]) -> None:
    overrides = [*overrides, f"run_dir={run_dir}"]
    module = importlib.import_module(f"distilbert_cli.stages.{stage}")
    module.run(compose_config(stage, overrides), overrides)


def main(stage: str, root: Path, overrides: list[str]) -> None:
    real_train_step, real_save = engine.train_step, engine.save_checkpoint
    engine.train_step = recording_train_step(real_train_step, root / "uninterrupted")
    run_stage(stage, root / "uninterrupted", overrides)
    engine.train_step = real_train_step
    engine.save_checkpoint = save_then_stop(real_save, 2)
    with contextlib.suppress(Stopped):
        run_stage(stage, root / "resumed", overrides)
    engine.save_checkpoint = real_save
    run_stage(stage, root / "resumed", [*overrides, f"{SECTIONS[stage]}.resume=auto"])


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
