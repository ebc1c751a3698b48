"""The dashboard: its page in a real browser, /metrics, its cost and its safety.

Real redis-servers, real `pcq` processes, and Debian's headless chromium (a
test that needs it fails, never skips, when it is missing).  Screenshots are
kept in the test's tmp_path.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import subprocess
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import finish, wait_for
from helpers_cli import PCQ, ROOT, pcq_env, start_pcq
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer

from pcq.backends.base import Failure
from pcq.backends.redis import REGISTRY, RedisQueue
from pcq.dashboard import server
from pcq.dashboard.collect import Collector
from pcq.dashboard.metrics import MISSING
from pcq.dashboard.service import Dashboard
from pcq.dashboard.sources import RedisSource

JOBS = "tests/apps/jobs.py"
PIPES = "tests/apps/pipes.py"
#: /metrics name -> the field of `pcq status --json` it must equal.
METRICS = {
    "pcq_tasks_produced_total": "produced", "pcq_tasks_done_total": "done",
    "pcq_tasks_failed_total": "failed", "pcq_tasks_retried_total": "retried",
    "pcq_tasks_ready": "ready", "pcq_tasks_in_flight": "in_flight",
    "pcq_tasks_pending": "pending", "pcq_dead_letters": "dead",
    "pcq_consumers": "consumers", "pcq_producers": "producers",
}


# ---------------------------------------------------------------- helpers

def fetch(url: str, path: str, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (the path is sent as written: no client-side
    normalisation of ``..``); (status, headers, body)."""
    host_port = url.split("//", 1)[1].rstrip("/")
    conn = http.client.HTTPConnection(host_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def state_of(url: str) -> dict[str, Any]:
    status, _, body = fetch(url, "/api/state")
    assert status == 200
    return dict(json.loads(body))


def announced(proc: subprocess.Popen[str], timeout: float = 30,
              seen_lines: list[str] | None = None) -> str:
    """The dashboard URL a `pcq` process printed on stderr; what it read of
    stderr goes to ``seen_lines``."""
    assert proc.stderr is not None
    fd, seen, deadline = proc.stderr.fileno(), b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 65536)
            seen += chunk
            lines = seen.decode(errors="replace").splitlines()
            for line in lines:
                if "dashboard at http://" in line:
                    if seen_lines is not None:
                        seen_lines += lines
                    return line.split("dashboard at ", 1)[1].split()[0]
            if not chunk:
                break
    raise AssertionError(f"no dashboard URL announced; stderr so far: {seen!r}")


class Stages(HTMLParser):
    """From the page's DOM: queue name -> {field: text} of each stage box."""

    def __init__(self) -> None:
        super().__init__()
        self.stages: dict[str, dict[str, str]] = {}
        self._queue: str | None = None
        self._field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("data-queue") is not None:
            self._queue = found["data-queue"]
            self.stages[self._queue] = {}
        if found.get("data-field") is not None and self._queue is not None:
            self._field = found["data-field"]

    def handle_data(self, data: str) -> None:
        if self._field is not None and self._queue is not None:
            self.stages[self._queue][self._field] = data
            self._field = None


