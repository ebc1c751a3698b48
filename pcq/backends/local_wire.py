"""The local backend's wire: frames, operation codes, and test-only fault points.

Every process talks to the broker over a Unix stream socket of its own.  A
frame is a 4-byte little-endian length and a msgpack array ``[op, queue, *args]``;
the broker answers every request with one frame (a parked ``take`` or a ``put``
on a full queue answers later).  Task messages travel as opaque ``bytes``: the
broker never decodes them, except to split a dead consumer's batch.

Fault points (tests only).  ``PCQ_TEST_PAUSE_AT=<point>`` — read once, at
import — makes a process stop itself (SIGSTOP) in the middle of that step of
the protocol, so a test can SIGKILL it exactly there:

``take``       the take request sent, the reply half read (the broker leased it);
``ack``        an acknowledgement half written;
``give-back``  an acknowledgement that hands tasks back, half written;
``put``        a put half written.

With ``PCQ_TEST_PAUSE_FILE=<path>`` only the process that creates that file
(it writes its pid there) stops, once.  The broker's own process never stops.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from typing import Any

import msgpack

HEADER = struct.Struct("<I")

# Operations.  Requests are [op, queue name, *args]; see Broker._handle for each.
(
    HELLO, PUT, TAKE, ACK, ACK_TAKE, ATTACH_CONSUMER, DETACH_CONSUMER, ATTACH_PRODUCER,
    DETACH_PRODUCER, CLOSE, COUNTERS, COST, DEAD_LETTERS, TAKE_DEAD, PURGE_DEAD, PURGE,
    EVICT, OPEN, COST_NOW, REAP, KILLING, SEIZED, SETTLE, RELEASE,
) = range(24)

FAULT_POINTS = ("take", "ack", "give-back", "put")
PAUSE_AT = os.environ.get("PCQ_TEST_PAUSE_AT", "")
PAUSE_FILE = os.environ.get("PCQ_TEST_PAUSE_FILE", "")
_paused = False


def pause_here(point: str) -> None:
    """Stop this process if the test build asked for a pause at ``point``."""
    global _paused
    if point != PAUSE_AT or _paused:
        return
    if PAUSE_FILE:
        try:
            fd = os.open(PAUSE_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return  # another process took the one pause
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
    _paused = True
    os.kill(os.getpid(), signal.SIGSTOP)


def frame(request: list[Any]) -> bytes:
    data: bytes = msgpack.packb(request, use_bin_type=True)
    return HEADER.pack(len(data)) + data


def send(sock: socket.socket, data: bytes, point: str = "") -> None:
    """Send one frame; at an armed fault point, half of it, then stop."""
    if point and point == PAUSE_AT:
        half = len(data) // 2
        sock.sendall(data[:half])
        pause_here(point)
        sock.sendall(data[half:])
        return
    sock.sendall(data)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the local queue's broker is gone (its owner process exited)")
        got += k
    return buf


def receive(sock: socket.socket, point: str = "") -> Any:
    """Read one reply frame; at an armed ``take`` point, stop after its header.

    The broker answers one request with one frame and says nothing unasked, so
    a read never takes bytes of the next frame: a small reply costs one recv."""
    if point and point == PAUSE_AT:
        (length,) = HEADER.unpack(_read_exactly(sock, HEADER.size))
        pause_here(point)
        return unpack(bytes(_read_exactly(sock, length)))
    head = sock.recv(65536)
    if len(head) < HEADER.size:
        head += _read_exactly(sock, HEADER.size - len(head))
    (length,) = HEADER.unpack_from(head)
    missing = HEADER.size + length - len(head)
    if missing > 0:
        head += _read_exactly(sock, missing)
    return msgpack.unpackb(memoryview(head)[HEADER.size :], raw=False, strict_map_key=False)
