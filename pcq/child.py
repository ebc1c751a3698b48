"""What every child process of a job does, producer or consumer: it forks
(whatever the platform's default start method), it gets SIGTERM when its
parent dies (no orphans), and it can arm a watchdog that kills it when a stop
takes too long."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from typing import Any

from pcq.settings import fork_context

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make sure this child gets SIGTERM if its parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # pragma: no cover - no prctl: watch the parent instead
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def kill_self_after(seconds: float) -> threading.Timer:
    """A watchdog that SIGKILLs this process in ``seconds`` unless cancelled.
    Dying by a signal tells the parent that nothing was cleaned up."""
    watchdog = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    return watchdog


class ChildProcess(mp.Process):
    """``multiprocessing.Process`` that forks on Linux, whatever the default start
    method (Python 3.14 makes it forkserver there): a queue, a handler loaded
    from ``path/file.py:function`` and a lambda cross into a forked child as they
    are, with nothing to pickle or re-import."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # the hook multiprocessing itself uses
        return fork_context().Process._Popen(process_obj)
