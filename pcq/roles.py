"""Producer and Consumer processes: the two roles of a job.

Both roles are ``multiprocessing.Process`` subclasses, as in the classic
pattern: pass a queue and a function, or subclass and override ``produce()`` /
``handle(item)``.  They work with every backend: the queue object crosses the
process boundary and rebuilds what it must (a connection) in the child.

A :class:`Producer` registers with the queue under its own ``producer_id``
(chosen when it is made, so the parent knows it too and can detach a producer
that died), puts what ``produce()`` yields, and detaches; the last producer out
closes the queue.  A :class:`Consumer` joins the queue's run and runs the
consume loop of :mod:`pcq.slots` — where a task's life (take, run, retry,
timeout, ack, give back) is decided — until its sentinel.  The supervisor that
keeps N consumers running is :mod:`pcq.supervisor`.

Signals, in a child: SIGTERM and SIGINT ask for a graceful stop (a consumer
finishes the tasks it is running, hands back the rest of its lease and exits; a
producer stops producing).  A child also gets SIGTERM when its parent dies, so
no child outlives a killed parent (:mod:`pcq.child`: the fork, that signal and the
watchdog every child shares).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sized
from types import FrameType
from typing import Any, Protocol

from pcq.backends.base import Failure, Lease, PutInterrupted, Queue
from pcq.child import ChildProcess, die_with_parent, kill_self_after
from pcq.envelope import Batch, Envelope, short_repr
from pcq.errors import BackendLost, PcqError, SerializationError
from pcq.settings import IDLE_WAIT, ExitCode, StageSettings, is_async_handler
from pcq.slots import Handling, consume

log = logging.getLogger("pcq")

#: Exit code of a Producer whose produce() raised.
PRODUCER_FAILED = int(ExitCode.FAILED)
#: Exit code of a consumer that lost its backend for good (BackendLost): it says
#: nothing; its supervisor finds out for itself and speaks once for the host.
BACKEND_LOST = int(ExitCode.BACKEND_LOST)
#: Exit code of a Consumer whose setup() raised: the supervisor does not restart
#: it (a restart would fail the same way) and the job stops.
SETUP_FAILED = 4
#: How long a consumer whose parent died may take to finish its running task:
#: no supervisor is left to enforce a grace period.
ORPHAN_GRACE = 5.0
#: How long a producer asked to stop may stay in the queue's code (waiting for
#: room in a full queue) before it ends itself.
STOP_GRACE = 1.0


class _Stop(BaseException):
    """Raised in a producer that was asked to stop, to leave produce() at once."""


#: Where the queue's own code lives (every backend): a stop never interrupts it.
_QUEUE_CODE = os.path.dirname(os.path.abspath(sys.modules[Queue.__module__].__file__ or ""))


def _producing(frame: FrameType | None, items: Any) -> bool:
    """True when ``frame`` runs the producer's own code (``items`` or what it
    calls), False inside the queue's code (``pcq/backends``)."""
    while frame is not None:
        if frame.f_code is items:
            return True
        if frame.f_code.co_filename.startswith(_QUEUE_CODE):
            return False
        frame = frame.f_back
    return False


