"""The Redis backend's key layout, its scripts' keys and take.lua's statuses.

Every key is ``pcq:{NAME}:<part>`` (see :class:`Keys`); the ``{NAME}`` hash tag
keeps a queue in one Redis Cluster slot, which the Lua scripts need because they
also touch in-flight lists they find by name.  A list element is a message
holding a batch of tasks (``lib/batches.lua`` reads and cuts them).
A name that holds a hash tag of its own (``{crawl}.parse``) keeps it instead —
``pcq:{crawl}.parse:<part>`` — so the queues of one pipeline, whose ack puts a
stage's outputs on the next queue in the same script, share one slot.
:func:`check_name` keeps two names from ever sharing a key.

* ``ready`` — list; producers LPUSH, consumers take from the right.
* ``inflight:<consumer>`` — list per consumer, its newest take at the left.
* ``delayed`` — zset of retries scored by due time (server clock, ms).
* ``dead`` — list of dead letters (:func:`pcq.envelope.encode_dead`).
* ``counters`` — hash: ``produced``, ``pending``, ``done``, ``failed``, ``retried``.
* ``consumers`` / ``producers`` — hash id -> json info; ``…:beat`` — zset id ->
  heartbeat expiry.  A registration whose heartbeat expired is dead.
* ``closed`` (flag), ``epoch`` (close epoch), ``full`` / ``space`` (backpressure).
* ``acked`` — hash consumer id -> the token of its last ack, so that an ack
  resent after a lost reply is never applied twice (see ``ack.lua``).
* ``feeds`` — the name of the queue a stage puts this queue's outputs on.
* ``suspects`` — list of tasks that were in flight in a consumer that died, each
  handed out alone; ``deaths`` — hash message -> how many consumers died with it
  in flight; ``holding`` — hash consumer id -> the one suspect it holds (poison
  tasks: see ``reap.lua`` and ``take.lua``).
* ``killing`` — hash consumer id -> 1 while its supervisor kills it (``killing.lua``).
* ``pcq:queues`` (:data:`REGISTRY`, one key for the server, outside every
  queue's hash tag) — a set of the names of every queue a producer or consumer
  attached to, or a stage fed: ``pcq dashboard`` lists it instead of scanning
  keys; ``forget`` removes a name.  Not kept on a Cluster, where that key would
  live in another slot than the queue's.
* ``marker`` — the queue's data marker: a random value set by the first
  connection to the queue and checked by every later one (see
  :mod:`pcq.backends.redis_link`) and by every script (its last key); gone or
  changed means the server lost the queue's data.

:data:`SCRIPTS` says which keys each Lua script takes, in order, by the names
its header comment gives them (a unit test holds the two together); the marker
follows them as each script's last key.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pcq.errors import ConfigError

#: The set of every queue name in use on a server (see the module docstring).
REGISTRY = "pcq:queues"

#: script -> its KEYS, by part name, as its .lua header lists them.  The
#: in-flight list is ``inflight:<me>``: the list of the consumer the call is for.
#: ack.lua also takes a stage's target queue's ready, counters, closed, epoch.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "ack": ("inflight:<me>", "counters", "delayed", "dead", "ready", "acked", "holding",
            "deaths", "killing"),
    "attach": ("producers", "producers:beat", "closed", "epoch", "counters", "dead"),
    "close": ("closed", "epoch", "ready", "consumers:beat", "producers", "producers:beat"),
    "counters": ("ready", "counters", "dead", "delayed", "consumers:beat", "producers:beat",
                 "closed", "suspects"),
    "heartbeat": ("consumers", "consumers:beat", "producers", "producers:beat"),
    "keep_alive": ("consumers:beat",),
    "killing": ("consumers:beat", "killing"),
    "purge": ("ready", "delayed", "counters", "consumers:beat", "full", "space", "acked",
              "suspects", "deaths", "holding", "puts"),
    "put": ("ready", "counters", "closed", "epoch", "full", "space", "puts"),
    "reap": ("consumers", "consumers:beat", "ready", "acked", "suspects", "deaths", "holding",
             "killing", "counters"),
    "requeue": ("dead", "ready", "counters"),
    "run_state": ("epoch", "closed", "counters", "producers:beat", "consumers",
                  "consumers:beat"),
    "take": ("ready", "inflight:<me>", "delayed", "closed", "epoch", "consumers:beat", "full",
             "space", "acked", "suspects", "deaths", "holding", "counters"),
}

#: Every key of a queue but the in-flight lists, by part name.
PARTS = ("ready", "delayed", "dead", "counters", "closed", "epoch", "consumers",
         "consumers:beat", "producers", "producers:beat", "full", "space", "acked", "feeds",
         "suspects", "deaths", "holding", "killing", "puts", "marker")


class TakeStatus(IntEnum):
    """What take.lua's reply says (see its header)."""

    TAKEN = 0  # maybe nothing
    NEW_EPOCH = 1  # nothing done: call again with the new epoch
    DRAINED = 2  # closed and drained: the caller exits
    SENTINEL_WAITS = 3  # only a sentinel is ready, behind delayed retries
    ACK_MISSING = 4  # the ack sent before it in the pipeline is not there
    SUSPECT = 5  # a suspect, taken alone; wait_ms holds its death count


