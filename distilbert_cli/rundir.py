"""The run-directory contract that stages hand artifacts through.

`<run_dir>/<stage>/manifest.json` says what a stage is: its status, resolved config, overrides,
inputs (with content fingerprints), package versions, git commit and times. The manifest is
written `running` before heavy work and rewritten `complete` (atomically: temporary name, then
rename) only once every output is in place, so a crash never leaves a complete stage behind.

- One process per stage: `open_stage` holds `<run_dir>/.<stage>.lock` (an flock, so the kernel releases it when
  its holder dies; the file names the holder's pid, host and start time). A second process gets a UsageError
  naming the holder and touches nothing; a lock left by a dead process is taken over with a warning.
- A complete manifest keeps the sha256 of every output file (`files`; logs and the stage's own records, such as
  timings, left out) and their combined `fingerprint`. A later stage finds its inputs through its `Run`
  (`Run.require`), and `Stage.use_stage` re-hashes them, refusing any file changed, missing or added since.
- A failed stage leaves no temporary files (names starting `.tmp-`) and says `failed`; a full disk becomes one
  line naming the stage and the path.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from distilbert_cli.errors import UsageError, first_line, is_disk_full, unreadable
from distilbert_cli.logs import attach_file_log, detach_file_log, is_main_process, wait_for_everyone

MANIFEST = "manifest.json"
LOG = "log.txt"
# The manifest holds the fingerprint itself, and the log keeps growing after it is taken.
_UNFINGERPRINTED = (MANIFEST, LOG)
TEMPORARY_PREFIX = ".tmp-"
_HASH_CHUNK = 1 << 20
_HASH_THREADS = 4  # files hashed at once (hashlib releases the GIL): datasets come in several shards
_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "hydra-core", "omegaconf",
             "wandb", "numpy", "distilbert_cli")

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place; a failed or killed stage's are removed."""
    return path.with_name(f"{TEMPORARY_PREFIX}{path.name}")


