"""The persistence warning is printed once per command that talks to a server
without persistence, however many queues it touches (issue #19 item 5)."""

from __future__ import annotations

import subprocess

import pytest
from helpers_cli import pcq_env, start_pcq

PIPES = "tests/apps/pipes.py"
WARNING = "keeps nothing on restart"


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.timeout(90)
def test_a_pipeline_run_and_its_status_warn_once_each(redis_url, tmp_path):
    # Given the session's server, which keeps nothing on restart
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="20")
    # When a three-stage pipeline runs, then status shows its three queues
    code, _, err = finish(start_pcq(["run", f"{PIPES}:produce", f"{PIPES}:double",
                                     f"{PIPES}:spread", f"{PIPES}:record", "--backend", "redis",
                                     "--no-progress"], env))
    assert code == 0, err
    assert err.count(WARNING) == 1, err
    code, out, err = finish(start_pcq(["status"], env))
    # Then each command warned once, though it touched three queues
    assert code == 0, err
    assert err.count(WARNING) == 1, err
    assert out.count("ready") >= 3 or out.count("pending") >= 3, out
