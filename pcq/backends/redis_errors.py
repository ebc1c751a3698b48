"""What redis-py's error texts mean, in words a user of pcq can act on.

redis-py passes on what the server (or its own parser) said: ``HELLO must be
called with the client already authenticated ...`` when the server wants a
password and the URL gave none, ``Protocol error, got "H" as reply type byte``
when something other than Redis answered.  :func:`explain` turns such an
exception into one plain sentence; an error it does not know keeps its text.
It is pure (no I/O), so the link calls it where it translates redis-py's errors.

RETRYABLE, MOVING and REFUSED sort redis-py's exceptions by what the link
does about them: wait the outage out, find the queue's master again, or give
up at once.
"""

from __future__ import annotations

import redis
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    NoPermissionError,
    ReadOnlyError,
    TryAgainError,
)

#: Errors worth waiting out: the server is restarting, loading, or unreachable.
RETRYABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: The queue's master moved (resharding, failover): find it again and go on.
#: (AskError covers MovedError.)
MOVING = (AskError, TryAgainError, ClusterDownError, ReadOnlyError)
#: The server answered and said no: retrying cannot help.
REFUSED = (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)

#: (words the error's text holds, what it means); the first match wins.
_MEANINGS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("HELLO must be called with the client already authenticated", "NOAUTH",
      "Authentication required"),
     "the server needs a password: give it in the URL, redis://:PASSWORD@HOST:PORT/DB"),
    (("WRONGPASS", "invalid username-password pair", "invalid password"),
     "the server refused the password (or user name) in the URL"),
    (("as reply type byte", "Protocol Error", "Protocol error"),
     "not a Redis server: what answered does not speak the Redis protocol "
     "(check the host and port)"),
)


def explain(exc: BaseException) -> str:
    """One line saying what ``exc`` (a redis-py error) means for the user."""
    text = str(exc)
    for words, meaning in _MEANINGS:
        if any(word in text for word in words):
            return meaning
    return text
