"""The connection under the Redis backend.

One :class:`Link` owns a ``redis.Redis`` client and is the one place where
redis-py's errors become pcq's:

* The first use pings.  If that fails, the URL is wrong or the server is down:
  :class:`~pcq.errors.BackendUnavailable` at once, one line naming the URL
  (never its password).  A URL redis-py cannot parse is a
  :class:`~pcq.errors.ConfigError` when the link is made.
* Once connected, a dropped connection (server restarted, failover, network
  blip) is retried with exponential backoff — 0.05 s doubling to 2 s.  One
  outage clock per link (every thread's failures share it) gives up
  ``retry_for`` seconds after the first failure: :class:`~pcq.errors.BackendLost`,
  and every later call fails at once.  The process that made the link says so in
  one line when the link is lost and one when it is back (its forked children
  stay quiet: their supervisor speaks for the host).  redis-py's own retries are
  switched off: a command whose reply was lost must come back to the caller,
  which knows whether running it again is safe (see the Lua scripts' comments).
* A refusal (wrong password, ACL) is never retried.
* Data loss: every new connection checks the queue's marker key (``marker``)
  before any command runs on it.  The first connection creates the marker if it
  is missing (SET NX, a random value) and remembers it; a later connection that
  finds another value, or none, is talking to a server that lost the queue (it
  restarted without persistence, evicted or flushed it):
  :class:`~pcq.errors.QueueDataLost`, for good.  Connections are checked, not
  commands, because a server restart always breaks them, and redis-py reconnects
  a pooled connection silently — so no command ever runs unchecked on the new
  server.
* At the first connection, the process that made the link warns once if the
  server keeps nothing on restart (no AOF, no RDB save points) or may evict keys.
* ``rediss://``: the TLS handshake shares the connect timeout, so a TLS client
  talking to a plain server fails in ``CONNECT_TIMEOUT``, not the socket timeout.
* Cluster and Sentinel (:mod:`pcq.backends.redis_topology`): the client talks
  to the master of the queue's slot, found again after MOVED, ASK or a failover.
* ``durable`` writes are followed by ``WAIT`` on their connection when the
  master has replicas; one that no replica took is sent again (a repeat is a
  no-op that still writes) until one does, as an outage.

A link crosses process boundaries as its URL: the client is dropped when pickled
and rebuilt, lazily, in a process whose pid differs from its maker's.  An injected
client is used as is (redis-py's pool reconnects after a fork by itself) and does
not survive pickling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError

from pcq.backends.redis_errors import MOVING, REFUSED, RETRYABLE, explain
from pcq.backends.redis_topology import (
    ClusterMap,
    NotReplicated,
    SentinelUrl,
    TlsConnection,
    connected_replicas,
    describe,
    durability,
    explain_no_master,
    is_sentinel,
    node_url,
    pipeline_with_wait,
    safe_url,
    says_cluster,
    sentinel_master,
    warn_about,
)
from pcq.errors import BackendLost, BackendUnavailable, ConfigError, QueueDataLost

T = TypeVar("T")
log = logging.getLogger("pcq")

FIRST_PAUSE = 0.05
LONGEST_PAUSE = 2.0
#: Longest a blocking command waits server-side; the socket timeout must exceed it.
SOCKET_TIMEOUT = 10.0
#: Longest a TCP connect plus TLS handshake may take (a partition, or rediss://
#: against a plain server, must not cost the socket timeout).
CONNECT_TIMEOUT = 2.0
#: The error a pcq script replies with when the queue's marker key is gone.
DATA_LOST_REPLY = "PCQ_DATA_LOST"


#: Servers this process has already warned about (one warning per command,
#: however many queues it opens there).
_WARNED: set[str] = set()
#: A script call in a pipeline: the script's name, its keys and arguments.
ScriptCall = tuple[str, list[str], list[Any]]


class _MarkerChanged(RedisError):
    """Raised while a new connection is set up: the queue's marker is not the one
    this link saw first (a RedisError, so that redis-py drops the connection)."""


def load_script(name: str) -> str:
    """The source of ``pcq/backends/<name>.lua``, with ``lib/batches.lua`` after
    its header (which says what the script is) when that says ``-- needs: batches``."""
    here = files("pcq.backends")
    lines = here.joinpath(f"{name}.lua").read_text(encoding="utf-8").splitlines(keepends=True)
    if "-- needs: batches\n" in lines:
        body = next(i for i, line in enumerate(lines) if not line.startswith("--"))
        lines.insert(body, here.joinpath("lib").joinpath("batches.lua").read_text("utf-8"))
    return "".join(lines)


class Link:
    """A Redis client that reconnects, retries and translates errors."""

    def __init__(
        self,
        url: str,
        client: redis.Redis | None = None,
        retry_for: float = 60.0,
        *,
        marker: str | None = None,
        what: str = "the queue",
        create_marker: bool = True,
    ) -> None:
        self.url = url
        self.retry_for = retry_for
        self._injected = client
        self._connected_once = False  # crosses pickling: a child of a live job retries
        # The marker key and the value first seen there; both cross fork and
        # pickling, so a child checks against what its parent saw.
        self._marker_key = marker
        self._marker: bytes | None = None
        self._create_marker = create_marker  # False: a reader, which never writes
        self._what = what
        self._maker = os.getpid()  # only this process announces outages and warns
        self._failure: BackendLost | None = None  # sticky: the run cannot go on
        # Where the master is; both cross pickling, so a child finds a cluster
        # whose node in the URL has died since (see redis_topology).
        self._nodes: list[tuple[str, int]] | None = None  # a cluster's nodes
        self._single = client is not None  # known not to be a cluster node
        self._client: redis.Redis | None = None
        self._pinged = False
        self._scripts: dict[str, Script] = {}
        self._reset()
        try:
            self._plain, self.durability = durability(url)
            self._sentinel = SentinelUrl.parse(self._plain) if is_sentinel(url) else None
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {safe_url(url)!r}: {exc}") from exc
        if client is not None:
            if client.get_connection_kwargs().get("decode_responses"):
                raise ConfigError("pcq needs a Redis client with decode_responses=False")
            self.where = describe(client)
            self._replicas = self.durability.replicas or 0
        else:
            self.where = self._sentinel.where() if self._sentinel else safe_url(url)
            self._build()  # a bad URL fails here, not at first use

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._client = self._injected
        self._pinged = False
        self._scripts = {}
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time of the outage's first failure
        self._prober: redis.Redis | None = self._injected  # probe()'s own client
        self._prober_at: tuple[str, int] | None = None  # the master it talks to
        self._cluster: ClusterMap | None = None
        self._owner: tuple[str, int] | None = None  # the master of our slot, in a cluster
        self._relocate = False  # the master moved: ask the cluster again
        self._replicas = 0  # replicas a durable write waits for (see _on_connect)

    def _build(self, socket_timeout: float = SOCKET_TIMEOUT, check: bool = True) -> redis.Redis:
        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "redis_connect_func": self._on_connect if check else None,
        }
        if self._sentinel is not None:
            return sentinel_master(self._sentinel, **common)
        url = node_url(self._plain, *self._owner) if self._owner else self._plain
        try:
            parts = urlsplit(url)
            db = parts.path.strip("/")
            if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
                raise ValueError(f"the database must be a number, not {db!r}")  # not db 0
            tls: dict[str, Any] = {"connection_class": TlsConnection}
            return redis.Redis.from_url(url, **common, **(tls if parts.scheme == "rediss" else {}))
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {safe_url(self.url)!r}: {exc}") from exc

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_client", "_injected", "_scripts", "_lock", "_pinged", "_pid", "_down_since",
                     "_prober", "_prober_at", "_cluster", "_owner", "_relocate", "_replicas"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._injected = None
        self._reset()

    @property
    def injected(self) -> redis.Redis | None:
        """The client given to the constructor (a test's fakeredis), if any."""
        return self._injected

    def client(self) -> redis.Redis:
        """The client, built for this process and pinged once."""
        if self._pid != os.getpid():  # forked: the parent's sockets (and lock) are not ours
            self._reset()
        with self._lock:
            if self._client is None or self._relocate:
                self._locate()
                self._client, self._pinged = self._build(), False
            client = self._client
        if not self._pinged:
            self._first_ping(client)
        return client

    def _first_ping(self, client: redis.Redis) -> None:
        try:
            client.ping()
        except MasterNotFoundError as exc:
            if self._connected_once or self._sentinel is None:
                raise
            raise explain_no_master(self._sentinel, exc) from exc
        if self._injected is not None and self._marker_key and self._create_marker:
            # an injected client has no connect hook (see _on_connect)
            client.set(self._marker_key, os.urandom(8).hex(), nx=True)
        self._pinged = self._connected_once = True
        if os.getpid() == self._maker and self.where not in _WARNED:
            _WARNED.add(self.where)
            warn_about(client, self.where)

    def _locate(self) -> None:
        """In a Redis Cluster, find the master that owns the queue's slot (a
        single server or Sentinel needs nothing here)."""
        if self._single or self._sentinel is not None:
            return
        if self._nodes is None:  # the first use of this link in any process
            probe = self._build(socket_timeout=CONNECT_TIMEOUT, check=False)
            try:
                if not says_cluster(probe):
                    self._single = True
                    return
            finally:
                probe.close()
            parts = urlsplit(self._plain)
            self._nodes = [(parts.hostname or "localhost", parts.port or 6379)]
        if self._cluster is None:
            self._cluster = ClusterMap(self._nodes, self._plain, socket_timeout=CONNECT_TIMEOUT,
                                       socket_connect_timeout=CONNECT_TIMEOUT)
        elif self._relocate:
            self._cluster.refresh()
        self._relocate = False
        self._nodes = self._cluster.nodes()
        self._owner = self._cluster.owner(self._marker_key or "pcq")

    @property
    def in_cluster(self) -> bool:
        """Whether this link talks to a Redis Cluster (known after its first use)."""
        return self._cluster is not None

    def same_slot(self, other: Link) -> bool:
        """Whether ``other``'s queue lives where this one's does: the same server,
        and in a cluster the same hash slot (one script can touch both)."""
        self.call(lambda client: client)  # a cluster or not: found out at first use
        other.call(lambda client: client)
        if self._cluster is None or other._cluster is None:
            return other.where == self.where and self._cluster is other._cluster
        mine, theirs = self._marker_key or "", other._marker_key or ""
        return self._owner == other._owner and self._cluster.same_slot(mine, theirs)

    def _on_connect(self, connection: Any) -> None:
        """redis-py calls this on every new connection, before any command of
        ours: authenticate as usual, check the queue's marker, and learn how
        many replicas a durable write must reach on this master."""
        connection.on_connect()
        asked = self.durability.replicas is None  # else the URL says how many
        self._replicas = self.durability.wanted(connected_replicas(connection) if asked else 0)
        if self._marker_key is None:
            return
        if self._create_marker:
            connection.send_command("SET", self._marker_key, os.urandom(8).hex(), "NX")
            connection.read_response()
        connection.send_command("GET", self._marker_key)
        seen = connection.read_response()
        if self._marker is None:
            self._marker = seen
        elif seen != self._marker:
            raise _MarkerChanged(f"marker {self._marker_key} is {seen!r}, was {self._marker!r}")

    def script(self, name: str) -> Script:
        """The Lua script ``name`` registered on this process's client."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client().register_script(load_script(name))
        return script

    def run(
        self, name: str, keys: list[str], args: list[Any], *, retry: bool = True,
        durable: bool = False,
    ) -> Any:
        """Run script ``name`` (EVALSHA, loading it if the server lost it) through
        :meth:`call`; ``durable``: it counts only once enough replicas have it
        (see :meth:`pipelined`; the script must be safe to repeat)."""
        if durable:
            return self.call(lambda client: self.pipelined(client, [(name, keys, args)])[0],
                             retry=retry)
        return self.call(
            lambda client: self.script(name)(keys=keys, args=args, client=client), retry=retry
        )

    def pipelined(self, client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
        """The replies of ``calls``, sent in one pipeline followed by ``WAIT``
        when the master has replicas to wait for (see
        :func:`~pcq.backends.redis_topology.pipeline_with_wait`; every call must
        be safe to repeat).  A WAIT short of its replicas is an outage that
        :meth:`call` waits out by sending the calls again."""
        scripts = [(self.script(name), keys, args) for name, keys, args in calls]
        return pipeline_with_wait(client, scripts, self._replicas, self.durability.timeout_ms)

    def call(self, op: Callable[[redis.Redis], T], *, retry: bool = True) -> T:
        """``op(client)``, with redis-py's errors translated and dropped connections
        retried (unless ``retry`` is False) until the outage is ``retry_for``
        seconds old.  ``op`` must be safe to run again after a reply was lost."""
        pause = FIRST_PAUSE
        while True:
            if self._failure is not None:
                raise self._failure
            try:
                result = self._attempt(op)
            except _MarkerChanged as exc:
                raise self._lost() from exc
            except REFUSED as exc:
                why = explain(exc)
                raise BackendUnavailable(f"Redis at {self.where} refused us: {why}") from exc
            except (*RETRYABLE, *MOVING) as exc:
                pause = self._wait_out(exc, retry, pause)
            except ResponseError as exc:
                if str(exc).startswith(DATA_LOST_REPLY):  # a script found the marker gone
                    raise self._lost() from exc
                raise BackendUnavailable(f"Redis at {self.where} said: {exc}") from exc
            except RedisError as exc:
                raise BackendUnavailable(f"Redis at {self.where}: {explain(exc)}") from exc
            else:
                if self._down_since is not None:
                    self._back()
                return result

    def _wait_out(self, exc: Exception, retry: bool, pause: float) -> float:
        """A dropped connection or a moved master: sleep ``pause`` (no later than
        the outage's ``retry_for``) and return the next pause; raise when it is
        not to be waited out (never connected, ``retry`` False, outage too old)."""
        if not self._connected_once and not isinstance(exc, MOVING):
            raise BackendUnavailable(f"cannot reach Redis at {self.where}: {exc}") from exc
        self._relocate = self._nodes is not None  # a cluster: ask it where to go
        left = self._outage(exc)
        if not retry:
            raise BackendUnavailable(f"lost Redis at {self.where}: {exc}") from exc
        time.sleep(min(pause, left))
        return min(pause * 2, LONGEST_PAUSE)

    def _attempt(self, op: Callable[[redis.Redis], T]) -> T:
        """``op(client)``; a master that refuses writes for want of replicas
        (``min-replicas-to-write``) is waited out like a WAIT short of them."""
        try:
            return op(self.client())
        except ResponseError as exc:
            if "NOREPLICAS" in str(exc):
                raise NotReplicated(str(exc)) from exc
            raise

    def _lost(self) -> QueueDataLost:
        """The queue's data is gone (sticky: the run cannot go on)."""
        self._failure = QueueDataLost(
            f"the Redis server lost {self._what}'s data (restarted without persistence?)"
        )
        return self._failure

    def _outage(self, exc: Exception) -> float:
        """Note a failure of the link: start the outage clock (one line, in the
        process that made the link), or give up for good once it is ``retry_for``
        seconds old.  Returns the seconds left."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            if os.getpid() == self._maker:
                log.warning("pcq: lost the link to Redis at %s (%s); reconnecting for up to %g s",
                            self.where, exc, self.retry_for)
        left = self._down_since + self.retry_for - now
        if left <= 0:
            self._failure = BackendLost(
                f"lost Redis at {self.where}: unreachable, retried {self.retry_for:g} s "
                f"(--reconnect-timeout): {exc}"
            )
            raise self._failure from exc
        return left

    def _back(self) -> None:
        since, self._down_since = self._down_since, None
        if since is not None and os.getpid() == self._maker:
            log.warning("pcq: the link to Redis at %s is back after %.1f s",
                        self.where, time.monotonic() - since)

    def probe(self) -> bool:
        """One PING, no retry: True when the server answers, False while it is
        away within the budget.  Raises :class:`~pcq.errors.BackendLost` once the
        budget is spent or the queue's data was lost."""
        def ping(client: redis.Redis) -> Any:
            # A client of its own, whose reads time out with the connect timeout:
            # a partition must not hold a supervisor's loop for the socket timeout.
            if self._prober is None or self._prober_at != self._owner:
                self._prober = self._build(socket_timeout=CONNECT_TIMEOUT)
                self._prober_at = self._owner
            return self._prober.ping()

        try:
            self.call(ping, retry=False)
        except BackendLost:
            raise
        except BackendUnavailable:
            return False
        return True

    def close(self) -> None:
        """Close the connections of a client this link built (an injected one is
        its owner's to close)."""
        with self._lock:
            client, self._client = self._client, self._injected
            prober, self._prober = self._prober, self._injected
            self._scripts = {}
            self._pinged = False
            cluster, self._cluster = self._cluster, None
        if cluster is not None and self._pid == os.getpid():
            cluster.close()
        for built in (client, prober):
            if built is not None and built is not self._injected and self._pid == os.getpid():
                built.close()
