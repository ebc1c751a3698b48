"""Producers and handlers for tests/integration/test_new_user.py, used as
``tests/integration/new_user_jobs.py:NAME``.  ``NU_N`` sets how many tasks,
``NU_SLEEP`` how long a task takes, ``NU_PAUSE`` the pause between items of
``produce_slowly``.  Run as a script with ``map``, it is a pcq.map caller whose
function fails for item 7 and that catches the TaskFailed."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


def _n() -> int:
    return int(os.environ.get("NU_N", "20"))


def produce() -> list[int]:
    return list(range(_n()))


def produce_slowly() -> Any:
    for i in range(_n()):
        time.sleep(float(os.environ.get("NU_PAUSE", "0.01")))
        yield i


def handle(item: int) -> None:
    time.sleep(float(os.environ.get("NU_SLEEP", "0")))


def fail_on_7(item: int) -> int:
    if item == 7:
        raise ValueError(f"bad item {item}")
    return item * 2


def map_failing() -> None:
    """A pcq.map caller: prints what the TaskFailed holds, then re-raises the
    rebuilt exception for an ``except ValueError``."""
    import pcq

    with pcq.map(fail_on_7, range(10), workers=2) as results:
        try:
            for _ in results:
                pass
        except pcq.TaskFailed as failed:
            print(f"index={failed.index} type={failed.type_name} message={failed.message}")
            try:
                raise failed.exception from failed  # type: ignore[misc]
            except ValueError as exc:
                print(f"except ValueError: {exc}")


if __name__ == "__main__" and sys.argv[1:] == ["map"]:
    map_failing()
