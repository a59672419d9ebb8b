"""The run-directory contract that stages hand artifacts through.

`<run_dir>/<stage>/manifest.json` says what a stage is: its status, resolved config, overrides,
inputs (with content fingerprints), package versions, git commit and times. The manifest is
written `running` before heavy work and rewritten `complete` (atomically: temporary name, then
rename) only once every output is in place, so a crash never leaves a complete stage behind.

- One writer per stage, and none while the stage is read: `open_stage` holds `<run_dir>/.<stage>.lock` exclusively
  (an flock, so the kernel releases it when its holder dies; the file names the holder's pid, host and start time),
  and a stage holds the same file shared for each input stage it reads (`Stage.use_stage`), leaving a record of
  itself in `<run_dir>/.<stage>.readers/`. A writer refused names the writer or the readers; a reader refused names
  the writer; neither touches anything. A lock left by a dead process is taken over with a warning.
- A complete manifest keeps the sha256 of every output file (`files`; logs and the stage's own records, such as
  timings, left out) and their combined `fingerprint`. A later stage finds its inputs through its `Run`
  (`Run.require`), and `Stage.use_stage` re-hashes them, refusing any file changed, missing or added since. A path
  into a stage folder, of this run or another (`Stage.use_path`), is that stage's input the same way. Before a
  stage is marked complete it checks that every input still carries the fingerprint it recorded and that no file
  it read changed, and that it left the outputs it declared (`Stage.expect`).
- A failed stage leaves no temporary files (names starting `.tmp-`) and says `failed`; a full disk, a read-only or
  unwritable run directory, or a file, folder or link in the way becomes one line naming the stage and the path;
  an interrupt (`errors.Interrupted`) marks the stage failed. Nothing is removed through a symbolic link: a stage
  folder or lock that is one is refused.
- Names that become folders of the run directory are single safe path components (`folder_name_problem`).
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import glob
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import subprocess
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from distilbert_cli import processes
from distilbert_cli.errors import (
    Interrupted,
    UsageError,
    filesystem_problem,
    first_line,
    invalid_entry,
    is_disk_full,
    unreadable,
)
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

_MAX_NAME_CHARS = 100
_MAX_NAME_BYTES = 255  # a file name's limit on Linux file systems (NAME_MAX)


def folder_name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder of a stage (a model's name in finetune/<model>/...), or None when it can: it
    must be a single path component, not `.` or `..`, visible (hidden names starting with a dot include the `.tmp-`
    temporaries a failed stage removes), without control characters, and of a sane length."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is not a folder of its own"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if any(unicodedata.category(char).startswith("C") for char in name):
        return "it holds a control or unprintable character"
    if name.startswith("."):
        return "it starts with a dot, like the hidden .tmp- files a failed stage removes"
    if len(name) > _MAX_NAME_CHARS or len(name.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        return f"it is longer than {_MAX_NAME_CHARS} characters"
    return None


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


def save_arrays_atomic(path: Path, arrays: dict) -> None:
    """numpy arrays by name in one safetensors file (nothing to unpickle), atomically."""
    from safetensors.numpy import save_file

    tmp = temporary_path(path)
    try:
        save_file(arrays, str(tmp))
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


def _files(path: Path, unfingerprinted: Sequence[str] = (), reads: str = "*") -> dict[str, Path]:
    """Every file under `path` (or the one file) by relative name, less the manifest, the log and any file or folder
    whose name is in `unfingerprinted`, and only the relative names matching the glob `reads`."""
    path = Path(path)
    if not path.is_dir():
        return {path.name: path}
    skipped = {*_UNFINGERPRINTED, *unfingerprinted}
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if not skipped.intersection(rel.parts) and fnmatch.fnmatch(rel.as_posix(), reads):
            files[rel.as_posix()] = file
    return files


def file_digests(path: Path, unfingerprinted: Sequence[str] = (), reads: str = "*") -> dict[str, str]:
    """The sha256 of every file under `path` (or of one file) by relative name, streamed (1.6 GB/s on a 2-core CPU
    from the page cache, scripts/bench_verify_inputs.py), up to 4 files at once. Left out: the manifest, the log,
    and any file or folder whose name is in `unfingerprinted`; only the relative names matching the glob `reads`
    are hashed."""
    files = _files(path, unfingerprinted, reads)
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


class _ManifestShape(BaseModel):
    """The fields of a manifest that the run-directory code reads (stages add facts of their own)."""

    model_config = ConfigDict(strict=True, extra="allow")
    stage: str
    status: str
    files: dict[str, str] | None = None  # older manifests have no digests
    fingerprint: str | None = None
    unfingerprinted: list[str] = []
    inputs: list[dict] = []
    config: dict = {}


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, None when it has none, a UsageError when it cannot be read or is not the manifest of
    this stage folder (a field of the wrong type, another stage's name)."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise unreadable(path, exc) from exc
    if not isinstance(manifest, dict):
        raise unreadable(path, "not a stage manifest: not a JSON object")
    try:
        _ManifestShape.model_validate(manifest)
    except ValidationError as exc:
        raise unreadable(path, f"not a stage manifest: {invalid_entry(exc)}") from None
    if manifest["stage"] != Path(stage_dir).name:
        raise unreadable(path, f"it is the manifest of stage {manifest['stage']!r}, not of its folder "
                               f"{Path(stage_dir).name!r}")
    return manifest


def is_complete(manifest: dict | None) -> bool:
    """Whether a stage's manifest (None: it has none) says the stage is complete: the one test of it."""
    return manifest is not None and manifest["status"] == "complete"


