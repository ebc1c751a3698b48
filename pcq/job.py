"""The job engine: one job's producers and supervised consumers, start to summary.

Every whole-job entry point drives a :class:`Job`:

* ``pcq.run`` / ``pcq run`` — producer processes and the consumers of one or
  more stages (:func:`pcq.run.run`);
* ``pcq consume`` — consumers only, of a queue others produce into
  (:func:`pcq.run.consume_job`: a job with no producers);
* ``pcq produce`` — this process is the producer, the consumers are elsewhere
  (:func:`pcq.run.produce_job`: a job with no stages, see :meth:`Job.put_here`);
* ``pcq.map`` — a producer process and workers; the caller is the last stage
  and ticks the job while it waits for results (:mod:`pcq.mapping`).

The caller calls :meth:`Job.start`, :meth:`Job.tick` until it returns False,
:meth:`Job.stop` and :meth:`Job.summary` (:func:`pcq.run.drive` does all four
with SIGINT/SIGTERM caught).  Each decision of a job's life is made here, once:

* **A producer's exit** (:meth:`Job._ended`): it is joined; a non-zero exit is
  a producer error; one killed by a signal could not detach itself, so the job
  detaches it by its own id at once (``Producer.producer_id``), on every
  backend, instead of leaving a registration that holds the queue open.
* **The close.**  A producing job holds a producer registration of its own on
  the first queue from its start until every producer has attached (each says
  so in shared memory) or ended, however their starts and ends interleave; it
  then lets go of it "close if last", so the queue closes as the last producer
  leaves — by that producer's own detach, the moment it is done, with no wait
  for the job to see its process end.  A producer that ended without closing
  (killed, or failed) is detached by the job, "close if last" too.  On the queues its stages feed it
  holds one too: it reopens what an earlier run closed, so their consumers
  serve this run; those close by propagation, and the job lets go of them at
  its stop without closing.
* **Close propagation** (:meth:`Job._propagate`): a stage's output queue
  closes once its input is finished (closed and every task acknowledged,
  :func:`pcq.stages.close_if_finished`), counted by acknowledged work; the
  consumers still running on a finished input are stopped (a replacement of
  one killed after the last ack would wait for a next run nobody starts).
* **Progress**: one :class:`~pcq.summary.Progress` line a stage, every
  ``PROGRESS_EVERY`` seconds; the first stage's total is the sum of the
  producers' ``len()`` when every one of them has one.
* **The grace deadline** (:meth:`Job.stop`): producers and the consumers of
  every stage share one deadline, then whatever still runs is killed.
* **The summary** (:meth:`Job.summary`): the queues' counters less what they
  were at the start; for consumers of a queue others produce into, what this
  host's consumers did (their tallies).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

from pcq.backends.base import Counters, PutInterrupted, Queue
from pcq.errors import BackendLost, PcqError, SerializationError
from pcq.roles import Consumer, Producer
from pcq.settings import GRACE_SECONDS, StageSettings
from pcq.stages import Stage, close_if_finished, finished
from pcq.summary import Progress, Summary, counted, from_stages, progress
from pcq.supervisor import SetupReport, Supervisor, wait

#: How often a job reports its progress and looks after its processes, in seconds.
PROGRESS_EVERY = 0.1
#: With the backend gone, consumers cannot acknowledge anything: stop them fast.
LOST_GRACE = 0.5
#: How often a job looks at its backend's server itself (one line when the link
#: goes, one when it is back; BackendLost when its budget is spent).
CHECK_EVERY = 0.5

OnProgress = Callable[[list[Progress]], None]


@dataclass(frozen=True)
class StagePlan:
    """One stage of a job: ``settings.workers`` consumers of ``queue`` call
    ``handle``; with ``to``, what it gives goes there (a :class:`Stage`).
    ``kind`` is the consumers' class when it is neither (``pcq.map``'s)."""

    name: str
    queue: Queue
    handle: Callable[[Any], Any]
    settings: StageSettings
    to: Queue | None = None
    kind: type[Consumer] | None = None


class Job:
    """One job: ``producers`` processes running ``produce`` into the first
    queue, and the supervised consumers of ``stages`` (see the module docstring).

    ``first`` is the queue producers put on (the first stage's, when there
    are stages).  ``produces``: this job produces into its queues (it holds them
    open, see the module docstring); False for consumers of a queue others
    produce into, whose counts are then their own tallies.  ``burst``: the
    consumers stop at an empty queue no producer is attached to.  ``wait``: a
    job with no stages waits until every task is acknowledged."""

    def __init__(
        self,
        stages: Sequence[StagePlan],
        *,
        first: Queue | None = None,
        produce: Callable[[], Iterable[Any]] | None = None,
        producers: int = 0,
        produces: bool = True,
        burst: bool = False,
        wait: bool = True,
        grace: float = GRACE_SECONDS,
        on_progress: OnProgress | None = None,
    ) -> None:
        self.plans = list(stages)
        self.first = first if first is not None else self.plans[0].queue
        self.queues = [p.queue for p in self.plans] or [self.first]
        self._produce = produce
        self.producers = producers
        self._produces = produces
        self._burst = burst
        self._wait = wait
        self.grace = grace
        self._on_progress = on_progress
        self._setup_report = SetupReport()  # one for the job: a failing setup is said once
        self.supervisors = [Supervisor(p.queue, self._factory(k, p), p.settings,
                                       self._setup_report)
                            for k, p in enumerate(self.plans)]
        # Each producer notes len() of what it returned, when it has one: the total.
        # And when it has registered (1), in the same block of shared memory: one
        # allocation a job, as before (a job's blocks go back when it is collected).
        slots = max(1, producers)
        self._shared = mp.RawArray("q", [-1] * slots + [0] * slots)
        self._slots = slots
        self._running: dict[int, Producer] = {}  # sentinel -> producer process
        self._hold: str | None = None  # our registration on the first queue
        # put_here put every item and waits for the acks still registered (so
        # `pcq status` counts this producer); the close comes with the last ack.
        self._put_all = False
        self._close_after = False
        self._opened: list[tuple[Queue, str]] = []  # ours on the queues stages feed
        self._fed = [produces] * len(self.plans)  # input seen unfinished in this job
        self._closed = [False] * len(self.plans)  # output of stage k closed
        self.producer_errors = 0
        self.interrupted: int | None = None
        self._lost = False
        self._acked = False
        self._started = time.monotonic()
        self._before: list[Counters] = []
        self._next_report = self._next_check = 0.0

    def _factory(self, k: int, plan: StagePlan) -> Callable[[int], Consumer]:
        """How stage ``k`` makes its consumer ``i``: the one place a job's
        consumers are built."""
        kind = plan.kind or (Stage if plan.to is not None else Consumer)
        if plan.kind is not None:  # pcq.map's workers: "pcq-map-0", as its log lines say
            prefix = f"pcq-{plan.name}"
        else:
            prefix = "pcq-consumer" if len(self.plans) == 1 else f"pcq-{k + 1}"
        options: dict[str, Any] = {"settings": plan.settings, "burst": self._burst}
        if plan.to is not None:
            options["to"] = plan.to

        def make(i: int) -> Consumer:
            return kind(plan.queue, plan.handle, name=f"{prefix}-{i}", **options)

        return make

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        """Hold the queues open, start every stage's consumers (downstream
        first: a stage's consumers are there before its inputs), then the
        producers."""
        self._started = time.monotonic()
        self._before = [q.counters() for q in self.queues]
        self._report(True)
        if self._produces:
            self._hold = self.first.attach_producer()
            self._opened = [(p.to, p.to.attach_producer()) for p in self.plans if p.to]
        for plan, supervisor in zip(reversed(self.plans), reversed(self.supervisors),
                                    strict=True):
            if plan.to is not None:  # for `pcq status`: where this queue's stage feeds
                plan.queue.set_feeds(plan.to.name)
            supervisor.start()
        for i in range(self.producers):
            producer = Producer(self.first, self._produce, name=f"pcq-producer-{i}",
                                length=(self._shared, i),
                                attached=(self._shared, self._slots + i))
            producer.start()
            assert producer.sentinel is not None
            self._running[producer.sentinel] = producer

    def tick(self, timeout: float = PROGRESS_EVERY) -> bool:
        """Wait up to ``timeout`` for a process to exit, then decide what follows
        (producers that ended, consumers that died, the close, propagation,
        progress).  False once the job is over."""
        try:
            ready = self._wait_any(timeout)
            for fd in ready:
                producer = self._running.pop(fd, None)
                if producer is not None:
                    self._ended(producer)
            for supervisor in self.supervisors:
                supervisor.poll(ready)
            if self._hold is not None and not self._put_all and (
                    not self._running or self._all_attached()):
                self._release(close=True)  # the producers' registrations hold it now
            self._propagate()
            self._look_at_backend()
            if time.monotonic() >= self._next_report:
                self._report(bool(self._running) or self._hold is not None)
            if not self.over:
                return True
            if not self.setup_failed:  # in case the last consumer to finish was killed
                self._propagate(final=True)
        except BackendLost:
            self._lost = True
            raise
        return False

    def _all_attached(self) -> bool:
        """Every producer process this job started has registered on the queue."""
        attached = self._shared[self._slots : self._slots + self.producers]
        return bool(self._running) and all(attached)

    @property
    def over(self) -> bool:
        """Every producer has ended and every consumer left (or a consumer's
        setup failed, which stops the job)."""
        if self.setup_failed:
            return True
        if self._running or (self._hold is not None and not self._put_all):
            return False
        if self.supervisors:
            return all(s.done for s in self.supervisors)
        return self._acked or not self._wait

    def _wait_any(self, timeout: float) -> list[int]:
        """The sentinels of the job's processes that exit within ``timeout`` (less,
        when a consumer's restart is due sooner).  A job with nothing to watch
        here waits for the acknowledgements of its tasks instead."""
        handles = list(self._running)
        for supervisor in self.supervisors:
            handles += supervisor.sentinels()
            timeout = supervisor.pause(timeout)
        if not handles and not self.supervisors and self._wait and (
                self._hold is None or self._put_all):
            self._acked = self.first.join(timeout=timeout)
            if self._acked:
                self._release(close=self._close_after)
            return []
        return wait(handles, timeout)

    def _ended(self, producer: Producer, stopped: bool = False) -> None:
        """A producer process exited: join it, count a failure (unless the job
        ``stopped`` it), detach it if it could not detach itself."""
        producer.join()
        code = producer.exitcode
        producer.close()
        if code and not stopped:
            self.producer_errors += 1
        if code:
            # Killed by a signal (SIGKILL, the OOM killer), it could not detach:
            # by its own id, at once, or its registration would hold the queue
            # open until its heartbeat expired, or forever.  Failed, it detached
            # without closing.  Either way, unless the job still holds the
            # queue (or stops), it closes it if that producer was the last.
            self.first.detach_producer(producer.producer_id,
                                       close_if_last=self._hold is None and not stopped)

    def _release(self, close: bool) -> None:
        """Let go of our registration on the first queue: the queue closes now
        if ``close`` and no other producer is attached."""
        hold, self._hold = self._hold, None
        if hold is not None:
            self.first.detach_producer(hold, close_if_last=close)

    def _propagate(self, final: bool = False) -> None:
        """Close the output of every stage whose input is finished, and stop the
        consumers still running on such an input (see the module docstring).
        An input is finished for this job only after the job saw it unfinished
        (a queue others produce into may be idle when the job starts), or at the
        ``final`` look, once every consumer left at its sentinel."""
        for k, (plan, supervisor) in enumerate(zip(self.plans, self.supervisors, strict=True)):
            if self._closed[k] or (k == 0 and self._hold is not None):
                continue
            if not finished(plan.queue):
                self._fed[k] = True
                continue
            if not self._fed[k] and not final:
                continue
            if plan.to is not None:
                self._closed[k] = close_if_finished(plan.queue, plan.to)
            else:
                self._closed[k] = True
            if not supervisor.done:
                supervisor.stop(self.grace)

    def _look_at_backend(self) -> None:
        if time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + CHECK_EVERY
            self.first.check_backend()

    def stop(self, grace: float | None = None) -> None:
        """Stop whatever still runs: producers and the consumers of every stage
        are asked to stop at once and share one deadline, ``grace`` seconds
        away; then what still runs is killed.  Lets go of the job's own
        registrations without closing anything.  Idempotent."""
        if grace is None:
            grace = LOST_GRACE if self._lost else self.grace
        deadline = time.monotonic() + grace
        left = list(self._running.values())
        self._running.clear()
        for process in [*left, *(c for s in self.supervisors for c in s.live.values())]:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for supervisor in self.supervisors:
            supervisor.stop(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(PcqError):  # a lost backend: the registrations expire
            for producer in left:
                producer.join(max(0.0, deadline - time.monotonic()))
                if producer.is_alive():
                    producer.kill()
                self._ended(producer, stopped=True)
            # Interrupted while waiting for the acks, everything was put: the
            # run is complete, and its consumers may have their sentinels.
            self._release(close=self._put_all and self._close_after)
            for q, registration in self._opened:
                q.detach_producer(registration, close_if_last=False)
        self._opened = []

    # ------------------------------------------------------------------ this process produces

    def put_here(self, items: Iterable[Any], *, close: bool, caught: list[int]) -> None:
        """This process is the producer (``pcq produce``): put ``items`` under the
        job's own registration, then let go of it — closing the queue if
        ``close`` and this was the last producer.  A job that waits for the acks
        keeps the registration until the last one (``pcq status`` counts this
        producer meanwhile) and lets go of it then.  A put that was interrupted
        or failed half way leaves the queue open: it must not end the run."""
        self.producers = 1
        if isinstance(items, Sized):
            self._shared[0] = len(items)
        put_all = False
        try:
            with self._reporting():
                self.first.put_many(until_caught(items, caught))
            put_all = not caught
        except SerializationError as exc:
            raise SerializationError(f"{exc.where()}; the queue was left open") from exc
        except PutInterrupted:
            pass
        finally:
            if put_all and self._wait:
                self._put_all, self._close_after = True, close
            else:
                self._release(close=close and put_all)

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        """Report progress from a thread while the body runs: with ``maxsize``,
        one put can block for most of the job, and the display must not freeze."""
        if self._on_progress is None:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(PROGRESS_EVERY):
                try:
                    self._report(True)
                except PcqError:  # the put in the caller's thread reports the outage
                    return

        reporter = threading.Thread(target=loop, name="pcq-progress", daemon=True)
        reporter.start()
        try:
            yield
        finally:
            stop.set()
            reporter.join()

    # ------------------------------------------------------------------ what it did

    def _report(self, producing: bool) -> None:
        """One progress line a stage (``tasks`` for a job of one queue): a stage
        is still fed while the producers run (the first) or while its input is
        open (the others)."""
        self._next_report = time.monotonic() + PROGRESS_EVERY
        if self._on_progress is None:
            return
        elapsed = time.monotonic() - self._started
        lengths = list(self._shared[: self._slots])
        total = sum(lengths) if self.producers and min(lengths) >= 0 else None
        rows = []
        for k, q in enumerate(self.queues):
            label = "tasks" if len(self.queues) == 1 else self.plans[k].name
            fed = producing if k == 0 else not self._closed[k - 1]
            rows.append(progress(label, self._before[k], q.counters(), fed,
                                 total if k == 0 else None, elapsed))
        self._on_progress(rows)

    @property
    def setup_failed(self) -> bool:
        return any(s.setup_failed for s in self.supervisors)

    def summary(self) -> Summary:
        """What the job did (see the module docstring)."""
        elapsed = round(time.monotonic() - self._started, 6)
        self._report(False)
        fields: dict[str, Any] = {
            "elapsed_s": elapsed, "workers": sum(p.settings.workers for p in self.plans),
            "interrupted": self.interrupted,
            "setup_error": self._setup_report.message() if self.setup_failed else None}
        if not self._produces:
            return self._tallied(fields)
        after = [q.counters() for q in self.queues]
        rows = [counted(plan.name, plan.queue, plan.settings.workers, b, a, supervisor.restarts)
                for plan, supervisor, b, a in zip(self.plans, self.supervisors, self._before,
                                                  after, strict=False)]
        if not rows:  # this process produced, the consumers are elsewhere
            rows = [counted("tasks", self.first, 0, self._before[0], after[0], 0)]
            if not self._wait:  # nothing waited for them: only the put is this job's
                return Summary(rows[0].produced, 0, 0, 0, 0, elapsed, 0, self.producers,
                               producer_errors=self.producer_errors,
                               interrupted=self.interrupted)
        return from_stages(rows, self.queues, self._before, after, producers=self.producers,
                           producer_errors=self.producer_errors, **fields)

    def _tallied(self, fields: dict[str, Any]) -> Summary:
        """The summary of consumers of a queue others produce into: what this
        host's consumers did and the queue accepted."""
        done = failed = retried = garbage = 0
        for supervisor in self.supervisors:
            d, f, r = supervisor.totals()
            done, failed, retried = done + d, failed + f, retried + r
            garbage += supervisor.garbage()
        return Summary(0, done, failed, retried, failed + garbage, producers=0,
                       restarts=sum(s.restarts for s in self.supervisors), **fields)


def until_caught(items: Iterable[Any], caught: list[int]) -> Iterator[Any]:
    """``items``, until a signal is noted in ``caught``."""
    for item in items:
        if caught:
            return
        yield item
