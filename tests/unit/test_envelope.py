"""The envelope codec: what travels through a queue, and what is refused."""

from __future__ import annotations

import pickle
from typing import Any

import msgpack
import pytest

from pcq.envelope import (
    MAGIC,
    SENTINEL,
    SENTINEL_PREFIX,
    TASKS,
    Batch,
    Envelope,
    Sentinel,
    decode,
    decode_dead,
    decode_many,
    encode_dead,
    encode_each,
    encode_envelope,
    encode_sentinel,
    encode_tasks,
    envelope_from_dead,
    new_tag,
)
from pcq.errors import DecodeError, SerializationError


def test_a_batch_round_trips_with_ids_attempts_and_time() -> None:
    raw = encode_tasks("t1", 40, [None, b"\x00", "s", [1, {"k": [2.5]}]], 3, 1700000000.25)

    batch = decode(raw)

    assert isinstance(batch, Batch)
    assert (batch.tag, batch.seq, batch.attempts, batch.enqueued_at) == ("t1", 40, 3, 1700000000.25)
    envelopes = batch.envelopes()
    assert [e.id for e in envelopes] == ["t1-40", "t1-41", "t1-42", "t1-43"]
    assert [e.body for e in envelopes] == [None, b"\x00", "s", [1, {"k": [2.5]}]]
    assert {e.attempts for e in envelopes} == {3}
    assert batch.envelope(2) == Envelope("t1", 42, "s", 3, 1700000000.25)


def test_encode_tasks_stamps_the_enqueue_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pcq.envelope.time.time", lambda: 123.5)
    batch = decode(encode_tasks("t", 0, [1]))
    assert isinstance(batch, Batch) and batch.enqueued_at == 123.5


def test_encode_each_makes_one_message_per_task() -> None:
    raws = encode_each("tag", 7, ["a", None, {"b": 1}])

    batches = [decode(raw) for raw in raws]

    assert all(isinstance(b, Batch) for b in batches)
    envs = [e for b in batches if isinstance(b, Batch) for e in b.envelopes()]
    assert [(e.id, e.body) for e in envs] == [("tag-7", "a"), ("tag-8", None), ("tag-9", {"b": 1})]


def test_encode_envelope_keeps_id_attempts_and_enqueue_time() -> None:
    env = Envelope("abc", 9, {"x": [1]}, attempts=2, enqueued_at=55.0)

    batch = decode(encode_envelope(env))

    assert isinstance(batch, Batch)
    assert batch.envelopes() == [env]


def test_none_is_a_task_and_a_sentinel_is_its_own_kind() -> None:
    task = encode_tasks("t", 0, [None])
    sentinel = encode_sentinel(4)

    assert isinstance(decode(task), Batch)
    assert decode(sentinel) == Sentinel(4)
    assert sentinel.startswith(SENTINEL_PREFIX)
    assert not task.startswith(SENTINEL_PREFIX)
    assert not encode_each("t", 0, [None])[0].startswith(SENTINEL_PREFIX)


REFUSED = [
    (b"", "not msgpack"),
    (b"garbage", "not msgpack"),
    (b"\xc1", "not msgpack"),
    (msgpack.packb("a string"), "no pcq header"),
    (msgpack.packb([1, 2, 3]), "no pcq header"),
    (msgpack.packb([MAGIC, TASKS]), "no pcq header"),
    (msgpack.packb([MAGIC, 9, 0]), "malformed pcq envelope (kind 9"),
    (msgpack.packb([MAGIC, TASKS, "t", 0, 0, 1.0]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, 5, 0, 0, 1.0, []]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, "t", "0", 0, 1.0, []]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, "t", 0, 0, 1.0, "bodies"]), "malformed"),
    (msgpack.packb([MAGIC, SENTINEL, "epoch"]), "malformed"),
    # shaped like a task message, but not one
    (msgpack.packb([MAGIC + 1, TASKS, "t", 0, 0, 1.0, [1]]), "no pcq header"),
    (msgpack.packb([MAGIC, SENTINEL, "t", 0, 0, 1.0, [1]]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, "t", 0, "0", 1.0, [1]]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, "t", 0, 0, "1.0", [1]]), "malformed"),
    (msgpack.packb([MAGIC, TASKS, b"t", 0, 0, 1.0, [1]]), "malformed"),
    (encode_tasks("t", 0, [1]) + b"\x01", "not msgpack"),  # one message, then more bytes
    (encode_tasks("t", 0, ["long body"])[:-3], "not msgpack"),  # cut short
]


