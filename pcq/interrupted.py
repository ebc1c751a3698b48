"""What an interrupted job leaves on a shared queue, and what the user is told.

A queue on a server outlives the job that filled it.  A ``pcq run`` stopped by
Ctrl-C leaves the tasks it had not handled; a ``pcq produce`` stopped half way
leaves the queue open (it must not close it: the job is not complete), so its
consumers wait for more.  Neither is wrong, but each needs saying, with what
the user can do about it:

* :func:`leftovers_line`: a ``pcq run`` starting on a queue that holds an
  interrupted run's tasks says so, and what will happen; ``--resume`` finishes
  them without producing again (the run's producer is then :func:`nothing`),
  ``pcq purge`` starts clean.
* :func:`left_open_note`: the summary of an interrupted ``pcq produce`` says
  the queue was left open and how to close it.
"""

from __future__ import annotations

from typing import Any

from pcq.backends.base import Queue
from pcq.errors import ConfigError


def nothing() -> tuple[()]:
    """The producer of a resumed run: it puts nothing, so the run handles what
    the queue holds, closes it and ends."""
    return ()


def leftovers(q: Queue) -> int:
    """Tasks an interrupted run left on ``q``: put, not acknowledged, and no
    producer or consumer attached that could still be working on them (0 if none)."""
    c = q.counters()
    return c.pending if c.pending > 0 and c.producers == 0 and c.consumers == 0 else 0


def leftovers_line(name: str, left: int, resume: bool) -> str:
    """What a ``pcq run`` that finds ``left`` tasks on queue ``name`` will do."""
    if resume:
        return (f"pcq run: resuming queue {name!r}: handling the {left} task(s) an "
                "interrupted run left, without running PRODUCER")
    return (f"pcq run: queue {name!r} still holds {left} task(s) of an interrupted run; "
            "they are handled along with everything PRODUCER yields anew (a task handled "
            f"before may run twice). To finish only them: --resume; to start clean: "
            f"`pcq purge --queue {name}` first")


def resume_check(q: Queue | None, name: str, resume: bool) -> tuple[str | None, bool]:
    """(the line to say before a run, whether there is a run to do) for a run on
    ``q`` (None: a local queue, which never outlives its run)."""
    if q is None:
        if resume:
            raise ConfigError("--resume needs a shared queue (--url redis://...): a local "
                              "queue does not outlive its run")
        return None, True
    left = leftovers(q)
    if left:
        return leftovers_line(name, left, resume), True
    if resume:
        return f"pcq run: nothing to resume: queue {name!r} holds no unfinished task", False
    return None, True


def left_open_note(q: Queue, summary: Any, name: str) -> str:
    """For an interrupted ``pcq produce``: the note on its summary line when it
    left ``q`` open with no producer attached (consumers then wait for more)."""
    if summary.interrupted is None or q.state() != "open" or q.counters().producers:
        return ""
    return (f"the queue was left open: its consumers wait for more tasks until "
            f"`pcq close --queue {name}` (or another `pcq produce` that completes)")
