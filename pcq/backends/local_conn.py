"""The local broker's connections: one per process socket, with its buffers,
the leases handed out on it, and the producers registered on it.

A connection reads whole request frames (``local_wire``) and writes replies
without ever blocking the broker: what the socket does not take now waits in
``out`` until it can be written (a process that stopped reading must not stop
the broker).  Its leases and producer registrations are what the broker
settles when it closes without a detach: everything the process held.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pcq.backends.local_wire import HEADER

if TYPE_CHECKING:
    from pcq.backends.local_ledger import Item, Ledger


@dataclass(eq=False)
class Conn:
    """One process's connection, and the leases handed out on it."""

    sock: socket.socket
    pid: int = 0
    inbuf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    leases: dict[int, tuple[Ledger, list[Item]]] = field(default_factory=dict)
    lease_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    #: Producers registered on this connection: detached when it dies.
    producers: list[tuple[Ledger, str]] = field(default_factory=list)
    closed: bool = False
    killed: bool = False  # by its supervisor, on purpose: closing it is no death
    #: The lease taken ahead (read-ahead, ``local_wire.Take``), not started
    #: while another lease is held here: a death counts none against it.  0: none.
    ahead: int = 0

    def settled(self, lease_id: int) -> None:
        """Lease ``lease_id`` left this connection: a lease taken ahead starts
        (the consumer runs it as soon as it sent that ack) once it is the last."""
        if self.ahead == lease_id or (self.ahead and len(self.leases) == 1):
            self.ahead = 0

    def holding(self, ledger: Ledger) -> int:
        return sum(i.tasks for lg, items in self.leases.values() if lg is ledger for i in items)

    def holds_suspect(self) -> bool:
        return any(items and items[0].deaths for _, items in self.leases.values())

    def requests(self) -> Iterator[bytes] | None:
        """The payloads of the whole frames that arrived (None: the peer is
        gone).  The caller stops iterating once the connection is closed."""
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return iter(())
        except OSError:
            data = b""
        if not data:
            return None
        self.inbuf += data
        return self._frames()

    def _frames(self) -> Iterator[bytes]:
        buf, pos, size = self.inbuf, 0, HEADER.size
        try:
            while len(buf) - pos >= size and not self.closed:
                (length,) = HEADER.unpack_from(buf, pos)
                if len(buf) - pos - size < length:
                    break
                payload = bytes(buf[pos + size : pos + size + length])
                pos += size + length
                yield payload
        finally:
            del buf[:pos]

    def write(self, data: bytes) -> bool:
        """Send ``data`` after what waits; True if some of it must wait for the
        socket to be writable.  OSError: the peer is gone."""
        if self.out:
            self.out += data
            return False  # already waiting for writability
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.out += data[sent:]
            return True
        return False

    def flush(self) -> bool:
        """Send what waits; True once nothing does.  OSError: the peer is gone."""
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return False
        del self.out[:sent]
        return not self.out


@dataclass(eq=False)
class Taker:
    """A take parked until there is something to give (or its deadline)."""

    conn: Conn
    max_tasks: int
    deadline: float | None
    done: bool = False
