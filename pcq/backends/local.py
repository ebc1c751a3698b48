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
    each holds); a stale lease puts nothing.  While B is full the broker holds
    that request back as it holds a put, and applies it whole once there is
    room (``parks_outputs``): the stage needs no look at B's counters first.
(b) A connection may hold several leases at once, acknowledged independently
    (each take returns a lease id; an ack names it).
(c) The wire (operations, request shapes) lives in ``local_wire``, this
    process's connections and read-ahead in ``local_client``, the
    broker's dispatch in ``local_broker``, its sockets and loop in
    ``local_loop``, its connections in ``local_conn``, the per-queue books
    in ``local_ledger``.

Backpressure counts tasks: a put is admitted while fewer than ``maxsize`` tasks
are ready, so ready may exceed ``maxsize`` by at most one batch.  A batch holds
about ``TARGET_BATCH_SECONDS`` of handler work (one task for slow handlers, up
to ``MAX_BATCH`` cheap ones), whatever ``maxsize``: a small ``maxsize`` never
forces tiny batches on the wire, and the overshoot is a few ms of work.

Poison tasks: after a consumer dies, each task it held is a suspect that runs
alone, with the death counted; at ``max_deliveries`` deaths (0: never) it is
dead-lettered ("consumer died N times while handling it").  A queue whose run
finished (closed, nothing pending) is idle, and idle is new: a consumer
attaching then waits for the next producer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

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
from pcq.backends.local_client import Channel
from pcq.backends.local_wire import Op
from pcq.envelope import Envelope, decode_dead, encode_sentinel
from pcq.errors import ConfigError

#: Longest a burst consumer's take waits before it looks for producers again.
IDLE_PEEK = 0.25


