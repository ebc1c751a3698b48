"""What child processes tell the trial about themselves: timestamps and peak RSS.

Every system under test starts its workers with ``multiprocessing.Process``
(pcq's Producer/Consumer, the classic pattern, Pool workers).  :func:`install`
registers an after-fork hook, so each child registers an exit finalizer that
runs right after its ``run()`` returns (pcq's consumer has acknowledged its
last lease and taken its sentinel by then).  It appends one JSON line —
name, pid, ``time.monotonic()``, CPU seconds used and ``VmHWM`` from
``/proc/self/status`` — to
the file named by ``$PCQ_BENCH_PROBE``.  :func:`mark` appends a line at any
other moment (the producer's first put).

``time.monotonic()`` is CLOCK_MONOTONIC, one clock for every process on Linux,
so the parent can subtract the children's timestamps.  Lines are written with
one ``write`` on an ``O_APPEND`` file, so lines of concurrent processes never mix.
"""

from __future__ import annotations

import json
import multiprocessing.util
import os
import time
from multiprocessing import current_process
from typing import Any

ENV = "PCQ_BENCH_PROBE"


class _Hook:
    """Kept alive by this module: ``register_after_fork`` holds it weakly."""


_hook = _Hook()
_extra: dict[str, Any] = {}


def install(path: str) -> None:
    """Call in the trial process before it starts any child."""
    os.environ[ENV] = path
    open(path, "w").close()
    multiprocessing.util.register_after_fork(_hook, _after_fork)


def _after_fork(_: object) -> None:
    _extra.clear()
    multiprocessing.util.Finalize(None, _at_exit, exitpriority=100)


def _at_exit() -> None:
    cpu = os.times()
    write({"exit": time.monotonic(), "vmhwm_kb": peak_rss_kb(), "cpu_s": cpu.user + cpu.system,
           **_extra})


def note(**values: Any) -> None:
    """Values this child adds to its exit line (e.g. how many tasks it handled)."""
    _extra.update(values)


def mark(event: str, **values: Any) -> None:
    """Write a line now: ``{"event": event, "t": monotonic, ...}``."""
    write({"event": event, "t": time.monotonic(), **values})


def write(record: dict[str, Any]) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    record = {"pid": os.getpid(), "name": current_process().name, **record}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def read(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_rss_kb(pid: int | str = "self") -> int:
    """VmHWM (peak resident set size) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def role(name: str) -> str:
    """producer / consumer / other, from a process name."""
    lowered = name.lower()
    if "producer" in lowered:
        return "producer"
    if "consumer" in lowered or "poolworker" in lowered:
        return "consumer"
    return "other"
