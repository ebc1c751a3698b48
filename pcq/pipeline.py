"""Pipelines: several stages on this host, each a supervised set of consumers.

``run(produce, fetch, parse, save, workers=[16, 4, 1])`` runs ``produce`` into
the first queue; ``fetch`` consumes it and its outputs go to the second queue,
``parse`` consumes that, and so on; ``save``, the last stage, keeps nothing.
One handler is the classic job of :func:`pcq.run.run`.

Queue names: the first stage reads ``queue``; stage ``k`` (1-based, k >= 2)
reads ``{queue}.k`` — on Redis all of a pipeline's queues share the hash tag
``{queue}``, so they live in one Cluster slot, as the atomic outputs-and-ack
script needs (a ``queue`` that already holds a tag keeps it: ``{crawl}.k``).

The job ends as a single-stage job does, stage after stage: when the producers
are done the first queue closes; each stage's output queue closes once its input
queue is closed and fully acknowledged (:func:`pcq.stages.close_if_finished`);
each consumer leaves at its sentinel.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pcq.backends import open_queue
from pcq.backends.base import Counters, Queue
from pcq.errors import ConfigError
from pcq.roles import Consumer, Producer
from pcq.run import (
    FAILURES_LISTED,
    GRACE_SECONDS,
    Progress,
    Summary,
    end_producers,
    interruptible,
    job_failures,
    progress,
)
from pcq.run import run as run_one
from pcq.settings import StageSettings
from pcq.stages import Stage, close_if_finished, finished
from pcq.supervisor import SetupReport, Supervisor, wait

T = TypeVar("T")


def stage_queue(queue: str, stage: int) -> str:
    """The name of the queue that stage ``stage`` (0-based) reads."""
    if stage == 0:
        return queue
    return f"{queue}.{stage + 1}" if "{" in queue else f"{{{queue}}}.{stage + 1}"


def per_stage(value: T | Sequence[T], stages: int, what: str) -> list[T]:
    """One value per stage: a single value applies to every stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != stages:
            raise ConfigError(f"{what}: give one value for all stages or one per stage "
                              f"({stages}), not {len(value)}")
        return list(value)
    return [value] * stages  # type: ignore[list-item]


def stage_name(handle: Callable[..., Any]) -> str:
    return str(getattr(handle, "__name__", None) or type(handle).__name__)


@dataclass(frozen=True)
class StageSummary:
    """What one stage did: counts are its input queue's, for this job."""

    name: str
    queue: str
    workers: int
    produced: int  # tasks put on its queue (by the producers or the stage before)
    done: int
    failed: int
    retried: int
    dead: int
    restarts: int = 0


def run(
    produce: Callable[[], Iterable[Any]],
    handle: Callable[[Any], Any],
    *handles: Callable[[Any], Any],
    workers: int | Sequence[int] = 4,
    producers: int = 1,
    maxsize: int | Sequence[int] = 1000,
    retries: int | Sequence[int] = 0,
    timeout: float | Sequence[float | None] | None = None,
    backend: str | None = None,
    url: str | None = None,
    queue: str = "default",
    grace: float = GRACE_SECONDS,
    on_progress: Callable[[list[Progress]], None] | None = None,
    names: Sequence[str] | None = None,
    concurrency: int | Sequence[int] = 1,
    setup: Callable[[], Any] | None = None,
    **queue_options: Any,
) -> Summary:
    """Run ``produce`` into a pipeline of one or more handlers (see the module
    docstring); return the summary.  ``workers``, ``maxsize``, ``retries`` and
    ``timeout`` take one value for all stages or a list with one per stage, and
    so does ``concurrency`` (tasks at once in each consumer, see
    :class:`~pcq.roles.Consumer`; a stage's outputs still ride on each task's ack).
    The summary's ``stages`` holds a :class:`StageSummary` per stage; its
    ``produced`` is the first stage's, ``done`` the last stage's, ``failed``,
    ``retried`` and ``dead`` add up every stage's."""
    steps = [handle, *handles]
    n = len(steps)
    counts = per_stage(workers, n, "workers")
    sizes = per_stage(maxsize, n, "maxsize")
    tries = per_stage(retries, n, "retries")
    limits = per_stage(timeout, n, "timeout")
    slots = per_stage(concurrency, n, "concurrency")
    if n == 1:
        return run_one(produce, handle, workers=counts[0], producers=producers,
                       maxsize=sizes[0], retries=tries[0], timeout=limits[0], backend=backend,
                       url=url, queue=queue, grace=grace, on_progress=on_progress,
                       concurrency=slots[0], setup=setup, **queue_options)
    if min(counts) < 1 or producers < 1 or min(slots) < 1:
        raise ValueError("workers, producers and concurrency must be at least 1")
    labels = list(names) if names is not None else [stage_name(h) for h in steps]
    first = open_queue(backend, url=url, name=queue, maxsize=sizes[0], **queue_options)
    queues = [first]
    try:
        queues += [first.sibling(stage_queue(queue, k), maxsize=sizes[k]) for k in range(1, n)]
        for k in range(n - 1):
            queues[k].set_feeds(queues[k + 1].name)
        job = _Job(queues, steps, counts, tries, limits, labels, slots, setup)
        return job.run(produce, producers, grace, on_progress)
    finally:
        for q in reversed(queues):
            q.dispose()


