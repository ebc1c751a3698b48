"""Where the dashboard reads queues from: a Redis server, or a local job's broker.

A source answers three questions through the :class:`~pcq.backends.base.Queue`
interface — which queues there are, in pipelines (:meth:`Source.chains`), and
for a queue the task in flight the longest (:meth:`Source.oldest_in_flight`) —
with a number of commands bounded by the number of queues and consumers,
never by the number of tasks:

* :class:`RedisSource` lists the server's queue registry (one ``SMEMBERS`` of
  :data:`~pcq.backends.redis.REGISTRY`, no ``KEYS``, no ``SCAN``), or a fixed
  list of names (a job's own queues), and follows each queue's ``feeds``.  Its
  queue objects share one client and never write: no marker key, no
  registration.  A link that fails is dropped whole and built again at the
  next refresh, so a Redis that comes back is seen again.
* :class:`LocalSource` reads a local job's queues from the process that owns
  their broker, over the same sockets the job's own processes use.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, cast

from pcq.backends.base import Queue
from pcq.backends.local import LocalQueue
from pcq.backends.local_broker import Broker
from pcq.backends.redis import REGISTRY, RedisQueue
from pcq.backends.redis_link import Link
from pcq.backends.redis_topology import safe_url
from pcq.envelope import Batch, decode, short_repr

#: At most this many queues are shown (and read) per refresh.
MAX_QUEUES = 200
#: At most this many consumers' in-flight lists are peeked for the oldest task.
MAX_PEEKED = 64
#: Task bodies are shown cut to this many characters: they may hold secrets.
BODY_CHARS = 80


def task_view(body: Any, task_id: Any, attempts: Any, enqueued_at: float | None) -> dict[str, Any]:
    """What the page shows of one task: its id, body cut short, attempts, age."""
    age = None if not enqueued_at else max(0.0, time.time() - float(enqueued_at))
    return {"id": None if task_id is None else str(task_id),
            "body": short_repr(body, BODY_CHARS), "attempts": attempts, "age_s": age}


def chains_of(names: list[str], feeds: dict[str, str | None]) -> list[list[str]]:
    """``names`` grouped into pipelines: a queue no other queue feeds starts one,
    and each next queue is the one it feeds.  Every name appears exactly once,
    also in a cycle or when a fed queue is fed twice."""
    known = set(names)
    fed = {to for name, to in feeds.items() if to in known and to != name}
    seen: set[str] = set()
    out: list[list[str]] = []
    for start in [n for n in names if n not in fed] + names:
        if start in seen:
            continue
        chain = []
        name: str | None = start
        while name is not None and name in known and name not in seen:
            seen.add(name)
            chain.append(name)
            name = feeds.get(name)
        out.append(chain)
    return out


class Source(ABC):
    """Queues to show.  Methods may raise :class:`~pcq.errors.PcqError` (the
    server is away); the collector then calls :meth:`reset`."""

    #: Where the queues live, as the page shows it (no password).
    where: str = ""
    #: Queue names beyond MAX_QUEUES that were left out at the last refresh.
    left_out: int = 0

    @abstractmethod
    def chains(self) -> list[list[Queue]]:
        """Every queue, grouped into pipelines (a lone queue is a chain of one)."""

    def oldest_in_flight(self, q: Queue, consumer_ids: list[str]) -> dict[str, Any] | None:
        """The task in flight the longest (by its put time) in ``q``, as
        :func:`task_view`; None if none, or if this source cannot tell."""
        return None

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Drop connections after an error; the next call builds them again."""

    def close(self) -> None:
        self.reset()


class RedisSource(Source):
    """The queues on one Redis server: every registered one, or ``names``
    (treated as one pipeline, in order)."""

    def __init__(self, url: str, names: list[str] | None = None) -> None:
        self.url = url
        self.names = names
        self.where = safe_url(url)
        self._link: Link | None = None
        self._queues: dict[str, Queue] = {}

    def _client(self) -> Any:
        if self._link is None:
            # No retries: a refresh that fails shows "disconnected" at once.
            self._link = Link(self.url, retry_for=0.0, what="the dashboard")
        return self._link.call(lambda client: client)

    def _queue(self, name: str) -> Queue:
        q = self._queues.get(name)
        if q is None:
            # A shared client (ours): no marker, no registration, nothing written.
            q = self._queues[name] = RedisQueue(name, url=self.url, client=self._client(),
                                                retry_for=0.0)
        return q

    def _registered(self) -> list[str]:
        assert self._link is not None
        raw = cast("set[bytes]", self._link.call(lambda client: client.smembers(REGISTRY)))
        names = sorted(n.decode() for n in raw)
        self.left_out = max(0, len(names) - MAX_QUEUES)
        return names[:MAX_QUEUES]

    def chains(self) -> list[list[Queue]]:
        self._client()
        if self.names is not None:
            return [[self._queue(n) for n in self.names]]
        names = self._registered()
        feeds = {n: self._queue(n).feeds() for n in names}
        return [[self._queue(n) for n in chain] for chain in chains_of(names, feeds)]

    def oldest_in_flight(self, q: Queue, consumer_ids: list[str]) -> dict[str, Any] | None:
        """The last element of each consumer's in-flight list is its oldest
        take: one LINDEX each, in one round trip, whatever the tasks."""
        assert isinstance(q, RedisQueue) and self._link is not None
        keys = [q.keys.inflight(c) for c in consumer_ids[:MAX_PEEKED]]
        if not keys:
            return None

        def op(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.lindex(k, -1)
            return list(pipe.execute())

        oldest: Any = None
        for raw in self._link.call(op):
            try:
                batch = decode(raw) if raw else None
            except Exception:  # a foreign message: nothing to show of it
                continue
            if isinstance(batch, Batch) and batch.bodies and (
                    oldest is None or batch.enqueued_at < oldest.enqueued_at):
                oldest = batch
        if oldest is None:
            return None
        env = oldest.envelope(0)
        return task_view(env.body, env.id, env.attempts, env.enqueued_at)

    def reset(self) -> None:
        for q in self._queues.values():
            q.dispose()
        self._queues = {}
        if self._link is not None:
            self._link.close()
            self._link = None


class LocalSource(Source):
    """The queues of a local job, read in the process that owns their broker
    (``broker``), by name, as one pipeline in order.  A queue the job has not
    opened yet is left out: opening it here would fix its settings first."""

    def __init__(self, broker: Broker, names: list[str]) -> None:
        self.broker = broker
        self.names = names
        self.where = "local (this job)"
        self._queues: dict[str, Queue] = {}

    def chains(self) -> list[list[Queue]]:
        opened = set(self.broker.ledgers)
        for name in self.names:
            if name in opened and name not in self._queues:
                self._queues[name] = LocalQueue(name, broker=self.broker)
        return [[self._queues[n] for n in self.names if n in self._queues]]

    def reset(self) -> None:
        for q in self._queues.values():
            q.dispose()  # not the broker's owner: closes our sockets only
        self._queues = {}
