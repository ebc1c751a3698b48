"""A Redis queue's connection, registrations and heartbeats (the base of
:class:`pcq.backends.redis.RedisQueue`, which adds the queue's moves).

What belongs to one process is reset in a child or after unpickling
(``_fresh``): a consumer registration, the producers it heartbeats, its open
leases.  A consumer or producer is live while its heartbeat (``heartbeat.lua``,
every ``ttl/3`` s from a daemon thread; ``take.lua`` refreshes it too; a
supervisor vouches for its busy consumers with ``keep_alive.lua``) has not
expired; ``reap.lua`` gives the in-flight tasks of a dead one back.  Closing
(``close.lua``: one sentinel per live consumer, the last producer out closes)
and the run a consumer serves (``run_state.lua``) are decided here too, and
what the admin commands read (counters, feeds, dead letters).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.exceptions import RedisError

from pcq.backends.base import Counters, Queue
from pcq.backends.redis_keys import REGISTRY, Keys, TakeStatus, check_name
from pcq.backends.redis_link import Link
from pcq.envelope import SENTINEL_PREFIX, decode_dead, encode_sentinel
from pcq.errors import ConfigError, PcqError

DEFAULT_URL = "redis://localhost:6379/0"


@dataclass(frozen=True, slots=True)
class Receipt:
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


class Registered(Queue):
    """A Redis queue's link, registrations and heartbeats; see
    :class:`~pcq.backends.redis.RedisQueue` for its options."""

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
        read_only: bool = False,
    ) -> None:
        check_name(name)
        if maxsize < 0:
            raise ConfigError(f"maxsize must be 0 (unbounded) or more, not {maxsize}")
        if heartbeat_ttl <= 0:
            raise ConfigError(f"heartbeat_ttl must be positive, not {heartbeat_ttl}")
        super().__init__(name, maxsize=maxsize, max_deliveries=max_deliveries)
        self.url = url
        self.heartbeat_ttl = heartbeat_ttl
        self.keep_alive_every = heartbeat_ttl / 3
        self.keys = Keys.of(name)
        self.read_only = read_only
        self._link = Link(url, client, retry_for, marker=self.keys.marker, what=f"queue {name}",
                          create_marker=not read_only)
        self._producer_ids: list[str] = []
        self._interrupted = False  # set from a signal handler: a waiting put gives up
        self._fresh()

    def _fresh(self) -> None:
        """Reset what belongs to one process (again in a child, or after unpickling)."""
        self._pid = os.getpid()
        self._consumer_id: str | None = None
        self._consumer_info = ""
        self._holding: list[Receipt] = []  # our open leases (see take.lua)
        self._acks = 0  # acks sent: the last one's number is its token
        self._epoch = -1
        self._sentinel = b""
        self._serves = -1  # the run (epoch) this consumer serves; see join_run
        self._burst = False
        self._beat_ids: list[str] = []  # producers this process attached
        self._beat_lock = threading.Lock()
        self._heartbeat: _Heartbeat | None = None
        self._next_reap = 0.0
        self._cost_ns: int | None = None  # the consumers' cost per task, as last heard
        self._cost_report = 0  # this consumer's, not sent yet (it rides on an ack)

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

    def _keys(self, script: str, me: str = "", extra: Sequence[str] = ()) -> list[str]:
        """The keys of ``script`` (``SCRIPTS``, for consumer ``me``), then ``extra``,
        then the queue's marker: every script fails with QueueDataLost when it
        finds the marker gone (a FLUSHDB or an eviction while the connections
        stayed open)."""
        return [*self.keys.of_script(script, me), *extra, self.keys.marker]

    def _run(
        self, script: str, args: list[Any], *, me: str = "", retry: bool = True,
        durable: bool = False,
    ) -> Any:
        """Run ``script`` with its keys (see :meth:`_keys`) and ``args``;
        ``durable``: see :meth:`~pcq.backends.redis_link.Link.run`."""
        return self._link.run(script, self._keys(script, me), args, retry=retry, durable=durable)

    def close(self) -> None:
        self._here()
        self._close("", "always")

    def _close(self, producer: str, mode: str) -> bool:
        while True:
            args = [self._epoch, encode_sentinel(self._epoch), producer, mode]
            code, value = self._run("close", args, durable=True)
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
        return int(self._run("reap", [mode, arg, k.inflight_prefix, SENTINEL_PREFIX,
                                      k.landing_prefix]))

    def killing(self, pid: int, task_id: str) -> None:
        """Mark consumer ``pid``'s registrations as being killed, before the kill:
        from now on its own acks commit nothing (see killing.lua)."""
        prefix = f"{socket.gethostname()}:{pid}:"
        self._run("killing", [prefix])

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
        args = [self._consumer_id, self._consumer_info, self._ttl_ms] if register else ["", "", 0]
        epoch, closed, pending, producers = self._run("run_state", args)
        return int(epoch), int(closed), int(pending), int(producers)

    def _run_is_over(self, status: int, wait_ms: int) -> bool:
        """After a take that found nothing: is it time to stop?  Closed and drained,
        for a consumer of this run (one waiting for the next run waits on); for a
        burst consumer also an open queue without a producer or a retry due."""
        if status == TakeStatus.DRAINED:
            return self._epoch >= self._serves
        if not self._burst or status != TakeStatus.TAKEN or wait_ms >= 0:
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
        self._holding = []

    def attach_producer(self, producer_id: str | None = None) -> str:
        self._here()
        producer = producer_id or self._new_id()
        self._set_epoch(self._run("attach", [producer, self._info(), self._ttl_ms], durable=True))
        self._producer_ids.append(producer)
        with self._beat_lock:
            self._beat_ids.append(producer)
        self._start_heartbeat()
        self._register()
        return producer

    def _register(self, *more: str) -> None:
        """Add this queue's name (and ``more``) to the server's :data:`REGISTRY`,
        a command of its own; not on a Cluster (the registry's slot is not the
        queue's, and this link talks to the queue's node only)."""
        names = [self.name, *more]

        def op(client: redis.Redis) -> None:
            if not self._link.in_cluster:
                client.sadd(REGISTRY, *names)

        self._link.call(op)

    def detach_producer(self, producer_id: str | None = None, close_if_last: bool = True) -> None:
        """Unregister ``producer_id`` — another process's, such as a producer
        child that was killed, or None for the last one this object attached —
        then close if it was the last live one (``close_if_last``)."""
        self._here()
        if producer_id is None:
            producer = self._producer_ids.pop() if self._producer_ids else ""
        else:
            producer = producer_id
            if producer in self._producer_ids:
                self._producer_ids.remove(producer)
        with self._beat_lock:
            if producer in self._beat_ids:
                self._beat_ids.remove(producer)
        self._stop_heartbeat_if_idle()
        self._close(producer, "if_last" if close_if_last else "never")

    def keep_alive(self, pids: Sequence[int]) -> None:
        if pids:
            args = [self._ttl_ms, socket.gethostname(), *pids]
            self._run("keep_alive", args)

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
        with self._beat_lock:
            consumer = self._consumer_id or ""
            if consumer or self._beat_ids:
                args = [self._ttl_ms, consumer, self._consumer_info, *self._beat_ids]
                self._run("heartbeat", args, retry=retry)

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

    def forget(self) -> None:
        k = self.keys
        names = k.every()

        def op(client: redis.Redis) -> None:
            consumers = cast("list[bytes]", client.hkeys(k.consumers))
            ids = [c.decode() for c in consumers]
            client.delete(*names, *map(k.inflight, ids), *map(k.landing, ids))
            if not self._link.in_cluster:
                client.srem(REGISTRY, self.name)

        self._link.call(op)

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
        v = [int(x) for x in self._run("counters", [k.inflight_prefix, k.landing_prefix])]
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

    def run_start(self) -> dict[str, int] | None:
        """The counters as they stood when the current run started (attach.lua
        notes them); None before a second run."""
        fields = ["run_produced", "run_done", "run_failed", "run_retried", "run_dead"]
        counters = self.keys.counters
        values = self._link.call(lambda client: client.hmget(counters, fields))
        if values[0] is None:
            return None
        return {f.removeprefix("run_"): int(v or 0) for f, v in zip(fields, values, strict=True)}

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        return [decode_dead(letter) for letter in self._read_dead(limit)]

    def _read_dead(self, count: int) -> list[bytes]:
        dead = self.keys.dead

        def op(client: redis.Redis) -> list[bytes]:
            return cast("list[bytes]", client.lrange(dead, 0, count - 1))  # no decoding client

        return self._link.call(op)

    def purge_dead(self) -> int:
        dead = self.keys.dead

        def op(client: redis.Redis) -> int:
            pipe = client.pipeline(transaction=True)
            pipe.llen(dead)
            pipe.delete(dead)
            return int(pipe.execute()[0])

        return self._link.call(op)
