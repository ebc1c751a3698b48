"""The queue interface every backend implements.

A :class:`Queue` is one named, bounded, multi-producer multi-consumer queue with
task-done counting.  Public methods keep the books — encoding, batching,
decoding, sentinel and failure handling — and call a small set of ``_underscored``
primitives that move opaque ``bytes``.  A backend implements only those.

Life of a task::

    put / put_many ──► ready ──take──► in flight ──ack──► done
                         ▲                 │  └─ack(failure)─► delayed ─► ready (retry)
                         │                 │                └─► dead (no retries left)
                         └──reap / give back (consumer died or is shutting down)

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

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

from pcq.envelope import (
    Batch,
    Envelope,
    Sentinel,
    decode_many,
    encode_dead,
    encode_each,
    encode_envelope,
    encode_tasks,
    new_tag,
    short_repr,
)
from pcq.errors import ConfigError, SerializationError

log = logging.getLogger("pcq")

#: Largest number of tasks moved by one put or take.
MAX_BATCH = 1024
#: A batch should hold about this much handler work, so that the tasks of a slow
#: handler spread over all consumers and a killed consumer loses little.
TARGET_BATCH_SECONDS = 0.005
#: Longest a partial batch waits for more items before it is sent anyway.
LINGER_SECONDS = 0.001


class PutInterrupted(BaseException):
    """A put that waited for room was interrupted (see :meth:`Queue.interrupt`).
    A BaseException, so that ``put_many`` stops at once instead of flushing."""


@dataclass(slots=True)
class Lease:
    """Tasks taken by one consumer in one ``take``; acknowledged together.

    ``batches`` hold the tasks in queue order.  ``bad`` holds messages that could
    not be decoded, with the reason; ``ack`` dead-letters them.  ``sentinel`` is
    set when the take ended at this consumer's sentinel: exit after handling
    the batches.  ``receipt`` is the backend's own bookkeeping.  ``deaths`` > 0:
    a lease of one task that was in flight in that many consumers that died.
    """

    batches: list[Batch]
    sentinel: Sentinel | None = None
    bad: list[tuple[bytes, str]] = field(default_factory=list)
    receipt: Any = None
    deaths: int = 0

    @property
    def size(self) -> int:
        return sum(len(b.bodies) for b in self.batches)

    def envelopes(self) -> Iterator[Envelope]:
        for batch in self.batches:
            yield from batch.envelopes()


@dataclass(frozen=True, slots=True)
class Failure:
    """A task whose handler failed.  ``retry_in`` is None when it goes to dead letters."""

    envelope: Envelope
    error: str
    traceback: str = ""
    retry_in: float | None = None


def poisoned(lease: Lease, max_deliveries: int) -> list[Failure]:
    """The failures that dead-letter every task of ``lease`` when consumers died
    ``max_deliveries`` times (0: no limit) with it in flight — a poison task,
    never run again; [] for any other lease."""
    if not 0 < max_deliveries <= lease.deaths:
        return []
    error = f"consumer died {lease.deaths} times while handling it"
    envs = list(lease.envelopes())
    for env in envs:
        log.error("task %s dead-lettered (id %s): %s", short_repr(env.body), env.id, error)
    return [Failure(env, error) for env in envs]


@dataclass(frozen=True, slots=True)
class Counters:
    """A snapshot of a queue.  ``pending`` = put and not yet done or failed."""

    ready: int
    in_flight: int
    pending: int
    produced: int
    done: int
    failed: int
    retried: int
    dead: int
    delayed: int
    consumers: int
    producers: int
    closed: bool


def state_of(c: Counters) -> str:
    """The run state a counters snapshot shows (see :meth:`Queue.state`)."""
    if not c.closed:
        return "open"
    return "closing" if c.pending > 0 else "idle"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``ack`` hands a backend, already encoded."""

    done: int  # tasks handled successfully
    failed: int  # tasks that go to dead letters now
    retry: list[tuple[bytes, float]]  # (message, delay in seconds)
    dead: list[bytes]  # dead letters: failed tasks and undecodable messages
    give_back: list[bytes]  # not started: back to ready, no attempt counted
    outputs: list[bytes] = field(default_factory=list)  # for the target queue, encoded
    output_tasks: int = 0  # tasks the outputs hold (a local message holds many)


