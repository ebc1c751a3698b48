"""Where a queue's master is: one server, a Redis Cluster, or behind Sentinel.

:class:`~pcq.backends.redis_link.Link` always talks to one master through a
plain ``redis.Redis`` client — scripts, pipelines and ``WAIT`` must reach one
node on one connection.  This module finds that master:

* ``redis://`` / ``rediss://`` of a single server: the URL's server.
* The same URL of any node of a Redis Cluster (the server says
  ``cluster_enabled:1``): :class:`ClusterMap` asks redis-py's ``RedisCluster``
  for the slot map and gives the address of the master that owns the queue's
  hash slot.  After MOVED / ASK / a lost master the link asks it again, which
  follows a resharding and a failover.  The nodes it knows travel to child
  processes (:meth:`ClusterMap.nodes`), so a child finds the cluster even when
  the node named in the URL has died since.
* ``redis+sentinel://[[USER]:PASS@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]`` (or
  ``rediss+sentinel://``): :func:`sentinel_master` gives redis-py's
  Sentinel-managed client, whose every new connection asks the sentinels for
  the current master.  The password is the data nodes'; the sentinels are
  asked without one.

The URL's ``wait`` and ``wait_timeout_ms`` query parameters are pcq's, not
redis-py's (:func:`durability`); they are taken off before redis-py parses it.

Also here, what a link needs to know about a server and its URL: the URL
without its password (:func:`safe_url`), TLS with a bounded handshake
(:class:`TlsConnection`), how many replicas a master reports
(:func:`connected_replicas`), and whether it keeps anything on restart
(:func:`warn_about`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from pcq.errors import BackendUnavailable

log = logging.getLogger("pcq")

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Default ``wait_timeout_ms``: how long one WAIT gives a replica before the
#: write is sent again.
WAIT_TIMEOUT_MS = 1000


@dataclass(frozen=True, slots=True)
class Durability:
    """How many replicas a write must reach before it counts: ``replicas`` None
    means one when the master reports a connected replica, else none."""

    replicas: int | None = None
    timeout_ms: int = WAIT_TIMEOUT_MS

    def wanted(self, connected: int) -> int:
        """Replicas to WAIT for on a master that reports ``connected`` replicas."""
        if self.replicas is None:
            return 1 if connected > 0 else 0
        return self.replicas


def durability(url: str) -> tuple[str, Durability]:
    """``url`` without pcq's own query parameters, and what they ask for
    (ValueError for a value that is not a count)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in ("wait", "wait_timeout_ms")}
    rest = [(k, v) for k, v in query if k not in ours]
    try:
        replicas = int(ours["wait"]) if "wait" in ours else None
        timeout = int(ours.get("wait_timeout_ms", WAIT_TIMEOUT_MS))
    except ValueError as exc:
        raise ValueError(f"wait and wait_timeout_ms must be whole numbers ({exc})") from exc
    if (replicas is not None and replicas < 0) or timeout < 1:
        raise ValueError("wait must be 0 or more and wait_timeout_ms 1 or more")
    if ours:  # rebuilt by hand: urlunsplit would turn unix:///path into unix:/path
        base = url.partition("?")[0]
        url = f"{base}?{urlencode(rest)}" if rest else base
    return url, Durability(replicas, timeout)


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    options: dict[str, str] = field(default_factory=dict)  # ssl_* query parameters

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
        path = [p for p in parts.path.split("/") if p]
        if not hosts or not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("it must be redis+sentinel://[[USER]:PASS@]HOST:PORT[,HOST:PORT...]"
                             "/SERVICE[/DB]")
        sentinels = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError(f"{host!r} is not HOST:PORT")
            sentinels.append((name.strip("[]"), int(port)))
        return cls(
            sentinels, unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
            unquote(username) or None, unquote(password) or None,
            parts.scheme == "rediss+sentinel", dict(parse_qsl(parts.query)),
        )

    def where(self) -> str:
        """The URL without the password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.service}/{self.db}"


def sentinel_master(spec: SentinelUrl, **connection: Any) -> redis.Redis:
    """A client of the master of ``spec.service``; every new connection asks the
    sentinels where the master is now (redis-py's ``SentinelConnectionPool``)."""
    tls: dict[str, Any] = {"ssl": True, **spec.options} if spec.tls else {}
    timeout = connection["socket_connect_timeout"]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        spec.sentinels,
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout,
                         "retry": connection["retry"], **tls},
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call]
        spec.service, db=spec.db, username=spec.username, password=spec.password,
        **tls, **connection,
    )
    return cast("redis.Redis", master)


def explain_no_master(spec: SentinelUrl, exc: MasterNotFoundError) -> BackendUnavailable:
    """What a MasterNotFoundError at the first connection means, in one line: no
    sentinel answered, or none knows the service."""
    for host, port in spec.sentinels:
        probe = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2,
                            retry=Retry(NoBackoff(), 0))
        try:
            masters = cast("dict[str, Any]", probe.sentinel_masters())
        except RedisError:
            continue
        finally:
            probe.close()
        if spec.service not in masters:
            return BackendUnavailable(
                f"the sentinels at {spec.where()} know no service {spec.service!r}"
                f" (they know: {', '.join(sorted(masters)) or 'none'})"
            )
        return BackendUnavailable(f"the sentinels at {spec.where()} know no live master "
                                  f"of {spec.service!r} now")
    return BackendUnavailable(f"cannot reach any sentinel at {spec.where()}: {exc}")


