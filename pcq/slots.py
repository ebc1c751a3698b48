"""Many tasks at once in one consumer process (``--concurrency C``).

A consumer with C > 1 slots keeps up to C tasks running: a plain handler in a
pool of threads (:class:`ThreadRunner`), an ``async def`` handler as asyncio
tasks on one event loop in a thread of its own (:class:`AsyncRunner`).  The
consumer's main thread alone talks to the queue (take, ack, reap), so a backend
never sees two calls at once, and it alone decides when a task failed.

The loop (:class:`Slots`):

1. While slots are free, take a lease sized to them (a backend may hand out
   more: those tasks wait in a backlog, unstarted).  A backend whose
   ``multiple_leases`` is False holds one lease at a time: the next is taken
   once every task of the current one has finished.
2. Start backlog tasks while slots are free.
3. Wait for tasks to finish; a lease is acknowledged, with its failures, once
   all its tasks have finished (Redis's ack accepts leases out of order).
4. A task still running ``timeout`` seconds after it started counts as a failed
   attempt.  An asyncio task is cancelled; a thread cannot be interrupted, so it
   runs on in the background, its result is ignored, and a new thread takes its
   slot.
5. On a stop request, the backlog goes back to the queue unstarted, the running
   tasks finish (the supervisor's grace period bounds that), leases are
   acknowledged and the loop returns.  A task is in the queue's in-flight set
   from take to ack, so a process killed at any point loses none.
6. A stage (``outputs=``) collects what each task returned — a list of outputs —
   with the lease the task came from, and puts them on the next queue with that
   lease's ack; a failed or timed-out task contributes none.

The heartbeat (Redis) is a thread of the backend's own, so a handler that blocks
the event loop never stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, Protocol

from pcq.backends.base import TARGET_BATCH_SECONDS, Failure, Lease, Queue, poisoned
from pcq.envelope import Batch, Envelope
from pcq.errors import TaskTimeout

#: How long an idle consumer waits for a task before looking around (reap, stop).
IDLE_WAIT = 0.25
#: Longest the main thread waits for a task to finish before it looks again for
#: new tasks (when slots are free), stop requests and timeouts.
POLL = 0.02
#: An async task past its timeout is cancelled by ``asyncio.wait_for``; the main
#: thread counts it failed itself only this much later (a blocked event loop).
ASYNC_SLACK = 0.25

#: (task key, error or None, seconds the handler ran, what the handler returned)
Finished = tuple[int, BaseException | None, float, Any]
#: Acknowledges a lease with the outputs of its tasks (a stage's, see point 6).
AckOutputs = Callable[[Lease, list[Failure], list[Envelope], list[Any]], None]


class Runner(Protocol):
    """Runs handler calls; each outcome goes to ``finished`` as a :data:`Finished`."""

    started: dict[int, float]  # task key -> time.monotonic() when it started

    def submit(self, key: int, body: Any) -> None: ...
    def abandon(self, key: int) -> None: ...
    def close(self) -> None: ...


class ThreadRunner:
    """``slots`` threads calling ``call(body)``.  A timed-out call cannot be
    interrupted: :meth:`abandon` starts one more thread so the slot is free
    again, and the next thread to finish a call exits, so the pool shrinks back."""

    def __init__(self, call: Callable[[Any], Any], slots: int, finished: SimpleQueue[Finished]):
        self.started: dict[int, float] = {}
        self._call = call
        self._finished = finished
        self._jobs: SimpleQueue[tuple[int, Any] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._excess = 0  # threads to retire: one per abandoned call
        self._threads = 0
        for _ in range(slots):
            self._add_thread()

    def _add_thread(self) -> None:
        self._threads += 1
        threading.Thread(target=self._work, name="pcq-slot", daemon=True).start()

    def _work(self) -> None:
        clock, call, jobs, finished = time.monotonic, self._call, self._jobs, self._finished
        while (job := jobs.get()) is not None:
            key, body = job
            self.started[key] = began = clock()
            error: BaseException | None = None
            result: Any = None
            try:
                result = call(body)
            except BaseException as exc:  # a thread must report, not die
                error = exc
            finished.put((key, error, clock() - began, result))
            if self._excess:
                with self._lock:
                    if self._excess:
                        self._excess -= 1
                        self._threads -= 1
                        return

    def submit(self, key: int, body: Any) -> None:
        self._jobs.put((key, body))

    def abandon(self, key: int) -> None:
        with self._lock:
            self._excess += 1
            self._add_thread()

    def close(self) -> None:
        """Let every thread end once its current call returns (never waits)."""
        with self._lock:
            for _ in range(self._threads):
                self._jobs.put(None)


class AsyncRunner:
    """Coroutines of ``handle`` on one event loop, run by a thread of its own."""

    def __init__(
        self,
        handle: Callable[[Any], Awaitable[Any]],
        timeout: float | None,
        finished: SimpleQueue[Finished],
    ) -> None:
        self.started: dict[int, float] = {}
        self._handle = handle
        self._timeout = timeout
        self._finished = finished
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pcq-loop",
                                        daemon=True)
        self._thread.start()

    def submit(self, key: int, body: Any) -> None:
        self._loop.call_soon_threadsafe(self._start, key, body)

    def _start(self, key: int, body: Any) -> None:
        self._tasks[key] = self._loop.create_task(self._run(key, body))

    async def _run(self, key: int, body: Any) -> None:
        self.started[key] = began = time.monotonic()
        error: BaseException | None = None
        result: Any = None
        try:
            result = await run_coroutine(self._handle(body), self._timeout)
        except asyncio.CancelledError:
            error = TaskTimeout(f"task ran past its timeout of {self._timeout:g} s")
        except BaseException as exc:  # reported to the main thread
            error = exc
        finally:
            self._tasks.pop(key, None)
        self._finished.put((key, error, time.monotonic() - began, result))

    def abandon(self, key: int) -> None:
        def cancel() -> None:
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()

        self._loop.call_soon_threadsafe(cancel)

    def close(self) -> None:
        """Cancel what still runs and stop the loop; wait a little for it (a
        handler that blocks the loop may keep it: the thread is a daemon)."""

        def shutdown() -> None:
            for task in self._tasks.values():
                task.cancel()
            self._loop.call_soon(self._loop.stop)

        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            self._loop.close()


async def run_coroutine(coroutine: Awaitable[Any], timeout: float | None) -> Any:
    """Await ``coroutine`` in the calling task; ``timeout`` seconds after it
    started, cancel it and raise :class:`TaskTimeout`.

    The clock starts when this task starts running, not when it was scheduled,
    so a task queued behind a handler that blocks the loop is not charged for
    that wait.  A handler that blocks the loop itself cannot be cancelled: when
    it returns after its time, the attempt still counts as timed out.
    """
    if timeout is None:
        return await coroutine
    task = asyncio.current_task()
    assert task is not None
    began = time.monotonic()
    timer = asyncio.get_running_loop().call_later(timeout, task.cancel)
    expired = f"task ran past its timeout of {timeout:g} s"
    try:
        result = await coroutine
    except asyncio.CancelledError:
        if time.monotonic() - began < timeout:
            raise  # cancelled for another reason (shutdown)
        raise TaskTimeout(expired) from None
    finally:
        timer.cancel()
    if time.monotonic() - began > timeout:
        raise TaskTimeout(expired)
    return result


@dataclass(slots=True)
class _Open:
    """A lease taken and not yet acknowledged."""

    lease: Lease
    left: int  # tasks not finished yet (neither handled nor handed back)
    handled: int = 0
    busy: float = 0.0  # handler seconds, summed
    failures: list[Failure] = field(default_factory=list)
    give_back: list[Envelope] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)  # a stage's, of its finished tasks


class Slots:
    """The consume loop of a consumer with ``slots`` > 1 (see the module docstring)."""

    def __init__(
        self,
        queue: Queue,
        runner: Runner,
        finished: SimpleQueue[Finished],
        *,
        slots: int,
        timeout: float | None,
        slack: float,
        stopping: Callable[[], bool],
        failure: Callable[[Batch, int, BaseException], Failure],
        count: Callable[[int, list[Failure]], None] | None,
        outputs: AckOutputs | None = None,
    ) -> None:
        self.queue = queue
        self._outputs = outputs
        self.runner = runner
        self.slots = slots
        self._finished = finished
        self._timeout = timeout
        self._slack = slack
        self._stopping = stopping
        self._failure = failure
        self._count = count
        self._open: dict[int, _Open] = {}  # lease number -> lease
        self._backlog: deque[tuple[int, Batch, int]] = deque()  # taken, not started
        self._running: dict[int, tuple[int, Batch, int]] = {}  # key -> (lease, batch, index)
        self._leases = 0
        self._keys = 0
        self._sentinel = False

    def run(self) -> None:
        queue, slots = self.queue, self.slots
        next_reap = time.monotonic() + queue.reap_interval
        while True:
            stopping = self._stopping()
            if stopping and self._backlog:
                self._hand_back()
            while self._backlog and len(self._running) < slots:
                self._start(*self._backlog.popleft())
            self._settle()
            if (self._sentinel or stopping) and not self._running and not self._open:
                return
            free = slots - len(self._running) - len(self._backlog)
            if (free > 0 and not self._sentinel and not stopping
                    and (queue.multiple_leases or not self._open)):
                lease = queue.take(free, timeout=POLL if self._running else IDLE_WAIT)
                if lease is not None:
                    self._add(lease)
                    self._collect(0.0)
                    continue
                if not self._running:
                    if time.monotonic() >= next_reap:
                        queue.reap()
                        next_reap = time.monotonic() + queue.reap_interval
                    continue
                self._collect(0.0)
            else:
                self._collect(POLL if self._running else 0.0)

    def _add(self, lease: Lease) -> None:
        self._leases += 1
        number = self._leases
        poison = poisoned(lease, self.queue.max_deliveries)
        if poison:  # a task that killed its consumers: dead-lettered, never run again
            self._open[number] = _Open(lease, 0, lease.size, failures=poison)
            return
        self._open[number] = _Open(lease, lease.size)
        for batch in lease.batches:
            self._backlog.extend((number, batch, i) for i in range(len(batch.bodies)))
        if lease.sentinel is not None:
            self._sentinel = True

    def _start(self, number: int, batch: Batch, index: int) -> None:
        self._keys += 1
        self._running[self._keys] = (number, batch, index)
        self.runner.submit(self._keys, batch.bodies[index])

    def _hand_back(self) -> None:
        while self._backlog:
            number, batch, index = self._backlog.popleft()
            entry = self._open[number]
            entry.give_back.append(batch.envelope(index))
            entry.left -= 1

    def _collect(self, wait: float) -> None:
        """Record the tasks that finish within ``wait`` seconds (those already
        finished at least), then count the overdue ones failed."""
        wait = min(wait, self._until_overdue())
        try:
            done = [self._finished.get(timeout=wait) if wait > 0 else self._finished.get_nowait()]
        except Empty:
            done = []
        with contextlib.suppress(Empty):
            while True:
                done.append(self._finished.get_nowait())
        for key, error, seconds, result in done:
            self._finish(key, error, seconds, result)
        if self._timeout is not None:
            self._expire()

    def _finish(
        self, key: int, error: BaseException | None, seconds: float, result: Any = None
    ) -> None:
        task = self._running.pop(key, None)
        self.runner.started.pop(key, None)
        if task is None:
            return  # abandoned after its timeout: already counted
        number, batch, index = task
        entry = self._open[number]
        entry.left -= 1
        entry.handled += 1
        entry.busy += seconds
        if error is not None:
            entry.failures.append(self._failure(batch, index, error))
        elif self._outputs is not None:
            entry.outputs.extend(result)

    def _until_overdue(self) -> float:
        if self._timeout is None or not self.runner.started:
            return IDLE_WAIT
        limit = self._timeout + self._slack
        first = min(self.runner.started.get(key, time.monotonic()) for key in self._running)
        return max(0.0, first + limit - time.monotonic())

    def _expire(self) -> None:
        assert self._timeout is not None
        limit = self._timeout + self._slack
        now = time.monotonic()
        started = self.runner.started
        for key in [k for k in self._running if now - started.get(k, now) >= limit]:
            self.runner.abandon(key)
            self._finish(key, TaskTimeout(f"task ran past its timeout of {self._timeout:g} s"),
                         now - started[key])

    def _settle(self) -> None:
        """Acknowledge every lease whose tasks have all finished."""
        for number in [n for n, entry in self._open.items() if entry.left == 0]:
            entry = self._open.pop(number)
            if self._outputs is None:
                self.queue.ack(entry.lease, entry.failures, entry.give_back)
            else:
                self._outputs(entry.lease, entry.failures, entry.give_back, entry.outputs)
            if self._sentinel and any(f.retry_in is not None for f in entry.failures):
                # The sentinel came while this task was still running here (the
                # queue hands it out once only our tasks are in flight); its retry
                # is due later, so stay for it: the queue gives a sentinel again
                # once the run is over.
                self._sentinel = False
            if self._count is not None:
                self._count(entry.handled, entry.failures)
            if entry.handled:
                # What a task costs this consumer, its slots shared out; never more
                # than a batch's worth per slot: a batch of up to ``slots`` tasks
                # runs at once here, so it spreads work as well as single tasks do.
                busy = min(entry.busy / entry.handled, TARGET_BATCH_SECONDS)
                self.queue.note_task_cost(busy / self.slots)


def consume_concurrently(
    queue: Queue,
    handle: Callable[[Any], Any],
    *,
    is_async: bool,
    slots: int,
    timeout: float | None,
    stopping: Callable[[], bool],
    failure: Callable[[Batch, int, BaseException], Failure],
    count: Callable[[int, list[Failure]], None] | None,
    outputs: AckOutputs | None = None,
) -> None:
    """Consume until a sentinel or a stop, up to ``slots`` tasks at once.  With
    ``outputs``, ``handle`` returns a list of outputs per task (a stage)."""
    finished: SimpleQueue[Finished] = SimpleQueue()
    runner: Runner
    if is_async:
        runner = AsyncRunner(handle, timeout, finished)
    else:
        runner = ThreadRunner(handle, slots, finished)
    try:
        Slots(queue, runner, finished, slots=slots, timeout=timeout,
              slack=ASYNC_SLACK if is_async else 0.0, stopping=stopping, failure=failure,
              count=count, outputs=outputs).run()
    finally:
        runner.close()
