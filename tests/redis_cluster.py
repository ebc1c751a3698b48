"""Real Redis Cluster, Sentinel and a pausable TCP proxy for the tests.

    cluster = RedisClusterNodes(masters=3, replicas=1).start()
    cluster.url(0)                  # redis:// of node 0 (any node works for pcq)
    cluster.owner("pcq:{q}:run")    # the node (a RedisServer) that owns a key's slot
    cluster.cleanup()

    group = SentinelGroup(replicas=1, sentinels=3).start()
    group.url("svc")                # redis+sentinel://h:p,h:p,h:p/svc/0
    group.cleanup()

    proxy = Proxy(target_port).start()   # forwards 127.0.0.1:proxy.port -> target
    proxy.pause() / proxy.resume()        # hold bytes in both directions (a lagging link)

Each node is a :class:`~redis_server.RedisServer` (free loopback port, private
dir); timeouts are short (cluster-node-timeout 1000 ms, down-after 1000 ms) so a
failover takes seconds.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import subprocess
import threading
import time
from pathlib import Path

import redis
from redis_server import RedisServer, free_port

FORM_TIMEOUT = 30.0


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (+10000) is free too."""
    while True:
        port = random.randrange(20000, 45000)
        with contextlib.ExitStack() as stack:
            try:
                for p in (port, port + 10000):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port


def _wait(check: object, what: str, timeout: float = FORM_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if check():  # type: ignore[operator]
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class RedisClusterNodes:
    """``masters`` cluster masters with ``replicas`` replicas each."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        extra = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(node_timeout_ms),
                 "--cluster-replica-validity-factor", "0", "--appendonly", "yes",
                 "--repl-diskless-sync-delay", "0")
        self.masters, self.replicas = masters, replicas
        self.nodes = [RedisServer(extra=extra) for _ in range(masters * (1 + replicas))]
        for node in self.nodes:  # RedisServer's --appendonly comes first; ours wins
            node.port = cluster_port()
            node.args[1] = str(node.port)  # "--port", PORT
            node.args += ["--cluster-config-file", str(node.dir / "nodes.conf")]

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses,
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=FORM_TIMEOUT,
            )
            for node in self.nodes:
                _wait(lambda n=node: n.client().cluster("info")["cluster_state"] == "ok",
                      f"cluster state ok on {node.port}")
            if self.replicas:
                _wait(self._replicas_in_sync, "replicas in sync")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _replicas_in_sync(self) -> bool:
        for node in self.live():
            info = node.client().info("replication")
            if info["role"] == "slave" and info["master_link_status"] != "up":
                return False
        return True

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def url(self, index: int = 0) -> str:
        return self.nodes[index].url

    def owner(self, key: str) -> RedisServer:
        """The master that owns ``key``'s slot, as a live node sees it now."""
        client = self.live()[0].client()
        slot = int(client.cluster("keyslot", key))
        for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no master owns slot {slot}")

    def wait_for_new_owner(self, key: str, dead: RedisServer, timeout: float = 20.0) -> float:
        """Seconds until a live master other than ``dead`` owns ``key``'s slot."""
        start = time.monotonic()
        _wait(lambda: self.owner(key) is not dead and self.owner(key) in self.live(),
              "a replica promoted", timeout)
        return time.monotonic() - start

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class LaggingCluster(RedisClusterNodes):
    """Three masters; master 0 has one replica, which replicates through a
    :class:`Proxy` (``self.proxy``) the test can pause.  Master 0 announces
    itself at 127.0.0.2 (same ports), where the proxy and a second one for its
    cluster bus listen: everyone reaches it through them, and only the
    replication link is ever held."""

    def __init__(self, node_timeout_ms: int = 1000) -> None:
        super().__init__(masters=3, replicas=0, node_timeout_ms=node_timeout_ms)
        first = self.nodes[0]
        first.args += ["--cluster-announce-ip", "127.0.0.2"]
        self.proxy = Proxy(first.port, listen="127.0.0.2", port=first.port)
        self.bus = Proxy(first.port + 10000, listen="127.0.0.2", port=first.port + 10000)
        replica = RedisClusterNodes(masters=1, node_timeout_ms=node_timeout_ms).nodes[0]
        self.nodes.append(replica)
        self.addresses = ["127.0.0.2", "127.0.0.1", "127.0.0.1"]

    def start(self) -> LaggingCluster:
        try:
            self.proxy.start()
            self.bus.start()
            for node in self.nodes:
                node.start()
            masters = [f"{ip}:{n.port}" for ip, n in zip(self.addresses, self.nodes, strict=False)]
            subprocess.run(["redis-cli", "--cluster", "create", *masters, "--cluster-yes"],
                           check=True, capture_output=True, timeout=FORM_TIMEOUT)
            replica, first = self.nodes[3].client(), self.nodes[0].client()
            replica.execute_command("CLUSTER", "MEET", "127.0.0.1", str(self.nodes[1].port))
            master_id = first.execute_command("CLUSTER", "MYID").decode()
            _wait(lambda: master_id.encode() in replica.execute_command("CLUSTER", "NODES"),
                  "the replica to know master 0")
            replica.execute_command("CLUSTER", "REPLICATE", master_id)
            for node in self.nodes:
                _wait(lambda n=node: n.client().cluster("info")["cluster_state"] == "ok",
                      f"cluster state ok on {node.port}")
            _wait(lambda: replica.info("replication")["master_link_status"] == "up",
                  "the replica in sync")
        except BaseException:
            self.cleanup()
            raise
        return self

    def url(self, index: int = 0) -> str:
        return self.nodes[index].url if index else f"redis://127.0.0.2:{self.nodes[0].port}/0"

    def cleanup(self) -> None:
        super().cleanup()
        self.proxy.stop()
        self.bus.stop()


class SentinelGroup:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels watching them as
    service ``svc``; ``password`` guards the data nodes (not the sentinels)."""

    def __init__(
        self, replicas: int = 1, sentinels: int = 3, password: str | None = None,
        service: str = "svc", proxied: bool = False,
    ) -> None:
        self.service, self.password = service, password
        auth = ("--masterauth", password) if password else ()
        self.master = RedisServer(password=password, appendonly=True,
                                  extra=(*auth, "--repl-diskless-sync-delay", "0"))
        # proxied: the (single) replica replicates through a Proxy the test can pause
        self.proxy: Proxy | None = Proxy(self.master.port) if proxied else None
        upstream = self.proxy.port if self.proxy else self.master.port
        self.replicas = [
            RedisServer(password=password, appendonly=True,
                        extra=(*auth, "--replicaof", "127.0.0.1", str(upstream)))
            for _ in range(replicas)
        ]
        self.sentinels = [Sentinel() for _ in range(sentinels)]
        # proxied: the sentinels know the master by the proxy's address too, or
        # they would point the replica straight at the master
        self.monitored = upstream

    def start(self) -> SentinelGroup:
        try:
            self.master.start()
            if self.proxy:
                self.proxy.start()
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:  # synced, not merely connected
                _wait(lambda r=replica: r.client().info("replication")["master_link_status"]
                      == "up", "a replica in sync")
            quorum = len(self.sentinels) // 2 + 1
            for sentinel in self.sentinels:
                sentinel.start(self.service, self.monitored, quorum, self.password)
            _wait(self._sentinels_see_all, "sentinels to see the replicas")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _sentinels_see_all(self) -> bool:
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_timeout=1)
            try:
                if len(client.sentinel_slaves(self.service)) < len(self.replicas):
                    return False
                if len(client.sentinel_sentinels(self.service)) < len(self.sentinels) - 1:
                    return False
            finally:
                client.close()
        return True

    def url(self, service: str | None = None, password: str | None = None) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        secret = password if password is not None else self.password
        auth = f":{secret}@" if secret else ""
        return f"redis+sentinel://{auth}{hosts}/{service or self.service}/0"

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinels[0].port, socket_timeout=1)
        try:
            _, port = client.sentinel_get_master_addr_by_name(self.service)
            return int(port)
        finally:
            client.close()

    def wait_for_new_master(self, old_port: int, timeout: float = 20.0) -> float:
        start = time.monotonic()
        _wait(lambda: self.master_port() != old_port, "a replica promoted", timeout)
        return time.monotonic() - start

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        if self.proxy:
            self.proxy.stop()
        for server in (self.master, *self.replicas):
            server.cleanup()


class Sentinel:
    """One ``redis-server --sentinel`` process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = RedisServer()  # its dir and binary; started with a config file below
        self.config = Path(self.server.dir) / "sentinel.conf"

    def start(self, service: str, master_port: int, quorum: int, password: str | None) -> None:
        lines = [
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.server.dir}",
            f"logfile {self.server.dir / 'sentinel.log'}",
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} 1000",
            f"sentinel failover-timeout {service} 5000",
        ]
        if password:
            lines.append(f"sentinel auth-pass {service} {password}")
        self.config.write_text("\n".join(lines) + "\n")
        self.server.port = self.port
        self.server.process = subprocess.Popen(
            [self.server.binary, str(self.config), "--sentinel"], stdin=subprocess.DEVNULL
        )
        _wait(lambda: redis.Redis(port=self.port, socket_timeout=1).ping(), "sentinel up")

    def kill(self) -> None:
        self.server.kill()

    def cleanup(self) -> None:
        self.server.cleanup()