class _Linger:
    """The items ``put_many`` has not sent yet, and a thread that sends them once
    they have waited ``LINGER_SECONDS`` (the iterable is slow).

    The caller appends to ``pending`` (a deque: appends and pops are atomic, so
    the hot loop takes no lock); whoever sends — the caller when a batch is full,
    or the thread — pops and sends under ``_send_lock``, so tasks go out in
    order and each exactly once.  An error in the thread's send is raised again
    in the caller's thread.
    """

    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self.pending: deque[Any] = deque()
        self.count = 0  # items sent
        self.sent_at = time.monotonic()  # when the last send returned
        self._send_fn = send
        self._send_lock = threading.Lock()
        self._sends = 0
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pcq-linger", daemon=True)
        self._thread.start()

    def send(self, limit: int) -> None:
        """Send up to ``limit`` pending items (all of them when ``limit`` is 0)."""
        with self._send_lock:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._send_locked(limit)

    def _send_locked(self, limit: int, caller: bool = True) -> None:
        pending = self.pending
        n = len(pending) if not limit else min(limit, len(pending))
        if caller and n == len(pending):
            # In the caller's thread nothing is appended meanwhile: take all at once.
            batch = list(pending)
            pending.clear()
        else:
            batch = [pending.popleft() for _ in range(n)]
        self._sends += 1
        if batch:
            self._send_fn(batch)
            self.count += len(batch)
        self.sent_at = time.monotonic()

    def _watch(self) -> None:
        seen = -1
        while not self._done.wait(LINGER_SECONDS):
            # While batches keep going out the producer is fast: leave it alone.
            if self._sends != seen or not self.pending:
                seen = self._sends
                continue
            with self._send_lock:
                if self._sends == seen and self._error is None:
                    try:
                        self._send_locked(0, caller=False)
                    except BaseException as exc:  # handed to the caller's thread
                        self._error = exc
                seen = self._sends

    def stop(self, flush: bool) -> None:
        """Stop the thread; then, with ``flush``, send what is left."""
        self._done.set()
        self._thread.join()
        if flush:
            while self.pending or self._error is not None:
                self.send(MAX_BATCH)


