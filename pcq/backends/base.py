"""The queue interface every backend implements.

A :class:`Queue` is one named, bounded, multi-producer multi-consumer queue with
task-done counting.  Public methods keep the books — encoding, batching,
decoding, sentinel and failure handling — and call a small set of ``_underscored``
primitives that move opaque ``bytes``.  A backend implements those primitives
and the abstract methods of the queue's life (close, reap, counters, attach and
detach, dead letters, dispose); every other method is a hook with a default.

Life of a task::

    put / put_many ──► ready ──take──► in flight ──ack──► done
                         ▲                 │  └─ack(failure)─► delayed ─► ready (retry)
                         │                 │                └─► dead (no retries left)
                         └──reap / give back (consumer died or is shutting down)

What a supervisor calls on a queue (evict, release, killing, fail_running,
keep_alive, run_to_serve) and what ``pcq status`` and a job's loop ask
(feeds, registrations, exists, check_backend) are grouped in
:mod:`pcq.backends.hooks`; producer
batching is :mod:`pcq.backends.batching`; the values passed (Lease, Failure,
Outcome, Counters) are :mod:`pcq.backends.records`.

Contracts every backend keeps (``tests/conformance`` checks them):

* **At-least-once.**  A task leaves the queue for good only when it is
  acknowledged.  The tasks of a consumer that dies go back to ready (``reap``).
* **Task-done counting.**  ``pending`` = put and not yet acknowledged (done or
  dead).  ``join()`` returns when it is 0.  An acknowledgement for tasks that were
  already handed to someone else changes no counter.
* **Sentinel per consumer.**  ``close()`` places one sentinel per live consumer
  behind all tasks; ``take`` never returns tasks after a sentinel, never hands
  out a sentinel while failed tasks wait for their retry, and drops a sentinel
  of an earlier close epoch.  On a closed queue with nothing left to take, it
  returns a sentinel, so a consumer that attached after close exits too.
* **Backpressure.**  With ``maxsize`` > 0, ``put`` blocks while about ``maxsize``
  tasks are ready.
* **Stages.**  ``ack(..., outputs=items, to=other)`` puts the outputs of a
  lease's handled tasks on queue ``other`` and acknowledges the lease in one
  atomic step; a stale lease puts nothing and counts nothing.  A backend that
  cannot do this raises :class:`~pcq.errors.ConfigError` (see ``_ack_out``).
* **Runs.**  A queue is ``open``, ``closing`` (closed with work left) or ``idle``
  (closed, every task acknowledged).  Idle is the same as new: a consumer that
  attaches to an idle queue waits for the next producer and serves that run;
  one that attaches to a closing queue drains it and stops.
* **Poison tasks.**  A task in flight in a consumer that died is taken alone
  (a lease of one, ``Lease.deaths`` > 0) until it is acknowledged; once
  ``max_deliveries`` consumers died with it (0: no limit), it is dead-lettered
  instead of handled again.
"""

from __future__ import annotations

import os
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

from pcq.backends.batching import (
    LINGER_SECONDS,
    MAX_BATCH,
    TARGET_BATCH_SECONDS,
    PutInterrupted,
    put_batched,
)
from pcq.backends.hooks import StatusHooks, SupervisorHooks
from pcq.backends.records import (
    Counters,
    Failure,
    Lease,
    Outcome,
    encode_outcome,
    poisoned,
    state_of,
)
from pcq.envelope import (
    Envelope,
    Sentinel,
    decode_many,
    encode_each,
    encode_tasks,
    new_tag,
)
from pcq.errors import ConfigError, SerializationError
from pcq.garbage import say_garbage

# Importing these from here keeps working (``from pcq.backends.base import Lease``).
__all__ = ["LINGER_SECONDS", "MAX_BATCH", "TARGET_BATCH_SECONDS", "Counters", "Failure",
           "Lease", "Outcome", "PutInterrupted", "Queue", "poisoned", "state_of"]


