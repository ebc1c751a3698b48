"""The local backend's broker: one thread that owns every ledger.

The process that opens a local queue runs a :class:`Broker` thread.  Each
producer or consumer process connects to it over a Unix socket of its own (in a
private temp dir), so a process killed at any instant can tear only its own
channel.  The broker reads requests (``local_wire``), dispatches each by its
operation to a handler that applies it whole to a :class:`Ledger` — no request
is ever half applied, since one thread applies them all — and keeps, per
connection (``local_conn``), the leases it handed out.  A malformed request
drops its connection only.

A connection that closes without detaching is a death: the broker returns that
connection's leases at once (no files, no reap interval), each task a suspect
with one more death counted (see ``local_ledger``), or dead-lettered at
``max_deliveries`` deaths, and detaches the producers registered on it.

Why a thread, not a process: the owner's death must end the queue anyway (its
children die with it through PDEATHSIG), a thread dies with it for free, and
the owner's own calls need no process to be spawned or reaped.  The fork hazard
of a threaded parent is handled by an after-fork hook that closes the broker's
sockets in every child (``local_loop``, the sockets and the loop of the
thread): a child never touches the broker's state (it only reads, once, which
run each queue was in when it was forked).  A threaded
owner also means a child may get PDEATHSIG twice — when the forking thread
dies, while getppid() still names the owner, and when the process is gone —
which ``roles`` allows for.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pcq.backends import local_wire as wire
from pcq.backends.local_conn import Conn, Taker
from pcq.backends.local_ledger import Ledger, Seizures, Waiting
from pcq.backends.local_loop import Loop
from pcq.backends.local_wire import Op

#: What an operation's handler returns when it answers later, or never.
NO_REPLY: Any = object()
#: An operation's handler: (connection, its queue's ledger, the request) -> reply.
Handler = Callable[[Conn, Ledger, Any], Any]


class Broker(Loop):
    """The thread that serves every connection of one local-queue family
    (its sockets and loop: :class:`~pcq.backends.local_loop.Loop`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ledgers: dict[str, Ledger] = {}
        self._seized = Seizures()
        self._deadlines: list[tuple[float, int, Taker]] = []
        self._tiebreak = itertools.count()
        #: In a forked child: each queue's epoch at the fork, whether it was idle,
        #: and how many close() calls it had seen.
        self.forked_in: dict[str, tuple[int, bool, int]] = {}
        self._ops = self._table()

    def open(self, name: str, maxsize: int, max_deliveries: int) -> Ledger:
        ledger = self.ledgers.get(name)
        if ledger is None:
            ledger = self.ledgers[name] = Ledger(name, maxsize, max_deliveries)
        return ledger

    def _forked(self) -> None:
        # A child reads, once, which run each queue was in when it was forked.
        self.forked_in = {name: (lg.epoch, lg.state() == "idle", lg.closes)
                          for name, lg in self.ledgers.items()}

    # ------------------------------------------------------------------ the clock, the ends

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

    def _drop(self, conn: Conn, died: bool) -> None:
        """A connection ended: without a detach, its process died holding its
        leases and its producer registrations."""
        if conn.closed:
            return
        self._close(conn)
        died = died and not conn.killed
        touched: set[Ledger] = set()
        for lease_id, (ledger, items) in conn.leases.items():
            moved = ledger.returned(items, died and conn.running(lease_id))
            if died and moved:
                ledger.unreported[conn.pid] = ledger.unreported.get(conn.pid, 0) + moved
            touched.add(ledger)
        conn.leases.clear()
        for ledger, producer_id in conn.producers:
            ledger.detach_producer(producer_id, close_if_last=False)
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

    def _handle(self, conn: Conn, payload: bytes) -> None:
        op, name, request = wire.parse(payload)
        ledger = self.ledgers.get(name)
        if ledger is None:
            raise wire.BadRequest(f"no queue named {name!r} on this broker")
        reply = self._ops[op](conn, ledger, request)
        if reply is not NO_REPLY:
            self._reply(conn, reply)
            self._serve(ledger)

    def _table(self) -> dict[Op, Handler]:
        return {
            Op.HELLO: self._hello, Op.PUT: self._put, Op.TAKE: self._take, Op.ACK: self._ack,
            Op.ACK_TAKE: self._ack, Op.UNPARK: self._unpark, Op.COST: self._cost,
            Op.COUNTERS: lambda c, lg, r: lg.counters(),
            Op.COST_NOW: lambda c, lg, r: lg.cost_ns,
            Op.ATTACH_CONSUMER: lambda c, lg, r: lg.attach_consumer(c, r.born, r.closes),
            Op.DETACH_CONSUMER: lambda c, lg, r: lg.detach_consumer(c),
            Op.ATTACH_PRODUCER: self._attach_producer,
            Op.DETACH_PRODUCER: self._detach_producer,
            Op.CLOSE: lambda c, lg, r: lg.close(),
            Op.REAP: lambda c, lg, r: lg.reap(), Op.EVICT: self._evict,
            Op.KILLING: self._killing, Op.SEIZED: self._seized_leases,
            Op.SETTLE: self._settle, Op.RELEASE: self._release,
            Op.DEAD_LETTERS: lambda c, lg, r: lg.letters[: r.limit],
            Op.REQUEUE_DEAD: lambda c, lg, r: lg.requeue_dead(),
            Op.PURGE_DEAD: lambda c, lg, r: lg.purge_dead(),
            Op.PURGE: lambda c, lg, r: lg.purge(),
        }

    def _hello(self, conn: Conn, ledger: Ledger, req: wire.Hello) -> Any:
        conn.pid = req.pid
        return NO_REPLY

    def _cost(self, conn: Conn, ledger: Ledger, req: wire.Cost) -> Any:
        ledger.note_cost(req.ns)
        return NO_REPLY

    def _attach_producer(self, conn: Conn, ledger: Ledger, req: wire.Producer) -> Any:
        producer_id = ledger.attach_producer(req.producer_id)
        conn.producers.append((ledger, producer_id))
        return producer_id

    def _detach_producer(self, conn: Conn, ledger: Ledger, req: wire.DetachProducer) -> Any:
        ledger.detach_producer(req.producer_id, req.close_if_last)
        conn.producers = [(lg, p) for lg, p in conn.producers
                          if lg is not ledger or p != req.producer_id]
        return True

    def _evict(self, conn: Conn, ledger: Ledger, req: wire.Pid) -> Any:
        for other in [c for c in self._conns if c.pid == req.pid and c is not conn]:
            self._drop(other, died=True)
        return ledger.unreported.pop(req.pid, 0)

    # A supervisor kills consumer ``pid`` on purpose: see Seizures.

    def _killing(self, conn: Conn, ledger: Ledger, req: wire.Pid) -> Any:
        return self._seized.seize(req.pid, self._conns)

    def _seized_leases(self, conn: Conn, ledger: Ledger, req: wire.Pid) -> Any:
        return self._seized.listed(req.pid)

    def _settle(self, conn: Conn, ledger: Ledger, req: wire.Settle) -> Any:
        entry = self._seized.take(req.pid, req.seized)
        if entry is None:
            return False
        target, items = entry
        if req.cost:
            ledger.note_cost(req.cost)
        target.settle(items, req)
        self._serve(target)
        return True

    def _release(self, conn: Conn, ledger: Ledger, req: wire.Pid) -> Any:
        moved = 0
        for target, items in self._seized.release(req.pid):
            moved += target.returned(items, died=False)
            self._serve(target)
        for other in [c for c in self._conns if c.pid == req.pid and c is not conn]:
            other.killed = True
            self._drop(other, died=False)
        return moved

    # ------------------------------------------------------------------ the hot path

    def _put(self, conn: Conn, ledger: Ledger, req: wire.Put) -> Any:
        if ledger.room() and not ledger.putters:
            self._admit(conn, ledger, req.messages, req.tasks)
        else:
            ledger.putters.append(Waiting(conn, req, None))
        self._serve(ledger)
        return NO_REPLY

    def _admit(self, conn: Conn, ledger: Ledger, messages: list[bytes], tasks: int) -> None:
        ledger.admit(messages, tasks)
        if ledger.takers:  # a waiting consumer first: the producer's reply can wait
            self._serve_takers(ledger)
        self._reply(conn, ledger.cost_ns)

    def _take(self, conn: Conn, ledger: Ledger, req: wire.Take | wire.AckTake) -> Any:
        max_tasks, timeout = req.max_tasks, req.timeout
        if req.ahead and conn.leases:
            return self._take_ahead(conn, ledger, max_tasks)
        if not ledger.takers and self._give(conn, ledger, max_tasks):
            if ledger.putters:
                self._serve(ledger)
            return NO_REPLY
        if timeout is not None and timeout <= 0 and not ledger.takers:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        taker = Taker(conn, max_tasks, deadline)
        ledger.takers.append(taker)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, next(self._tiebreak), taker))
        self._serve(ledger)
        return NO_REPLY

    def _take_ahead(self, conn: Conn, ledger: Ledger, max_tasks: int) -> Any:
        """A lease for after the ones ``conn`` holds, or None now: never parked
        (an idle consumer goes first), never a sentinel (a retry of the running
        lease may be due), never a suspect (``Ledger.lease``)."""
        items = ledger.lease(max_tasks, conn) if not (conn.ahead or ledger.takers) else []
        if not items:
            return None
        lease_id = conn.ahead = next(conn.lease_ids)
        conn.leases[lease_id] = (ledger, items)
        return [lease_id, [i.message for i in items], None, bool(ledger.ready)]

    def _give(self, conn: Conn, ledger: Ledger, max_tasks: int) -> bool:
        """Reply with a lease (or this consumer's sentinel) if there is one."""
        if ledger.has_ready():
            items = ledger.lease(max_tasks, conn)
            if not items:
                return False
            lease_id = next(conn.lease_ids)
            conn.leases[lease_id] = (ledger, items)
            # The last field: are fresh tasks still ready (worth a take-ahead)?
            self._reply(conn, [lease_id, [i.message for i in items], None, bool(ledger.ready)])
            return True
        if ledger.stop_due(conn):
            self._reply(conn, [0, [], ledger.epoch, False])
            return True
        return False

    # A stage's ack with outputs is a put on their queue too, and is held back
    # as a put is: while that queue is full it waits in its ``putters``, in
    # arrival order with the puts, and is applied whole once there is room
    # (``_serve``), so the outputs and the ack stay one step.  Its lease stays
    # in flight meanwhile: a death returns it (fresh: its tasks had finished,
    # ``Conn.parked``) and its outputs were never put.  A consumer that is
    # stopping sends UNPARK: its ack goes through over the bound, so a stop
    # never waits for the next stage.

    def _ack(self, conn: Conn, ledger: Ledger, req: wire.Ack | wire.AckTake) -> Any:
        target = self._target(req)
        if target is not None and self._parks(conn, ledger, target, req):
            return NO_REPLY
        return self._acked(conn, ledger, target, req)

    def _acked(self, conn: Conn, ledger: Ledger, target: Ledger | None,
               req: wire.Ack | wire.AckTake) -> Any:
        """Apply an ack (and the take of an ACK_TAKE); its reply."""
        applied = req.lease_id in conn.leases  # else stale: it commits nothing
        self._settle_lease(conn, ledger, target, req)
        if isinstance(req, wire.AckTake):
            return self._take(conn, ledger, req)
        return applied

    def _target(self, req: wire.Ack | wire.AckTake) -> Ledger | None:
        if req.to is None:
            return None
        target = self.ledgers.get(req.to)
        if target is None or len(req.counts) != len(req.outputs):
            raise wire.BadRequest(f"outputs for no queue named {req.to!r}")
        return target

    def _parks(self, conn: Conn, ledger: Ledger, target: Ledger,
               req: wire.Ack | wire.AckTake) -> bool:
        """Hold an ack whose outputs find ``target`` full, as a put would be."""
        if (target.room() and not target.putters) or not req.outputs \
                or req.lease_id not in conn.leases:
            return False
        if conn.parked:  # one request at a time on a connection
            raise wire.BadRequest("an ack sent while another waits for room")
        target.putters.append(Waiting(conn, req, ledger))
        conn.park(req.lease_id)
        return True

    def _let_through(self, conn: Conn, waiting: Waiting, target: Ledger) -> None:
        """Apply a parked ack now, and answer it."""
        owner = waiting.owner
        assert owner is not None
        conn.parked = 0  # also if its lease was seized meanwhile (then it is stale)
        reply = self._acked(conn, owner, target, waiting.request)
        if reply is not NO_REPLY:
            self._reply(conn, reply)
        self._serve(owner)

    def _unpark(self, conn: Conn, ledger: Ledger, req: wire.Nothing) -> Any:
        """``conn``'s consumer is stopping: its parked ack goes through now."""
        for target in self.ledgers.values():
            for waiting in target.putters:
                if waiting.conn is conn and waiting.owner is not None:
                    target.putters.remove(waiting)
                    self._let_through(conn, waiting, target)
                    self._serve(target)
                    return NO_REPLY
        return NO_REPLY  # answered already: room came first

    def _settle_lease(self, conn: Conn, ledger: Ledger, target: Ledger | None,
                      req: wire.Ack | wire.AckTake) -> None:
        """Settle a lease; with outputs (a stage's), put them on ``target`` in
        the same step.  A stale lease (handed back or settled already) counts
        nothing and puts nothing."""
        if req.cost:
            ledger.note_cost(req.cost)
        entry = conn.leases.pop(req.lease_id, None)
        if entry is None:
            return
        conn.settled(req.lease_id)
        owner, items = entry
        owner.settle(items, req)
        self._serve(owner)
        if target is not None and req.outputs:
            target.receive_outputs(req.outputs, req.counts)
            self._serve(target)

    def _serve(self, ledger: Ledger) -> None:
        """Answer parked puts while there is room and parked takes in order,
        until neither can move (a take makes room, a put makes work)."""
        while True:
            moved = False
            while ledger.putters and ledger.room():
                waiting = ledger.putters.popleft()
                if waiting.owner is None:
                    self._admit(waiting.conn, ledger, waiting.request.messages,
                                waiting.request.tasks)
                else:
                    self._let_through(waiting.conn, waiting, ledger)
                moved = True
            if ledger.takers and (ledger.has_ready() or ledger.closed):
                moved = self._serve_takers(ledger) or moved
            if not moved or not (ledger.putters and ledger.room()):
                return

    def _serve_takers(self, ledger: Ledger) -> bool:
        served = False
        for taker in ledger.takers:
            if taker.done:
                continue
            if not ledger.has_ready() and not ledger.closed:
                break
            # With nothing ready, a later taker may still be due its sentinel;
            # a taker that may not take what is ready lets the next one try.
            if self._give(taker.conn, ledger, taker.max_tasks):
                taker.done = served = True
        if served:
            ledger.takers = deque(t for t in ledger.takers if not t.done)
        return served

