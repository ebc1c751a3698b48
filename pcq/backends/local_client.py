"""A local queue's client side of the wire: this process's connections to the
broker, one request at a time on each, and read-ahead.

Each process has two connections (opened on first use, rebuilt after a fork):
the main one carries its registrations and leases (put, take, ack); the side
one carries questions that must not wait behind a blocking take or put of
another thread (counters, batch sizing, a supervisor's kill protocol).  The
broker answers the requests of one connection in order, so a request sent
without waiting for its reply (a take-ahead) has its reply read first by the
next call.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from pcq.backends import local_wire as wire
from pcq.backends.local_wire import Op
from pcq.errors import BackendUnavailable

#: How often a consumer whose ack waits for room looks whether it is stopping.
PARKED_POLL = 0.05


class Channel:
    """The connections of :class:`~pcq.backends.local.LocalQueue` (a mixin)."""

    name: str
    _address: str
    _pid: int
    _sock: socket.socket | None
    _side: socket.socket | None

    def _init_process_state(self) -> None:
        self._init_channels()

    def _init_channels(self) -> None:
        """Per-process state: never crosses a process boundary."""
        self._pid = os.getpid()
        self._sock = None  # this process's registrations and leases
        self._lock = threading.Lock()  # one request at a time on it
        self._side = None  # questions (see the module docstring)
        self._side_lock = threading.Lock()
        self._read_ahead = False  # see read_ahead
        self._ahead_sent = False  # a take-ahead request whose reply is not read yet
        self._ahead: Any = None  # its reply, read: the lease taken ahead, or None
        self._ahead_parks = False  # that request was an ack that may wait for room
        self._stopping: Callable[[], bool] | None = None  # see unpark_when

    #: What __getstate__ leaves out: it belongs to this process.
    CHANNEL_STATE = ("_pid", "_sock", "_lock", "_side", "_side_lock", "_read_ahead",
                     "_ahead_sent", "_ahead", "_ahead_parks", "_stopping")

    def _here(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            for sock in (self._sock, self._side):
                if sock is not None:
                    sock.close()
            self._init_process_state()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._address)
        except OSError as exc:
            sock.close()
            raise BackendUnavailable(
                f"local queue {self.name!r} is gone: the process that opened it "
                f"has exited or disposed of it ({exc})"
            ) from exc
        sock.sendall(wire.request(Op.HELLO, self.name, os.getpid()))
        return sock

    def _call(self, op: Op | None, *args: Any, point: str = "", take: bool = False,
              reply: bool = True, parks: bool = False) -> Any:
        """One request and its reply on this process's connection (``reply=False``:
        a take-ahead, whose reply the next call reads; ``op`` None: only that;
        ``parks``: an ack with outputs, which may wait in the broker for room).
        Anything that interrupts it (a signal's exception, a dead broker)
        closes the connection, so the next call starts clean; the broker
        settles what the closed connection held."""
        self._here()
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            sock = self._sock
            try:
                if self._ahead_sent:  # the broker answers in order: that reply first
                    self._ahead_sent = False
                    self._ahead = self._receive(sock, "take", self._ahead_parks)
                if op is None:
                    return None
                wire.send(sock, wire.request(op, self.name, *args), point)
                if not reply:
                    self._ahead_sent, self._ahead_parks = True, parks
                    return None
                return self._receive(sock, "take" if take else "", parks)
            except BaseException as exc:
                self._sock, self._ahead_sent, self._ahead = None, False, None
                sock.close()
                if isinstance(exc, OSError):
                    raise BackendUnavailable(f"local queue {self.name!r}: {exc}") from exc
                raise

    def _receive(self, sock: socket.socket, point: str, parks: bool) -> Any:
        """The reply to the request sent last.  An ack that may wait for room
        is waited for with an eye on this consumer's stop request: once it
        stops, UNPARK lets the ack through (a stop never waits for the next
        stage)."""
        stopping = self._stopping
        if parks and stopping is not None:
            ready = select.poll()  # not select(): a handler's process may hold 1024 fds
            ready.register(sock, select.POLLIN)
            while not ready.poll(PARKED_POLL * 1000):
                if stopping():
                    wire.send(sock, wire.request(Op.UNPARK, self.name))
                    break
        return wire.receive(sock, point)

    def unpark_when(self, stopping: Callable[[], bool]) -> None:
        """A stage's consumer (in its process) says how to tell it is stopping:
        an ack of its that waits for room goes through once ``stopping()``."""
        self._here()
        self._stopping = stopping

    def _ask(self, op: Op, *args: Any, reply: bool = True) -> Any:
        """A question on the side connection (never blocks in the broker);
        ``reply=False``: a report that has no answer."""
        self._here()
        with self._side_lock:
            if self._side is None:
                self._side = self._connect()
            sock = self._side
            try:
                sock.sendall(wire.request(op, self.name, *args))
                return wire.receive(sock) if reply else None
            except BaseException as exc:
                self._side = None
                sock.close()
                if isinstance(exc, OSError):
                    raise BackendUnavailable(f"local queue {self.name!r}: {exc}") from exc
                raise

    # ------------------------------------------------------------------ read-ahead

    def read_ahead(self, on: bool) -> None:
        """With ``on``, each take also asks for the lease after it (``local_wire.Take``'s
        ``ahead``), read when the consumer wants its next lease: it never waits
        between leases.  The broker counts no death against a lease taken ahead
        (never started), gives it no suspect and no sentinel, and takes it back
        when the consumer detaches."""
        self._here()
        self._read_ahead = on

    def _taken_ahead(self) -> Any:
        """The reply of the take-ahead request, if one was sent (None: none, or
        nothing was ready then)."""
        if self._ahead_sent:
            self._call(None)
        reply, self._ahead = self._ahead, None
        return reply

    def _then_ahead(self, reply: Any, max_tasks: int) -> Any:
        """After a take's ``reply``: take the next lease ahead if the broker said
        more tasks were ready (an idle queue's consumer sends nothing more)."""
        if self._read_ahead and reply is not None and reply[3]:
            self._call(Op.TAKE, max_tasks, 0, True, reply=False)
        return reply
