"""The one exception type that means "the user asked for something impossible", and the one-line messages for
files that cannot be read or written."""

from __future__ import annotations

import errno
from pathlib import Path


class UsageError(Exception):
    """A user mistake (bad config value, missing input, wrong file). The CLI prints it as one line and exits 2."""


def first_line(exc: BaseException) -> str:
    """An exception's message reduced to its first line (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unreadable(path: str | Path, reason: BaseException | str) -> UsageError:
    """`<file> is unreadable (<reason>)`: a file that exists but cannot be used (corrupt, truncated, wrong format)."""
    if isinstance(reason, FileNotFoundError):
        reason = "missing"
    return UsageError(f"{path} is unreadable ({reason if isinstance(reason, str) else first_line(reason)})")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a full disk. Libraries that write through their own
    I/O (safetensors, Arrow, torch) report ENOSPC as text rather than as an OSError with its errno."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(exc) or f"os error {errno.ENOSPC})" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