class Producer(ChildProcess):
    """Runs ``produce()`` once and puts every item it yields.

    When it returns, the producer detaches; the last producer to detach closes
    the queue (one sentinel per live consumer), unless ``close_when_done`` is
    False.
    """

    def __init__(
        self,
        queue: Queue,
        produce: Callable[[], Iterable[Any]] | None = None,
        *,
        close_when_done: bool = True,
        name: str | None = None,
        length: tuple[Any, int] | None = None,
        attached: tuple[Any, int] | None = None,
    ) -> None:
        super().__init__(name=name)
        self.queue = queue
        self._produce = produce
        self.close_when_done = close_when_done
        #: The id this producer attaches with: the parent knows it too, so it can
        #: detach a producer that died (``Queue.detach_producer(producer_id)``).
        self.producer_id = uuid.uuid4().hex
        self._parent_pid = os.getpid()
        # (shared int64 array, index): where to note len() of what produce()
        # returned, when it has one, so that a progress display knows the total.
        self._length = length
        # (shared int64 array, index): set to 1 once registered, so that the job can
        # let go of its own hold on the queue (see pcq.job).
        self._attached = attached

    def produce(self) -> Iterable[Any]:
        """The items to put.  Override, or pass ``produce=`` to the constructor."""
        if self._produce is None:
            raise NotImplementedError("pass produce= or override Producer.produce()")
        return self._produce()

    def run(self) -> None:
        die_with_parent(self._parent_pid)
        stop = _ProducerStop(self.queue)
        queue = self.queue
        queue.attach_producer(self.producer_id)
        if self._attached is not None:
            array, at = self._attached
            array[at] = 1
        code = 0
        try:
            queue.put_many(stop.items(self._produced))
        except (_Stop, PutInterrupted):
            code = 143
        except PcqError as exc:
            what = exc.where() if isinstance(exc, SerializationError) else str(exc)
            print(f"pcq: producer {self.name}: {what}; this producer did not close the queue",
                  file=sys.stderr, flush=True)
            code = PRODUCER_FAILED
        except Exception:
            print(f"pcq: producer {self.name} failed:", file=sys.stderr)
            traceback.print_exc()
            code = PRODUCER_FAILED
        finally:
            stop.disarm()
            queue.detach_producer(self.producer_id,
                                  close_if_last=self.close_when_done and code == 0)
            queue.dispose()
        if code:
            sys.exit(code)

    def _produced(self) -> Iterable[Any]:
        produced = self.produce()
        if self._length is not None and isinstance(produced, Sized):
            array, at = self._length
            array[at] = len(produced)  # the job's total, for a progress display
        return produced


