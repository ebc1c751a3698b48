"""The local backend's wire: frames, operations, request shapes, fault points.

Every process talks to the broker over a Unix stream socket of its own.  A
frame is a 4-byte little-endian length and a msgpack array ``[op, queue, *fields]``;
the broker answers every request with one frame (a parked ``take`` or a ``put``
on a full queue answers later; ``HELLO`` and ``COST`` are never answered).  Task
messages travel as opaque ``bytes``: the broker decodes them only to split a
batch (a take that asks for fewer tasks, a dead consumer's batch).

Each operation (:class:`Op`) has one request shape, a named tuple whose fields
are checked by :func:`parse` before the broker applies anything: a malformed
request (garbage bytes, an unknown operation, a field of the wrong type) is a
:class:`BadRequest`, and the broker drops that one connection.

Fault points (tests only).  ``PCQ_TEST_PAUSE_AT=<point>`` — read once, at
import — makes a process stop itself (SIGSTOP) in the middle of that step of
the protocol, so a test can SIGKILL it exactly there:

``take``       the take request sent, the reply half read (the broker leased it);
``ack``        an acknowledgement half written;
``give-back``  an acknowledgement that hands tasks back, half written;
``put``        a put half written;
``requeue``    a dead-letter requeue half written.

With ``PCQ_TEST_PAUSE_FILE=<path>`` only the process that creates that file
(it writes its pid there) stops, once.  The broker's own process never stops.
"""

from __future__ import annotations

import enum
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

HEADER = struct.Struct("<I")


class Op(enum.IntEnum):
    """The broker's operations; each takes the request shape :data:`SHAPES` names."""

    HELLO = 0
    PUT = 1
    TAKE = 2
    ACK = 3
    ACK_TAKE = 4
    ATTACH_CONSUMER = 5
    DETACH_CONSUMER = 6
    ATTACH_PRODUCER = 7
    DETACH_PRODUCER = 8
    CLOSE = 9
    COUNTERS = 10
    COST = 11
    COST_NOW = 12
    REAP = 13
    EVICT = 14
    KILLING = 15
    SEIZED = 16
    SETTLE = 17
    RELEASE = 18
    DEAD_LETTERS = 19
    REQUEUE_DEAD = 20
    PURGE_DEAD = 21
    PURGE = 22


class BadRequest(Exception):
    """A frame the broker cannot apply: it drops the connection that sent it."""


# ---------------------------------------------------------------- request shapes


class Nothing(NamedTuple):
    """A request with no fields."""


class Hello(NamedTuple):
    pid: int


class Put(NamedTuple):
    messages: list[bytes]  # one message holding a batch, or one message a task
    tasks: int


class Take(NamedTuple):
    max_tasks: int
    timeout: float | None


class Ack(NamedTuple):
    """Settle lease ``lease_id``; with ``to``, put ``outputs`` (holding ``counts``
    tasks each) on queue ``to`` in the same step."""

    lease_id: int
    done: int
    failed: int
    retry: list[list[Any]]  # [message, delay in seconds]
    dead: list[bytes]
    give_back: list[bytes]
    cost: int  # ns per task, 0: no report
    to: str | None
    outputs: list[bytes]
    counts: list[int]


class AckTake(NamedTuple):
    """An :class:`Ack`, then a :class:`Take`, in one round trip."""

    lease_id: int
    done: int
    failed: int
    retry: list[list[Any]]
    dead: list[bytes]
    give_back: list[bytes]
    cost: int
    to: str | None
    outputs: list[bytes]
    counts: list[int]
    max_tasks: int
    timeout: float | None


class AttachConsumer(NamedTuple):
    born: int | None  # the run it was forked in (or a dead predecessor served), -1: burst
    closes: int | None  # close() calls seen when it was forked


class Producer(NamedTuple):
    producer_id: str | None


class DetachProducer(NamedTuple):
    producer_id: str | None
    close_if_last: bool


class Cost(NamedTuple):
    ns: int


class Pid(NamedTuple):
    pid: int


class Settle(NamedTuple):
    """Acknowledge the ``seized``-th lease set aside when ``pid`` was killed."""

    pid: int
    seized: int
    done: int
    failed: int
    retry: list[list[Any]]
    dead: list[bytes]
    give_back: list[bytes]
    cost: int