# ids by position: some raw bytes hold an enqueue time, and pytest-xdist needs
# every worker to collect the same test ids.
@pytest.mark.parametrize(("raw", "reason"), REFUSED, ids=[f"r{i}" for i in range(len(REFUSED))])
def test_decode_refuses_what_is_not_a_pcq_envelope(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    assert reason in str(info.value)


class _Trap:
    unpickled = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Trap._spring, ())

    @staticmethod
    def _spring() -> None:
        _Trap.unpickled = True


def test_a_pickle_is_refused_and_never_unpickled() -> None:
    raw = pickle.dumps(_Trap())

    with pytest.raises(DecodeError):
        decode(raw)

    assert not _Trap.unpickled


def test_decode_many_merges_the_tasks_of_one_producer_run_into_one_batch() -> None:
    # Given the messages of one put: one task each, consecutive ids
    raws = encode_each("tag", 7, ["a", None, {"b": [1]}, 4])

    # When they are decoded together
    batches, sentinels, bad = decode_many(raws)

    # Then they are one batch with exactly the envelopes each message holds
    assert (len(batches), sentinels, bad) == (1, [], [])
    (batch,) = batches
    assert (batch.tag, batch.seq, batch.bodies) == ("tag", 7, ["a", None, {"b": [1]}, 4])
    each = [env for raw in raws for env in _batch(raw).envelopes()]
    assert batch.envelopes() == each


def _batch(raw: bytes) -> Batch:
    msg = decode(raw)
    assert isinstance(msg, Batch)
    return msg


def test_decode_many_merges_only_what_continues_the_batch_before() -> None:
    raws = [
        *encode_each("p1", 0, [0, 1]),
        encode_tasks("p1", 2, [2], attempts=1, enqueued_at=5.0),  # a retry: other attempts
        encode_tasks("p1", 3, [3], attempts=1, enqueued_at=5.0),  # continues the retry
        encode_tasks("p1", 5, [5], attempts=1, enqueued_at=5.0),  # seq 4 is missing
        encode_tasks("p1", 6, [6], attempts=1, enqueued_at=6.0),  # enqueued later
        encode_tasks("p2", 7, [7], attempts=1, enqueued_at=6.0),  # another producer
        encode_tasks("p2", 8, [8, 9], attempts=1, enqueued_at=6.0),  # a batch message
        encode_tasks("p2", 10, [10], attempts=1, enqueued_at=6),  # an int time: decode's path
    ]

    batches, _, _ = decode_many(raws)

    assert [(b.tag, b.seq, b.bodies) for b in batches] == [
        ("p1", 0, [0, 1]),
        ("p1", 2, [2, 3]),
        ("p1", 5, [5]),
        ("p1", 6, [6]),
        ("p2", 7, [7, 8, 9]),
        ("p2", 10, [10]),
    ]
    merged = [env for b in batches for env in b.envelopes()]
    assert merged == [env for raw in raws for env in _batch(raw).envelopes()]


def test_decode_many_refuses_exactly_what_decode_refuses() -> None:
    # Given every refused message between good ones
    good = encode_each("t", 0, list(range(len(REFUSED) + 1)))
    raws = [good[0]]
    for (raw, _), after in zip(REFUSED, good[1:], strict=True):
        raws += [raw, after]

    batches, sentinels, bad = decode_many(raws)

    # Then each is in bad with decode's reason, and every good task is kept
    reasons = []
    for raw, _ in REFUSED:
        with pytest.raises(DecodeError) as info:
            decode(raw)
        reasons.append(str(info.value))
    assert bad == [(raw, why) for (raw, _), why in zip(REFUSED, reasons, strict=True)]
    assert [b for batch in batches for b in batch.bodies] == list(range(len(good)))
    assert sentinels == []


