"""The local broker's ledger: one named queue's tasks, leases and counters.

Plain data, no I/O: :class:`~pcq.backends.local_broker.Broker` applies every
request to a :class:`Ledger` in its one thread, so each request is applied
whole.  The ledger keeps every book of its queue — what is ready, delayed, in
flight, the counters, dead letters, producers and consumers — and the broker
only routes requests and replies.  A lease lives on its
:class:`~pcq.backends.local_conn.Conn` (the connection it was handed out on),
so a closed connection names exactly the tasks that go back.

Suspects.  A task that a dead consumer held comes back alone, with the death
counted (:meth:`Ledger.returned`), into ``suspects``.  A suspect runs where
nothing else runs: it is handed only to a connection that holds no lease, and
a connection holding a suspect is handed nothing more until it settles it.
So a consumer that dies while it holds a suspect held only that task, and the
death counts against the task that caused it, never against an innocent one
taken beside it — at every concurrency.  While suspects wait, busy connections
get no fresh tasks either: they drain, and the first one idle takes a suspect
(a stream of fresh work never starves them).

Batches.  A batch is a wire unit, not a unit of work: a take that asks for
fewer tasks than the batch at the head of ready holds splits it, once, into
messages of that many tasks (:meth:`Ledger.lease`), so every consumer of a
stage gets its share however its input arrived.
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol

from pcq.backends.local_conn import Conn, Taker
from pcq.envelope import (
    Batch,
    decode,
    decode_dead,
    encode_dead,
    encode_envelope,
    encode_tasks,
    envelope_from_dead,
)
from pcq.errors import DecodeError


class Item(NamedTuple):
    """A message in a ledger: its bytes, how many tasks it holds, consumer deaths."""

    message: bytes
    tasks: int
    deaths: int = 0


class Waiting(NamedTuple):
    """A request parked until its queue has room: a put (``owner`` None), or a
    stage's ack whose outputs go to this queue (``owner``: its lease's queue)."""

    conn: Conn
    request: Any
    owner: Ledger | None


class Settlement(Protocol):
    """What an acknowledgement settles (``local_wire.Ack``, ``AckTake``, ``Settle``)."""

    @property
    def done(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def retry(self) -> list[list[Any]]: ...
    @property
    def dead(self) -> list[bytes]: ...
    @property
    def give_back(self) -> list[bytes]: ...


class Ledger:
    """One named queue: ready messages, suspects, delayed retries, counters,
    dead letters, producers and consumers.

    Invariant: ``ready_tasks + delayed_tasks + in_flight == produced - done - failed``
    (``ready_tasks`` counts suspects too).  Sentinels are never stored: a
    consumer that was attached when the queue closed (or attached while it was
    closing) gets its sentinel from ``take`` once nothing is ready or delayed
    and no other consumer holds a task.
    """

    def __init__(self, name: str, maxsize: int, max_deliveries: int) -> None:
        self.name, self.maxsize, self.max_deliveries = name, maxsize, max_deliveries
        self.ready: deque[Item] = deque()
        self.suspects: deque[Item] = deque()  # one task each, deaths > 0
        self.ready_tasks = 0
        self.delayed: list[tuple[float, int, Item]] = []
        self.delayed_tasks = 0
        self.in_flight = 0
        self.produced = self.done = self.failed = self.retried = self.dead = 0
        self.letters: list[bytes] = []
        self.closed = False
        self.epoch = 0
        self.closes = 0  # close() calls so far, also those on a closed queue
        self.producers: set[str] = set()
        self.consumers: dict[Conn, int] = {}  # conn -> epoch whose close stops it (-1: none)
        self.takers: deque[Taker] = deque()
        self.putters: deque[Waiting] = deque()  # puts and stages' acks, in arrival order
        self.cost_ns = 0
        self.unreported: dict[int, int] = {}  # pid -> tasks returned after it died
        self._tiebreak = itertools.count()

    # ------------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        return self.produced - self.done - self.failed

    def state(self) -> str:
        if not self.closed:
            return "open"
        return "closing" if self.pending > 0 else "idle"

    def has_ready(self) -> bool:
        return bool(self.ready or self.suspects)

    def counters(self) -> list[Any]:
        """The fields of ``base.Counters``, then the state."""
        return [
            self.ready_tasks, self.in_flight, self.pending, self.produced, self.done,
            self.failed, self.retried, self.dead, self.delayed_tasks, len(self.consumers),
            len(self.producers), self.closed, self.state(),
        ]

    def note_cost(self, ns: int) -> None:
        """A consumer's seconds per task (in ns), smoothed: producers size batches by it."""
        new = max(1, int(ns))
        self.cost_ns = new if self.cost_ns <= 0 else (self.cost_ns * 3 + new) // 4

    def room(self) -> bool:
        return self.maxsize <= 0 or self.ready_tasks < self.maxsize

    # ------------------------------------------------------------------ tasks in

    def push(self, items: list[Item], front: bool = False) -> None:
        """Fresh items (no death counted) into ready."""
        if front:
            self.ready.extendleft(reversed(items))
        else:
            self.ready.extend(items)
        self.ready_tasks += sum(i.tasks for i in items)

    def push_back(self, items: list[Item]) -> None:
        """A lease's items back in front: suspects into their own line."""
        suspects = [i for i in items if i.deaths]
        if suspects:
            self.suspects.extendleft(reversed(suspects))
            self.ready_tasks += len(suspects)
            items = [i for i in items if not i.deaths]
        self.push(items, front=True)

    def admit(self, messages: list[bytes], tasks: int) -> None:
        """A put: one message carries a whole batch; several carry one task each."""
        if len(messages) == 1:
            self.push([Item(messages[0], tasks)])
        else:
            self.push([Item(m, 1 if tasks else 0) for m in messages])
        self.produced += tasks

    def receive_outputs(self, messages: list[bytes], counts: list[int]) -> None:
        """A stage's outputs, put as part of the ack of their lease (the broker
        admitted that ack as it admits a put: see ``Broker._parks``)."""
        if self.closed:  # a new run of this queue, as for a put on Redis
            self.closed = False
            self.epoch += 1
        self.push([Item(m, c) for m, c in zip(messages, counts, strict=True)])
        self.produced += sum(counts)

    def delay(self, message: bytes, due: float) -> None:
        heapq.heappush(self.delayed, (due, next(self._tiebreak), Item(message, 1)))
        self.delayed_tasks += 1

    def due(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            item = heapq.heappop(self.delayed)[2]
            self.delayed_tasks -= item.tasks
            self.push([item])

    # ------------------------------------------------------------------ leases

    def lease(self, max_tasks: int, conn: Conn) -> list[Item]:
        """Pop what ``conn`` may take now, up to ``max_tasks`` tasks (see Suspects)."""
        if not conn.leases:
            if self.suspects:
                item = self.suspects.popleft()
                self._taken(item.tasks)
                return [item]
        elif self.suspects or conn.holds_suspect():
            return []
        return self._fresh(max_tasks)

    def _fresh(self, max_tasks: int) -> list[Item]:
        items: list[Item] = []
        tasks = 0
        ready = self.ready
        while ready and tasks < max_tasks and len(items) < max_tasks:
            if tasks + ready[0].tasks > max_tasks:
                if items:
                    break
                self._split(max_tasks)
            item = ready.popleft()
            items.append(item)
            tasks += item.tasks
        self._taken(tasks)
        return items

    def _taken(self, tasks: int) -> None:
        self.ready_tasks -= tasks
        self.in_flight += tasks

    def _split(self, size: int) -> None:
        """Split the batch at the head of ready into messages of ``size`` tasks,
        in place.  All at once, so a batch is encoded again once, not once a take."""
        head = self.ready[0]
        try:
            batch = decode(head.message)
        except DecodeError:
            return  # the consumer dead-letters it whole
        if not isinstance(batch, Batch):
            return
        bodies = batch.bodies
        pieces = [
            Item(encode_tasks(batch.tag, batch.seq + i, bodies[i : i + size], batch.attempts,
                              batch.enqueued_at), len(bodies[i : i + size]), head.deaths)
            for i in range(0, len(bodies), size)
        ]
        self.ready.popleft()
        self.ready.extendleft(reversed(pieces))

    def settle(self, items: list[Item], ack: Settlement) -> None:
        """Apply the acknowledgement of a lease of ``items``."""
        self.in_flight -= sum(i.tasks for i in items)
        self.done += ack.done
        self.failed += ack.failed
        self.retried += len(ack.retry)
        self.dead += len(ack.dead)
        self.letters.extend(ack.dead)
        now = time.monotonic()
        for message, delay in ack.retry:
            if delay <= 0:
                self.push([Item(message, 1)])
            else:
                self.delay(message, now + delay)
        if ack.give_back:
            self.push([Item(m, 1) for m in ack.give_back], front=True)

    def returned(self, items: list[Item], died: bool) -> int:
        """Put a lease's items back in front of ready; after a death, each task
        a suspect with its death counted, or to dead letters at ``max_deliveries``."""
        tasks = sum(i.tasks for i in items)
        self.in_flight -= tasks
        if not died:
            self.push_back(items)
            return tasks
        back: list[Item] = []
        for item in items:
            try:
                batch = decode(item.message) if item.tasks else None
            except DecodeError:
                batch = None
            if batch is None:  # not a task (undecodable): the consumer dead-letters it
                back.append(item)
            elif isinstance(batch, Batch):
                back += self._suspects_of(batch, item)
        self.push_back(back)
        return tasks

    def _suspects_of(self, batch: Batch, item: Item) -> list[Item]:
        back: list[Item] = []
        deaths = item.deaths + 1
        for i in range(len(batch.bodies)):
            env = batch.envelope(i)
            if 0 < self.max_deliveries <= deaths:
                reason = f"consumer died {deaths} times while handling it"
                self.letters.append(encode_dead(env, reason))
                self.failed += 1
                self.dead += 1
            else:
                message = item.message if item.tasks == 1 else encode_envelope(env)
                back.append(Item(message, 1, deaths))
        return back

    def stop_due(self, conn: Conn) -> bool:
        return (
            self.closed
            and self.consumers.get(conn, -1) == self.epoch
            and not self.has_ready()
            and not self.delayed
            and self.in_flight == conn.holding(self)
        )

    # ------------------------------------------------------------------ runs

    def close(self) -> None:
        self.closes += 1  # every call: a consumer forked before it belongs to it
        if self.closed:
            # Closed again (the classic pattern's own close() after the last
            # producer's): a consumer that attached after the run had finished
            # and waits for the next one takes this close as its stop too.
            for conn, epoch in self.consumers.items():
                if epoch == -1:
                    self.consumers[conn] = self.epoch
            return
        self.closed = True
        for conn in self.consumers:
            self.consumers[conn] = self.epoch

    def attach_consumer(self, conn: Conn, born: int | None, closes: int | None) -> int:
        """Register ``conn`` as a consumer; the run it serves.

        Attached while closing: drain, then stop.  Idle (closed, nothing
        pending) is new: wait for the next producer — unless this consumer was
        forked while this very run was open (it started late for it): then its
        run is over, and it stops.  (``born`` may also be the run a dead
        predecessor served, or -1 for a burst consumer: any run up to this one
        is over.)  A close() called after this consumer was forked (the classic
        pattern's producer.join(); queue.close()) is its stop too, even if the
        others finished the run before it attached.
        """
        if conn not in self.consumers:
            state = self.state()
            late = state == "idle" and born is not None and (
                born <= self.epoch or (closes is not None and self.closes > closes))
            self.consumers[conn] = self.epoch if state == "closing" or late else -1
        waits = self.consumers[conn] == -1 and self.state() == "idle"
        return self.epoch + 1 if waits else self.epoch

    def detach_consumer(self, conn: Conn) -> bool:
        """Unregister ``conn``; what it holds of this queue goes back to ready."""
        self.consumers.pop(conn, None)
        for lease_id in [k for k, (lg, _) in conn.leases.items() if lg is self]:
            self.returned(conn.leases.pop(lease_id)[1], died=False)
        return True

    def reap(self) -> int:
        """How many tasks dead consumers' connections returned since last asked."""
        moved = sum(self.unreported.values())
        self.unreported.clear()
        return moved

    def attach_producer(self, producer_id: str | None) -> str:
        """Register a producer (``producer_id`` or a new id); the id."""
        if self.closed:  # a new run: sentinels of the last close go stale
            self.closed = False
            self.epoch += 1
        pid = producer_id if producer_id is not None else uuid.uuid4().hex
        self.producers.add(pid)
        return pid

    def detach_producer(self, producer_id: str | None, close_if_last: bool) -> None:
        """Unregister producer ``producer_id`` (unknown or None: nobody); close
        if ``close_if_last`` and no producer is left."""
        if producer_id is not None:
            self.producers.discard(producer_id)
        if close_if_last and not self.producers:
            self.close()

    # ------------------------------------------------------------------ dead letters

    def requeue_dead(self) -> int:
        """Every dead letter that holds a task back in front of ready, attempts
        reset, in one step.  The task is pending again and failed no more;
        ``produced`` is unchanged (it was produced once), as on Redis.  Letters
        that hold no task (undecodable input) stay."""
        kept: list[bytes] = []
        fresh: list[Item] = []
        for letter in self.letters:
            env = envelope_from_dead(decode_dead(letter))
            if env is None:
                kept.append(letter)
            else:
                fresh.append(Item(encode_envelope(env), 1))
        self.letters = kept
        self.dead = len(kept)
        self.failed -= len(fresh)
        self.push(fresh, front=True)
        return len(fresh)

    def purge_dead(self) -> int:
        dropped = len(self.letters)
        self.letters = []
        self.dead = 0
        return dropped

    def purge(self) -> int:
        """Drop the ready and delayed tasks, counted failed (so that pending
        reaches 0 and join returns).  Whether the run is closed does not change."""
        dropped = self.ready_tasks + self.delayed_tasks
        self.ready.clear()
        self.suspects.clear()
        self.delayed.clear()
        self.ready_tasks = self.delayed_tasks = 0
        self.failed += dropped
        return dropped


class Seizures:
    """Leases set aside because a supervisor kills their process on purpose
    (a task past its timeout, or a consumer past its stop grace).

    ``seize``, before the kill, takes every lease of that process off its
    connections (the tasks stay in flight) and marks them killed: a late ack
    from the still-running handler finds no lease and commits nothing, and the
    kill closing them counts no death.  ``listed`` shows what was set aside;
    ``take`` hands one entry to the supervisor's acknowledgement (the timed-out
    task failed, the others given back); ``release`` returns the rest, to go
    back to ready with no death counted.
    """

    def __init__(self) -> None:
        self._by_pid: dict[int, list[tuple[Ledger, list[Item]] | None]] = {}

    def seize(self, pid: int, conns: Iterable[Conn]) -> int:
        seized = self._by_pid.setdefault(pid, [])
        for conn in conns:
            if conn.pid == pid:
                conn.killed = True
                seized.extend(conn.leases.values())
                conn.leases.clear()
        return len(seized)

    def listed(self, pid: int) -> list[list[Any]]:
        """[index, messages] of each entry not settled yet."""
        return [[i, [item.message for item in entry[1]]]
                for i, entry in enumerate(self._by_pid.get(pid, [])) if entry]

    def take(self, pid: int, index: int) -> tuple[Ledger, list[Item]] | None:
        seized = self._by_pid.get(pid, [])
        entry = seized[index] if index < len(seized) else None
        if entry is not None:
            seized[index] = None
        return entry

    def release(self, pid: int) -> list[tuple[Ledger, list[Item]]]:
        return [entry for entry in self._by_pid.pop(pid, []) if entry is not None]