def says_cluster(client: redis.Redis) -> bool:
    """Whether the server behind ``client`` is a Redis Cluster node.  A server
    that refuses INFO (ACL, managed Redis) is taken for a single server."""
    try:
        info = client.info("cluster")
    except redis.exceptions.ResponseError:
        return False
    return bool(info.get("cluster_enabled"))


class ClusterMap:
    """The slot map of a Redis Cluster, kept by redis-py's ``RedisCluster``."""

    def __init__(self, nodes: list[tuple[str, int]], url: str, **connection: Any) -> None:
        kwargs = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        for name in ("host", "port", "db", "connection_class"):
            kwargs.pop(name, None)
        if url.startswith("rediss://"):
            kwargs["ssl"] = True
        try:
            self._cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                               for host, port in nodes],
                require_full_coverage=False, **kwargs, **connection,
            )
        except (RedisClusterException, RedisError) as exc:
            raise redis.exceptions.ConnectionError(f"no cluster node answered: {exc}") from exc

    def owner(self, key: str) -> tuple[str, int]:
        """The address of the master that owns ``key``'s slot, as last seen."""
        node = self._cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
        return node.host, int(node.port)

    def same_slot(self, a: str, b: str) -> bool:
        slot = self._cluster.keyslot
        return bool(slot(a) == slot(b))  # type: ignore[no-untyped-call]

    def refresh(self) -> None:
        """Ask the cluster again (after MOVED, ASK or a lost master)."""
        try:
            self._cluster.nodes_manager.initialize()
        except (RedisClusterException, RedisError) as exc:
            raise redis.exceptions.ConnectionError(f"no cluster node answered: {exc}") from exc

    def nodes(self) -> list[tuple[str, int]]:
        """Every node the map knows, masters first."""
        every = self._cluster.get_nodes()  # type: ignore[no-untyped-call]
        found = sorted(every, key=lambda n: n.server_type != "primary")
        return [(n.host, int(n.port)) for n in found]

    def close(self) -> None:
        self._cluster.close()


def node_url(url: str, host: str, port: int) -> str:
    """``url`` pointed at node ``host:port`` (database 0: a cluster has no other)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc, path="/0"))


class TlsConnection(redis.SSLConnection):
    """An SSL connection whose handshake is bounded by the connect timeout."""

    def _connect(self) -> Any:
        timeout = self.socket_timeout
        self.socket_timeout = self.socket_connect_timeout  # wrap_socket handshakes under it
        try:
            sock = super()._connect()  # type: ignore[no-untyped-call]
        finally:
            self.socket_timeout = timeout
        sock.settimeout(timeout)
        return sock


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url.split("@")[-1]
    if not password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def describe(client: redis.Redis) -> str:
    """Where an injected client points, for messages."""
    kwargs = client.get_connection_kwargs()
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def connected_replicas(connection: Any) -> int:
    """How many replicas the master on ``connection`` (a redis-py connection,
    being set up) reports; 0 if it will not say (an ACL user without INFO)."""
    connection.send_command("INFO", "replication")
    try:
        info = connection.read_response()
    except ResponseError:
        return 0
    text = info.decode() if isinstance(info, bytes) else str(info)
    found = [line for line in text.splitlines() if line.startswith("connected_slaves:")]
    return int(found[0].split(":")[1]) if found else 0


def warn_about(client: redis.Redis, where: str) -> None:
    """Warn about a server that can lose the queue: no persistence at all, or
    an evicting maxmemory-policy (the link warns once per process and server).
    A server that refuses CONFIG (managed Redis, ACL) is not second-guessed."""
    try:
        config = client.config_get("appendonly", "save", "maxmemory-policy")
    except RedisError:
        return
    if config.get("appendonly") == "no" and not config.get("save"):
        log.warning(
            "pcq: warning: Redis at %s keeps nothing on restart (appendonly no, no save "
            "points): a restart loses the queue; see 'Running Redis for pcq' in the README",
            where,
        )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            "pcq: warning: Redis at %s has maxmemory-policy %s: it may evict queue keys; "
            "use noeviction", where, policy,
        )


class NotReplicated(redis.exceptions.ConnectionError):
    """WAIT saw fewer replicas than wanted acknowledge a write: it is not done
    (an outage, as far as the link is concerned: the write is sent again)."""


def pipeline_with_wait(
    client: redis.Redis, calls: list[tuple[Script, list[str], list[Any]]], replicas: int,
    timeout_ms: int,
) -> list[Any]:
    """The replies of the script ``calls``, sent in one pipeline (not a
    transaction: each script is atomic) and, if ``replicas``, ``WAIT`` on the
    same connection, so that it counts these writes.  Scripts the server lost
    (a restart, a promoted replica) are loaded and the whole pipeline is sent
    again.  Raises the first error a call returned, or :class:`NotReplicated`."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        if replicas:
            pipe.execute_command("WAIT", replicas, timeout_ms)  # type: ignore[no-untyped-call]
        replies = pipe.execute(raise_on_error=False)
        lost = {c[0].sha: c[0] for c, r in zip(calls, replies, strict=False)
                if isinstance(r, NoScriptError)}
        if not lost or attempt == 2:
            break
        for script in lost.values():
            client.script_load(script.script)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    if replicas and int(replies[-1]) < replicas:
        raise NotReplicated(f"{replies[-1]} of {replicas} replica(s) acknowledged a write "
                            f"within {timeout_ms} ms")
    return list(replies[: len(calls)])