def key(name: str, part: str) -> str:
    """The Redis key of ``part`` of queue ``name``: ``pcq:{name}:part``, or
    ``pcq:name:part`` when ``name`` holds its own hash tag (``{crawl}.parse``)."""
    return f"pcq:{name}:{part}" if "{" in name else f"pcq:{{{name}}}:{part}"


def check_name(name: str) -> None:
    """Raise ConfigError unless ``name`` maps to keys of its own.

    A name has no braces, or exactly one non-empty ``{tag}`` (a Redis Cluster
    hash tag).  ``{a}`` alone would map to ``pcq:{a}:…``, the keys of queue
    ``a``, and ``{a}:x`` to keys inside them (``pcq:{a}:x:…``): a tag at the
    start of a name must be followed by something other than ``:``.  With that,
    two names never share a key.
    """
    if not name:
        raise ConfigError("bad queue name '': it must not be empty")
    if "{" not in name and "}" not in name:
        return
    opened, closed = name.find("{"), name.find("}")
    if name.count("{") != 1 or name.count("}") != 1 or closed < opened + 2:
        raise ConfigError(f"bad queue name {name!r}: it must have no braces, or one hash "
                          "tag such as {crawl}.parse")
    if opened == 0 and name[closed + 1 : closed + 2] in ("", ":"):
        plain = name[1:closed]
        raise ConfigError(f"bad queue name {name!r}: on Redis it would share keys with queue "
                          f"{plain!r}; name it {plain!r}, or add to the tag (e.g. "
                          f"'{{{plain}}}.main')")


@dataclass(frozen=True, slots=True)
class Keys:
    """Every key of one queue (the parts are described in the module docstring)."""

    name: str
    ready: str
    delayed: str
    dead: str
    counters: str
    closed: str
    epoch: str
    consumers: str
    consumer_beats: str
    producers: str
    producer_beats: str
    full: str
    space: str
    acked: str
    feeds: str
    suspects: str
    deaths: str
    holding: str
    killing: str
    puts: str
    marker: str
    inflight_prefix: str

    @classmethod
    def of(cls, name: str) -> Keys:
        fields = {part.replace("consumers:beat", "consumer_beats")
                  .replace("producers:beat", "producer_beats"): key(name, part) for part in PARTS}
        return cls(name=name, inflight_prefix=key(name, "inflight:"), **fields)

    def __getitem__(self, part: str) -> str:
        """The key of ``part`` (one of :data:`PARTS`)."""
        return key(self.name, part)

    def inflight(self, consumer: str) -> str:
        return self.inflight_prefix + consumer

    def every(self) -> list[str]:
        """Every key but the in-flight lists."""
        return [self[part] for part in PARTS]

    def of_script(self, script: str, me: str = "") -> list[str]:
        """The keys of ``script`` (:data:`SCRIPTS`), for consumer ``me``; the
        caller adds the marker last."""
        return [self.inflight(me) if p == "inflight:<me>" else self[p] for p in SCRIPTS[script]]
