"""The classic program (tests/apps/classic_joinable.py) with one line changed.

A producer puts N items and joins; 16 consumers on ``maxsize=16`` get and
task_done until a None; the parent puts one None per consumer.  The same
program runs on the standard library's JoinableQueue (the control: the program
itself is right), on pcq's local backend and on a real redis-server; then with
one consumer SIGKILLed between get() and task_done(), where the standard
library's producer would wait in join() for ever: every item is handled
exactly once, and every process exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
from helpers import session_members, wait_for

APP = "tests/apps/classic_joinable.py"
N = 200


def run_classic(kind: str, outdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen([sys.executable, APP, kind, str(outdir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    # Nothing outlives the program.
    wait_for(lambda: not session_members(proc.pid, zombies=False), timeout=5,
             message=f"the processes of {proc.args} to exit")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def handled(outdir: Path) -> Counter[int]:
    return Counter(int(line) for path in outdir.iterdir() if path.name.isdigit()
                   for line in path.read_text().split())


def where(kind: str, redis_url: str) -> list[str]:
    if kind != "redis":
        return []
    return ["--url", redis_url, "--name", f"classic-{uuid.uuid4().hex[:8]}"]


@pytest.mark.parametrize("kind", ["stdlib", "local", "redis"])
def test_classic_program_handles_every_item_and_every_process_exits(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    # Given the classic program, when it runs with this queue
    done = run_classic(kind, tmp_path, *where(kind, redis_url))
    # Then every item was handled once, and the producer and 16 consumers exited 0
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "exit codes " + " ".join(["0"] * 17)
    assert handled(tmp_path) == Counter(range(N))


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_classic_program_survives_a_consumer_killed_mid_task(
    kind: str, tmp_path: Path, redis_url: str
) -> None:
    # Given the classic program, when the consumer that gets item 50 is
    # SIGKILLed after get() and before task_done()
    done = run_classic(kind, tmp_path, "--kill", "50", *where(kind, redis_url))
    # Then item 50 went to another consumer: every item handled exactly once,
    # the producer's join() returned, and every process exited
    assert (tmp_path / "killed").exists()
    assert done.returncode == 0, done.stderr
    codes = done.stdout.split()[2:]
    assert sorted(codes) == sorted(["-9"] + ["0"] * 16), done.stdout
    assert handled(tmp_path) == Counter(range(N))

