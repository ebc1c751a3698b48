"""Producers, handlers and setups for the tests of what a person at the terminal
sees (tests/integration/test_terminal.py), used as
``tests/integration/terminal_jobs.py:NAME``.  ``TJ_N`` sets how many tasks."""

from __future__ import annotations

import os
import time
from typing import Any

#: What setup_client opened in this consumer process (None before it ran).
CLIENT: dict[str, Any] | None = None


def _n() -> int:
    return int(os.environ.get("TJ_N", "40"))


def produce_list() -> list[int]:
    """A list: its len() is the job's total, known before any task is done."""
    return list(range(_n()))


def produce_generator() -> Any:
    yield from range(_n())


def handle_chatty(item: int) -> None:
    """Prints one long line a task, slowly enough for the display to redraw
    between lines; a line drawn through by the display would be broken."""
    time.sleep(0.05)
    print(f"handled item {item:04d} " + "x" * 60 + " end", flush=True)


def handle_failing_odd(item: int) -> None:
    if item % 2:
        raise ValueError(f"odd {item}")


def setup_client() -> None:
    global CLIENT
    CLIENT = {"pid": os.getpid()}


def handle_with_client(item: int) -> None:
    """Fails unless setup_client ran in this very process."""
    if CLIENT is None or CLIENT["pid"] != os.getpid():
        raise RuntimeError("setup did not run in this consumer")


def setup_fails() -> None:
    raise ConnectionError("database at db:5432 refused the connection")


class NotAFunction:
    def __init__(self, item: Any = None) -> None:
        self.item = item


def produce_unencodable() -> Any:
    yield 1
    yield 2
    yield object()
    yield 3
