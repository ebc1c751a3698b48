"""A whole job in one call: producers, supervised consumers, close, summary.

``run(produce, handle)`` is the classic pattern end to end: start ``workers``
consumers and ``producers`` producers, wait until every producer is done, close
the queue (one sentinel per live consumer), wait until every consumer has taken
its sentinel and exited, and return a :class:`Summary`.  A consumer that dies is
replaced and its tasks handled by another; SIGINT/SIGTERM stop the job
gracefully; nothing is left running when ``run`` returns.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from pcq.backends import open_queue
from pcq.backends.base import Counters, PutInterrupted, Queue
from pcq.envelope import short_repr
from pcq.errors import BackendLost, PcqError, SerializationError
from pcq.roles import Consumer, Producer, SetupReport, Supervisor, WorkerTallies, wait
from pcq.stages import Stage, close_if_finished, finished

#: How long consumers may take to finish their running task after SIGINT/SIGTERM.
GRACE_SECONDS = 5.0
#: With the backend gone, consumers cannot acknowledge anything: stop them fast.
LOST_GRACE = 0.5
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BACKEND_LOST = 0, 1, 2, 3
#: How many failed tasks a summary lists; ``failures_more`` counts the rest.
FAILURES_LISTED = 20
#: How often a job reports its progress, in seconds.
PROGRESS_EVERY = 0.1


@dataclass(frozen=True)
class Summary:
    """What a job did.  Counts are this job's own, even on a long-lived queue."""

    produced: int
    done: int
    failed: int  # tasks that ended without success after their retries
    retried: int
    dead: int
    elapsed_s: float
    workers: int
    producers: int
    restarts: int = 0  # consumers replaced after dying
    producer_errors: int = 0
    interrupted: int | None = None  # the signal that stopped the job
    # This job's dead letters, the first FAILURES_LISTED of them: dicts with
    # id, item (a short repr), error, attempts; failures_more counts the rest.
    failures: tuple[dict[str, Any], ...] = ()
    failures_more: int = 0
    setup_error: str | None = None  # a consumer's setup raised: the job stopped
    stages: tuple[Any, ...] = ()  # a pipeline's pcq.pipeline.StageSummary per stage

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        if self.setup_error is not None:
            return EXIT_USAGE  # the job could not start its consumers: configuration
        return EXIT_FAILED if self.failed or self.producer_errors else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "exit_code": self.exit_code}
        if not self.stages:
            del out["stages"]  # a single-stage job's fields stay as they were
        return out


@dataclass(frozen=True)
class Progress:
    """One line of a job's progress (one queue, or one stage), counted from the
    job's start.  ``total`` is the number of tasks when it is known ahead (every
    producer returned something with ``len()``); ``producing`` is False once
    every producer is done, when ``produced`` is the final count."""

    label: str
    produced: int
    done: int
    failed: int
    retried: int
    producing: bool
    total: int | None
    elapsed: float


def progress(label: str, before: Counters, now: Counters, producing: bool,
             total: int | None, elapsed: float) -> Progress:
    return Progress(label, now.produced - before.produced, now.done - before.done,
                    now.failed - before.failed, now.retried - before.retried,
                    producing, total, elapsed)


def job_failures(q: Queue, before: Counters, after: Counters) -> dict[str, Any]:
    """This job's dead letters (they follow those the queue had before it),
    bounded: Summary's ``failures`` and ``failures_more``."""
    new = after.dead - before.dead
    if new <= 0:
        return {}
    letters = q.dead_letters(before.dead + min(new, FAILURES_LISTED))[before.dead :]
    listed = tuple(
        {"id": letter.get("id"),
         "item": short_repr(letter["body"]) if "body" in letter else "(undecodable message)",
         "error": str(letter.get("error")), "attempts": letter.get("attempts")}
        for letter in letters
    )
    return {"failures": listed, "failures_more": new - len(listed)}


