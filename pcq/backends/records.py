"""The values the queue interface passes: a :class:`Lease` taken, a task's
:class:`Failure`, the :class:`Outcome` of an ack as a backend applies it, and a
:class:`Counters` snapshot."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pcq.envelope import Batch, Envelope, Sentinel, encode_dead, encode_envelope, short_repr

log = logging.getLogger("pcq")


@dataclass(slots=True)
class Lease:
    """Tasks taken by one consumer in one ``take``; acknowledged together.

    ``batches`` hold the tasks in queue order.  ``bad`` holds messages that could
    not be decoded, with the reason; ``ack`` dead-letters them.  ``sentinel`` is
    set when the take ended at this consumer's sentinel: exit after handling
    the batches.  ``receipt`` is the backend's own bookkeeping.  ``deaths`` > 0:
    a lease of one task that was in flight in that many consumers that died.
    """

    batches: list[Batch]
    sentinel: Sentinel | None = None
    bad: list[tuple[bytes, str]] = field(default_factory=list)
    receipt: Any = None
    deaths: int = 0

    @property
    def size(self) -> int:
        return sum(len(b.bodies) for b in self.batches)

    def envelopes(self) -> Iterator[Envelope]:
        for batch in self.batches:
            yield from batch.envelopes()


@dataclass(frozen=True, slots=True)
class Failure:
    """A task whose handler failed.  ``retry_in`` is None when it goes to dead letters."""

    envelope: Envelope
    error: str
    traceback: str = ""
    retry_in: float | None = None


def poisoned(lease: Lease, max_deliveries: int) -> list[Failure]:
    """The failures that dead-letter every task of ``lease`` when consumers died
    ``max_deliveries`` times (0: no limit) with it in flight — a poison task,
    never run again; [] for any other lease."""
    if not 0 < max_deliveries <= lease.deaths:
        return []
    error = f"consumer died {lease.deaths} times while handling it"
    envs = list(lease.envelopes())
    for env in envs:
        log.error("task %s dead-lettered (id %s): %s", short_repr(env.body), env.id, error)
    return [Failure(env, error) for env in envs]


@dataclass(frozen=True, slots=True)
class Counters:
    """A snapshot of a queue.  ``pending`` = put and not yet done or failed."""

    ready: int
    in_flight: int
    pending: int
    produced: int
    done: int
    failed: int
    retried: int
    dead: int
    delayed: int
    consumers: int
    producers: int
    closed: bool


def state_of(c: Counters) -> str:
    """The run state a counters snapshot shows (see :meth:`Queue.state`)."""
    if not c.closed:
        return "open"
    return "closing" if c.pending > 0 else "idle"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``ack`` hands a backend, already encoded."""

    done: int  # tasks handled successfully
    failed: int  # tasks that go to dead letters now
    retry: list[tuple[bytes, float]]  # (message, delay in seconds)
    dead: list[bytes]  # dead letters: failed tasks and undecodable messages
    give_back: list[bytes]  # not started: back to ready, no attempt counted
    outputs: list[bytes] = field(default_factory=list)  # for the target queue, encoded
    output_tasks: int = 0  # tasks the outputs hold (a local message holds many)


def encode_outcome(lease: Lease, failures: Sequence[Failure], give_back: Sequence[Envelope],
                   outputs: list[bytes], output_tasks: int) -> Outcome:
    """The :class:`Outcome` of acknowledging ``lease`` with ``failures`` and
    ``give_back``, encoded (``outputs``: a stage's, encoded for its target)."""
    retry: list[tuple[bytes, float]] = []
    dead = [encode_dead(None, reason, raw=raw) for raw, reason in lease.bad]
    failed = 0
    for f in failures:
        if f.retry_in is None:
            dead.append(encode_dead(f.envelope, f.error, f.traceback))
            failed += 1
        else:
            env = f.envelope
            again = Envelope(env.tag, env.seq, env.body, env.attempts + 1, env.enqueued_at)
            retry.append((encode_envelope(again), f.retry_in))
    back = [encode_envelope(env) for env in give_back]
    done = lease.size - len(failures) - len(back)
    return Outcome(done, failed, retry, dead, back, outputs, output_tasks)
