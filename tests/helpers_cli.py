"""Running the `pcq` command as a child process in tests."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PCQ = [sys.executable, "-m", "pcq.cli"]


def pcq_env(url: str, out: Path, **extra: str) -> dict[str, str]:
    """An environment for a `pcq` child: the URL, a fresh queue name, JOBS_OUT."""
    env = dict(os.environ)
    env.update(PCQ_URL=url, PCQ_QUEUE=f"t-{uuid.uuid4().hex[:10]}", JOBS_OUT=str(out),
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


#: Every process start_pcq started, so that a test that fails half way leaves
#: none running (tests/integration/conftest.py kills what is left).
STARTED: list[subprocess.Popen[str]] = []


def start_pcq(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `pcq ARGS` in a session of its own (so a test can kill the group)."""
    proc = subprocess.Popen([*PCQ, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def kill_started() -> None:
    """SIGKILL the session of every process start_pcq started that still runs."""
    while STARTED:
        proc = STARTED.pop()
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def read_terminal(master: int, proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    """Everything ``proc`` wrote to the pseudo-terminal ``master`` until it exited
    (or ``timeout``), without terminal escapes; closes ``master``.  Returns
    (exit code, text)."""
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # every writer closed the terminal
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return code, _ANSI.sub("", output.decode(errors="replace"))
