"""One trial — one workload on one system — in a fresh interpreter.

    python -m benchmarks.trial '{"workload": "noop", "system": "jq-16", "n": 100000}'

Runs in its own process so that no trial inherits another's heap (a forked
child's RSS starts at its parent's), imports, or leftover children.  Prints
one line ``RESULT {json}`` on stdout.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks import probe, tasks, workloads
from benchmarks.systems import SYSTEMS, run_system

RESULT = "RESULT "


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    system = SYSTEMS[spec["system"]]
    workload: str = spec["workload"]
    n: int = spec["n"]
    workers: int = spec.get("workers", workloads.WORKERS)
    spin_k: int = spec.get("spin_k", 0)
    fd, path = tempfile.mkstemp(prefix="pcq-bench-probe-")
    os.close(fd)
    try:
        probe.install(path)
        job = workloads.job(workload, n, spin_k)
        out: dict[str, Any] = {}
        t1_samples = tasks.spin_times(spin_k, 5) if workload == "cpu" else []
        started, busy0, steal0, own0 = time.monotonic(), *probe.machine_cpu(), _own_cpu()
        reported = run_system(system, job.produce, job.handle, job.decode,
                              n=n, workers=workers, url=spec.get("url"))
        wall = out["wall_s"] = time.monotonic() - started
        busy1, steal1 = probe.machine_cpu()
        main_cpu = _own_cpu() - own0
        if workload == "cpu":
            t1_samples += tasks.spin_times(spin_k, 5)
            out["t1_s"] = statistics.median(t1_samples)
            out["t1_before_after_ms"] = [round(1000 * t, 2) for t in t1_samples]
        records = probe.read(path)
    finally:
        os.unlink(path)
    out.update(reported)
    exits = [r for r in records if "exit" in r]
    if "window_s" not in out:
        first_put = min(r["t"] for r in records if r.get("event") == "first_put")
        last_exit = max(r["exit"] for r in exits if probe.role(r["name"]) == "consumer")
        out["window_s"] = last_exit - first_put
    if "done" not in out:
        out["done"] = sum(r.get("handled", 0) for r in exits)
    rss: dict[str, int] = {"main": probe.peak_rss_kb()}
    for r in exits:
        who = probe.role(r["name"])
        rss[who] = max(rss.get(who, 0), r["vmhwm_kb"])
    out["rss_kb"] = rss
    out["processes"] = len(exits)
    # What else the machine ran meanwhile (another user's tests, redis-server),
    # in cores: a noisy neighbour shows here, not in our numbers' labels.
    ours = main_cpu + sum(r["cpu_s"] for r in exits)
    out["other_load_cores"] = max(0.0, (busy1 - busy0 - ours) / wall)
    out["steal_cores"] = (steal1 - steal0) / wall

    expected = n + (workloads.LATENCY_WARMUP if workload == "latency" else 0)
    problems = []
    if out["done"] != expected:
        problems.append(f"{out['done']} tasks done, expected {expected}")
    window = out["window_s"]
    if workload in ("noop", "memory"):
        out["rate"] = n / window
    elif workload == "cpu":
        out["efficiency"] = n * out["t1_s"] / (workers * window)
        consumers = [r for r in exits if probe.role(r["name"]) == "consumer"]
        out["utilisation"] = sum(r["cpu_s"] for r in consumers) / (workers * window)
        out["tasks_per_consumer"] = sorted((r.get("calls", 0) for r in consumers),
                                           reverse=True)
        out["busy"] = sum(r.get("busy_s", 0.0) for r in consumers) / (workers * window)
    elif workload == "latency":
        delays = next(r["delays"] for r in records if r.get("event") == "delays")
        got = sorted(d for d in delays if d is not None)
        out["lost"] = len(delays) - len(got)
        if out["lost"]:
            problems.append(f"{out['lost']} of {len(delays)} tasks got no reply within "
                            f"{workloads.LATENCY_GIVE_UP:g} s")
        if got:
            out["latency_median_ms"] = 1000 * percentile(got, 50)
            out["latency_p99_ms"] = 1000 * percentile(got, 99)
            out["latency_max_ms"] = 1000 * got[-1]
    out["ok"] = not problems
    if problems:
        out["error"] = "; ".join(problems)
    return out


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    try:
        result = run_trial(spec)
    except BaseException as exc:  # a trial reports, it never raises
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
