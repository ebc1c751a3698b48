"""The local backend's broker: one thread that owns every ledger.

The process that opens a local queue runs a :class:`Broker` thread.  Each
producer or consumer process connects to it over a Unix socket of its own (in a
private temp dir), so a process killed at any instant can tear only its own
channel.  The broker reads requests (``local_wire``), applies each one whole to
a :class:`Ledger` — no request is ever half applied, since one thread applies
them all — and keeps, per connection, the leases it handed out.

A connection that closes without detaching is a death: the broker returns that
connection's leases to the front of ready at once (no files, no reap interval),
each task as a lease of its own with one more death counted against it; a task
with ``max_deliveries`` deaths goes to dead letters instead.  So the culprit of a
crash ends up alone, and the innocent tasks of its lease are handled.

Why a thread, not a process: the owner's death must end the queue anyway (its
children die with it through PDEATHSIG), a thread dies with it for free, and
the owner's own calls need no process to be spawned or reaped.  The fork hazard
of a threaded parent is handled by an after-fork hook that closes the broker's
sockets in every child: a child never touches the broker's state (it only
reads, once, which run each queue was in when it was forked).  A threaded
owner also means a child may get PDEATHSIG twice — when the forking thread
dies, while getppid() still names the owner, and when the process is gone —
which ``roles`` allows for.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import socket
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import Any

from pcq.backends import local_wire as wire
from pcq.backends.local_ledger import Conn, Item, Ledger, Taker


class Broker:
    """The thread that serves every connection of one local-queue family."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pcq-local-")  # mode 0700: ours alone
        self.address = os.path.join(self.dir, "broker.sock")
        self.ledgers: dict[str, Ledger] = {}
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: set[Conn] = set()
        #: pid -> leases set aside before its supervisor killed it (see _kill);
        #: None once settled.
        self._seized: dict[int, list[tuple[Ledger, list[Item]] | None]] = {}
        self._deadlines: list[tuple[float, int, Taker]] = []
        self._tiebreak = itertools.count()
        self._stopping = False
        self._owner = os.getpid()
        #: In a forked child: each queue's epoch at the fork, whether it was idle,
        #: and how many close() calls it had seen.
        self.forked_in: dict[str, tuple[int, bool, int]] = {}
        self._thread = threading.Thread(target=self._run, name="pcq-broker", daemon=True)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _close_in_child(ref))

    def open(self, name: str, maxsize: int, max_deliveries: int) -> Ledger:
        ledger = self.ledgers.get(name)
        if ledger is None:
            ledger = self.ledgers[name] = Ledger(name, maxsize, max_deliveries)
        return ledger

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close every socket (in the owner process only)."""
        if os.getpid() != self._owner or self._stopping:
            return
        self._stopping = True
        if self._thread.is_alive():
            self._wake_w.send(b"x")
            self._thread.join()
        self._close_all()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def _close_all(self) -> None:
        for conn in self._conns:
            conn.sock.close()
        self._conns.clear()
        self._sel.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stopping:
            for key, mask in self._sel.select(self._wait()):
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    self._wake_r.recv(64)
                else:
                    conn: Conn = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(conn)
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
            self._tick()

    def _wait(self) -> float | None:
        soonest: float | None = None
        while self._deadlines and self._deadlines[0][2].done:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            soonest = self._deadlines[0][0]
        for ledger in self.ledgers.values():
            if ledger.delayed and (soonest is None or ledger.delayed[0][0] < soonest):
                soonest = ledger.delayed[0][0]
        return None if soonest is None else max(0.0, soonest - time.monotonic())

    def _tick(self) -> None:
        now = time.monotonic()
        for ledger in self.ledgers.values():
            if ledger.delayed and ledger.delayed[0][0] <= now:
                ledger.due(now)
                self._serve(ledger)
        while self._deadlines and (self._deadlines[0][2].done or self._deadlines[0][0] <= now):
            taker = heapq.heappop(self._deadlines)[2]
            if not taker.done:
                taker.done = True
                self._reply(taker.conn, None)
        for ledger in self.ledgers.values():
            if ledger.takers and ledger.takers[0].done:
                ledger.takers = deque(t for t in ledger.takers if not t.done)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = Conn(sock)
        self._conns.add(conn)
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn, died=True)
            return
        buf = conn.inbuf
        buf += data
        pos, size = 0, wire.HEADER.size
        while len(buf) - pos >= size:
            (length,) = wire.HEADER.unpack_from(buf, pos)
            if len(buf) - pos - size < length:
                break
            request = wire.unpack(bytes(buf[pos + size : pos + size + length]))
            pos += size + length
            self._handle(conn, request)
            if conn.closed:
                return
        del buf[:pos]

    def _reply(self, conn: Conn, value: Any) -> None:
        if conn.closed:
            return
        data = wire.frame(value)
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn, died=True)
            return
        if sent < len(data):  # a process that stopped reading must not stop the broker
            conn.out += data[sent:]
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn, died=True)
            return
        del conn.out[:sent]
        if not conn.out:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: Conn, died: bool) -> None:
        """A connection ended: without a detach, its process died holding its leases."""
        if conn.closed:
            return
        conn.closed = True
        died = died and not conn.killed
        self._sel.unregister(conn.sock)
        conn.sock.close()
        self._conns.discard(conn)
        touched: set[Ledger] = set()
        for ledger, items in conn.leases.values():
            moved = ledger.returned(items, died)
            if died and moved:
                ledger.unreported[conn.pid] = ledger.unreported.get(conn.pid, 0) + moved
            touched.add(ledger)
        conn.leases.clear()
        for ledger in self.ledgers.values():
            if ledger.consumers.pop(conn, None) is not None:
                touched.add(ledger)
            if any(t.conn is conn for t in ledger.takers):
                ledger.takers = deque(t for t in ledger.takers if t.conn is not conn)
            if any(p[0] is conn for p in ledger.putters):
                ledger.putters = deque(p for p in ledger.putters if p[0] is not conn)
        for ledger in touched:
            self._serve(ledger)

    # ------------------------------------------------------------------ requests

    def _handle(self, conn: Conn, request: list[Any]) -> None:
        op, name, *args = request
        if op == wire.HELLO:
            conn.pid = args[0]
            return
        if op == wire.OPEN:
            self.open(name, args[0], args[1])
            self._reply(conn, True)
            return
        ledger = self.ledgers[name]
        if op == wire.PUT:
            self._put(conn, ledger, args[0], args[1])
        elif op == wire.TAKE:
            self._take(conn, ledger, args[0], args[1])
        elif op == wire.ACK:
            applied = args[0] in conn.leases  # else stale: it commits nothing
            target = self._ack(conn, ledger, args[:7], args[7:])
            self._serve(ledger)
            if target is not None:
                self._serve(target)
            self._reply(conn, applied)
        elif op == wire.ACK_TAKE:
            target = self._ack(conn, ledger, args[:7], args[9:])
            self._serve(ledger)
            if target is not None:
                self._serve(target)
            self._take(conn, ledger, args[7], args[8])
        elif op == wire.COST:
            ledger.note_cost(args[0])
        else:
            self._reply(conn, self._admin(conn, ledger, op, args))
            self._serve(ledger)

    def _admin(self, conn: Conn, ledger: Ledger, op: int, args: list[Any]) -> Any:
        if op == wire.COUNTERS:
            return [
                ledger.ready_tasks, ledger.in_flight, ledger.pending, ledger.produced,
                ledger.done, ledger.failed, ledger.retried, ledger.dead, ledger.delayed_tasks,
                len(ledger.consumers), ledger.producers, ledger.closed, ledger.state(),
            ]
        if op == wire.COST_NOW:
            return ledger.cost_ns
        if op == wire.ATTACH_CONSUMER:
            if conn not in ledger.consumers:
                # Attached while closing: drain, then stop.  Idle (closed, nothing
                # pending) is new: wait for the next producer — unless this
                # consumer was forked while this very run was open (it started
                # late for it): then its run is over, and it stops.
                # (``born`` may also be the run a dead predecessor served, or -1 for
                # a burst consumer: any run up to this one is over.)
                # A close() called after this consumer was forked (the classic
                # pattern's producer.join(); queue.close()) is its stop too, even
                # if the others finished the run before it attached.
                state, born, closes = ledger.state(), args[0], args[1]
                late = state == "idle" and born is not None and (
                    born <= ledger.epoch or (closes is not None and ledger.closes > closes))
                ledger.consumers[conn] = ledger.epoch if state == "closing" or late else -1
            waits = ledger.consumers[conn] == -1 and ledger.state() == "idle"
            return ledger.epoch + 1 if waits else ledger.epoch  # the run it serves
        if op == wire.DETACH_CONSUMER:
            ledger.consumers.pop(conn, None)
            for lease_id in [k for k, (lg, _) in conn.leases.items() if lg is ledger]:
                ledger.returned(conn.leases.pop(lease_id)[1], died=False)
            return True
        if op == wire.ATTACH_PRODUCER:
            if ledger.closed:  # a new run: sentinels of the last close go stale
                ledger.closed = False
                ledger.epoch += 1
            ledger.producers += 1
            return True
        if op == wire.DETACH_PRODUCER:
            ledger.producers = max(0, ledger.producers - 1)
            if ledger.producers == 0 and args[0]:
                ledger.close()
            return True
        if op == wire.CLOSE:
            ledger.close()
            return True
        if op == wire.REAP:
            moved = sum(ledger.unreported.values())
            ledger.unreported.clear()
            return moved
        if op in (wire.KILLING, wire.SEIZED, wire.SETTLE, wire.RELEASE):
            return self._kill(conn, op, args)
        if op == wire.EVICT:
            for other in [c for c in self._conns if c.pid == args[0] and c is not conn]:
                self._drop(other, died=True)
            return ledger.unreported.pop(args[0], 0)
        return self._letters(ledger, op, args)

    def _kill(self, conn: Conn, op: int, args: list[Any]) -> Any:
        """A supervisor kills consumer ``args[0]`` for a task past its timeout.

        KILLING, sent before the kill, sets every lease of that process aside
        (its tasks stay in flight) and marks its connections killed: a late ack
        from the still-running handler finds no lease and commits nothing, and
        the kill closing them counts no death.  SEIZED lists the leases set
        aside; SETTLE acknowledges one of them with the supervisor's outcome
        (the timed-out task failed, the others given back); RELEASE returns
        what is left to ready, with no death counted.
        """
        pid = args[0]
        seized = self._seized.setdefault(pid, [])
        if op == wire.KILLING:
            for other in self._conns:
                if other.pid == pid:
                    other.killed = True
                    seized.extend(other.leases.values())
                    other.leases.clear()
            return len(seized)
        if op == wire.SEIZED:
            return [[i, [it.message for it in e[1]]] for i, e in enumerate(seized) if e]
        if op == wire.SETTLE:
            entry = seized[args[1]] if args[1] < len(seized) else None
            if entry is None:
                return False
            seized[args[1]] = None
            # Settled as an ack on the asking connection, under a lease id that
            # take never hands out (they count from 1): the same books as any ack.
            conn.leases[-1] = entry
            target = self._ack(conn, entry[0], [-1, *args[2:]], [])
            self._serve(entry[0])
            if target is not None:
                self._serve(target)
            return True
        moved = 0
        for entry in self._seized.pop(pid):
            if entry is not None:
                moved += entry[0].returned(entry[1], died=False)
                self._serve(entry[0])
        for other in [c for c in self._conns if c.pid == pid and c is not conn]:
            other.killed = True
            self._drop(other, died=False)
        return moved

    def _letters(self, ledger: Ledger, op: int, args: list[Any]) -> Any:
        if op == wire.DEAD_LETTERS:
            return ledger.letters[: args[0]]
        if op in (wire.TAKE_DEAD, wire.PURGE_DEAD):
            letters, ledger.letters = ledger.letters, []
            ledger.dead -= len(letters)
            return letters if op == wire.TAKE_DEAD else len(letters)
        if op == wire.PURGE:
            dropped = ledger.ready_tasks + ledger.delayed_tasks
            ledger.ready.clear()
            ledger.delayed.clear()
            ledger.ready_tasks = ledger.delayed_tasks = 0
            ledger.failed += dropped  # so that pending reaches 0 and join returns
            return dropped
        raise ValueError(f"unknown local queue operation {op}")

    def _put(self, conn: Conn, ledger: Ledger, messages: list[bytes], tasks: int) -> None:
        if ledger.room() and not ledger.putters:
            self._admit(conn, ledger, messages, tasks)
        else:
            ledger.putters.append((conn, messages, tasks))
        self._serve(ledger)

    def _admit(self, conn: Conn, ledger: Ledger, messages: list[bytes], tasks: int) -> None:
        # One message carries a whole batch; several carry one task each.
        if len(messages) == 1:
            ledger.push([Item(messages[0], tasks)])
        else:
            ledger.push([Item(m, 1 if tasks else 0) for m in messages])
        ledger.produced += tasks
        if ledger.takers:  # a waiting consumer first: the producer's reply can wait
            self._serve_takers(ledger)
        self._reply(conn, ledger.cost_ns)

    def _take(self, conn: Conn, ledger: Ledger, max_tasks: int, timeout: float | None) -> None:
        if not ledger.takers and self._give(conn, ledger, max_tasks):
            if ledger.putters:
                self._serve(ledger)
        else:
            if timeout is not None and timeout <= 0 and not ledger.takers:
                self._reply(conn, None)
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            taker = Taker(conn, max_tasks, deadline)
            ledger.takers.append(taker)
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), taker))
            self._serve(ledger)

    def _give(self, conn: Conn, ledger: Ledger, max_tasks: int) -> bool:
        """Reply with a lease (or this consumer's sentinel) if there is one."""
        if ledger.ready:
            items = ledger.lease(max_tasks)
            lease_id = next(conn.lease_ids)
            conn.leases[lease_id] = (ledger, items)
            self._reply(conn, [lease_id, [i.message for i in items], None])
            return True
        if ledger.stop_due(conn):
            self._reply(conn, [0, [], ledger.epoch])
            return True
        return False

    def _ack(
        self, conn: Conn, request_ledger: Ledger, args: list[Any], outputs: list[Any]
    ) -> Ledger | None:
        """Settle a lease; with ``outputs`` (a stage's: target queue name, messages,
        tasks per message) put them on the target in the same step.  Returns the
        target ledger when outputs went there."""
        lease_id, done, failed, retry, dead, give_back, cost = args
        if cost:
            request_ledger.note_cost(cost)
        entry = conn.leases.pop(lease_id, None)
        if entry is None:
            return None  # stale: handed back or settled already; counts nothing, puts nothing
        ledger, items = entry
        ledger.in_flight -= sum(i.tasks for i in items)
        ledger.done += done
        ledger.failed += failed
        ledger.retried += len(retry)
        ledger.dead += len(dead)
        ledger.letters.extend(dead)
        now = time.monotonic()
        for message, delay in retry:
            if delay <= 0:
                ledger.push([Item(message, 1)])
            else:
                ledger.delay(message, now + delay)
        if give_back:
            ledger.push([Item(m, 1) for m in give_back], front=True)
        return self._put_outputs(*outputs) if outputs else None

    def _put_outputs(self, name: str, messages: list[bytes], counts: list[int]) -> Ledger:
        """A stage's outputs onto queue ``name``, as part of the ack of their lease.
        No room check: the stage waited for room before it sent them."""
        target = self.ledgers[name]
        if target.closed:  # a new run of the target, as for a put on Redis
            target.closed = False
            target.epoch += 1
        target.push([Item(m, c) for m, c in zip(messages, counts, strict=True)])
        target.produced += sum(counts)
        return target

    def _serve(self, ledger: Ledger) -> None:
        """Answer parked puts while there is room and parked takes in order,
        until neither can move (a take makes room, a put makes work)."""
        while True:
            moved = False
            while ledger.putters and ledger.room():
                conn, messages, tasks = ledger.putters.popleft()
                self._admit(conn, ledger, messages, tasks)
                moved = True
            if ledger.takers and (ledger.ready or ledger.closed):
                moved = self._serve_takers(ledger) or moved
            if not moved or not (ledger.putters and ledger.room()):
                return

    def _serve_takers(self, ledger: Ledger) -> bool:
        served = False
        for taker in ledger.takers:
            if taker.done:
                continue
            if not ledger.ready and not ledger.closed:
                break
            # With nothing ready, a later taker may still be due its sentinel.
            if self._give(taker.conn, ledger, taker.max_tasks):
                taker.done = served = True
        if served:
            ledger.takers = deque(t for t in ledger.takers if not t.done)
        return served


def _close_in_child(ref: weakref.ref[Broker]) -> None:
    """In a forked child: close the broker's sockets (its thread did not follow),
    and note each queue's run as it was when the child was forked."""
    broker = ref()
    if broker is None or broker._stopping:
        return
    broker.forked_in = {name: (lg.epoch, lg.state() == "idle", lg.closes)
                        for name, lg in broker.ledgers.items()}
    broker._stopping = True
    with contextlib.suppress(OSError):
        broker._close_all()
