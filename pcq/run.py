"""Whole jobs in one call: ``pcq.run``, ``pcq consume``, ``pcq produce``.

``run(produce, handle)`` is the classic pattern end to end: start ``workers``
consumers and ``producers`` producers, wait until every producer is done, close
the queue (one sentinel per live consumer), wait until every consumer has taken
its sentinel and exited, and return a :class:`~pcq.summary.Summary`.  With more
handlers it is a pipeline (:mod:`pcq.pipeline` names its queues).  A consumer
that dies is replaced and its tasks handled by another; SIGINT/SIGTERM stop the
job gracefully; nothing is left running when ``run`` returns.

:func:`consume_job` and :func:`produce_job` are the two halves on many hosts.
All three only open queues and describe the job (one
:class:`~pcq.settings.StageSettings` a stage, validated once), then
:func:`drive` it with SIGINT/SIGTERM caught: what happens while it runs is
decided by the job engine, :class:`pcq.job.Job`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any

from pcq.backends.base import Queue
from pcq.job import CHECK_EVERY, PROGRESS_EVERY, Job, OnProgress, StagePlan
from pcq.pipeline import open_stages, stage_name
from pcq.settings import GRACE_SECONDS, StageSettings, per_stage
from pcq.summary import Summary


# Public API: its keyword arguments are pcq.run's options.
def run(  # noqa: PLR0913
    produce: Callable[[], Iterable[Any]],
    handle: Callable[[Any], Any],
    *handles: Callable[[Any], Any],
    workers: int | Sequence[int] = 4,
    producers: int = 1,
    maxsize: int | Sequence[int] = 1000,
    retries: int | Sequence[int] = 0,
    timeout: float | Sequence[float | None] | None = None,
    concurrency: int | Sequence[int] = 1,
    backend: str | None = None,
    url: str | None = None,
    queue: str = "default",
    grace: float = GRACE_SECONDS,
    on_progress: OnProgress | None = None,
    names: Sequence[str] | None = None,
    setup: Callable[[], Any] | None = None,
    max_deliveries: int = 3,
    **queue_options: Any,
) -> Summary:
    """Run ``produce`` in ``producers`` processes into one handler (``workers``
    consumer processes) or a pipeline of several, until every task is done;
    return the summary.

    ``workers``, ``maxsize``, ``retries``, ``timeout`` and ``concurrency`` take
    one value for all stages or one per stage; the stage settings are
    :class:`~pcq.settings.StageSettings`'s.  ``setup`` runs once in each
    consumer process; if it raises, the job stops and the summary's
    ``setup_error`` says why.  ``on_progress`` is called in this process about
    every 0.1 s with one :class:`~pcq.summary.Progress` line a stage.  A
    pipeline's summary holds a :class:`~pcq.summary.StageSummary` per stage in
    ``stages``; see :func:`pcq.summary.from_stages` for the totals."""
    steps = [handle, *handles]
    n = len(steps)
    if producers < 1:
        raise ValueError("producers must be at least 1")
    settings = [
        StageSettings(workers=w, concurrency=c, retries=r, timeout=t,
                      max_deliveries=max_deliveries, setup=setup)
        for w, c, r, t in zip(per_stage(workers, n, "workers"),
                              per_stage(concurrency, n, "concurrency"),
                              per_stage(retries, n, "retries"),
                              per_stage(timeout, n, "timeout"), strict=True)
    ]
    labels = list(names) if names is not None else [stage_name(h) for h in steps]
    queues = open_stages(backend, url, queue, per_stage(maxsize, n, "maxsize"),
                         max_deliveries=max_deliveries, **queue_options)
    try:
        plans = [StagePlan(labels[k], q, steps[k], settings[k],
                           to=queues[k + 1] if k + 1 < n else None)
                 for k, q in enumerate(queues)]
        job = Job(plans, produce=produce, producers=producers, grace=grace,
                  on_progress=on_progress)
        return drive(job)
    finally:
        for q in reversed(queues):
            q.dispose()


def drive(job: Job, items: Iterable[Any] | None = None, *, close: bool = True,
          every: float = PROGRESS_EVERY) -> Summary:
    """Run ``job`` whole: start, tick (every ``every`` seconds at most) until it
    is over or SIGINT/SIGTERM comes, stop, summary.  With ``items``, this
    process puts them first (see
    :meth:`~pcq.job.Job.put_here`); a signal also interrupts a put that waits for
    room (maxsize), at once, putting nothing more."""
    with interruptible(None if items is None else job.first.interrupt) as caught:
        try:
            job.start()
            if items is not None:
                job.put_here(items, close=close, caught=caught)
            while not caught and job.tick(every):
                pass
        finally:
            job.interrupted = caught[0] if caught else None
            job.stop()
    return job.summary()


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


def produce_job(
    q: Queue,
    items: Iterable[Any],
    *,
    close: bool = True,
    wait_done: bool = True,
    grace: float = GRACE_SECONDS,
    on_progress: OnProgress | None = None,
) -> Summary:
    """Put ``items`` from this process (``pcq produce``); close the queue if this
    was the last producer and ``close``; wait until every task is acknowledged,
    if ``wait_done``."""
    return drive(Job([], first=q, wait=wait_done, grace=grace, on_progress=on_progress),
                 items, close=close)


def consume_job(
    q: Queue,
    handle: Callable[[Any], Any],
    settings: StageSettings,
    *,
    burst: bool = False,
    to: Queue | None = None,
    grace: float = GRACE_SECONDS,
) -> Summary:
    """Run ``settings.workers`` supervised consumers until each has taken its
    sentinel (``pcq consume``).  Counts are what this host's consumers did and
    the queue accepted.  On an idle queue they wait for the next run, unless
    ``burst``.  With ``to``, they are a stage: what ``handle`` gives goes to
    queue ``to``, which closes once ``q`` is closed and fully acknowledged (see
    :mod:`pcq.stages`)."""
    plan = StagePlan(stage_name(handle), q, handle, settings, to=to)
    # A host of a long-lived queue: it looks at the shared server less often.
    return drive(Job([plan], produces=False, burst=burst, grace=grace), every=CHECK_EVERY)
