"""What the page shows: one snapshot of every queue, refreshed by one thread.

A :class:`Collector` reads its :class:`~pcq.dashboard.sources.Source` once per
``every`` seconds in a thread of its own and keeps the last snapshot, plus
each queue's ``done`` over the last minutes (the throughput chart).  Pages ask
for that snapshot (``/api/state``): however many browsers are open, the
server is read once per refresh.  ``/metrics`` reads the counters afresh
(:meth:`Collector.counters`), so a scrape sees the numbers of that moment.

A refresh that fails (the server went away) keeps the last queues and says
``connected: false`` with the error: the page shows "disconnected", the HTTP
server keeps answering, and the next refresh tries again.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from pcq.backends.base import Counters, Queue, state_of
from pcq.dashboard.sources import Source, task_view
from pcq.errors import PcqError

log = logging.getLogger("pcq")

#: Seconds between two refreshes (the page asks as often).
REFRESH_EVERY = 1.0
#: Seconds of throughput the chart shows.
HISTORY_SECONDS = 600
#: Dead letters shown per queue.
DEAD_SHOWN = 5
#: Errors are cut to this many characters.
ERROR_CHARS = 300
#: What a refresh that fails can raise: pcq's own errors, and a connection
#: that breaks outside a translated call.
FAILURES = (PcqError, RedisError, OSError)


def status_of(q: Queue, c: Counters) -> dict[str, Any]:
    """The fields ``pcq status --json`` gives for one queue, from ``c``."""
    out: dict[str, Any] = {f: getattr(c, f) for f in c.__slots__}
    out["state"] = state_of(c)
    out["queue"] = q.name
    return out


def hosts_of(consumers: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Live consumers grouped by host: how many, since when (the earliest start),
    the last heartbeat's age."""
    hosts: dict[str, dict[str, Any]] = {}
    for c in consumers:
        row = hosts.setdefault(str(c.get("host", "?")), {"consumers": 0, "since": None,
                                                         "heartbeat_age_s": None})
        row["consumers"] += 1
        started = c.get("started")
        if started is not None and (row["since"] is None or started < row["since"]):
            row["since"] = started
        age = max(0.0, now - float(c.get("heartbeat", now)))
        if row["heartbeat_age_s"] is None or age < row["heartbeat_age_s"]:
            row["heartbeat_age_s"] = round(age, 1)
    return [{"host": h, **row} for h, row in sorted(hosts.items())]


def letter_view(letter: dict[str, Any]) -> dict[str, Any]:
    """A dead letter as the page shows it: body cut short, error cut short."""
    if "body" in letter:
        view = task_view(letter["body"], letter.get("id"), letter.get("attempts"),
                         letter.get("enqueued_at"))
    else:
        view = {"id": None, "body": "(undecodable message)", "attempts": None, "age_s": None}
    view["error"] = str(letter.get("error", ""))[:ERROR_CHARS]
    return view


class History:
    """Each queue's (time, done) samples over the last ``seconds``."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def add(self, name: str, at: float, done: int) -> None:
        samples = self._samples.setdefault(name, deque())
        samples.append((at, done))
        while samples and samples[0][0] < at - self.seconds:
            samples.popleft()

    def rates(self, name: str, window: float = 5.0) -> list[list[float]]:
        """[[seconds ago, tasks done per second], ...] oldest first, each rate
        over the ``window`` seconds before its sample (one-second samples alone
        jitter with the refresh's timing); a counter that went down (purged, or a
        new local job) counts as 0, not negative."""
        samples = list(self._samples.get(name, ()))
        if len(samples) < 2:
            return []
        now = samples[-1][0]
        out = []
        start = 0
        for t1, d1 in samples[1:]:
            while samples[start + 1][0] < t1 and samples[start + 1][0] <= t1 - window:
                start += 1
            t0, d0 = samples[start]
            out.append([round(now - t1, 2), max(0, d1 - d0) / (t1 - t0) if t1 > t0 else 0.0])
        return out

    def keep(self, names: set[str]) -> None:
        """Forget the queues not in ``names`` (gone: pcq.map's throwaway queues
        come and go, and a dashboard runs for months)."""
        for name in set(self._samples) - names:
            del self._samples[name]


#: The name of the thread that reads the queues.
THREAD = "pcq-dashboard"


def _not_from_reader(record: logging.LogRecord) -> bool:
    """Drop what the backend logs in the reader's thread: its warnings about the
    server (persistence, a lost link) are for the job's processes, which log
    them too; the page shows the reader's link."""
    return record.threadName != THREAD


