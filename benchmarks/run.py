"""Run the pcq benchmark suite: every workload on pcq local, pcq redis and the
baselines, interleaved within each repetition; print the tables and targets,
write them as JSON.

    python -m benchmarks.run                      # full: --repeat 5, ~10 min
    python -m benchmarks.run --quick              # smoke: N / 10, one repetition
    python -m benchmarks.run --only noop,latency --repeat 3 --json /tmp/out.json

Every trial runs in a fresh interpreter (:mod:`benchmarks.trial`).  Within a
repetition each workload runs all of its systems back to back, in an order
rotated every repetition, so slow drifts in machine load hit every system
alike.  The memory workload is long and needs no median: it runs once, after
the repetitions.  A redis-server is started on a free loopback port for the
redis rows and stopped at the end; redis rows are skipped, with the reason, when
redis-server, redis-py or pcq's redis backend is missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report, tasks, workloads
from benchmarks.redis_server import RedisServer, version
from benchmarks.systems import SYSTEMS, pcq_redis_problem
from benchmarks.trial import RESULT

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=None,
                   help="repetitions of noop, cpu and latency (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: N, cpu and latency tasks / {workloads.QUICK_DIVISOR}")
    p.add_argument("--only", default=",".join(workloads.WORKLOADS),
                   help="comma-separated workloads (default: %(default)s)")
    p.add_argument("--systems", default="",
                   help="comma-separated systems to run (default: all): " + ", ".join(SYSTEMS))
    p.add_argument("--workers", type=int, default=workloads.WORKERS,
                   help="consumer processes W (default %(default)s)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help="where to write the results (default benchmarks/results/latest.json)")
    args = p.parse_args(argv)
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in args.only if w not in workloads.WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; known: {', '.join(workloads.WORKLOADS)}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()] or list(SYSTEMS)
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad:
        p.error(f"unknown system(s) {bad}; known: {', '.join(SYSTEMS)}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 5
    return args


def _git(*words: str) -> str:
    """Output of a read-only git command on this checkout ("" without git)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *words], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "pcq")
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "redis_server": version(),
        "pcq_commit": commit + (" (pcq/ modified)" if dirty else ""),
        "loadavg_start": os.getloadavg(),
    }


def redis_problems(systems: list[str]) -> dict[str, str]:
    """Systems that cannot run here, with the reason."""
    out: dict[str, str] = {}
    if not any(SYSTEMS[s].needs_redis for s in systems):
        return out
    missing = None
    if shutil.which("redis-server") is None:
        missing = "redis-server is not on PATH"
    elif importlib.util.find_spec("redis") is None:
        missing = "redis-py is not installed"
    for s in systems:
        if SYSTEMS[s].needs_redis and missing:
            out[s] = missing
    if "pcq-redis" in systems and "pcq-redis" not in out:
        problem = pcq_redis_problem()
        if problem:
            out["pcq-redis"] = f"pcq redis backend unavailable: {problem}"
    return out


