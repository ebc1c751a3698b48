"""What a person at the terminal sees while a job runs: one progress line a
stage, with everything the job's processes print shown above it.

Output routing.  A live display redraws its lines in place, so anything else
written to the terminal meanwhile would be drawn through it.  The consumers and
producers are forked children: they write to the file descriptors 1 and 2 they
inherit, not through any Python object the parent could wrap.  So while the
display is shown, descriptors 1 and 2 of this process (and so of every child
forked meanwhile) point into a pipe; a thread here reads it and prints each
complete line above the display, and the display itself writes to a duplicate
of the terminal.  Lines never break in the middle: the children's stdout is
line-buffered (see :func:`line_buffered`), and a write of up to ``PIPE_BUF``
(4 KiB) bytes to a pipe is atomic.

Fork safety: the display is drawn only from the job's thread (``update``) or
the reader thread, never by a refresh thread of its own, and ``sys.stdout`` /
``sys.stderr`` stay the plain file objects a child may use: a child never
touches the console, whose lock another thread may hold at the fork.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pcq.summary import Progress

#: Rates are measured over this many seconds of recent progress.
RATE_WINDOW = 5.0
#: How long, after the job, the reader waits for the last lines of processes
#: that may still hold the pipe (a handler's own background child).
DRAIN_SECONDS = 2.0


def line_buffered() -> None:
    """Make this process's stdout and stderr write whole lines, one system call
    a line, as the children forked from it inherit them: lines of many processes
    then never interleave mid-line, on a terminal, through a pipe or into a file.

    An unbuffered stream (``python -u``, ``PYTHONUNBUFFERED``) writes a line's
    text and its newline in two calls, between which another process's line
    can land: it is replaced by a line-buffered one on the same descriptor.
    """
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if stream.write_through or isinstance(stream.buffer, io.RawIOBase):
                stream.flush()
                setattr(sys, name, open(stream.fileno(), "w", buffering=1, closefd=False,  # noqa: SIM115
                                        encoding=stream.encoding, errors=stream.errors))
            else:
                stream.reconfigure(line_buffering=True)


def on_a_terminal() -> bool:
    """A display is drawn only when both stdout and stderr are terminals."""
    return all(_isatty(stream) for stream in (sys.stdout, sys.stderr))


def _isatty(stream: IO[str] | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


class Display:
    """Live progress lines on the terminal, or nothing when ``enabled`` is False
    or stdout/stderr are not terminals.  Use as a context manager around the
    job; pass :meth:`update` as the job's ``on_progress``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and on_a_terminal()
        self._live: Live | None = None
        self._console: Console | None = None
        self._saved: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None
        self._history: dict[str, deque[tuple[float, int]]] = {}
        # The reader thread prints and the job's thread redraws: rich's Live
        # repositions the cursor for each, so one must not run inside the other.
        self._drawing = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Display:
        if not self.enabled:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        terminal = os.dup(2)
        self._saved = (os.dup(1), os.dup(2))
        read_end, write_end = os.pipe()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            width = os.get_terminal_size(terminal).columns
        except OSError:
            width = 0
        if width <= 0:  # a terminal that never said its size (`script`, some CI ptys)
            width = int(os.environ.get("COLUMNS", "") or 100)
        # Descriptors 1 and 2 are the pipe now: rich must not size itself from them.
        self._console = Console(file=os.fdopen(terminal, "w", encoding="utf-8",
                                               errors="replace"),
                                force_terminal=True, width=width)
        self._live = Live(Text(""), console=self._console, auto_refresh=False, transient=True,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start()
        self._reader = threading.Thread(target=self._relay, args=(read_end,),
                                        name="pcq-output", daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            return
        # Give descriptors 1 and 2 back; once no process holds the pipe's write
        # end, the reader sees its end and has printed every line.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        out, err = self._saved
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._saved = None
        if self._reader is not None:
            self._reader.join(DRAIN_SECONDS)
        assert self._live is not None and self._console is not None
        with self._drawing:
            self._live.stop()
        self._console.file.flush()

    def _relay(self, fd: int) -> None:
        """Print every complete line read from ``fd`` above the display."""
        pending = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while True:
                try:
                    chunk = pipe.read(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._print(line)
        if pending:
            self._print(pending)

    def _print(self, line: bytes) -> None:
        assert self._console is not None
        text = Text.from_ansi(line.decode("utf-8", errors="replace").rstrip("\r"))
        with self._drawing:
            self._console.print(text, soft_wrap=True, highlight=False)

    # ------------------------------------------------------------------ drawing

    def update(self, rows: Sequence[Progress]) -> None:
        """Draw ``rows`` (a job's ``on_progress`` callback)."""
        if self._live is None:
            return
        table = Table.grid(padding=(0, 1))
        for row in rows:
            table.add_row(*self._cells(row))
        with self._drawing:
            self._live.update(table, refresh=True)

    def _cells(self, row: Progress) -> list[Any]:
        finished = row.done + row.failed
        total = row.total if row.total is not None else (None if row.producing else row.produced)
        rate = self._rate(row.label, row.elapsed, finished)
        if total is None:  # still producing, no known total: no percentage to show
            bar = ProgressBar(total=None, width=30, pulse=True, animation_time=row.elapsed)
            count = f"{finished}/{row.produced}+ done"  # +: the producers are not done
            eta = "ETA -:--:--"
        else:
            bar = ProgressBar(total=max(total, 1), completed=finished, width=30)
            count = f"{finished}/{total} done"
            left = max(total - finished, 0)
            eta = f"ETA {_clock(left / rate)}" if rate > 0 else "ETA -:--:--"
            if not left:
                eta = "finishing" if row.producing else "done"
        counts = f"{row.failed} failed, {row.retried} retried"
        return [Text(row.label, style="bold"), bar, Text(count), Text(counts, style="dim"),
                Text(f"{rate:,.0f}/s"), Text(eta), Text(_clock(row.elapsed), style="dim")]

    def _rate(self, label: str, now: float, finished: int) -> float:
        """Tasks a second over the last RATE_WINDOW seconds (since the start before)."""
        history = self._history.setdefault(label, deque())
        history.append((now, finished))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
            history.popleft()
        then, before = history[0]
        if now - then < 0.5:  # too short a span to say
            return finished / now if now > 0.2 else 0.0
        return (finished - before) / (now - then)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"

