"""The Redis backend: a queue is a family of keys on one Redis server.

Every key is ``pcq:{NAME}:<part>`` (see :class:`Keys`); the ``{NAME}`` hash tag
keeps a queue in one Redis Cluster slot, which the Lua scripts need because they
also touch in-flight lists they find by name.  One task is one list element.
A name that holds a hash tag of its own (``{crawl}.parse``) keeps it instead —
``pcq:{crawl}.parse:<part>`` — so the queues of one pipeline, whose ack puts a
stage's outputs on the next queue in the same script, share one slot.

* ``ready`` — list; producers LPUSH, consumers take from the right.
* ``inflight:<consumer>`` — list per consumer, its newest take at the left.
* ``delayed`` — zset of retries scored by due time (server clock, ms).
* ``dead`` — list of dead letters (:func:`pcq.envelope.encode_dead`).
* ``counters`` — hash: ``produced``, ``pending``, ``done``, ``failed``, ``retried``.
* ``consumers`` / ``producers`` — hash id -> json info; ``…:beat`` — zset id ->
  heartbeat expiry.  A registration whose heartbeat expired is dead.
* ``closed`` (flag), ``epoch`` (close epoch), ``full`` / ``space`` (backpressure).
* ``acked`` — hash consumer id -> the token of its last ack sent together with a
  take (``ack_and_take``), so that resending the pair never applies the ack twice.
* ``feeds`` — the name of the queue a stage puts this queue's outputs on.
* ``suspects`` — list of tasks that were in flight in a consumer that died, each
  handed out alone; ``deaths`` — hash message -> how many consumers died with it
  in flight (poison tasks: see ``reap.lua``).
* ``pcq:queues`` (:data:`REGISTRY`, one key for the server) — a set of the
  names of every queue a producer or consumer attached to, or a stage fed
  (``pcq dashboard`` lists it instead of scanning keys); ``forget`` removes one.
* ``run`` — the queue's marker: a random value set by the first connection to
  the queue and checked by every later one (see :mod:`pcq.backends.redis_link`);
  gone or changed means the server lost the queue's data.

Each move that must be atomic is one Lua script in a ``.lua`` file beside this
module; each file opens with the keys it touches and the race it prevents:
``put`` (push + count pending), ``take`` (ready -> in flight, stopping after a
sentinel), ``ack`` (check the lease, remove it, apply its outcome), ``close`` (one
sentinel per live consumer; the last producer out closes), ``attach`` (producer
registration, reopening a closed queue), ``heartbeat``, ``reap`` (dead consumers'
tasks back to ready), ``counters``, ``purge``, ``requeue``.

A busy consumer acknowledges a lease and takes the next in one round trip: the
``ack`` and ``take`` calls go out in one pipeline (``ack_and_take``).

Blocking without polling: an idle consumer waits in ``BLMOVE ready -> in-flight``
(the next ``take`` adopts what it moved); a producer held back by ``maxsize``
waits in ``BLPOP space`` for the token that ``take`` pushes when it frees room
below the ``maxsize`` the producer left in ``full``.  Both waits are capped (a
second or less), so an idle consumer also reaps, and a lost token costs a moment,
not a hang.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import NoScriptError, RedisError

from pcq.backends.base import (
    MAX_BATCH,
    Counters,
    Failure,
    Lease,
    Outcome,
    PutInterrupted,
    Queue,
)
from pcq.backends.redis_link import Link
from pcq.envelope import (
    SENTINEL_PREFIX,
    Envelope,
    Sentinel,
    decode_dead,
    encode_envelope,
    encode_sentinel,
    envelope_from_dead,
)
from pcq.errors import ConfigError, PcqError

DEFAULT_URL = "redis://localhost:6379/0"
#: Messages per put script call; larger puts are pipelined in chunks of this size.
PUT_CHUNK = 1024
#: Longest a producer held back by maxsize waits for a wake-up token (s).
SPACE_WAIT = 0.25
#: Dead letters read per requeue step.
REQUEUE_CHUNK = 500
#: The set of every queue name in use on a server (outside any queue's hash tag).
REGISTRY = "pcq:queues"

# take.lua's statuses
_TAKEN, _NEW_EPOCH, _DRAINED, _SENTINEL_WAITS, _ACK_MISSING, _SUSPECT = 0, 1, 2, 3, 4, 5


def key(name: str, part: str) -> str:
    """The Redis key of ``part`` of queue ``name``: ``pcq:{name}:part``, or
    ``pcq:name:part`` when ``name`` holds its own hash tag (``{crawl}.parse``)."""
    return f"pcq:{name}:{part}" if "{" in name else f"pcq:{{{name}}}:{part}"


def _has_good_braces(name: str) -> bool:
    """No braces, or exactly one non-empty ``{tag}``: a Redis Cluster hash tag."""
    if "{" not in name and "}" not in name:
        return True
    if name.count("{") != 1 or name.count("}") != 1:
        return False
    return name.index("}") > name.index("{") + 1


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key of one queue (the parts are described in the module docstring)."""

    ready: str
    delayed: str
    dead: str
    counters: str
    closed: str
    epoch: str
    consumers: str
    consumer_beats: str
    producers: str
    producer_beats: str
    full: str
    space: str
    acked: str
    feeds: str
    suspects: str
    deaths: str
    run: str
    inflight_prefix: str

    @classmethod
    def of(cls, name: str) -> Keys:
        def k(part: str) -> str:
            return key(name, part)

        return cls(
            ready=k("ready"),
            delayed=k("delayed"),
            dead=k("dead"),
            counters=k("counters"),
            closed=k("closed"),
            epoch=k("epoch"),
            consumers=k("consumers"),
            consumer_beats=k("consumers:beat"),
            producers=k("producers"),
            producer_beats=k("producers:beat"),
            full=k("full"),
            space=k("space"),
            acked=k("acked"),
            feeds=k("feeds"),
            suspects=k("suspects"),
            deaths=k("deaths"),
            run=k("run"),
            inflight_prefix=k("inflight:"),
        )

    def inflight(self, consumer: str) -> str:
        return self.inflight_prefix + consumer


