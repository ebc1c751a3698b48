"""Serving a dashboard: the :class:`Dashboard` object, ``pcq dashboard`` and
``pcq run --dashboard`` (see the package docstring)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from pcq.backends import backend_for
from pcq.backends.local_broker import Broker
from pcq.backends.redis import DEFAULT_URL
from pcq.dashboard import DEFAULT_HOST, DEFAULT_PORT, check_auth, is_loopback, say
from pcq.dashboard.collect import Collector
from pcq.dashboard.metrics import MISSING, available
from pcq.dashboard.server import App, Server, make_server
from pcq.dashboard.sources import LocalSource, RedisSource, Source
from pcq.errors import ConfigError


class Dashboard:
    """A dashboard of ``source`` served on ``host:port`` (port 0: any free one)
    while in its ``with`` block, or between :meth:`start` and :meth:`stop`."""

    def __init__(self, source: Source, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 allow_actions: bool = False, auth: str | None = None) -> None:
        self.host, self.port = host, port
        self.auth = check_auth(auth)
        self.token = secrets.token_urlsafe(18) if allow_actions else None
        self.collector = Collector(source, actions=allow_actions)
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> Dashboard:
        app = App(self.collector, self.token, self.auth)
        try:
            self._server = make_server(app, self.host, self.port)
        except OSError as exc:
            raise ConfigError(f"cannot serve the dashboard on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}") from None
        self.port = int(self._server.server_address[1])
        self.collector.start()
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.2,),
                                        name="pcq-dashboard-http", daemon=True)
        self._thread.start()
        return self

    def announce(self, who: str) -> None:
        """The lines a user needs: where, the token, and a warning if exposed."""
        say(f"{who}: dashboard at {self.url} (metrics at {self.url}metrics)")
        if not available():
            say(MISSING)
        if self.token is not None:
            say(f"{who}: actions enabled; they need this token (the page asks for it, or "
                f"open {self.url}#token={self.token}): {self.token}")
        if not is_loopback(self.host) and self.auth is None:
            say(f"{who}: warning: the dashboard on {self.host} is open to anyone who can reach "
                "it (queue names, counters, cut-short task bodies); give --auth USER:PASS")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.collector.stop()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve_server(url: str | None, host: str, port: int, *, allow_actions: bool = False,
          auth: str | None = None) -> None:
    """``pcq dashboard``: serve every queue on the Redis server ``url`` until
    Ctrl-C (KeyboardInterrupt)."""
    if backend_for(None, url) == "local":
        raise ConfigError("pcq dashboard needs a queue server: give --url redis://HOST:PORT/DB "
                          "(a local job shows its own with pcq run --dashboard PORT)")
    source = RedisSource(url or DEFAULT_URL)
    with Dashboard(source, host, port, allow_actions=allow_actions, auth=auth) as dashboard:
        dashboard.announce("pcq dashboard")
        while True:
            time.sleep(3600)


@contextmanager
def job_dashboard(host: str, port: int, backend: str | None, url: str | None,
                  names: list[str]) -> Iterator[dict[str, Any]]:
    """See :func:`pcq.dashboard.for_job`."""
    broker: Broker | None = None
    source: Source
    if backend_for(backend, url) == "local":
        broker = Broker()
        broker.start()
        source = LocalSource(broker, names)
    else:
        source = RedisSource(url or DEFAULT_URL, names)
    try:
        with Dashboard(source, host, port) as dashboard:
            dashboard.announce("pcq run")
            yield {} if broker is None else {"broker": broker}
    finally:
        if broker is not None:
            broker.stop()
