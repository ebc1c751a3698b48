"""I/O-bound work: fetch 400 pages from a slow HTTP server, many at a time.

Each page takes 0.2 s to answer, so one request at a time per process wastes
the machine.  ``--concurrency`` runs many requests at once in each consumer
process: a plain handler in threads, an ``async def`` handler on an event loop.

    pcq run examples/fetch.py:produce examples/fetch.py:handle --workers 2 --concurrency 50
    pcq run examples/fetch.py:produce examples/fetch.py:ahandle --workers 1 --concurrency 100

Both finish in about a second (without ``--concurrency``: 40 s).  The example
starts its own server on a free loopback port when it is imported (by ``pcq``,
before it starts any process), so nothing here needs the internet.  The
addresses travel as paths; ``FETCH_BASE`` (inherited by the consumers) says
where the server is.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PAGES = int(os.environ.get("FETCH_PAGES", "400"))
DELAY = float(os.environ.get("FETCH_DELAY", "0.2"))


class SlowPages(BaseHTTPRequestHandler):
    """Answers every GET after DELAY seconds with a small JSON page."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        time.sleep(DELAY)
        body = json.dumps({"path": self.path, "served_at": time.time()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: 400 lines of access log would hide pcq's summary


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: 100 clients connect at once (default 5)


def _serve() -> str:
    server = Server(("127.0.0.1", 0), SlowPages)
    threading.Thread(target=server.serve_forever, name="fetch-server", daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


if "FETCH_BASE" not in os.environ:
    os.environ["FETCH_BASE"] = _serve()


def produce() -> list[str]:
    return [f"/page/{n}" for n in range(PAGES)]


def handle(path: str) -> int:
    """Fetch one page with urllib (in one of the consumer's threads)."""
    with urllib.request.urlopen(os.environ["FETCH_BASE"] + path, timeout=30) as response:
        page = json.loads(response.read())
    assert page["path"] == path
    return len(page)


async def ahandle(path: str) -> int:
    """Fetch one page with asyncio streams (as one of the consumer's asyncio tasks)."""
    where = urlsplit(os.environ["FETCH_BASE"])
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {where.netloc}\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"{path}: {status.decode().strip()}")
        _head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    finally:
        writer.close()
        await writer.wait_closed()
    page = json.loads(body)
    assert page["path"] == path
    return len(page)
