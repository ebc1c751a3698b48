"""What ``pcq consume`` shows while it runs: the queue's progress, and how long
its consumers had nothing to do.

A ``pcq consume`` serves a queue other hosts may serve too, and may wait a long
time for a producer (an idle queue is the same as a new one).  A thread of the
command's own process reads the queue's counters through a connection of its
own — every DRAW_EVERY seconds while a progress line is shown, every
WATCH_EVERY seconds otherwise (a counters snapshot costs the server a look at
every consumer's in-flight list, and every host of a big job asks) — and

* draws one progress line (the display of :mod:`pcq.progress`): the queue's
  tasks done (by every host) out of those there were to do since this command
  started, and the rate;
* adds up the time during which nothing was pending: waiting for a producer
  (or, for a stage, for the stage before it), not working, so the summary's
  rate leaves it out.

The thread only reads, through the job's own queue object: its link is made
for threads (the heartbeat's uses it too), and one link means one outage clock
and one line when the link is lost and one when it is back, however many
threads ask.  A forked consumer builds a client of its own (the link's pid
check), so a fork while the thread holds a connection harms nobody; nor does
a child ever use the display (see :mod:`pcq.progress`).  The watch is a
display: an error while it looks (the link lost) only skips that look; the job
decides about the link.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from pcq.backends.base import Counters, Queue
from pcq.errors import PcqError
from pcq.summary import Progress

#: Seconds between two looks at the counters, with and without a progress line.
DRAW_EVERY = 0.5
WATCH_EVERY = 1.0


class ConsumeWatch:
    """Use as a context manager around ``consume_job``; ``waited_s`` is the time
    the queue had nothing pending while it ran."""

    def __init__(self, q: Queue, on_progress: Callable[[list[Progress]], None],
                 drawn: bool) -> None:
        self._q = q
        self._on_progress = on_progress
        self._every = DRAW_EVERY if drawn else WATCH_EVERY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.waited_s = 0.0

    def __enter__(self) -> ConsumeWatch:
        self._thread = threading.Thread(target=self._watch, name="pcq-consume-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        started = last = time.monotonic()
        before: Counters | None = None
        idle: Counters | None = None  # the last look, when it saw nothing pending
        while not self._stop.is_set():
            try:
                now_counters = self._q.counters()
            except PcqError:  # the link is lost: the job says so, and decides
                now_counters = None
            now = time.monotonic()
            if now_counters is not None:
                before = before or now_counters
                # Idle between two looks only if both saw nothing pending and
                # nothing was done in between: a look samples, it cannot tell
                # when within the interval work came and went.
                if idle is not None and idle.done == now_counters.done and (
                        idle.pending == now_counters.pending == 0):
                    self.waited_s += now - last
                idle = now_counters if now_counters.pending == 0 else None
                self._on_progress([consume_progress(self._q.name, before, now_counters,
                                                    now - started - self.waited_s)])
            last = now
            self._stop.wait(self._every)


def consume_progress(name: str, before: Counters, now: Counters, working_s: float) -> Progress:
    """The progress line of a ``pcq consume`` of queue ``name``: tasks done out of
    those pending when it started plus those produced since."""
    produced = before.pending + now.produced - before.produced
    return Progress(f"queue {name}", produced, now.done - before.done,
                    now.failed - before.failed, now.retried - before.retried,
                    producing=True, total=None, elapsed=max(working_s, 0.0))
