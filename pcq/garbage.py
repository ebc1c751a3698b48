"""Messages in a queue that are not pcq tasks ("garbage"), as a person reads them.

Anything can be written to a queue's list (``redis-cli RPUSH``, another
program); a consumer dead-letters what it cannot decode and goes on.  Each such
message is said on stderr when it is dead-lettered (:func:`garbage_line`), a
job's summary counts them (:func:`garbage_in`), and ``pcq dead requeue`` says
which letters it left, since they hold no task to requeue (:func:`skipped_lines`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("pcq")

#: How many bytes of a message a line shows.
SHOWN_BYTES = 40
#: How many skipped letters ``pcq dead requeue`` lists; it counts the rest.
SKIPPED_LISTED = 10
#: How many dead letters ``pcq dead requeue`` reads to find what it skipped.
SKIPPED_READ = 1000


def garbage_text(raw: bytes) -> str:
    """The first bytes of ``raw`` as text, quoted: ``'hello world'``; bytes that
    are not UTF-8 and characters that do not print as escapes (``'\\x93\\n'``)."""
    head = raw[:SHOWN_BYTES].decode("utf-8", errors="backslashreplace")
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in head)
    return f"'{text}'" + ("..." if len(raw) > SHOWN_BYTES else "")


def garbage_line(raw: bytes, reason: str) -> str:
    """One line for a message dead-lettered because it is not a pcq task."""
    return (f"message {garbage_text(raw)} ({len(raw)} bytes) dead-lettered: it is not "
            f"a pcq task ({reason})")


def say_garbage(bad: Sequence[tuple[bytes, str]]) -> int:
    """Log each (message, reason) of a lease's undecodable messages, as the
    consumer dead-letters them; how many there were."""
    for raw, reason in bad:
        log.warning("%s", garbage_line(raw, reason))
    return len(bad)


def garbage_in(summary: Any) -> int:
    """How many of a job's dead letters were garbage: every dead letter is a
    failed task (counted in ``failed``) or a message that held no task."""
    return max(int(summary.dead) - int(summary.failed), 0)


def skipped_lines(letters: Sequence[dict[str, Any]]) -> tuple[int, list[str]]:
    """What ``pcq dead requeue`` left in dead letters: how many letters hold no
    task, and one line each for the first SKIPPED_LISTED, then how many more."""
    skipped = [letter for letter in letters if "tag" not in letter or "seq" not in letter]
    lines = [f"  skipped {garbage_text(_raw(letter))}: {letter.get('error')}"
             for letter in skipped[:SKIPPED_LISTED]]
    if len(skipped) > SKIPPED_LISTED:
        lines.append(f"  ... and {len(skipped) - SKIPPED_LISTED} more")
    return len(skipped), lines


def _raw(letter: dict[str, Any]) -> bytes:
    raw = letter.get("raw", b"")
    return raw if isinstance(raw, bytes) else str(raw).encode()
