"""``redis+sentinel://`` URLs against real sentinels (issue #17): a job through
the sentinels, one clear line for a service they do not know or when none is
reachable, and the data nodes' password never printed.  The failover itself
is in test_redis_failover.py.

One group (a master with a password, one replica, three sentinels) serves the
module.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import Iterator

import pytest
from apps.jobs import handled
from helpers_cli import pcq_env, start_pcq
from redis_cluster import SentinelGroup
from redis_server import free_port

from pcq.backends.redis import RedisQueue, key
from pcq.errors import BackendUnavailable, ConfigError

JOBS = "tests/apps/jobs.py"
SECRET = "data-n0de-secret"


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    started = SentinelGroup(replicas=1, sentinels=3, password=SECRET).start()
    try:
        yield started
    finally:
        started.cleanup()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.timeout(60)
def test_a_job_through_the_sentinels_reaches_the_master_and_its_replica(group, tmp_path):
    env = pcq_env(group.url(), tmp_path, JOBS_N="200")
    # When a job runs through the sentinels
    code, out, err = finish(start_pcq(["run", f"{JOBS}:produce", f"{JOBS}:handle", "--backend",
                                       "redis", "--workers", "2", "--json", "--no-progress"], env))
    # Then it ends with every task done, on the master, and the replica has it
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["produced"], summary["done"]) == (200, 200)
    assert Counter(handled(tmp_path)) == Counter(range(200))
    counters = key(env["PCQ_QUEUE"], "counters")
    assert int(group.replicas[0].client().hget(counters, "done")) == 200
    assert SECRET not in out + err


@pytest.mark.timeout(60)
def test_a_service_the_sentinels_do_not_know_is_one_line_and_exit_2(group, tmp_path):
    env = pcq_env(group.url(service="nosuch"), tmp_path)
    for command in (["status"], ["consume", f"{JOBS}:handle"], ["produce", f"{JOBS}:produce"]):
        code, out, err = finish(start_pcq(command, env))
        assert code == 2, err
        assert err.count("\n") == 1, err
        assert "know no service 'nosuch'" in err and "svc" in err, err
        assert SECRET not in out + err


@pytest.mark.timeout(60)
def test_no_sentinel_reachable_is_one_line_and_exit_2(tmp_path):
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://:{SECRET}@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/svc"
    code, out, err = finish(start_pcq(["status"], pcq_env(url, tmp_path)))
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith(f"pcq: error: cannot reach any sentinel at redis+sentinel://127.0.0.1:"
                          f"{ports[0]},127.0.0.1:{ports[1]}/svc/0"), err
    assert SECRET not in out + err


@pytest.mark.timeout(30)
def test_a_wrong_data_password_is_refused_without_printing_it(group, tmp_path):
    env = pcq_env(group.url(password="not-" + SECRET), tmp_path)
    code, out, err = finish(start_pcq(["status"], env))
    assert code == 2, err
    assert err.count("\n") == 1 and "refused" in err, err
    assert SECRET not in out + err


@pytest.mark.parametrize("url", [
    "redis+sentinel://127.0.0.1:1/",  # no service
    "redis+sentinel://127.0.0.1/svc",  # no port
    "redis+sentinel://127.0.0.1:1/svc/zero",  # the db is not a number
    "redis+sentinel://127.0.0.1:1/svc?wait=-1",
    "redis+sentinel://127.0.0.1:1/svc?wait_timeout_ms=soon",
])
def test_a_bad_sentinel_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="bad"):
        RedisQueue("q", url=url)


def test_an_unreachable_sentinel_is_unavailable_not_a_traceback():
    q = RedisQueue("q", url=f"redis+sentinel://127.0.0.1:{free_port()}/svc")
    with pytest.raises(BackendUnavailable, match="cannot reach any sentinel"):
        q.counters()