def remove_temporaries(stage_dir: Path) -> None:
    for path in sorted(stage_dir.rglob(f"{TEMPORARY_PREFIX}*"), key=lambda p: len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` under a temporary name and rename it over `path` (atomic on POSIX)."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def file_digests(path: Path, unfingerprinted: Sequence[str] = (), reads: str = "*") -> dict[str, str]:
    """The sha256 of every file under `path` (or of one file) by relative name, streamed (1.6 GB/s on a 2-core CPU
    from the page cache, scripts/bench_verify_inputs.py), up to 4 files at once. Left out: the manifest, the log,
    and any file or folder whose name is in `unfingerprinted`; only the relative names matching the glob `reads`
    are hashed."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: _sha256(path)}
    skipped = {*_UNFINGERPRINTED, *unfingerprinted}
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if not skipped.intersection(rel.parts) and fnmatch.fnmatch(rel.as_posix(), reads):
            files[rel.as_posix()] = file
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(files, pool.map(_sha256, files.values()), strict=True))


def combined_fingerprint(digests: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(f"{name}\0{digests[name]}\n".encode())
    return "sha256:" + digest.hexdigest()


def fingerprint(path: Path) -> str:
    """One sha256 over the relative names and contents of every file under `path` (or of one file)."""
    return combined_fingerprint(file_digests(path))


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
    """The stage's manifest, None when it has none, a UsageError when it cannot be read."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("status"), str):
        raise unreadable(path, "not a stage manifest")
    return manifest


def verify_outputs(stage_dir: Path, manifest: dict, reads: str = "*") -> None:
    """Re-hash a complete stage's files (those matching `reads`) against the digests its manifest recorded."""
    stage = manifest["stage"]
    if "files" not in manifest:
        log.warning("%s records no file digests (written by an older version): its files are not verified",
                    stage_dir / MANIFEST)
        return
    recorded = {name: digest for name, digest in manifest["files"].items() if fnmatch.fnmatch(name, reads)}
    current = file_digests(stage_dir, manifest["unfingerprinted"], reads)
    rerun = f"restore it or run `distil {stage}` again with overwrite=true"
    for name in sorted(recorded.keys() | current.keys()):
        if name not in current:
            raise UsageError(f"{stage_dir / name} is missing: stage {stage} wrote it ({rerun})")
        if name not in recorded:
            raise UsageError(f"{stage_dir / name} was added after stage {stage} completed (remove it, or run "
                             f"`distil {stage}` again with overwrite=true)")
        if current[name] != recorded[name]:
            raise UsageError(f"{stage_dir / name} has changed since stage {stage} wrote it (sha256 "
                             f"{current[name][7:19]}..., recorded {recorded[name][7:19]}...; {rerun})")


@dataclass
class Run:
    """A run directory: where each stage lives, whether it is complete (asked here and nowhere else), each complete
    stage's manifest (read once), and the run-wide trust setting for code shipped with checkpoints.

    A run may have an `upstream` run (`upstream_run_dir`: a sweep member's is the sweep's own run directory): a
    stage this run has no manifest of is the upstream's complete stage, used in place, without a copy (its path and
    fingerprint are recorded and its files verified by the stage that reads it, as for the run's own)."""

    path: Path
    trust_remote_code: bool = False
    upstream: Run | None = None
    _complete: dict[str, dict] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def of(cls, cfg) -> Run:
        """The run of a validated config (its `run_dir`, `upstream_run_dir` and `trust_remote_code`)."""
        upstream = cls(Path(cfg.upstream_run_dir), cfg.trust_remote_code) if cfg.upstream_run_dir else None
        return cls(Path(cfg.run_dir), cfg.trust_remote_code, upstream)

    def stage_dir(self, stage: str) -> Path:
        """Where this run writes `stage` (an upstream stage is read where it is: `complete`, `require`)."""
        return self.path / stage

    def _holder(self, stage: str) -> Run:
        """The run whose `stage` this run reads: its own once it has a manifest of it, else a complete upstream's."""
        if (self.upstream is not None and not (self.stage_dir(stage) / MANIFEST).exists()
                and self.upstream.complete(stage) is not None):
            return self.upstream
        return self

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest (None when there is none); a complete one is read once and kept."""
        if (holder := self._holder(stage)) is not self:
            return holder.manifest(stage)
        if stage in self._complete:
            return self._complete[stage]
        manifest = read_manifest(self.stage_dir(stage))
        if manifest is not None and manifest["status"] == "complete":
            self._complete[stage] = manifest
        return manifest

    def complete(self, stage: str) -> Path | None:
        """The stage's directory if it is complete (the upstream's for a stage this run has none of), else None
        (for readers that report what is there)."""
        holder = self._holder(stage)
        manifest = holder.manifest(stage)
        return holder.stage_dir(stage) if manifest is not None and manifest["status"] == "complete" else None

    def require(self, stage: str) -> Path:
        """The directory of a complete input stage, or a UsageError naming the path."""
        if (stage_dir := self.complete(stage)) is not None:
            return stage_dir
        manifest, stage_dir = self.manifest(stage), self.stage_dir(stage)
        if manifest is None:
            upstream = f" (nor a complete one in the upstream run {self.upstream.path})" if self.upstream else ""
            raise UsageError(f"input stage {stage} not found: {stage_dir / MANIFEST} does not exist{upstream} "
                             f"(run `distil {stage} run_dir={self.path}` first)")
        raise UsageError(f"input stage {stage} is not complete (status {manifest['status']!r}): {stage_dir}")

    def open_stage(self, stage: str, cfg, overrides: Sequence[str] = (), keep_partial: bool = False,
                   unfingerprinted: Sequence[str] = ()):
        """`open_stage` of this run's `stage` (cfg: the command's validated config)."""
        return open_stage(self, stage, cfg, overrides, keep_partial, unfingerprinted)


@dataclass
class Stage:
    """An open stage directory: where outputs go and which inputs were consumed."""

    name: str
    path: Path
    manifest: dict
    run: Run
    inputs: list[dict] = field(default_factory=list)

    def use_stage(self, stage: str, reads: str = "*") -> Path:
        """Consume a complete stage of the same run: verify the files it wrote (those matching the glob `reads`,
        the ones this stage reads) against its manifest, and record its fingerprint."""
        stage_dir = self.run.require(stage)
        manifest = self.run.manifest(stage)
        if is_main_process():
            verify_outputs(stage_dir, manifest, reads)
        wait_for_everyone()
        self.inputs.append({"stage": stage, "path": str(stage_dir), "fingerprint": manifest.get("fingerprint")})
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


def lock_path(run_dir: str | Path, stage: str) -> Path:
    """Beside the stage folder, so that removing the folder cannot remove the lock."""
    return Path(run_dir) / f".{stage}.lock"


def _read_holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


@contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[dict | None]:
    """Hold the stage's lock; yields the record of a holder that died without releasing it (else None)."""
    from filelock import FileLock, Timeout

    path = lock_path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now()}
    left_behind = []

    def claim(fd: int) -> None:  # runs holding the flock: read what a dead holder left, then name ourselves
        left_behind.append(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError as exc:  # e.g. a full disk: name the file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

    lock = FileLock(path, timeout=0, on_acquired=claim, preserve_lock_file=True)
    try:
        lock.acquire()
    except Timeout:
        holder = _read_holder(path.read_text(errors="replace")) or {}
        raise UsageError(f"stage {stage} of {run_dir} is in use by pid {holder.get('pid', '?')} on "
                         f"{holder.get('host', '?')}, running since {holder.get('started_at', '?')} (lock {path}): "
                         "wait for it to finish or stop it") from None
    try:
        yield _read_holder(left_behind[0]) if left_behind and left_behind[0].strip() else None
    finally:
        with suppress(OSError):
            os.truncate(path, 0)  # released cleanly: the next holder has nothing to take over
        lock.release()


def _prepare_stage_dir(stage_dir: Path, overwrite: bool, keep_partial: bool) -> None:
    try:
        manifest = read_manifest(stage_dir)
    except UsageError as exc:
        if not overwrite:
            raise UsageError(f"{exc} (pass overwrite=true to replace the stage)") from exc
        manifest = None
    if manifest is not None and manifest.get("status") == "complete":
        if not overwrite:
            raise UsageError(f"stage already complete: {stage_dir} (pass overwrite=true to replace it)")
        shutil.rmtree(stage_dir)
    elif stage_dir.exists() and not keep_partial:
        shutil.rmtree(stage_dir)  # leftovers of a crashed run are never reused silently
    stage_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(stage_dir)  # what a killed attempt was writing


def _failed_write(exc: BaseException, stage_dir: Path) -> Path:
    """What a write that failed was writing: the file its error names, else the temporary file or folder written
    last (the libraries that write weights and Arrow files do not name it), else the stage folder."""
    named = next((e.filename for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, OSError) and e.filename),
                 None)
    if named:
        return Path(named)
    written = [path for tmp in stage_dir.rglob(f"{TEMPORARY_PREFIX}*")
               for path in (tmp, *(tmp.rglob("*") if tmp.is_dir() else ()))]
    return max(written, key=lambda path: path.stat().st_mtime_ns, default=stage_dir)


@contextmanager
def open_stage(run: Run, stage: str, cfg, overrides: Sequence[str] = (), keep_partial: bool = False,
               unfingerprinted: Sequence[str] = ()) -> Iterator[Stage]:
    """Lock and open `<run>/<stage>/`, log to its log.txt, and mark it complete only if the body succeeds.

    `cfg` is the command's validated config (recorded in the manifest; `cfg.overwrite` replaces a complete stage).
    `keep_partial` keeps the files of an earlier incomplete attempt (the training stages resume from their
    checkpoints); otherwise they are removed. `unfingerprinted` names the files and folders that record the run
    rather than being its output (timings, the stage's own checkpoints): left out of the fingerprint. Only the
    main process locks and writes; the others wait for it.
    """
    stage_dir = run.stage_dir(stage)
    run._complete.pop(stage, None)  # the stage is being rewritten
    with stage_lock(run.path, stage) if is_main_process() else nullcontext() as left_behind:
        if is_main_process():
            _prepare_stage_dir(stage_dir, cfg.overwrite, keep_partial)
        wait_for_everyone()
        manifest = {
            "stage": stage,
            "status": "running",
            "config": cfg.model_dump(mode="json"),
            "overrides": list(overrides),
            "inputs": [],
            "versions": package_versions(),
            "git_commit": git_commit(),
            "started_at": _now(),
            "ended_at": None,
        }
        handler = attach_file_log(stage_dir / LOG)
        current = Stage(stage, stage_dir, manifest, run)
        try:
            if left_behind is not None:
                log.warning("took over the lock of stage %s from pid %s on %s (running since %s), which ended "
                            "without releasing it", stage, left_behind.get("pid"), left_behind.get("host"),
                            left_behind.get("started_at"))
            current._write()
            log.info("stage %s -> %s", stage, stage_dir)
            yield current
            wait_for_everyone()
            if is_main_process():
                skipped = [*_UNFINGERPRINTED, *unfingerprinted]
                digests = file_digests(stage_dir, skipped)
                manifest.update(status="complete", ended_at=_now(), files=digests,
                                fingerprint=combined_fingerprint(digests), unfingerprinted=skipped)
                current._write()
            log.info("stage %s complete: %s", stage, stage_dir)
        except BaseException as exc:
            _mark_failed(current, exc)
            raise
        finally:
            detach_file_log(handler)


def _mark_failed(current: Stage, exc: BaseException) -> None:
    """Remove the temporaries and say `failed`; a full disk becomes a UsageError naming the stage and path."""
    if not is_main_process():
        return
    disk_full = is_disk_full(exc)
    where = _failed_write(exc, current.path) if disk_full else None
    remove_temporaries(current.path)
    current.manifest.update(status="failed", ended_at=_now())
    try:
        current._write()
        unmarked = ""
    except OSError as write_error:
        unmarked = (f"; its manifest could not even be marked failed ({first_line(write_error)}), so it still "
                    "says running (never complete)")
        log.error("%s: cannot mark the stage failed: %s", current.path / MANIFEST, first_line(write_error))
    if disk_full:
        try:
            free = f" ({shutil.disk_usage(current.path).free / 1e6:.1f} MB free there now)"
        except OSError:
            free = ""
        raise UsageError(f"stage {current.name} ran out of disk space writing {where}{free}; temporary files "
                         f"removed, the stage is failed{unmarked}") from exc