class Limit(NamedTuple):
    limit: int


Check = Callable[[Any], bool]


def _int(v: Any) -> bool:
    return type(v) is int and v >= 0


def _opt_int(v: Any) -> bool:
    return v is None or type(v) is int


def _opt_num(v: Any) -> bool:
    return v is None or type(v) in (int, float)


def _opt_str(v: Any) -> bool:
    return v is None or type(v) is str


def _bool(v: Any) -> bool:
    return type(v) is bool


def _blobs(v: Any) -> bool:
    return type(v) is list and all(type(x) is bytes for x in v)


def _ints(v: Any) -> bool:
    return type(v) is list and all(type(x) is int and x >= 0 for x in v)


def _retries(v: Any) -> bool:
    return type(v) is list and all(
        type(r) is list and len(r) == 2 and type(r[0]) is bytes and type(r[1]) in (int, float)
        for r in v)


_ACK: tuple[Check, ...] = (_int, _int, _int, _retries, _blobs, _blobs, _int,
                           _opt_str, _blobs, _ints)
_SETTLE_FIELDS: tuple[Check, ...] = (_int, _int, _int, _int, _retries, _blobs, _blobs, _int)

#: Each operation's request shape and a check for each of its fields.
SHAPES: dict[int, tuple[Op, Any, tuple[Check, ...]]] = {
    op: (op, shape, checks)
    for op, shape, checks in (
        (Op.HELLO, Hello, (_int,)),
        (Op.PUT, Put, (_blobs, _int)),
        (Op.TAKE, Take, (_int, _opt_num)),
        (Op.ACK, Ack, _ACK),
        (Op.ACK_TAKE, AckTake, (*_ACK, _int, _opt_num)),
        (Op.ATTACH_CONSUMER, AttachConsumer, (_opt_int, _opt_int)),
        (Op.DETACH_CONSUMER, Nothing, ()),
        (Op.ATTACH_PRODUCER, Producer, (_opt_str,)),
        (Op.DETACH_PRODUCER, DetachProducer, (_opt_str, _bool)),
        (Op.CLOSE, Nothing, ()),
        (Op.COUNTERS, Nothing, ()),
        (Op.COST, Cost, (_int,)),
        (Op.COST_NOW, Nothing, ()),
        (Op.REAP, Nothing, ()),
        (Op.EVICT, Pid, (_int,)),
        (Op.KILLING, Pid, (_int,)),
        (Op.SEIZED, Pid, (_int,)),
        (Op.SETTLE, Settle, _SETTLE_FIELDS),
        (Op.RELEASE, Pid, (_int,)),
        (Op.DEAD_LETTERS, Limit, (_int,)),
        (Op.REQUEUE_DEAD, Nothing, ()),
        (Op.PURGE_DEAD, Nothing, ()),
        (Op.PURGE, Nothing, ()),
    )
}


def request(op: Op, queue: str, *fields: Any) -> bytes:
    """The frame of a request: ``fields`` in the order of ``op``'s shape."""
    return frame([op, queue, *fields])


def parse(raw: bytes | memoryview) -> tuple[Op, str, Any]:
    """A request frame's payload as (operation, queue name, request shape);
    BadRequest for anything else."""
    try:
        decoded = unpack(raw)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(f"not a msgpack frame ({type(exc).__name__})") from None
    if type(decoded) is not list or len(decoded) < 2 or type(decoded[0]) is not int:
        raise BadRequest("not a request")
    op, name, *fields = decoded
    spec = SHAPES.get(op)
    if spec is None:
        raise BadRequest(f"unknown operation {op}")
    known, shape, checks = spec
    if type(name) is not str or len(fields) != len(checks) or not all(
            map(_passes, checks, fields)):
        raise BadRequest(f"malformed {known.name} request")
    return known, name, shape._make(fields)


def _passes(check: Check, value: Any) -> bool:
    return check(value)


# ---------------------------------------------------------------- fault points

FAULT_POINTS = ("take", "ack", "give-back", "put", "requeue")
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


# ---------------------------------------------------------------- frames


def frame(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
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


def unpack(data: bytes | memoryview) -> Any:
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
