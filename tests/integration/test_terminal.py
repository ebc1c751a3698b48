"""What a person at the terminal sees: the progress display on a pseudo-terminal,
failures in the summary and --json, --setup, --version, python -m pcq, -h,
usage errors, failure log lines, `status` of an unknown queue, `dead list`."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import finish, session_members
from helpers_cli import ROOT, read_terminal, start_pcq

import pcq

JOBS = "tests/integration/terminal_jobs.py"


def pcq_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return finish(start_pcq(list(args), {**os.environ, "PYTHONPATH": str(ROOT), **env}), timeout)


def on_a_terminal(args: list[str], timeout: float = 90, **env: str) -> tuple[int, str]:
    """Run ``python -m pcq ARGS`` with stdin, stdout and stderr on a 120-column
    pseudo-terminal; (exit code, what the terminal received, escapes removed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "pcq", *args], cwd=ROOT, stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    os.close(slave)
    code, text = read_terminal(master, proc, timeout)
    assert session_members(proc.pid) == {}
    return code, text


def screen_lines(output: str) -> list[str]:
    """The terminal output as the lines drawn, each redraw (\\r) a line of its own."""
    return [line for line in re.split(r"[\r\n]+", output) if line.strip()]


# ---------------------------------------------------------------------- progress


def test_progress_shows_a_known_total_an_eta_and_never_garbles_handler_output() -> None:
    # Given a producer that returns a list (a known total) and handlers that print
    code, output = on_a_terminal(["run", f"{JOBS}:produce_list", f"{JOBS}:handle_chatty",
                                  "--workers", "4"], TJ_N="40")

    assert code == 0, output
    lines = screen_lines(output)
    # Then every handler line arrived whole, on a line of its own: never drawn through
    printed = [line for line in lines if "handled item" in line]
    assert all(re.fullmatch(r"handled item \d{4} x{60} end", line) for line in printed), printed
    assert sorted(int(line.split()[2]) for line in printed) == list(range(40))
    # And the display knew the total from the start, with a rate and an ETA
    assert any(re.search(r"\b\d+/40 done .*\d+/s ETA \d:\d\d:\d\d", line) for line in lines)
    assert "40/40 done" in output
    assert "/40+" not in output
    assert "pcq run: 40 produced, 40 done, 0 failed, 0 retried" in output


def test_while_producing_without_a_total_the_count_says_so() -> None:
    code, output = on_a_terminal(["run", f"{JOBS}:produce_generator", f"{JOBS}:handle_chatty",
                                  "--workers", "2", "--maxsize", "2"], TJ_N="12")

    assert code == 0, output
    # Produced so far is not a total: it is marked "+" until the producers are done
    assert re.search(r"\d+/\d+\+ done", output), output
    assert "12/12 done" in output


def test_no_display_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_chatty", TJ_N="5")

    assert result.returncode == 0
    assert sorted(result.stdout.splitlines()) == [
        f"handled item {n:04d} " + "x" * 60 + " end" for n in range(5)]
    assert "\u2501" not in result.stderr and "ETA" not in result.stderr


# ---------------------------------------------------------------------- failures


def test_the_summary_and_json_list_the_failed_tasks_bounded() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_failing_odd", "--json",
                     TJ_N="50")

    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["failed"] == 25
    assert len(summary["failures"]) == 20 and summary["failures_more"] == 5
    items = {int(f["item"]) for f in summary["failures"]}
    assert items <= set(range(1, 50, 2))
    assert all(f["error"] == f"ValueError: odd {f['item']}" for f in summary["failures"])
    assert all(f["attempts"] == 1 for f in summary["failures"])


def test_the_text_summary_lists_failed_tasks() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_failing_odd",
                     "--log-level", "error", TJ_N="4")

    assert result.returncode == 1
    assert "  failed: 1: ValueError: odd 1" in result.stderr
    assert "  failed: 3: ValueError: odd 3" in result.stderr


def test_failure_log_lines_name_the_task_the_attempt_and_the_consumer() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_failing_odd",
                     "--retries", "1", "--workers", "1", TJ_N="2", PCQ_LOG_LEVEL="info")

    assert result.returncode == 1
    # (the retry may fall to a consumer started after the first took its sentinel)
    assert re.search(r"INFO task 1 failed in pcq-consumer-\d+ \(pid \d+\), attempt 1/2: "
                     r"ValueError: odd 1; retry in", result.stderr), result.stderr
    assert re.search(r"ERROR task 1 failed in pcq-consumer-\d+ \(pid \d+\), attempt 2/2: "
                     r"ValueError: odd 1; dead-lettered", result.stderr), result.stderr