def verify_outputs(stage_dir: Path, manifest: dict, reads: str = "*") -> None:
    """Re-hash a complete stage's files (those matching `reads`) against the digests its manifest recorded."""
    stage = manifest["stage"]
    if manifest.get("files") is None:
        log.warning("%s records no file digests (written by an older version): its files are not verified",
                    stage_dir / MANIFEST)
        return
    recorded = {name: digest for name, digest in manifest["files"].items() if fnmatch.fnmatch(name, reads)}
    current = file_digests(stage_dir, manifest.get("unfingerprinted", ()), reads)
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
        if is_complete(manifest):
            self._complete[stage] = manifest
        return manifest

    def complete(self, stage: str) -> Path | None:
        """The stage's directory if it is complete (the upstream's for a stage this run has none of), else None
        (for readers that report what is there)."""
        holder = self._holder(stage)
        return holder.stage_dir(stage) if is_complete(holder.manifest(stage)) else None

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


@dataclass(frozen=True)
class _Read:
    """An input stage this stage holds a read lock on, and the fingerprint its manifest had when it was verified."""

    run: Run
    stage: str
    fingerprint: str | None


@dataclass
class Stage:
    """An open stage directory: where outputs go, which inputs were consumed (and are held read-locked until the
    stage closes), and which outputs it must leave."""

    name: str
    path: Path
    manifest: dict
    run: Run
    inputs: list[dict] = field(default_factory=list)
    _locks: ExitStack = field(default_factory=ExitStack, repr=False)
    _reads: dict[tuple[Path, str], _Read] = field(default_factory=dict, repr=False)  # (run, stage) -> its read
    _verified: set[tuple[Path, str, str]] = field(default_factory=set, repr=False)  # (run, stage, glob) hashed
    _seen: dict[Path, tuple[int, int, int]] = field(default_factory=dict, repr=False)  # file read -> its stat
    _expected: list[Path] = field(default_factory=list, repr=False)

    def use_stage(self, stage: str, reads: str = "*", run: Run | None = None) -> Path:
        """Consume a complete stage of this run (or of `run`): hold it read-locked until this stage closes, verify
        the files it wrote (those matching the glob `reads`, the ones this stage reads) against its manifest, and
        record its fingerprint. A stage this run reads from its upstream run is locked and checked there."""
        run = (run or self.run)._holder(stage)
        stage_dir, manifest = self._read_stage(run, stage, reads)
        entry = {"stage": stage, "path": str(stage_dir), "fingerprint": manifest.get("fingerprint")}
        if run is not self.run:
            entry["run_dir"] = str(run.path)
        if entry not in self.inputs:
            self.inputs.append(entry)
            self._write()
        return stage_dir

    def use_path(self, path: str | Path, role: str) -> Path:
        """Consume a file or directory by path. Inside a stage folder, of this run or another, it is that stage's
        input (complete, read-locked, its files verified: `use_stage`); anywhere else its contents are
        fingerprinted. Either way the manifest records it under `role`, and the stage checks at its end that it
        did not change."""
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{role} not found: {path}")
        entry = {"role": role, "path": str(path.resolve())}
        if (found := stage_folder_of(path)) is not None:
            run, stage, reads = found
            if run.path.resolve() == self.run.path.resolve():
                run = self.run
                if stage == self.name:
                    raise UsageError(f"{role} {path} is inside the folder of stage {stage} itself, which this run "
                                     "rewrites: copy it elsewhere first")
            stage_dir, manifest = self._read_stage(run, stage, reads)
            entry.update(fingerprint=_part_fingerprint(manifest, path, stage_dir) or fingerprint(path),
                         from_stage={"run_dir": str(run.path), "stage": stage,
                                     "fingerprint": manifest.get("fingerprint")})
        else:
            entry["fingerprint"] = fingerprint(path)
            self._remember(_files(path).values())
        self.inputs.append(entry)
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

    def expect(self, *outputs: str | Path) -> None:
        """Outputs (files or folders, relative to the stage folder or paths in it) the stage must leave, each there
        and not empty, checked before it is marked complete: a stage whose work all failed is failed, not
        complete."""
        self._expected += [self.path / output for output in outputs]

    def no_work(self, what: str) -> UsageError:
        """The error for output that is there but says the work was not done (every measurement skipped, no
        result): raise it inside the stage and the stage is failed."""
        return UsageError(f"stage {self.name} did no work: {what}; the stage is failed, not complete")

    def _read_stage(self, run: Run, stage: str, reads: str) -> tuple[Path, dict]:
        """Read-lock (once) and verify (once per glob) a stage of `run`; its folder and manifest."""
        key = (run.path.resolve(), stage)
        if run.manifest(stage) is None:
            run.require(stage)  # not found: refused before any lock file is made for it
        if is_main_process() and key not in self._reads:
            self._locks.enter_context(read_lock(run.path, stage, self._reader()))
            run._complete.pop(stage, None)  # read again under the lock: a writer may have replaced it since
        stage_dir = run.require(stage)
        manifest = run.manifest(stage)
        if is_main_process():
            self._reads.setdefault(key, _Read(run, stage, manifest.get("fingerprint")))
            if (*key, reads) not in self._verified and (*key, "*") not in self._verified:
                verify_outputs(stage_dir, manifest, reads)
                self._verified.add((*key, reads))
                self._remember(_files(stage_dir, manifest.get("unfingerprinted", ()), reads).values())
        wait_for_everyone()
        return stage_dir, manifest

    def _reader(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started_at": _now(), "stage": self.name,
                "run_dir": str(self.run.path)}

    def _remember(self, files) -> None:
        """Note each file's size, modification time and inode, to see at the end whether it changed."""
        for file in files:
            stat = file.stat()
            self._seen[file] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)

    def _check_inputs(self) -> None:
        """Every input stage still complete with the fingerprint it had when read, and every file read unchanged:
        otherwise the outputs describe inputs that are gone."""
        for read in self._reads.values():
            stage_dir = read.run.stage_dir(read.stage)
            manifest = read_manifest(stage_dir)
            if manifest is None or manifest["status"] != "complete" or manifest.get("fingerprint") != read.fingerprint:
                now = "gone" if manifest is None else f"{manifest['status']}, fingerprint {manifest.get('fingerprint')}"
                raise UsageError(f"input stage {read.stage} of {read.run.path} changed while stage {self.name} ran "
                                 f"(now {now}): this stage's outputs may not match it; run it again")
        for file, seen in self._seen.items():
            try:
                stat = file.stat()
                now = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            except OSError:
                now = None
            if now != seen:
                raise UsageError(f"input {file} changed while stage {self.name} read it ("
                                 f"{'gone' if now is None else 'rewritten'}): this stage's outputs may not match it; "
                                 "run it again once nothing rewrites its inputs")

    def _check_expected(self) -> None:
        for output in self._expected:
            if not output.exists():
                raise self.no_work(f"{output} is missing")
            empty = not any(p.is_file() for p in output.rglob("*")) if output.is_dir() else output.stat().st_size == 0
            if empty:
                raise self.no_work(f"{output} is empty")

    def _write(self) -> None:
        if is_main_process():
            self.manifest["inputs"] = self.inputs
            write_json_atomic(self.path / MANIFEST, self.manifest)


