"""Who runs a consumer's handler calls, and how each kind enforces a timeout.

The consume loop (:mod:`pcq.slots`) hands tasks to one runner and learns how
each ended; it never calls a handler itself.  There are three runners, one per
way a handler can run, and each enforces ``timeout`` in exactly one way:

======================  ==========================  ==============================
runner                  runs                        a task past ``timeout``
======================  ==========================  ==============================
:class:`InlineRunner`   concurrency 1: each task in  a plain handler gets SIGALRM
                        the consumer's main thread,  (TaskTimeout raised in it); an
                        one after another            ``async def`` one is cancelled.
                                                     Either way the attempt fails,
                                                     even if the handler swallowed
                                                     the TaskTimeout; the task's id
                                                     is on the consumer's seat, so
                                                     its supervisor kills a process
                                                     still in it ``KILL_GRACE`` s
                                                     later.
:class:`ThreadRunner`   concurrency C > 1, a plain   a thread cannot be interrupted:
                        handler: C threads           the loop abandons the call (its
                                                     result is ignored) and a new
                                                     thread takes the slot.
:class:`AsyncRunner`    concurrency C > 1, an        cancelled (:func:`run_coroutine`);
                        ``async def`` handler: one   the loop counts it failed itself
                        event loop in a thread       ``ASYNC_SLACK`` s later if the
                                                     loop is blocked.
======================  ==========================  ==============================

The inline runner runs a batch of tasks in one call (a tight loop: at
concurrency 1 a cheap handler costs little more than the call); the others take
one task at a time and put each outcome, a :data:`Finished` tuple, on the
loop's ``finished`` queue.

A stage's task also turns its handler's result into its list of outputs
(``expand``), within the task: a generator runs to its end, and every output
is checked to travel, inside the task's timeout, and either failure is the
task's.  The threads and the event loop run :func:`with_outputs`; the inline
runner does the same in its loop, where a plain result (a value msgpack always
encodes, the common case) is one output with no call at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from queue import SimpleQueue
from types import FrameType
from typing import Any, Protocol

from pcq.envelope import PLAIN, Batch
from pcq.errors import TaskTimeout

#: An async task past its timeout is cancelled by :func:`run_coroutine`; the
#: consume loop counts it failed itself only this much later (a blocked event loop).
ASYNC_SLACK = 0.25

#: (task key, error or None, seconds the handler ran, what the handler returned)
Finished = tuple[int, BaseException | None, float, Any]
#: A stage's: the list of outputs one result of its handler gives.
Expand = Callable[[Any], list[Any]]


def with_outputs(handle: Callable[[Any], Any], expand: Expand,
                 is_async: bool) -> Callable[[Any], Any]:
    """``handle`` returning its result's outputs, made within the call."""
    if is_async:

        async def outputs_async(body: Any) -> list[Any]:
            return expand(await handle(body))

        return outputs_async
    return lambda body: expand(handle(body))


def expired(timeout: float) -> TaskTimeout:
    return TaskTimeout(f"task ran past its timeout of {timeout:g} s")


class Runner(Protocol):
    """Runs handler calls in the background; each outcome goes to the loop's
    ``finished`` queue as a :data:`Finished`."""

    started: dict[int, float]  # task key -> time.monotonic() when it started
    #: How long past ``timeout`` the loop waits before it counts a task failed itself.
    slack: float

    def submit(self, key: int, body: Any) -> None: ...
    def abandon(self, key: int) -> None: ...
    def close(self) -> None: ...


