"""Logging for the ``pcq`` command: one line a record, on stderr, level from
``--log-level`` or ``PCQ_LOG_LEVEL``.

The handler is set up in the parent before any consumer forks, so every child
logs the same way, to the same stderr (above the progress display, when one is
shown).  The library itself only logs to the ``pcq`` logger and configures
nothing.
"""

from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LEVEL = "warning"
FORMAT = "%(asctime)s pcq %(levelname)s %(message)s"



def configure(level: str = DEFAULT_LEVEL) -> None:
    """Send the ``pcq`` logger's records at ``level`` and above to stderr.
    Idempotent: a second call only changes the level."""
    logger = logging.getLogger("pcq")
    if not any(h.get_name() == "pcq-cli" for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name("pcq-cli")
        handler.setFormatter(_Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False  # a user's root handler would print each line twice
    logger.setLevel(level.upper())


class _Formatter(logging.Formatter):
    """A record whose message already speaks for itself ("pcq: warning: ...",
    written to read well without any handler) is printed as it is."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, str) and record.msg.startswith("pcq: "):
            return record.getMessage()
        return super().format(record)
