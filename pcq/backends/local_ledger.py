"""The local broker's ledger: one named queue's tasks, leases and counters.

Plain data, no I/O: :class:`~pcq.backends.local_broker.Broker` applies every
request to a :class:`Ledger` in its one thread, so each request is applied whole.
A lease lives on its :class:`Conn` (the connection it was handed out on), so a
closed connection names exactly the tasks that go back.
"""

from __future__ import annotations

import heapq
import itertools
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from pcq.envelope import Batch, decode, encode_dead, encode_envelope
from pcq.errors import DecodeError


class Item(NamedTuple):
    """A message in a ledger: its bytes, how many tasks it holds, consumer deaths."""

    message: bytes
    tasks: int
    deaths: int = 0


@dataclass(eq=False)
class Conn:
    """One process's connection, and the leases handed out on it."""

    sock: socket.socket
    pid: int = 0
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    leases: dict[int, tuple[Ledger, list[Item]]] = field(default_factory=dict)
    lease_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    closed: bool = False
    killed: bool = False  # by its supervisor, on purpose: closing it is no death

    def holding(self, ledger: Ledger) -> int:
        return sum(i.tasks for lg, items in self.leases.values() if lg is ledger for i in items)


@dataclass(eq=False)
class Taker:
    conn: Conn
    max_tasks: int
    deadline: float | None
    done: bool = False


class Ledger:
    """One named queue: ready messages, delayed retries, counters, dead letters.

    Invariant: ``ready_tasks + delayed_tasks + in_flight == produced - done - failed``.
    Sentinels are never stored: a consumer that was attached when the queue
    closed (or attached while it was closing) gets its sentinel from ``take``
    once nothing is ready or delayed and no other consumer holds a task.
    """

    def __init__(self, name: str, maxsize: int, max_deliveries: int) -> None:
        self.name, self.maxsize, self.max_deliveries = name, maxsize, max_deliveries
        self.ready: deque[Item] = deque()
        self.ready_tasks = 0
        self.delayed: list[tuple[float, int, Item]] = []
        self.delayed_tasks = 0
        self.in_flight = 0
        self.produced = self.done = self.failed = self.retried = self.dead = 0
        self.letters: list[bytes] = []
        self.closed = False
        self.epoch = 0
        self.closes = 0  # close() calls so far, also those on a closed queue
        self.producers = 0
        self.consumers: dict[Conn, int] = {}  # conn -> epoch whose close stops it (-1: none)
        self.takers: deque[Taker] = deque()
        self.putters: deque[tuple[Conn, list[bytes], int]] = deque()
        self.cost_ns = 0
        self.unreported: dict[int, int] = {}  # pid -> tasks returned after it died
        self._tiebreak = itertools.count()

    @property
    def pending(self) -> int:
        return self.produced - self.done - self.failed

    def state(self) -> str:
        if not self.closed:
            return "open"
        return "closing" if self.pending > 0 else "idle"

    def push(self, items: list[Item], front: bool = False) -> None:
        if front:
            self.ready.extendleft(reversed(items))
        else:
            self.ready.extend(items)
        self.ready_tasks += sum(i.tasks for i in items)

    def note_cost(self, ns: int) -> None:
        """A consumer's seconds per task (in ns), smoothed: producers size batches by it."""
        new = max(1, int(ns))
        self.cost_ns = new if self.cost_ns <= 0 else (self.cost_ns * 3 + new) // 4

    def room(self) -> bool:
        return self.maxsize <= 0 or self.ready_tasks < self.maxsize

    def lease(self, max_tasks: int) -> list[Item]:
        """Pop up to ``max_tasks`` tasks' messages; a task that a dead consumer
        held goes alone, so a poison task never takes innocent ones down."""
        items: list[Item] = []
        tasks = 0
        ready = self.ready
        while ready and tasks < max_tasks and len(items) < max_tasks:
            if ready[0].deaths and items:
                break
            item = ready.popleft()
            items.append(item)
            tasks += item.tasks
            if item.deaths:
                break
        self.ready_tasks -= tasks
        self.in_flight += tasks
        return items

    def stop_due(self, conn: Conn) -> bool:
        return (
            self.closed
            and self.consumers.get(conn, -1) == self.epoch
            and not self.ready
            and not self.delayed
            and self.in_flight == conn.holding(self)
        )

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

    def delay(self, message: bytes, due: float) -> None:
        heapq.heappush(self.delayed, (due, next(self._tiebreak), Item(message, 1)))
        self.delayed_tasks += 1

    def due(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            item = heapq.heappop(self.delayed)[2]
            self.delayed_tasks -= item.tasks
            self.push([item])

    def returned(self, items: list[Item], died: bool) -> int:
        """Put a lease's items back in front of ready; after a death, one task a
        message with a death counted, or to dead letters at ``max_deliveries``."""
        tasks = sum(i.tasks for i in items)
        self.in_flight -= tasks
        if not died:
            self.push(items, front=True)
            return tasks
        back: list[Item] = []
        for item in items:
            if item.tasks == 0:  # not a task (undecodable): the consumer dead-letters it
                back.append(item)
                continue
            try:
                batch = decode(item.message)
            except DecodeError:
                back.append(item)
                continue
            if not isinstance(batch, Batch):
                continue
            for i in range(len(batch.bodies)):
                env = batch.envelope(i)
                deaths = item.deaths + 1
                if 0 < self.max_deliveries <= deaths:
                    reason = f"consumer died {deaths} times while handling it"
                    self.letters.append(encode_dead(env, reason))
                    self.failed += 1
                    self.dead += 1
                else:
                    message = item.message if item.tasks == 1 else encode_envelope(env)
                    back.append(Item(message, 1, deaths))
        self.push(back, front=True)
        return tasks
