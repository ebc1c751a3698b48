"""What a job reports: its :class:`Summary` at the end, :class:`Progress` lines
while it runs.

Every count is the job's own, even on a long-lived queue that served other runs
before: the job reads the queue's counters when it starts and reports the
difference (:func:`counted`), and lists only the dead letters that came after
its start (:func:`from_stages`).  The job engine (:mod:`pcq.job`) is the only
writer of these; the CLI and the progress display only read them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pcq.backends.base import Counters, Queue
from pcq.envelope import short_repr
from pcq.settings import ExitCode

#: How many failed tasks a summary lists; ``failures_more`` counts the rest.
FAILURES_LISTED = 20


@dataclass(frozen=True)
class StageSummary:
    """What one stage of a pipeline did: counts are its input queue's, for this job."""

    name: str
    queue: str
    workers: int
    produced: int  # tasks put on its queue (by the producers or the stage before)
    done: int
    failed: int
    retried: int
    dead: int
    restarts: int = 0


@dataclass(frozen=True)
class Summary:
    """What a job did.  Counts are this job's own, even on a long-lived queue."""

    produced: int
    done: int
    failed: int  # tasks that ended without success after their retries
    retried: int
    dead: int
    elapsed_s: float
    workers: int
    producers: int
    restarts: int = 0  # consumers replaced after dying
    producer_errors: int = 0
    interrupted: int | None = None  # the signal that stopped the job
    # This job's dead letters, the first FAILURES_LISTED of them: dicts with
    # id, item (a short repr), error, attempts; failures_more counts the rest.
    failures: tuple[dict[str, Any], ...] = ()
    failures_more: int = 0
    setup_error: str | None = None  # a consumer's setup raised: the job stopped
    stages: tuple[StageSummary, ...] = ()  # a pipeline's, one per stage

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        if self.setup_error is not None:
            return ExitCode.USAGE  # the job could not start its consumers: configuration
        return ExitCode.FAILED if self.failed or self.producer_errors else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "exit_code": int(self.exit_code)}
        if not self.stages:
            del out["stages"]  # a single-stage job's fields stay as they were
        return out


@dataclass(frozen=True)
class Progress:
    """One line of a job's progress (one queue, or one stage), counted from the
    job's start.  ``total`` is the number of tasks when it is known ahead (every
    producer returned something with ``len()``); ``producing`` is False once
    nothing more can come to this queue, when ``produced`` is the final count."""

    label: str
    produced: int
    done: int
    failed: int
    retried: int
    producing: bool
    total: int | None
    elapsed: float


def progress(label: str, before: Counters, now: Counters, producing: bool,
             total: int | None, elapsed: float) -> Progress:
    return Progress(label, now.produced - before.produced, now.done - before.done,
                    now.failed - before.failed, now.retried - before.retried,
                    producing, total, elapsed)


def counted(name: str, q: Queue, workers: int, before: Counters, after: Counters,
            restarts: int) -> StageSummary:
    """One queue's counts for this job: ``after`` less ``before``."""
    return StageSummary(name, q.name, workers, after.produced - before.produced,
                        after.done - before.done, after.failed - before.failed,
                        after.retried - before.retried, after.dead - before.dead, restarts)


def from_stages(rows: list[StageSummary], queues: list[Queue], before: list[Counters],
                after: list[Counters], **fields: Any) -> Summary:
    """A job's summary from one row a stage: ``produced`` is the first stage's,
    ``done`` the last stage's; ``failed``, ``retried``, ``dead`` and the
    failures listed add up every stage's.  A pipeline keeps its rows in
    ``stages``."""
    failures: list[dict[str, Any]] = []
    more = 0
    for q, b, a in zip(queues, before, after, strict=True):
        listed, beyond = _failures(q, b, a)
        room = FAILURES_LISTED - len(failures)
        failures += listed[:room]
        more += beyond + max(0, len(listed) - room)
    return Summary(
        produced=rows[0].produced, done=rows[-1].done, failed=sum(r.failed for r in rows),
        retried=sum(r.retried for r in rows), dead=sum(r.dead for r in rows),
        restarts=sum(r.restarts for r in rows), failures=tuple(failures), failures_more=more,
        stages=tuple(rows) if len(rows) > 1 else (), **fields)


def _failures(q: Queue, before: Counters, after: Counters) -> tuple[list[dict[str, Any]], int]:
    """This job's dead letters on ``q`` (they follow those the queue had before
    it), the first FAILURES_LISTED of them, and how many more there are."""
    new = after.dead - before.dead
    if new <= 0:
        return [], 0
    letters = q.dead_letters(before.dead + min(new, FAILURES_LISTED))[before.dead :]
    listed = [
        {"id": letter.get("id"),
         "item": short_repr(letter["body"]) if "body" in letter else "(undecodable message)",
         "error": str(letter.get("error")), "attempts": letter.get("attempts")}
        for letter in letters
    ]
    return listed, new - len(listed)
