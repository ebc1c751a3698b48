"""The local backend: one machine, no server, built on ``multiprocessing`` queues.

A producer ships a whole batch of tasks as one message through a
``multiprocessing.Queue``; backpressure is a semaphore counting batch slots, so
about ``maxsize`` tasks wait at most.  What a JoinableQueue cannot do — survive a
consumer that dies — rests on three pieces of shared state, created by the
process that opens the queue and inherited by its children:

*Slots* (a shared ``int64`` array, one row per producer or consumer process).
    Only the owning process writes its row, so no lock is held while tasks flow
    and a process killed at any moment cannot leave a lock held.  Counters live in
    two banks; a single 8-byte *commit word* (``lease << 1 | bank``) switches
    banks, so an acknowledgement is counted entirely or not at all.

*In-flight files* (one per consumer, in a private temp dir).
    Before handling a lease the consumer writes ``[lease, messages, delayed
    before, delayed after]`` to its file and holds an ``flock`` on it for life.
    The kernel drops the lock when the process dies, however it dies, so
    ``reap`` — any process may run it, under the queue's lock — finds dead
    consumers by taking their locks, and puts back ``messages + before`` if the
    commit word shows the lease unacknowledged, or ``after`` if it was.

*Retries* stay with the consumer that failed them (a heap of delayed messages
    recorded in its in-flight file) and come back from its own ``take``.

The remaining windows — a consumer killed between reading a message off the
pipe and writing its in-flight file, a few microseconds — are far smaller than
the time any task runs; they are the price of not having a broker process.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import multiprocessing as mp
import os
import shutil
import struct
import tempfile
import threading
import time
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from typing import Any

import msgpack

from pcq.backends.base import MAX_BATCH, TARGET_BATCH_SECONDS, Counters, Lease, Outcome, Queue
from pcq.envelope import (
    SENTINEL_PREFIX,
    Batch,
    decode,
    decode_dead,
    encode_sentinel,
    envelope_from_dead,
)
from pcq.errors import DecodeError

MAX_SLOTS = 4096
# Slot row layout (int64 each).
PID, ROLE, STATE, COMMIT, HOLDING = range(5)
BANK_A, BANK_B = 5, 10  # each bank: produced, done, failed, retried, dead letters
PRODUCED, DONE, FAILED, RETRIED, DEAD = range(5)
COUNTS = 5
WIDTH = BANK_B + COUNTS
# Roles and states.
CONSUMER, OTHER = 1, 2
ALIVE, GONE, REAPED = 1, 2, 3
# Queue-wide words.
NSLOTS, CLOSED, EPOCH, PRODUCERS, COST_NS = range(5)

_HEADER = struct.Struct("<Q")
#: Longest a waiting take polls before it looks again (closed? retries due?).
IDLE_SLICE = 0.25
#: How long the opening process's dispose waits for its feeder thread to finish.
FEEDER_GRACE = 1.0


def _bank(commit: int) -> int:
    return BANK_B if commit & 1 else BANK_A


class LocalQueue(Queue):
    """A queue shared by the processes of one machine.  Open it in the parent,
    hand it to ``Producer``/``Consumer`` processes; :meth:`dispose` it at the end."""

    backend = "local"
    one_message_per_batch = True

    def __init__(
        self, name: str = "default", *, maxsize: int = 0, context: BaseContext | None = None
    ) -> None:
        super().__init__(name, maxsize=maxsize)
        ctx = context or mp.get_context()
        # Four batches of maxsize/4 tasks fill the queue; a batch never exceeds a
        # quarter of maxsize, so backpressure stays close to maxsize tasks.
        self._batch_cap = max(1, min(MAX_BATCH, maxsize // 4)) if maxsize else MAX_BATCH
        self._space = ctx.Semaphore(max(1, -(-maxsize // self._batch_cap))) if maxsize else None
        self._q: mp.Queue[Any] = ctx.Queue()
        self._slots = ctx.RawArray("q", MAX_SLOTS * WIDTH)
        self._words = ctx.RawArray("q", 8)
        self._lock = ctx.Lock()  # slot claims, close/reopen, producer count, reaping
        self._dir = tempfile.mkdtemp(prefix="pcq-local-")
        self._owner = os.getpid()
        self._init_process_state()

    # Per-process state: never crosses a process boundary.
    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._parent = os.getppid()
        self._slot = -1
        self._file: int | None = None
        self._lease_no = 0
        self._leased: list[bytes] | None = None  # the lease taken and not yet acknowledged
        self._delayed: list[tuple[float, int, bytes]] = []  # (due, tiebreak, message)
        self._tiebreak = itertools.count()
        self._held_sentinel: bytes | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_file", "_delayed", "_tiebreak", "_held_sentinel", "_slot", "_lease_no",
                    "_leased", "_parent"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def _here(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's per-process state is not ours
            self._init_process_state()

    # ------------------------------------------------------------------ slots

    def _row(self, slot: int) -> int:
        return slot * WIDTH

    def _claim(self, role: int) -> int:
        self._here()
        if self._slot >= 0:
            return self._slot
        with self._lock:
            slot = int(self._words[NSLOTS])
            if slot >= MAX_SLOTS:
                raise RuntimeError(f"local queue {self.name!r}: more than {MAX_SLOTS} processes")
            row = self._row(slot)
            self._slots[row + PID] = os.getpid()
            self._slots[row + ROLE] = role
            self._slots[row + STATE] = ALIVE
            self._words[NSLOTS] = slot + 1
        self._slot = slot
        return slot

    def _commit(self, deltas: tuple[int, int, int, int, int], lease: int | None = None) -> None:
        """Add ``deltas`` to this process's counters and record ``lease`` as
        acknowledged (None: keep the last one; a consumer may put tasks too), in
        one 8-byte store (the commit word)."""
        row = self._row(self._claim(OTHER))
        s = self._slots
        commit = s[row + COMMIT]
        old, new = _bank(commit), _bank(commit + 1)
        for i, delta in enumerate(deltas):
            s[row + new + i] = s[row + old + i] + delta
        acked = commit >> 1 if lease is None else lease
        s[row + COMMIT] = (acked << 1) | (0 if new == BANK_A else 1)

    def _totals(self) -> tuple[list[int], int, int]:
        """(produced, done, failed, retried, dead) summed, tasks held by live
        consumers, live consumers."""
        s = self._slots
        sums = [0] * COUNTS
        holding = consumers = 0
        for slot in range(self._words[NSLOTS]):
            row = self._row(slot)
            bank = row + _bank(s[row + COMMIT])
            for i in range(COUNTS):
                sums[i] += s[bank + i]
            if s[row + ROLE] == CONSUMER and s[row + STATE] == ALIVE:
                holding += s[row + HOLDING]
                consumers += 1
        return sums, holding, consumers

    # ------------------------------------------------------------------ producing

    def batch_limit(self) -> int:
        cost_ns = self._words[COST_NS]
        if cost_ns <= 0:
            return 1  # no consumer has reported yet: the handler may be slow
        return max(1, min(self._batch_cap, int(TARGET_BATCH_SECONDS * 1e9 / cost_ns)))

    def _put(self, messages: list[bytes], tasks: int) -> None:
        # Count before the message can be taken: pending must never read low.
        self._commit((tasks, 0, 0, 0, 0))
        for message in messages:
            if self._space is not None:
                self._space.acquire()
            self._q.put((message, True))

    def _requeue(self, messages: list[bytes]) -> None:
        """Put back messages already counted pending; takes no space permit, so a
        reaper never blocks on a full queue."""
        for message in messages:
            self._q.put((message, False))

    # ------------------------------------------------------------------ consuming

    def attach_consumer(self) -> None:
        self._here()
        if self._file is not None:
            return
        slot = self._claim(CONSUMER)
        self._slots[self._row(slot) + ROLE] = CONSUMER
        fd = os.open(os.path.join(self._dir, f"c{slot}"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._file = fd
        self._record([], [])

    def detach_consumer(self) -> None:
        """Hand back what this consumer still holds (a lease it did not
        acknowledge, delayed retries, a held sentinel) and unregister."""
        self._here()
        if self._file is None:
            return
        held = list(self._leased or [])
        self._leased = None
        held += [m for _, _, m in sorted(self._delayed)]
        if self._held_sentinel is not None:
            held.append(self._held_sentinel)
        self._requeue(held)
        self._delayed.clear()
        self._held_sentinel = None
        self._write_inflight([self._lease_no, [], [], []])
        row = self._row(self._slot)
        self._slots[row + HOLDING] = 0
        self._slots[row + STATE] = GONE
        os.close(self._file)
        self._file = None

    def _write_inflight(self, record: list[Any]) -> None:
        assert self._file is not None
        data = msgpack.packb(record, use_bin_type=True)
        os.pwrite(self._file, _HEADER.pack(len(data)) + data, 0)

    def _record(
        self, lease: list[bytes], before: list[bytes], after: list[bytes] | None = None
    ) -> None:
        self._write_inflight([self._lease_no, lease, before, before if after is None else after])

    def _delayed_messages(self) -> list[bytes]:
        return [m for _, _, m in self._delayed]

    def _recv(self, timeout: float) -> tuple[bytes, bool] | None:
        """One item off the pipe.  Waits *without* the read lock (unlike
        ``Queue.get``), so a consumer killed while idle never leaves the lock held
        and the other consumers blocked."""
        q: Any = self._q
        if not q._reader.poll(max(0.0, timeout)):
            return None
        if not q._rlock.acquire(timeout=0.05):
            return None
        try:
            if not q._reader.poll(0):
                return None  # another consumer got it first
            data = q._reader.recv_bytes()
        finally:
            q._rlock.release()
        q._sem.release()
        item: tuple[bytes, bool] = ForkingPickler.loads(data)
        return item

    def _take(self, max_tasks: int, timeout: float | None) -> tuple[list[bytes], Any] | None:
        self._here()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._delayed and self._delayed[0][0] <= now:
                return self._lease_from_delayed(now)
            if self._held_sentinel is not None and not self._delayed:
                message, self._held_sentinel = self._held_sentinel, None
                return self._begin([message])
            # Wait in slices, so that a closed and drained queue is noticed.
            wait = IDLE_SLICE if deadline is None else min(IDLE_SLICE, deadline - now)
            if self._delayed:
                wait = min(wait, self._delayed[0][0] - now)
            messages = self._drain(wait, max_tasks)
            if messages:
                return self._begin(messages)
            # Nothing came: on a closed, drained queue that is this consumer's
            # stop (it attached after close, so no sentinel was placed for it).
            if self._closed_and_drained():
                return self._begin([encode_sentinel(self._words[EPOCH])])
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _drain(self, wait: float, max_messages: int) -> list[bytes]:
        """Up to ``max_messages`` messages: the first waited for up to ``wait``
        seconds, the rest only if already in the pipe (one lease, one in-flight
        write for all of them).  Stops after a sentinel; holds a sentinel back
        while this consumer still has retries due."""
        messages: list[bytes] = []
        while len(messages) < max_messages:
            item = self._recv(wait if not messages else 0.0)
            if item is None:
                break
            message, counted = item
            if counted and self._space is not None:
                self._space.release()
            if message.startswith(SENTINEL_PREFIX):
                if self._delayed:  # our sentinel, but retries are due: finish them first
                    self._held_sentinel = message
                else:
                    messages.append(message)
                break
            messages.append(message)
        return messages

    def _closed_and_drained(self) -> bool:
        q: Any = self._q
        return bool(self._words[CLOSED]) and not self._delayed and not q._reader.poll(0)

    def _lease_from_delayed(self, now: float) -> tuple[list[bytes], Any]:
        due = []
        while self._delayed and self._delayed[0][0] <= now:
            due.append(heapq.heappop(self._delayed)[2])
        return self._begin(due)

    def _begin(self, messages: list[bytes]) -> tuple[list[bytes], Any]:
        """Record the lease in the in-flight file before anyone handles it."""
        self._lease_no += 1
        self._leased = messages
        self._record(messages, self._delayed_messages())
        return messages, (self._lease_no, messages)

    def take(self, max_tasks: int = 1, timeout: float | None = None) -> Lease | None:
        lease = super().take(max_tasks, timeout)
        if lease is not None:  # in flight counts tasks: a message may hold a whole batch
            self._slots[self._row(self._slot) + HOLDING] = lease.size + len(self._delayed)
        return lease

    def _ack(self, lease: Lease, outcome: Outcome) -> None:
        self._here()
        lease_no, messages = lease.receipt
        if lease_no != self._lease_no or self._leased is None or self._file is None:
            return  # not the lease this consumer holds, or acknowledged: count nothing
        self._leased = None
        before = self._delayed_messages()
        now = time.monotonic()
        for message, delay in outcome.retry:
            heapq.heappush(self._delayed, (now + delay, next(self._tiebreak), message))
        for message in outcome.give_back:
            heapq.heappush(self._delayed, (now, next(self._tiebreak), message))
        if outcome.dead:
            self._bury(outcome.dead)
        if outcome.retry or outcome.give_back:  # else the file already says after == before
            self._record(messages, before, self._delayed_messages())
        deltas = (0, outcome.done, outcome.failed, len(outcome.retry), len(outcome.dead))
        self._commit(deltas, lease_no)
        self._slots[self._row(self._slot) + HOLDING] = len(self._delayed)

    def _bury(self, letters: list[bytes]) -> None:
        path = os.path.join(self._dir, f"c{self._slot}.dead")
        with open(path, "ab") as f:
            f.write(b"".join(_HEADER.pack(len(x)) + x for x in letters))

    def note_task_cost(self, seconds_per_task: float) -> None:
        old = self._words[COST_NS]
        new = max(1, int(seconds_per_task * 1e9))
        self._words[COST_NS] = new if old <= 0 else (old * 3 + new) // 4

    # ------------------------------------------------------------------ reaping

    def reap(self) -> int:
        with self._lock:
            return self._reap_locked(None)

    def evict(self, pid: int) -> int:
        """A supervisor saw consumer ``pid`` die: put its tasks back now."""
        with self._lock:
            return self._reap_locked(pid)

    def _reap_locked(self, only_pid: int | None) -> int:
        moved = 0
        s = self._slots
        for slot in range(self._words[NSLOTS]):
            row = self._row(slot)
            if s[row + ROLE] != CONSUMER or s[row + STATE] != ALIVE:
                continue
            if only_pid is not None and s[row + PID] != only_pid:
                continue
            if slot == self._slot and self._pid == os.getpid():
                continue
            moved += self._reap_slot(slot)
        return moved

    def _reap_slot(self, slot: int) -> int:
        row = self._row(slot)
        try:
            fd = os.open(os.path.join(self._dir, f"c{slot}"), os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its owner is alive
            header = os.pread(fd, _HEADER.size, 0)
            lease_no, lease, before, after = 0, [], [], []
            if len(header) == _HEADER.size:
                (length,) = _HEADER.unpack(header)
                if length:
                    record = os.pread(fd, length, _HEADER.size)
                    lease_no, lease, before, after = msgpack.unpackb(record, raw=False)
            acked = self._slots[row + COMMIT] >> 1 >= lease_no
            back = after if acked else before + lease
            self._requeue(back)
            os.pwrite(fd, _HEADER.pack(0), 0)
            self._slots[row + STATE] = REAPED
            self._slots[row + HOLDING] = 0
            return len(back)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            if self._words[CLOSED]:
                return
            self._reap_locked(None)
            self._words[CLOSED] = 1
            live = self._totals()[2]
            sentinel = encode_sentinel(self._words[EPOCH])
        self._requeue([sentinel] * live)

    def _sentinel_is_current(self, sentinel: Any) -> bool:
        return bool(sentinel.epoch == self._words[EPOCH])

    def attach_producer(self) -> None:
        with self._lock:
            if self._words[CLOSED]:  # a new run on a closed queue: earlier sentinels go stale
                self._words[CLOSED] = 0
                self._words[EPOCH] += 1
            self._words[PRODUCERS] += 1

    def detach_producer(self, close_if_last: bool = True) -> None:
        with self._lock:
            self._words[PRODUCERS] = max(0, self._words[PRODUCERS] - 1)
            last = self._words[PRODUCERS] == 0
        if last and close_if_last:
            self.close()

    def counters(self) -> Counters:
        (produced, done, failed, retried, dead), holding, consumers = self._totals()
        pending = produced - done - failed
        return Counters(
            ready=max(0, pending - holding),
            in_flight=holding,
            pending=pending,
            produced=produced,
            done=done,
            failed=failed,
            retried=retried,
            dead=dead,
            delayed=0,
            consumers=consumers,
            producers=self._words[PRODUCERS],
            closed=bool(self._words[CLOSED]),
        )

    # ------------------------------------------------------------------ dead letters

    def _dead_files(self) -> list[str]:
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self._dir, n) for n in names if n.endswith(".dead"))

    def _read_dead(self, path: str) -> list[bytes]:
        with open(path, "rb") as f:
            data = f.read()
        out, pos = [], 0
        while pos + _HEADER.size <= len(data):
            (n,) = _HEADER.unpack_from(data, pos)
            out.append(data[pos + _HEADER.size : pos + _HEADER.size + n])
            pos += _HEADER.size + n
        return out

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        raw = [x for path in self._dead_files() for x in self._read_dead(path)]
        return [decode_dead(x) for x in raw[:limit]]

    def requeue_dead(self) -> int:
        with self._lock:
            letters = [decode_dead(x) for p in self._dead_files() for x in self._read_dead(p)]
            for path in self._dead_files():
                os.unlink(path)
        self._commit((0, 0, 0, 0, -len(letters)))
        bodies = [env.body for env in map(envelope_from_dead, letters) if env is not None]
        if bodies:
            self._put_bodies(bodies)
        return len(bodies)

    def purge_dead(self) -> int:
        with self._lock:
            count = 0
            for path in self._dead_files():
                count += len(self._read_dead(path))
                os.unlink(path)
        self._commit((0, 0, 0, 0, -count))
        return count

    def purge(self) -> int:
        """Drop the ready tasks (they count as failed, so ``join`` still returns)."""
        # Tasks counted ready may still be on their way into the pipe (a feeder
        # thread's buffer): wait a moment for as many as the counters promise.
        ready = self.counters().ready
        deadline = time.monotonic() + 1.0
        dropped = 0
        while True:
            wait = max(0.0, deadline - time.monotonic()) if dropped < ready else 0.0
            if (item := self._recv(wait)) is None:
                break
            message, counted = item
            if counted and self._space is not None:
                self._space.release()
            with contextlib.suppress(DecodeError):
                msg = decode(message)
                if isinstance(msg, Batch):
                    dropped += len(msg.bodies)
        self._commit((0, 0, dropped, 0, 0))
        return dropped

    def dispose(self) -> None:
        """Close this process's handles; the opening process also removes the files.

        A process's feeder thread writes what it still holds to the pipe before
        the process exits, unless no one is left to read it: in the opening
        process (the queue ends with it) and in a child whose parent died.  There
        a feeder may wait forever — on a full pipe, or on the write lock of a
        writer that was killed mid-message — so the process must not wait for it.
        """
        self._here()
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if os.getpid() == self._owner:
            self._q.cancel_join_thread()
            self._q.close()
            feeder: threading.Thread | None = getattr(self._q, "_thread", None)
            if feeder is not None:
                feeder.join(FEEDER_GRACE)
            shutil.rmtree(self._dir, ignore_errors=True)
        elif os.getppid() != self._parent:
            self._q.cancel_join_thread()