def test_pcq_run_summary_carries_the_failures() -> None:
    import terminal_jobs

    summary = pcq.run(lambda: ["ok", {"bad": 1}], _fail_on_dicts, workers=1)

    assert (summary.failed, summary.failures_more) == (1, 0)
    (failure,) = summary.failures
    assert failure["item"] == "{'bad': 1}"
    assert failure["error"] == "KeyError: 'no dicts'"
    assert terminal_jobs.CLIENT is None  # nothing ran in this process


def _fail_on_dicts(item: Any) -> None:
    if isinstance(item, dict):
        raise KeyError("no dicts")


# ---------------------------------------------------------------------- --setup


def test_setup_runs_once_in_each_consumer_before_its_first_task() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_with_client",
                     "--setup", f"{JOBS}:setup_client", "--workers", "3", "--json", TJ_N="30")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["done"] == 30


def test_a_failing_setup_is_one_line_and_stops_the_job_without_restarts() -> None:
    started = time.monotonic()
    result = pcq_cli("run", f"{JOBS}:produce_generator", f"{JOBS}:handle_with_client",
                     "--setup", f"{JOBS}:setup_fails", "--workers", "4", "--json", TJ_N="1000")

    assert result.returncode == 2
    assert time.monotonic() - started < 30
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["restarts"]) == (0, 0)
    errors = [line for line in result.stderr.splitlines() if line.startswith("pcq: error:")]
    assert errors == [f"pcq: error: {summary['setup_error']}"]
    assert re.fullmatch(r"setup failed in consumer pcq-consumer-\d \(pid \d+\): ConnectionError: "
                        r"database at db:5432 refused the connection", summary["setup_error"])
    assert "Traceback" not in result.stderr


def test_consumer_setup_method_in_the_api() -> None:
    queue = pcq.open_queue("local", maxsize=4)
    try:
        consumer = _SetupConsumer(queue)
        consumer.start()
        queue.put_many(range(3))
        queue.close()
        consumer.join(30)
        assert consumer.exitcode == 0
        c = queue.counters()
        assert (c.done, c.failed) == (3, 0)
    finally:
        queue.dispose()


class _SetupConsumer(pcq.Consumer):
    ready = False

    def setup(self) -> None:
        self.ready = True

    def handle(self, item: Any) -> None:
        assert self.ready


# ---------------------------------------------------------------------- small things


def test_python_dash_m_pcq_and_version() -> None:
    result = subprocess.run([sys.executable, "-m", "pcq", "--version"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=60)

    assert result.returncode == 0
    assert result.stdout == f"pcq {pcq.__version__}\n"


@pytest.mark.parametrize("args", [["-h"], ["run", "-h"], ["dead", "list", "-h"]])
def test_dash_h_is_help(args: list[str]) -> None:
    result = pcq_cli(*args)

    assert result.returncode == 0
    assert "Usage: pcq" in result.stdout
    assert "--log-level" in result.stdout


def test_a_usage_error_is_two_short_lines() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_chatty", "--workers", "0")

    assert result.returncode == 2
    first, second = result.stderr.splitlines()
    assert first.startswith("pcq: error: Invalid value for '--workers'")
    assert second.startswith("Usage: pcq run [OPTIONS]") and second.endswith("(see pcq run -h)")


def test_a_class_is_refused_where_a_function_is_expected() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:NotAFunction")

    assert result.returncode == 2
    assert result.stderr == (f"pcq: error: HANDLER '{JOBS}:NotAFunction': 'NotAFunction' is a "
                             "class, not a function (pass a function, or a method of an "
                             "instance)\n")


def test_an_unencodable_item_names_its_position() -> None:
    result = pcq_cli("run", f"{JOBS}:produce_unencodable", f"{JOBS}:handle_with_client",
                     "--setup", f"{JOBS}:setup_client", "--json")

    assert result.returncode == 1
    assert ("pcq: producer pcq-producer-0: item 3: cannot encode a task of type 'object'"
            in result.stderr)
    assert "; the 2 before it were put; this producer did not close the queue" in result.stderr


# ---------------------------------------------------------------------- Redis admin


def without_warnings(stderr: str) -> str:
    """stderr without pcq's warnings about the test server (it keeps nothing on restart)."""
    return "".join(line for line in stderr.splitlines(keepends=True)
                   if not line.startswith("pcq: warning: "))


def redis_env(redis_url: str) -> dict[str, str]:
    return {"PCQ_URL": redis_url, "PCQ_QUEUE": f"t-{uuid.uuid4().hex[:10]}"}


def test_status_of_a_queue_that_never_existed_says_so(redis_url: str) -> None:
    result = pcq_cli("status", **redis_env(redis_url))

    assert result.returncode == 2
    # (the test server keeps nothing on restart: pcq warns about that first)
    assert re.fullmatch(r"pcq: error: queue 't-\w+' does not exist on this server .*",
                        result.stderr.splitlines()[-1])


def test_status_does_not_count_sentinels_as_ready(redis_url: str) -> None:
    env = redis_env(redis_url)
    queue = pcq.open_queue(url=redis_url, name=env["PCQ_QUEUE"])
    try:
        queue.attach_consumer()  # a consumer that has not taken its sentinel yet
        queue.put_many(range(3))
        queue.close()
        result = pcq_cli("status", "--json", **env)
    finally:
        queue.detach_consumer()
        queue.dispose()

    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["ready"], status["pending"]) == (3, 3)