class _ProducerStop:
    """SIGTERM and SIGINT in a producer.

    A stop interrupts produce() at once, but never the queue's own code: an
    exception raised there by a signal handler could tear a request.  There the
    stop waits for the next item, for STOP_GRACE at most.  The handler tells the
    two apart by the stack it interrupted, so the items cost nothing per item
    but one flag check."""

    def __init__(self, queue: Queue) -> None:
        self._queue = queue
        self.stopping = False
        self._watchdog: threading.Timer | None = None
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if _producing(frame, self.items.__code__):
            raise _Stop
        self._queue.interrupt()  # a put waiting for room gives up, putting no more
        if self._watchdog is None:
            self._watchdog = kill_self_after(STOP_GRACE)

    def items(self, produce: Callable[[], Iterable[Any]]) -> Iterator[Any]:
        if self.stopping:
            raise _Stop
        for item in produce():
            yield item
            if self.stopping:
                raise _Stop

    def disarm(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self._watchdog is not None:
            self._watchdog.cancel()


class Seat(Protocol):
    """Where a consumer tells its supervisor how it is doing, in memory they
    share (:class:`pcq.supervisor.Seat`): a consumer writes, its supervisor
    reads.  ``serving``: the run it serves; ``succeeded``: tasks handled
    successfully (it is not crash-looping); ``running``: the task it runs inline
    under a timeout ('' : none); ``counted``: its acknowledged work (done,
    failed, retried) for the host's summary; ``setup_failed``: why its setup()
    raised, in one line."""

    def serving(self, run: int) -> None: ...
    def succeeded(self, tasks: int) -> None: ...
    def running(self, task_id: str) -> None: ...
    def counted(self, done: int, failed: int, retried: int, garbage: int = 0) -> None: ...
    def setup_failed(self, line: str) -> None: ...


class Consumer(ChildProcess):
    """Takes tasks and calls ``handle(item)`` for each, until its sentinel.

    What it does with each task is ``settings`` (a
    :class:`~pcq.settings.StageSettings`): a handler that raises is retried up
    to ``retries`` times, after ``backoff * 2**attempt`` seconds, then
    dead-lettered with its traceback; one still running after ``timeout``
    seconds counts as failed (see :mod:`pcq.runners` for how each kind of
    handler is stopped); a task whose consumers died ``max_deliveries`` times is
    dead-lettered unhandled.  With ``concurrency`` C > 1, up to C tasks run at
    once: a plain handler in C threads, an ``async def`` handler as asyncio
    tasks.  The loop itself is :mod:`pcq.slots`, the same at every concurrency.

    For a class-style consumer, the loose keywords ``retries=``, ``timeout=``,
    ``backoff=``, ``concurrency=``, ``setup=`` and ``max_deliveries=`` (default:
    the queue's) build the settings; give either them or ``settings=``.

    ``setup()`` (or ``setup=``, a function of no arguments) runs once in the
    consumer process before its first task, like ``Pool(initializer=...)``: the
    place to open database or HTTP clients.  If it raises, the consumer takes no
    task, says why in one line and exits with ``SETUP_FAILED``; its supervisor
    does not restart it and the job stops.

    ``burst``: stop as soon as there is nothing to take and no producer is
    attached, rather than wait for the next run.
    """

    def __init__(
        self,
        queue: Queue,
        handle: Callable[[Any], Any] | None = None,
        *,
        settings: StageSettings | None = None,
        name: str | None = None,
        burst: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(name=name)
        if settings is None:
            options.setdefault("max_deliveries", queue.max_deliveries)
            settings = StageSettings(**options)
        elif options:
            raise TypeError(f"give settings= or {', '.join(options)}=, not both")
        self.settings = settings
        self.queue = queue
        self._handle = handle
        self.burst = burst
        #: The run a replacement's predecessor served (see :meth:`supervise`).
        self.joins: int | None = None
        self._seat: Seat | None = None
        self._parent_pid = os.getpid()
        self._stopping = False
        self._stale_seen = 0  # the queue's stale_leases at the last _count
        self._garbage_seen = 0  # the queue's garbage at the last _count

    def supervise(self, seat: Seat, joins: int | None) -> None:
        """Called by a supervisor before :meth:`start`: where this consumer
        reports, and the run it serves (``Queue.join_run(run=)``)."""
        self._seat = seat
        self.joins = joins

    def handle(self, item: Any) -> Any:
        """Handle one task.  Override, or pass ``handle=`` to the constructor."""
        if self._handle is None:
            raise NotImplementedError("pass handle= or override Consumer.handle()")
        return self._handle(item)

    def setup(self) -> None:
        """Runs once in this process before the first task.  Override, or pass
        ``setup=`` to the constructor."""
        if self.settings.setup is not None:
            self.settings.setup()

    def run(self) -> None:
        die_with_parent(self._parent_pid)
        try:
            self.setup()
        except Exception as exc:
            self._setup_failed(exc)
        orphan_watchdog: list[threading.Timer] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            # Orphaned: no one else enforces a grace.  Checked on every signal, not
            # the first only: a parent with threads sends PDEATHSIG once when the
            # thread that forked us dies (getppid() is still the parent) and again
            # when the whole process is gone.
            if not orphan_watchdog and os.getppid() != self._parent_pid:
                orphan_watchdog.append(kill_self_after(ORPHAN_GRACE))
            self._stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        queue = self.queue
        self._stale_seen, self._garbage_seen = queue.stale_leases, queue.garbage
        code = 0
        try:
            served = queue.join_run(burst=self.burst, run=self.joins)
            if self._seat is not None:
                self._seat.serving(served)
            self.consume()
        except BackendLost:
            code = BACKEND_LOST  # no traceback, no line: the supervisor reports it
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            with contextlib.suppress(BackendLost):  # gone: its heartbeat expires instead
                queue.detach_consumer()
            queue.dispose()
        if code:
            sys.exit(code)

    def _setup_failed(self, exc: Exception) -> None:
        """One line (the first failing consumer's, when a supervisor collects
        them) and exit SETUP_FAILED, before the queue was touched."""
        where = f"{type(exc).__name__}: {exc}"
        line = f"setup failed in consumer {self.name} (pid {os.getpid()}): {where}"
        if self._seat is None:
            print(f"pcq: error: {line}", file=sys.stderr, flush=True)
        else:
            self._seat.setup_failed(line)
        log.debug("setup traceback:\n%s", traceback.format_exc())
        sys.exit(SETUP_FAILED)

    def _handler(self) -> Callable[[Any], Any]:
        """The user's handler: ``handle=``, or an override of :meth:`handle`."""
        own = self._handle is not None and type(self).handle is Consumer.handle
        return self._handle if own and self._handle is not None else self.handle

    def _is_async(self) -> bool:
        """Whether the handler is an ``async def`` (a partial of one, or an object
        whose ``__call__`` is one, counts too): the loop awaits it."""
        return is_async_handler(self._handler())

    def consume(self) -> None:
        """The loop (:mod:`pcq.slots`): take, run, acknowledge, until a sentinel
        or a stop."""
        consume(self.queue, self.handling(), self.settings)

    def handling(self) -> Handling:
        """What the consume loop calls back for; a stage (:mod:`pcq.stages`)
        overrides :meth:`_task` and :meth:`_settle` to handle its outputs."""
        call, expand = self._task()
        seat = self._seat
        return Handling(
            call=call, is_async=self._is_async(), failed=self._failed, settle=self._settle,
            count=self._count, stopping=lambda: self._stopping, expand=expand,
            mark=seat.running if seat is not None else None)

    def _task(self) -> tuple[Callable[[Any], Any], Callable[[Any], list[Any]] | None]:
        """What runs one task's body, and what turns its result into the
        outputs to keep (a stage's; None: nothing is kept)."""
        return self._handler(), None

    def _settle(self, lease: Lease, failures: list[Failure], give_back: list[Envelope],
                outputs: list[Any], take: int) -> Lease | None:
        if take:
            return self.queue.ack_and_take(lease, failures, give_back, take, IDLE_WAIT)
        self.queue.ack(lease, failures, give_back)
        return None

    def _count(self, handled: int, failures: list[Failure]) -> None:
        """Add the lease just acknowledged to this consumer's tally, unless that
        ack came too late (the lease was reaped and went to another consumer,
        which counts it; the backend's ``stale_leases`` grew): a host's summary
        holds only what its acks changed.  Called once after each ack."""
        seat = self._seat
        if seat is None:
            return
        if handled > len(failures):
            seat.succeeded(handled - len(failures))
        stale, seen = self.queue.stale_leases, self._stale_seen
        self._stale_seen = stale
        queue = self.queue
        garbage, self._garbage_seen = queue.garbage - self._garbage_seen, queue.garbage
        if stale == seen:
            dead = sum(1 for f in failures if f.retry_in is None)
            seat.counted(handled - len(failures), dead, len(failures) - dead, garbage)

    def _failed(self, batch: Batch, index: int, exc: BaseException) -> tuple[Failure, list[Any]]:
        """A failed attempt at ``batch``'s task ``index``, and the outputs it
        gives (none; pcq.map's stage gives the chunk's results)."""
        return self._failure(batch, index, exc), []

    def _failure(self, batch: Batch, index: int, exc: BaseException) -> Failure:
        env = batch.envelope(index)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.failure(env, f"{type(exc).__name__}: {exc}", tb)

    def task_text(self, env: Envelope) -> str:
        """How a log line names a task: its content, as `pcq dead list` shows it."""
        return f"task {short_repr(env.body)}"

    def dead_text(self, env: Envelope) -> str:
        """What a log line adds when a task goes to dead letters."""
        return f"; dead-lettered (id {env.id})"

    def failure(self, env: Envelope, error: str, tb: str = "") -> Failure:
        """A failed attempt at ``env``: retried while it has retries left, else
        dead-lettered."""
        # One line a person can act on: which task (its content, as `pcq dead list`
        # shows it), which attempt of how many, where, and why.
        retries = self.settings.retries
        what = (f"{self.task_text(env)} failed in {self.name} (pid {self.pid}), "
                f"attempt {env.attempts + 1}/{retries + 1}: {error}")
        if env.attempts < retries:
            # The exponent is capped: a huge --retries must not overflow a float.
            delay = self.settings.backoff * (2 ** min(env.attempts, 32)) * (1 + random.random() / 4)
            log.info("%s; retry in %.2f s", what, delay)
            return Failure(env, error, tb, retry_in=delay)
        # The traceback stays with the dead letter; in the log it would bury the
        # lines of every other task, so it shows at debug level only.
        log.error("%s%s", what, self.dead_text(env))
        log.debug("task %s (id %s) traceback:\n%s", short_repr(env.body), env.id, tb.rstrip())
        return Failure(env, error, tb)
