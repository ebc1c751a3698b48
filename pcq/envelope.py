"""What travels through a queue, and the one place that encodes and decodes it.

Backends move opaque ``bytes``; only this module knows their layout.  Every
message is a msgpack array that starts with ``MAGIC`` and a kind:

``[MAGIC, TASKS, tag, seq, attempts, enqueued_at, [body, ...]]``
    One or more tasks that share a producer ``tag``, a first sequence number,
    an attempt count and an enqueue time.  Task ``i`` has the id
    ``f"{tag}-{seq + i}"``.  The local backend ships a whole batch as one
    message; the Redis backend stores one task per list element.
``[MAGIC, SENTINEL, epoch]``
    "Stop": one per live consumer, placed behind all tasks by ``close()``.  The
    epoch tells sentinels of an earlier run from those of this one.

A sentinel is its own kind, so any msgpack value — ``None`` included — is a
valid task body.  Pickle is never used: a queue writer must not be able to run
code in a consumer.  Dead letters are msgpack maps (see :func:`encode_dead`).
"""

from __future__ import annotations

import os
import reprlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from pcq.errors import DecodeError, SerializationError

MAGIC = 0x70  # 'p': cheap first check that a message is ours
TASKS = 0
SENTINEL = 1

#: The first bytes of every encoded sentinel (fixarray of 3, MAGIC, SENTINEL);
#: server-side scripts use it to stop a batch at a sentinel without decoding.
SENTINEL_PREFIX = bytes([0x93, MAGIC, SENTINEL])
#: The first bytes of every message of tasks (fixarray of 7, MAGIC, TASKS).
TASKS_HEAD = bytes([0x97, MAGIC, TASKS])


@dataclass(frozen=True, slots=True)
class Envelope:
    """One task: its body plus what the queue knows about it."""

    tag: str
    seq: int
    body: Any
    attempts: int = 0
    enqueued_at: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.tag}-{self.seq}"


@dataclass(frozen=True, slots=True)
class Batch:
    """Tasks decoded from one message; cheap to iterate, envelopes built on demand."""

    tag: str
    seq: int
    attempts: int
    enqueued_at: float
    bodies: list[Any]

    def envelope(self, index: int) -> Envelope:
        return Envelope(
            self.tag, self.seq + index, self.bodies[index], self.attempts, self.enqueued_at
        )

    def envelopes(self) -> list[Envelope]:
        return [self.envelope(i) for i in range(len(self.bodies))]


@dataclass(frozen=True, slots=True)
class Sentinel:
    """The stop message of close epoch ``epoch``."""

    epoch: int


def new_tag() -> str:
    """A producer tag: unique enough that ``tag-seq`` never repeats in practice."""
    return os.urandom(6).hex()


_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def _packb(obj: Any) -> bytes:
    data: bytes = _packer.pack(obj)
    return data


def _unencodable(bodies: Sequence[Any], exc: Exception) -> SerializationError:
    """The error for a batch that failed to encode, naming the first bad body's
    type; its ``index`` says how many bodies before it are fine."""
    for index, body in enumerate(bodies):
        try:
            _packb(body)
        except (TypeError, ValueError, OverflowError) as inner:
            error = SerializationError(
                f"cannot encode a task of type {type(body).__name__!r}: {inner}"
            )
            error.index = index
            return error
    return SerializationError(f"cannot encode tasks: {exc}")


#: Types msgpack always encodes (an int too, within 64 bits): a value of one of
#: them needs no trial encoding to be known to travel.
PLAIN = frozenset({type(None), bool, float, str, bytes})


def check_encodable(bodies: Sequence[Any]) -> None:
    """Raise SerializationError, naming the type, unless every body can travel."""
    try:
        for body in bodies:
            _packb(body)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unencodable(bodies, exc) from exc


def pack_value(value: Any) -> bytes:
    """``value`` packed on its own (pcq.map ships a chunk's results so: packed
    once by the worker, unpacked once by the caller).  SerializationError if it
    cannot travel."""
    try:
        return _packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode a value of type "
                                 f"{type(value).__name__!r}: {exc}") from exc


def unpack_value(raw: bytes) -> Any:
    """The value :func:`pack_value` packed."""
    return _unpack(raw)


def encode_tasks(
    tag: str,
    seq: int,
    bodies: Sequence[Any],
    attempts: int = 0,
    enqueued_at: float | None = None,
) -> bytes:
    """Encode ``bodies`` as one message.  Raises SerializationError naming the bad type."""
    when = time.time() if enqueued_at is None else enqueued_at
    try:
        return _packb([MAGIC, TASKS, tag, seq, attempts, when, bodies])
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unencodable(bodies, exc) from exc


def encode_each(tag: str, seq: int, bodies: Sequence[Any]) -> list[bytes]:
    """Encode every body as a message of its own (ids ``seq``, ``seq+1``, ...).

    The same bytes as ``encode_tasks(tag, seq + i, [body])``, built faster: a
    msgpack array is its header followed by its packed elements, so the parts
    every message shares are packed once and only ``seq`` and the body per task.
    """
    head = b"\x97" + _packb(MAGIC) + _packb(TASKS) + _packb(tag)  # fixarray of 7, 3 fields
    middle = _packb(0) + _packb(time.time()) + b"\x91"  # attempts, enqueued_at, fixarray of 1
    pack, join = _packer.pack, b"".join
    try:
        return [join((head, pack(s), middle, pack(body))) for s, body in enumerate(bodies, seq)]
    except (TypeError, ValueError, OverflowError) as exc:
        raise _unencodable(bodies, exc) from exc


