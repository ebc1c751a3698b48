"""Two Redis moves that repair rather than run: a supervisor failing the task a
killed consumer was running past its timeout, and dead letters put back in
ready.  Both end in one script (``ack.lua``, ``requeue.lua``) whose checks make
them safe against a reap or a second caller."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import redis

from pcq.backends.base import Failure, Queue
from pcq.backends.redis_registry import Receipt
from pcq.envelope import Envelope, decode_dead, encode_envelope, envelope_from_dead

if TYPE_CHECKING:
    from pcq.backends.redis import RedisQueue

#: Dead letters read per requeue step.
REQUEUE_CHUNK = 500


def fail_running(q: RedisQueue, pid: int, task_id: str,
                 failure: Callable[[Envelope], Failure]) -> bool:
    """Find task ``task_id`` in the in-flight (or landing) list of the dead
    process ``pid`` and acknowledge it there, as that consumer would have, with
    ``failure(envelope)``; the other tasks of its message go back unstarted
    (those the consumer ran before it run again: at least once)."""
    prefix = f"{socket.gethostname()}:{pid}:".encode()
    k = q.keys

    def lists(client: redis.Redis) -> list[tuple[str, list[bytes]]]:
        members = cast("list[bytes]", client.zrange(k.consumer_beats, 0, -1))
        ids = [m.decode() for m in members if m.startswith(prefix)]
        # a landed message is in flight too (ack.lua absorbs it first)
        return [(i, cast("list[bytes]", client.lrange(k.landing(i), 0, -1))
                 + cast("list[bytes]", client.lrange(k.inflight(i), 0, -1))) for i in ids]

    for consumer, messages in q._link.call(lists):
        for message in messages:
            lease = Queue._lease(q, [message], Receipt(consumer, [message]))
            envs = list(lease.envelopes())
            running = [env for env in envs if env.id == task_id]
            if running:
                others = [env for env in envs if env.id != task_id]
                outcome = q._outcome(lease, [failure(running[0])], others)
                token = f"s{os.getpid()}.{q._token()}"  # not the consumer's own
                call = q._ack_call(lease.receipt, outcome, token, by="supervisor")
                return int(q._link.run("ack", *call, durable=True)[0]) == 1
    return False


def requeue_dead(q: RedisQueue) -> int:
    """Put every dead-lettered task back in ready with its attempts reset.

    A requeued task is pending again and no longer counted failed (``produced``
    is unchanged: it was produced once).  It goes to the consumer end of ready,
    as a retry does, so on a closed queue consumers handle it before they stop.
    Letters that hold no task — the raw bytes of an undecodable message — stay
    in dead.
    """
    k = q.keys
    total = int(q._link.call(lambda client: client.llen(k.dead)))
    seen = requeued = 0
    while seen < total:
        letters = q._read_dead(min(REQUEUE_CHUNK, total - seen))
        if not letters:
            break
        fresh: list[bytes] = []
        kept: list[bytes] = []
        for letter in letters:
            env = envelope_from_dead(decode_dead(letter))
            if env is None:
                kept.append(letter)
            else:
                fresh.append(encode_envelope(env))
        fresh.reverse()  # the oldest letter ends rightmost: taken first
        args = [len(letters), len(fresh), len(kept), *letters, *fresh, *kept]
        n = int(q._run("requeue", args))
        if n >= 0:  # -1: dead changed under us; read it again
            seen += len(letters)
            requeued += n
    return requeued
