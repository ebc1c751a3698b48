"""``pcq.JoinableQueue``: ``multiprocessing.JoinableQueue``, one line changed.

    queue = multiprocessing.JoinableQueue(16)   # before
    queue = pcq.JoinableQueue(16)               # local: the broker, no server
    queue = pcq.JoinableQueue(16, url="redis://host:6379/0", name="jobs")  # many hosts

The standard library's API and behaviour, on a pcq :class:`~pcq.backends.base.Queue`
used only through its public methods:

* ``put`` is a ``Queue.put`` of one task (the item encoded by
  ``pcq.joinable_items``); ``maxsize`` is the backend queue's, so the bound on
  waiting items is kept where the items are, by the broker or by ``put.lua``.
* ``get`` is a ``take`` of one task, whose lease the calling process keeps;
  ``task_done`` acknowledges the oldest item this process got and has not
  marked done (the calling thread's own first); ``join`` is ``Queue.join``,
  which waits until every task put is acknowledged.
* A lease belongs to the process that took it (its broker connection, or its
  Redis consumer registration).  A process killed between ``get`` and
  ``task_done`` loses its connection (local: at once) or its heartbeat
  (Redis: after ``heartbeat_ttl``), and its items go to another consumer: no
  ``join`` hangs on a dead consumer.
* A process that ends normally (its ``run()`` returned or raised) does what the
  standard library's does with the items it got: they were consumed, and are
  never handed to anyone again.  At its exit (a ``multiprocessing`` finalizer)
  it acknowledges them, so the classic consumer that breaks on ``None`` without
  ``task_done`` leaves nothing behind — not even on a Redis queue that the next
  program opens by the same name.

Each process has its own connections, rebuilt after a fork or unpickling: one
for puts, ``join`` and counters, and one per thread that gets, so that a
``task_done`` never waits behind another thread's blocking ``get``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue as stdlib_queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing import util
from typing import Any

from pcq import joinable_items
from pcq.backends import Failure, Lease, Queue, open_queue
from pcq.errors import ConfigError, PcqError
from pcq.settings import IDLE_WAIT

__all__ = ["JoinableQueue"]

#: Local queues are named for what they are (the name is only seen in logs).
LOCAL_NAME = "joinable"


@dataclass(eq=False)
class _Got:
    """One lease this process took: its items not handed out yet (a lease taken
    from a foreign producer may hold several), and how many were got and done."""

    lease: Lease
    getter: Queue
    thread: int
    items: deque[Any]
    got: int = 0
    done: int = 0


@dataclass(eq=False)
class _Here:
    """What one process holds of a JoinableQueue (never crosses a process boundary)."""

    pid: int = field(default_factory=os.getpid)
    lock: threading.Lock = field(default_factory=threading.Lock)
    getters: dict[int, Queue] = field(default_factory=dict)  # thread ident -> connection
    got: deque[_Got] = field(default_factory=deque)
    closed: bool = False

    def settle(self) -> None:
        """At this process's normal exit: what it got is consumed, as with the
        standard library (acknowledged, so it neither comes back nor keeps a
        ``join`` waiting); what a lease held beyond that goes back unstarted."""
        if self.pid != os.getpid():
            return
        with self.lock:
            leases, self.got = list(self.got), deque()
            getters, self.getters = list(self.getters.values()), {}
        # The queue may be gone already (its owner exited first): nothing to settle.
        with contextlib.suppress(PcqError, OSError):
            for entry in leases:
                envs = list(entry.lease.envelopes())
                entry.getter.ack(entry.lease, give_back=envs[entry.got :])
            for getter in getters:
                getter.detach_consumer()


class JoinableQueue:
    """A drop-in for ``multiprocessing.JoinableQueue`` on a pcq queue.

    ``maxsize`` bounds the items waiting to be got (0 or less: no bound).
    ``url`` puts the queue on Redis, where every process that opens ``name``
    there shares it; without it the queue is local (a broker thread in this
    process, no server).  Other keywords go to the backend queue
    (``heartbeat_ttl=`` on Redis: how soon a killed consumer's items return).

    Hand it to ``multiprocessing.Process`` children as the standard one: by
    fork, or pickled under spawn / forkserver (it travels as what it needs to
    reconnect).  A local queue lives as long as the process that made it: keep
    that process (and this object) alive while others use it.
    """

    def __init__(
        self, maxsize: int = 0, *, url: str | None = None, name: str | None = None,
        **options: Any,
    ) -> None:
        if url is not None and not name:
            raise ConfigError("a JoinableQueue on Redis needs a name= that every process "
                              "sharing it uses")
        self._maxsize = max(0, maxsize)
        self._queue = open_queue(url=url, name=name or LOCAL_NAME, maxsize=self._maxsize,
                                 **options)
        self._codec = "pickle" if self._queue.backend == "local" else "msgpack"
        # The broker (local) lives until this process exits; it stops after the
        # exit's other finalizers, which include joining non-daemon children.
        util.Finalize(None, self._queue.dispose, exitpriority=-10)
        self._here_state: _Here | None = None

    # ------------------------------------------------------------------ processes

    def _start_here(self) -> _Here:
        here = _Here()
        # Run at this process's normal exit (also in multiprocessing children,
        # which skip atexit), or when this object is collected.
        util.Finalize(self, here.settle, exitpriority=10)
        return here

    def _here(self) -> _Here:
        here = self._here_state
        # Made on first use in each process: a fork copies the parent's (its
        # leases are not ours), and a child's finalizers registered while it
        # unpickled its Process object are cleared before run() starts.
        if here is None or here.pid != os.getpid():
            here = self._here_state = self._start_here()
        return here

    def __getstate__(self) -> dict[str, Any]:
        return {"maxsize": self._maxsize, "queue": self._queue, "codec": self._codec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._maxsize, self._queue, self._codec = state["maxsize"], state["queue"], state["codec"]
        self._here_state = None

    def __repr__(self) -> str:
        where = self._queue.backend
        return f"<pcq.JoinableQueue {where} {self._queue.name!r} maxsize={self._maxsize}>"

    def _check_open(self, here: _Here) -> None:
        if here.closed:
            raise ValueError(f"Queue {self!r} is closed")

    # ------------------------------------------------------------------ putting

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put ``obj``; while the queue is full, wait (``block``, up to ``timeout``
        seconds) or raise :class:`queue.Full`.  Returns once the item is in the
        queue (nothing is buffered in this process)."""
        self._check_open(self._here())
        body = joinable_items.encode(obj, self._codec)
        if self._maxsize and not (block and timeout is None):
            self._wait_for_room(time.monotonic() + (max(0.0, timeout or 0.0) if block else 0.0))
        self._queue.put(body)

    def _wait_for_room(self, deadline: float) -> None:
        # The bound itself is kept by the backend's put; this only decides
        # whether to wait for it.  A slot another producer takes between this
        # look and the put makes the put wait for the next one.
        self._queue.wait_for_room(stop=lambda: time.monotonic() >= deadline)
        if self._queue.counters().ready >= self._maxsize:
            raise stdlib_queue.Full

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    # ------------------------------------------------------------------ getting

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next item; when there is none, wait (``block``, up to ``timeout``
        seconds) or raise :class:`queue.Empty`.  Call :meth:`task_done` for it."""
        here = self._here()
        self._check_open(here)
        deadline = None if block and timeout is None else (
            time.monotonic() + (max(0.0, timeout or 0.0) if block else 0.0))
        me = threading.get_ident()
        looked = False
        while True:
            item = self._next_held(here)
            if item is not _NOTHING:
                return item
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if looked and left == 0.0:
                raise stdlib_queue.Empty
            getter = self._getter(here, me)
            lease = getter.take(1, left)
            if lease is None:
                raise stdlib_queue.Empty
            self._keep(here, getter, me, lease)
            looked = True

    def get_nowait(self) -> Any:
        return self.get(False)

    def _getter(self, here: _Here, me: int) -> Queue:
        """This thread's own connection, attached as a consumer on first use."""
        with here.lock:
            getter = here.getters.get(me)
        if getter is None:
            getter = copy.copy(self._queue)
            getter.attach_consumer()
            with here.lock:
                here.getters[me] = getter
        return getter

    def _keep(self, here: _Here, getter: Queue, me: int, lease: Lease) -> None:
        """Hold ``lease``'s items for :meth:`get` to hand out.  A body that cannot
        be decoded is dead-lettered with the reason, and the rest of its lease
        goes back to be taken again.  A lease of none (the sentinel of someone's
        ``pcq close`` on this queue; a JoinableQueue never closes its queue) is
        acknowledged and, after a pause, the wait goes on."""
        envs = list(lease.envelopes())
        items: deque[Any] = deque()
        failures: list[Failure] = []
        good = []
        for env in envs:
            try:
                items.append(joinable_items.decode(env.body, self._codec))
                good.append(env)
            except Exception as exc:  # a foreign or corrupt body: never handed out
                failures.append(Failure(env, f"not a JoinableQueue item: {exc!r}"))
        if failures or lease.bad or not envs:
            getter.ack(lease, failures=failures, give_back=good)
            if not envs and not lease.bad:
                time.sleep(IDLE_WAIT)
            return
        with here.lock:
            here.got.append(_Got(lease, getter, me, items))

    @staticmethod
    def _next_held(here: _Here) -> Any:
        with here.lock:
            for entry in here.got:
                if entry.items:
                    entry.got += 1
                    return entry.items.popleft()
        return _NOTHING

    # ------------------------------------------------------------------ task_done / join

    def task_done(self) -> None:
        """Mark the oldest item this process got (its calling thread's first) as
        done; ``ValueError`` if every item it got is done already."""
        here = self._here()
        me = threading.get_ident()
        with here.lock:
            entry = next(_undone(here, me), None)
            if entry is None:
                raise ValueError("task_done() called too many times")
            entry.done += 1
            finished = entry.done == entry.lease.size
            if finished:
                here.got.remove(entry)
        if finished:
            entry.getter.ack(entry.lease)

    def join(self) -> None:
        """Block until every item put has been marked done by :meth:`task_done`
        (or by the normal exit of the process that got it)."""
        self._queue.join()

    # ------------------------------------------------------------------ sizes

    def qsize(self) -> int:
        """Items waiting to be got (approximate while others put and get)."""
        return self._queue.counters().ready

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """No more puts or gets by this process (as in the standard library, it
        does not touch other processes); ``task_done`` still works.  Nothing is
        buffered here, so nothing is left to flush."""
        self._here().closed = True

    def join_thread(self) -> None:
        """The standard library joins its feeder thread here; puts here return
        only once the item is in the queue, so there is none to wait for."""
        assert self._here().closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """The standard library lets a process exit without flushing its buffered
        puts; nothing is ever buffered here, so nothing can be lost or waited for."""


_NOTHING = object()


def _undone(here: _Here, me: int) -> Iterator[_Got]:
    """Leases with items got and not done, the calling thread's first."""
    yield from (e for e in here.got if e.thread == me and e.done < e.got)
    yield from (e for e in here.got if e.done < e.got)