@dataclass(frozen=True, slots=True)
class _Receipt:
    """What ``ack`` needs to find a lease: whose in-flight list, which messages."""

    consumer: str
    messages: list[bytes]
    deaths: int = 0  # a suspect taken alone: consumers that died with it in flight


class _Heartbeat:
    """A daemon thread that calls ``beat`` every ``every`` seconds until stopped."""

    def __init__(self, beat: Callable[[], None], every: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(beat, every), name="pcq-heartbeat", daemon=True
        )
        self._thread.start()

    def _run(self, beat: Callable[[], None], every: float) -> None:
        while not self._stop.wait(every):
            with suppress(PcqError, RedisError):  # the server is away: beat again later
                beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class RedisQueue(Queue):
    """A queue on a Redis server (see the module docstring for its keys).

    ``client`` — a ``redis.Redis`` (``fakeredis.FakeRedis`` in tests) used as is
    instead of connecting to ``url``.  ``heartbeat_ttl`` — a consumer or producer
    that has not sent a heartbeat (every ``ttl/3`` s, from a daemon thread) for
    this long is dead: its tasks are reaped, it does not count as live.
    ``retry_for`` — how long after the first failure of an outage operations
    stop retrying and raise :class:`~pcq.errors.BackendLost` (``--reconnect-timeout``).

    The consumer registration belongs to the process that made it; a copy of this
    object in another process starts unattached.  Producer registrations travel
    with the object (a child may detach what its parent attached, last in first
    out), but a process heartbeats only the producers it attached itself.
    """

    backend = "redis"
    one_message_per_batch = False
    multiple_leases = True  # ack.lua finds a lease anywhere in the in-flight list

    def __init__(
        self,
        name: str = "default",
        *,
        maxsize: int = 0,
        url: str = DEFAULT_URL,
        client: redis.Redis | None = None,
        heartbeat_ttl: float = 5.0,
        retry_for: float = 60.0,
        max_deliveries: int = 3,
    ) -> None:
        if not name or not _has_good_braces(name):
            raise ConfigError(f"bad queue name {name!r}: it must be non-empty, with no braces "
                              "or one hash tag such as {crawl}.parse")
        if maxsize < 0:
            raise ConfigError(f"maxsize must be 0 (unbounded) or more, not {maxsize}")
        if heartbeat_ttl <= 0:
            raise ConfigError(f"heartbeat_ttl must be positive, not {heartbeat_ttl}")
        super().__init__(name, maxsize=maxsize, max_deliveries=max_deliveries)
        self.url = url
        self.heartbeat_ttl = heartbeat_ttl
        self.keep_alive_every = heartbeat_ttl / 3
        self.keys = Keys.of(name)
        self._link = Link(url, client, retry_for, marker=self.keys.run, what=f"queue {name}")
        self._producer_ids: list[str] = []
        self._interrupted = False  # set from a signal handler: a waiting put gives up
        self._fresh()

    # ------------------------------------------------------------------ processes

    def _fresh(self) -> None:
        """Reset what belongs to one process (again in a child, or after unpickling)."""
        self._pid = os.getpid()
        self._consumer_id: str | None = None
        self._consumer_info = ""
        self._held = 0  # length of our in-flight list as of our last take or ack
        self._acks = 0  # acks sent with a take: the last one's number is its token
        self._epoch = -1
        self._sentinel = b""
        self._serves = -1  # the run (epoch) this consumer serves; see join_run
        self._burst = False
        self._beat_ids: list[str] = []  # producers this process attached
        self._beat_lock = threading.Lock()
        self._heartbeat: _Heartbeat | None = None
        self._next_reap = 0.0

    def _here(self) -> None:
        if self._pid != os.getpid():
            self._fresh()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_beat_lock"], state["_heartbeat"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.heartbeat_ttl * 1000))

    def _set_epoch(self, epoch: int) -> None:
        # A consumer waiting for the next run obeys no sentinel of the finished one.
        self._epoch = int(epoch)
        self._sentinel = encode_sentinel(max(self._epoch, self._serves))

    @staticmethod
    def _new_id() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    def _info(self) -> str:
        host, pid, now = socket.gethostname(), os.getpid(), round(time.time(), 3)
        return json.dumps({"host": host, "pid": pid, "started": now, "ttl": self.heartbeat_ttl})

    # ------------------------------------------------------------------ producing

    def _put(self, messages: list[bytes], tasks: int) -> None:
        # One message is one task here (tasks == 0 only for a test's foreign
        # message), so put.lua counts the messages it pushes, or none.
        if tasks not in (0, len(messages)):
            raise ValueError(f"the Redis backend carries one task a message, not {tasks}")
        each = 1 if tasks else 0
        if self.maxsize > 0:
            self._put_bounded(messages, each)
        elif len(messages) <= PUT_CHUNK:
            self._link.run("put", self._put_keys(), [0, each, *messages])
        else:
            chunks = [messages[i : i + PUT_CHUNK] for i in range(0, len(messages), PUT_CHUNK)]
            self._link.call(lambda client: self._put_pipelined(client, chunks, each))

    def _put_keys(self) -> list[str]:
        k = self.keys
        return [k.ready, k.counters, k.closed, k.epoch, k.full, k.space]

    def _put_pipelined(self, client: redis.Redis, chunks: list[list[bytes]], each: int) -> None:
        # Each chunk is atomic on its own.  If the connection drops mid-pipeline the
        # whole pipeline runs again, so a chunk may be put twice (at-least-once),
        # but pending always matches what went into the list.
        script, keys = self._link.script("put"), self._put_keys()
        pipe = client.pipeline(transaction=False)
        for chunk in chunks:
            pipe.evalsha(script.sha, len(keys), *keys, 0, each, *chunk)
        results = pipe.execute(raise_on_error=False)
        for chunk, result in zip(chunks, results, strict=True):
            if isinstance(result, NoScriptError):  # the server restarted and forgot it
                script(keys=keys, args=[0, each, *chunk], client=client)
            elif isinstance(result, Exception):
                raise result

    def _put_bounded(self, messages: list[bytes], each: int) -> None:
        # put.lua pushes only what fits under maxsize; when nothing fits it leaves
        # `full` for take.lua, which answers with a token on `space` once it frees
        # room.  Waiting is one BLPOP, not a polling loop.
        at = 0
        while at < len(messages):
            if self._interrupted:  # checked before every push: nothing more goes in
                raise PutInterrupted
            chunk = messages[at : at + PUT_CHUNK]
            pushed = int(self._link.run("put", self._put_keys(), [self.maxsize, each, *chunk]))
            at += pushed
            if not pushed:
                self._link.call(self._wait_for_space)

    def _wait_for_space(self, client: redis.Redis) -> Any:
        return client.blpop([self.keys.space], timeout=SPACE_WAIT)

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
                return messages, _Receipt(me, messages, wait_ms if status == _SUSPECT else 0)
            if status == _DRAINED and self._epoch >= self._serves and self.reap():
                # closed and empty, but dead consumers' tasks were waiting to be reaped
                taken = self._take_once(me, want)
                continue
            if self._run_is_over(status, wait_ms):
                return [self._sentinel], _Receipt(me, [])  # made up: nothing in flight
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            pause = min(left, self.reap_interval, wait_ms / 1000 if wait_ms >= 0 else math.inf)
            pause = max(pause, 0.001)  # BLMOVE's 0 would mean "for ever"
            if status == _SENTINEL_WAITS:
                time.sleep(pause)  # only a sentinel is ready: wait for the retries due
            else:
                self._link.call(self._blmove(me, pause))
            self._reap_now_and_then()
            taken = self._take_once(me, want)

    def _take_keys(self, me: str) -> list[str]:
        k = self.keys
        keys = [k.ready, k.inflight(me), k.delayed, k.closed, k.epoch]
        return [*keys, k.consumer_beats, k.full, k.space, k.acked, k.suspects, k.deaths]

    def _take_args(self, me: str, want: int, held: int, token: str = "") -> list[Any]:
        return [want, held, self._epoch, self._sentinel, SENTINEL_PREFIX, me, self._ttl_ms, token]

    def _take_once(self, me: str, want: int) -> tuple[int, int, list[bytes]]:
        keys = self._take_keys(me)
        while True:
            # `held` is read once: a retry after a lost reply sends the same value,
            # so take.lua adopts what the lost call moved instead of stranding it.
            args = self._take_args(me, want, self._held)
            taken = self._taken(self._link.run("take", keys, args))
            if taken is not None:
                return taken

    def _taken(self, reply: list[Any]) -> tuple[int, int, list[bytes]] | None:
        """(status, wait_ms, messages) of a take.lua reply; None when nothing was
        done and the caller must call again (the epoch moved on, or the ack it
        waited for is not there)."""
        status, epoch, wait_ms, held, *messages = reply
        self._held = int(held)
        if status == _NEW_EPOCH:
            self._set_epoch(epoch)
            return None
        return None if status == _ACK_MISSING else (int(status), int(wait_ms), messages)

    def _blmove(self, me: str, seconds: float) -> Callable[[redis.Redis], Any]:
        """Wait for one message; it lands in our in-flight list, where the next
        take.lua adopts it (so a reply lost on the way strands nothing)."""
        ready, inflight = self.keys.ready, self.keys.inflight(me)

        def op(client: redis.Redis) -> Any:
            # Redis >= 6 takes a fractional timeout; redis-py's hint says int.
            return client.blmove(ready, inflight, seconds, "RIGHT", "LEFT")  # type: ignore[arg-type]

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
        applied, held = self._link.run("ack", *self._ack_call(receipt, outcome, "", target))
        self._note_ack(applied)
        if receipt.consumer == self._consumer_id:
            self._held = int(held)
        self.ack_applied = int(applied) != 0
        if receipt.deaths and int(applied) == 1:
            self._forget_deaths(receipt.messages)

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
        if to._link.where != self._link.where:
            raise ConfigError(f"a stage's queues must be on one Redis server, not "
                              f"{self._link.where} and {to._link.where}")
        return to.keys

    @staticmethod
    def _receipt(lease: Lease) -> _Receipt:
        if not isinstance(lease.receipt, _Receipt):
            raise ValueError("this lease was not taken from a Redis queue")
        return lease.receipt

    def _ack_call(
        self, receipt: _Receipt, outcome: Outcome, token: str, target: Keys | None = None
    ) -> tuple[list[str], list[Any]]:
        """ack.lua's keys and arguments; made once, so a retry sends the same."""
        retry: list[Any] = []
        for message, delay in outcome.retry:  # a unique prefix keeps equal retries apart
            retry += [max(0, round(delay * 1000)), os.urandom(8) + message]
        k = self.keys
        keys = [k.inflight(receipt.consumer), k.counters, k.delayed, k.dead, k.ready, k.acked]
        head: list[Any] = [len(receipt.messages), len(outcome.retry), len(outcome.dead)]
        head += [len(outcome.give_back), outcome.done, outcome.failed, receipt.consumer, token]
        outputs: list[bytes] = []
        if target is not None and outcome.outputs:
            keys += [target.ready, target.counters, target.closed, target.epoch]
            outputs = outcome.outputs
        head += [len(outputs), outcome.output_tasks if outputs else 0]
        args = [*head, *receipt.messages, *retry, *outcome.dead, *reversed(outcome.give_back)]
        return keys, [*args, *outputs]

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
        token, and adopts what lies beyond the in-flight length the ack left.  So
        if the connection drops, sending both again is safe: a repeated ack is a
        no-op, a take whose reply was lost is adopted, and a take never runs
        without its ack.  Only when nothing was ready does it wait, as take does.
        """
        me = self._me()
        receipt = self._receipt(lease)
        target = self._target(to)
        outcome = self._outcome(lease, failures, give_back, outputs, to)
        if not receipt.messages or receipt.consumer != me or receipt.deaths:
            # Nothing in flight (a made-up sentinel), a lease of an earlier
            # registration, or a suspect whose death count the ack must clear:
            # no in-flight list to carry over, take as usual.
            self.ack_applied = True
            self._ack(lease, outcome, target)
            return self.take(max_tasks, timeout)
        want = max(1, min(max_tasks, MAX_BATCH))
        deadline = None if timeout is None else time.monotonic() + timeout
        self._acks += 1
        token = str(self._acks)
        ack = self._ack_call(receipt, outcome, token, target)
        take = self._take_keys(me), self._take_args(me, want, -1, token)  # held: what the ack left
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
        scripts = self._link.script("ack"), self._link.script("take")
        for attempt in (1, 2):
            pipe = client.pipeline(transaction=False)
            for script, (keys, args) in zip(scripts, (ack, take), strict=True):
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            replies = pipe.execute(raise_on_error=False)
            pairs = zip(scripts, replies, strict=True)
            lost = [script for script, reply in pairs if isinstance(reply, NoScriptError)]
            if not lost or attempt == 2:
                break
            for script in lost:
                client.script_load(script.script)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        self._note_ack(replies[0][0])
        return cast("list[Any]", replies[0]), cast("list[Any]", replies[1])

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._here()
        self._close("", "always")

    def _close(self, producer: str, mode: str) -> bool:
        k = self.keys
        keys = [k.closed, k.epoch, k.ready, k.consumer_beats, k.producers, k.producer_beats]
        while True:
            args = [self._epoch, encode_sentinel(self._epoch), producer, mode]
            code, value = self._link.run("close", keys, args)
            if code != -1:
                return bool(code == 1)
            self._set_epoch(value)

    def reap(self) -> int:
        return self._reap("expired", "")

    def evict(self, pid: int, host: str | None = None) -> int:
        """A supervisor saw its consumer process ``pid`` (on ``host``, default this
        one) die: return that consumer's in-flight tasks now, as suspects."""
        return self._reap("prefix", f"{host or socket.gethostname()}:{pid}:")

    def release(self, pid: int) -> int:
        return self._reap("killed", f"{socket.gethostname()}:{pid}:")

    def _reap(self, mode: str, arg: str) -> int:
        k = self.keys
        keys = [k.consumers, k.consumer_beats, k.ready, k.acked, k.suspects, k.deaths]
        return int(self._link.run("reap", keys, [mode, arg, k.inflight_prefix, SENTINEL_PREFIX]))

    def sibling(self, name: str, *, maxsize: int = 0) -> Queue:
        return RedisQueue(name, maxsize=maxsize, url=self.url, client=self._link.injected,
                          heartbeat_ttl=self.heartbeat_ttl, retry_for=self._link.retry_for,
                          max_deliveries=self.max_deliveries)

    def forget(self) -> None:
        k = self.keys
        names = [getattr(k, f) for f in k.__slots__ if f != "inflight_prefix"]

        def op(client: redis.Redis) -> None:
            consumers = cast("list[bytes]", client.hkeys(k.consumers))
            client.delete(*names, *(k.inflight(c.decode()) for c in consumers))
            client.srem(REGISTRY, self.name)

        self._link.call(op)

    def _ready_now(self) -> int:
        ready = self.keys.ready
        return int(self._link.call(lambda client: client.llen(ready)))

    def set_feeds(self, to: str) -> None:
        feeds = self.keys.feeds
        self._link.call(lambda client: client.set(feeds, to))
        self._register(to)

    def feeds(self) -> str | None:
        feeds = self.keys.feeds
        value = cast("bytes | None", self._link.call(lambda client: client.get(feeds)))
        return None if value is None else value.decode()

    def counters(self) -> Counters:
        k = self.keys
        keys = [k.ready, k.counters, k.dead, k.delayed, k.consumer_beats, k.producer_beats]
        keys += [k.closed, k.suspects]
        args = [k.inflight_prefix, SENTINEL_PREFIX]
        v = [int(x) for x in self._link.run("counters", keys, args)]
        return Counters(
            ready=v[0],
            in_flight=v[1],
            pending=v[2],
            produced=v[3],
            done=v[4],
            failed=v[5],
            retried=v[6],
            dead=v[7],
            delayed=v[8],
            consumers=v[9],
            producers=v[10],
            closed=bool(v[11]),
        )

    def attach_consumer(self) -> None:
        self.join_run()

    def join_run(self, *, burst: bool = False, run: int | None = None) -> int:
        """Register as a consumer, then see where the queue's run stands: open or
        closing, serve this run; idle, serve the next (and obey no sentinel of
        this one), unless ``burst``, or unless ``run`` (what a consumer that died
        served) says this one was ours."""
        self._here()
        self._burst = burst
        if self._consumer_id is None:
            # Under the beat lock: no heartbeat registers us before run_state does.
            with self._beat_lock:
                self._consumer_id, self._consumer_info = self._new_id(), self._info()
                try:  # being the first use, this also checks the server
                    epoch, closed, pending, _ = self._run_state(register=True)
                except BaseException:
                    self._consumer_id = None
                    raise
            self._start_heartbeat()
            self._register()
        else:
            epoch, closed, pending, _ = self._run_state()
        idle = bool(closed) and pending <= 0
        waits = idle and not burst and (run is None or run > epoch)
        self._serves = epoch + 1 if waits else epoch
        self._set_epoch(epoch)
        return self._serves

    def run_to_serve(self) -> int:
        epoch, closed, pending, _ = self._run_state()
        return epoch + 1 if closed and pending <= 0 else epoch

    def _run_state(self, register: bool = False) -> tuple[int, int, int, int]:
        """(epoch, closed, pending, live producers), read in one step — the step
        that registers this consumer, with ``register``: a run that ends after it
        counts this consumer, so the run it reads is the one it serves."""
        k = self.keys
        keys = [k.epoch, k.closed, k.counters, k.producer_beats, k.consumers, k.consumer_beats]
        args = [self._consumer_id, self._consumer_info, self._ttl_ms] if register else ["", "", 0]
        epoch, closed, pending, producers = self._link.run("run_state", keys, args)
        return int(epoch), int(closed), int(pending), int(producers)

    def _run_is_over(self, status: int, wait_ms: int) -> bool:
        """After a take that found nothing: is it time to stop?  Closed and drained,
        for a consumer of this run (one waiting for the next run waits on); for a
        burst consumer also an open queue without a producer or a retry due."""
        if status == _DRAINED:
            return self._epoch >= self._serves
        if not self._burst or status != _TAKEN or wait_ms >= 0:
            return False
        return self._run_state()[3] == 0

    def detach_consumer(self) -> None:
        self._here()
        consumer = self._consumer_id
        if consumer is None:
            return
        with self._beat_lock:  # waits for a beat in progress, so none re-registers us
            self._consumer_id = None
        self._stop_heartbeat_if_idle()
        self._reap("id", consumer)
        self._held = 0

    def attach_producer(self) -> None:
        self._here()
        producer = self._new_id()
        k = self.keys
        keys = [k.producers, k.producer_beats, k.closed, k.epoch]
        self._set_epoch(self._link.run("attach", keys, [producer, self._info(), self._ttl_ms]))
        self._producer_ids.append(producer)
        with self._beat_lock:
            self._beat_ids.append(producer)
        self._start_heartbeat()
        self._register()

    def _register(self, *more: str) -> None:
        """Add this queue's name (and ``more``) to the server's :data:`REGISTRY` (a
        command of its own: in a Cluster the registry lives in another slot)."""
        names = [self.name, *more]
        self._link.call(lambda client: client.sadd(REGISTRY, *names))

    def detach_producer(self, close_if_last: bool = True) -> None:
        self._here()
        producer = self._producer_ids.pop() if self._producer_ids else ""
        with self._beat_lock:
            if producer in self._beat_ids:
                self._beat_ids.remove(producer)
        self._stop_heartbeat_if_idle()
        self._close(producer, "if_last" if close_if_last else "never")

    def keep_alive(self, pids: Sequence[int]) -> None:
        if pids:
            args = [self._ttl_ms, socket.gethostname(), *pids]
            self._link.run("keep_alive", [self.keys.consumer_beats], args)

    def fail_running(
        self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]
    ) -> bool:
        """Find task ``task_id`` in the in-flight list of the dead process ``pid``
        and acknowledge it there, as that consumer would have, with
        ``failure(envelope)``: ack.lua's checks make this safe against a reap."""
        prefix = f"{socket.gethostname()}:{pid}:".encode()
        k = self.keys

        def lists(client: redis.Redis) -> list[tuple[str, list[bytes]]]:
            members = cast("list[bytes]", client.zrange(k.consumer_beats, 0, -1))
            ids = [m.decode() for m in members if m.startswith(prefix)]
            return [(i, cast("list[bytes]", client.lrange(k.inflight(i), 0, -1))) for i in ids]

        for consumer, messages in self._link.call(lists):
            for message in messages:
                lease = super()._lease([message], _Receipt(consumer, [message]))
                envs = list(lease.envelopes())
                if len(envs) == 1 and envs[0].id == task_id:
                    self.ack_applied = True
                    self._ack(lease, self._outcome(lease, [failure(envs[0])], ()))
                    return self.ack_applied
        return False

    def _forget_deaths(self, messages: list[bytes]) -> None:
        """A suspect was acknowledged: its death count has served its purpose."""
        deaths = self.keys.deaths
        self._link.call(lambda client: client.hdel(deaths, *messages))

    def registrations(self) -> list[dict[str, Any]]:
        """Live consumers and producers: role, id, host, pid, started, and heartbeat
        (the Unix time of the last heartbeat, by the server's clock)."""
        k = self.keys

        def op(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=True)
            pipe.time()
            for info, beats in ((k.consumers, k.consumer_beats), (k.producers, k.producer_beats)):
                pipe.hgetall(info)
                pipe.zrange(beats, 0, -1, withscores=True)
            return list(pipe.execute())

        (seconds, micros), c_infos, c_beats, p_infos, p_beats = self._link.call(op)
        now = seconds + micros / 1e6
        found = []
        for role, infos, beats in (("consumer", c_infos, c_beats), ("producer", p_infos, p_beats)):
            for member, expiry in beats:
                if expiry / 1000 <= now:
                    continue  # dead: its heartbeat expired
                info = json.loads(infos.get(member) or b"{}")
                last = expiry / 1000 - float(info.get("ttl", self.heartbeat_ttl))
                found.append({"role": role, "id": member.decode(), **info, "heartbeat": last})
        return found

    def _beat(self, retry: bool = False) -> None:
        k = self.keys
        keys = [k.consumers, k.consumer_beats, k.producers, k.producer_beats]
        with self._beat_lock:
            consumer = self._consumer_id or ""
            if consumer or self._beat_ids:
                args = [self._ttl_ms, consumer, self._consumer_info, *self._beat_ids]
                self._link.run("heartbeat", keys, args, retry=retry)

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self._beat, self.heartbeat_ttl / 3)

    def _stop_heartbeat_if_idle(self) -> None:
        if self._heartbeat is not None and self._consumer_id is None and not self._beat_ids:
            self._heartbeat.stop()
            self._heartbeat = None

    def check_backend(self) -> bool:
        return self._link.probe()

    def interrupt(self) -> None:
        self._interrupted = True

    def dispose(self) -> None:
        self._here()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        self._link.close()

    def exists(self) -> bool:
        """Whether Redis holds any key of this queue: a name never used has none."""
        k = self.keys
        names = [k.ready, k.delayed, k.dead, k.counters, k.closed, k.epoch, k.consumers,
                 k.consumer_beats, k.producers, k.producer_beats]
        return bool(self._link.call(lambda client: client.exists(*names)))

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return [decode_dead(letter) for letter in self._read_dead(limit)]

    def _read_dead(self, count: int) -> list[bytes]:
        dead = self.keys.dead

        def op(client: redis.Redis) -> list[bytes]:
            return cast("list[bytes]", client.lrange(dead, 0, count - 1))  # no decoding client

        return self._link.call(op)

    def requeue_dead(self) -> int:
        """Put every dead-lettered task back in ready with its attempts reset.

        A requeued task is pending again and no longer counted failed (``produced``
        is unchanged: it was produced once).  It goes to the consumer end of ready,
        as a retry does, so on a closed queue consumers handle it before they stop.
        Letters that hold no task — the raw bytes of an undecodable message — stay
        in dead.
        """
        k = self.keys
        total = int(self._link.call(lambda client: client.llen(k.dead)))
        seen = requeued = 0
        while seen < total:
            letters = self._read_dead(min(REQUEUE_CHUNK, total - seen))
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
            keys = [k.dead, k.ready, k.counters]
            n = int(self._link.run("requeue", keys, args))
            if n >= 0:  # -1: dead changed under us; read it again
                seen += len(letters)
                requeued += n
        return requeued

    def purge_dead(self) -> int:
        dead = self.keys.dead

        def op(client: redis.Redis) -> int:
            pipe = client.pipeline(transaction=True)
            pipe.llen(dead)
            pipe.delete(dead)
            return int(pipe.execute()[0])

        return self._link.call(op)

    def purge(self) -> int:
        k = self.keys
        keys = [k.ready, k.delayed, k.counters, k.closed, k.epoch, k.consumer_beats]
        keys += [k.full, k.space, k.acked, k.suspects, k.deaths]
        return int(self._link.run("purge", keys, [k.inflight_prefix]))