def encode_envelope(env: Envelope) -> bytes:
    """Encode one task with its id, attempts and enqueue time preserved (retries)."""
    return encode_tasks(env.tag, env.seq, [env.body], env.attempts, env.enqueued_at)


def encode_sentinel(epoch: int) -> bytes:
    return _packb([MAGIC, SENTINEL, epoch])


def decode(raw: bytes) -> Batch | Sentinel:
    """Decode one message.  Raises DecodeError, with the reason, for anything else."""
    return _checked(_unpack(raw))


def _unpack(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"not msgpack: {exc}") from exc


def _checked(msg: Any) -> Batch | Sentinel:
    """The message ``msg`` (unpacked) holds, after every check; DecodeError if none."""
    if not isinstance(msg, list) or len(msg) < 3 or msg[0] != MAGIC:
        raise DecodeError("not a pcq envelope (no pcq header)")
    kind = msg[1]
    if kind == TASKS and len(msg) == 7:
        _, _, tag, seq, attempts, when, bodies = msg
        if (
            isinstance(tag, str)
            and isinstance(seq, int)
            and isinstance(attempts, int)
            and isinstance(when, (int, float))
            and isinstance(bodies, list)
        ):
            return Batch(tag, seq, attempts, float(when), bodies)
    elif kind == SENTINEL and len(msg) == 3 and isinstance(msg[2], int):
        return Sentinel(msg[2])
    raise DecodeError(f"malformed pcq envelope (kind {kind!r}, {len(msg)} fields)")


class Decoded(NamedTuple):
    """What :func:`decode_many` found, in message order within each list."""

    batches: list[Batch]
    sentinels: list[Sentinel]
    bad: list[tuple[bytes, str]]  # (message, why it was refused)


def decode_many(raws: Iterable[bytes]) -> Decoded:
    """Decode ``raws`` as :func:`decode` decodes each, merging consecutive task
    messages that continue one another — same tag, attempts and enqueue time,
    the next sequence number — into one :class:`Batch`.

    A take may return many messages from a few producer runs (single-task
    retries, suspects, a dead consumer's batch cut into one message a task); merged,
    they cost one Batch, not one each,
    and every envelope is what the message alone would give.  A message exactly as
    the encoders write it is checked by exact types and merged inline; anything
    else takes :func:`decode`'s path, checks, error messages and all.
    """
    batches: list[Batch] = []
    sentinels: list[Sentinel] = []
    bad: list[tuple[bytes, str]] = []
    # The batch being merged: its fields, its bodies, the seq that would extend it.
    run: list[Any] | None = None
    tag, seq, attempts, when, follows = "", 0, 0, 0.0, 0
    unpackb = msgpack.unpackb
    for raw in raws:
        try:
            msg = unpackb(raw, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            bad.append((raw, f"not msgpack: {exc}"))
            continue
        if type(msg) is list and len(msg) == 7:
            magic, kind, t, s, a, w, b = msg
            if (
                magic == MAGIC
                and kind == TASKS
                and type(t) is str
                and type(s) is int
                and type(a) is int
                and type(w) is float
                and type(b) is list
            ):
                if s == follows and run is not None and t == tag and a == attempts and w == when:
                    run += b
                else:
                    if run is not None:
                        batches.append(Batch(tag, seq, attempts, when, run))
                    run, tag, seq, attempts, when, follows = b, t, s, a, w, s
                follows += len(b)
                continue
        # Not a plain task message: a sentinel, an unusual but valid task, or garbage.
        try:
            found = _checked(msg)
        except DecodeError as exc:
            bad.append((raw, str(exc)))
            continue
        if run is not None:
            batches.append(Batch(tag, seq, attempts, when, run))
            run = None
        if isinstance(found, Batch):
            batches.append(found)
        else:
            sentinels.append(found)
    if run is not None:
        batches.append(Batch(tag, seq, attempts, when, run))
    return Decoded(batches, sentinels, bad)


def encode_dead(
    env: Envelope | None, error: str, traceback: str = "", raw: bytes | None = None
) -> bytes:
    """A dead letter: the task (or the raw bytes that could not be decoded) and why.

    ``env`` is the task as its last, failed attempt took it; the letter's
    ``attempts`` counts the attempts made, that one included ("attempt 2/2" in
    the consumer's log is ``"attempts": 2`` here).
    """
    record: dict[str, Any] = {"error": error, "traceback": traceback, "failed_at": time.time()}
    if env is not None:
        record.update(
            id=env.id,
            tag=env.tag,
            seq=env.seq,
            body=env.body,
            attempts=env.attempts + 1,
            enqueued_at=env.enqueued_at,
        )
    if raw is not None:
        record["raw"] = raw
    return _packb(record)


def short_repr(body: Any, width: int = 60) -> str:
    """A task body as a person reads it in a log line: its repr, cut to ``width``."""
    text = _repr.repr(body)
    return text if len(text) <= width else text[: width - 3] + "..."


_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def decode_dead(raw: bytes) -> dict[str, Any]:
    """Decode a dead letter written by :func:`encode_dead` (garbage becomes ``{"raw": ...}``)."""
    try:
        record = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:
        return {"error": "unreadable dead letter", "raw": raw}
    if not isinstance(record, dict):
        return {"error": "unreadable dead letter", "raw": raw}
    return record


def envelope_from_dead(record: dict[str, Any]) -> Envelope | None:
    """The task a dead letter holds, ready to be requeued with its attempts reset."""
    if "tag" not in record or "seq" not in record:
        return None
    return Envelope(str(record["tag"]), int(record["seq"]), record.get("body"), 0, time.time())
