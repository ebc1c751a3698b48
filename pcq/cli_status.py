"""What ``pcq status`` shows: a queue's state, counters and registrations, and
those of every queue its stages feed.

A queue on a server serves run after run, and its counters add up across them.
So ``produced``, ``done``, ``failed``, ``retried`` and ``dead`` are shown for the
current run (counted from where they stood when it started, which the backend
notes: :meth:`~pcq.backends.base.Queue.run_start`), with the totals over every
run beside them, labelled as such; in ``--json`` the top-level numbers are the
run's and ``totals`` holds the others.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from rich.table import Table

from pcq.backends.base import Counters, Queue, state_of

#: The counters that add up across runs.
RUN_FIELDS = ("produced", "done", "failed", "retried", "dead")
_STATES = {"open": "open", "closing": "closed with work left", "idle": "idle (run finished)"}


def chain(q: Queue) -> Iterator[Queue]:
    """``q`` and the queues its stages feed, in order (``pcq status`` of a pipeline)."""
    seen = {q.name}
    yield q
    name = q.feeds()
    while name is not None and name not in seen:
        seen.add(name)
        nxt = q.sibling(name)
        try:
            yield nxt
            name = nxt.feeds()
        finally:
            nxt.dispose()


def this_run(c: Counters, start: dict[str, int] | None) -> dict[str, int]:
    """The current run's numbers: the totals less where they stood at its start."""
    totals = {f: int(getattr(c, f)) for f in RUN_FIELDS}
    if start is None:  # the first run: its numbers are the totals
        return totals
    return {f: max(totals[f] - start.get(f, 0), 0) for f in RUN_FIELDS}


def status_tables(q: Queue) -> Table:
    tables = [status_table(each) for each in chain(q)]
    if len(tables) == 1:
        return tables[0]
    grid = Table.grid()
    for table in tables:
        grid.add_row(table)
    return grid


def status_table(q: Queue) -> Table:
    c = q.counters()
    run = this_run(c, q.run_start())
    feeds = q.feeds()
    title = f"pcq queue {q.name!r}" + (f" (feeds {feeds!r})" if feeds else "")
    table = Table(title=title, show_header=True)
    table.add_column("")
    table.add_column("this run")
    table.add_column("all runs", style="dim")
    table.add_row("state", _STATES[state_of(c)], "")
    for field in ("ready", "in_flight", "pending", "delayed", *RUN_FIELDS, "producers",
                  "consumers", "closed"):
        now = str(getattr(c, field))
        shown = (str(run[field]), now) if field in run else (now, "")
        table.add_row(field.replace("_", "-"), *shown)
    for who in q.registrations():
        table.add_row(who["role"], f"{who['host']} pid {who['pid']} "
                      f"(heartbeat {time.time() - who['heartbeat']:.1f} s ago)", "")
    return table


def status_dict(q: Queue) -> dict[str, Any]:
    c = q.counters()
    out: dict[str, Any] = {f: getattr(c, f) for f in c.__slots__}
    out.update(this_run(c, q.run_start()))
    out["totals"] = {f: getattr(c, f) for f in RUN_FIELDS}
    out["state"] = state_of(c)
    regs = q.registrations()
    out["consumer_list"] = [r for r in regs if r["role"] == "consumer"]
    out["producer_list"] = [r for r in regs if r["role"] == "producer"]
    out["queue"], out["feeds"] = q.name, q.feeds()
    return out


def status_json(q: Queue) -> dict[str, Any]:
    """The queue's status; for a pipeline, ``stages`` holds every queue's in order."""
    stages = [status_dict(each) for each in chain(q)]
    out = dict(stages[0])
    if len(stages) > 1:
        out["stages"] = stages
    return out
