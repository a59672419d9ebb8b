"""Interrupts and child processes while a command runs.

SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, `kill`) raise `errors.Interrupted` in the main thread, so the open
stage is marked failed and the command ends with one line and exit code 130; a second signal during that clean-up
stops the process at once. Python's own KeyboardInterrupt would do for SIGINT, but SIGTERM kills a process without
any clean-up, and libraries replace a KeyboardInterrupt by errors of their own (datasets' multi-process `map`
re-raises it as a TimeoutError), so `received()` says that an interrupt came, whatever exception it became.

Every process forked while a command runs (datasets' `map` workers and its manager, DataLoader workers) leaves
SIGINT to its parent (a terminal sends Ctrl-C to the whole process group: each worker would print a traceback),
takes SIGTERM's default (its parent's pool terminates it with SIGTERM) and dies with its parent even after a
`kill -9`: Linux's parent-death signal (PR_SET_PDEATHSIG), set for children forked by the main thread (the signal
follows the thread that forked, and a helper thread may end before its child). Elsewhere a killed parent's
workers end when they next find their parent gone, as Python's pools do.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distilbert_cli.errors import Interrupted

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"guarding": False, "received": None, "forker": None, "main_thread_forks": False}
_hooks_registered = False


def received() -> str | None:
    """The name of the signal that interrupted the running command (None: none came, or no command is guarded)."""
    return _state["received"]


def _on_signal(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _state["received"] is not None:  # a second Ctrl-C while the first one's clean-up runs
        os.write(2, f"error: interrupted again by {name}: stopping at once (the stage may still say running)\n"
                    .encode())
        os._exit(128 + signum)
    _state["received"] = name
    raise Interrupted(name)


def _before_fork() -> None:
    _state["forker"] = os.getpid()
    _state["main_thread_forks"] = threading.current_thread() is threading.main_thread()


def _in_child() -> None:
    if not _state["guarding"]:
        return
    _state["guarding"] = False  # the child's own children are its business
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _state["main_thread_forks"] and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _state["forker"]:  # the parent died before the signal was set
            os._exit(1)


@contextmanager
def interrupts_as_errors() -> Iterator[None]:
    """While the block runs: SIGINT and SIGTERM raise `Interrupted`, and forked children obey their parent (see the
    module docstring). Outside the main thread (where signals cannot be handled) the block just runs."""
    global _hooks_registered
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _hooks_registered:
        os.register_at_fork(before=_before_fork, after_in_child=_in_child)
        _hooks_registered = True
    previous = {signum: signal.signal(signum, _on_signal) for signum in _STOP_SIGNALS}
    _state.update(guarding=True, received=None)
    try:
        yield
    finally:
        _state.update(guarding=False, received=None)
        for signum, handler in previous.items():  # None: a handler set outside Python
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
