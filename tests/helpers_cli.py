"""Running the `pcq` command as a child process in tests."""

from __future__ import annotations

import os
import subprocess
import sys
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


def start_pcq(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `pcq ARGS` in a session of its own (so a test can kill the group)."""
    return subprocess.Popen([*PCQ, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


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