def test_an_empty_dead_list_says_so_and_attempts_match_the_log(redis_url: str) -> None:
    env = redis_env(redis_url)
    missing = pcq_cli("dead", "list", **env)  # reading never creates the queue (#19)
    assert (missing.returncode, missing.stdout) == (2, "")
    clean = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_failing_odd", "--workers", "1",
                    TJ_N="1", **env)
    assert clean.returncode == 0, clean.stderr
    empty = pcq_cli("dead", "list", **env)
    assert (empty.returncode, empty.stdout) == (0, "")
    assert without_warnings(empty.stderr) == f"pcq: no dead letters in queue {env['PCQ_QUEUE']!r}\n"

    run = pcq_cli("run", f"{JOBS}:produce_list", f"{JOBS}:handle_failing_odd", "--retries", "2",
                  "--workers", "1", TJ_N="2", **env)
    assert run.returncode == 1
    assert "attempt 3/3: ValueError: odd 1; dead-lettered" in run.stderr

    listed = pcq_cli("dead", "list", "--json", **env)
    (letter,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (letter["body"], letter["attempts"]) == (1, 3)
    text = pcq_cli("dead", "list", **env)
    assert re.fullmatch(r"\S+: task 1, 3 attempt\(s\): ValueError: odd 1\n", text.stdout)


def test_produce_of_an_unencodable_item_says_the_queue_was_left_open(redis_url: str) -> None:
    result = pcq_cli("produce", f"{JOBS}:produce_unencodable", **redis_env(redis_url))

    assert result.returncode == 2
    assert without_warnings(result.stderr) == (
        "pcq: error: item 3: cannot encode a task of type 'object': can not serialize 'object' "
        "object; the 2 before it were put; the queue was left open\n")


def test_produce_with_maxsize_shows_the_work_moving(redis_url: str) -> None:
    # Given consumers on the queue, and a producer bounded by --maxsize 2
    env = redis_env(redis_url)
    consumers = start_pcq(["consume", f"{JOBS}:handle_chatty", "--workers", "2"],
                          {**os.environ, "PYTHONPATH": str(ROOT), **env})

    code, output = on_a_terminal(["produce", f"{JOBS}:produce_generator", "--maxsize", "2"],
                                 TJ_N="30", **env)

    # Then while it puts (most of the job), the display counts done and produced
    assert code == 0, output
    assert re.search(r"\b[1-9]\d*/\d+\+ done", output), output
    assert "pcq produce: 30 produced, 30 done" in output
    assert finish(consumers).returncode == 0


def test_consume_with_a_failing_setup_stops_this_host_with_one_line(redis_url: str) -> None:
    result = pcq_cli("consume", f"{JOBS}:handle_with_client", "--setup", f"{JOBS}:setup_fails",
                     "--workers", "3", **redis_env(redis_url))

    assert result.returncode == 2
    (line,) = without_warnings(result.stderr).splitlines()[:-1]  # the error, then the summary
    assert re.fullmatch(r"pcq: error: setup failed in consumer pcq-consumer-\d \(pid \d+\): "
                        r"ConnectionError: database at db:5432 refused the connection", line)
    assert without_warnings(result.stderr).splitlines()[-1].startswith("pcq consume: 0 done")
