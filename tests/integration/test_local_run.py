"""The Python API on the local backend, with real processes: pcq.run in every
shape, the Summary, the class style, backpressure, and 100 runs in one process."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import local_jobs
import pytest
from helpers import children_of, open_fds, wait_for

import pcq
from pcq.backends.base import Lease

job_module = sys.modules["pcq.job"]


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The directory the jobs of local_jobs record into (children inherit LJ_OUT)."""
    monkeypatch.setenv("LJ_OUT", str(tmp_path))
    return tmp_path


@pytest.fixture(autouse=True)
def no_child_left() -> Any:
    """Every test must leave no child process (nor zombie) behind."""
    before = set(children_of(os.getpid()))
    yield
    assert set(children_of(os.getpid())) - before == set()


class SentinelRecordingConsumer(pcq.Consumer):
    """A Consumer that records, in ``sentinel-<pid>.log``, each sentinel it takes."""

    def _settle(self, lease: Lease, *args: Any) -> Any:
        if lease.sentinel is not None:
            local_jobs._append(f"sentinel-{os.getpid()}.log", time.monotonic())
        return super()._settle(lease, *args)


def _times(out: Path, prefix: str) -> dict[int, list[float]]:
    return {
        int(p.stem.split("-")[1]): [float(x) for x in p.read_text().split()]
        for p in out.glob(f"{prefix}-*.log")
    }


@pytest.mark.parametrize(
    ("producers", "workers"),
    [(1, 1), (1, 4), (3, 1), (3, 4)],
    ids=["1-to-1", "1-to-N", "P-to-1", "P-to-N"],
)
def test_every_shape_handles_every_item_once(
    out: Path, monkeypatch: pytest.MonkeyPatch, producers: int, workers: int
) -> None:
    # Given P producers making 25 tasks each, and a consumer that records its sentinels
    monkeypatch.setenv("LJ_N", "25")
    monkeypatch.setattr(job_module, "Consumer", SentinelRecordingConsumer)

    # When the job runs
    summary = pcq.run(
        local_jobs.produce, local_jobs.handle, workers=workers, producers=producers, maxsize=8
    )

    # Then the producer function ran once in each producer process, and every
    # task of every producer was handled exactly once
    producer_done = _times(out, "producer")
    assert len(producer_done) == producers
    expected = Counter((pid, n) for pid in producer_done for n in range(25))
    assert local_jobs.as_tuples(local_jobs.handled(out)) == expected
    assert (summary.produced, summary.done, summary.failed, summary.retried) == (
        25 * producers, 25 * producers, 0, 0)
    assert (summary.restarts, summary.producer_errors, summary.exit_code) == (0, 0, 0)

    # And each consumer stopped on exactly one sentinel, after every producer was done
    sentinels = _times(out, "sentinel")
    assert len(sentinels) == workers
    assert all(len(times) == 1 for times in sentinels.values())
    assert set(local_jobs.handled_by(out)) <= set(sentinels)
    assert min(t for (t,) in sentinels.values()) > max(t for (t,) in producer_done.values())


def test_the_summary(out: Path) -> None:
    summary = pcq.run(local_jobs.produce_numbers, local_jobs.handle, workers=2, maxsize=4)

    assert isinstance(summary, pcq.Summary)
    expected = {"produced": 20, "done": 20, "failed": 0, "retried": 0, "dead": 0, "workers": 2,
                "producers": 1, "restarts": 0, "producer_errors": 0, "interrupted": None,
                "exit_code": 0}
    data = summary.as_dict()
    assert {k: data[k] for k in expected} == expected
    assert 0 < data["elapsed_s"] == summary.elapsed_s < 30


def test_failing_tasks_are_retried_then_counted_failed(out: Path) -> None:
    summary = pcq.run(local_jobs.produce_numbers, local_jobs.handle_failing, workers=2,
                      maxsize=8, retries=2)

    # 0, 5, 10, 15 fail three times each; the others are done once
    assert (summary.done, summary.failed, summary.retried, summary.dead) == (16, 4, 8, 4)
    assert summary.exit_code == 1
    assert sorted(local_jobs.handled(out)) == [n for n in range(20) if n % 5]