class InlineRunner:
    """Each call in the calling (main) thread; see the module docstring.

    ``mark(task_id)`` is told which task runs ('' when none), for a supervisor
    that kills a process stuck past its timeout; None when no one watches.
    ``expand``: a stage's (see the module docstring)."""

    def __init__(self, handle: Callable[[Any], Any], *, is_async: bool, timeout: float | None,
                 mark: Callable[[str], None] | None, expand: Expand | None = None) -> None:
        # With a timeout or a coroutine, outputs are made inside the call (so
        # within the timeout); else the loop makes them (_run_outputs).
        self._expand = expand if not (is_async or timeout) else None
        if expand is not None and self._expand is None:
            handle = with_outputs(handle, expand, is_async)
        self._handle = handle
        self._timeout = timeout
        self._expired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None  # the SIGALRM handler before ours
        self.mark = mark if timeout else None  # only a timeout needs the watch
        self.call: Callable[[Any], Any] = handle
        if is_async:  # one event loop for the process: each task awaited in turn
            loop = self._loop = asyncio.new_event_loop()
            self.call = lambda body: loop.run_until_complete(run_coroutine(handle(body), timeout))
        elif timeout:
            self._previous = signal.signal(signal.SIGALRM, self._expire)
            self.call = self._call_with_alarm

    def _expire(self, signum: int, frame: FrameType | None) -> None:
        self._expired = True
        assert self._timeout is not None
        raise expired(self._timeout)

    def _call_with_alarm(self, body: Any) -> Any:
        assert self._timeout is not None
        self._expired = False
        signal.setitimer(signal.ITIMER_REAL, self._timeout)
        try:
            result = self._handle(body)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if self._expired:  # the handler caught the TaskTimeout and went on: still failed
            raise expired(self._timeout)
        return result

    def run_lease(
        self, batches: list[Batch], batch: int, index: int, stopping: Callable[[], bool],
        outputs: list[Any] | None,
    ) -> tuple[int, int, int, list[tuple[Batch, int, Exception]]]:
        """Run a lease's tasks one by one from ``batches[batch].bodies[index]``
        on, until ``stopping()``.  ``outputs`` (a stage's) receives the outputs
        of each successful task.  Returns the position of the first task not
        started (batch, index), how many ran, and the failures as (batch,
        index, error)."""
        failures: list[tuple[Batch, int, Exception]] = []
        ran = 0
        while batch < len(batches):
            current = batches[batch]
            end = len(current.bodies)
            while index < end:
                stop, error = self._run_from(current, index, end, stopping, outputs)
                ran += stop - index
                if error is None:
                    if stop < end:
                        return batch, stop, ran, failures
                    index = stop
                else:  # the task at ``stop`` failed; go on after it
                    failures.append((current, stop, error))
                    ran += 1
                    index = stop + 1
            batch, index = batch + 1, 0
        return batch, index, ran, failures

    def _run_from(self, current: Batch, start: int, end: int, stopping: Callable[[], bool],
                  outputs: list[Any] | None) -> tuple[int, Exception | None]:
        """Run ``current``'s tasks ``start`` to ``end`` until a stop or a failure:
        the first task not finished, and its error (None: not started)."""
        if self.mark is not None:
            return self._run_watched(current, start, end, stopping, outputs)
        if outputs is not None and self._expand is not None:
            return self._run_outputs(current, start, end, stopping, outputs, self._expand)
        call, bodies = self.call, current.bodies
        i = start
        try:  # no timeout watch: as tight as it gets
            if outputs is None:
                for i in range(start, end):
                    if stopping():
                        return i, None
                    call(bodies[i])
            else:
                keep = outputs.extend
                for i in range(start, end):
                    if stopping():
                        return i, None
                    keep(call(bodies[i]))
        except Exception as exc:  # the task's failure; a BaseException stops us
            return i, exc
        return end, None

    def _run_outputs(self, current: Batch, start: int, end: int, stopping: Callable[[], bool],
                     outputs: list[Any], expand: Expand) -> tuple[int, Exception | None]:
        """:meth:`_run_from` for a stage with no timeout: a plain result is one
        output, kept with no call (what ``expand`` would give for it); any other
        goes through ``expand``, still within its task."""
        call, bodies, keep, plain = self.call, current.bodies, outputs.append, PLAIN
        i = start
        try:
            for i in range(start, end):
                if stopping():
                    return i, None
                result = call(bodies[i])
                kind = type(result)
                if kind in plain or (kind is int and -(2**63) <= result < 2**64):
                    keep(result)
                else:
                    outputs.extend(expand(result))
        except Exception as exc:  # the task's failure; a BaseException stops us
            return i, exc
        return end, None

    def _run_watched(self, current: Batch, start: int, end: int, stopping: Callable[[], bool],
                     outputs: list[Any] | None) -> tuple[int, Exception | None]:
        """:meth:`_run_from` with the timeout watch told which task runs."""
        keep = outputs.extend if outputs is not None else None
        call, mark, bodies = self.call, self.mark, current.bodies
        assert mark is not None
        i = start
        try:
            for i in range(start, end):
                if stopping():
                    return i, None
                mark(f"{current.tag}-{current.seq + i}")
                try:
                    result = call(bodies[i])
                finally:
                    mark("")
                if keep is not None:
                    keep(result)
        except Exception as exc:  # the task's failure; a BaseException stops us
            return i, exc
        return end, None

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
        if self._previous is not None:
            signal.signal(signal.SIGALRM, self._previous)


class ThreadRunner:
    """``slots`` threads calling ``call(body)``.  A timed-out call cannot be
    interrupted: :meth:`abandon` starts one more thread so the slot is free
    again, and the next thread to finish a call exits, so the pool shrinks back."""

    slack = 0.0

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

    slack = ASYNC_SLACK

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
            error = expired(self._timeout) if self._timeout else TaskTimeout("cancelled")
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
    try:
        result = await coroutine
    except asyncio.CancelledError:
        if time.monotonic() - began < timeout:
            raise  # cancelled for another reason (shutdown)
        raise expired(timeout) from None
    finally:
        timer.cancel()
    if time.monotonic() - began > timeout:
        raise expired(timeout)
    return result
