"""The systems under test: pcq through its public ``pcq.run.run`` API, and the
baselines of :mod:`benchmarks.baselines`, behind one call."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks import baselines


@dataclass(frozen=True)
class System:
    name: str
    label: str
    kind: str  # "pcq", "classic", "pool", "raw-redis"
    backend: str = ""  # pcq only
    maxsize: int = 0  # pcq and classic; 0 = unbounded
    chunksize: int = 0  # pool only

    @property
    def needs_redis(self) -> bool:
        return self.kind == "raw-redis" or self.backend == "redis"


SYSTEMS = {
    s.name: s
    for s in [
        System("pcq-local-16", "pcq local, maxsize 16", "pcq", backend="local", maxsize=16),
        System("pcq-local-1000", "pcq local, maxsize 1000", "pcq", backend="local", maxsize=1000),
        System("pcq-redis", "pcq redis, maxsize 1000", "pcq", backend="redis", maxsize=1000),
        System("jq-16", "JoinableQueue(maxsize=16)", "classic", maxsize=16),
        System("jq-unbounded", "JoinableQueue() unbounded", "classic", maxsize=0),
        System("pool-1", "Pool.imap_unordered chunksize 1", "pool", chunksize=1),
        System("pool-500", "Pool.imap_unordered chunksize 500", "pool", chunksize=500),
        System("redis-raw", "raw redis-py LPUSH / BLMOVE+LREM", "raw-redis"),
    ]
}


def run_system(
    system: System,
    produce: Callable[[], Iterable[Any]],
    handle: Callable[[Any], Any],
    decode: Callable[[bytes], Any],
    *,
    n: int,
    workers: int,
    url: str | None,
) -> dict[str, Any]:
    """Run one job; returns what the system itself reports (``done`` at least,
    where the system counts it)."""
    if system.kind == "pcq":
        from pcq.run import run  # imported here: a baseline's processes never load pcq

        summary = run(
            produce,
            handle,
            workers=workers,
            maxsize=system.maxsize,
            backend=system.backend,
            url=url if system.backend == "redis" else None,
            queue=f"bench-{uuid.uuid4().hex[:12]}",
        )
        return {"done": summary.done, "failed": summary.failed,
                "pcq_elapsed_s": summary.elapsed_s, "restarts": summary.restarts}
    if system.kind == "classic":
        return baselines.classic(produce, handle, workers=workers, maxsize=system.maxsize)
    if system.kind == "pool":
        return baselines.pool(n, workers=workers, chunksize=system.chunksize)
    if system.kind == "raw-redis":
        assert url is not None
        return baselines.raw_redis(produce, handle, decode, workers=workers, url=url,
                                   prefix=f"raw-{uuid.uuid4().hex[:12]}")
    raise ValueError(f"unknown system kind {system.kind!r}")


def pcq_redis_problem() -> str | None:
    """Why the pcq redis backend cannot be loaded, or None if it can.

    Checked in a separate interpreter, so the caller imports nothing.
    """
    code = "from pcq.backends import load_backend; load_backend('redis')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {proc.returncode}"
