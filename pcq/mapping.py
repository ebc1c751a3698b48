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

The producer process and the workers are a :class:`~pcq.job.Job` that the
caller ticks while it waits for results: the job closes IN when the producer
ends (a killed one is detached by its own id), and OUT once IN is fully
acknowledged; the caller's take on OUT then returns its sentinel.

Nothing is left running however the caller leaves.  A ``for`` loop iterates
over a generator of its own (:meth:`MapIterator.__iter__`): leaving the loop
early (``break``, an exception in its body) drops that generator, whose close
stops the job, purges both queues and removes the local broker's directory.
So do :meth:`MapIterator.close`, ``with``, the iterator's garbage collection,
and interpreter exit — also after an uncaught :class:`~pcq.errors.TaskFailed`,
which leaves the iterator alive in its traceback: a hook registered after
``multiprocessing``'s own exit hook (so it runs first) stops every map still
open, before ``multiprocessing`` joins the children.  A caller that catches
``TaskFailed`` can go on iterating past it: an exception raised by the map
itself stops nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing.util
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pcq.backends.base import MAX_BATCH, Queue
from pcq.envelope import unpack_value
from pcq.errors import PcqError, TaskFailed
from pcq.job import Job, StagePlan
from pcq.pipeline import open_stages
from pcq.settings import GRACE_SECONDS, StageSettings, fork_context
from pcq.stages import ResultStage

#: How long the caller waits for results before it looks after its processes.
POLL = 0.05


class _Running:
    """What a map started, apart from the iterator (so that stopping it at
    garbage collection or at exit needs no reference to the iterator)."""

    def __init__(self, job: Job, inq: Queue, out: Queue, own_queues: bool) -> None:
        self.job, self.inq, self.out, self.own_queues = job, inq, out, own_queues
        self.stopped = False

    def stop(self) -> None:
        """Stop the producer and the workers, drop what the queues still hold.
        Idempotent; nothing is left running when it returns."""
        if self.stopped:
            return
        self.stopped = True
        _OPEN.discard(self)
        self.job.stop()
        with contextlib.suppress(PcqError):
            self.out.detach_consumer()
            for q in (self.inq, self.out):
                q.purge()
                q.purge_dead()
                if self.own_queues:
                    q.forget()  # throwaway queues: nothing is left on a server
        self.out.dispose()
        self.inq.dispose()


#: Maps still running, stopped at interpreter exit (see the module docstring).
_OPEN: set[_Running] = set()


def _stop_open_maps() -> None:
    for running in list(_OPEN):
        with contextlib.suppress(Exception):
            running.stop()


# Registered after multiprocessing.util's own exit hook (imported above), so it
# runs first: atexit runs hooks last-registered first.
assert multiprocessing.util is not None
atexit.register(_stop_open_maps)


class MapIterator(Iterator[Any]):
    """The iterator :func:`map` returns.  Use it in a ``for`` loop or ``with``
    block; :meth:`close` (also called when it is garbage-collected, when a
    ``for`` loop over it is left early, and at interpreter exit) stops
    everything it started."""

    # Takes pcq.map's options as map received them (it is what map returns).
    def __init__(  # noqa: PLR0913
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        settings: StageSettings,
        *,
        chunksize: int,
        ordered: bool,
        window: int | None,
        maxsize: int,
        backend: str | None,
        url: str | None,
        queue: str | None,
        grace: float,
        **queue_options: Any,
    ) -> None:
        if chunksize < 1:
            raise ValueError("chunksize must be at least 1")
        self.ordered = ordered
        workers = settings.workers
        self.window = window or max(4 * maxsize, 4096 * workers, 128 * workers * chunksize)
        name = queue or f"pcq-map-{uuid.uuid4().hex[:12]}"
        inq, out = open_stages(backend, url, name, [maxsize, 0],
                               max_deliveries=settings.max_deliveries, **queue_options)
        self._out = out
        self._yielded = fork_context().RawValue("q", 0)
        plan = StagePlan("map", inq, func, settings, to=out, kind=ResultStage)
        job = Job([plan], produce=_windowed(iterable, chunksize, self._yielded, self.window),
                  producers=1, grace=grace)
        self._running = _Running(job, inq, out, own_queues=queue is None)
        _OPEN.add(self._running)
        self._job = job
        try:
            out.attach_consumer()
            job.start()
        except BaseException:
            self._running.stop()
            raise
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

    def __iter__(self) -> Iterator[Any]:
        """A generator of its own for each loop: when a loop is left early, the
        generator is dropped and closed, and that stops the map."""
        return self._loop()

    def _loop(self) -> Iterator[Any]:
        try:
            while True:
                if self._pos >= len(self._current) and not self._advance():
                    return
                current, errors = self._current, self._errors
                for pos in range(self._pos, len(current)):  # a chunk's results
                    if self._pos != pos or self._current is not current:
                        break  # next() went on meanwhile: look again
                    self._pos = pos + 1
                    if errors is not None and pos in errors:
                        raise TaskFailed(self._start + pos, errors[pos])
                    yield current[pos]
        except GeneratorExit:  # the loop was left early: nothing goes on for it
            self.close()
            raise

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
            if self._running.stopped:
                return False
            if self.ordered:
                found = self._chunks.pop(self._next, None)
            else:
                found = self._arrived.popleft() if self._arrived else None
            if found is not None:
                self._start, self._current, self._errors = found
                self._next = self._start + len(self._current)
                return True
            if self._drained and self._chunks:  # ordered, and a chunk has no result
                index = self._next
                self._next += self._chunksize
                raise TaskFailed(index, "no result: its chunk was dead-lettered unhandled")
            if self._drained:
                self.close()
                if self._job.producer_errors:
                    raise PcqError("pcq.map: the input iterable raised (see the "
                                   "traceback above); the items before it were mapped")
                return False
            self._receive()

    def _receive(self) -> None:
        """Take what OUT holds (waiting a moment if nothing), and tick the job
        (producer, workers, the close of both queues) now and then."""
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
            self._job.tick(0)
            self._next_check = now + POLL

    def close(self) -> None:
        """Stop the producer and the workers, drop what the queues still hold
        and the results not yet yielded.  Idempotent; nothing is left running
        when it returns."""
        self._arrived.clear()
        self._chunks.clear()
        self._running.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._running.stop()


def _windowed(iterable: Iterable[Any], chunksize: int, yielded: Any,
              window: int) -> Callable[[], Iterator[list[Any]]]:
    """The producer's function: ``iterable`` in chunks ``[start, items]``, never
    more than ``window`` items ahead of the results the caller has yielded."""
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

    return produce


# Public API: its keyword arguments are pcq.map's options.
def map(  # noqa: PLR0913
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
    max_deliveries: int = 3,
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
    a ``for`` loop over it early, an uncaught exception, or the end of the
    program stops every process it started.
    """
    settings = StageSettings(workers=workers, retries=retries, timeout=timeout,
                             max_deliveries=max_deliveries)
    return MapIterator(func, iterable, settings, chunksize=chunksize, ordered=ordered,
                       window=window, maxsize=maxsize, backend=backend, url=url,
                       queue=queue, grace=grace, **queue_options)
