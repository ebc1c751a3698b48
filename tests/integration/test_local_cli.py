"""`pcq run` on the local backend, as a user runs it: the README example, every
shape, --json, the progress bar on a terminal, exit codes 0 / 1 / 2, bad input."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import local_jobs
import pytest
from helpers import finish, session_members
from helpers_cli import ROOT, read_terminal, start_pcq

JOBS = "tests/integration/local_jobs.py"
PCQ_SCRIPT = str(Path(sys.executable).with_name("pcq"))  # the installed console script
README_EXAMPLE = ["run", "examples/sausages.py:produce", "examples/sausages.py:handle",
                  "--workers", "16", "--maxsize", "16"]


def pcq(*args: str, out: Path, timeout: float = 60, **settings: str) -> Any:
    """Run ``pcq ARGS`` on the jobs of local_jobs; its CompletedProcess."""
    return finish(start_pcq(list(args), local_jobs.env(out, **settings)), timeout)


def test_the_readme_example() -> None:
    # The README's command word for word, with the installed `pcq` script
    result = finish(subprocess.Popen(
        [PCQ_SCRIPT, *README_EXAMPLE], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True))

    assert result.returncode == 0, result.stderr
    eaten = re.findall(r"ate sausage (\d+)", result.stdout)
    assert sorted(map(int, eaten)) == list(range(20))
    assert re.fullmatch(
        r"pcq run: 20 produced, 20 done, 0 failed, 0 retried in \d+\.\d\d s \(\S+/s\)\n",
        result.stderr)


def _run_on_a_terminal(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``pcq ARGS`` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([PCQ_SCRIPT, *args], cwd=ROOT, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    code, text = read_terminal(master, proc, timeout)
    assert session_members(proc.pid) == {}
    return code, text


@pytest.mark.parametrize("attempt", range(3))
def test_the_readme_example_on_a_terminal_shows_progress(attempt: int) -> None:
    # Consumers are forked while the bar is drawn, and they print: three runs,
    # as a deadlock between the two showed only now and then.
    code, output = _run_on_a_terminal(README_EXAMPLE)

    assert code == 0, output
    assert "\u2501" in output  # the bar
    assert "20/20 done" in output  # counted from the job's start
    assert len(re.findall(r"ate sausage", output)) == 20
    assert "pcq run: 20 produced, 20 done, 0 failed" in output


@pytest.mark.parametrize(
    ("producers", "workers"),
    [(1, 1), (1, 3), (2, 1), (2, 3)],
    ids=["1-to-1", "1-to-N", "P-to-1", "P-to-N"],
)
def test_every_shape_handles_every_item_once(tmp_path: Path, producers: int, workers: int) -> None:
    result = pcq("run", f"{JOBS}:produce", f"{JOBS}:handle", "--workers", str(workers),
                 "--producers", str(producers), "--maxsize", "8", "--json", out=tmp_path,
                 LJ_N="30")

    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("produced", "done", "failed", "retried")} == {
        "produced": 30 * producers, "done": 30 * producers, "failed": 0, "retried": 0}
    producer_pids = [int(p.stem.split("-")[1]) for p in tmp_path.glob("producer-*.log")]
    assert len(producer_pids) == producers
    expected = Counter((pid, n) for pid in producer_pids for n in range(30))
    assert local_jobs.as_tuples(local_jobs.handled(tmp_path)) == expected


def test_json_is_one_object_on_stdout(tmp_path: Path) -> None:
    result = pcq("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle", "--json", out=tmp_path)

    assert result.returncode == 0
    summary = json.loads(result.stdout)  # the whole of stdout: one JSON object
    assert isinstance(summary, dict)
    assert {"produced", "done", "failed", "retried", "elapsed_s"} <= set(summary)
    assert (summary["produced"], summary["done"], summary["exit_code"]) == (20, 20, 0)
    assert isinstance(summary["elapsed_s"], float) and summary["elapsed_s"] > 0
    assert result.stderr == ""


def test_no_progress_and_no_terminal_print_only_the_summary(tmp_path: Path) -> None:
    result = pcq("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle", "--no-progress",
                 "--workers", "2", out=tmp_path)

    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr.startswith("pcq run: 20 produced, 20 done")
    assert result.stderr.count("\n") == 1


def test_options_reach_the_job(tmp_path: Path) -> None:
    result = pcq("run", f"{JOBS}:produce_numbers", f"{JOBS}:handle_failing", "--workers", "3",
                 "--producers", "1", "--maxsize", "4", "--retries", "1", "--timeout", "10",
                 "--json", "--no-progress", out=tmp_path)

    summary = json.loads(result.stdout)
    assert (summary["workers"], summary["producers"]) == (3, 1)
    assert (summary["failed"], summary["retried"], summary["done"]) == (4, 4, 16)
    assert result.returncode == 1


BAD_SPECS = [
    pytest.param(["missing.py:produce", f"{JOBS}:handle"], "no such file 'missing.py'",
                 id="missing-file"),
    pytest.param(["pcq_no_such_module_xyz:produce", f"{JOBS}:handle"],
                 "no module named 'pcq_no_such_module_xyz'", id="unknown-module"),
    pytest.param([f"{JOBS}:no_such_producer", f"{JOBS}:handle"],
                 "has no attribute 'no_such_producer'", id="missing-attribute"),
    pytest.param([f"{JOBS}:produce", "json:__doc__"], "'__doc__' is a str, not a function",
                 id="not-callable"),
    pytest.param(["produce", f"{JOBS}:handle"], "must look like 'module:function'",
                 id="no-colon"),
    pytest.param([f"{JOBS}:produce", f"{JOBS}:handle", "--backend", "nosuch"],
                 "unknown backend 'nosuch'", id="unknown-backend"),
]


@pytest.mark.parametrize(("args", "words"), BAD_SPECS)
def test_bad_input_is_one_clear_line_and_exit_2(
    tmp_path: Path, args: list[str], words: str
) -> None:
    result = pcq("run", *args, out=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("pcq: error: ")
    assert words in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--workers", "0"], ["--maxsize", "-1"], ["--bogus"], []],
                         ids=["zero-workers", "negative-maxsize", "unknown-option", "no-handler"])
def test_a_usage_error_is_exit_2_without_a_traceback(tmp_path: Path, args: list[str]) -> None:
    positional = [f"{JOBS}:produce"] if not args else [f"{JOBS}:produce", f"{JOBS}:handle"]
    result = pcq("run", *positional, *args, out=tmp_path)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Usage:" in result.stderr


def test_an_unencodable_item_stops_the_run_and_names_its_type(tmp_path: Path) -> None:
    result = pcq("run", f"{JOBS}:produce_unencodable", f"{JOBS}:handle", "--json",
                 out=tmp_path)

    assert result.returncode == 1
    assert "cannot encode a task of type 'object'" in result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert (summary["produced"], summary["done"], summary["producer_errors"]) == (2, 2, 1)
    assert sorted(local_jobs.handled(tmp_path)) == [1, 2]
