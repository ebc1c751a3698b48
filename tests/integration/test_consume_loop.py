"""One consume loop at every concurrency (issue #16), with real processes and a
real redis-server: a retry pending at a consumer's sentinel is waited for
(issue #15 item 2), and a suspect task runs where no other task runs, so a task
that kills its consumer takes no innocent task to the dead letters with it
(issue #15 item 6)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import local_jobs
import pytest
from apps.jobs import handled
from helpers import wait_for
from helpers_cli import pcq_env, start_pcq

import pcq
from pcq.backends.base import Queue


@pytest.fixture(params=["local", "redis"])
def queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    if request.param == "local":
        q = pcq.open_queue("local")
    else:
        url = request.getfixturevalue("redis_url")
        q = pcq.open_queue("redis", url=url, name=f"loop-{uuid.uuid4().hex[:8]}")
    try:
        yield q
    finally:
        q.dispose()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_class_style_consumer_stays_for_a_retry_pending_at_its_sentinel(
    queue: Queue, concurrency: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LJ_OUT", str(tmp_path))
    monkeypatch.setenv("LJ_N", "101")
    # Given a class-style consumer with one retry, attached, held at task 0
    consumer = pcq.Consumer(queue, handle=local_jobs.handle_gated_last_fails_once,
                            retries=1, backoff=0.3, concurrency=concurrency)
    consumer.start()
    try:
        wait_for(lambda: queue.counters().consumers == 1, message="the consumer to attach")
        queue.put_many(range(101))
        wait_for(lambda: queue.counters().in_flight >= 1, message="task 0 taken")
        # When the queue closes behind the tasks (its sentinel last: the leases
        # grow while tasks are cheap, so the last one holds task 100, which
        # fails once, and the sentinel) and task 0 goes on
        queue.close()
        (tmp_path / "go").touch()
        # Then the consumer stays for the retry: join returns, every task is done
        assert queue.join(timeout=20), queue.counters()
        consumer.join(10)
        assert consumer.exitcode == 0
    finally:
        if consumer.is_alive():
            consumer.kill()
            consumer.join()
    c = queue.counters()
    assert (c.done, c.retried, c.failed, c.pending, c.delayed) == (101, 1, 0, 0, 0)
    assert sorted(local_jobs.handled(tmp_path)) == list(range(101))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["local", "redis"])
def test_only_the_tasks_that_kill_their_consumer_are_dead_lettered(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given 12 tasks of 0.2 s, two of which SIGKILL the consumer that runs them,
    # run by 2 consumers of 4 slots each with the default --max-deliveries 3
    url = request.getfixturevalue("redis_url") if backend == "redis" else ""
    env = pcq_env(url, tmp_path, JOBS_N="12", JOBS_KILLERS="0,5", JOBS_SLEEP="0.2")
    if not url:
        del env["PCQ_URL"]
    app = "tests/apps/jobs.py"
    proc = start_pcq(["run", f"{app}:produce", f"{app}:handle_kills_self", "--workers", "2",
                      "--concurrency", "4", "--json", "--no-progress"], env)
    out, err = proc.communicate(timeout=100)
    # Then the killers alone are dead-lettered, each after 3 deaths; the others
    # (in flight beside a killer when it first struck) are all handled
    assert proc.returncode == 1, err[-3000:]
    summary = json.loads(out)
    assert (summary["failed"], summary["done"]) == (2, 10), summary
    assert sorted(f["item"] for f in summary["failures"]) == ["0", "5"]
    assert all("died 3 times" in f["error"] for f in summary["failures"])
    assert set(handled(tmp_path)) == set(range(12)) - {0, 5}