class Queue(SupervisorHooks, StatusHooks):
    """One named queue on one backend.  See the module docstring for the contract.

    A queue object may be handed to child processes (as a ``Process`` argument);
    whatever it holds that cannot cross a process boundary (a socket) is rebuilt
    in the child on first use.
    """

    #: Name this backend is registered under ("local", "redis").
    backend: ClassVar[str]
    #: True when a backend ships a batch of tasks as one message (both built-in
    #: backends do); False when every task is a message of its own.
    one_message_per_batch: ClassVar[bool] = False
    #: True when one consumer may hold several leases at once and acknowledge
    #: them in any order (a consumer with ``--concurrency`` takes a new lease
    #: whenever slots are free); False: one lease at a time.
    multiple_leases: ClassVar[bool] = False
    #: True when the backend holds a stage's ack until its outputs' queue has
    #: room, as it holds a put; False: the stage calls :meth:`wait_for_room` first.
    parks_outputs: ClassVar[bool] = False

    #: False after ``ack`` (or ``ack_and_take``) of a stale lease: nothing was
    #: applied, so a consumer must not count its tasks as its own work.
    ack_applied: bool = True

    def __init__(self, name: str = "default", *, maxsize: int = 0, max_deliveries: int = 3) -> None:
        if max_deliveries < 0:
            raise ConfigError(f"max_deliveries must be 0 (no limit) or more, not {max_deliveries}")
        self.name = name
        self.maxsize = maxsize
        #: Consumer deaths a task may cause before it is dead-lettered (0: no limit).
        self.max_deliveries = max_deliveries
        self._tag_pid = -1
        self._tag = ""
        self._seq = 0

    # ------------------------------------------------------------------ producing

    def put(self, item: Any) -> None:
        """Put one task; blocks while the queue is full."""
        self._put_bodies([item])

    def put_many(self, items: Iterable[Any]) -> int:
        """Put every item of ``items`` in batches; returns how many were put.

        Batches are as large as :meth:`batch_limit` allows (large for cheap
        handlers, single tasks for expensive ones, so that tasks spread over all
        consumers).  A partial batch is never held back while the iterable is
        slow: a helper thread sends it once it has waited ``LINGER_SECONDS``
        (:mod:`pcq.backends.batching`).  What the iterable yielded before it
        raised is put, not lost.
        """
        return put_batched(items, self._put_bodies, self.batch_limit)

    def batch_limit(self) -> int:
        """How many tasks one put may carry now (backends refine it from what
        consumers report with :meth:`note_task_cost`)."""
        return MAX_BATCH

    def _put_bodies(self, bodies: Sequence[Any]) -> None:
        try:
            messages = self._encode_bodies(bodies)
        except SerializationError as exc:
            if exc.index:  # put the good tasks before the bad one: nothing is lost
                self._put_bodies(bodies[: exc.index])
            raise
        self._put(messages, len(bodies))

    def _encode_bodies(self, bodies: Sequence[Any]) -> list[bytes]:
        """``bodies`` as this queue's messages, with fresh task ids."""
        if self._tag_pid != os.getpid():  # a forked child must not reuse its parent's ids
            self._tag_pid, self._tag, self._seq = os.getpid(), new_tag(), 0
        seq = self._seq
        if not self.one_message_per_batch:
            messages = encode_each(self._tag, seq, bodies)
        else:
            step = self.output_batch  # a stage's fan-out may exceed one batch
            messages = [encode_tasks(self._tag, seq + i, bodies[i : i + step])
                        for i in range(0, len(bodies), step)]
        self._seq += len(bodies)
        return messages

    @property
    def output_batch(self) -> int:
        """Most tasks in one message of a stage's outputs for this queue (with
        ``one_message_per_batch``, message ``i`` holds the tasks from
        ``i * output_batch``)."""
        return MAX_BATCH

    # ------------------------------------------------------------------ consuming

    def take(self, max_tasks: int = 1, timeout: float | None = None) -> Lease | None:
        """Take up to ``max_tasks`` tasks (a backend may return a whole batch more).

        Blocks up to ``timeout`` seconds (``None``: forever) for the first task;
        returns None on timeout.  The tasks stay in flight, owned by this
        consumer, until :meth:`ack`.  Call :meth:`attach_consumer` first.
        """
        got = self._take(max(1, max_tasks), timeout)
        return None if got is None else self._lease(*got)

    def _lease(self, messages: list[bytes], receipt: Any) -> Lease:
        """The lease of ``messages`` that ``_take`` returned with ``receipt``:
        decoded (consecutive tasks of one producer merged into one batch),
        undecodable ones in ``bad``, a sentinel of an earlier epoch dropped."""
        batches, sentinels, bad = decode_many(messages)
        lease = Lease(batches, bad=bad, receipt=receipt)
        for sentinel in sentinels:
            if self._sentinel_is_current(sentinel):
                lease.sentinel = sentinel
        return lease

    def ack(
        self,
        lease: Lease,
        failures: Sequence[Failure] = (),
        give_back: Sequence[Envelope] = (),
        outputs: Sequence[Any] = (),
        to: Queue | None = None,
    ) -> bool:
        """Acknowledge a lease: every task in it is done, except ``failures``
        (retried or dead-lettered) and ``give_back`` (returned to ready, unstarted).

        This is ``task_done`` for the whole lease.  Acknowledging a lease whose
        tasks were already reaped and handed to another consumer changes no counter
        and returns False (so does :attr:`ack_applied` after it).

        With ``to`` (a queue of the same backend and server), ``outputs`` — what
        the lease's handled tasks produced — are put on ``to`` in the same atomic
        step: both happen or neither, and a stale lease puts nothing.
        """
        self.ack_applied = True
        outcome = self._outcome(lease, failures, give_back, outputs, to)
        if to is None:
            self._ack(lease, outcome)
        else:
            self._ack_out(lease, outcome, to)
        return self.ack_applied

    def _outcome(
        self,
        lease: Lease,
        failures: Sequence[Failure],
        give_back: Sequence[Envelope],
        outputs: Sequence[Any] = (),
        to: Queue | None = None,
    ) -> Outcome:
        """What acknowledging ``lease`` does, encoded for ``_ack``."""
        if to is None and outputs:
            raise ValueError("outputs need a queue to go to (to=)")
        self.garbage += say_garbage(lease.bad)
        out = to._encode_bodies(outputs) if to is not None and outputs else []
        return encode_outcome(lease, failures, give_back, out, len(outputs))

    def ack_and_take(
        self,
        lease: Lease,
        failures: Sequence[Failure] = (),
        give_back: Sequence[Envelope] = (),
        max_tasks: int = 1,
        timeout: float | None = None,
        outputs: Sequence[Any] = (),
        to: Queue | None = None,
    ) -> Lease | None:
        """:meth:`ack` ``lease`` (with its ``outputs`` for ``to``), then :meth:`take`
        the next one.  A backend with a server overrides this to do both in one
        round trip."""
        self.ack(lease, failures, give_back, outputs, to)
        return self.take(max_tasks, timeout)

    # ------------------------------------------------------------------ lifecycle

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every task put is acknowledged; False if ``timeout`` ran out.

        Reaps the tasks of dead consumers while it waits, so a consumer that died
        never makes it hang.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        next_reap = 0.0
        while True:
            now = time.monotonic()
            if now >= next_reap:
                self.reap()
                next_reap = now + self.reap_interval
            if self.counters().pending <= 0:
                return True
            if deadline is not None and now >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    #: How often ``join`` and idle consumers look for dead consumers' tasks.
    reap_interval: float = 1.0
    #: Leases this process acknowledged after they were reaped (stale: their acks
    #: changed nothing, whoever handled them again counts them).  Backends that
    #: can tell add to it in ``_ack``.
    stale_leases: int = 0
    #: Messages this process dead-lettered because they were not pcq tasks.
    garbage: int = 0

    @abstractmethod
    def close(self) -> None:
        """Put one sentinel per live consumer behind all tasks.  Idempotent."""

    @abstractmethod
    def reap(self) -> int:
        """Return the in-flight tasks of dead consumers to ready; how many."""

    def join_run(self, *, burst: bool = False, run: int | None = None) -> int:
        """Attach the calling process as a consumer (:meth:`attach_consumer`) of the
        queue's current run, or of its next run when the queue is idle; returns
        the number of the run it serves.

        ``burst``: serve only what is there — a take finds a sentinel as soon as
        there is nothing to take and no producer is attached.  ``run``: the run
        a consumer that died was serving; its replacement stops, rather than
        waits for the next run, when it finds that run finished.
        """
        self.attach_consumer()
        return 0

    @abstractmethod
    def counters(self) -> Counters: ...

    def run_start(self) -> dict[str, int] | None:
        """produced, done, failed, retried and dead as they stood when the queue's
        current run started (``pcq status`` shows the run's own numbers); None
        when the backend does not note them or the queue has had one run."""
        return None

    def state(self) -> str:
        """"open"; "closing" (closed, tasks still pending: a consumer attaching
        now drains them and stops); or "idle" (closed and every task
        acknowledged: the same as new, a consumer attaching waits for the next
        producer)."""
        return state_of(self.counters())

    @abstractmethod
    def attach_consumer(self) -> None:
        """Register the calling process as a consumer (in the consumer process)."""

    @abstractmethod
    def detach_consumer(self) -> None:
        """Unregister; anything still in flight for it goes back to ready."""

    @abstractmethod
    def attach_producer(self, producer_id: str | None = None) -> str:
        """Register a producer under ``producer_id`` (a new id when None) and
        return its id; while any producer is attached, the queue stays open."""

    @abstractmethod
    def detach_producer(self, producer_id: str | None = None, close_if_last: bool = True) -> None:
        """Unregister producer ``producer_id`` (None: the last id this process
        attached); the last one out closes the queue, unless ``close_if_last``
        is False.  A parent detaches a producer process that died by its id."""

    def sibling(self, name: str, *, maxsize: int = 0) -> Queue:
        """Queue ``name`` on the same backend and server as this one (the next
        queue of a pipeline: a stage's outputs and acks are one atomic step, so
        its queues must share a server).  It counts deaths as this one does."""
        return type(self)(name, maxsize=maxsize, max_deliveries=self.max_deliveries)

    def wait_for_room(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Block while this queue holds ``maxsize`` ready tasks or more (or until
        ``stop()``): a stage waits here before it puts its outputs, so a slow
        next stage holds back the one before it, as a full queue holds back a
        producer."""
        if self.maxsize <= 0:
            return
        pause = 0.001
        while self.counters().ready >= self.maxsize and not stop():
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def unpark_when(self, stopping: Callable[[], bool]) -> None:  # optional hook: no-op
        """In a stage's consumer: with ``parks_outputs``, an ack of its held back
        for room goes through once ``stopping()``, over the bound."""

    def note_task_cost(self, seconds_per_task: float) -> None:  # optional hook: no-op by default
        """Consumers report what a task costs, so producers can size batches."""

    def read_ahead(self, on: bool) -> None:  # optional hook: no-op by default
        """A consumer that runs its leases one after another (concurrency 1) says
        whether a backend may take its next lease while the current one runs."""

    def forget(self) -> None:  # optional hook: no-op by default
        """Delete what this queue left on its server, registrations included (a
        throwaway queue, such as pcq.map's, once nothing uses it)."""

    @abstractmethod
    def dispose(self) -> None:
        """Free what this queue object holds in this process (files, connections)."""

    def interrupt(self) -> None:  # optional hook: no-op by default
        """Called from a signal handler: a put that waits for room gives up at its
        next look (raising :class:`PutInterrupted`), putting nothing more."""

    # ------------------------------------------------------------------ dead letters

    @abstractmethod
    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]: ...

    @abstractmethod
    def requeue_dead(self) -> int:
        """Put every dead-lettered task back in ready with its attempts reset."""

    @abstractmethod
    def purge_dead(self) -> int: ...

    @abstractmethod
    def purge(self) -> int:
        """Drop every task that is ready or delayed and reset the counters."""

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    def _put(self, messages: list[bytes], tasks: int) -> None:
        """Append ``messages`` (holding ``tasks`` tasks) to ready and count them
        pending, atomically; block while the queue is full."""

    @abstractmethod
    def _take(self, max_tasks: int, timeout: float | None) -> tuple[list[bytes], Any] | None:
        """Move up to ``max_tasks`` messages from ready into this consumer's in-flight
        set, atomically, stopping after a sentinel.  Returns (messages, receipt)."""

    @abstractmethod
    def _ack(self, lease: Lease, outcome: Outcome) -> None:
        """Remove the lease from in flight and apply ``outcome`` atomically; a stale
        lease (no longer in flight for this consumer) changes nothing."""

    def _ack_out(self, lease: Lease, outcome: Outcome, to: Queue) -> None:
        """:meth:`_ack`, and put ``outcome.outputs`` (``outcome.output_tasks``
        tasks) on ``to``, in one atomic step; a stale lease does neither.

        A backend that cannot make the two one step must not fake it (the handoff
        between stages would no longer be exactly once): it keeps this error."""
        raise ConfigError(
            f"the {self.backend} backend cannot put a stage's outputs and acknowledge "
            "its input in one step, so it cannot run pipelines (--to)"
        )

    def _check_target(self, to: Queue) -> None:
        """Raise ConfigError unless ``to`` can receive this queue's outputs (called
        in the parent process, before any stage consumer starts)."""
        if type(self)._ack_out is Queue._ack_out:
            self._ack_out(Lease([]), Outcome(0, 0, [], [], []), to)  # raises its error
        if type(to) is not type(self):
            raise ConfigError(f"a stage's queues must share one backend: {self.backend} "
                              f"cannot put outputs on a {to.backend} queue")

    def _sentinel_is_current(self, sentinel: Sentinel) -> bool:
        """False for a sentinel of an earlier close epoch (dropped, not obeyed)."""
        return True
