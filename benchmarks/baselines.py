"""What pcq is measured against, written the way people write them by hand.

* :func:`classic` — the ``multiprocessing.JoinableQueue`` pattern: one producer
  process fills the queue, W consumer processes ``get()`` / ``task_done()``,
  one ``None`` sentinel per consumer, the parent ``join()``s.
* :func:`pool` — ``multiprocessing.Pool.imap_unordered`` (the parent produces).
* :func:`raw_redis` — the plain redis-py reliable-queue loop: the producer
  ``LPUSH``es one task per call; a consumer ``BLMOVE``s one task from ready to
  its processing list, handles it and ``LREM``s it: two round trips a task.

Each returns ``{"done": tasks handled}``; the trial reads timings and RSS from
the probe file (see :mod:`benchmarks.probe`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Iterable
from typing import Any

from benchmarks import probe, tasks

Produce = Callable[[], Iterable[Any]]
Handle = Callable[[Any], Any]

# ---------------------------------------------------------------- JoinableQueue


def classic(produce: Produce, handle: Handle, *, workers: int, maxsize: int) -> dict[str, Any]:
    """The classic pattern; ``maxsize`` 0 is unbounded."""
    q: Any = mp.JoinableQueue(maxsize)
    consumers = [
        mp.Process(target=_classic_consume, args=(q, handle), name=f"consumer-{i}")
        for i in range(workers)
    ]
    producer = mp.Process(target=_classic_produce, args=(q, produce, workers), name="producer")
    _run_to_end(producer, consumers, "classic-pattern", q.join)
    return {}


def _run_to_end(
    producer: Any, consumers: list[Any], what: str, then: Any = None
) -> None:
    """Start the consumers, then the producer; wait for the producer, ``then()``
    (the classic pattern's ``join``), and every consumer; fail if one failed."""
    for c in consumers:
        c.start()
    producer.start()
    producer.join()
    if then is not None:
        then()
    for c in consumers:
        c.join()
    if producer.exitcode or any(c.exitcode for c in consumers):
        raise RuntimeError(f"a {what} process failed")


def _classic_produce(q: Any, produce: Produce, workers: int) -> None:
    for item in produce():
        q.put(item)
    for _ in range(workers):
        q.put(None)


def _classic_consume(q: Any, handle: Handle) -> None:
    handled = 0
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            break
        handle(item)
        q.task_done()
        handled += 1
    probe.note(handled=handled)


# ---------------------------------------------------------------- Pool


def pool(n: int, *, workers: int, chunksize: int) -> dict[str, Any]:
    """``imap_unordered(noop, range(n), chunksize)``; the window is timed here,
    from the call to the last result, with the workers already started."""
    with mp.Pool(workers) as p:
        p.map(tasks.noop, range(workers))  # every worker is up
        started = time.monotonic()
        done = sum(1 for _ in p.imap_unordered(tasks.noop, range(n), chunksize))
        window = time.monotonic() - started
    return {"done": done, "window_s": window}


# ---------------------------------------------------------------- raw redis-py

STOP = b"STOP"


def raw_redis(
    produce: Produce,
    handle: Handle,
    decode: Callable[[bytes], Any],
    *,
    workers: int,
    url: str,
    prefix: str,
) -> dict[str, Any]:
    import redis  # noqa: F401 - loaded once here; the forked children inherit it

    ready = f"{prefix}:ready"
    consumers = [
        mp.Process(
            target=_raw_consume, args=(url, ready, f"{prefix}:processing:{i}", handle, decode),
            name=f"consumer-{i}",
        )
        for i in range(workers)
    ]
    producer = mp.Process(target=_raw_produce, args=(url, ready, produce, workers), name="producer")
    _run_to_end(producer, consumers, "raw-redis")
    return {}


def _raw_produce(url: str, ready: str, produce: Produce, workers: int) -> None:
    import redis

    r = redis.Redis.from_url(url)
    for item in produce():
        r.lpush(ready, repr(item))
    for _ in range(workers):
        r.lpush(ready, STOP)


def _raw_consume(
    url: str, ready: str, processing: str, handle: Handle, decode: Callable[[bytes], Any]
) -> None:
    import redis

    r = redis.Redis.from_url(url)
    handled = 0
    while True:
        raw: Any = r.blmove(ready, processing, 1, "RIGHT", "LEFT")  # bytes: no decoding
        if raw is None:
            continue
        if raw == STOP:
            r.lrem(processing, 1, raw)
            break
        handle(decode(raw))
        r.lrem(processing, 1, raw)
        handled += 1
    probe.note(handled=handled)
