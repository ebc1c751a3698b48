"""A live web page of pcq's queues and pipelines, and Prometheus metrics.

``pcq dashboard --url URL`` serves every queue of a Redis server
(:func:`serve`); ``pcq run ... --dashboard [HOST:]PORT`` serves a job's own
queues while it runs (:func:`for_job`), on the local backend too: the
dashboard then owns the job's broker, so it reads the queues in the process
that holds them.

The parts: :mod:`~pcq.dashboard.sources` (where queues are read from),
:mod:`~pcq.dashboard.collect` (one refresh thread, the snapshot, throughput
history), :mod:`~pcq.dashboard.metrics` (``/metrics``),
:mod:`~pcq.dashboard.server` (HTTP), and ``static/`` (the page: HTML, CSS
and a small script that draws the charts as SVG; no build step, nothing
fetched from elsewhere).

Safe by default: loopback only unless a host is given, read-only unless
actions are enabled — then each action needs the token printed at start — and
one warning line when it serves beyond loopback without basic auth.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pcq.errors import ConfigError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "for_job", "parse_address", "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to loopback.  An IPv6
    host goes in brackets: ``[::1]:8321``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535 or (sep and not host):
        raise ConfigError(f"--dashboard {text!r}: give [HOST:]PORT, e.g. 8321 or 0.0.0.0:8321")
    return host, number


def check_auth(auth: str | None) -> str | None:
    if auth is not None and ":" not in auth:
        raise ConfigError("--auth (or PCQ_DASHBOARD_AUTH) must be USER:PASS")
    return auth


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(url: str | None, host: str, port: int, *, allow_actions: bool = False,
          auth: str | None = None) -> None:
    """``pcq dashboard``: serve every queue on the Redis server ``url`` until
    Ctrl-C (KeyboardInterrupt)."""
    # Imported here: the HTTP server and redis-py load only when a dashboard is
    # served, so `pcq run` on the local backend still never imports redis-py.
    from pcq.dashboard.service import serve_server

    serve_server(url, host, port, allow_actions=allow_actions, auth=auth)


@contextmanager
def for_job(address: str | None, backend: str | None, url: str | None,
            queues: list[str]) -> Iterator[dict[str, Any]]:
    """``pcq run --dashboard [HOST:]PORT``: serve the job's ``queues`` (its
    stages' queues, in order) while the ``with`` block runs; yields the queue
    options to hand the job (none without ``address``).  On the local backend
    the dashboard starts the broker and the job's queues live on it (option
    ``broker``), so that this process, which owns it, reads them; the broker
    stops after the job has let go of its queues."""
    if address is None:
        yield {}
        return
    host, port = parse_address(address)
    from pcq.dashboard.service import job_dashboard  # see serve()

    with job_dashboard(host, port, backend, url, queues) as options:
        yield options
