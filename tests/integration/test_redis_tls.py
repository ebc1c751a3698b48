"""TLS (``rediss://``) and ACL users against a real redis-server (issue #9.6).

The test makes its own CA and server certificate with the ``openssl`` command
and starts redis-server with ``--tls-port`` only (``--port 0``); pcq gets the CA
through the URL (``?ssl_ca_certs=PATH``, which redis-py reads).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from apps.jobs import handled
from helpers_cli import PCQ, ROOT, pcq_env, start_pcq
from redis_server import RedisServer

APP = "tests/apps/jobs.py"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> None:
    """ca.crt, and server.crt/server.key for 127.0.0.1 signed by it."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    # The extensions Python 3.13's strict X.509 checks ask for: a CA with key
    # usage, a leaf with an authority key identifier.
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=pcq test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash", cwd=where)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=127.0.0.1", cwd=where)
    (where / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.ext",
            cwd=where)


class TlsRedisServer(RedisServer):
    """A redis-server that speaks TLS only, with the test's own CA."""

    def __init__(self, certs: Path) -> None:
        super().__init__()
        self.certs = certs
        at = self.args.index("--port")
        self.args[at : at + 2] = ["--port", "0", "--tls-port", str(self.port)]
        self.args += ["--tls-cert-file", str(certs / "server.crt"),
                      "--tls-key-file", str(certs / "server.key"),
                      "--tls-ca-cert-file", str(certs / "ca.crt"),
                      "--tls-auth-clients", "no"]

    def url_for(self, auth: str = "") -> str:
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.certs / 'ca.crt'}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, socket_timeout=5,
                           ssl_ca_certs=str(self.certs / "ca.crt"))

    def start(self) -> TlsRedisServer:
        self.process = subprocess.Popen([self.binary, *self.args], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start:\n{self.log()}")
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedisServer]:
    certs = tmp_path_factory.mktemp("certs")
    make_certificates(certs)
    server = TlsRedisServer(certs).start()
    try:
        yield server
    finally:
        server.cleanup()


def pcq_run(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = subprocess.run([*PCQ, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def a_job(url: str, tmp_path: Path) -> None:
    """Two consumers and a producer of 50 tasks over ``url``: every one done once."""
    env = pcq_env(url, tmp_path, JOBS_N="50")
    host = start_pcq(["consume", f"{APP}:handle", "--workers", "2"], env)
    code, out, err = pcq_run(["produce", f"{APP}:produce", "--json"], env)
    assert code == 0, err
    assert json.loads(out)["done"] == 50
    _, host_err = host.communicate(timeout=60)
    assert host.returncode == 0, host_err
    assert sorted(handled(tmp_path)) == list(range(50))


@pytest.mark.timeout(120)
def test_a_job_over_tls_with_the_ca_in_the_url(tls_server: TlsRedisServer, tmp_path: Path) -> None:
    a_job(tls_server.url_for(), tmp_path)


@pytest.mark.timeout(120)
def test_a_job_as_an_acl_user_that_may_not_run_admin_commands(
    tls_server: TlsRedisServer, tmp_path: Path
) -> None:
    # Given a user limited to pcq's keys and to non-dangerous commands (no CONFIG)
    tls_server.client().acl_setuser("worker", enabled=True, passwords=["+s3cret"],
                                    keys=["pcq:*"], commands=["+@all", "-@dangerous"])
    # Then a whole job runs as that user
    a_job(tls_server.url_for("worker:s3cret@"), tmp_path)


@pytest.mark.timeout(60)
def test_a_wrong_password_is_one_line_and_exit_2(
    tls_server: TlsRedisServer, tmp_path: Path
) -> None:
    tls_server.client().acl_setuser("worker2", enabled=True, passwords=["+right"],
                                    keys=["pcq:*"], commands=["+@all"])
    env = pcq_env(tls_server.url_for("worker2:wrong@"), tmp_path)
    code, _, err = pcq_run(["status"], env)
    assert code == 2
    assert err.startswith("pcq: error: ") and len(err.strip().splitlines()) == 1, err
    assert "worker2:***@" in err and "wrong" not in err.replace("worker2:***", "")


@pytest.mark.timeout(60)
def test_rediss_against_a_plain_server_fails_in_about_a_second(
    shared_redis: RedisServer, tmp_path: Path
) -> None:
    env = pcq_env(f"rediss://127.0.0.1:{shared_redis.port}/0", tmp_path)
    started = time.monotonic()
    code, _, err = pcq_run(["status"], env)
    elapsed = time.monotonic() - started
    assert code == 2
    assert err.startswith("pcq: error: cannot reach Redis at rediss://127.0.0.1:"), err
    assert len(err.strip().splitlines()) == 1, err
    # Bounded by the 2 s connect timeout plus the interpreter's start; before the
    # fix it waited for the 10 s socket timeout.  Generous, for a loaded machine.
    assert elapsed < 7.0, f"{elapsed:.1f} s: the TLS handshake must not wait for the socket timeout"
