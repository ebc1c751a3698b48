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
    #: The lease whose ack (with outputs) waits in the broker for room on its
    #: outputs' queue: its tasks have finished, so a death counts none against
    #: it either (they go back, fresh, and their outputs were never put).  0: none.
    parked: int = 0

    def settled(self, lease_id: int) -> None:
        """Lease ``lease_id`` left this connection."""
        if self.parked == lease_id:
            self.parked = 0
        if self.ahead == lease_id:
            self.ahead = 0
        self._ahead_starts()

    def park(self, lease_id: int) -> None:
        """The ack of lease ``lease_id`` waits for room; its consumer went on."""
        self.parked = lease_id
        self._ahead_starts()

    def _ahead_starts(self) -> None:
        # The consumer runs a lease taken ahead as soon as it has sent the ack
        # of the one before: it starts once every other lease here is settled
        # or waits in an ack.
        if self.ahead and all(k in (self.ahead, self.parked) for k in self.leases):
            self.ahead = 0

    def running(self, lease_id: int) -> bool:
        """Lease ``lease_id`` may be running here: neither taken ahead nor
        finished and waiting in its ack.  A death counts against it only then."""
        return lease_id not in (self.ahead, self.parked)

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
