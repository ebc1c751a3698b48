"""The supervisor: keeps a stage's consumer processes running, and what it
shares with them.

Where a task's life is decided here (the rest is in :mod:`pcq.slots`):

* **A consumer died** (:meth:`Supervisor.poll`, :meth:`Supervisor._died`): its
  in-flight tasks go back at once (``Queue.evict``) with a death counted
  against each, so they come back as *suspects*, handed out alone, and a task
  that killed ``max_deliveries`` consumers is dead-lettered as poison.  A
  replacement starts, after a growing delay while consumers keep dying.
* **Timeout, last resort** (:meth:`Supervisor._watch`): a consumer at
  concurrency 1 shows the task it runs on its :class:`Seat`; one still running
  ``KILL_GRACE`` s past its timeout (a handler that swallowed the TaskTimeout,
  or sits in C code) is killed, and that task counts a failed attempt
  (``Queue.fail_running``), not a death; its other tasks go back with no death
  counted (``Queue.release``).
* **Heartbeats** (:meth:`Supervisor._watch`): the supervisor vouches for its
  live consumers (``Queue.keep_alive``), so a handler that holds the GIL does
  not make its consumer look dead.
* **Stop** (:meth:`Supervisor.stop`): SIGTERM, a grace period, then SIGKILL; a
  consumer killed this way has its tasks put back with no death counted.

A supervisor never writes into a consumer: it hands each one a :class:`Seat`
(its row of the shared :class:`Scoreboard`) and the run to serve through
:meth:`pcq.roles.Consumer.supervise`, and reads the row back.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pcq.backends.base import Failure, Queue
from pcq.envelope import Envelope
from pcq.errors import BackendLost, PcqError
from pcq.roles import BACKEND_LOST, SETUP_FAILED, Consumer
from pcq.settings import StageSettings

log = logging.getLogger("pcq")

#: How long past its timeout a task may go on (its handler swallowed the
#: TaskTimeout, or sits in C code) before the supervisor kills its consumer.
KILL_GRACE = 2.0
#: A supervisor restarts a consumer that died at once the first time; while they
#: keep dying, after a delay doubling from RESTART_DELAY up to RESTART_DELAY_MAX.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 5.0
#: A death this long after the previous one starts the delays over.
RESTART_CALM = 10.0


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
    """What each consumer of one supervisor did (done, failed, retried, and
    messages dead-lettered as not pcq tasks), in shared memory each consumer
    writes only its own row of."""

    def __init__(self, workers: int) -> None:
        self._rows = max(1, workers) * 64  # room for replacements
        self._array = mp.RawArray("q", self._rows * 4)

    def row(self, index: int) -> tuple[Any, int]:
        """(shared array, offset) of consumer ``index``'s row."""
        return self._array, (index % self._rows) * 4

    def totals(self) -> tuple[int, int, int, int]:
        a = self._array
        return (sum(a[0::4]), sum(a[1::4]), sum(a[2::4]), sum(a[3::4]))


class Scoreboard:
    """Shared memory between a supervisor and its consumers, one row each: the run
    a consumer serves, the tasks it handled successfully, and the task it is
    running under a timeout (when it started, by the monotonic clock every
    process of a host shares, and its id).  A consumer writes only its own row,
    through its :class:`Seat`."""

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


class Seat:
    """What one consumer writes for its supervisor (:class:`pcq.roles.Seat`):
    its row of the :class:`Scoreboard`, its row of the :class:`WorkerTallies`,
    and the job's :class:`SetupReport`."""

    def __init__(self, board: Scoreboard, row: int, tally: tuple[Any, int],
                 report: SetupReport) -> None:
        self._board, self._row = board, row
        self._tally = tally
        self._report = report

    def counted(self, done: int, failed: int, retried: int, garbage: int = 0) -> None:
        array, at = self._tally
        array[at] += done
        array[at + 1] += failed
        array[at + 2] += retried
        array[at + 3] += garbage

    def setup_failed(self, line: str) -> None:
        self._report.record(line)

    def serving(self, run: int) -> None:
        self._board.serving(self._row, run)

    def succeeded(self, tasks: int) -> None:
        self._board.succeeded(self._row, tasks)

    def running(self, task_id: str) -> None:
        self._board.running(self._row, task_id)


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

    def __init__(self, queue: Queue, make: Callable[[int], Consumer],
                 settings: StageSettings, setup_report: SetupReport | None = None) -> None:
        self.queue = queue
        self._make = make
        self.settings = settings
        self.workers = settings.workers
        self.live: dict[int, Consumer] = {}
        self.restarts = 0
        #: Tasks of consumers killed past their timeout: (failed, retried); a
        #: consumer's own tally cannot count them.
        self.killed_tasks = [0, 0]
        self.setup_failed = False  # a consumer's setup raised: stop the job
        #: What this supervisor's consumers did (done, failed, retried): totals().
        self.tallies = WorkerTallies(self.workers)
        #: The first setup failure of its consumers (shared with other
        #: supervisors of one job, when given, so that a job says it once).
        self.setup_report = setup_report or SetupReport()
        self._started = 0
        self._board = Scoreboard(self.workers + 2)  # room for the extra consumer of poll()
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
        index = self._started
        consumer = self._make(index)
        self._started += 1
        row = self._free_rows.pop() if self._free_rows else self._started % self._board.rows
        self._board.clear(row)
        seat = Seat(self._board, row, self.tallies.row(index), self.setup_report)
        consumer.supervise(seat, self._run if joins is None else joins)
        consumer.start()
        assert consumer.sentinel is not None
        with self._lock:
            self.live[consumer.sentinel] = consumer
            self._rows[consumer.sentinel] = row

    def totals(self) -> tuple[int, int, int]:
        """(done, failed, retried) by this supervisor's consumers, the tasks of
        those it killed past their timeout included."""
        done, failed, retried, _ = self.tallies.totals()
        return done, failed + self.killed_tasks[0], retried + self.killed_tasks[1]

    def garbage(self) -> int:
        """Messages this supervisor's consumers dead-lettered as not pcq tasks."""
        return self.tallies.totals()[3]

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
            error = f"TaskTimeout: task ran past its timeout of {self.settings.timeout:g} s " \
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
            if self.settings.timeout:
                for consumer, row in running:
                    self._kill_if_overdue(consumer, row, now, self.settings.timeout)

    def _kill_if_overdue(self, consumer: Consumer, row: int, now: float, timeout: float) -> None:
        started, task = self._board.task(row)
        pid = consumer.pid
        if not started or not task or pid is None or pid in self._killed:
            return
        if now - started > timeout + KILL_GRACE:
            self._killed[pid] = task
            log.error("task %s ran %.1f s past its timeout; killing consumer %s",
                      task, now - started - timeout, consumer.name)
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