def stage_folder_of(path: str | Path) -> tuple[Run, str, str] | None:
    """(the run, the stage, the glob of the files under `path`) when `path` lies inside a stage folder (a folder
    with a manifest of that stage's name, or with the stage's lock beside it); None elsewhere."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / MANIFEST).is_file() and (lock_path(folder.parent, folder.name).is_file()
                                              or _manifest_names(folder)):
            rel = path.relative_to(folder).as_posix()
            reads = "*" if rel == "." else glob.escape(rel) + ("" if path.is_file() else "/*")
            return Run(folder.parent), folder.name, reads
    return None


def _manifest_names(folder: Path) -> bool:
    with suppress(OSError, ValueError):
        manifest = json.loads((folder / MANIFEST).read_text())
        return isinstance(manifest, dict) and manifest.get("stage") == folder.name
    return False


def _part_fingerprint(manifest: dict, path: Path, stage_dir: Path) -> str | None:
    """The fingerprint of `path` (a file or folder in a verified stage) from its stage's recorded digests, as
    `fingerprint(path)` would compute it; None when they do not cover it."""
    files = manifest.get("files") or {}
    rel = path.resolve().relative_to(stage_dir.resolve()).as_posix()
    if rel == ".":
        digests = files
    elif path.is_file():
        digests = {path.name: files[rel]} if rel in files else {}
    else:
        digests = {name[len(rel) + 1:]: digest for name, digest in files.items() if name.startswith(f"{rel}/")}
    return combined_fingerprint(digests) if digests else None


# ---- locks -----------------------------------------------------------------------------------------------------
# One lock file per stage, `<run_dir>/.<stage>.lock`: its writer holds an exclusive flock, each stage reading it a
# shared one. filelock (the writer's) has no shared flock, and its ReadWriteLock is a SQLite database that would
# not contend with the writer's flock, so readers call fcntl.flock on the same file themselves.

def lock_path(run_dir: str | Path, stage: str) -> Path:
    """Beside the stage folder, so that removing the folder cannot remove the lock."""
    return Path(run_dir) / f".{stage}.lock"


def readers_path(run_dir: str | Path, stage: str) -> Path:
    """Where the stages reading `stage` leave a record of themselves (one JSON file each)."""
    return Path(run_dir) / f".{stage}.readers"


def _read_holder(text: str) -> dict | None:
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _alive(record: dict) -> bool:
    """Whether the process a lock record names still runs (always assumed on another host)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _refuse_links(*paths: Path) -> None:
    """Lock files and folders are opened and cleared: never through a symbolic link, never a folder as a lock."""
    for path in paths:
        if path.is_symlink():
            raise UsageError(f"{path} is a symbolic link (to {os.readlink(path)}): the run directory's locks are "
                             "plain files and folders; remove the link (nothing was written through it)")
    if paths[0].is_dir():
        raise UsageError(f"{paths[0]} is a folder where a stage's lock file belongs: move or remove it")


