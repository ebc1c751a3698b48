"""Producer and Consumer processes, and the supervisor that keeps N consumers.

Both roles are ``multiprocessing.Process`` subclasses, as in the classic
pattern: pass a queue and a function, or subclass and override ``produce()`` /
``handle(item)``.  They work with every backend: the queue object crosses the
process boundary and rebuilds what it must (a connection) in the child.

Signals, in a child: SIGTERM and SIGINT ask for a graceful stop (a consumer
finishes the task it is running, hands back the rest of its lease and exits; a
producer stops producing).  A child also gets SIGTERM when its parent dies, so
no child outlives a killed parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Sized
from types import FrameType
from typing import Any

from pcq.backends.base import (
    MAX_BATCH,
    TARGET_BATCH_SECONDS,
    Failure,
    Lease,
    PutInterrupted,
    Queue,
    poisoned,
)
from pcq.envelope import Batch, Envelope, short_repr
from pcq.errors import BackendLost, PcqError, SerializationError, TaskTimeout
from pcq.slots import AckOutputs, consume_concurrently, run_coroutine

log = logging.getLogger("pcq")

#: Exit code of a Producer whose produce() raised.
PRODUCER_FAILED = 1
#: Exit code of a consumer that lost its backend for good (BackendLost): it says
#: nothing; its supervisor finds out for itself and speaks once for the host.
BACKEND_LOST = 3
#: Exit code of a Consumer whose setup() raised: the supervisor does not restart
#: it (a restart would fail the same way) and the job stops.
SETUP_FAILED = 4
#: How long an idle consumer waits for a task before looking around (reap, stop).
IDLE_WAIT = 0.25
#: How long a consumer whose parent died may take to finish its running task:
#: no supervisor is left to enforce a grace period.
ORPHAN_GRACE = 5.0
#: How long a producer asked to stop may stay in the queue's code (waiting for
#: room in a full queue) before it ends itself.
STOP_GRACE = 1.0
#: How long past its timeout a task may go on (its handler swallowed the
#: TaskTimeout, or sits in C code) before the supervisor kills its consumer.
KILL_GRACE = 2.0
#: A supervisor restarts a consumer that died at once the first time; while they
#: keep dying, after a delay doubling from RESTART_DELAY up to RESTART_DELAY_MAX.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 5.0
#: A death this long after the previous one starts the delays over.
RESTART_CALM = 10.0
_PR_SET_PDEATHSIG = 1


class _Stop(BaseException):
    """Raised in a producer that was asked to stop, to leave produce() at once."""


def _die_with_parent(parent_pid: int) -> None:
    """Make sure this child gets SIGTERM if its parent dies (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    else:  # pragma: no cover - no prctl: watch the parent instead
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


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


def _kill_self_after(seconds: float) -> threading.Timer:
    """A watchdog that SIGKILLs this process in ``seconds`` unless cancelled.
    Dying by a signal tells the parent that nothing was cleaned up."""
    watchdog = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
    watchdog.daemon = True
    watchdog.start()
    return watchdog


class _Process(mp.Process):
    """``multiprocessing.Process`` that forks on Linux, whatever the default start
    method (Python 3.14 makes it forkserver there): a queue, a handler loaded
    from ``path/file.py:function`` and a lambda cross into a forked child as they
    are, with nothing to pickle or re-import."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # the hook multiprocessing itself uses
        context: Any = mp.get_context("fork" if sys.platform.startswith("linux") else None)
        return context.Process._Popen(process_obj)


class Producer(_Process):
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
    ) -> None:
        super().__init__(name=name)
        self.queue = queue
        self._produce = produce
        self.close_when_done = close_when_done
        self._parent_pid = os.getpid()
        #: Chosen here, in the parent, so that the parent can detach a producer
        #: that died by its id (``Queue.detach_producer(producer_id)``).
        self.producer_id = uuid.uuid4().hex
        # (shared int64 array, index): where to note len() of what produce()
        # returned, when it has one, so that a progress display knows the total.
        self._length = length

    def produce(self) -> Iterable[Any]:
        """The items to put.  Override, or pass ``produce=`` to the constructor."""
        if self._produce is None:
            raise NotImplementedError("pass produce= or override Producer.produce()")
        return self._produce()

    def run(self) -> None:
        _die_with_parent(self._parent_pid)
        # A stop interrupts produce() at once, but never the queue's own code: an
        # exception raised there by a signal handler could tear a request.
        # There the stop waits for the next item, for STOP_GRACE at most.  The
        # handler tells the two apart by the stack it interrupted, so the items
        # cost nothing per item but one flag check.
        stopping = False
        watchdog: threading.Timer | None = None

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping, watchdog
            stopping = True
            if _producing(frame, items.__code__):
                raise _Stop
            self.queue.interrupt()  # a put waiting for room gives up, putting no more
            if watchdog is None:
                watchdog = _kill_self_after(STOP_GRACE)

        def items() -> Iterator[Any]:
            if stopping:
                raise _Stop
            produced = self.produce()
            if self._length is not None and isinstance(produced, Sized):
                array, at = self._length
                array[at] = len(produced)  # the job's total, for a progress display
            for item in produced:
                yield item
                if stopping:
                    raise _Stop

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        queue = self.queue
        queue.attach_producer(self.producer_id)
        code = 0
        try:
            queue.put_many(items())
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
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            if watchdog is not None:
                watchdog.cancel()
            queue.detach_producer(self.producer_id,
                                  close_if_last=self.close_when_done and code == 0)
            queue.dispose()
        if code:
            sys.exit(code)


class Consumer(_Process):
    """Takes tasks and calls ``handle(item)`` for each, until its sentinel.

    A handler that raises is retried up to ``retries`` times, after
    ``backoff * 2**attempt`` seconds, then dead-lettered with its traceback.  With
    ``timeout``, a handler still running after that many seconds is interrupted
    (SIGALRM) and the attempt counts as failed, even if the handler caught the
    TaskTimeout and returned; under a :class:`Supervisor`, one still running
    ``KILL_GRACE`` seconds later is killed, and the attempt counts as failed too.
    A task whose consumers died ``queue.max_deliveries`` times is dead-lettered
    unhandled.  ``burst``: stop as soon as there is nothing to take and no
    producer is attached, rather than wait for the next run.

    ``setup()`` (or ``setup=``, a function of no arguments) runs once in the
    consumer process before its first task, like ``Pool(initializer=...)``: the
    place to open database or HTTP clients.  If it raises, the consumer takes no
    task, says why in one line and exits with ``SETUP_FAILED``; its supervisor
    does not restart it and the job stops.

    With ``concurrency`` C > 1, up to C tasks run at once: a plain handler in C
    threads, an ``async def`` handler as asyncio tasks (see :mod:`pcq.slots`).
    An ``async def`` handler is always awaited: at C == 1 on an event loop of
    this process, one task at a time.
    """

    _call: Callable[[Any], Any]  # what handles one task body (set by consume())

    def __init__(
        self,
        queue: Queue,
        handle: Callable[[Any], Any] | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        backoff: float = 0.05,
        tally: tuple[Any, int] | None = None,
        name: str | None = None,
        burst: bool = False,
        setup: Callable[[], Any] | None = None,
        setup_report: SetupReport | None = None,
        concurrency: int = 1,
    ) -> None:
        super().__init__(name=name)
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self.queue = queue
        self._handle = handle
        self._setup = setup
        self._setup_report = setup_report
        self.concurrency = concurrency
        self._tally = tally  # optional (shared int64 array, offset): done, failed, retried
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff
        self.burst = burst
        #: Set by a supervisor on a replacement: the run its predecessor served.
        self.joins: int | None = None
        self._board: tuple[_Board, int] | None = None  # set by a supervisor: (board, row)
        self._parent_pid = os.getpid()
        self._stopping = False
        self._expired = False
        self._stale_seen = 0  # the queue's stale_leases at the last _count

    def handle(self, item: Any) -> Any:
        """Handle one task.  Override, or pass ``handle=`` to the constructor."""
        if self._handle is None:
            raise NotImplementedError("pass handle= or override Consumer.handle()")
        return self._handle(item)

    def setup(self) -> None:
        """Runs once in this process before the first task.  Override, or pass
        ``setup=`` to the constructor."""
        if self._setup is not None:
            self._setup()

    def run(self) -> None:
        _die_with_parent(self._parent_pid)
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
                orphan_watchdog.append(_kill_self_after(ORPHAN_GRACE))
            self._stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self.timeout:

            def expire(signum: int, frame: FrameType | None) -> None:
                self._expired = True
                raise TaskTimeout(f"task ran past its timeout of {self.timeout:g} s")

            signal.signal(signal.SIGALRM, expire)
        queue = self.queue
        self._stale_seen = queue.stale_leases
        code = 0
        try:
            served = queue.join_run(burst=self.burst, run=self.joins)
            if self._board is not None:
                self._board[0].serving(self._board[1], served)
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
        if self._setup_report is None:
            print(f"pcq: error: {line}", file=sys.stderr, flush=True)
        else:
            self._setup_report.record(line)
        log.debug("setup traceback:\n%s", traceback.format_exc())
        sys.exit(SETUP_FAILED)

    def _is_async(self) -> bool:
        """Whether the handler is an ``async def`` (``handle=``, or an override;
        a partial of one, or an object whose ``__call__`` is one, counts too)."""
        own = self._handle is not None and type(self).handle is Consumer.handle
        fn = self._handle if own else self.handle
        return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None))  # noqa: B004 - the method, not callable()

    def consume(self) -> None:
        """The loop: take a lease, handle it, acknowledge it together with taking
        the next (one round trip where the backend can); stop at a sentinel."""
        is_async = self._is_async()
        if self.concurrency > 1:
            call, outputs = self._concurrent_task()
            consume_concurrently(
                self.queue, call, is_async=is_async, slots=self.concurrency,
                timeout=self.timeout, stopping=lambda: self._stopping, failure=self._failure,
                count=self._count if self._tally is not None else None, outputs=outputs)
            return
        if not is_async:
            self._call = self._call_with_timeout if self.timeout else self.handle
            self._consume()
            return
        loop = asyncio.new_event_loop()  # one per process: await each task on it in turn
        self._call = lambda body: loop.run_until_complete(
            run_coroutine(self.handle(body), self.timeout))
        try:
            self._consume()
        finally:
            loop.close()

    def _consume(self) -> None:
        queue = self.queue
        want = 1  # tasks per take: grows while tasks are cheap (slow start)
        next_reap = time.monotonic() + queue.reap_interval
        lease: Lease | None = None
        while True:
            if lease is None:
                if self._stopping:
                    return
                lease = queue.take(want, timeout=IDLE_WAIT)
                if lease is None:
                    if time.monotonic() >= next_reap:
                        queue.reap()
                        next_reap = time.monotonic() + queue.reap_interval
                    continue
            started = time.perf_counter()
            failures, give_back, handled = self._handle_lease(lease)
            if handled:
                cost = (time.perf_counter() - started) / handled
                queue.note_task_cost(cost)
                fit = int(TARGET_BATCH_SECONDS / cost) if cost > 0 else MAX_BATCH
                want = max(1, min(MAX_BATCH, want * 2, fit))
            if lease.sentinel is not None or self._stopping:
                self._ack(lease, failures, give_back)
                self._count(handled, failures)
                return
            lease = self._ack_and_take(lease, failures, give_back, want)
            self._count(handled, failures)  # after the ack: it may have come too late

    def _concurrent_task(self) -> tuple[Callable[[Any], Any], AckOutputs | None]:
        """What a slot calls per task, and how a lease is acknowledged with the
        outputs of its tasks (None: there are none).  A stage overrides this."""
        return self.handle, None

    # A stage (pcq.stages) overrides these three to put what its handler returned.
    def _ack(self, lease: Lease, failures: list[Failure], give_back: list[Envelope]) -> None:
        self.queue.ack(lease, failures, give_back)

    def _ack_and_take(
        self, lease: Lease, failures: list[Failure], give_back: list[Envelope], want: int
    ) -> Lease | None:
        return self.queue.ack_and_take(lease, failures, give_back, want, timeout=IDLE_WAIT)

    def _handled(self, result: Any) -> None:
        """``handle`` returned ``result`` (called outside the task's timeout)."""

    def _count(self, handled: int, failures: list[Failure]) -> None:
        """Add the lease just acknowledged to this consumer's tally, unless that
        ack came too late (the lease was reaped and went to another consumer,
        which counts it; the backend's ``stale_leases`` grew): a host's summary
        holds only what its acks changed.  Called once after each ack."""
        if self._board is not None and handled > len(failures):
            self._board[0].succeeded(self._board[1], handled - len(failures))
        stale, seen = self.queue.stale_leases, self._stale_seen
        self._stale_seen = stale
        if self._tally is None or stale != seen:
            return
        array, at = self._tally
        dead = sum(1 for f in failures if f.retry_in is None)
        array[at] += handled - len(failures)
        array[at + 1] += dead
        array[at + 2] += len(failures) - dead

    def _handle_lease(self, lease: Lease) -> tuple[list[Failure], list[Envelope], int]:
        """Handle every task of ``lease``; on a stop request, finish the running
        task and return the rest unstarted.  Returns (failures, give_back, handled)."""
        failures: list[Failure] = []
        poison = poisoned(lease, self.queue.max_deliveries)
        if poison:  # a task that killed its consumers: never run it again
            return poison, [], lease.size
        call = self._call
        keep: Callable[[Any], None] | None = self._handled
        if getattr(keep, "__func__", None) is Consumer._handled:
            keep = None  # nothing to keep (not a stage): no call per task
        watch = self._board if self.timeout else None  # the supervisor enforces timeouts
        handled = 0
        for n, batch in enumerate(lease.batches):
            for i, body in enumerate(batch.bodies):
                if self._stopping:
                    rest = [batch.envelope(j) for j in range(i, len(batch.bodies))]
                    rest += [env for later in lease.batches[n + 1 :] for env in later.envelopes()]
                    return failures, rest, handled + i
                try:
                    if watch is not None:
                        watch[0].running(watch[1], f"{batch.tag}-{batch.seq + i}")
                    result = call(body)
                except Exception as exc:
                    failures.append(self._failure(batch, i, exc))
                else:
                    if keep is not None:
                        keep(result)
                finally:
                    if watch is not None:
                        watch[0].running(watch[1], "")
            handled += len(batch.bodies)
        return failures, [], handled

    def _call_with_timeout(self, body: Any) -> Any:
        assert self.timeout is not None
        self._expired = False
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            result = self.handle(body)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._expired:  # the handler caught the TaskTimeout and went on: still failed
            raise TaskTimeout(f"task ran past its timeout of {self.timeout:g} s")
        return result

    def _failure(self, batch: Batch, index: int, exc: BaseException) -> Failure:
        env = batch.envelope(index)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.failure(env, f"{type(exc).__name__}: {exc}", tb)

    def failure(self, env: Envelope, error: str, tb: str = "") -> Failure:
        """A failed attempt at ``env``: retried while it has retries left, else
        dead-lettered."""
        # One line a person can act on: which task (its content, as `pcq dead list`
        # shows it), which attempt of how many, where, and why.
        what = (f"task {short_repr(env.body)} failed in {self.name} (pid {self.pid}), "
                f"attempt {env.attempts + 1}/{self.retries + 1}: {error}")
        if env.attempts < self.retries:
            # capped: 2**attempts of a huge --retries would overflow a float
            delay = self.backoff * 2.0 ** min(env.attempts, 16) * (1 + random.random() / 4)
            log.info("%s; retry in %.2f s", what, delay)
            return Failure(env, error, tb, retry_in=delay)
        # The traceback stays with the dead letter; in the log it would bury the
        # lines of every other task, so it shows at debug level only.
        log.error("%s; dead-lettered (id %s)", what, env.id)
        log.debug("task %s (id %s) traceback:\n%s", short_repr(env.body), env.id, tb.rstrip())
        return Failure(env, error, tb)


class SetupReport:
    """The first consumer setup failure of a job, in shared memory, so that a
    job whose 16 consumers all fail says so once."""

    SIZE = 1000

    def __init__(self) -> None:
        self._text: Any = mp.Array("c", self.SIZE)

    def record(self, line: str) -> None:
        with self._text.get_lock():
            if not self._text.value:
                self._text.value = line.encode(errors="replace")[: self.SIZE - 1]

    def message(self) -> str | None:
        return self._text.value.decode(errors="replace") or None


class WorkerTallies:
    """What each consumer of one supervisor did (done, failed, retried), in
    shared memory each consumer writes only its own row of."""

    def __init__(self, workers: int) -> None:
        self._rows = max(1, workers) * 64  # room for replacements
        self._array = mp.RawArray("q", self._rows * 3)

    def row(self, index: int) -> tuple[Any, int]:
        """(shared array, offset) of consumer ``index``'s row."""
        return self._array, (index % self._rows) * 3

    def totals(self) -> tuple[int, int, int]:
        a = self._array
        return (sum(a[0::3]), sum(a[1::3]), sum(a[2::3]))


class _Board:
    """Shared memory between a supervisor and its consumers, one row each: the run
    a consumer serves, and the task it is running under a timeout (when it
    started, by the monotonic clock every process of a host shares, and its id)."""

    ID_BYTES = 64

    def __init__(self, rows: int) -> None:
        self._numbers = mp.RawArray("d", rows * 2)  # run served, task started (0: none)
        self._done = mp.RawArray("q", rows)  # tasks handled successfully: progress
        self._ids = mp.RawArray("c", rows * self.ID_BYTES)
        self.rows = rows

    def clear(self, row: int) -> None:
        self._numbers[2 * row] = -1
        self._done[row] = 0
        self.running(row, "")

    def succeeded(self, row: int, tasks: int) -> None:
        """The consumer of ``row`` handled ``tasks`` tasks successfully: however
        it dies later, it was not crash-looping (dead-lettering poison tasks,
        or failing every task, is no such progress)."""
        self._done[row] += tasks

    def progressed(self, row: int) -> bool:
        return bool(self._done[row] > 0)

    def serving(self, row: int, run: int) -> None:
        self._numbers[2 * row] = run

    def served(self, row: int) -> int | None:
        run = int(self._numbers[2 * row])
        return None if run < 0 else run

    def running(self, row: int, task_id: str) -> None:
        """The consumer of ``row`` starts task ``task_id`` now ('' : it is done)."""
        at = row * self.ID_BYTES
        if not task_id:
            self._numbers[2 * row + 1] = 0.0
            return
        raw = task_id.encode()[: self.ID_BYTES - 1]
        self._ids[at : at + len(raw) + 1] = raw + b"\0"
        self._numbers[2 * row + 1] = time.monotonic()

    def task(self, row: int) -> tuple[float, str]:
        """(when the running task started, its id); (0, '') when none runs."""
        started = self._numbers[2 * row + 1]
        at = row * self.ID_BYTES
        raw = bytes(self._ids[at : at + self.ID_BYTES]).split(b"\0", 1)[0]
        return started, raw.decode(errors="replace")


class Supervisor:
    """Keeps ``workers`` consumer processes running until each gets its sentinel.

    A consumer that exits with code 0 took its sentinel and is not replaced.  One
    that dies any other way (killed, crashed) is evicted — its in-flight tasks go
    back, as suspects that are handed out alone — and a replacement starts: at
    once the first time, then, while consumers keep dying, after a delay that
    doubles up to ``RESTART_DELAY_MAX`` (a crash loop never forks hundreds of
    processes a second).  Every consumer serves the run the queue was at when the
    supervisor started (the next one if it was idle), a replacement the run its
    predecessor served: a consumer that starts late, after that run finished,
    stops with its siblings instead of waiting for the next run.
    If the queue is closed and tasks are still pending while no consumer is left
    (tasks handed back after the sentinels), one more consumer starts to finish them.

    While consumers run, a thread vouches for them to the queue
    (:meth:`Queue.keep_alive`: a handler that holds the GIL does not make its
    consumer look dead) and kills a consumer whose task runs ``KILL_GRACE``
    seconds past its timeout; that task counts a failed attempt, not a death.
    One that lost the backend (BACKEND_LOST) makes the supervisor look for
    itself, and raise if it agrees.

    When no consumer is left but the closed run still has pending tasks, the
    supervisor does not leave (see :meth:`_after_last`): it reaps dead hosts'
    tasks and starts one consumer only when there is something to take.
    """

    def __init__(self, queue: Queue, make: Callable[[int], Consumer], workers: int) -> None:
        self.queue = queue
        self._make = make
        self.workers = workers
        self.live: dict[int, Consumer] = {}
        self.restarts = 0
        #: Tasks of consumers killed past their timeout: (failed, retried); a
        #: consumer's own tally cannot count them.
        self.killed_tasks = [0, 0]
        self.setup_failed = False  # a consumer's setup raised: stop the job
        self._started = 0
        self._board = _Board(workers + 2)  # room for the extra consumer of poll()
        self._free_rows = list(range(self._board.rows))
        self._rows: dict[int, int] = {}  # sentinel -> board row
        self._due: list[tuple[float, int | None]] = []  # (when, run) of restarts
        self._streak = 0  # deaths in a row, each within RESTART_CALM of the last
        self._last_death = -math.inf
        self._killed: dict[int, str] = {}  # pid -> task it ran past its timeout
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._watcher: threading.Thread | None = None
        self._run: int | None = None  # the run this supervisor's consumers serve
        self._waiting = False  # the run still has tasks in flight on other hosts

    def start(self) -> None:
        self._run = self.queue.run_to_serve()
        for _ in range(self.workers):
            self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="pcq-supervisor", daemon=True)
        self._watcher.start()

    def _spawn(self, joins: int | None = None) -> None:
        consumer = self._make(self._started)
        self._started += 1
        row = self._free_rows.pop() if self._free_rows else self._started % self._board.rows
        self._board.clear(row)
        consumer.joins = self._run if joins is None else joins
        consumer._board = (self._board, row)
        consumer.start()
        assert consumer.sentinel is not None
        with self._lock:
            self.live[consumer.sentinel] = consumer
            self._rows[consumer.sentinel] = row

    def sentinels(self) -> list[int]:
        return list(self.live)

    def poll(self, ready: Iterable[int] = ()) -> None:
        """Handle consumers that exited (their sentinels in ``ready``), and start
        the replacements that are due."""
        for fd in list(ready):
            with self._lock:
                consumer = self.live.pop(fd, None)
                row = self._rows.pop(fd, None)
            if consumer is None or row is None:
                continue
            consumer.join()
            served = self._board.served(row)
            progressed = self._board.progressed(row)
            self._free_rows.append(row)
            if consumer.exitcode == SETUP_FAILED:
                self.setup_failed = True  # a replacement would fail the same way
                continue
            if consumer.exitcode == BACKEND_LOST:
                # Its link gave up; ours shares neither its clock nor its
                # connections.  Ask the server: this raises BackendLost if the
                # backend is gone for us too; otherwise replace it as a crash.
                self.queue.counters()
            # Killed for a timeout, even if it exited by itself just before: its
            # task still counts failed and what it held is still to release.
            if consumer.exitcode != 0 or consumer.pid in self._killed:
                self._died(consumer, served, progressed)
        now = time.monotonic()
        for when, joins in [d for d in self._due if d[0] <= now]:
            self._due.remove((when, joins))
            self._spawn(joins)
        if not self.live and not self._due and not self.setup_failed:
            self._after_last()

    def _after_last(self) -> None:
        """Every consumer here has exited; the closed run may still need this host.

        Tasks in ready or delayed (handed back after the sentinels, or reaped
        just now from hosts whose heartbeat expired): start one consumer — it
        takes them ahead of any leftover sentinel.  Tasks in flight elsewhere:
        start nothing and stay (``done`` is False), looking again at each poll,
        because their host may be dead and only a live host reaps (the reap runs
        here, not in a consumer that would take a leftover sentinel and exit at
        once, over and over).  Nothing pending, or an open queue: done.
        """
        self._waiting = False
        counters = self.queue.counters()
        if counters.pending <= 0 or not counters.closed:
            return
        reaped = self.queue.reap()
        # pending counts tasks in ready, delayed and in flight: what is not in
        # flight can be taken now (reaped tasks were in flight a moment ago).
        if reaped or counters.pending > counters.in_flight:
            self._spawn()
        elif counters.in_flight:
            self._waiting = True

    def _died(self, consumer: Consumer, served: int | None, progressed: bool = False) -> None:
        """Give back the tasks of a consumer that died and plan its replacement.

        Deaths in a row delay the replacement (a crash loop); a consumer that
        handled tasks successfully before it died breaks the streak: it was
        killed in the middle of useful work (the OOM killer, an operator), and
        holding its replacement back would only slow the job."""
        assert consumer.pid is not None
        task = self._killed.pop(consumer.pid, None)
        if task is not None:  # killed by us for a timeout: that task failed, no death
            error = f"TaskTimeout: task ran past its timeout of {consumer.timeout:g} s " \
                    f"and its consumer was killed {KILL_GRACE:g} s later"
            failures: list[Failure] = []

            def fail(env: Envelope) -> Failure:
                failures.append(consumer.failure(env, error))
                return failures[-1]

            if self.queue.fail_running(consumer.pid, task, fail) and failures:
                self.killed_tasks[failures[-1].retry_in is not None] += 1
            self.queue.release(consumer.pid)
        else:
            self.queue.evict(consumer.pid)
        now = time.monotonic()
        calm = progressed or now - self._last_death >= RESTART_CALM
        self._streak = 1 if calm else self._streak + 1
        self._last_death = now
        delay = 0.0 if self._streak == 1 else RESTART_DELAY * 2 ** (self._streak - 2)
        delay = min(delay, RESTART_DELAY_MAX)
        log.warning("consumer %s (pid %d) died with code %s; restarting it in %.1f s",
                    consumer.name, consumer.pid, consumer.exitcode, delay)
        self.restarts += 1
        self._due.append((now + delay, served))

    def pause(self, longest: float) -> float:
        """How long the caller may wait for a consumer to exit before it must call
        :meth:`poll` again (a restart is due)."""
        if not self._due:
            return longest
        return max(0.0, min(longest, min(when for when, _ in self._due) - time.monotonic()))

    def _watch(self) -> None:
        """The supervisor's thread: vouch for live consumers, kill runaway tasks."""
        every = self.queue.keep_alive_every
        next_beat = 0.0
        tick = 0.1 if every is None else min(0.1, every)
        while not self._halt.wait(tick):
            with self._lock:
                running = [(c, self._rows[fd]) for fd, c in self.live.items()]
            now = time.monotonic()
            if every is not None and now >= next_beat:
                next_beat = now + every
                with contextlib.suppress(PcqError):  # the server is away: the next beat
                    self.queue.keep_alive([c.pid for c, _ in running if c.pid is not None])
            for consumer, row in running:
                started, task = self._board.task(row)
                pid = consumer.pid
                if not consumer.timeout or not started or pid is None or pid in self._killed:
                    continue
                if now - started > consumer.timeout + KILL_GRACE and task:
                    self._killed[pid] = task
                    log.error("task %s ran %.1f s past its timeout; killing consumer %s",
                              task, now - started - consumer.timeout, consumer.name)
                    with contextlib.suppress(PcqError):  # gone: the kill counts a death
                        self.queue.killing(pid, task)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    @property
    def done(self) -> bool:
        return not self.live and not self._due and not self._waiting

    def stop(self, grace: float) -> None:
        """SIGTERM every consumer, SIGKILL those still running after ``grace``."""
        self._halt.set()
        if self._watcher is not None:
            self._watcher.join()
        self._due.clear()
        for consumer in self.live.values():
            with contextlib.suppress(ProcessLookupError):
                consumer.terminate()
        deadline = time.monotonic() + grace
        for consumer in self.live.values():
            consumer.join(max(0.0, deadline - time.monotonic()))
        for consumer in self.live.values():
            if consumer.is_alive():
                assert consumer.pid is not None
                with contextlib.suppress(PcqError):  # its leases, set aside: no death
                    self.queue.killing(consumer.pid, "")
                consumer.kill()
                consumer.join()
                with contextlib.suppress(BackendLost):  # gone: its heartbeat expires instead
                    self.queue.release(consumer.pid)  # killed on purpose: no death counted
        self.live.clear()
        self._waiting = False


def wait(handles: list[int], timeout: float) -> list[int]:
    """The process sentinels among ``handles`` that are ready within ``timeout``."""
    if not handles:
        time.sleep(timeout)
        return []
    return [int(x) for x in multiprocessing.connection.wait(handles, timeout)]  # type: ignore[arg-type]
