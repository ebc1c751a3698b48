"""The local backend's wire: frames, operations, request shapes, fault points.

Every process talks to the broker over a Unix stream socket of its own.  A
frame is a 4-byte little-endian length and a msgpack array ``[op, queue, *fields]``;
the broker answers every request with one frame (a parked ``take``, a ``put``
on a full queue or an ack whose outputs find their queue full answers later;
``HELLO``, ``COST`` and ``UNPARK`` are never answered).  Task
messages travel as opaque ``bytes``: the broker decodes them only to split a
batch (a take that asks for fewer tasks, a dead consumer's batch).

Each operation (:class:`Op`) has one request shape, a named tuple whose fields
are checked by :func:`parse` before the broker applies anything: a malformed
request (garbage bytes, an unknown operation, a field of the wrong type) is a
:class:`BadRequest`, and the broker drops that one connection.

Fault points (tests only).  ``PCQ_TEST_PAUSE_AT=<point>`` — read once, at
import — makes a process stop itself (SIGSTOP) in the middle of that step of
the protocol, so a test can SIGKILL it exactly there:

``take``       the take request sent, the reply half read (the broker leased it;
               with read-ahead, the lease taken ahead);
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
    UNPARK = 23


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
    #: Read-ahead: a lease for later, started only once every other lease this
    #: connection holds is settled; never parked, never a sentinel nor a suspect,
    #: and handed back with no death counted if the connection dies first.
    ahead: bool


class Ack(NamedTuple):
    """Settle lease ``lease_id``; with ``to``, put ``outputs`` (holding ``counts``
    tasks each) on queue ``to`` in the same step.  While ``to`` is full the
    whole request waits in the broker, as a put does, its lease still in
    flight; an ``UNPARK`` from the same connection (its consumer is stopping)
    lets it through over the bound."""

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
    ahead: bool  # as in Take


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


# Field kinds: the types a field may have (an ``int`` field takes a bool too),
# and for a list, a check of its elements.  parse() checks a request's fields
# against its shape's kinds in one C-level pass, then the elements of the lists
# that are not empty: about a microsecond a request on the hot path.
NONE = type(None)
INT: tuple[type, ...] = (int,)
OPT_INT: tuple[type, ...] = (NONE, int)
OPT_NUM: tuple[type, ...] = (NONE, int, float)
OPT_STR: tuple[type, ...] = (NONE, str)
BOOL: tuple[type, ...] = (bool,)
LIST: tuple[type, ...] = (list,)

Check = Callable[[list[Any]], bool]


def _blobs(v: list[Any]) -> bool:
    return set(map(type, v)) == {bytes}


def _ints(v: list[Any]) -> bool:
    return set(map(type, v)) == {int}


def _retries(v: list[Any]) -> bool:
    return all(type(r) is list and len(r) == 2 and type(r[0]) is bytes
               and type(r[1]) in (int, float) for r in v)


class Spec(NamedTuple):
    """How :func:`parse` checks one operation's requests."""

    op: Op
    shape: Any  # the request's named tuple
    kinds: tuple[tuple[type, ...], ...]  # each field's types
    lists: tuple[tuple[int, Check], ...]  # (field index, element check)
    list_indexes: tuple[int, ...]  # where the lists are (empty ones need no check)


def _spec(op: Op, shape: Any, *fields: tuple[tuple[type, ...], Check | None]) -> Spec:
    kinds = tuple(kind for kind, _ in fields)
    lists = tuple((i, check) for i, (_, check) in enumerate(fields) if check is not None)
    return Spec(op, shape, kinds, lists, tuple(i for i, _ in lists))


_ACK: tuple[tuple[tuple[type, ...], Check | None], ...] = (
    (INT, None), (INT, None), (INT, None), (LIST, _retries), (LIST, _blobs), (LIST, _blobs),
    (INT, None), (OPT_STR, None), (LIST, _blobs), (LIST, _ints))
_PID = ((INT, None),)

#: Each operation's request shape and how its fields are checked.
SPECS: dict[int, Spec] = {spec.op: spec for spec in (
    _spec(Op.HELLO, Hello, *_PID),
    _spec(Op.PUT, Put, (LIST, _blobs), (INT, None)),
    _spec(Op.TAKE, Take, (INT, None), (OPT_NUM, None), (BOOL, None)),
    _spec(Op.ACK, Ack, *_ACK),
    _spec(Op.ACK_TAKE, AckTake, *_ACK, (INT, None), (OPT_NUM, None), (BOOL, None)),
    _spec(Op.ATTACH_CONSUMER, AttachConsumer, (OPT_INT, None), (OPT_INT, None)),
    _spec(Op.DETACH_CONSUMER, Nothing),
    _spec(Op.ATTACH_PRODUCER, Producer, (OPT_STR, None)),
    _spec(Op.DETACH_PRODUCER, DetachProducer, (OPT_STR, None), (BOOL, None)),
    _spec(Op.CLOSE, Nothing),
    _spec(Op.COUNTERS, Nothing),
    _spec(Op.COST, Cost, (INT, None)),
    _spec(Op.COST_NOW, Nothing),
    _spec(Op.REAP, Nothing),
    _spec(Op.EVICT, Pid, *_PID),
    _spec(Op.KILLING, Pid, *_PID),
    _spec(Op.SEIZED, Pid, *_PID),
    _spec(Op.SETTLE, Settle, *_PID, (INT, None), *_ACK[1:7]),
    _spec(Op.RELEASE, Pid, *_PID),
    _spec(Op.DEAD_LETTERS, Limit, (INT, None)),
    _spec(Op.REQUEUE_DEAD, Nothing),
    _spec(Op.PURGE_DEAD, Nothing),
    _spec(Op.PURGE, Nothing),
    _spec(Op.UNPARK, Nothing),
)}


def request(op: Op, queue: str, *fields: Any) -> bytes:
    """The frame of a request: ``fields`` in the order of ``op``'s shape."""
    # As a plain int: msgpack packs an int subclass on a path 4x slower.
    return frame([int(op), queue, *fields])


def parse(raw: bytes | memoryview) -> tuple[Op, str, Any]:
    """A request frame's payload as (operation, queue name, request shape);
    BadRequest for anything else."""
    try:
        decoded = unpack(raw)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadRequest(f"not a msgpack frame ({type(exc).__name__})") from None
    if type(decoded) is not list or len(decoded) < 2:
        raise BadRequest("not a request")
    spec = SPECS.get(decoded[0]) if type(decoded[0]) is int else None
    if spec is None:
        raise BadRequest(f"unknown operation {decoded[0]!r}")
    name, fields = decoded[1], decoded[2:]
    if (type(name) is not str or len(fields) != len(spec.kinds)
            or not all(map(isinstance, fields, spec.kinds))):
        raise BadRequest(f"malformed {spec.op.name} request")
    if any(map(fields.__getitem__, spec.list_indexes)):
        for i, check in spec.lists:
            if fields[i] and not check(fields[i]):
                raise BadRequest(f"malformed {spec.op.name} request")
    # The fields' count and kinds are checked: build the shape without _make's
    # Python-level length check (the hot path's cost is per request).
    return spec.op, name, tuple.__new__(spec.shape, fields)


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
