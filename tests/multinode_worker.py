"""`distil` on one "machine" of a multi-node job, recording every write it makes under the shared run directory.

    accelerate launch --multi_gpu --num_machines 2 --machine_rank R ... tests/multinode_worker.py RUN_DIR AUDIT_DIR \
        train OVERRIDES...

An audit hook (sys.addaudithook) sees each file this process opens for writing, creates, renames, truncates or
removes; those under RUN_DIR are saved to AUDIT_DIR/writes-rank<RANK>.json when the command ends, so the test can
check that only the global main process wrote the shared run directory (every machine has a local rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGES = ("os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree",
            "os.link", "os.symlink", "os.chmod")


def recorder(run_dir: Path, writes: list):
    root = os.path.realpath(run_dir)

    def inside(path) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return False  # a file descriptor
        resolved = os.path.realpath(os.fsdecode(path))
        return resolved == root or resolved.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writing and inside(path):
                writes.append(["open", os.fsdecode(path)])
        elif event in _CHANGES and args and inside(args[0]):
            writes.append([event, os.fsdecode(args[0])])
    return hook


def main(run_dir: Path, audit_dir: Path, arguments: list[str]) -> None:
    writes: list = []
    sys.addaudithook(recorder(run_dir, writes))
    from distilbert_cli.cli import app

    try:
        app(arguments, prog_name="distil", standalone_mode=False)
    finally:
        (audit_dir / f"writes-rank{os.environ['RANK']}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