class _Job:
    """The processes of one pipeline run and the loop that watches them."""

    def __init__(
        self,
        queues: list[Queue],
        handles: list[Callable[[Any], Any]],
        workers: list[int],
        retries: list[int],
        timeouts: list[float | None],
        names: list[str],
        concurrency: list[int],
        setup: Callable[[], Any] | None = None,
    ) -> None:
        self.queues = queues
        self.concurrency = concurrency
        self.setup = setup  # runs in every consumer of every stage
        self.setup_report = SetupReport()
        self.names = names
        self.workers = workers
        settings = [StageSettings(workers=workers[k], concurrency=concurrency[k],
                                  retries=retries[k], timeout=timeouts[k],
                                  max_deliveries=q.max_deliveries, setup=setup)
                    for k, q in enumerate(queues)]
        self.supervisors = [Supervisor(q, self._factory(k, handles[k], settings[k]), settings[k],
                                       self.setup_report)
                            for k, q in enumerate(queues)]
        self.closed = [False] * len(queues)  # output of stage k closed (k < last)

    def _factory(
        self, k: int, handle: Callable[[Any], Any], settings: StageSettings
    ) -> Callable[[int], Consumer]:
        q = self.queues[k]
        if k == len(self.queues) - 1:
            return lambda i: Consumer(q, handle, settings=settings, name=f"pcq-{k + 1}-{i}")
        to = self.queues[k + 1]
        return lambda i: Stage(q, handle, to=to, settings=settings, name=f"pcq-{k + 1}-{i}")

    def _finish_stages(self, grace: float) -> None:
        """Close the output of every stage whose input is finished (closed, all
        acknowledged), and stop the consumers still running on such an input:
        one that replaced a consumer killed after the last ack attached to a
        finished queue, which is the same as a new one — it would wait for a
        next run that this job will not start."""
        last = len(self.queues) - 1
        for k, q in enumerate(self.queues):
            if k < last and not self.closed[k]:
                self.closed[k] = close_if_finished(q, self.queues[k + 1])
            supervisor = self.supervisors[k]
            if supervisor.done:
                continue
            if (self.closed[k] if k < last else finished(q)):
                supervisor.stop(grace)

    def _report(self, on_progress: Callable[[list[Progress]], None] | None,
                before: list[Counters], elapsed: float, producing: bool) -> None:
        """One progress line a stage: a stage is still fed while the producers
        run (the first) or its input is open (the others)."""
        if on_progress is None:
            return
        rows = []
        for k, (name, q) in enumerate(zip(self.names, self.queues, strict=True)):
            fed = producing if k == 0 else not self.closed[k - 1]
            rows.append(progress(name, before[k], q.counters(), fed, None, elapsed))
        on_progress(rows)

    def run(
        self,
        produce: Callable[[], Iterable[Any]],
        producers: int,
        grace: float,
        on_progress: Callable[[list[Progress]], None] | None,
    ) -> Summary:
        started = time.monotonic()
        before = [q.counters() for q in self.queues]
        first = self.queues[0]
        self._report(on_progress, before, 0.0, True)
        # Our registration keeps the first queue open until every producer is
        # done; on the others it reopens what an earlier run closed, so their
        # consumers wait for this run's tasks instead of leaving at once.
        for q in self.queues:
            q.attach_producer()
        running: dict[int, Producer] = {}
        producer_errors = 0
        with interruptible() as caught:
            try:
                # Downstream first: a stage's consumers are there before its inputs.
                for supervisor in reversed(self.supervisors):
                    supervisor.start()
                for i in range(producers):
                    producer = Producer(first, produce, name=f"pcq-producer-{i}")
                    producer.start()
                    assert producer.sentinel is not None
                    running[producer.sentinel] = producer
                opened = True
                next_progress = 0.0
                while ((running or not all(s.done for s in self.supervisors)) and not caught
                       and not any(s.setup_failed for s in self.supervisors)):
                    handles = list(running) + [fd for s in self.supervisors
                                               for fd in s.sentinels()]
                    ready = wait(handles, 0.1)
                    producer_errors += end_producers(first, running, ready)
                    for supervisor in self.supervisors:
                        supervisor.poll(ready)
                    if not running and opened:
                        first.detach_producer(close_if_last=True)
                        opened = False
                    if not opened:
                        self._finish_stages(grace)
                    if time.monotonic() >= next_progress:
                        self._report(on_progress, before, time.monotonic() - started,
                                     bool(running))
                        next_progress = time.monotonic() + 0.1
            finally:
                stopped = caught[0] if caught else None
                self._stop(running.values(), grace)
                for q in self.queues[1:]:
                    q.detach_producer(close_if_last=False)  # closed by propagation
        self._report(on_progress, before, time.monotonic() - started, False)
        return self._summary(before, time.monotonic() - started, producers, producer_errors,
                             stopped)

    def _stop(self, producers: Iterable[Producer], grace: float) -> None:
        left = list(producers)
        for producer in left:
            with contextlib.suppress(ProcessLookupError):
                producer.terminate()
        for supervisor in self.supervisors:  # they share one grace period
            for consumer in supervisor.live.values():
                with contextlib.suppress(ProcessLookupError):
                    consumer.terminate()
        for supervisor in self.supervisors:
            supervisor.stop(grace)
        for producer in left:
            producer.join(grace)
            if producer.is_alive():
                producer.kill()
                producer.join()
            producer.close()

    def _summary(self, before: list[Counters], elapsed: float, producers: int,
                 producer_errors: int, stopped: int | None) -> Summary:
        stages = []
        for k, q in enumerate(self.queues):
            a, b = q.counters(), before[k]
            stages.append(StageSummary(
                self.names[k], q.name, self.workers[k], a.produced - b.produced,
                a.done - b.done, a.failed - b.failed, a.retried - b.retried, a.dead - b.dead,
                self.supervisors[k].restarts))
        failures: list[dict[str, Any]] = []
        more = 0
        for k, q in enumerate(self.queues):
            found = job_failures(q, before[k], q.counters())
            listed = list(found.get("failures", ()))
            room = FAILURES_LISTED - len(failures)
            failures += listed[:room]
            more += found.get("failures_more", 0) + max(0, len(listed) - room)
        setup_failed = any(s.setup_failed for s in self.supervisors)
        return Summary(
            produced=stages[0].produced,
            done=stages[-1].done,
            failed=sum(s.failed for s in stages),
            retried=sum(s.retried for s in stages),
            dead=sum(s.dead for s in stages),
            elapsed_s=round(elapsed, 6),
            workers=sum(self.workers),
            producers=producers,
            restarts=sum(s.restarts for s in stages),
            producer_errors=producer_errors,
            interrupted=stopped,
            failures=tuple(failures),
            failures_more=more,
            setup_error=self.setup_report.message() if setup_failed else None,
            stages=tuple(stages),
        )

