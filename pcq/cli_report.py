"""What a ``pcq`` command prints when it is done: the job's summary (one line
on stderr and the failures below it, or one JSON object on stdout) and the
two lines of a usage error.  ``err`` is the stderr console every command
writes its lines to."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from pcq.garbage import garbage_in
from pcq.summary import Summary

err = Console(stderr=True)


def report(summary: Summary, as_json: bool, what: str, note: str = "",
            waited: float = 0.0) -> None:
    """The job's summary: one line on stderr (``note`` ends it), the failures
    below it; or one JSON object on stdout.  ``waited``: seconds of it with
    nothing to do (waiting for a producer), left out of the rate."""
    if summary.setup_error:
        err.print(f"pcq: error: {summary.setup_error}", highlight=False, soft_wrap=True,
                  markup=False)
    garbage = garbage_in(summary)
    if as_json:
        out = {**summary.as_dict(), "garbage": garbage, "waited_s": round(waited, 3)}
        print(json.dumps(out), flush=True)
        return
    err.print(summary_line(summary, what, garbage, note, waited), highlight=False,
              soft_wrap=True, markup=False)
    for failure in summary.failures:
        err.print(f"  failed: {failure['item']}: {failure['error']}", highlight=False,
                  soft_wrap=True, markup=False)
    if summary.failures_more:
        err.print(f"  ... and {summary.failures_more} more failed", highlight=False)
    for stage in summary.stages:
        err.print(f"  stage {stage.name} ({stage.queue}, {stage.workers} worker(s)): "
                  f"{stage.produced} produced, {stage.done} done, {stage.failed} failed, "
                  f"{stage.retried} retried", highlight=False, soft_wrap=True)


def summary_line(summary: Summary, what: str, garbage: int, note: str, waited: float) -> str:
    waited = min(waited, summary.elapsed_s)  # the watch starts a moment before the job
    working = summary.elapsed_s - waited
    rate = summary.done / working if working > 0 else 0.0
    parts = [f"{summary.produced} produced"] if summary.produced or what != "consume" else []
    parts += [f"{summary.done} done", f"{summary.failed} failed", f"{summary.retried} retried"]
    if garbage:  # said one by one as they were met; see `pcq dead list`
        parts.append(f"{garbage} not a task (dead-lettered)")
    line = f"pcq {what}: " + ", ".join(parts) + f" in {summary.elapsed_s:.2f} s ({rate:,.0f}/s"
    line += f"; {waited:.2f} s of it with nothing to do)" if waited >= 0.05 else ")"
    if summary.restarts:
        line += f"; {summary.restarts} consumer(s) restarted"
    if summary.producer_errors:
        line += f"; {summary.producer_errors} producer(s) failed"
    if summary.interrupted is not None:
        line += "; interrupted"
    return line + (f": {note}" if note else "")


def usage_error(exc: Any) -> None:
    """Two lines: ``pcq: error: WHAT`` and the command's usage, with where to find help."""
    err.print(f"pcq: error: {exc.format_message()}", highlight=False, soft_wrap=True,
              markup=False)
    if exc.ctx is not None:
        usage = " ".join(exc.ctx.get_usage().split())
        err.print(f"{usage}  (see {exc.ctx.command_path} -h)", highlight=False,
                  soft_wrap=True, markup=False)
