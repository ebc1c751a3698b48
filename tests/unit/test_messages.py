"""What pcq says to a person, as pure functions: pcq.map's TaskFailed, redis-py's
errors in words, garbage in a queue, a map chunk's failure, a run's numbers."""

from __future__ import annotations

import pickle

import pytest
import redis.exceptions

from pcq.backends.base import Counters
from pcq.backends.redis_errors import explain
from pcq.cli_status import this_run
from pcq.errors import TaskFailed, TaskTimeout
from pcq.garbage import garbage_line, garbage_text, skipped_lines
from pcq.map_text import chunk_error, chunk_text


def test_task_failed_rebuilds_a_builtin_exception_for_except() -> None:
    failed = TaskFailed(7, "ValueError: bad item 7")
    assert (failed.index, failed.type_name, failed.message) == (7, "ValueError", "bad item 7")
    assert isinstance(failed.exception, ValueError) and str(failed.exception) == "bad item 7"
    assert failed.__cause__ is failed.exception
    assert str(failed) == "item 7 failed: ValueError: bad item 7"
    with pytest.raises(ValueError, match="bad item 7"):
        raise failed.exception from failed


def test_task_failed_rebuilds_only_builtin_and_pcq_types_by_name() -> None:
    mine = TaskFailed(1, "MyError: mine")
    assert (mine.type_name, mine.message, mine.exception) == ("MyError", "mine", None)
    assert isinstance(TaskFailed(2, "TaskTimeout: ran past 1 s").exception, TaskTimeout)
    # a builtin that cannot be built from a message alone, and text with no type
    assert TaskFailed(3, "UnicodeDecodeError: 'utf-8' codec ...").exception is None
    plain = TaskFailed(4, "no result: its chunk was dead-lettered unhandled")
    assert (plain.type_name, plain.exception) == (None, None)
    assert plain.message == "no result: its chunk was dead-lettered unhandled"
    # not an exception type at all, though builtins has the name
    assert TaskFailed(5, "print: x").exception is None
    assert isinstance(TaskFailed(6, "KeyError:").exception, KeyError)


def test_task_failed_pickles_with_everything_it_holds() -> None:
    again = pickle.loads(pickle.dumps(TaskFailed(7, "OSError: disk full")))
    assert (again.index, again.error, again.type_name) == (7, "OSError: disk full", "OSError")
    assert isinstance(again.exception, OSError)


@pytest.mark.parametrize(("error", "said"), [
    (redis.exceptions.AuthenticationError(
        "HELLO must be called with the client already authenticated, otherwise the HELLO "
        "AUTH <user> <pass> option can be used"), "the server needs a password"),
    (redis.exceptions.AuthenticationError("Authentication required."),
     "the server needs a password"),
    (redis.exceptions.AuthenticationError("invalid username-password pair or user is "
                                          "disabled."), "the server refused the password"),
    (redis.exceptions.InvalidResponse('Protocol error, got "H" as reply type byte'),
     "not a Redis server"),
    (redis.exceptions.ResponseError("OOM command not allowed"), "OOM command not allowed"),
])
def test_redis_errors_are_said_in_words(error: Exception, said: str) -> None:
    assert explain(error).startswith(said)


def test_garbage_shows_its_first_bytes_as_text() -> None:
    assert garbage_text(b"hello") == "'hello'"
    assert garbage_text(b"\x93\x01\n") == "'\\x93\\x01\\n'"
    assert garbage_text(b"x" * 50) == "'" + "x" * 40 + "'..."
    assert garbage_line(b"hi", "not msgpack") == (
        "message 'hi' (2 bytes) dead-lettered: it is not a pcq task (not msgpack)")


def test_dead_requeue_lists_the_letters_that_hold_no_task() -> None:
    letters = [{"raw": b"junk %d" % i, "error": "not msgpack"} for i in range(12)]
    letters.append({"tag": "t", "seq": 1, "body": 1, "error": "ValueError: x"})
    count, lines = skipped_lines(letters)
    assert count == 12
    assert lines[0] == "  skipped 'junk 0': not msgpack"
    assert lines[-1] == "  ... and 2 more"


def test_a_map_chunk_failure_names_items_not_internals() -> None:
    assert chunk_text(7, 1) == "item 7"
    assert chunk_text(0, 10) == "items 0-9"
    assert chunk_error(7, 1, {0: "ValueError: bad"}) == "ValueError: bad"
    assert chunk_error(0, 10, {8: "KeyError: 'b'", 7: "ValueError: a"}) == (
        "item 7: ValueError: a (and 1 more item(s))")


def _counters(**numbers: int) -> Counters:
    fields = dict.fromkeys(Counters.__slots__, 0)
    fields.update(numbers, closed=False)
    return Counters(**fields)


def test_a_runs_numbers_are_the_totals_less_its_start() -> None:
    now = _counters(produced=600, done=590, failed=10, retried=3, dead=10)
    assert this_run(now, None)["produced"] == 600
    start = {"produced": 300, "done": 300, "failed": 0, "retried": 0, "dead": 12}
    assert this_run(now, start) == {"produced": 300, "done": 290, "failed": 10,
                                    "retried": 3, "dead": 0}
