"""A real ``redis-server`` for tests: a free loopback port, a private temp dir.

    server = RedisServer(appendonly=True).start()
    url = server.url
    server.restart()   # same port and dir: with appendonly the data survives
    server.stop()

Nothing is skipped: if ``redis-server`` is not installed, :meth:`RedisServer.start`
raises with a message that says so, and the tests that need it fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process, startable again on the same port and dir."""

    def __init__(
        self,
        *,
        appendonly: bool = False,
        password: str | None = None,
        extra: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        found = binary or os.environ.get("PCQ_REDIS_SERVER") or shutil.which("redis-server")
        if not found:
            raise RuntimeError(
                "redis-server is not installed (or not on PATH; set PCQ_REDIS_SERVER): "
                "the Redis integration tests need a real server"
            )
        self.binary = found
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pcq-redis-"))
        self.password = password
        self.args = [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--logfile", str(self.dir / "redis.log"),
            *(["--requirepass", password] if password else []),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> RedisServer:
        self.process = subprocess.Popen([self.binary, *self.args], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        probe = redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=1
        )
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start:\n{self.log()}")
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    if probe.ping():
                        return self
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
                time.sleep(0.02)
        finally:
            probe.close()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: a clean shutdown (an append-only file is flushed)."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self._end(signal.SIGKILL, 10.0)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