def _readers(run_dir: Path, stage: str) -> list[dict]:
    """The live readers' records (a killed reader's record stays until the next writer clears it)."""
    folder = readers_path(run_dir, stage)
    records = []
    with suppress(OSError):
        for entry in sorted(folder.iterdir()):
            with suppress(OSError):
                if (record := _read_holder(entry.read_text(errors="replace"))) is not None and _alive(record):
                    records.append(record)
    return records


def _clear_readers(run_dir: Path, stage: str) -> None:
    """Under the writer's exclusive lock no one reads the stage: every reader record left is a killed reader's."""
    folder = readers_path(run_dir, stage)
    with suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            os.unlink(entry.path)  # a link is removed, never followed


def _user(record: dict) -> str:
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, running since {record.get('started_at', '?')}"


@contextmanager
def read_lock(run_dir: Path, stage: str, reader: dict) -> Iterator[None]:
    """Hold `stage` of `run_dir` shared while reading it: its writer cannot take it meanwhile, and a stage being
    written cannot be read (a UsageError naming the writer). `reader` (pid, host, start, the reading stage) is left
    in the stage's readers folder, for a refused writer to name. A run no one can write to (read-only) is read
    without a lock: no writer can start there either."""
    path = lock_path(run_dir, stage)
    _refuse_links(path, readers_path(run_dir, stage))
    fd = _open_lock_for_reading(path)
    if fd is None:
        log.debug("%s cannot be created: reading stage %s of %s unlocked", path, stage, run_dir)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace")) or {}
            raise UsageError(f"input stage {stage} of {run_dir} is being written by {_user(holder)} (lock {path}): "
                             "wait for it to finish or stop it") from None
        record = _leave_record(run_dir, stage, reader)
        try:
            yield
        finally:
            if record is not None:
                record.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for the copies of the descriptor a forked worker holds
    finally:
        os.close(fd)