def delta(before: Counters, after: Counters, elapsed: float, **extra: Any) -> Summary:
    return Summary(
        produced=after.produced - before.produced,
        done=after.done - before.done,
        failed=after.failed - before.failed,
        retried=after.retried - before.retried,
        dead=after.dead - before.dead,
        elapsed_s=round(elapsed, 6),
        **extra,
    )


@contextlib.contextmanager
def interruptible(on_signal: Callable[[], None] | None = None) -> Iterator[list[int]]:
    """Catch SIGINT/SIGTERM for the duration; the list receives their numbers, and
    ``on_signal`` (if given) runs at each."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught  # signals can only be handled in the main thread
        return

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        if on_signal is not None:
            on_signal()

    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run(
    produce: Callable[[], Iterable[Any]],
    handle: Callable[[Any], Any],
    *,
    workers: int = 4,
    producers: int = 1,
    maxsize: int = 1000,
    retries: int = 0,
    timeout: float | None = None,
    concurrency: int = 1,
    backend: str | None = None,
    url: str | None = None,
    queue: str = "default",
    grace: float = GRACE_SECONDS,
    on_progress: Callable[[list[Progress]], None] | None = None,
    setup: Callable[[], Any] | None = None,
    max_deliveries: int = 3,
    **queue_options: Any,
) -> Summary:
    """Run ``produce`` in ``producers`` processes and ``handle`` in ``workers``
    consumer processes until every task is done; return the summary.  Each
    consumer runs up to ``concurrency`` tasks at once (threads, or asyncio tasks
    for an ``async def`` handler).  A task in flight in ``max_deliveries``
    consumers that died is dead-lettered (0: never).

    ``setup`` runs once in each consumer process before its first task; if it
    raises, the job stops and the summary's ``setup_error`` says why.
    ``on_progress`` is called in this process about every 0.1 s with one
    :class:`Progress` line a stage."""
    if workers < 1 or producers < 1 or concurrency < 1:
        raise ValueError("workers, producers and concurrency must be at least 1")
    if max_deliveries < 0:
        raise ValueError("max_deliveries must be 0 (no limit) or more")
    q = open_queue(backend, url=url, name=queue, maxsize=maxsize,
                   max_deliveries=max_deliveries, **queue_options)
    try:
        return _run(q, produce, handle, workers, producers, retries, timeout, grace, on_progress,
                    concurrency, setup)
    finally:
        q.dispose()


def _run(
    q: Queue,
    produce: Callable[[], Iterable[Any]],
    handle: Callable[[Any], Any],
    workers: int,
    producers: int,
    retries: int,
    timeout: float | None,
    grace: float,
    on_progress: Callable[[list[Progress]], None] | None,
    concurrency: int = 1,
    setup: Callable[[], Any] | None = None,
) -> Summary:
    started = time.monotonic()
    before = q.counters()
    # Each producer notes len() of what it returned, when it has one: the total.
    lengths = mp.RawArray("q", [-1] * producers)

    def report(now: Counters, producing: bool) -> None:
        if on_progress is not None:
            total = sum(lengths) if min(lengths) >= 0 else None
            on_progress([progress("tasks", before, now, producing, total,
                                  time.monotonic() - started)])

    report(before, True)
    # Our own registration keeps the queue open until every producer process is
    # done, however their starts and ends interleave.
    q.attach_producer()
    setup_report = SetupReport()
    # Burst consumers: this job's run is theirs, they never wait for the next.
    supervisor = Supervisor(
        q,
        lambda i: Consumer(q, handle, retries=retries, timeout=timeout, burst=True,
                           name=f"pcq-consumer-{i}", concurrency=concurrency, setup=setup,
                           setup_report=setup_report),
        workers,
    )
    running: dict[int, Producer] = {}
    producer_errors = 0
    stopped: int | None = None
    with interruptible() as caught:
        try:
            supervisor.start()
            for i in range(producers):
                producer = Producer(q, produce, name=f"pcq-producer-{i}", length=(lengths, i))
                producer.start()
                assert producer.sentinel is not None
                running[producer.sentinel] = producer
            closed = False
            next_progress = 0.0
            while (running or not supervisor.done) and not caught and not supervisor.setup_failed:
                ready = wait(list(running) + supervisor.sentinels(), supervisor.pause(0.1))
                producer_errors += end_producers(q, running, ready)
                supervisor.poll([fd for fd in ready if fd not in running])
                if not running and not closed:
                    q.detach_producer(close_if_last=True)
                    closed = True
                elif closed and not supervisor.done and q.state() == "idle":
                    # Every task is done.  A consumer that attached after the close
                    # found the queue idle, which is new: it waits for a next run
                    # that this job will not start.  Stop it.
                    supervisor.stop(grace)
                if on_progress is not None and time.monotonic() >= next_progress:
                    report(q.counters(), bool(running))
                    next_progress = time.monotonic() + PROGRESS_EVERY
        finally:
            stopped = caught[0] if caught else None
            _stop_all(running.values(), supervisor, grace)
    after = q.counters()
    report(after, False)
    return delta(
        before,
        after,
        time.monotonic() - started,
        workers=workers,
        producers=producers,
        restarts=supervisor.restarts,
        producer_errors=producer_errors,
        interrupted=stopped,
        setup_error=setup_report.message() if supervisor.setup_failed else None,
        **job_failures(q, before, after),
    )


def end_producers(q: Queue, running: dict[int, Producer], ready: Iterable[int]) -> int:
    """Join the producers of ``running`` whose sentinels are in ``ready`` (and
    forget them); how many of them failed."""
    failed = 0
    for fd in ready:
        producer = running.pop(fd, None)
        if producer is None:
            continue
        producer.join()
        failed += producer.exitcode != 0
        if producer.exitcode is not None and producer.exitcode < 0:
            # Killed by a signal, it could not detach: detach it by its id, at
            # once, or its registration would keep the queue open.
            q.detach_producer(producer.producer_id, close_if_last=True)
        producer.close()
    return failed


def produce_job(
    q: Queue,
    items: Iterable[Any],
    *,
    close: bool = True,
    wait_done: bool = True,
    on_progress: Callable[[list[Progress]], None] | None = None,
) -> Summary:
    """Put ``items`` from this process (``pcq produce``); close the queue if this
    was the last producer; wait until every task is acknowledged."""
    started = time.monotonic()
    before = q.counters()
    total = len(items) if isinstance(items, Sized) else None

    def report(now: Counters, producing: bool) -> None:
        if on_progress is not None:
            on_progress([progress("tasks", before, now, producing, total,
                                  time.monotonic() - started)])

    report(before, True)
    q.attach_producer()
    interrupted: int | None = None
    closing = close
    # A signal also interrupts a put that waits for room (maxsize): at once,
    # putting nothing more, instead of after the consumers made room.
    with interruptible(q.interrupt) as caught:
        try:
            with _reporting(report if on_progress is not None else None, q):
                q.put_many(_until(items, caught))
        except PutInterrupted:
            closing = False
        except SerializationError as exc:
            closing = False  # a producer that failed half way must not end the job
            raise SerializationError(f"{exc.where()}; the queue was left open") from exc
        except BaseException:
            closing = False  # a producer that failed half way must not end the job
            raise
        finally:
            if caught:
                closing = False
            q.detach_producer(close_if_last=closing)
        if wait_done and not caught:
            while not q.join(timeout=PROGRESS_EVERY) and not caught:
                if on_progress is not None:
                    report(q.counters(), False)
        interrupted = caught[0] if caught else None
    after = q.counters()
    report(after, False)
    summary = delta(before, after, time.monotonic() - started, workers=0, producers=1,
                    interrupted=interrupted)
    if not wait_done:  # the other counters belong to consumers we did not wait for
        summary = Summary(summary.produced, 0, 0, 0, 0, summary.elapsed_s, 0, 1,
                          interrupted=interrupted)
    return summary


def _until(items: Iterable[Any], caught: list[int]) -> Iterator[Any]:
    for item in items:
        if caught:
            return
        yield item


@contextlib.contextmanager
def _reporting(report: Callable[[Counters, bool], None] | None, q: Queue) -> Iterator[None]:
    """Report progress from a thread while the body runs: with ``maxsize``, one
    put can block for most of the job, and the display must not freeze."""
    if report is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(PROGRESS_EVERY):
            try:
                report(q.counters(), True)
            except PcqError:  # the put in the caller's thread reports the outage
                return

    reporter = threading.Thread(target=loop, name="pcq-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        stop.set()
        reporter.join()


def consume_job(
    q: Queue,
    handle: Callable[[Any], Any],
    *,
    workers: int = 4,
    retries: int = 0,
    timeout: float | None = None,
    grace: float = GRACE_SECONDS,
    burst: bool = False,
    concurrency: int = 1,
    setup: Callable[[], Any] | None = None,
    to: Queue | None = None,
) -> Summary:
    """Run ``workers`` supervised consumers until each has taken its sentinel
    (``pcq consume``).  Counts are what this host's consumers did and the queue
    accepted.  On an idle queue they wait for the next run, unless ``burst``.
    With ``to``, they are stages: what ``handle`` gives goes to queue ``to``,
    which closes once ``q`` is closed and fully acknowledged (see
    :mod:`pcq.stages`)."""
    started = time.monotonic()
    tallies = WorkerTallies(workers)
    setup_report = SetupReport()

    def make(i: int) -> Consumer:
        options: dict[str, Any] = {"retries": retries, "timeout": timeout, "burst": burst,
                                   "tally": tallies.row(i), "name": f"pcq-consumer-{i}",
                                   "concurrency": concurrency, "setup": setup,
                                   "setup_report": setup_report}
        return Consumer(q, handle, **options) if to is None else Stage(q, handle, to=to,
                                                                          **options)

    if to is not None:
        q.set_feeds(to.name)
    supervisor = Supervisor(q, make, workers)
    stopped: int | None = None
    lost = False
    with interruptible() as caught:
        try:
            supervisor.start()
            running = False  # saw the input's run unfinished while we were here
            while not supervisor.done and not caught and not supervisor.setup_failed:
                supervisor.poll(wait(supervisor.sentinels(), supervisor.pause(0.5)))
                # The host's own look at the server: one line when the link goes,
                # one when it is back, BackendLost when the budget is spent.
                q.check_backend()
                if to is None:
                    continue
                if not finished(q):
                    running = True
                elif running and close_if_finished(q, to):
                    # The run we served is finished: a consumer still here replaced
                    # one killed after the last ack, and would wait for a next run.
                    supervisor.stop(grace)
            if to is not None and not caught:  # in case the last to finish was killed
                close_if_finished(q, to)
        except BackendLost:
            lost = True
            raise
        finally:
            stopped = caught[0] if caught else None
            supervisor.stop(LOST_GRACE if lost else grace)
    done, failed, retried = tallies.totals()
    failed += supervisor.killed_tasks[0]
    retried += supervisor.killed_tasks[1]
    return Summary(0, done, failed, retried, failed, round(time.monotonic() - started, 6),
                   workers, 0, restarts=supervisor.restarts, interrupted=stopped,
                   setup_error=setup_report.message() if supervisor.setup_failed else None)


def _stop_all(producers: Iterable[Producer], supervisor: Supervisor, grace: float) -> None:
    """Stop whatever still runs: producers at once, consumers within ``grace``."""
    left = list(producers)
    for producer in left:
        with contextlib.suppress(ProcessLookupError):
            producer.terminate()
    deadline = time.monotonic() + grace  # one grace period for consumers and producers
    supervisor.stop(grace)
    for producer in left:
        producer.join(max(0.0, deadline - time.monotonic()))
        if producer.is_alive():
            producer.kill()
            producer.join()
        producer.close()
