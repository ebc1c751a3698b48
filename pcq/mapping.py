"""``pcq.map``: results back to the caller, like ``Pool.imap_unordered`` / ``imap``.

A map is a two-queue pipeline whose last stage is the caller::

    caller's iterable ─► Producer process ─► IN ─► workers (ResultStage) ─► OUT ─► caller

Items travel in chunks ``[start, [item, ...]]`` (``chunksize`` items, as with
``Pool``); a worker's result for a chunk is ``[start, values, errors]``
(``errors``: the items that failed, once the chunk has failed its retries); the
results of one lease go to OUT as one message.  They are put on OUT by the same atomic step that
acknowledges the lease on IN, so each item's result reaches the caller exactly
once, even when a worker is SIGKILLed mid-task and the chunk runs again.

Memory stays flat for an endless input: the caller counts the results it has
yielded in shared memory (one int64 only it writes), and the producer waits
before item ``i`` while ``i - yielded >= window``.  So at most ``window`` items
(plus one chunk) are anywhere between the iterable and the caller — in IN, in
flight, in OUT or waiting in the reorder buffer of ``ordered=True`` — and IN's
``maxsize`` holds the producer back on top of that.

The end: the producer process puts everything and exits; the caller then
closes IN; OUT closes once IN is fully acknowledged (:mod:`pcq.stages`), and
the caller's take on OUT returns its sentinel.  Leaving early (``break``, an
exception, ``close()``) stops the producer and every worker, purges both queues
and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pcq.backends import open_queue
from pcq.backends.base import MAX_BATCH
from pcq.envelope import unpack_value
from pcq.errors import PcqError, TaskFailed
from pcq.pipeline import stage_queue
from pcq.roles import Producer
from pcq.run import GRACE_SECONDS
from pcq.settings import StageSettings
from pcq.stages import ResultStage, close_if_finished
from pcq.supervisor import Supervisor, wait

#: How long the caller waits for results before it looks after its processes.
POLL = 0.05


class MapIterator(Iterator[Any]):
    """The iterator :func:`map` returns.  Use it in a ``for`` loop or ``with``
    block; :meth:`close` (also called when it is garbage-collected) stops
    everything it started."""

    def __init__(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        *,
        workers: int,
        chunksize: int,
        ordered: bool,
        window: int | None,
        maxsize: int,
        retries: int,
        timeout: float | None,
        backend: str | None,
        url: str | None,
        queue: str | None,
        grace: float,
        **queue_options: Any,
    ) -> None:
        if workers < 1 or chunksize < 1:
            raise ValueError("workers and chunksize must be at least 1")
        self._closed = True  # until everything below exists
        self.ordered = ordered
        self.window = window or max(4 * maxsize, 4096 * workers, 128 * workers * chunksize)
        self._grace = grace
        name = queue or f"pcq-map-{uuid.uuid4().hex[:12]}"
        self._own_queues = queue is None  # throwaway queues: nothing is left on a server
        self._in = open_queue(backend, url=url, name=name, maxsize=maxsize, **queue_options)
        self._out = self._in.sibling(stage_queue(name, 1))
        self._yielded = mp.get_context("fork" if sys.platform.startswith("linux") else None
                                       ).RawValue("q", 0)
        inq, out = self._in, self._out
        settings = StageSettings(workers=workers, retries=retries, timeout=timeout,
                                 max_deliveries=inq.max_deliveries)
        self._supervisor = Supervisor(
            inq, lambda i: ResultStage(inq, func, to=out, settings=settings,
                                       name=f"pcq-map-{i}"), settings)
        yielded, window = self._yielded, self.window

        def produce() -> Iterator[list[Any]]:
            items = iter(iterable)
            index = 0
            while True:
                if index - yielded.value >= window:  # a full window: wait for the caller
                    pause = 0.0001
                    while index - yielded.value >= window:
                        time.sleep(pause)
                        pause = min(pause * 2, 0.01)
                chunk = list(itertools.islice(items, chunksize))
                if not chunk:
                    return
                yield [index, chunk]
                index += len(chunk)

        self._in.set_feeds(self._out.name)
        self._in.attach_producer()  # keeps IN open until the producer process is done
        self._out.attach_consumer()
        self._closed = False
        self._supervisor.start()
        self._producer: Producer | None = Producer(inq, produce, name="pcq-map-producer")
        self._producer.start()
        self._producer_failed = False
        self._in_closed = False
        self._drained = False
        # Results come a chunk at a time, [start, values, errors or None] (see
        # ResultStage): the one being yielded, and those received after it — in
        # arrival order (unordered), or by start until their turn comes (ordered).
        self._current: list[Any] = []
        self._start = 0
        self._errors: dict[int, str] | None = None
        self._pos = 0
        self._arrived: deque[list[Any]] = deque()
        self._chunks: dict[int, list[Any]] = {}
        self._next = 0  # ordered: the index to yield next
        self._chunksize = chunksize
        self._count = 0  # results yielded (published to the producer before each take)
        self._next_check = 0.0

    def __iter__(self) -> MapIterator:
        return self

    def __enter__(self) -> MapIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> Any:
        while True:
            current, pos = self._current, self._pos
            if pos < len(current):
                self._pos = pos + 1
                if self._errors is None or pos not in self._errors:
                    return current[pos]
                raise TaskFailed(self._start + pos, self._errors[pos])
            if not self._advance():
                raise StopIteration

    def _advance(self) -> bool:
        """Make the next chunk of results current; False when there is none left."""
        self._count += len(self._current)
        self._current, self._pos = [], 0
        while True:
            if self.ordered:
                found = self._chunks.pop(self._next, None)
            else:
                found = self._arrived.popleft() if self._arrived else None
            if found is not None:
                self._start, self._current, self._errors = found
                self._next = self._start + len(self._current)
                return True
            if self._closed:
                return False
            if self._drained and self._chunks:  # ordered, and a chunk has no result
                index = self._next
                self._next += self._chunksize
                raise TaskFailed(index, "no result: its chunk was dead-lettered unhandled")
            if self._drained:
                self.close()
                if self._producer_failed:
                    raise PcqError("pcq.map: the input iterable raised (see the "
                                   "traceback above); the items before it were mapped")
                return False
            self._receive()

    def _receive(self) -> None:
        """Take what OUT holds (waiting a moment if nothing), and look after the
        producer and the workers now and then."""
        self._yielded.value = self._count  # the producer may go on this far
        lease = self._out.take(MAX_BATCH, timeout=POLL)
        if lease is not None:
            self._out.ack(lease)  # in our hands now: nothing downstream can lose it
            for batch in lease.batches:
                for chunks in batch.bodies:  # a worker's lease: its chunks' results
                    for packed in chunks:
                        results = unpack_value(packed)
                        if self.ordered:
                            self._chunks[results[0]] = results
                        else:
                            self._arrived.append(results)
            if lease.sentinel is not None:
                self._drained = True
        now = time.monotonic()
        if lease is None or now >= self._next_check:
            self._tend()
            self._next_check = now + POLL

    def _tend(self) -> None:
        supervisor = self._supervisor
        supervisor.poll(wait(supervisor.sentinels(), 0) if supervisor.sentinels() else [])
        producer = self._producer
        if producer is not None and producer.exitcode is not None:
            producer.join()
            self._producer_failed = producer.exitcode != 0
            if producer.exitcode < 0:  # killed: it could not detach itself
                self._in.detach_producer(close_if_last=False)
            producer.close()
            self._producer = None
            self._in.detach_producer(close_if_last=True)
            self._in_closed = True
        if self._in_closed:  # in case the last worker to finish was killed
            close_if_finished(self._in, self._out)

    def close(self) -> None:
        """Stop the producer and the workers, drop what the queues still hold.
        Idempotent; nothing is left running when it returns."""
        if self._closed:
            return
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(ProcessLookupError):
                producer.terminate()
        self._supervisor.stop(self._grace)
        if producer is not None:
            producer.join(self._grace)
            if producer.is_alive():
                producer.kill()
                producer.join()
            producer.close()
        with contextlib.suppress(PcqError):
            self._out.detach_consumer()
            for q in (self._in, self._out):
                q.purge()
                q.purge_dead()
                if self._own_queues:
                    q.forget()
        self._out.dispose()
        self._in.dispose()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def map(
    func: Callable[[Any], Any],
    iterable: Iterable[Any],
    *,
    workers: int = 4,
    chunksize: int = 1,
    ordered: bool = False,
    window: int | None = None,
    maxsize: int = 1000,
    retries: int = 0,
    timeout: float | None = None,
    backend: str | None = None,
    url: str | None = None,
    queue: str | None = None,
    grace: float = GRACE_SECONDS,
    **queue_options: Any,
) -> MapIterator:
    """Apply ``func`` to every item of ``iterable`` in ``workers`` processes and
    iterate over the results: as they come (``ordered=False``, like
    ``Pool.imap_unordered``) or in input order (``ordered=True``, like
    ``Pool.imap``).

    Items go to the workers in chunks of ``chunksize``, as with ``Pool``: for a
    cheap ``func`` a large chunk (hundreds) saves the per-task overhead; a chunk
    with a failing item is retried whole, and ``timeout`` applies to a chunk.
    Every item's result arrives exactly once, even if a worker is killed and its
    chunk runs again.  An item whose task fails after ``retries`` raises
    :class:`~pcq.errors.TaskFailed` when iteration reaches it (iteration may go
    on past it).  At most ``window`` items are in the works at once (default:
    ``max(4 * maxsize, 4096 * workers, 128 * workers * chunksize)``), so an
    endless input is fine.
    ``backend="redis"`` (or a redis ``url``) sends items and results through
    that server; ``queue`` names the queues (default: a fresh name).  Leaving
    the loop early stops every process it started.
    """
    return MapIterator(func, iterable, workers=workers, chunksize=chunksize, ordered=ordered,
                       window=window,
                       maxsize=maxsize, retries=retries, timeout=timeout, backend=backend,
                       url=url, queue=queue, grace=grace, **queue_options)
