"""Producer batching: how ``Queue.put_many`` groups a producer's items into
batches, and the thread that sends a partial batch when the items come slowly.

A batch is a wire unit, not a unit of work: it is as large as
``Queue.batch_limit()`` allows (about ``TARGET_BATCH_SECONDS`` of handler work,
from what consumers report), so cheap tasks travel in large batches and
expensive ones one by one, and tasks spread over all consumers either way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from pcq.errors import SerializationError

#: Largest number of tasks moved by one put or take.
MAX_BATCH = 1024
#: A batch should hold about this much handler work, so that the tasks of a slow
#: handler spread over all consumers and a killed consumer loses little.
TARGET_BATCH_SECONDS = 0.005
#: Longest a partial batch waits for more items before it is sent anyway.
LINGER_SECONDS = 0.001


class PutInterrupted(BaseException):
    """A put that waited for room was interrupted (see :meth:`Queue.interrupt`).
    A BaseException, so that ``put_many`` stops at once instead of flushing."""


class Linger:
    """The items ``put_many`` has not sent yet, and a thread that sends them once
    they have waited ``LINGER_SECONDS`` (the iterable is slow).

    The caller appends to ``pending`` (a deque: appends and pops are atomic, so
    the hot loop takes no lock); whoever sends — the caller when a batch is full,
    or the thread — pops and sends under ``_send_lock``, so tasks go out in
    order and each exactly once.  An error in the thread's send is raised again
    in the caller's thread.
    """

    def __init__(self, send: Callable[[list[Any]], None]) -> None:
        self.pending: deque[Any] = deque()
        self.count = 0  # items sent
        self.sent_at = time.monotonic()  # when the last send returned
        self._send_fn = send
        self._send_lock = threading.Lock()
        self._sends = 0
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pcq-linger", daemon=True)
        self._thread.start()

    def send(self, limit: int) -> None:
        """Send up to ``limit`` pending items (all of them when ``limit`` is 0)."""
        with self._send_lock:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._send_locked(limit)

    def _send_locked(self, limit: int, caller: bool = True) -> None:
        pending = self.pending
        n = len(pending) if not limit else min(limit, len(pending))
        if caller and n == len(pending):
            # In the caller's thread nothing is appended meanwhile: take all at once.
            batch = list(pending)
            pending.clear()
        else:
            batch = [pending.popleft() for _ in range(n)]
        self._sends += 1
        if batch:
            self._send_fn(batch)
            self.count += len(batch)
        self.sent_at = time.monotonic()

    def _watch(self) -> None:
        seen = -1
        while not self._done.wait(LINGER_SECONDS):
            # While batches keep going out the producer is fast: leave it alone.
            if self._sends != seen or not self.pending:
                seen = self._sends
                continue
            with self._send_lock:
                if self._sends == seen and self._error is None:
                    try:
                        self._send_locked(0, caller=False)
                    except BaseException as exc:  # handed to the caller's thread
                        self._error = exc
                seen = self._sends

    def stop(self, flush: bool) -> None:
        """Stop the thread; then, with ``flush``, send what is left."""
        self._done.set()
        self._thread.join()
        if flush:
            while self.pending or self._error is not None:
                self.send(MAX_BATCH)



def put_batched(items: Iterable[Any], send: Callable[[list[Any]], None],
                batch_limit: Callable[[], int]) -> int:
    """Send every item of ``items`` with ``send(batch)``, in batches of up to
    ``batch_limit()`` items; returns how many were sent (see
    :meth:`pcq.backends.base.Queue.put_many`)."""
    linger = Linger(send)
    clock = time.monotonic
    append = linger.pending.append
    pending = linger.pending
    extend = pending.extend
    iterator = iter(items)
    try:
        limit = batch_limit()
        # The quiet spell is counted from here, not from before the linger
        # thread started: starting it can take longer than LINGER_SECONDS.
        linger.sent_at = clock()
        for item in iterator:
            append(item)
            n = len(pending)
            # The first item after a quiet spell goes at once: a trickle
            # never waits for the linger thread.
            if n >= limit or (n == 1 and clock() - linger.sent_at > LINGER_SECONDS):
                linger.send(limit)
                limit = batch_limit()
                continue
            # The rest of the batch at C speed: deque.extend appends each item
            # as islice yields it, so the linger thread still sees a slow
            # iterable's items as they come.
            extend(islice(iterator, limit - n))
            if len(pending) >= limit:
                linger.send(limit)
                limit = batch_limit()
    except SerializationError as exc:
        # The producer stops at the bad item: what it yielded after it is not
        # put, so "the N before it were put" stays exact.
        linger.stop(flush=False)
        exc.put = linger.count + exc.index
        raise
    except Exception:
        linger.stop(flush=True)  # the items yielded before the error are put
        raise
    except BaseException:
        linger.stop(flush=False)  # interrupted: stop at once, never block
        raise
    try:
        linger.stop(flush=True)
    except SerializationError as exc:
        exc.put = linger.count + exc.index
        raise
    return linger.count
