"""The local broker's I/O: one thread, a selector loop over Unix sockets.

:class:`Loop` owns the listening socket in a private temp dir, the
connections (``local_conn``) and the thread.  It reads whole request frames and
hands each to ``_handle``, writes replies without ever blocking (``_reply``:
what a socket does not take now waits until it is writable), calls ``_tick``
after each turn, and ``_drop`` when a connection ends or sent a request that
could not be applied.  What a request does is the broker's
(:mod:`pcq.backends.local_broker`): this module knows no ledger.

In a forked child, an after-fork hook closes the loop's sockets (its thread
did not follow): a child never serves anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import tempfile
import threading
import weakref
from typing import Any

from pcq.backends import local_wire as wire
from pcq.backends.local_conn import Conn

log = logging.getLogger("pcq")


class Loop:
    """Sockets and the thread that serves them (see the module docstring)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pcq-local-")  # mode 0700: ours alone
        self.address = os.path.join(self.dir, "broker.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: set[Conn] = set()
        self._stopping = False
        self._owner = os.getpid()
        self._thread = threading.Thread(target=self._run, name="pcq-broker", daemon=True)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _close_in_child(ref))

    # What the broker does: with each request, after each turn, at a fork.

    def _handle(self, conn: Conn, payload: bytes) -> None:
        raise NotImplementedError

    def _wait(self) -> float | None:
        """How long the next turn may wait for a socket (None: for ever)."""
        return None

    def _tick(self) -> None:
        """After each turn: what is due by the clock."""

    def _drop(self, conn: Conn, died: bool) -> None:
        """Close ``conn`` and settle what it held (``died``: without a detach)."""
        raise NotImplementedError

    def _forked(self) -> None:
        """In a forked child, before the sockets close: note what it needs."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket (in the owner process only)."""
        if os.getpid() != self._owner or self._stopping:
            return
        self._stopping = True
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        self._close_all()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def _close_all(self) -> None:
        for conn in self._conns:
            conn.sock.close()
        self._conns.clear()
        self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def _close(self, conn: Conn) -> None:
        """Stop serving ``conn`` and close its socket (see ``_drop``)."""
        conn.closed = True
        self._sel.unregister(conn.sock)
        conn.sock.close()
        self._conns.discard(conn)

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select(self._wait()):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._wake_r.recv(64)
                else:
                    conn: Conn = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
            self._tick()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self._conns.add(conn)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Conn) -> None:
        requests = conn.requests()
        if requests is None:
            self._drop(conn, died=True)
            return
        for payload in requests:
            try:
                self._handle(conn, payload)
            except Exception as exc:  # one client's frame never stops the broker
                self._refuse(conn, exc)

    def _refuse(self, conn: Conn, exc: Exception) -> None:
        """A request that could not be applied: drop its connection (its leases
        go back as for a death), log one line, serve everyone else."""
        why = str(exc) if isinstance(exc, wire.BadRequest) else f"{type(exc).__name__}: {exc}"
        log.warning("pcq: warning: local broker dropped the connection of process %s: %s",
                    conn.pid or "?", why)
        self._drop(conn, died=True)

    def _reply(self, conn: Conn, value: Any) -> None:
        if conn.closed:
            return
        try:
            waits = conn.write(wire.frame(value))
        except OSError:
            self._drop(conn, died=True)
            return
        if waits:
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Conn) -> None:
        try:
            flushed = conn.flush()
        except OSError:
            self._drop(conn, died=True)
            return
        if flushed:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)


def _close_in_child(ref: weakref.ref[Loop]) -> None:
    """In a forked child: close the loop's sockets (its thread did not follow)."""
    loop = ref()
    if loop is None or loop._stopping:
        return
    loop._forked()
    loop._stopping = True
    with contextlib.suppress(OSError):
        loop._close_all()