def _open_lock_for_reading(path: Path) -> int | None:
    """The lock file, created if need be; read-only where it cannot be written; None where it is missing and cannot
    be created (a read-only run)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _leave_record(run_dir: Path, stage: str, reader: dict) -> Path | None:
    folder = readers_path(run_dir, stage)
    record = folder / f"{reader['host']}-{reader['pid']}-{secrets.token_hex(4)}.json"
    try:
        folder.mkdir(exist_ok=True)
        fd = os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        return None  # held, but unnamed: a refused writer says so
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(reader) + "\n")
    return record


def _in_use(run_dir: Path, stage: str, path: Path) -> UsageError:
    """Why the writer's lock is taken: a live writer, or the stages reading it."""
    holder = _read_holder(path.read_text(errors="replace")) or {}
    if holder and _alive(holder):
        return UsageError(f"stage {stage} of {run_dir} is in use by {_user(holder)} (lock {path}): wait for it to "
                          "finish or stop it")
    readers = _readers(run_dir, stage)
    if not readers:
        return UsageError(f"stage {stage} of {run_dir} is in use by another process, which left no record (lock "
                          f"{path}): wait for it to finish or stop it")
    first = readers[0]
    more = f" and {len(readers) - 1} more" if len(readers) > 1 else ""
    return UsageError(f"stage {stage} of {run_dir} is being read by stage {first.get('stage', '?')} of "
                      f"{first.get('run_dir', '?')} ({_user(first)}){more} (lock {path}): wait for it to finish or "
                      "stop it")


@contextmanager
def stage_lock(run_dir: Path, stage: str) -> Iterator[dict | None]:
    """Hold the stage's lock exclusively; yields the record of a holder that died without releasing it (else None)."""
    from filelock import FileLock, Timeout

    path = lock_path(run_dir, stage)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run_dir {run_dir} is a file, not a folder: choose another run_dir")
    _refuse_links(path, readers_path(run_dir, stage))
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
        raise _in_use(run_dir, stage, path) from None
    try:
        _clear_readers(run_dir, stage)
        yield _read_holder(left_behind[0]) if left_behind and left_behind[0].strip() else None
    finally:
        with suppress(OSError):
            os.truncate(path, 0)  # released cleanly: the next holder has nothing to take over
        lock.release()