def test_an_unencodable_item_stops_the_job_cleanly(
    out: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    summary = pcq.run(local_jobs.produce_unencodable, local_jobs.handle, workers=2)

    assert summary.producer_errors == 1
    assert summary.exit_code == 1
    assert sorted(local_jobs.handled(out)) == [1, 2]
    err = capfd.readouterr().err
    assert "cannot encode a task of type 'object'" in err
    assert "Traceback" not in err


def test_pcq_exports_the_api() -> None:
    assert callable(pcq.run) and callable(pcq.open_queue)
    assert issubclass(pcq.Producer, mp.Process) and issubclass(pcq.Consumer, mp.Process)
    assert issubclass(pcq.SerializationError, pcq.PcqError)
    assert issubclass(pcq.ImportSpecError, pcq.ConfigError)
    assert {"BackendUnavailable", "DecodeError", "TaskTimeout", "Queue"} <= set(pcq.__all__)
    assert pcq.__version__


# ---------------------------------------------------------------- class style


class Numbers(pcq.Producer):
    def produce(self) -> Any:
        yield None  # a task like any other, not a sentinel
        yield from range(1, 30)


class Recorder(pcq.Consumer):
    def handle(self, item: Any) -> None:
        local_jobs.handle(item)


def test_class_style_producer_and_consumers(out: Path) -> None:
    # Given the classic pattern with pcq's classes
    queue = pcq.open_queue("local", maxsize=16)
    producer = Numbers(queue)
    consumers = [Recorder(queue) for _ in range(4)]

    # When everything is started, the producer joined, the queue closed
    for process in [producer, *consumers]:
        process.start()
    producer.join(30)
    queue.close()
    for consumer in consumers:
        consumer.join(30)

    # Then every task was handled once, join returns and nothing is alive
    try:
        assert queue.join(timeout=10)
        assert not any(p.is_alive() for p in [producer, *consumers])
        assert [p.exitcode for p in [producer, *consumers]] == [0] * 5
        c = queue.counters()
        assert (c.produced, c.done, c.failed, c.pending, c.closed) == (30, 30, 0, 0, True)
    finally:
        queue.dispose()
    assert sorted(local_jobs.handled(out), key=lambda x: -1 if x is None else x) == [
        None, *range(1, 30)]


def test_class_style_join_survives_a_killed_consumer(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two consumers, a task that hangs the first time, and a producer
    # that leaves closing to us (the classic producer.join, queue.join, close)
    monkeypatch.setenv("LJ_N", "10")
    queue = pcq.open_queue("local", maxsize=16)
    producer = pcq.Producer(queue, produce=local_jobs.produce_numbers, close_when_done=False)
    consumers = [pcq.Consumer(queue, handle=local_jobs.handle_stuck_once) for _ in range(2)]
    for process in [*consumers, producer]:
        process.start()

    # When the consumer stuck on it is SIGKILLed
    victim = wait_for(lambda: local_jobs.victim(out), message="the stuck task")
    os.kill(victim, signal.SIGKILL)

    # Then the other consumer handles it and join returns; close stops the survivor
    try:
        producer.join(10)
        assert queue.join(timeout=30)
        queue.close()
        for consumer in consumers:
            consumer.join(10)
        assert not any(p.is_alive() for p in [producer, *consumers])
        assert sorted(p.exitcode for p in consumers) == [-signal.SIGKILL, 0]
        c = queue.counters()
        assert (c.produced, c.done, c.pending) == (10, 10, 0)
    finally:
        queue.dispose()
    assert sorted(local_jobs.handled(out)) == list(range(10))


# ---------------------------------------------------------------- backpressure


def test_a_producer_never_runs_far_ahead_of_the_consumers() -> None:
    maxsize, workers, cap = 16, 2, 4  # a batch holds ~5 ms of work: 2-3 tasks of 2 ms
    counts = mp.get_context("fork").RawArray("q", 3)  # yielded, handled, most ahead
    lock = mp.get_context("fork").Lock()

    def produce() -> Any:
        for n in range(300):
            with lock:
                counts[0] += 1
                counts[2] = max(counts[2], counts[0] - counts[1])
            yield n

    def handle(n: int) -> None:
        time.sleep(0.002)
        with lock:
            counts[1] += 1

    summary = pcq.run(produce, handle, workers=workers, maxsize=maxsize)

    assert summary.done == 300
    # The queue itself, the producer's batch in hand, one lease per consumer
    assert counts[2] <= maxsize + cap + workers * cap
    assert counts[2] > workers * cap  # the producer did run ahead until the queue was full


# ---------------------------------------------------------------- no leaks


def _produce_five() -> Any:
    return range(5)


def _handle_nothing(item: Any) -> None:
    pass


@pytest.mark.timeout(120)
def test_100_runs_leave_no_child_zombie_fd_thread_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where local queues keep files

    def run_once() -> None:
        summary = pcq.run(_produce_five, _handle_nothing, workers=2, maxsize=8)
        assert (summary.done, summary.exit_code) == (5, 0)

    run_once()  # warm-up: what the first run allocates for good (a shared-memory arena)
    # Garbage of earlier tests in this process (a queue in a reference cycle)
    # closes its sockets at whichever collection comes: not during these runs.
    gc.collect()
    fds, threads, files = open_fds(), threading.active_count(), sorted(tmp_path.iterdir())
    children = set(children_of(os.getpid()))  # a session's redis-server, say

    for _ in range(100):
        run_once()

    assert set(children_of(os.getpid())) == children
    # No descriptor more (a leak of one a run would be 100); fewer is fine: this
    # worker process may drop what an earlier test left open meanwhile
    assert set(open_fds()) <= set(fds)
    assert threading.active_count() == threads
    assert sorted(tmp_path.iterdir()) == files


def test_run_forks_even_when_the_default_start_method_is_spawn(tmp_path: Path) -> None:
    # Given a program whose default start method is spawn (forkserver is the
    # default on Linux from Python 3.14), and handlers no child could import
    program = (
        "import multiprocessing as mp, sys\n"
        "mp.set_start_method('spawn')\n"
        "import pcq\n"
        "s = pcq.run(lambda: range(50), lambda x: None, workers=2)\n"
        "sys.exit(0 if s.done == 50 else 1)\n"
    )
    # When it runs a job, then it works: the children were forked
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