def browse(url: str, screenshot: Path) -> str:
    """Load ``url`` in headless chromium, let its script run, keep a screenshot;
    the DOM it ended with."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (apt-get install -y chromium)"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         # a profile of its own (other browsers may run beside it), no /dev/shm
         # (small in containers), no first-run work
         f"--user-data-dir={screenshot.parent / ('chromium-' + screenshot.stem)}",
         "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
         "--window-size=1400,1000", "--virtual-time-budget=3000",
         f"--screenshot={screenshot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=150, cwd=screenshot.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert screenshot.stat().st_size > 0
    return done.stdout


def stages_in(dom: str) -> dict[str, dict[str, str]]:
    parser = Stages()
    parser.feed(dom)
    return parser.stages


def number(text: str) -> int:
    return int(text.replace(",", ""))


def status_json(url: str, queue: str) -> dict[str, Any]:
    done = subprocess.run([*PCQ, "status", "--json", "--url", url, "--queue", queue],
                          capture_output=True, text=True, cwd=ROOT, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def commands(client: redis.Redis) -> int:
    """Commands the server ran so far (INFO commandstats, scripts' inner calls included)."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


# ---------------------------------------------------------------- /metrics

@pytest.mark.timeout(180)  # three `pcq` processes
def test_metrics_equal_status_json_for_a_finished_run_and_an_open_queue(
        redis_url: str, tmp_path: Path) -> None:
    # Given a finished run with failures (every fifth task fails, retried once)...
    env = pcq_env(redis_url, tmp_path, JOBS_N="20")
    finished = env["PCQ_QUEUE"]
    run = subprocess.run([*PCQ, "run", f"{JOBS}:produce", f"{JOBS}:handle_failing",
                          "--url", redis_url, "--retries", "1", "--workers", "2",
                          "--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1, run.stderr
    # ... and an open queue with ready tasks and a producer attached
    opened = f"{finished}-open"
    q = RedisQueue(opened, url=redis_url)
    q.attach_producer()
    q.put_many(range(7))
    try:
        # When /metrics is scraped
        with Dashboard(RedisSource(redis_url), port=0) as dashboard:
            status, headers, body = fetch(dashboard.url, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        samples = [s for family in text_string_to_metric_families(body.decode())
                   for s in family.samples]
        # Then every series is labelled by queue only, and equals pcq status --json
        assert all(set(s.labels) == {"queue"} for s in samples)
        statuses = {name: status_json(redis_url, name) for name in (finished, opened)}
        for name, expected in statuses.items():
            got = {s.name: s.value for s in samples if s.labels["queue"] == name}
            assert got == {metric: expected[field] for metric, field in METRICS.items()}
        assert statuses[finished]["failed"] == 4 and statuses[finished]["retried"] == 4
        assert statuses[opened]["ready"] == 7 and statuses[opened]["producers"] == 1
    finally:
        q.detach_producer(close_if_last=False)
        q.dispose()


def test_without_prometheus_client_the_page_works_and_metrics_says_what_to_install(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "available", lambda: False)
    with Dashboard(RedisSource(redis_url), port=0) as dashboard:
        status, _, body = fetch(dashboard.url, "/metrics")
        assert status == 501 and body.decode().strip() == MISSING
        assert "pcq[metrics]" in MISSING
        assert fetch(dashboard.url, "/")[0] == 200


# ---------------------------------------------------------------- the page

@pytest.mark.timeout(400)  # two browser loads: minutes on a machine under heavy load
def test_browser_shows_both_stages_of_a_running_pipeline_and_done_grows(
        redis_url: str, tmp_path: Path) -> None:
    # Given a 2-stage pipeline running on Redis, and `pcq dashboard` (default host)
    env = pcq_env(redis_url, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="100000",
                  PIPES_SLEEP="0.005")
    first = env["PCQ_QUEUE"]
    second = f"{{{first}}}.2"
    start_pcq(["run", f"{PIPES}:produce", f"{PIPES}:double", f"{PIPES}:record",
               "--workers", "2", "--maxsize", "100", "--no-progress"], env)
    dashboard = start_pcq(["dashboard", "--port", "0"], env)
    url = announced(dashboard)
    assert url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    later = RedisQueue(second, url=redis_url)
    try:
        wait_for(lambda: later.counters().done > 0, timeout=30, message="stage 2 started")
        # When the browser loads the page twice, while the work goes on
        one = stages_in(browse(url, tmp_path / "first.png"))
        reached = later.counters().done
        wait_for(lambda: later.counters().done > reached + 20, timeout=30)
        two = stages_in(browse(url, tmp_path / "second.png"))
    finally:
        later.dispose()
    # Then both stages are drawn under their exact names, and done grew
    for seen in (one, two):
        assert {first, second} <= set(seen), seen.keys()
        assert seen[first]["state"] == "open"
    assert number(two[second]["done"]) > number(one[second]["done"]) > 0
    assert number(two[first]["done"]) > number(one[first]["done"])


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_run_dashboard_serves_the_jobs_pipeline_and_metrics_while_it_runs(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    # Given `pcq run --dashboard` of a 2-stage pipeline (local: no server at all)
    server = request.getfixturevalue("redis_url") if backend == "redis" else ""
    env = pcq_env(server, tmp_path, PIPES_OUT=str(tmp_path), PIPES_N="400", PIPES_SLEEP="0.01")
    if backend == "local":
        del env["PCQ_URL"]
    queue = env["PCQ_QUEUE"]
    job = start_pcq(["run", f"{PIPES}:produce", f"{PIPES}:double", f"{PIPES}:record",
                     "--workers", "2", "--no-progress", "--dashboard", "0"], env)
    url = announced(job)

    def stage_done() -> dict[str, int] | None:
        stages = state_of(url)["pipelines"]
        shown = {q["queue"]: q["done"] for p in stages for q in p["stages"]}
        return shown if len(shown) == 2 and min(shown.values()) > 0 else None

    # When the job runs, the page's data shows both stages, and their done grows
    before = wait_for(stage_done, timeout=30, message="both local stages at work")
    assert set(before) == {queue, f"{{{queue}}}.2"}
    wait_for(lambda: (now := stage_done()) and now[queue] > before[queue], timeout=30)
    status, headers, body = fetch(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    produced = {s.labels["queue"]: s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples if s.name == "pcq_tasks_produced_total"}
    assert set(produced) == {queue, f"{{{queue}}}.2"} and produced[queue] > 0
    page = fetch(url, "/")
    assert page[0] == 200 and b"/static/app.js" in page[2]
    # Then the job ends as it would without a dashboard, and the port closes with it
    result = finish(job)
    assert result.returncode == 0, result.stderr
    with pytest.raises(OSError):
        fetch(url, "/")


# ---------------------------------------------------------------- cost

def test_a_refresh_costs_the_same_commands_with_100_or_20000_ready_tasks(
        redis_server: RedisServer) -> None:
    client = redis_server.client()
    name = f"cost-{uuid.uuid4().hex[:8]}"
    q = RedisQueue(name, url=redis_server.url)
    q.attach_producer()
    collector = Collector(RedisSource(redis_server.url))
    try:
        def cost() -> int:
            collector.refresh()  # connect, load scripts: not counted
            before = commands(client)
            collector.refresh()
            assert collector.state()["connected"] is True
            return commands(client) - before

        q.put_many(range(100))
        small = cost()
        q.put_many(range(20_000))
        assert q.counters().ready == 20_100
        assert cost() == small
        assert small < 30
    finally:
        collector.stop()
        q.detach_producer(close_if_last=False)
        q.dispose()
        client.close()


# ---------------------------------------------------------------- safety

@pytest.fixture
def dashboard_url(redis_url: str) -> Any:
    with Dashboard(RedisSource(redis_url), port=0) as dashboard:
        yield dashboard.url


@pytest.mark.parametrize("path", [
    "/nope", "/api/nope", "/static/", "/static/nope.js", "/static/../__init__.py",
    "/static/%2e%2e/__init__.py", "/static/..%2f..%2fcli.py", "/static//etc/passwd",
    "/../../../../etc/passwd", "/static/./app.js", "/metrics/x", "/api/state/..",
])
def test_unknown_paths_are_404_and_nothing_escapes_the_asset_folder(
        dashboard_url: str, path: str) -> None:
    status, _, body = fetch(dashboard_url, path)
    assert status in (400, 404), (path, status)
    assert b"import" not in body and b"root:" not in body


def test_assets_are_served_from_the_package_with_a_strict_policy(dashboard_url: str) -> None:
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                       ("/static/style.css", "text/css")):
        status, headers, _ = fetch(dashboard_url, path)
        assert status == 200 and headers["content-type"].startswith(kind)
        assert "default-src 'self'" in headers["content-security-policy"]


def test_actions_are_refused_when_read_only_and_without_the_token(redis_url: str) -> None:
    name = f"act-{uuid.uuid4().hex[:8]}"
    q = RedisQueue(name, url=redis_url)
    q.attach_producer()
    body = json.dumps({"queue": name}).encode()
    try:
        # Read-only by default: no action, whatever the token
        with Dashboard(RedisSource(redis_url), port=0) as dashboard:
            wait_for(lambda: state_of(dashboard.url)["connected"])
            assert fetch(dashboard.url, "/api/close", "POST", body)[0] == 403
        assert q.state() == "open"
        with Dashboard(RedisSource(redis_url), port=0, allow_actions=True) as dashboard:
            assert dashboard.token
            for headers in ({}, {"X-Pcq-Token": "wrong"}, {"Cookie": f"t={dashboard.token}"}):
                assert fetch(dashboard.url, "/api/close", "POST", body, headers)[0] == 403
            assert fetch(dashboard.url, "/api/close", "GET")[0] == 404
            assert q.state() == "open"
            # With the token printed at start, the action runs
            good = {"X-Pcq-Token": dashboard.token}
            status, _, reply = fetch(dashboard.url, "/api/close", "POST", body, good)
            assert status == 200, reply
            assert q.counters().closed
            missing = json.dumps({"queue": "no-such-queue-" + name}).encode()
            assert fetch(dashboard.url, "/api/requeue", "POST", missing, good)[0] == 404
            # A dead letter requeued from the page is ready again
            q.put(5)
            q.attach_consumer()
            lease = q.take(1, timeout=5)
            assert lease is not None
            q.ack(lease, [Failure(next(lease.envelopes()), "ValueError: no")])
            assert q.counters().dead == 1
            status, _, reply = fetch(dashboard.url, "/api/requeue", "POST", body, good)
            assert status == 200 and json.loads(reply)["count"] == 1
            assert q.counters().dead == 0 and q.counters().ready == 1
    finally:
        q.dispose()


def test_the_registry_lists_the_queues_in_use_and_forgets_throwaway_ones(
        redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    name = f"reg-{uuid.uuid4().hex[:8]}"
    consumed, fed = RedisQueue(name, url=redis_url), RedisQueue(f"{name}-out", url=redis_url)
    try:
        consumed.attach_consumer()
        consumed.set_feeds(fed.name)  # a stage's target is listed before any task reaches it
        assert {name, fed.name} <= {n.decode() for n in client.smembers(REGISTRY)}
        source = RedisSource(redis_url)
        chain = next(c for c in source.chains() if c[0].name == name)
        assert [q.name for q in chain] == [name, fed.name]  # a pipeline, by what it feeds
        source.close()
        consumed.detach_consumer()
        consumed.forget()
        assert name.encode() not in client.smembers(REGISTRY)
    finally:
        consumed.dispose()
        fed.dispose()
        client.close()


@pytest.mark.timeout(180)  # three `pcq` processes
def test_bad_dashboard_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = pcq_env("", tmp_path)
    del env["PCQ_URL"]
    for args, says in (
        (["dashboard"], "needs a queue server"),
        (["run", f"{JOBS}:produce", f"{JOBS}:handle", "--dashboard", "nope:port"],
         "give [HOST:]PORT"),
        (["dashboard", "--url", "redis://127.0.0.1:1/0", "--auth", "nocolon"], "USER:PASS"),
    ):
        done = subprocess.run([*PCQ, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and says in done.stderr, done.stderr


def test_basic_auth_guards_every_path(redis_url: str) -> None:
    with Dashboard(RedisSource(redis_url), port=0, auth="ann:s3cret") as dashboard:
        for path in ("/", "/api/state", "/metrics", "/static/app.js"):
            status, headers, _ = fetch(dashboard.url, path)
            assert status == 401 and "basic" in headers["www-authenticate"].lower()
        wrong = {"Authorization": "Basic " + "YW5uOndyb25n"}  # ann:wrong
        assert fetch(dashboard.url, "/", headers=wrong)[0] == 401
        right = {"Authorization": "Basic " + "YW5uOnMzY3JldA=="}  # ann:s3cret
        assert fetch(dashboard.url, "/api/state", headers=right)[0] == 200


def test_beyond_loopback_without_auth_warns_in_one_line(redis_url: str, tmp_path: Path) -> None:
    env = pcq_env(redis_url, tmp_path)
    bare = start_pcq(["dashboard", "--host", "0.0.0.0", "--port", "0"], env)
    said: list[str] = []
    announced(bare, seen_lines=said)
    guarded = start_pcq(["dashboard", "--host", "0.0.0.0", "--port", "0"],
                        {**env, "PCQ_DASHBOARD_AUTH": "ann:s3cret"})
    guarded_said: list[str] = []
    url = announced(guarded, seen_lines=guarded_said)
    assert fetch(url, "/")[0] == 401  # the auth came from the environment
    for proc in (bare, guarded):
        proc.terminate()
    said += finish(bare).stderr.splitlines()
    warned = [line for line in said if "warning" in line]
    assert len(warned) == 1 and "open to anyone" in warned[0] and "--auth" in warned[0]
    guarded_said += finish(guarded).stderr.splitlines()
    assert not [line for line in guarded_said if "warning" in line]


@pytest.mark.timeout(120)
def test_redis_lost_shows_disconnected_and_the_server_stays_up(
        redis_server: RedisServer, tmp_path: Path) -> None:
    # Given `pcq dashboard` showing a queue
    name = f"lost-{uuid.uuid4().hex[:8]}"
    q = RedisQueue(name, url=redis_server.url)
    q.attach_producer()
    q.put(1)
    q.dispose()
    dashboard = start_pcq(["dashboard", "--url", redis_server.url, "--port", "0"],
                          pcq_env(redis_server.url, tmp_path))
    url = announced(dashboard)
    wait_for(lambda: state_of(url)["connected"] is True, timeout=20)
    # When Redis goes away
    redis_server.kill()
    # Then the page says so, /metrics is a failed scrape, and nothing is a 500
    state = wait_for(lambda: (s := state_of(url))["connected"] is False and s, timeout=20)
    assert state["error"] and name in {q["queue"] for p in state["pipelines"]
                                       for q in p["stages"]}
    assert fetch(url, "/metrics")[0] == 503
    assert fetch(url, "/")[0] == 200
    assert "disconnected" in browse(url, tmp_path / "disconnected.png")
    # And when it is back, so is the page: the process never went down
    redis_server.start()
    wait_for(lambda: state_of(url)["connected"] is True, timeout=20)
    assert dashboard.poll() is None
