"""The connection under the Redis backend.

One :class:`Link` owns a ``redis.Redis`` client and is the one place where
redis-py's errors become pcq's:

* The first use pings.  If that fails, the URL is wrong or the server is down:
  :class:`~pcq.errors.BackendUnavailable` at once, one line naming the URL
  (never its password).  A URL redis-py cannot parse is a
  :class:`~pcq.errors.ConfigError` when the link is made.
* Once connected, a dropped connection (server restarted, failover, network
  blip) is retried with exponential backoff — 0.05 s doubling to 2 s — for up to
  ``retry_for`` seconds.  redis-py's own retries are switched off: a command
  whose reply was lost must come back to the caller, which knows whether
  running it again is safe (see the Lua scripts' comments).
* A refusal (wrong password, ACL) is never retried.

A link crosses process boundaries as its URL: the client is dropped when pickled
and rebuilt, lazily, in a process whose pid differs from its maker's.  An injected
client is used as is (redis-py's pool reconnects after a fork by itself) and does
not survive pickling.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.retry import Retry

from pcq.errors import BackendUnavailable, ConfigError

T = TypeVar("T")

#: Errors worth waiting out: the server is restarting, loading, or unreachable.
RETRYABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: The server answered and said no: retrying cannot help.
REFUSED = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)
FIRST_PAUSE = 0.05
LONGEST_PAUSE = 2.0
#: Longest a blocking command waits server-side; the socket timeout must exceed it.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0


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


def _describe(client: redis.Redis) -> str:
    kwargs = client.get_connection_kwargs()
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def load_script(name: str) -> str:
    """The source of ``pcq/backends/<name>.lua``."""
    return files("pcq.backends").joinpath(f"{name}.lua").read_text(encoding="utf-8")


class Link:
    """A Redis client that reconnects, retries and translates errors."""

    def __init__(
        self, url: str, client: redis.Redis | None = None, retry_for: float = 60.0
    ) -> None:
        self.url = url
        self.retry_for = retry_for
        self._injected = client
        self._connected_once = False  # crosses pickling: a child of a live job retries
        self._client: redis.Redis | None = None
        self._pinged = False
        self._scripts: dict[str, Script] = {}
        self._reset()
        if client is not None:
            if client.get_connection_kwargs().get("decode_responses"):
                raise ConfigError("pcq needs a Redis client with decode_responses=False")
            self.where = _describe(client)
        else:
            self.where = safe_url(url)
            self._client = self._build()  # a bad URL fails here, not at first use

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._client = self._injected
        self._pinged = False
        self._scripts = {}
        self._lock = threading.Lock()

    def _build(self) -> redis.Redis:
        try:
            parts = urlsplit(self.url)
            db = parts.path.strip("/")
            if parts.scheme in ("redis", "rediss") and db and not db.isdigit():
                raise ValueError(f"the database must be a number, not {db!r}")  # not db 0
            return redis.Redis.from_url(
                self.url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {safe_url(self.url)!r}: {exc}") from exc

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_client", "_injected", "_scripts", "_lock", "_pinged", "_pid"):
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
            if self._client is None:
                self._client = self._build()
            client = self._client
        if not self._pinged:
            client.ping()
            self._pinged = self._connected_once = True
        return client

    def script(self, name: str) -> Script:
        """The Lua script ``name`` registered on this process's client."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client().register_script(load_script(name))
        return script

    def run(self, name: str, keys: list[str], args: list[Any], *, retry: bool = True) -> Any:
        """Run script ``name`` (EVALSHA, loading it if the server lost it) through
        :meth:`call`."""
        return self.call(
            lambda client: self.script(name)(keys=keys, args=args, client=client), retry=retry
        )

    def call(self, op: Callable[[redis.Redis], T], *, retry: bool = True) -> T:
        """``op(client)``, with redis-py's errors translated and dropped connections
        retried (unless ``retry`` is False).  ``op`` must be safe to run again after
        a reply was lost."""
        pause = FIRST_PAUSE
        give_up: float | None = None
        while True:
            try:
                return op(self.client())
            except REFUSED as exc:
                raise BackendUnavailable(f"Redis at {self.where} refused us: {exc}") from exc
            except RETRYABLE as exc:
                if not self._connected_once:
                    raise BackendUnavailable(f"cannot reach Redis at {self.where}: {exc}") from exc
                now = time.monotonic()
                give_up = now + self.retry_for if give_up is None else give_up
                if not retry or now >= give_up:
                    raise BackendUnavailable(
                        f"lost Redis at {self.where} (retried {self.retry_for:g} s): {exc}"
                    ) from exc
                time.sleep(min(pause, give_up - now))
                pause = min(pause * 2, LONGEST_PAUSE)
            except ResponseError as exc:
                raise BackendUnavailable(f"Redis at {self.where} said: {exc}") from exc
            except RedisError as exc:
                raise BackendUnavailable(f"Redis at {self.where}: {exc}") from exc

    def close(self) -> None:
        """Close the connections of a client this link built (an injected one is
        its owner's to close)."""
        with self._lock:
            client, self._client = self._client, self._injected
            self._scripts = {}
            self._pinged = False
        if client is not None and client is not self._injected and self._pid == os.getpid():
            client.close()