def run_trial(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One trial in a fresh interpreter, in its own process group (killed whole
    on timeout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.trial", json.dumps(spec)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                "stderr": err[-2000:]}
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT):
            result: dict[str, Any] = json.loads(line[len(RESULT):])
            if err.strip():
                result["stderr"] = err[-2000:]
            return result
    return {"ok": False, "error": f"trial exited {proc.returncode} without a result",
            "stderr": err[-2000:]}


def describe(t: dict[str, Any]) -> str:
    if not t.get("ok"):
        return "FAILED: " + str(t.get("error", "?")).splitlines()[0][:200]
    w = t["workload"]
    if w in ("noop", "memory"):
        text = f"{t['rate']:,.0f} tasks/s in {t['window_s']:.2f} s"
        if w == "memory":
            text += ", peak RSS " + ", ".join(f"{r} {kb / 1024:.1f} MiB"
                                              for r, kb in sorted(t["rss_kb"].items()))
        return text
    if w == "cpu":
        return f"efficiency {t['efficiency']:.3f} (t1 {1000 * t['t1_s']:.1f} ms, " \
               f"window {t['window_s']:.2f} s)"
    return f"median {t['latency_median_ms']:.3f} ms, p99 {t['latency_p99_ms']:.3f} ms"


class Suite:
    def __init__(self, args: argparse.Namespace, url: str | None,
                 server: RedisServer | None, unavailable: dict[str, str], spin_k: int) -> None:
        self.args = args
        self.url = url
        self.server = server
        self.unavailable = unavailable
        self.spin_k = spin_k
        self.trials: list[dict[str, Any]] = []
        self.n_noop: dict[str, int] = {}

    def systems(self, workload: str) -> list[str]:
        return [s for s in workloads.SYSTEMS_FOR[workload]
                if s in self.args.systems and s not in self.unavailable]

    def trial(self, rep: int, workload: str, system: str, n: int) -> dict[str, Any]:
        spec = {"rep": rep, "workload": workload, "system": system, "n": n,
                "workers": self.args.workers, "spin_k": self.spin_k,
                "url": self.url if SYSTEMS[system].needs_redis else None}
        result = run_trial(spec, workloads.TIMEOUT_S[workload])
        if self.server is not None and SYSTEMS[system].needs_redis:
            result["redis_keys_left"] = self.server.keys()
            self.server.command("FLUSHALL")  # every redis trial starts on an empty server
        t = {**spec, **result}
        self.trials.append(t)
        print(f"  [{rep + 1}/{self.args.repeat}] {workload:8} {system:15} n={n:<10,} "
              f"{describe(t)}", file=sys.stderr, flush=True)
        return t

    def repetition(self, rep: int) -> None:
        for workload in self.args.only:
            if workload == "memory":
                continue
            systems = self.systems(workload)
            shift = rep % len(systems) if systems else 0
            for system in systems[shift:] + systems[:shift]:
                if workload == "noop":
                    n = self.n_noop.setdefault(
                        system, workloads.sizes("noop", system, self.args.quick)[0])
                    t = self.trial(rep, workload, system, n)
                    window = t.get("window_s") or 0
                    if window > workloads.RESCALE_ABOVE_S:
                        self.n_noop[system] = max(
                            1000, int(n * workloads.RESCALE_TO_S / window))
                else:
                    for n in workloads.sizes(workload, system, self.args.quick):
                        self.trial(rep, workload, system, n)

    def memory(self) -> None:
        for system in self.systems("memory"):
            for n in workloads.sizes("memory", system, self.args.quick):
                self.trial(0, "memory", system, n)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = machine()
    meta["command"] = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)
    unavailable = redis_problems(args.systems)
    for system, reason in unavailable.items():
        print(f"skipping {system}: {reason}", file=sys.stderr)
    spin_k = tasks.calibrate_spin(workloads.CPU_TASK_SECONDS) if "cpu" in args.only else 0
    started = time.monotonic()
    with ExitStack() as stack:
        server = None
        needs_server = any(SYSTEMS[s].needs_redis and s not in unavailable
                           for s in args.systems)
        if needs_server:
            server = stack.enter_context(RedisServer())
            print(f"redis-server {meta['redis_server']} on {server.url}", file=sys.stderr)
        suite = Suite(args, server.url if server else None, server, unavailable, spin_k)
        for rep in range(args.repeat):
            print(f"repetition {rep + 1}/{args.repeat}", file=sys.stderr, flush=True)
            suite.repetition(rep)
        if "memory" in args.only:
            print("memory (once)", file=sys.stderr, flush=True)
            suite.memory()
    meta["loadavg_end"] = os.getloadavg()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["spin_k"] = spin_k
    trials = suite.trials
    tgts = report.targets(trials, unavailable)
    text = report.markdown(trials, tgts, unavailable, args.workers)
    header = (f"{meta['date']} · nproc {meta['nproc']} · {meta['machine']} · Python "
              f"{meta['python']} · redis-server {meta['redis_server']} · pcq {meta['pcq_commit']}"
              f" · `{meta['command'].strip()}` · {meta['duration_s']} s\n")
    if unavailable:
        header += "\nSkipped: " + "; ".join(f"{s} ({r})" for s, r in unavailable.items()) + "\n"
    print("\n" + header + "\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "meta": meta,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "unavailable": unavailable,
        "targets": report.targets_json(tgts),
        "summary": report.summary(trials),
        "trials": trials,
        "markdown": header + "\n" + text,
    }, indent=1, default=str) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