def test_decode_many_never_unpickles() -> None:
    raw = pickle.dumps(_Trap())

    batches, sentinels, bad = decode_many([*encode_each("t", 0, [1]), raw])

    assert [b.bodies for b in batches] == [[1]] and sentinels == []
    assert [r for r, _ in bad] == [raw]
    assert not _Trap.unpickled


def test_decode_many_returns_sentinels_in_order_and_ends_a_batch_at_them() -> None:
    raws = [*encode_each("t", 0, [0, 1]), encode_sentinel(3), *encode_each("t", 2, [2])]
    raws.append(encode_sentinel(4))

    batches, sentinels, bad = decode_many(raws)

    assert [(b.seq, b.bodies) for b in batches] == [(0, [0, 1]), (2, [2])]
    assert (sentinels, bad) == ([Sentinel(3), Sentinel(4)], [])


def test_decode_many_of_nothing_is_empty() -> None:
    assert decode_many([]) == ([], [], [])


def test_encode_each_writes_what_encode_tasks_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pcq.envelope.time.time", lambda: 1700000000.5)
    bodies = [None, 0, -1, 2**63, "s" * 40, b"\x00", [1.5], {"k": "v"}]

    raws = encode_each("abc", 2**40, bodies)

    assert raws == [encode_tasks("abc", 2**40 + i, [b]) for i, b in enumerate(bodies)]


@pytest.mark.parametrize(
    ("bad", "name"),
    [(object(), "object"), ({1}, "set"), (1j, "complex"), (2**64, "int"), (_Trap(), "_Trap")],
)
def test_an_unencodable_body_names_its_type(bad: Any, name: str) -> None:
    with pytest.raises(SerializationError, match=f"type '{name}'"):
        encode_tasks("t", 0, ["fine", 1, bad, "fine too"])
    with pytest.raises(SerializationError, match=f"type '{name}'"):
        encode_each("t", 0, ["fine", bad])
    with pytest.raises(SerializationError, match=f"(?i){name}"):  # msgpack names the inner one
        encode_envelope(Envelope("t", 0, {"nested": [bad]}))


def test_an_unencodable_body_inside_a_container_names_the_container() -> None:
    with pytest.raises(SerializationError, match=r"type 'list'.*'object'"):
        encode_tasks("t", 0, [[1, object()]])


def test_a_dead_letter_keeps_the_task_error_and_traceback() -> None:
    env = Envelope("t", 3, {"b": 1}, attempts=2, enqueued_at=10.0)

    record = decode_dead(encode_dead(env, "ValueError: x", "Traceback (most recent ...)"))

    assert record["id"] == "t-3"
    # attempts counts the attempts made: two earlier ones and the one that failed last
    assert (record["body"], record["attempts"], record["enqueued_at"]) == ({"b": 1}, 3, 10.0)
    assert record["error"] == "ValueError: x"
    assert record["traceback"] == "Traceback (most recent ...)"
    assert record["failed_at"] > 0
    assert "raw" not in record


def test_a_dead_letter_of_an_undecodable_message_keeps_the_raw_bytes() -> None:
    record = decode_dead(encode_dead(None, "not msgpack: boom", raw=b"\xc1junk"))

    assert (record["raw"], record["error"]) == (b"\xc1junk", "not msgpack: boom")
    assert "id" not in record
    assert envelope_from_dead(record) is None


@pytest.mark.parametrize("raw", [b"\xc1", msgpack.packb([1, 2])])
def test_an_unreadable_dead_letter_is_reported_not_raised(raw: bytes) -> None:
    assert decode_dead(raw) == {"error": "unreadable dead letter", "raw": raw}


def test_a_requeued_dead_letter_starts_over() -> None:
    env = Envelope("t", 3, ["b"], attempts=4, enqueued_at=10.0)
    record = decode_dead(encode_dead(env, "E"))

    again = envelope_from_dead(record)

    assert again is not None
    assert (again.id, again.body, again.attempts) == ("t-3", ["b"], 0)
    assert again.enqueued_at > 10.0


def test_producer_tags_differ() -> None:
    tags = {new_tag() for _ in range(1000)}
    assert len(tags) == 1000
    assert all(len(t) == 12 and int(t, 16) >= 0 for t in tags)