def remove_tree(path: Path) -> None:
    """Remove a stage's folder or one of its files or folders, never through a symbolic link: a link is refused with
    one line naming it (shutil.rmtree refuses one too, in words that name no path)."""
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link (to {os.readlink(path)}): a stage's folders must be real folders "
                         "of the run directory; replace the link (nothing was removed through it)")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prepare_stage_dir(stage_dir: Path, overwrite: bool, keep_partial: bool) -> None:
    if stage_dir.is_symlink():
        remove_tree(stage_dir)  # refused, naming it
    if stage_dir.exists() and not stage_dir.is_dir():
        raise UsageError(f"{stage_dir} is a file where the stage's folder belongs: move or remove it")
    try:
        manifest = read_manifest(stage_dir)
    except UsageError as exc:
        if not overwrite:
            raise UsageError(f"{exc} (pass overwrite=true to replace the stage)") from exc
        manifest = None
    if is_complete(manifest):
        if not overwrite:
            raise UsageError(f"stage already complete: {stage_dir} (pass overwrite=true to replace it)")
        remove_tree(stage_dir)
    elif stage_dir.exists() and not keep_partial:
        remove_tree(stage_dir)  # leftovers of a crashed run are never reused silently
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
    """Lock and open `<run>/<stage>/`, log to its log.txt, and mark it complete only if the body succeeds, its
    inputs are unchanged and its declared outputs are there (`Stage.expect`).

    `cfg` is the command's validated config (recorded in the manifest; `cfg.overwrite` replaces a complete stage).
    `keep_partial` keeps the files of an earlier incomplete attempt (the training stages resume from their
    checkpoints); otherwise they are removed. `unfingerprinted` names the files and folders that record the run
    rather than being its output (timings, the stage's own checkpoints): left out of the fingerprint. Only the
    main process locks and writes; the others wait for it. The input stages read are held read-locked until the
    stage closes.
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
            with current._locks:
                if left_behind is not None:
                    log.warning("took over the lock of stage %s from pid %s on %s (running since %s), which ended "
                                "without releasing it", stage, left_behind.get("pid"), left_behind.get("host"),
                                left_behind.get("started_at"))
                current._write()
                log.info("stage %s -> %s", stage, stage_dir)
                yield current
                wait_for_everyone()
                if is_main_process():
                    current._check_expected()
                    current._check_inputs()
                    skipped = [*_UNFINGERPRINTED, *unfingerprinted]
                    digests = file_digests(stage_dir, skipped)
                    manifest.update(status="complete", ended_at=_now(), files=digests,
                                    fingerprint=combined_fingerprint(digests), unfingerprinted=skipped)
                    current._write()
            log.info("stage %s complete: %s", stage, stage_dir)
        except BaseException as exc:
            _fail(current, exc, keep_partial)
            raise
        finally:
            detach_file_log(handler)


def _fail(current: Stage, exc: BaseException, resumable: bool) -> None:
    """Remove the temporaries and mark the stage failed (the main process); an interrupt becomes `Interrupted` naming
    the stage, a full disk or another file-system problem a UsageError naming the stage and the path (else `exc`
    goes on)."""
    signal_name = processes.received()
    interrupted = signal_name is not None or isinstance(exc, KeyboardInterrupt)
    unmarked = ""
    if is_main_process():
        where = _failed_write(exc, current.path) if is_disk_full(exc) else None
        remove_temporaries(current.path)
        current.manifest.update(status="failed", ended_at=_now())
        try:
            current._write()
        except OSError as write_error:
            unmarked = (f"; its manifest could not even be marked failed ({first_line(write_error)}), so it still "
                        "says running (never complete)")
            log.error("%s: cannot mark the stage failed: %s", current.path / MANIFEST, first_line(write_error))
    if interrupted:
        raise Interrupted(signal_name or getattr(exc, "signal_name", "SIGINT"), current.name, current.run.path,
                          resumable, marked=not unmarked) from exc
    if not is_main_process() or isinstance(exc, UsageError):
        return
    if where is not None:
        try:
            free = f" ({shutil.disk_usage(current.path).free / 1e6:.1f} MB free there now)"
        except OSError:
            free = ""
        raise UsageError(f"stage {current.name} ran out of disk space writing {where}{free}; temporary files "
                         f"removed, the stage is failed{unmarked}") from exc
    if (problem := filesystem_problem(exc)) is not None:
        raise UsageError(f"stage {current.name} failed: {problem}; temporary files removed, the stage is "
                         f"failed{unmarked}") from exc