class Queue(ABC):
    """One named queue on one backend.  See the module docstring for the contract.

    A queue object may be handed to child processes (as a ``Process`` argument);
    whatever it holds that cannot cross a process boundary (a socket) is rebuilt
    in the child on first use.
    """

    #: Name this backend is registered under ("local", "redis").
    backend: ClassVar[str]
    #: True when a backend ships a batch of tasks as one message (local); False
    #: when every task is a message of its own (redis: one list element a task).
    one_message_per_batch: ClassVar[bool] = False
    #: True when one consumer may hold several leases at once and acknowledge
    #: them in any order (a consumer with ``--concurrency`` takes a new lease
    #: whenever slots are free); False: one lease at a time.
    multiple_leases: ClassVar[bool] = False

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
        slow: a helper thread sends it once it has waited ``LINGER_SECONDS``.
        What the iterable yielded before it raised is put, not lost.
        """
        linger = _Linger(self._put_bodies)
        clock = time.monotonic
        append = linger.pending.append
        pending = linger.pending
        extend = pending.extend
        iterator = iter(items)
        try:
            limit = self.batch_limit()
            # The quiet spell is counted from here, not from before the linger
            # thread started: starting it can take longer than LINGER_SECONDS.
            linger.sent_at = clock()
            for item in iterator:
                append(item)
                n = len(pending)
                # The first item after a quiet spell goes at once: a trickle
                # never waits for the linger thread.
                if n >= limit or (n == 1 and clock() - linger.sent_at > LINGER_SECONDS):
                    linger.send(limit)
                    limit = self.batch_limit()
                    continue
                # The rest of the batch at C speed: deque.extend appends each item
                # as islice yields it, so the linger thread still sees a slow
                # iterable's items as they come.
                extend(islice(iterator, limit - n))
                if len(pending) >= limit:
                    linger.send(limit)
                    limit = self.batch_limit()
        except SerializationError as exc:
            # The producer stops at the bad item: what it yielded after it is not
            # put, so "the N before it were put" stays exact.
            linger.stop(flush=False)
            exc.put = linger.count + exc.index
            raise
        except Exception:
            linger.stop(flush=True)  # the items yielded before the error are put
            raise
        except BaseException:
            linger.stop(flush=False)  # interrupted: stop at once, never block
            raise
        try:
            linger.stop(flush=True)
        except SerializationError as exc:
            exc.put = linger.count + exc.index
            raise
        return linger.count

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
        retry: list[tuple[bytes, float]] = []
        dead = [encode_dead(None, reason, raw=raw) for raw, reason in lease.bad]
        failed = 0
        for f in failures:
            if f.retry_in is None:
                dead.append(encode_dead(f.envelope, f.error, f.traceback))
                failed += 1
            else:
                env = f.envelope
                again = Envelope(env.tag, env.seq, env.body, env.attempts + 1, env.enqueued_at)
                retry.append((encode_envelope(again), f.retry_in))
        back = [encode_envelope(env) for env in give_back]
        done = lease.size - len(failures) - len(back)
        out = to._encode_bodies(outputs) if to is not None and outputs else []
        return Outcome(done, failed, retry, dead, back, out, len(outputs))

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

    @abstractmethod
    def close(self) -> None:
        """Put one sentinel per live consumer behind all tasks.  Idempotent."""

    @abstractmethod
    def reap(self) -> int:
        """Return the in-flight tasks of dead consumers to ready; how many."""

    def evict(self, pid: int) -> int:
        """A supervisor saw its consumer process ``pid`` die: return that
        consumer's in-flight tasks to ready now, not at the next reap.  Counts a
        death against each of them (see *Poison tasks*)."""
        return self.reap()

    def release(self, pid: int) -> int:
        """Like :meth:`evict`, for a consumer the supervisor killed for a known
        reason (a task past its timeout, see :meth:`fail_running`): its other
        tasks go back to ready with no death counted against them."""
        return self.evict(pid)

    def killing(self, pid: int, task_id: str) -> None:  # noqa: B027 - optional hook
        """The supervisor is about to kill consumer ``pid`` because task ``task_id``
        ran past its timeout (then it calls :meth:`fail_running` and
        :meth:`release`), or ("") because it outlived its stop grace (then
        :meth:`release`).  A backend whose leases end with the process's
        connection sets them aside here, so the kill counts no death."""

    def fail_running(self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]) -> bool:
        """The consumer process ``pid`` was killed because task ``task_id`` ran past
        its timeout: acknowledge that task, in flight for the dead process, with
        ``failure(envelope)`` (retried or dead-lettered).  False if it was not
        found in flight (already acknowledged or reaped)."""
        return False

    #: How often a supervisor calls :meth:`keep_alive` (None: never needed).
    keep_alive_every: float | None = None

    def keep_alive(self, pids: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """A supervisor vouches for its live consumer processes ``pids`` on this
        host: they are not dead, however long a handler holds their GIL."""

    def run_to_serve(self) -> int | None:
        """The number of the run a consumer attaching now would serve (the next
        one on an idle queue); None if this backend does not number its runs.  A
        supervisor reads it once and hands it to every consumer it starts (as
        ``join_run(run=...)``), so that all of them serve the same run."""
        return None

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
        while self._ready_now() >= self.maxsize and not stop():
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _ready_now(self) -> int:
        """Tasks ready now (a backend may answer more cheaply than counters())."""
        return self.counters().ready

    def set_feeds(self, to: str) -> None:  # noqa: B027 - optional hook
        """Record that a stage puts its outputs from this queue on queue ``to``
        (``pcq status`` follows it).  Backends without a server need not."""

    def feeds(self) -> str | None:
        """The queue this queue's stage feeds, as recorded by :meth:`set_feeds`."""
        return None

    def registrations(self) -> list[dict[str, Any]]:
        """Live consumers and producers: dicts with role, host, pid, heartbeat
        (a Unix time).  Backends without a registry return []."""
        return []

    def exists(self) -> bool:
        """Whether this queue was ever used (a server keeps something of it).
        Backends without a server say True: their queue is whatever is open."""
        return True

    def note_task_cost(self, seconds_per_task: float) -> None:  # noqa: B027 - optional hook
        """Consumers report what a task costs, so producers can size batches."""

    def forget(self) -> None:  # noqa: B027 - optional hook
        """Delete what this queue left on its server, registrations included (a
        throwaway queue, such as pcq.map's, once nothing uses it)."""

    def dispose(self) -> None:  # noqa: B027 - optional hook
        """Free what this queue object holds in this process (files, connections)."""

    def check_backend(self) -> bool:
        """One quick look at the backend's server, for a supervisor's loop: False
        while it is away (within its reconnect budget); raises
        :class:`~pcq.errors.BackendLost` once it is gone for good or lost the
        queue's data.  A backend without a server is always there."""
        return True

    def interrupt(self) -> None:  # noqa: B027 - optional hook
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