class Proxy:
    """A TCP proxy on a free loopback port to ``127.0.0.1:target``; ``pause()``
    holds every byte, both ways, of the replication links through it (a
    connection whose client said PSYNC or REPLCONF) until ``resume()``: the
    connection stays open, so the replica lags without noticing, while every
    other client (sentinels, pcq) goes through as before."""

    def __init__(self, target: int, listen: str = "127.0.0.1", port: int | None = None) -> None:
        self.target, self.listen, self.port = target, listen, port or free_port()
        self._open = threading.Event()
        self._open.set()
        self._forwarding = threading.Lock()
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> Proxy:
        self._listener = socket.create_server((self.listen, self.port))
        self._listener.settimeout(0.1)
        self._spawn(self._accept)
        return self

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                downstream.close()
                continue
            self._spawn(self._pump, downstream, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        replication = False
        try:
            while not self._stop.is_set():
                if replication and not self._open.is_set():
                    self._open.wait(0.1)
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                with self._forwarding:  # pause() returns only once no held byte moves
                    if replication and not self._open.is_set():
                        continue
                    for sock in ready:
                        data = sock.recv(65536)
                        if not data:
                            return
                        said = data.upper()
                        replication |= sock is a and (b"PSYNC" in said or b"REPLCONF" in said)
                        peers[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def pause(self) -> None:
        with self._forwarding:
            self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def stop(self) -> None:
        self._stop.set()
        self._open.set()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2)
