"""Every shell and Python block of the README runs as pasted.

The blocks run in the checkout, in the order a reader meets them, against a real
redis-server this module starts.  A block that cannot run here says so in the
README, in an HTML comment on the line before it, with the reason:

* ``<!-- readme-test: skip: REASON -->`` — not run (it installs, needs Docker,
  or is an outline).  A skipped block that exports ``PCQ_URL`` (names the
  reader's server) stands for the test's own server: from there on, every block
  runs with ``PCQ_URL`` set to it, as in the reader's shell.
* ``<!-- readme-test: background: REASON -->`` — started, left running while the
  next block runs (a consumer waiting for the producer of another "host"), then
  waited for: it must exit 0 by itself.

Scale knobs the examples read from the environment keep the run short
(PRIMES_RANGES, LOGS_FILES; LOGS_DIR in a temporary directory).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers_cli import ROOT

README = ROOT / "README.md"
RUNNABLE = {"sh": "bash", "bash": "bash", "python": "python"}
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|background):\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
#: What the test never runs, marked or not: it would change this machine
#: (installing into the shared interpreter, or starting containers).
CHANGES_THE_MACHINE = re.compile(r"\bpip\b[^\n]*\binstall\b|\bapt(-get)?\b|\bdocker\b")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    lang: str
    code: str
    mode: str  # "run", "skip" or "background"
    reason: str
    with_url: bool  # PCQ_URL is set, as the reader's shell has it by then


def blocks(text: str) -> list[Block]:
    """The README's fenced blocks of a runnable language, in order."""
    found: list[Block] = []
    lines = text.splitlines()
    with_url = False
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        lang = opening.group(1)
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(before)
        mode, reason = (marker.group(1), marker.group(2)) if marker else ("run", "")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        if lang in RUNNABLE:
            found.append(Block(i + 1, lang, code, mode, reason, with_url))
        if mode == "skip" and "export PCQ_URL=" in code:
            with_url = True
        i = end + 1
    return found


def groups(found: list[Block]) -> Iterator[list[Block]]:
    """Blocks run together: background ones with the block that follows them."""
    pending: list[Block] = []
    for block in found:
        if block.mode == "skip":
            continue
        pending.append(block)
        if block.mode == "run":
            yield pending
            pending = []
    assert not pending, f"background block at line {pending[0].line} has nothing after it"


GROUPS = list(groups(blocks(README.read_text())))


def test_the_readme_marks_every_block_it_does_not_run_with_a_reason() -> None:
    found = blocks(README.read_text())
    assert len(GROUPS) >= 5  # the extraction finds the README's examples
    for block in found:
        assert block.mode == "run" or len(block.reason) > 10, block
        assert block.mode == "skip" or not CHANGES_THE_MACHINE.search(block.code), block
    # Given the many-hosts example, then it runs with PCQ_URL set, as pasted
    assert any("pcq consume" in b.code and b.with_url and b.mode == "background"
               for b in found)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    from redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


def _environment(tmp: Path, url: str | None) -> dict[str, str]:
    """The reader's shell: `pcq` is this checkout's (a wrapper on PATH)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "pcq"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pcq.cli "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCQ_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHONPATH=str(ROOT), PRIMES_RANGES="12",
               LOGS_FILES="12", LOGS_DIR=str(tmp / "logs"), LOGS_DB=str(tmp / "errors.sqlite3"))
    if url is not None:
        env["PCQ_URL"] = url
    return env


def _start(block: Block, env: dict[str, str]) -> subprocess.Popen[str]:
    command = ["bash", "-e", "-c", block.code] if RUNNABLE[block.lang] == "bash" else [
        sys.executable, "-c", block.code]
    return subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen[str], block: Block, timeout: float) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"README block at line {block.line} did not finish in {timeout} s:\n{out}")
    assert proc.returncode == 0, f"README block at line {block.line} failed:\n{out}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("group", GROUPS, ids=[f"line{g[-1].line}" for g in GROUPS])
def test_a_readme_block_runs_as_pasted(group: list[Block], server_url: str,
                                       tmp_path: Path) -> None:
    # (a block that installs or starts containers is never run, even unmarked)
    assert not any(CHANGES_THE_MACHINE.search(block.code) for block in group), group
    # Given the reader's shell at this point of the README
    env = _environment(tmp_path, server_url if group[-1].with_url else None)
    # When the block is pasted (after the background ones before it)
    started = [(_start(block, env), block) for block in group[:-1]]
    try:
        _finish(_start(group[-1], env), group[-1], 60)
        # Then it exits 0, and so does every background block, by itself
        for proc, block in started:
            _finish(proc, block, 30)
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
