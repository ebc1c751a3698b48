"""The local backend: one machine, no server, a broker thread that owns the ledger.

The process that opens a local queue starts a broker (``local_broker``): a
thread that holds every task, lease and counter in its memory (``local_ledger``).  Every producer
and consumer process — forked children inherit the queue object — connects to
it on first use over a Unix socket of its own and sends whole batches
(``local_wire``).  Why this is safe at every instant:

* A task leaves the broker only inside a lease, and a lease is recorded before
  its reply is written.  When a process dies, however it dies, the kernel closes
  its socket and the broker — which sees the connection close at once — puts
  everything that connection held back in front of ready.  No instant exists at
  which a task is in no one's hands: not mid-take, mid-ack, mid-give-back nor
  mid-put (a half-written request is discarded; a put that did not return put
  nothing).  ``reap()`` and ``evict()`` only report what the broker already did.
* A killed process can only tear its own channel; no lock is shared.
* The queue owner's death ends the broker with it; children die with the owner
  (PDEATHSIG, see ``roles``), so nothing is left half alive.

Design points others build on:

(a) One broker hosts several named queues (:meth:`LocalQueue.sibling`).  The
    broker applies each request whole, in one thread, so a combined request —
    "put these outputs on queue B and acknowledge this lease on queue A" — is
    atomic by construction.  That is what a stage's ack is (``_ack_out``: an ACK
    or ACK_TAKE request whose tail names B, carries the outputs, and the tasks
    each holds); a stale lease puts nothing.  B's room is not checked there: the
    stage waits for room before it sends (``Queue.wait_for_room``).
(b) A connection may hold several leases at once, acknowledged independently
    (each take returns a lease id; an ack names it).
(c) The wire protocol lives in ``local_wire``, the broker's loop in
    ``local_broker``, the per-queue books in ``local_ledger``.

Backpressure counts tasks: a put is admitted while fewer than ``maxsize`` tasks
are ready, so ready may exceed ``maxsize`` by at most one batch.  A batch holds
about ``TARGET_BATCH_SECONDS`` of handler work (one task for slow handlers, up
to ``MAX_BATCH`` cheap ones), whatever ``maxsize``: a small ``maxsize`` never
forces tiny batches on the wire, and the overshoot is a few ms of work.

Poison tasks: after a consumer dies, each task it held comes back as a lease of
its own, with the death counted; at ``max_deliveries`` deaths (0: never) the
task is dead-lettered ("consumer died N times while handling it") and counted
failed.  A queue whose run finished (closed, nothing pending) is idle, and idle
is new: a consumer attaching then waits for the next producer.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext
from typing import Any

from pcq.backends import local_wire as wire
from pcq.backends.base import (
    MAX_BATCH,
    TARGET_BATCH_SECONDS,
    Counters,
    Failure,
    Lease,
    Outcome,
    Queue,
)
from pcq.backends.local_broker import Broker
from pcq.envelope import Envelope, decode_dead, encode_sentinel, envelope_from_dead
from pcq.errors import BackendUnavailable, ConfigError

#: Longest a burst consumer's take waits before it looks for producers again.
IDLE_PEEK = 0.25


class LocalQueue(Queue):
    """A queue shared by the processes of one machine.  Open it in the parent,
    hand it to ``Producer``/``Consumer`` processes; :meth:`dispose` it at the end
    (the broker lives as long as the opening process, or until then)."""

    backend = "local"
    one_message_per_batch = True
    multiple_leases = True  # leases live per connection, each acknowledged by its id

    def __init__(
        self,
        name: str = "default",
        *,
        maxsize: int = 0,
        max_deliveries: int = 3,
        context: BaseContext | None = None,  # accepted for compatibility; unused
        broker: Broker | None = None,
    ) -> None:
        super().__init__(name, maxsize=maxsize, max_deliveries=max_deliveries)
        self._owns_broker = broker is None
        self._broker: Broker | None = broker or Broker()
        self._broker.open(name, maxsize, max_deliveries)
        if self._owns_broker:
            self._broker.start()
        self._address = self._broker.address
        self._owner = os.getpid()
        self._init_process_state()

    def sibling(self, name: str, *, maxsize: int = 0, max_deliveries: int | None = None
                ) -> LocalQueue:
        """Another named queue on this queue's broker (pipeline stages), opened in
        the owner process; dispose it before this one."""
        if self._broker is None or os.getpid() != self._owner:
            raise RuntimeError("open sibling queues in the process that opened this one")
        deliveries = self.max_deliveries if max_deliveries is None else max_deliveries
        return LocalQueue(name, maxsize=maxsize, max_deliveries=deliveries, broker=self._broker)

    # Per-process state: never crosses a process boundary.
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._sock: socket.socket | None = None  # this process's registrations and leases
        self._lock = threading.Lock()  # one request at a time on it
        # Questions that must not wait behind a blocking take or put of another
        # thread (join, counters, batch sizing) go over a side connection.
        self._side: socket.socket | None = None
        self._side_lock = threading.Lock()
        self._cost_ns: int | None = None  # the consumers' cost per task, as last heard
        self._cost_report = 0  # this consumer's, not sent yet
        self._burst = False  # see join_run

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_sock", "_pid", "_cost_ns", "_cost_report", "_broker", "_lock", "_side",
                    "_side_lock"):
            state.pop(key, None)
        state["_owns_broker"] = False  # a copy or a child never stops the broker
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._broker = None
        self._init_process_state()

    # ------------------------------------------------------------------ the wire

    def _here(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            for sock in (self._sock, self._side):
                if sock is not None:
                    sock.close()
            self._init_process_state()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self._address)
        except OSError as exc:
            sock.close()
            raise BackendUnavailable(
                f"local queue {self.name!r} is gone: the process that opened it "
                f"has exited or disposed of it ({exc})"
            ) from exc
        sock.sendall(wire.frame([wire.HELLO, self.name, os.getpid()]))
        return sock

    def _call(self, op: int, *args: Any, point: str = "", take: bool = False) -> Any:
        """One request and its reply on this process's connection.  Anything that
        interrupts it (a signal's exception, a dead broker) closes the
        connection, so the next call starts clean; the broker settles what the
        closed connection held."""
        self._here()
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
            sock = self._sock
            try:
                wire.send(sock, wire.frame([op, self.name, *args]), point)
                return wire.receive(sock, "take" if take else "")
            except BaseException as exc:
                self._sock = None
                sock.close()
                if isinstance(exc, OSError):
                    raise BackendUnavailable(f"local queue {self.name!r}: {exc}") from exc
                raise

    def _ask(self, op: int, *args: Any) -> Any:
        """A question on the side connection (never blocks in the broker)."""
        self._here()
        with self._side_lock:
            if self._side is None:
                self._side = self._connect()
            sock = self._side
            try:
                sock.sendall(wire.frame([op, self.name, *args]))
                return wire.receive(sock)
            except BaseException as exc:
                self._side = None
                sock.close()
                if isinstance(exc, OSError):
                    raise BackendUnavailable(f"local queue {self.name!r}: {exc}") from exc
                raise

    def _tell(self, op: int, *args: Any) -> None:
        """A report that has no reply."""
        self._here()
        with self._side_lock:
            if self._side is None:
                self._side = self._connect()
            try:
                self._side.sendall(wire.frame([op, self.name, *args]))
            except BaseException:
                self._side.close()
                self._side = None
                raise

    # ------------------------------------------------------------------ producing

    def batch_limit(self) -> int:
        self._here()
        if self._cost_ns is None:
            self._flush_cost()
            self._cost_ns = int(self._ask(wire.COST_NOW))
        if self._cost_ns <= 0:
            return 1  # no consumer has reported yet: the handler may be slow
        # maxsize does not cap a batch: a batch holds about TARGET_BATCH_SECONDS
        # of handler work, so overshooting maxsize by one batch runs ahead of the
        # consumers by that much work at most, and cheap tasks still travel in
        # large batches under a small maxsize.
        return max(1, min(MAX_BATCH, int(TARGET_BATCH_SECONDS * 1e9 / self._cost_ns)))

    def _put(self, messages: list[bytes], tasks: int) -> None:
        # The reply comes once the broker admitted the batch (backpressure),
        # with the consumers' latest cost per task for sizing the next one.
        self._cost_ns = int(self._call(wire.PUT, messages, tasks, point="put"))

    def note_task_cost(self, seconds_per_task: float) -> None:
        # Travels with the next acknowledgement: no message of its own.
        self._here()
        self._flush_cost()  # a report that found no acknowledgement to ride on
        self._cost_report = max(1, int(seconds_per_task * 1e9))
        self._cost_ns = None  # ask again before sizing the next batch

    def _flush_cost(self) -> None:
        if self._cost_report:
            self._tell(wire.COST, self._cost_report)
            self._cost_report = 0

    # ------------------------------------------------------------------ consuming

    def attach_consumer(self) -> None:
        self.join_run()

    def join_run(self, *, burst: bool = False, run: int | None = None) -> int:
        """Attach; the broker decides the run served from ``run`` (the run a dead
        predecessor served) or else the run this process was forked in.  A burst
        consumer stops at an empty queue no producer is attached to (see _take)."""
        self._burst = burst
        born = -1 if burst else self._born_in() if run is None else run
        closes = self._fork_closes() if run is None and not burst else None
        return int(self._call(wire.ATTACH_CONSUMER, born, closes))

    def _born_in(self) -> int | None:
        """The run this process was forked for (None: not forked from the owner).

        Forked while a run was open or closing, it is that run.  Forked while the
        queue was idle, it is the next run: a consumer started before its
        producer (the classic pattern) serves that run, and if the whole run
        went by before it attached — the other consumers were quicker — it
        finds its run over and stops, instead of waiting for one more."""
        if self._broker is None or os.getpid() == self._owner:
            return None
        epoch, idle, _ = self._broker.forked_in.get(self.name, (0, False, 0))
        return epoch + 1 if idle else epoch

    def _fork_closes(self) -> int | None:
        """How many close() calls the queue had seen when this process was forked."""
        if self._broker is None or os.getpid() == self._owner:
            return None
        return self._broker.forked_in.get(self.name, (0, False, 0))[2]

    def detach_consumer(self) -> None:
        """Hand back every lease this process holds and unregister."""
        self._here()
        if self._sock is not None:
            self._call(wire.DETACH_CONSUMER)

    def _take(self, max_tasks: int, timeout: float | None) -> tuple[list[bytes], Any] | None:
        if self._burst:  # never block for long: look for producers in between
            timeout = IDLE_PEEK if timeout is None else min(timeout, IDLE_PEEK)
        got = self._leased(self._call(wire.TAKE, max_tasks, timeout, take=True))
        if got is None and self._burst:
            c = self.counters()
            if not (c.producers or c.ready or c.delayed):
                return [encode_sentinel(0)], 0  # a stop of our own: nothing was leased
        return got

    @staticmethod
    def _leased(reply: Any) -> tuple[list[bytes], Any] | None:
        if reply is None:
            return None
        lease_id, messages, stop = reply
        if stop is not None:
            messages.append(encode_sentinel(stop))
        return messages, lease_id

    def _ack(self, lease: Lease, outcome: Outcome) -> None:
        if not lease.receipt:
            return  # a sentinel alone: nothing was leased
        self._applied(self._call(wire.ACK, *self._ack_args(lease, outcome),
                                 point="give-back" if outcome.give_back else "ack"))

    def _ack_out(self, lease: Lease, outcome: Outcome, to: Queue) -> None:
        # The broker applies the ack and the outputs in one request, in its one
        # thread: atomic by construction, and nothing for a stale lease.
        if not lease.receipt:
            return
        self._applied(self._call(wire.ACK, *self._ack_args(lease, outcome),
                                 *self._output_args(outcome, to),
                                 point="give-back" if outcome.give_back else "ack"))

    def _applied(self, applied: Any) -> None:
        """A lease the broker no longer held (set aside for a kill, or its
        connection gone) was acknowledged: nothing was committed."""
        if not applied:
            self.ack_applied = False
            self.stale_leases += 1

    @staticmethod
    def _output_args(outcome: Outcome, to: Queue | None) -> list[Any]:
        """The outputs part of an ack request: target queue, messages, and the
        tasks each message holds (``to.output_batch`` a message, the last fewer)."""
        if to is None or not outcome.outputs:
            return []
        step, total = to.output_batch, outcome.output_tasks
        counts = [min(step, total - i * step) for i in range(len(outcome.outputs))]
        return [to.name, outcome.outputs, counts]

    def _check_target(self, to: Queue) -> None:
        super()._check_target(to)
        assert isinstance(to, LocalQueue)
        if to._address != self._address:
            raise ConfigError(f"local queues {self.name!r} and {to.name!r} are on different "
                              "brokers: open a stage's next queue with queue.sibling(name)")

    def _ack_args(self, lease: Lease, outcome: Outcome) -> list[Any]:
        cost, self._cost_report = self._cost_report, 0
        return [lease.receipt, outcome.done, outcome.failed, outcome.retry, outcome.dead,
                outcome.give_back, cost]

    def ack_and_take(
        self,
        lease: Lease,
        failures: Any = (),
        give_back: Any = (),
        max_tasks: int = 1,
        timeout: float | None = None,
        outputs: Sequence[Any] = (),
        to: Queue | None = None,
    ) -> Lease | None:
        """Acknowledge ``lease`` (with its ``outputs`` for ``to``) and take the
        next in one round trip."""
        if to is not None:
            self._check_target(to)
        if not lease.receipt:
            return self.take(max_tasks, timeout)
        outcome = self._outcome(lease, failures, give_back, outputs, to)
        reply = self._call(wire.ACK_TAKE, *self._ack_args(lease, outcome), max(1, max_tasks),
                           timeout, *self._output_args(outcome, to),
                           point="give-back" if outcome.give_back else "ack",
                           take=True)
        got = self._leased(reply)
        return None if got is None else self._lease(*got)

    # ------------------------------------------------------------------ lifecycle

    def reap(self) -> int:
        """How many tasks of dead consumers the broker returned since last asked
        (it returns them itself, the moment a connection closes)."""
        return int(self._ask(wire.REAP))

    def evict(self, pid: int) -> int:
        """Consumer ``pid`` died: settle its connection now if the broker has not
        seen it close yet; how many tasks went back."""
        return int(self._call(wire.EVICT, pid))

    def killing(self, pid: int, task_id: str) -> None:
        # Asked on the side connection: this process's own may be blocked in a put.
        self._ask(wire.KILLING, pid)

    def fail_running(self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]) -> bool:
        """Acknowledge the lease that :meth:`killing` set aside holding task
        ``task_id``: that task with ``failure(envelope)``, its other tasks given
        back unstarted."""
        for index, messages in self._ask(wire.SEIZED, pid):
            lease = self._lease(messages, index)
            envs = list(lease.envelopes())
            hit = [env for env in envs if env.id == task_id]
            if hit:
                others = [env for env in envs if env.id != task_id]
                outcome = self._outcome(lease, [failure(hit[0])], others)
                return bool(self._ask(wire.SETTLE, pid, *self._ack_args(lease, outcome)))
        return False

    def release(self, pid: int) -> int:
        """Return what consumer ``pid`` held to ready with no death counted: it was
        killed on purpose (see :meth:`killing`)."""
        return int(self._ask(wire.RELEASE, pid))

    def close(self) -> None:
        self._call(wire.CLOSE)

    def attach_producer(self, producer_id: str | None = None) -> str:
        self._call(wire.ATTACH_PRODUCER)
        return producer_id or uuid.uuid4().hex

    def detach_producer(self, producer_id: str | None = None, close_if_last: bool = True) -> None:
        self._call(wire.DETACH_PRODUCER, close_if_last)

    def counters(self) -> Counters:
        return Counters(*self._ask(wire.COUNTERS)[:12])

    def state(self) -> str:
        return str(self._ask(wire.COUNTERS)[12])

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return [decode_dead(x) for x in self._ask(wire.DEAD_LETTERS, limit)]

    def requeue_dead(self) -> int:
        letters = [decode_dead(x) for x in self._call(wire.TAKE_DEAD)]
        bodies = [env.body for env in map(envelope_from_dead, letters) if env is not None]
        if bodies:
            self._put_bodies(bodies)
        return len(bodies)

    def purge_dead(self) -> int:
        return int(self._call(wire.PURGE_DEAD))

    def purge(self) -> int:
        """Drop the ready and delayed tasks (counted failed, so ``join`` returns)."""
        return int(self._call(wire.PURGE))

    def dispose(self) -> None:
        """Close this process's connection; the owner also stops the broker."""
        for sock in (self._sock, self._side):  # in a forked child: its copies
            if sock is not None:
                sock.close()
        self._sock = self._side = None
        if self._owns_broker and self._broker is not None and os.getpid() == self._owner:
            self._broker.stop()
            self._broker = None
