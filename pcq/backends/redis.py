"""The Redis backend: a queue is a family of keys on one Redis server (the
layout, each script's keys and take.lua's statuses are in
:mod:`pcq.backends.redis_keys`; registrations, heartbeats and closing in
:mod:`pcq.backends.redis_registry`; the connection in
:mod:`pcq.backends.redis_link`; a killed consumer's task and dead letters
in :mod:`pcq.backends.redis_repair`).  This module holds the queue's moves.

Each move that must be atomic is one Lua script in a ``.lua`` file beside this
module; each file opens with the keys it touches and the race it prevents:
``put`` (push + count pending), ``take`` (ready -> in flight, stopping after a
sentinel; adopts whatever lies in the consumer's in-flight list that it does
not hold), ``ack`` (check the lease, remove it, apply its outcome, once per
token), ``close`` (one sentinel per live consumer; the last producer out
closes), ``attach`` (producer registration, reopening a closed queue),
``heartbeat``, ``reap`` (dead consumers' tasks back to ready, or to suspects),
``killing``, ``counters``, ``purge``, ``requeue``.  Every script checks the
queue's marker first: a FLUSHDB or an eviction is
:class:`~pcq.errors.QueueDataLost`, never a quiet success.

A busy consumer acknowledges a lease and takes the next in one round trip: the
``ack`` and ``take`` calls go out in one pipeline (``ack_and_take``).

A list element is a message that holds a batch of tasks (what one put call
sent), so a put, a take and an ack cost per batch what they cost per task
before; the scripts count tasks, not elements (``queued`` in the counters
hash), cut a message when a take wants fewer tasks than it holds, and cut a
dead consumer's messages into one task each as they become suspects
(``lib/batches.lua``).

Blocking without polling: an idle consumer waits in ``BLMOVE ready
landing:<me>`` and runs the message it wakes for at once, one hop from the put
(take, ack and reap first count a landed message into flight: see take.lua);
a producer held back by ``maxsize``, or a stage whose next queue is full, waits
in ``BLPOP space`` for the token that ``take`` pushes when it frees room below
the ``maxsize`` left in ``full``.  Both waits are capped (a
second or less), so an idle consumer also reaps, and a lost token costs a moment,
not a hang.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgpack
import redis

from pcq.backends import redis_repair
from pcq.backends.base import (
    MAX_BATCH,
    TARGET_BATCH_SECONDS,
    Failure,
    Lease,
    Outcome,
    PutInterrupted,
    Queue,
)
from pcq.backends.redis_keys import REGISTRY, Keys, TakeStatus, check_name, key
from pcq.backends.redis_registry import DEFAULT_URL, Receipt, Registered
from pcq.envelope import (
    SENTINEL_PREFIX,
    TASKS_HEAD,
    Envelope,
    Sentinel,
)
from pcq.errors import ConfigError

__all__ = ["DEFAULT_URL", "REGISTRY", "Keys", "RedisQueue", "check_name", "key"]

#: Messages per put script call; larger puts are pipelined in chunks of this size.
PUT_CHUNK = 1024
#: Longest a producer held back by maxsize waits for a wake-up token (s).
SPACE_WAIT = 0.25
#: The same for a stage whose next queue is full: take.lua leaves one token,
#: so a stage's other consumers waiting there ask again after this long.
ROOM_WAIT = 0.05


def _runs_at_once(message: bytes, want: int) -> bool:
    """Whether a message an idle wait landed is run as it is: a message of
    tasks, no more than wanted — read from its header alone (the lease decodes
    the bodies).  A sentinel (whose epoch take.lua judges), a larger batch
    (which take.lua cuts) or anything else goes through take.lua."""
    if not message.startswith(TASKS_HEAD):
        return False
    header = msgpack.Unpacker()
    header.feed(message)
    try:
        header.read_array_header()
        for _ in range(6):  # magic, kind, tag, seq, attempts, enqueued_at
            header.skip()
        count = int(header.read_array_header())
    except Exception:  # garbage: take.lua hands it out, and the lease dead-letters it
        return False
    return 0 < count <= want


def _batch_id() -> str:
    """An id for one put call, which put.lua remembers for the run (a resend of
    the same call pushes nothing)."""
    return os.urandom(8).hex()

class RedisQueue(Registered):
    """A queue on a Redis server (see the module docstring for its keys).

    ``client`` — a ``redis.Redis`` (``fakeredis.FakeRedis`` in tests) used as is
    instead of connecting to ``url``.  ``heartbeat_ttl`` — a consumer or producer
    that has not sent a heartbeat (every ``ttl/3`` s, from a daemon thread) for
    this long is dead: its tasks are reaped, it does not count as live.
    ``retry_for`` — how long after the first failure of an outage operations
    stop retrying and raise :class:`~pcq.errors.BackendLost` (``--reconnect-timeout``).
    ``read_only`` — for commands that only look (``pcq status``, ``pcq dead
    list``): the connection does not create the queue's marker, so looking at a
    queue that does not exist leaves nothing behind.

    The consumer registration belongs to the process that made it; a copy of this
    object in another process starts unattached.  Producer registrations travel
    with the object (a child may detach what its parent attached, last in first
    out), but a process heartbeats only the producers it attached itself.
    """

    backend = "redis"
    one_message_per_batch = True
    multiple_leases = True  # ack.lua finds a lease anywhere in the in-flight list

    # ------------------------------------------------------------------ processes

    # ------------------------------------------------------------------ producing

    def batch_limit(self) -> int:
        """As on the local backend: a message holds about TARGET_BATCH_SECONDS of
        the consumers' work (one task until a consumer has reported), so a
        bounded queue's ready passes maxsize by that much work at most, and a
        message of slow tasks is never the one batch every consumer waits on."""
        self._here()
        if self._cost_ns is None:
            counters = self.keys.counters
            cost = self._link.call(lambda client: client.hget(counters, "cost_ns"))
            self._cost_ns = int(cost or 0)
        if self._cost_ns <= 0:
            return 1
        return max(1, min(MAX_BATCH, int(TARGET_BATCH_SECONDS * 1e9 / self._cost_ns)))

    def note_task_cost(self, seconds_per_task: float) -> None:
        self._here()
        self._cost_report = max(1, int(seconds_per_task * 1e9))
        self._cost_ns = None  # a stage's consumer puts too: ask before its next batch

    def _put(self, messages: list[bytes], tasks: int) -> None:
        # put.lua counts the tasks each message holds (tasks == 0 only for a
        # test's foreign messages, which are not pending).
        each = 1 if tasks else 0
        if self.maxsize > 0:
            self._put_bounded(messages, each)
        else:
            # One pipeline of chunks, each atomic on its own and carrying an id, so
            # sending them all again after a lost reply puts each once (put.lua).
            keys = self._keys("put")
            calls = [("put", keys, [0, each, _batch_id(), *messages[i : i + PUT_CHUNK]])
                     for i in range(0, len(messages), PUT_CHUNK)]
            replies = self._link.call(lambda client: self._link.pipelined(client, calls))
            self._cost_ns = int(replies[-1][1])

    def _put_bounded(self, messages: list[bytes], each: int) -> None:
        # put.lua pushes only what fits under maxsize; when nothing fits it leaves
        # `full` for take.lua, which answers with a token on `space` once it frees
        # room.  Waiting is one BLPOP, not a polling loop.
        at = 0
        while at < len(messages):
            if self._interrupted:  # checked before every push: nothing more goes in
                raise PutInterrupted
            chunk = messages[at : at + PUT_CHUNK]
            args = [self.maxsize, each, _batch_id(), *chunk]
            pushed, cost = self._run("put", args, durable=True)
            self._cost_ns = int(cost)
            at += int(pushed)
            if not pushed:
                self._link.call(self._wait_for_space)

    def _wait_for_space(self, client: redis.Redis, seconds: float | None = None) -> Any:
        return client.blpop([self.keys.space], timeout=SPACE_WAIT if seconds is None else seconds)

    def wait_for_room(self, stop: Callable[[], bool] = lambda: False) -> None:
        """A stage waits here before its ack puts outputs on this queue: while
        maxsize tasks or more are ready, in one BLPOP for the token take.lua
        leaves once it frees room (room.lua), not in a polling loop."""
        if self.maxsize <= 0:
            return
        while not stop() and not int(self._run("room", [self.maxsize])):
            self._link.call(lambda client: self._wait_for_space(client, ROOM_WAIT))

    # ------------------------------------------------------------------ consuming

    def _take(self, max_tasks: int, timeout: float | None) -> tuple[list[bytes], Any] | None:
        me = self._me()
        want = max(1, min(max_tasks, MAX_BATCH))
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._wait_for_tasks(me, want, deadline, self._take_once(me, want))

    def _me(self) -> str:
        self._here()
        if self._consumer_id is None:
            raise RuntimeError("call attach_consumer() before take()")
        return self._consumer_id

    def _wait_for_tasks(
        self, me: str, want: int, deadline: float | None, taken: tuple[int, int, list[bytes]]
    ) -> tuple[list[bytes], Any] | None:
        """What a take.lua call found (``taken``), or else wait and take again
        until ``deadline``."""
        while True:
            status, wait_ms, messages = taken
            if messages:
                receipt = Receipt(me, messages, wait_ms if status == TakeStatus.SUSPECT else 0)
                self._holding.append(receipt)
                return messages, receipt
            if status == TakeStatus.DRAINED and self._epoch >= self._serves and self.reap():
                # closed and empty, but dead consumers' tasks were waiting to be reaped
                taken = self._take_once(me, want)
                continue
            if self._run_is_over(status, wait_ms):
                return [self._sentinel], Receipt(me, [])  # made up: nothing in flight
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            pause = min(left, self.reap_interval, wait_ms / 1000 if wait_ms >= 0 else math.inf)
            pause = max(pause, 0.001)  # BLMOVE's 0 would mean "for ever"
            landed = None
            if status == TakeStatus.SENTINEL_WAITS:
                time.sleep(pause)  # only a sentinel is ready: wait for the retries due
            else:
                landed = self._link.call(self._blmove(me, pause))
            if landed is not None and _runs_at_once(landed, want):
                # one hop from the put: the message is ours in landing:<me>, and
                # ack.lua (or the next take) counts it into flight first
                receipt = Receipt(me, [landed])
                self._holding.append(receipt)
                return [landed], receipt
            self._reap_now_and_then()
            taken = self._take_once(me, want)

    def _take_args(self, me: str, want: int, token: str = "") -> list[Any]:
        held = [m for receipt in self._holding for m in receipt.messages]
        head = [want, len(held), self._epoch, self._sentinel, SENTINEL_PREFIX, me, self._ttl_ms]
        return [*head, token, *held]

    def _take_once(self, me: str, want: int) -> tuple[int, int, list[bytes]]:
        while True:
            # What we hold is read once: a retry after a lost reply sends the same,
            # so take.lua adopts what the lost call moved instead of stranding it.
            args = self._take_args(me, want)
            taken = self._taken(self._run("take", args, me=me))
            if taken is not None:
                return taken

    def _taken(self, reply: list[Any]) -> tuple[int, int, list[bytes]] | None:
        """(status, wait_ms, messages) of a take.lua reply; None when nothing was
        done and the caller must call again (the epoch moved on, or the ack it
        waited for is not there)."""
        status, epoch, wait_ms, _, *messages = reply
        if status == TakeStatus.NEW_EPOCH:
            self._set_epoch(epoch)
            return None
        return None if status == TakeStatus.ACK_MISSING else (int(status), int(wait_ms), messages)

    def _blmove(self, me: str, seconds: float) -> Callable[[redis.Redis], Any]:
        """Wait for one message, which lands in our landing list: ours from then
        on, in flight as far as a reap is concerned (see take.lua), so a reply
        lost on the way strands nothing."""
        ready, landing = self.keys.ready, self.keys.landing(me)

        def op(client: redis.Redis) -> Any:
            # Redis >= 6 takes a fractional timeout; redis-py's hint says int.
            return client.blmove(ready, landing, seconds, "RIGHT", "LEFT")  # type: ignore[arg-type]

        return op

    def _reap_now_and_then(self) -> None:
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + self.reap_interval
            self.reap()

    def _sentinel_is_current(self, sentinel: Sentinel) -> bool:
        return sentinel.epoch == max(self._epoch, self._serves)

    def _lease(self, messages: list[bytes], receipt: Any) -> Lease:
        lease = super()._lease(messages, receipt)
        lease.deaths = receipt.deaths
        return lease

    def _ack(self, lease: Lease, outcome: Outcome, target: Keys | None = None) -> None:
        self._here()
        receipt = self._receipt(lease)
        if not receipt.messages:
            return  # a sentinel made up for a drained queue: nothing is in flight
        self._let_go(receipt)
        call = self._ack_call(receipt, outcome, self._token(), target)
        applied, _ = self._link.run("ack", *call, durable=True)
        self._note_ack(applied)
        self.ack_applied = int(applied) != 0

    def _token(self) -> str:
        """A token unique to one ack of this consumer (see ack.lua)."""
        self._acks += 1
        return str(self._acks)

    def _let_go(self, receipt: Receipt) -> None:
        """``receipt``'s lease is being acknowledged: we no longer hold it."""
        for i, held in enumerate(self._holding):
            if held is receipt:
                del self._holding[i]
                return

    def _note_ack(self, code: int) -> None:
        if int(code) == 0:  # ack.lua: the lease was reaped before this ack came
            self.stale_leases += 1

    def _ack_out(self, lease: Lease, outcome: Outcome, to: Queue) -> None:
        self._ack(lease, outcome, self._target(to))

    def _target(self, to: Queue | None) -> Keys | None:
        """The keys of ``to``, a stage's target queue, which ack.lua writes to:
        it must be on this server (one script runs on one server)."""
        if to is None:
            return None
        self._check_target(to)
        assert isinstance(to, RedisQueue)
        if not self._link.same_slot(to._link):
            raise ConfigError(f"a stage's queues must be on one Redis server (in a Cluster, in "
                              f"one slot: give them one hash tag, e.g. {{{self.name}}}.2), not "
                              f"{self._link.where} and {to._link.where} ({to.name!r})")
        return to.keys

    @staticmethod
    def _receipt(lease: Lease) -> Receipt:
        if not isinstance(lease.receipt, Receipt):
            raise ValueError("this lease was not taken from a Redis queue")
        return lease.receipt

    def _ack_call(
        self, receipt: Receipt, outcome: Outcome, token: str, target: Keys | None = None,
        by: str = "",
    ) -> tuple[list[str], list[Any]]:
        """ack.lua's keys and arguments; made once, so a retry sends the same."""
        retry: list[Any] = []
        for message, delay in outcome.retry:  # a unique prefix keeps equal retries apart
            retry += [max(0, round(delay * 1000)), os.urandom(8) + message]
        head: list[Any] = [len(receipt.messages), len(outcome.retry), len(outcome.dead)]
        head += [len(outcome.give_back), outcome.done, outcome.failed, receipt.consumer, token]
        outputs: list[bytes] = []
        extra: list[str] = []
        if target is not None and outcome.outputs:
            extra = [target.ready, target.counters, target.closed, target.epoch]
            outputs = outcome.outputs
        cost, self._cost_report = self._cost_report, 0  # it rides on this ack
        head += [len(outputs), outcome.output_tasks if outputs else 0, by, cost]
        args = [*head, *receipt.messages, *retry, *outcome.dead, *reversed(outcome.give_back)]
        return self._keys("ack", receipt.consumer, extra), [*args, *outputs]

    def ack_and_take(
        self,
        lease: Lease,
        failures: Sequence[Failure] = (),
        give_back: Sequence[Envelope] = (),
        max_tasks: int = 1,
        timeout: float | None = None,
        outputs: Sequence[Any] = (),
        to: Queue | None = None,
    ) -> Lease | None:
        """:meth:`ack`, then :meth:`take`, in one round trip while tasks are ready.

        ack.lua and take.lua go out in one pipeline.  The ack carries a token that
        it records beside its result; take.lua moves nothing unless it finds that
        token, and adopts whatever lies in our in-flight list that we do not hold.
        So if the connection drops, sending both again is safe: a repeated ack is
        a no-op, a take whose reply was lost is adopted, and a take never runs
        without its ack.  Only when nothing was ready does it wait, as take does.
        """
        me = self._me()
        receipt = self._receipt(lease)
        target = self._target(to)
        outcome = self._outcome(lease, failures, give_back, outputs, to)
        if not receipt.messages or receipt.consumer != me:
            # Nothing in flight (a made-up sentinel) or a lease of an earlier
            # registration: no in-flight list to carry over, take as usual.
            self.ack_applied = True
            self._ack(lease, outcome, target)
            return self.take(max_tasks, timeout)
        want = max(1, min(max_tasks, MAX_BATCH))
        deadline = None if timeout is None else time.monotonic() + timeout
        self._let_go(receipt)
        token = self._token()
        ack = self._ack_call(receipt, outcome, token, target)
        take = self._keys("take", me), self._take_args(me, want, token)
        acked, reply = self._link.call(lambda client: self._ack_then_take(client, ack, take))
        self.ack_applied = int(acked[0]) != 0  # 2: a repeat after a lost reply, as the first
        taken = self._taken(reply)
        if taken is None:  # a new epoch, or a reap removed the ack's token: take again
            taken = self._take_once(me, want)
        got = self._wait_for_tasks(me, want, deadline, taken)
        return None if got is None else self._lease(*got)

    def _ack_then_take(
        self,
        client: redis.Redis,
        ack: tuple[list[str], list[Any]],
        take: tuple[list[str], list[Any]],
    ) -> tuple[list[Any], list[Any]]:
        """Run ack.lua then take.lua in one pipeline (not a transaction: each script
        is atomic, and take.lua checks the ack ran); both replies.  A script the
        server lost (it restarted) is loaded and both are sent again: safe, as a
        retry after a lost reply is."""
        replies = self._link.pipelined(client, [("ack", *ack), ("take", *take)])
        self._note_ack(replies[0][0])
        return cast("list[Any]", replies[0]), cast("list[Any]", replies[1])

    # ------------------------------------------------------------------ lifecycle

    def sibling(self, name: str, *, maxsize: int = 0) -> Queue:
        return RedisQueue(name, maxsize=maxsize, url=self.url, client=self._link.injected,
                          heartbeat_ttl=self.heartbeat_ttl, retry_for=self._link.retry_for,
                          max_deliveries=self.max_deliveries, read_only=self.read_only)

    def fail_running(
        self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]
    ) -> bool:
        """Acknowledge task ``task_id`` of the dead consumer process ``pid`` as it
        would have, with ``failure(envelope)`` (see :mod:`~pcq.backends.redis_repair`)."""
        return redis_repair.fail_running(self, pid, task_id, failure)

    # ------------------------------------------------------------------ dead letters

    def requeue_dead(self) -> int:
        """Put every dead-lettered task back in ready with its attempts reset
        (see :func:`~pcq.backends.redis_repair.requeue_dead`)."""
        return redis_repair.requeue_dead(self)

    def purge(self) -> int:
        return int(self._run("purge", [self.keys.inflight_prefix, self.keys.landing_prefix]))