class Collector:
    """Reads ``source`` every ``every`` seconds; :meth:`state` is the last snapshot."""

    def __init__(self, source: Source, every: float = REFRESH_EVERY,
                 actions: bool = False) -> None:
        self.source = source
        self.every = every
        self.actions = actions
        self.history = History()
        self._lock = threading.Lock()  # one reader of the source at a time
        self._state: dict[str, Any] = {"connected": None, "pipelines": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=THREAD, daemon=True)

    def start(self) -> None:
        log.addFilter(_not_from_reader)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            self.source.close()
        log.removeFilter(_not_from_reader)

    def _loop(self) -> None:
        self.refresh()
        while not self._stop.wait(self.every):
            self.refresh()

    def state(self) -> dict[str, Any]:
        return self._state

    def refresh(self) -> None:
        """Read every queue once; on failure keep the last queues, disconnected."""
        started = time.monotonic()
        with self._lock:
            try:
                pipelines = self._read()
            except FAILURES as exc:
                self.source.reset()
                state = dict(self._state)
                state.update(connected=False, error=str(exc)[:ERROR_CHARS], updated=time.time())
                self._state = state
                return
        self._state = {
            "where": self.source.where, "host": socket.gethostname(), "connected": True,
            "error": None, "updated": time.time(), "every_s": self.every,
            "refresh_ms": round((time.monotonic() - started) * 1000, 2),
            "actions": self.actions, "left_out": self.source.left_out, "pipelines": pipelines,
        }

    def _read(self) -> list[dict[str, Any]]:
        pipelines: list[dict[str, Any]] = []
        shown: set[str] = set()
        for chain in self.source.chains():
            if chain:
                pipelines.append({"name": chain[0].name, "stages": [self._queue(q) for q in chain]})
                shown.update(q.name for q in chain)
        self.history.keep(shown)
        return pipelines

    def _queue(self, q: Queue) -> dict[str, Any]:
        c = q.counters()
        now = time.time()
        self.history.add(q.name, time.monotonic(), c.done)
        regs = q.registrations()
        consumers = [r for r in regs if r.get("role") == "consumer"]
        view = status_of(q, c)
        history = self.history.rates(q.name)
        view.update(
            rate=round(history[-1][1], 2) if history else 0.0,  # the last 5 s
            history=history,
            hosts=hosts_of(consumers, now),
            producer_list=[{"host": r.get("host"), "pid": r.get("pid"),
                            "since": r.get("started")} for r in regs
                           if r.get("role") == "producer"],
            dead_letters=[letter_view(d) for d in q.dead_letters(DEAD_SHOWN)] if c.dead else [],
            oldest_in_flight=self.source.oldest_in_flight(
                q, [str(r["id"]) for r in consumers if "id" in r]) if c.in_flight else None,
        )
        return view

    def counters(self) -> list[tuple[str, Counters]]:
        """Every queue's counters, read now (``/metrics``); raises what the source
        raises (the server is away)."""
        with self._lock:
            try:
                return [(q.name, q.counters()) for chain in self.source.chains() for q in chain]
            except FAILURES:
                self.source.reset()
                raise

    def queue(self, name: str) -> Queue | None:
        """The queue ``name`` if the source shows it (actions name their queue)."""
        with self._lock:
            for chain in self.source.chains():
                for q in chain:
                    if q.name == name:
                        return q
        return None

    def act(self, name: str, action: str) -> int:
        """Run an action on queue ``name``: "requeue" its dead letters (how many),
        or "close" it (1).  KeyError if no such queue is shown."""
        q = self.queue(name)
        if q is None:
            raise KeyError(name)
        with self._lock:
            if action == "requeue":
                return q.requeue_dead()
            q.close()
            return 1