class LocalQueue(Channel, Queue):
    """A queue shared by the processes of one machine.  Open it in the parent,
    hand it to ``Producer``/``Consumer`` processes; :meth:`dispose` it at the end
    (the broker lives as long as the opening process, or until then)."""

    backend = "local"
    one_message_per_batch = True
    multiple_leases = True  # leases live per connection, each acknowledged by its id
    parks_outputs = True  # the broker holds an ack with outputs while their queue is full

    def __init__(
        self,
        name: str = "default",
        *,
        maxsize: int = 0,
        max_deliveries: int = 3,
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

    def _init_process_state(self) -> None:
        self._init_channels()
        self._cost_ns: int | None = None  # the consumers' cost per task, as last heard
        self._cost_report = 0  # this consumer's, not sent yet
        self._burst = False  # see join_run
        self._producer_ids: list[str] = []  # attached by this process, in order

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in (*self.CHANNEL_STATE, "_cost_ns", "_cost_report", "_broker"):
            state.pop(key, None)
        state["_owns_broker"] = False  # a copy or a child never stops the broker
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._broker = None
        self._init_process_state()

    # ------------------------------------------------------------------ producing

    def batch_limit(self) -> int:
        self._here()
        if self._cost_ns is None:
            self._flush_cost()
            self._cost_ns = int(self._ask(Op.COST_NOW))
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
        self._cost_ns = int(self._call(Op.PUT, messages, tasks, point="put"))

    def note_task_cost(self, seconds_per_task: float) -> None:
        # Travels with the next acknowledgement: no message of its own.
        self._here()
        self._flush_cost()  # a report that found no acknowledgement to ride on
        self._cost_report = max(1, int(seconds_per_task * 1e9))
        self._cost_ns = None  # ask again before sizing the next batch

    def _flush_cost(self) -> None:
        if self._cost_report:
            self._ask(Op.COST, self._cost_report, reply=False)
            self._cost_report = 0

    # ------------------------------------------------------------------ consuming

    def attach_consumer(self) -> None:
        self.join_run()

    def join_run(self, *, burst: bool = False, run: int | None = None) -> int:
        """Attach; the broker decides the run served from ``run`` (the run a dead
        predecessor served) or else the run this process was forked in.  A burst
        consumer stops at an empty queue no producer is attached to (see _take)."""
        self._burst = burst
        born, closes = (None, None) if burst or run is not None else self._forked_in()
        return int(self._call(Op.ATTACH_CONSUMER, -1 if burst else born if run is None else run,
                              closes))

    def _forked_in(self) -> tuple[int | None, int | None]:
        """The run this process was forked for, and the close() calls the queue
        had seen then (None, None: not forked from the owner).

        Forked while a run was open or closing, it is that run.  Forked while the
        queue was idle, it is the next run: a consumer started before its
        producer (the classic pattern) serves that run, and if the whole run
        went by before it attached — the other consumers were quicker — it
        finds its run over and stops, instead of waiting for one more."""
        if self._broker is None or os.getpid() == self._owner:
            return None, None
        epoch, idle, closes = self._broker.forked_in.get(self.name, (0, False, 0))
        return (epoch + 1 if idle else epoch), closes

    def detach_consumer(self) -> None:
        """Hand back every lease this process holds and unregister."""
        self._here()
        if self._sock is not None:
            self._call(Op.DETACH_CONSUMER)  # the lease taken ahead goes back too
            self._ahead = None

    def _take(self, max_tasks: int, timeout: float | None) -> tuple[list[bytes], Any] | None:
        if self._burst:  # never block for long: look for producers in between
            timeout = IDLE_PEEK if timeout is None else min(timeout, IDLE_PEEK)
        reply = self._taken_ahead()
        if reply is None:
            reply = self._call(Op.TAKE, max_tasks, timeout, False, take=True)
        got = self._leased(self._then_ahead(reply, max_tasks))
        if got is None and self._burst:
            c = self.counters()
            if not (c.producers or c.ready or c.delayed):
                return [encode_sentinel(0)], 0  # a stop of our own: nothing was leased
        return got

    @staticmethod
    def _leased(reply: Any) -> tuple[list[bytes], Any] | None:
        if reply is None:
            return None
        lease_id, messages, stop, _ = reply
        if stop is not None:
            messages.append(encode_sentinel(stop))
        return messages, lease_id

    def _ack(self, lease: Lease, outcome: Outcome) -> None:
        if not lease.receipt:
            return  # a sentinel alone: nothing was leased
        self._applied(self._call(Op.ACK, *self._ack_fields(lease, outcome, None),
                                 point="give-back" if outcome.give_back else "ack"))

    def _ack_out(self, lease: Lease, outcome: Outcome, to: Queue) -> None:
        # The broker applies the ack and the outputs in one request, in its one
        # thread: atomic by construction, and nothing for a stale lease.
        if not lease.receipt:
            return
        self._applied(self._call(Op.ACK, *self._ack_fields(lease, outcome, to),
                                 point="give-back" if outcome.give_back else "ack",
                                 parks=bool(outcome.outputs)))

    def _applied(self, applied: Any) -> None:
        """A lease the broker no longer held (set aside for a kill, or its
        connection gone) was acknowledged: nothing was committed."""
        if not applied:
            self.ack_applied = False
            self.stale_leases += 1

    @staticmethod
    def _output_fields(outcome: Outcome, to: Queue | None) -> list[Any]:
        """The outputs part of an ack request (``local_wire.Ack``): target queue,
        messages, and the tasks each message holds (``to.output_batch`` a
        message, the last fewer)."""
        if to is None or not outcome.outputs:
            return [None, [], []]
        step, total = to.output_batch, outcome.output_tasks
        counts = [min(step, total - i * step) for i in range(len(outcome.outputs))]
        return [to.name, outcome.outputs, counts]

    def _check_target(self, to: Queue) -> None:
        super()._check_target(to)
        assert isinstance(to, LocalQueue)
        if to._address != self._address:
            raise ConfigError(f"local queues {self.name!r} and {to.name!r} are on different "
                              "brokers: open a stage's next queue with queue.sibling(name)")

    def _settlement(self, outcome: Outcome) -> list[Any]:
        """What an ack settles, with this consumer's cost report riding on it."""
        cost, self._cost_report = self._cost_report, 0
        return [outcome.done, outcome.failed, outcome.retry, outcome.dead, outcome.give_back,
                cost]

    def _ack_fields(self, lease: Lease, outcome: Outcome, to: Queue | None) -> list[Any]:
        """The fields of a ``local_wire.Ack`` request."""
        return [lease.receipt, *self._settlement(outcome), *self._output_fields(outcome, to)]

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
        fields = [*self._ack_fields(lease, outcome, to), max(1, max_tasks)]
        point = "give-back" if outcome.give_back else "ack"
        parks = bool(outcome.outputs)  # the broker holds it while ``to`` is full
        reply = self._taken_ahead()
        if reply is not None:  # run it now; the next one comes while it runs
            self._call(Op.ACK_TAKE, *fields, 0, True, point=point, reply=False, parks=parks)
        else:
            reply = self._then_ahead(self._call(Op.ACK_TAKE, *fields, timeout, False,
                                                point=point, take=True, parks=parks),
                                     max_tasks)
        got = self._leased(reply)
        return None if got is None else self._lease(*got)

    # ------------------------------------------------------------------ lifecycle

    def reap(self) -> int:
        """How many tasks of dead consumers the broker returned since last asked
        (it returns them itself, the moment a connection closes)."""
        return int(self._ask(Op.REAP))

    def evict(self, pid: int) -> int:
        """Consumer ``pid`` died: settle its connection now if the broker has not
        seen it close yet; how many tasks went back."""
        return int(self._call(Op.EVICT, pid))

    def killing(self, pid: int, task_id: str) -> None:
        # Asked on the side connection: this process's own may be blocked in a put.
        self._ask(Op.KILLING, pid)

    def fail_running(self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]) -> bool:
        """Acknowledge the lease that :meth:`killing` set aside holding task
        ``task_id``: that task with ``failure(envelope)``, its other tasks given
        back unstarted."""
        for index, messages in self._ask(Op.SEIZED, pid):
            lease = self._lease(messages, index)
            envs = list(lease.envelopes())
            hit = [env for env in envs if env.id == task_id]
            if hit:
                others = [env for env in envs if env.id != task_id]
                outcome = self._outcome(lease, [failure(hit[0])], others)
                return bool(self._ask(Op.SETTLE, pid, index, *self._settlement(outcome)))
        return False

    def release(self, pid: int) -> int:
        """Return what consumer ``pid`` held to ready with no death counted: it was
        killed on purpose (see :meth:`killing`)."""
        return int(self._ask(Op.RELEASE, pid))

    def close(self) -> None:
        self._call(Op.CLOSE)

    def attach_producer(self, producer_id: str | None = None) -> str:
        """Register producer ``producer_id`` (None: a new id); its id.  A
        producer whose process dies is detached by the broker at once (its
        connection closed), with no close."""
        self._here()
        registered = str(self._call(Op.ATTACH_PRODUCER, producer_id))
        self._producer_ids.append(registered)
        return registered

    def detach_producer(
        self, producer_id: str | None = None, close_if_last: bool = True
    ) -> None:
        """Unregister ``producer_id`` (None: the last one this process attached;
        an unknown or gone id: nobody); with ``close_if_last``, close the
        queue if no producer is left."""
        self._here()
        if producer_id is None and self._producer_ids:
            producer_id = self._producer_ids.pop()
        elif producer_id in self._producer_ids:
            self._producer_ids.remove(producer_id)
        self._call(Op.DETACH_PRODUCER, producer_id, close_if_last)

    def counters(self) -> Counters:
        return Counters(*self._ask(Op.COUNTERS)[:12])

    def state(self) -> str:
        return str(self._ask(Op.COUNTERS)[12])

    # ------------------------------------------------------------------ dead letters

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return [decode_dead(x) for x in self._ask(Op.DEAD_LETTERS, limit)]

    def requeue_dead(self) -> int:
        """One broker step (``Ledger.requeue_dead``): a process killed at any
        instant of it requeued every letter or none."""
        return int(self._call(Op.REQUEUE_DEAD, point="requeue"))

    def purge_dead(self) -> int:
        return int(self._call(Op.PURGE_DEAD))

    def purge(self) -> int:
        """Drop the ready and delayed tasks (counted failed, so ``join`` returns)."""
        return int(self._call(Op.PURGE))

    def dispose(self) -> None:
        """Close this process's connection; the owner also stops the broker."""
        for sock in (self._sock, self._side):  # in a forked child: its copies
            if sock is not None:
                sock.close()
        self._sock = self._side = None
        if self._owns_broker and self._broker is not None and os.getpid() == self._owner:
            self._broker.stop()
            self._broker = None
