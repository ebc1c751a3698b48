"""How :class:`pcq.JoinableQueue` turns the objects users put into task bodies.

The queue below carries msgpack task bodies (``pcq.envelope``); a drop-in for
``multiprocessing.JoinableQueue`` must carry what users put in that one.  Two
codecs, chosen by backend:

``pickle`` (local)
    What the standard library's queue does, with the same trust boundary: the
    broker's socket lives in a mode-0700 directory of the user who opened the
    queue, so only that user's own processes — which could already run code in
    each other — can put a message on it.  Any picklable object travels, and
    comes back as what it was.
``msgpack`` (Redis)
    Never pickle: a Redis server is reached by other hosts and other users, and
    unpickling a message from it would let whoever can write there run code in
    every consumer.  Every msgpack value travels; tuples (namedtuples included)
    come back as plain tuples, also as map keys and nested, carried as msgpack
    extension ``TUPLE``.  A value with no tuple in it is the task body as it is,
    so ``pcq status`` and dead letters show it readably.  Anything else fails
    at ``put`` with :class:`~pcq.errors.SerializationError` naming its type.
"""

from __future__ import annotations

import pickle
from typing import Any

import msgpack

from pcq.errors import SerializationError

#: msgpack extension code of a tuple, its items packed as an array.
TUPLE = 1
#: msgpack extension code of a whole body that holds tuples somewhere inside.
WITH_TUPLES = 2

_ASIS: tuple[type[Any], ...] = (dict, list, str, bytes, int, float)  # subclasses: as these


def encode(obj: Any, codec: str) -> Any:
    """The task body that carries ``obj``; SerializationError if it cannot."""
    if codec == "pickle":
        try:
            return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling raises TypeError, PicklingError, AttributeError...
            raise SerializationError(
                f"cannot put an item of type {type(obj).__name__!r}: it cannot be pickled ({exc})"
            ) from exc
    return _to_msgpack(obj)


def decode(body: Any, codec: str) -> Any:
    """The object that :func:`encode` made ``body`` of."""
    if codec == "pickle":
        return pickle.loads(body)
    if isinstance(body, msgpack.ExtType) and body.code == WITH_TUPLES:
        return msgpack.unpackb(body.data, raw=False, strict_map_key=False, ext_hook=_ext_hook)
    return body


def _to_msgpack(obj: Any) -> Any:
    tuples = [False]

    def default(value: Any) -> Any:
        if isinstance(value, tuple):
            tuples[0] = True
            return msgpack.ExtType(TUPLE, pack(list(value)))
        for base in _ASIS:  # a str subclass, an IntEnum, an OrderedDict... as their base
            if isinstance(value, base):
                return base(value)
        raise TypeError(f"can not serialize {type(value).__name__!r} object")

    def pack(value: Any) -> bytes:  # a Packer of its own each time: it is not reentrant
        data: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=default)
        return data

    try:
        packed = pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(
            f"cannot put an item of type {type(obj).__name__!r} on a Redis queue: only "
            f"msgpack values travel there, never pickle ({exc})"
        ) from exc
    return msgpack.ExtType(WITH_TUPLES, packed) if tuples[0] else obj


def _ext_hook(code: int, data: bytes) -> Any:
    if code == TUPLE:
        return tuple(msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook))
    return msgpack.ExtType(code, data)
