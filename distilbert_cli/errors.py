"""The exception types that end a command with one line (a user mistake: exit 2; an interrupt: exit 130), and the
one-line messages for files that cannot be read or written."""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path


class UsageError(Exception):
    """A user mistake (bad config value, missing input, wrong file). The CLI prints it as one line and exits 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the command (a KeyboardInterrupt, so that no `except Exception` swallows it). The
    stage that was open says which stage it marked failed; the CLI prints one line and exits 130."""

    def __init__(self, signal_name: str, stage: str | None = None, run_dir: str | Path | None = None,
                 resumable: bool = False, marked: bool = True):
        super().__init__(signal_name)
        self.signal_name, self.stage, self.run_dir = signal_name, stage, run_dir
        self.resumable, self.marked = resumable, marked

    def message(self) -> str:
        if self.stage is None:
            return f"interrupted by {self.signal_name} before any stage started (nothing was written)"
        then = "resume it" if self.resumable else "run it again"
        marked = "marked failed" if self.marked else "could not be marked failed, so it still says running"
        return f"interrupted by {self.signal_name} (stage {self.stage} of {self.run_dir} {marked}; rerun the " \
               f"same command to {then})"


def first_line(exc: BaseException) -> str:
    """An exception's message reduced to its first line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unreadable(path: str | Path, reason: BaseException | str) -> UsageError:
    """`<file> is unreadable (<reason>)`: a file that exists but cannot be used (corrupt, truncated, wrong format)."""
    if isinstance(reason, FileNotFoundError):
        reason = "missing"
    return UsageError(f"{path} is unreadable ({reason if isinstance(reason, str) else first_line(reason)})")


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, once each."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


# Libraries that do their own I/O (safetensors, Arrow, torch) report an OS error as text, not as an OSError's errno.
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]|os error (\d+)\)|errno:? (\d+)", re.IGNORECASE)


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if match := _ERRNO_IN_TEXT.search(str(exc)):
        return int(next(group for group in match.groups() if group))
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk."""
    return any(_errno_of(e) == errno.ENOSPC or "No space left on device" in str(e) for e in _causes(exc))


# What to do about each file-system error a run directory meets (a full disk has its own message).
_FILESYSTEM_ADVICE = {
    errno.EROFS: "read-only file system: choose a run_dir on a writable one, or remount it read-write",
    errno.EACCES: "permission denied: give this user access to it, or choose another run_dir",
    errno.EPERM: "operation not permitted: give this user access to it, or choose another run_dir",
    errno.EEXIST: "it already exists and is in the way: move or remove it",
    errno.ENOTDIR: "a part of this path is a file where a folder belongs: move or remove that file, or choose "
                   "another run_dir",
    errno.EISDIR: "it is a folder where a file belongs: move or remove the folder",
    errno.ELOOP: "a symbolic link where a real file or folder belongs (or a loop of links): replace the link with "
                 "the real file or folder",
}


def filesystem_problem(exc: BaseException) -> str | None:
    """`<path>: <what is wrong>: <what to do>` when `exc` (or an exception it was raised from) is a file-system error
    a user can fix (read-only, permissions, a file or folder or link in the way), else None."""
    for cause in _causes(exc):
        number = _errno_of(cause)
        if number in _FILESYSTEM_ADVICE:
            where = getattr(cause, "filename", None) or first_line(cause)
            return f"{where}: {_FILESYSTEM_ADVICE[number]}"
    return None


# pydantic's error types in words about a JSON document (its own messages name its internal classes).
_INVALID = {"missing": "is missing", "model_type": "is not a JSON object", "dict_type": "is not a JSON object",
            "list_type": "is not a list", "string_type": "is not a string", "int_type": "is not an integer",
            "float_type": "is not a number", "bool_type": "is not true or false", "extra_forbidden": "is not expected",
            "literal_error": "is not one of the allowed values"}


def invalid_entry(exc) -> str:
    """The first problem of a pydantic ValidationError about a JSON document, as `<path in it> <what is wrong>`:
    `data[0].paragraphs[1].qas is not a list`."""
    error = exc.errors()[0]
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    what = _INVALID.get(error["type"], error["msg"].removeprefix("Value error, ").lower())
    return f"{where or 'the top level'} {what}"
