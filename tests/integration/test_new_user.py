"""What a new user trips over (issue #19, items 3, 7-12): garbage in a queue,
an interrupted run or produce, per-run status, consume's progress and rate,
pcq.map's errors, help texts and messages.  Real processes, a real redis-server;
the terminal ones on a pseudo-terminal."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import finish, session_members, wait_for
from helpers_cli import PCQ, ROOT, pcq_env, read_terminal, session_pids, start_pcq
from redis_server import RedisServer

from pcq.cli import command

JOBS = "tests/integration/new_user_jobs.py"


def cli(args: list[str], env: dict[str, str], timeout: float = 60,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if stdin is None:
        return finish(start_pcq(args, env), timeout)
    return subprocess.run([*PCQ, *args], env=env, cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=timeout)


def on_a_terminal(args: list[str], env: dict[str, str], typed: bytes = b"",
                  timeout: float = 60) -> tuple[int, str]:
    """``pcq ARGS`` with stdin, stdout and stderr on a 120-column pseudo-terminal,
    ``typed`` typed ahead; (exit code, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([*PCQ, *args], cwd=ROOT, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, env=env)
    os.close(slave)
    if typed:
        os.write(master, typed)
    code, text = read_terminal(master, proc, timeout)
    assert session_members(proc.pid) == {}
    return code, text


def flat(text: str) -> str:
    """Help text as words: box drawing and line breaks gone."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━]", " ", text).split())


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return pcq_env(redis_url, tmp_path / "out")


def counters(env: dict[str, str]) -> dict[str, int]:
    client = redis.Redis.from_url(env["PCQ_URL"])
    try:
        raw = client.hgetall(f"pcq:{{{env['PCQ_QUEUE']}}}:counters")
    finally:
        client.close()
    return {k.decode(): int(v) for k, v in raw.items()}


def status(env: dict[str, str]) -> dict[str, Any]:
    result = cli(["status", "--json"], env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- 3: garbage


def test_garbage_is_said_counted_and_explained_by_dead_requeue(env: dict[str, str]) -> None:
    # Given a queue with 3 tasks and 2 messages that are no pcq tasks
    put = cli(["produce", "-", "--no-wait"], env, stdin="1\n2\n3\n")
    assert put.returncode == 0, put.stderr
    client = redis.Redis.from_url(env["PCQ_URL"])
    client.rpush(f"pcq:{{{env['PCQ_QUEUE']}}}:ready", b"hello", b"\x93\x01")
    client.close()
    # When a consumer takes them
    consumed = cli(["consume", f"{JOBS}:handle", "--burst", "--workers", "1", "--json"], env)
    # Then each is one line on stderr, and the summary counts them
    assert consumed.returncode == 0, consumed.stderr
    summary = json.loads(consumed.stdout)
    assert (summary["done"], summary["failed"], summary["garbage"]) == (3, 0, 2)
    assert re.search(r"message 'hello' \(5 bytes\) dead-lettered: it is not a pcq task "
                     r"\(not msgpack: .+\)", consumed.stderr)
    assert "message '\\x93\\x01' (2 bytes) dead-lettered" in consumed.stderr
    # And dead requeue says what it left and why
    requeue = cli(["dead", "requeue"], env)
    assert requeue.returncode == 0
    assert "requeued 0 dead task(s)" in requeue.stderr
    assert "left 2 dead letter(s) that hold no task" in requeue.stderr
    assert "  skipped 'hello': not msgpack: " in requeue.stderr


def test_the_text_summary_counts_garbage(env: dict[str, str]) -> None:
    client = redis.Redis.from_url(env["PCQ_URL"])
    client.rpush(f"pcq:{{{env['PCQ_QUEUE']}}}:ready", b"garbage")
    client.close()
    consumed = cli(["consume", f"{JOBS}:handle", "--burst", "--workers", "1"], env)
    assert re.search(r"pcq consume: 0 done, 0 failed, 0 retried, 1 not a task "
                     r"\(dead-lettered\) in ", consumed.stderr), consumed.stderr


# ---------------------------------------------------------------------- 7, 8: interrupted


def interrupt_when(proc: subprocess.Popen[str], ready: Any) -> subprocess.CompletedProcess[str]:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once ``ready()``."""
    wait_for(ready, timeout=30, message="the job to get going")
    os.killpg(proc.pid, signal.SIGINT)
    return finish(proc, 60)


def test_resume_finishes_an_interrupted_runs_leftovers_without_producing(
        env: dict[str, str]) -> None:
    # Given a run interrupted half way
    job = {**env, "NU_N": "60", "NU_SLEEP": "0.05"}
    first = interrupt_when(start_pcq(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers",
                                      "2", "--no-progress"], job),
                           lambda: counters(env).get("done", 0) >= 4)
    assert first.returncode == 130, first.stderr
    left = counters(env)["pending"]
    assert 0 < left < 60
    # When it is run again with --resume
    again = cli(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers", "2", "--resume",
                 "--json"], {**job, "NU_SLEEP": "0"})
    # Then it says so, and handles the leftovers, producing nothing
    assert again.returncode == 0, again.stderr
    assert (f"pcq run: resuming queue {env['PCQ_QUEUE']!r}: handling the {left} task(s) an "
            "interrupted run left, without running PRODUCER") in again.stderr
    summary = json.loads(again.stdout)
    assert (summary["produced"], summary["done"]) == (0, left)
    # And resuming a finished queue says there is nothing to do
    nothing = cli(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--resume"], job)
    assert nothing.returncode == 0
    assert "nothing to resume" in nothing.stderr


def test_a_run_on_leftovers_says_what_will_happen_and_points_to_purge(
        env: dict[str, str]) -> None:
    # Given a queue holding tasks no producer or consumer is working on
    put = cli(["produce", "-", "--no-wait"], env, stdin="1\n2\n3\n")
    assert put.returncode == 0, put.stderr
    # When a run starts on it
    run = cli(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers", "1", "--json"],
              {**env, "NU_N": "2"})
    # Then one line says so, with both ways out, and the run handles both
    assert run.returncode == 0, run.stderr
    name = env["PCQ_QUEUE"]
    assert (f"pcq run: queue {name!r} still holds 3 task(s) of an interrupted run; they are "
            "handled along with everything PRODUCER yields anew") in run.stderr
    assert f"--resume; to start clean: `pcq purge --queue {name}` first" in run.stderr
    assert json.loads(run.stdout)["done"] == 5


def test_an_interrupted_produce_says_the_queue_was_left_open(env: dict[str, str]) -> None:
    job = {**env, "NU_N": "100000", "NU_PAUSE": "0.005"}
    result = interrupt_when(start_pcq(["produce", f"{JOBS}:produce_slowly", "--no-progress"],
                                      job), lambda: counters(env).get("produced", 0) >= 5)
    assert result.returncode == 130, result.stderr
    assert re.search(r"pcq produce: \d+ produced, .*; interrupted: the queue was left open: "
                     r"its consumers wait for more tasks until `pcq close --queue "
                     + re.escape(env["PCQ_QUEUE"]) + "`", result.stderr), result.stderr


# ---------------------------------------------------------------------- 9, 10: status, consume


def test_status_shows_this_runs_numbers_and_labels_the_totals(env: dict[str, str]) -> None:
    for _ in range(2):
        run = cli(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers", "1"],
                  {**env, "NU_N": "5"})
        assert run.returncode == 0, run.stderr
    shown = status(env)
    assert (shown["produced"], shown["done"]) == (5, 5)
    assert (shown["totals"]["produced"], shown["totals"]["done"]) == (10, 10)
    table = cli(["status"], env).stdout
    assert re.search(r"this run\s*┃\s*all runs", table), table
    assert re.search(r"produced\s*│\s*5\s*│\s*10\s*│", table), table


def test_status_counts_a_produce_waiting_for_its_acks_as_a_producer(
        env: dict[str, str]) -> None:
    # Given a pcq produce that put everything and waits for the acks
    producer = start_pcq(["produce", f"{JOBS}:produce", "--no-progress"], {**env, "NU_N": "3"})
    wait_for(lambda: counters(env).get("produced", 0) == 3, timeout=30)
    # Then status counts it
    shown = status(env)
    assert (shown["producers"], shown["state"]) == (1, "open")
    # And it returns once a consumer did the work
    consumer = cli(["consume", f"{JOBS}:handle", "--workers", "1"], env)
    assert consumer.returncode == 0, consumer.stderr
    assert finish(producer, 30).returncode == 0


def test_consume_leaves_the_time_with_nothing_to_do_out_of_its_rate(
        env: dict[str, str]) -> None:
    # Given a consumer that waits for a producer
    consumer = start_pcq(["consume", f"{JOBS}:handle", "--workers", "1", "--json"], env)
    wait_for(lambda: redis.Redis.from_url(env["PCQ_URL"]).zcard(
        f"pcq:{{{env['PCQ_QUEUE']}}}:consumers:beat"), timeout=30)
    time.sleep(1.5)  # the time with nothing to do that the summary must leave out
    # When the producer comes, and goes
    assert cli(["produce", f"{JOBS}:produce"], {**env, "NU_N": "3"}).returncode == 0
    result = finish(consumer, 30)
    # Then the wait is counted apart
    summary = json.loads(result.stdout)
    assert summary["done"] == 3
    assert 0.2 < summary["waited_s"] < summary["elapsed_s"]


def test_consume_draws_a_progress_line_on_a_terminal(env: dict[str, str]) -> None:
    assert cli(["produce", f"{JOBS}:produce", "--no-wait"], {**env, "NU_N": "30"}
               ).returncode == 0
    code, shown = on_a_terminal(["consume", f"{JOBS}:handle", "--burst", "--workers", "2"],
                                {**env, "NU_SLEEP": "0.05"})
    assert code == 0, shown
    assert re.search(rf"queue {env['PCQ_QUEUE']} .*\d+/30\+ done .*/s", shown), shown
    assert "pcq consume: 30 done, 0 failed" in shown


# ---------------------------------------------------------------------- 11: pcq.map errors


def test_map_failure_keeps_the_users_error_and_logs_no_internals() -> None:
    result = subprocess.run([sys.executable, JOBS, "map"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "index=7 type=ValueError message=bad item 7" in result.stdout
    assert "except ValueError: bad item 7" in result.stdout
    assert re.search(r"item 7 failed in pcq-map-\d \(pid \d+\), attempt 1/1: "
                     r"ValueError: bad item 7\n", result.stderr), result.stderr
    assert "ChunkFailed" not in result.stderr and "[7, [7]]" not in result.stderr
    assert "dead-lettered" not in result.stderr


# ---------------------------------------------------------------------- 12: help and messages


COMMANDS = [[], ["run"], ["produce"], ["consume"], ["status"], ["close"], ["purge"],
            ["dead"], ["dead", "list"], ["dead", "requeue"], ["dead", "purge"]]


def help_of(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``pcq ARGS -h`` as an 80-column screen shows it (in this process: the help
    of eleven commands in eleven processes costs half a minute on a busy host)."""
    monkeypatch.setenv("COLUMNS", "80")
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        command().main([*args, "-h"], prog_name="pcq", standalone_mode=False)
    return shown.getvalue()


def test_help_says_what_to_type_not_python_types(monkeypatch: pytest.MonkeyPatch) -> None:
    for args in COMMANDS:
        shown = help_of(args, monkeypatch)
        for python in ("<str>", "<int", "<float", "<bool>", "<list", "{producer", "{handler",
                       "x>=", "…"):
            assert python not in shown, (args, python, shown)
    main = flat(help_of([], monkeypatch))
    assert "close, summary — on this host (local by default)" in main  # no hard break
    run = flat(help_of(["run"], monkeypatch))
    assert "Usage: pcq run [OPTIONS] PRODUCER HANDLER..." in run
    assert "--workers N[,N...] Consumer processes" in run
    assert "--log-level LEVEL One of debug, info, warning, error" in run
    produce = flat(help_of(["produce"], monkeypatch))
    assert "--backend redis A backend with a server" in produce
    assert "local or redis" not in produce
    dead = flat(help_of(["dead", "list"], monkeypatch))
    assert "one line each on stdout" in dead
    assert "--json One JSON object a line on stdout, one per dead letter." in dead


def test_per_stage_values_for_too_few_stages_show_the_usage_line() -> None:
    result = cli(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers", "1,2"],
                 {**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "pcq: error: Invalid value for '--workers': '1,2': 2 values for 1 stage: give one "
        "value, or one per stage",
        "Usage: pcq run [OPTIONS] PRODUCER HANDLER...  (see pcq run -h)",
    ]


def test_a_server_that_wants_a_password_is_said_in_words() -> None:
    server = RedisServer(password="sekret").start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        result = cli(["status"], {**os.environ, "PYTHONPATH": str(ROOT), "PCQ_URL": url})
    finally:
        server.stop()
    assert result.returncode == 2
    assert result.stderr == (f"pcq: error: Redis at {url} refused us: the server needs a "
                             "password: give it in the URL, redis://:PASSWORD@HOST:PORT/DB\n")


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A server on a free port that answers like a web server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_a_server_that_is_not_redis_is_said_in_words(not_redis: int) -> None:
    url = f"redis://127.0.0.1:{not_redis}/0"
    result = cli(["status"], {**os.environ, "PYTHONPATH": str(ROOT), "PCQ_URL": url})
    assert result.returncode == 2
    assert result.stderr.startswith(f"pcq: error: Redis at {url}: not a Redis server"), \
        result.stderr
    assert "Protocol error" not in result.stderr


def test_purge_with_consumers_attached_asks_on_a_terminal(env: dict[str, str]) -> None:
    # Given a queue with a task and a consumer attached (waiting on an idle queue)
    assert cli(["produce", "-", "--no-wait", "--no-close"], env, stdin="1\n").returncode == 0
    consumer = start_pcq(["consume", f"{JOBS}:handle", "--workers", "1"],
                         {**env, "NU_SLEEP": "60"})
    wait_for(lambda: status(env)["consumers"] == 1, timeout=30)
    # When purge is answered no on a terminal
    code, shown = on_a_terminal(["purge"], env, typed=b"n\n")
    # Then it asks, and purges nothing
    assert code == 1, shown
    assert f"queue {env['PCQ_QUEUE']!r} has 1 consumer(s) attached; drop its tasks" in shown
    assert f"pcq: nothing purged from {env['PCQ_QUEUE']!r}" in shown
    assert status(env)["pending"] == 1
    # And --yes purges without asking
    code, shown = on_a_terminal(["purge", "--yes"], env)
    assert code == 0, shown
    assert f"pcq: purged 1 task(s) from {env['PCQ_QUEUE']!r}" in shown
    for pid in session_pids(consumer.pid):  # its task sleeps a minute: no grace to wait out
        os.kill(pid, signal.SIGKILL)
    consumer.communicate(timeout=30)
