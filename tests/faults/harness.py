"""What the fault-injection tests share: running `distil` in-process or as a process paused at a phase (to be
killed there), the one-line refusal every fault must end in, and a tiny run's weights and metrics."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from distilbert_cli.cli import app
from distilbert_cli.logs import LOGGER_NAME
from distilbert_cli.rundir import read_manifest

REPO = Path(__file__).resolve().parents[2]
# Four steps (+debug=tiny), logged at 3 and 4, checkpointed at 2 and 4: a resume from step 2 reopens the log
# window of steps 1-2, which the line at step 3 must average with step 3 as an uninterrupted run does.
TRAIN = ["+experiment=triple_loss", "+debug=tiny", "train.log_every=3", "train.checkpoint_every=2",
         "train.deterministic=true"]
PAUSE_TIMEOUT_S = 180


def distil(*args: str):
    """`distil ARGS` in this process. The console log handler is made anew, on this invocation's stderr (the one
    an earlier invocation made writes to a stream CliRunner has closed)."""
    logging.getLogger(LOGGER_NAME).handlers.clear()
    return CliRunner().invoke(app, [str(arg) for arg in args])


def copy_run(source: Path, parent: Path) -> Path:
    """A copy of the run directory `source` as `parent`/run, for a test to break."""
    shutil.copytree(source, parent / "run")
    return parent / "run"


def prepare_args(run_dir: Path, teacher: Path, corpus: Path, *overrides: str) -> list[str]:
    return ["prepare-data", f"run_dir={run_dir}", f"teacher.name_or_path={teacher}", "data=local",
            f"data.paths=[{corpus}]", "prepare.validation_size=12", "prepare.num_proc=1", "prepare.max_seq_length=64",
            *overrides]


def train(run_dir: Path, *overrides: str):
    return distil("train", *TRAIN, f"run_dir={run_dir}", *overrides)


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output


def assert_refused(result, *fragments: str, stage_dir: Path | None = None) -> str:
    """Exit code 2, exactly one `error:` line holding every fragment, no traceback, the stage not complete."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    if stage_dir is not None:
        manifest = read_manifest(stage_dir) if (stage_dir / "manifest.json").is_file() else None
        assert manifest is None or manifest["status"] != "complete"
    return errors[0]


def no_temporaries(stage_dir: Path) -> None:
    assert not list(stage_dir.rglob(".tmp-*")), list(stage_dir.rglob(".tmp-*"))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "distill" / "final" / "model.safetensors")


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours, theirs = weights(run_dir), weights(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def logged(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the throughput, which is a timing."""
    from distilbert_cli.artifacts import read_jsonl

    return [{k: v for k, v in record.items() if k != "tokens_per_s"}
            for record in read_jsonl(run_dir / "distill" / "metrics.jsonl")]


def digests(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@contextmanager
def paused(phase: str, tmp_path: Path, *args: str):
    """`distil ARGS` in a child process held at `phase` (tests/faults/pause.py); killed with SIGKILL on exit. The
    child leads a process group of its own, as a command started from a shell does (Ctrl-C: `os.killpg`)."""
    marker = tmp_path / f"at-{phase}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # same threads as this process: bitwise-comparable maths
    child = subprocess.Popen([sys.executable, str(REPO / "tests" / "faults" / "pause.py"), phase, str(marker),
                              *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT_S
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"exited {child.returncode} before {phase}: {child.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"did not reach {phase} in {PAUSE_TIMEOUT_S} s")
            time.sleep(0.05)
        yield child
    finally:
        kill(child)


def kill(child: subprocess.Popen) -> None:
    if child.poll() is None:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    child.stderr.close()
