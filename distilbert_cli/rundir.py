"""The run-directory contract that stages hand artifacts through.

`<run_dir>/<stage>/manifest.json` says what a stage is: its status, resolved config, overrides,
inputs (with content fingerprints), package versions, git commit and times. The manifest is
written `running` before heavy work and rewritten `complete` (atomically: temporary name, then
rename) only once every output is in place, so a crash never leaves a complete stage behind.
A later stage finds its inputs with `require_complete(run_dir, stage)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distilbert_cli.errors import UsageError
from distilbert_cli.logs import attach_file_log, detach_file_log, is_main_process, wait_for_everyone

MANIFEST = "manifest.json"
# The manifest holds the fingerprint itself, and the log keeps growing after it is taken.
_UNFINGERPRINTED = (MANIFEST, "log.txt")
_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "hydra-core", "omegaconf",
             "wandb", "numpy", "distilbert_cli")

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload) -> None:
    """Write JSON under a temporary name and rename it over `path` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def fingerprint(path: Path) -> str:
    """sha256 over the relative names, sizes and contents of every file under `path` (or of one file)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if rel in _UNFINGERPRINTED:
            continue
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    """The checkout's commit, or None outside git (the reference crashed there)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def require_complete(run_dir: str | Path, stage: str) -> Path:
    """The directory of a complete input stage, or a UsageError naming the path."""
    stage_dir = Path(run_dir) / stage
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise UsageError(f"input stage {stage} not found: {stage_dir / MANIFEST} does not exist "
                         f"(run `distil {stage} run_dir={run_dir}` first)")
    if manifest.get("status") != "complete":
        raise UsageError(f"input stage {stage} is not complete (status {manifest.get('status')!r}): {stage_dir}")
    return stage_dir


@dataclass
class Stage:
    """An open stage directory: where outputs go and which inputs were consumed."""

    name: str
    path: Path
    manifest: dict
    inputs: list[dict] = field(default_factory=list)

    def use_stage(self, run_dir: str | Path, stage: str) -> Path:
        """Consume a complete stage of the same run, recording its fingerprint."""
        stage_dir = require_complete(run_dir, stage)
        self.inputs.append({"stage": stage, "path": str(stage_dir),
                            "fingerprint": read_manifest(stage_dir).get("fingerprint")})
        self._write()
        return stage_dir

    def use_path(self, path: str | Path, role: str) -> Path:
        """Consume a file or directory from outside the run dir, fingerprinting its contents."""
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{role} not found: {path}")
        self.inputs.append({"role": role, "path": str(path.resolve()), "fingerprint": fingerprint(path)})
        self._write()
        return path

    def use_reference(self, name: str, role: str) -> None:
        """Record an input that is not a local path (a hub name), without a fingerprint."""
        self.inputs.append({"role": role, "name": name, "fingerprint": None})
        self._write()

    def use_model(self, name_or_path: str, role: str) -> None:
        """Record a model or tokenizer: fingerprinted when it is a local directory, by name when from the hub."""
        if Path(name_or_path).expanduser().exists():
            self.use_path(Path(name_or_path).expanduser(), role)
        else:
            self.use_reference(name_or_path, role)

    def update(self, **fields) -> None:
        """Add stage-specific facts (layer maps, parameter counts...) to the manifest."""
        self.manifest.update(fields)
        self._write()

    def _write(self) -> None:
        if is_main_process():
            self.manifest["inputs"] = self.inputs
            write_json_atomic(self.path / MANIFEST, self.manifest)


def _prepare_stage_dir(stage_dir: Path, overwrite: bool, keep_partial: bool) -> None:
    manifest = read_manifest(stage_dir)
    if manifest is not None and manifest.get("status") == "complete":
        if not overwrite:
            raise UsageError(f"stage already complete: {stage_dir} (pass overwrite=true to replace it)")
        shutil.rmtree(stage_dir)
    elif stage_dir.exists() and not keep_partial:
        shutil.rmtree(stage_dir)  # leftovers of a crashed run are never reused silently
    stage_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def open_stage(cfg: DictConfig, stage: str, overrides: Sequence[str] = (), keep_partial: bool = False
               ) -> Iterator[Stage]:
    """Open `<cfg.run_dir>/<stage>/`, log to its log.txt, and mark it complete only if the body succeeds.

    `keep_partial` keeps the files of an earlier incomplete attempt (the distill stage resumes from its
    checkpoints); otherwise they are removed. Only the main process writes; the others wait for it.
    """
    stage_dir = Path(cfg.run_dir) / stage
    if is_main_process():
        _prepare_stage_dir(stage_dir, bool(cfg.overwrite), keep_partial)
    wait_for_everyone()
    manifest = {
        "stage": stage,
        "status": "running",
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": list(overrides),
        "inputs": [],
        "versions": package_versions(),
        "git_commit": git_commit(),
        "started_at": _now(),
        "ended_at": None,
    }
    handler = attach_file_log(stage_dir / "log.txt")
    current = Stage(stage, stage_dir, manifest)
    current._write()
    log.info("stage %s -> %s", stage, stage_dir)
    try:
        yield current
        wait_for_everyone()
        manifest.update(status="complete", ended_at=_now(), fingerprint=fingerprint(stage_dir))
        current._write()
        log.info("stage %s complete: %s", stage, stage_dir)
    except BaseException:
        manifest.update(status="failed", ended_at=_now())
        current._write()
        raise
    finally:
        detach_file_log(handler)
