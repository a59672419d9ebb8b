"""Run `distil` and stop dead at one phase, so that a test can kill -9 it exactly there (no timing guesses).

    python tests/faults/pause.py PHASE MARKER distil-arguments...

At PHASE the process creates MARKER and waits; the test polls for MARKER, then sends SIGKILL. Phases:
    compose                any command, before its config is composed (no stage open yet)
    tokenize               prepare-data, the corpus read into .tmp-work/, before tokenizing
    tokenize-workers       prepare-data with prepare.num_proc > 1, inside the tokenizing worker processes
    finetune               finetune, its inputs read (and read-locked), before the first model is fine-tuned
    after-checkpoint-N     any training stage, right after its first checkpoint of step N is in place
    after-checkpoint-N-K   the same at the K-th such checkpoint (finetune's runs, task-distill's two steps)
    inside-checkpoint-N    train, checkpoint N half written (.tmp-step-N/ has the model and optimizer only)
    validation             train, final/ saved, before the validation figures
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def hold(marker: Path) -> None:
    marker.touch()
    while True:
        time.sleep(1)


def install(phase: str, marker: Path) -> None:
    if phase == "compose":
        from distilbert_cli import cli

        cli.compose_config = lambda *args, **kwargs: hold(marker)
    elif phase == "tokenize-workers":
        from distilbert_cli.data import tokenize

        tokenize.tokenize_documents = lambda *args, **kwargs: hold(marker)  # sent to (forked) workers by datasets
    elif phase == "finetune":
        from distilbert_cli.stages import finetune

        finetune.finetune_one = lambda *args, **kwargs: hold(marker)
    elif phase == "tokenize":
        from distilbert_cli.data import prepared

        prepared.tokenize_corpus = lambda *args, **kwargs: hold(marker)
    elif phase.startswith("after-checkpoint-"):
        from distilbert_cli.training import engine

        parts = [int(part) for part in phase.removeprefix("after-checkpoint-").split("-")]
        step, nth = parts[0], parts[1] if len(parts) > 1 else 1
        save, seen = engine.save_checkpoint, []

        def save_then_hold(accelerator, out, state, *args):
            save(accelerator, out, state, *args)
            if state.step == step:
                seen.append(out)
                if len(seen) == nth:
                    hold(marker)

        engine.save_checkpoint = save_then_hold
    elif phase.startswith("inside-checkpoint-"):
        from distilbert_cli.training import checkpoint

        name, save = f".tmp-step-{phase.rsplit('-', 1)[1]}", checkpoint._save_optimizer

        def save_optimizer_then_hold(state_dict, path):
            save(state_dict, path)
            if path.parent.name == name:
                hold(marker)

        checkpoint._save_optimizer = save_optimizer_then_hold
    elif phase == "validation":
        from distilbert_cli.stages import train

        train.score_targets = lambda *args, **kwargs: hold(marker)
    else:
        raise SystemExit(f"unknown phase {phase}")


if __name__ == "__main__":
    phase, marker, *arguments = sys.argv[1:]
    install(phase, Path(marker))
    from distilbert_cli.cli import app

    app(arguments, prog_name="distil")
