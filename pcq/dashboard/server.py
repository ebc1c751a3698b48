"""The dashboard's HTTP server: the standard library's ThreadingHTTPServer.

Paths, and nothing else (every other path is 404):

* ``/`` — the page; ``/static/NAME`` — its files, looked up by name in what
  was read from the package's ``static`` folder at start, never joined to a
  file system path, so no request can reach another file.
* ``/api/state`` — the collector's last snapshot, JSON.
* ``/metrics`` — Prometheus text (see :mod:`pcq.dashboard.metrics`).
* ``POST /api/requeue`` and ``POST /api/close`` (``{"queue": NAME}``) — only
  when actions were enabled, and only with the token printed at start
  (header ``X-Pcq-Token``; a header, not a cookie, so another site's page
  cannot make a browser send it).

With basic auth (``--auth USER:PASS``) every request must carry it.  A failing
backend never becomes a 500: the page reads "disconnected" from the snapshot,
and ``/metrics`` answers 503, which Prometheus records as a failed scrape.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

from pcq.dashboard.collect import FAILURES, Collector
from pcq.dashboard.metrics import MISSING, Exposition, available

log = logging.getLogger("pcq")

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The page and its code come from this server only (no CDN, no inline script).
POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
#: Largest action request body read.
MAX_BODY = 4096


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file of the package's static folder: name -> (bytes, content type)."""
    out = {}
    for entry in files("pcq.dashboard").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in TYPES:
            out[entry.name] = (entry.read_bytes(), TYPES[suffix])
    return out


class App:
    """What a request handler needs: the collector, the assets, the secrets."""

    def __init__(self, collector: Collector, token: str | None, auth: str | None) -> None:
        self.collector = collector
        self.token = token  # None: read-only
        self.auth = auth  # "user:pass" or None
        self.assets = static_files()
        self.metrics = Exposition(collector.counters) if available() else None

    def authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        expected = "Basic " + base64.b64encode(self.auth.encode()).decode()
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def token_ok(self, header: str | None) -> bool:
        if self.token is None or header is None:
            return False
        return hmac.compare_digest(header.encode(), self.token.encode())


class Handler(BaseHTTPRequestHandler):
    server_version = "pcq-dashboard"
    sys_version = ""
    app: App  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("pcq dashboard: " + format, *args)

    def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", POLICY)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _text(self, status: int, text: str) -> None:
        self._send(status, (text + "\n").encode())

    def _json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _allowed(self) -> bool:
        if self.app.authorized(self.headers.get("Authorization")):
            return True
        self._send(HTTPStatus.UNAUTHORIZED, b"pcq dashboard: log in\n",
                   headers={"WWW-Authenticate": 'Basic realm="pcq dashboard"'})
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._asset("index.html")
        elif path.startswith("/static/"):
            self._asset(path[len("/static/"):])
        elif path == "/api/state":
            self._json(self.app.collector.state())
        elif path == "/metrics":
            self._metrics()
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")

    def _asset(self, name: str) -> None:
        found = self.app.assets.get(name)  # a name, never a path: no way out
        if found is None:
            self._text(HTTPStatus.NOT_FOUND, "not found")
        else:
            self._send(HTTPStatus.OK, found[0], found[1])

    def _metrics(self) -> None:
        if self.app.metrics is None:
            self._text(HTTPStatus.NOT_IMPLEMENTED, MISSING)
            return
        try:
            body = self.app.metrics.render()
        except FAILURES as exc:
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"pcq: cannot read the queues: {exc}")
            return
        self._send(HTTPStatus.OK, body, METRICS_TYPE)

    def do_POST(self) -> None:
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        action = {"/api/requeue": "requeue", "/api/close": "close"}.get(path)
        if action is None:
            self._text(HTTPStatus.NOT_FOUND, "not found")
        elif self.app.token is None:
            self._json({"error": "actions are off: start the dashboard with --allow-actions"},
                       HTTPStatus.FORBIDDEN)
        elif not self.app.token_ok(self.headers.get("X-Pcq-Token")):
            self._json({"error": "this action needs the token the dashboard printed at start"},
                       HTTPStatus.FORBIDDEN)
        else:
            self._act(action)

    def _act(self, action: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(min(length, MAX_BODY)) or b"{}")
            name = str(request["queue"])
        except (ValueError, KeyError, TypeError):
            self._json({"error": 'give {"queue": NAME} as JSON'}, HTTPStatus.BAD_REQUEST)
            return
        try:
            count = self.app.collector.act(name, action)
        except KeyError:
            self._json({"error": f"no queue {name!r} here"}, HTTPStatus.NOT_FOUND)
        except FAILURES as exc:
            self._json({"error": str(exc)}, HTTPStatus.SERVICE_UNAVAILABLE)
        else:
            log.warning("pcq dashboard: %s on queue %r (%d)", action, name, count)
            self._json({"queue": name, "action": action, "count": count})


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose handler threads never hold the process up."""

    daemon_threads = True
    allow_reuse_address = True


def make_server(app: App, host: str, port: int) -> Server:
    handler = type("BoundHandler", (Handler,), {"app": app})
    cls: type[Server] = Server
    if ":" in host:  # an IPv6 address
        cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    return cls((host, port), handler)
