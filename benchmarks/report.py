"""Medians, target ratios and the Markdown tables, from a list of trials.

A trial is the spec it ran with (``rep``, ``workload``, ``system``, ``n``) plus
its result (``ok``, ``rate``, ``efficiency``, ``latency_*_ms``, ``rss_kb``, ...).
Ratios against a baseline are taken per repetition — both systems ran in the
same repetition, minutes apart at most — and the median of those is reported
(the ratio of the medians is given beside it).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.systems import SYSTEMS

Trial = dict[str, Any]

LOCAL_NOOP_TARGET = 20.0
REDIS_NOOP_TARGET = 30.0
#: Issue #20 (speed, round two) raised these: cpu efficiency of every pcq row,
#: the idle Redis latency, pcq-local-1000 against Pool(chunksize=500), the local
#: idle latency against the classic pattern's, and noop on one Redis server.
CPU_TARGET = 0.97
REDIS_LATENCY_TARGET_MS = 0.5
LOCAL_VS_POOL_TARGET = 1.3
LOCAL_LATENCY_VS_JQ = 1.2
REDIS_NOOP_RATE_TARGET = 600_000
#: Issue #7 (the local broker): pcq-local-16 against the classic
#: JoinableQueue(16), handler busy share.
LOCAL_16_VS_JQ_TARGET = 3.0
LOCAL_BUSY_TARGET = 0.98
#: Memory is flat when peak RSS at the large N is at most this times that at the small N.
MEMORY_FLAT_RATIO = 1.10


@dataclass
class Target:
    name: str
    goal: str
    measured: float | None
    passed: bool | None  # None: could not be measured
    detail: str

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "MISS", None: "n/a"}[self.passed]


def ok(trials: Iterable[Trial], workload: str, system: str) -> list[Trial]:
    return [t for t in trials
            if t["workload"] == workload and t["system"] == system and t.get("ok")]


def median_of(trials: list[Trial], key: str) -> float | None:
    values = [t[key] for t in trials if t.get(key) is not None]
    return statistics.median(values) if values else None


def paired_ratio(trials: list[Trial], workload: str, key: str, system: str,
                 baseline: str) -> tuple[float | None, float | None]:
    """(median of per-repetition ratios, ratio of medians) of ``key``."""
    mine = {t["rep"]: t[key] for t in ok(trials, workload, system)}
    base = {t["rep"]: t[key] for t in ok(trials, workload, baseline)}
    per_rep = [mine[r] / base[r] for r in mine if base.get(r)]
    m_mine = median_of(ok(trials, workload, system), key)
    m_base = median_of(ok(trials, workload, baseline), key)
    of_medians = m_mine / m_base if m_mine is not None and m_base else None
    return (statistics.median(per_rep) if per_rep else None), of_medians


#: Says why a target has no value: which system was unavailable, not run, or
#: never succeeded (workload, then systems).
WhyMissing = Callable[..., str]


def targets(trials: list[Trial], unavailable: dict[str, str]) -> list[Target]:
    """Every target, in the order the report shows them."""
    def why_missing(workload: str, *systems: str) -> str:
        for s in systems:
            if s in unavailable:
                return f"{s}: {unavailable[s]}"
        for s in systems:
            if not any(t["workload"] == workload and t["system"] == s for t in trials):
                return f"{workload} on {s} not run"
        return "no successful run of " + " / ".join(s for s in systems
                                                   if not ok(trials, workload, s))

    return [*_noop_targets(trials, why_missing), *_local_targets(trials, why_missing),
            *_efficiency_targets(trials, why_missing), _redis_latency_target(trials, why_missing),
            *_memory_targets(trials, why_missing)]


def _noop_targets(trials: list[Trial], why_missing: WhyMissing) -> list[Target]:
    out: list[Target] = []
    for system, baseline, goal in (("pcq-local-16", "jq-16", LOCAL_NOOP_TARGET),
                                   ("pcq-local-1000", "jq-16", LOCAL_NOOP_TARGET),
                                   ("pcq-redis", "redis-raw", REDIS_NOOP_TARGET),
                                   ("pcq-local-1000", "pool-500", LOCAL_VS_POOL_TARGET),
                                   ("pcq-local-16", "jq-16", LOCAL_16_VS_JQ_TARGET)):
        per_rep, of_medians = paired_ratio(trials, "noop", "rate", system, baseline)
        name = f"noop {system} / {baseline}"
        if per_rep is None:
            out.append(Target(name, f">= {goal:g}x", None, None,
                              why_missing("noop", system, baseline)))
            continue
        out.append(Target(name, f">= {goal:g}x", per_rep, per_rep >= goal,
                          f"{per_rep:.1f}x (ratio of medians {of_medians:.1f}x)"))
    rate = median_of(ok(trials, "noop", "pcq-redis"), "rate")
    name, goal_text = "noop pcq-redis, one server", f">= {REDIS_NOOP_RATE_TARGET:,} tasks/s"
    if rate is None:
        out.append(Target(name, goal_text, None, None, why_missing("noop", "pcq-redis")))
    else:
        out.append(Target(name, goal_text, rate, rate >= REDIS_NOOP_RATE_TARGET,
                          f"{rate:,.0f} tasks/s"))
    return out


def _local_targets(trials: list[Trial], why_missing: WhyMissing) -> list[Target]:
    out: list[Target] = []
    for system in ("pcq-local-16", "pcq-local-1000"):
        per_rep, of_medians = paired_ratio(trials, "latency", "latency_median_ms", system,
                                           "jq-16")
        name = f"latency median {system} / jq-16"
        goal = f"<= {LOCAL_LATENCY_VS_JQ:g}x"
        if per_rep is None:
            out.append(Target(name, goal, None, None, why_missing("latency", system, "jq-16")))
        else:
            out.append(Target(name, goal, per_rep, per_rep <= LOCAL_LATENCY_VS_JQ,
                              f"{per_rep:.2f}x (ratio of medians {of_medians:.2f}x)"))
        busy = median_of(ok(trials, "cpu", system), "busy")
        name = f"cpu busy {system}"
        if busy is None:
            out.append(Target(name, f">= {LOCAL_BUSY_TARGET}", None, None,
                              why_missing("cpu", system)))
        else:
            out.append(Target(name, f">= {LOCAL_BUSY_TARGET}", busy,
                              busy >= LOCAL_BUSY_TARGET, f"{busy:.3f}"))
    return out


def _efficiency_targets(trials: list[Trial], why_missing: WhyMissing) -> list[Target]:
    out: list[Target] = []
    base_eff = median_of(ok(trials, "cpu", "jq-16"), "efficiency")
    base_busy = median_of(ok(trials, "cpu", "jq-16"), "busy")
    for system in ("pcq-local-16", "pcq-local-1000", "pcq-redis"):
        runs = ok(trials, "cpu", system)
        eff, busy = median_of(runs, "efficiency"), median_of(runs, "busy")
        name = f"cpu efficiency {system}"
        if eff is None:
            out.append(Target(name, f">= {CPU_TARGET}", None, None, why_missing("cpu", system)))
            continue
        detail = f"{eff:.3f} (busy {busy:.3f})"
        if base_eff is not None:
            detail += f"; jq-16 same runs: {base_eff:.3f} (busy {base_busy:.3f})"
        out.append(Target(name, f">= {CPU_TARGET}", eff, eff >= CPU_TARGET, detail))
    return out


def _redis_latency_target(trials: list[Trial], why_missing: WhyMissing) -> Target:
    lat = median_of(ok(trials, "latency", "pcq-redis"), "latency_median_ms")
    name = "latency median pcq-redis"
    goal = f"< {REDIS_LATENCY_TARGET_MS:g} ms"
    if lat is None:
        return Target(name, goal, None, None, why_missing("latency", "pcq-redis"))
    return Target(name, goal, lat, lat < REDIS_LATENCY_TARGET_MS, f"{lat:.3f} ms")


def _memory_targets(trials: list[Trial], why_missing: WhyMissing) -> list[Target]:
    out: list[Target] = []
    for system in ("pcq-local-1000", "pcq-redis"):
        runs = ok(trials, "memory", system)
        name = f"memory flat {system}"
        goal = f"peak RSS at max N <= {MEMORY_FLAT_RATIO:g} x at min N, every role"
        sizes = sorted({t["n"] for t in runs})
        if len(sizes) < 2:
            out.append(Target(name, goal, None, None, why_missing("memory", system)))
            continue
        small = _peak_by_role([t for t in runs if t["n"] == sizes[0]])
        big = _peak_by_role([t for t in runs if t["n"] == sizes[-1]])
        ratios = {r: big[r] / small[r] for r in ("producer", "consumer")
                  if r in big and r in small and small[r] > 0}
        worst = max(ratios.values()) if ratios else None
        detail = ", ".join(f"{r} {small[r] / 1024:.1f} -> {big[r] / 1024:.1f} MiB"
                           for r in ratios)
        out.append(Target(name, goal, worst,
                          None if worst is None else worst <= MEMORY_FLAT_RATIO, detail))
    return out


def _peak_by_role(trials: list[Trial]) -> dict[str, int]:
    peak: dict[str, int] = {}
    for t in trials:
        for role, kb in t["rss_kb"].items():
            peak[role] = max(peak.get(role, 0), kb)
    return peak


def summary(trials: list[Trial]) -> dict[str, Any]:
    """Medians per workload and system (what the tables show), for the JSON."""
    out: dict[str, Any] = {}
    for t in trials:
        key = f"{t['workload']}/{t['system']}" + (f"/{t['n']}" if t["workload"] == "memory"
                                                     else "")
        out.setdefault(key, {"workload": t["workload"], "system": t["system"],
                             "runs": 0, "ok": 0, "n": []})
        row = out[key]
        row["runs"] += 1
        row["ok"] += bool(t.get("ok"))
        row["n"] = sorted(set(row["n"]) | {t["n"]})
    for row in out.values():
        runs = [t for t in trials if t["workload"] == row["workload"]
                and t["system"] == row["system"] and t["n"] in row["n"] and t.get("ok")]
        for key in ("rate", "efficiency", "busy", "utilisation", "other_load_cores",
                    "steal_cores", "t1_s", "window_s", "wall_s", "latency_median_ms",
                    "latency_p99_ms", "latency_max_ms"):
            values = [t[key] for t in runs if t.get(key) is not None]
            if values:
                row[key] = {"median": statistics.median(values), "min": min(values),
                            "max": max(values)}
        if runs:
            row["peak_rss_kb"] = _peak_by_role(runs)
    return out


# ---------------------------------------------------------------- Markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _systems_in(trials: list[Trial], workload: str) -> list[str]:
    seen = {t["system"] for t in trials if t["workload"] == workload}
    return [s for s in SYSTEMS if s in seen]


def _status(trials: list[Trial], workload: str, system: str) -> str:
    runs = [t for t in trials if t["workload"] == workload and t["system"] == system]
    good = sum(bool(t.get("ok")) for t in runs)
    return f"{good}/{len(runs)}"


def _rows(trials: list[Trial], workload: str, unavailable: dict[str, str],
          cells: Callable[[list[Trial]], list[str]], width: int) -> list[list[str]]:
    rows = []
    for system in _systems_in(trials, workload):
        label = SYSTEMS[system].label
        runs = ok(trials, workload, system)
        if not runs:
            reason = unavailable.get(system) or _first_error(trials, workload, system)
            rows.append([label] + ["—"] * (width - 2) + [f"0 ({reason})"])
            continue
        rows.append([label, *cells(runs), _status(trials, workload, system)])
    return rows


def _first_error(trials: list[Trial], workload: str, system: str) -> str:
    for t in trials:
        if t["workload"] == workload and t["system"] == system and t.get("error"):
            return str(t["error"]).splitlines()[0][:120]
    return "not run"


def markdown(trials: list[Trial], tgts: list[Target], unavailable: dict[str, str],
             workers: int) -> str:
    parts: list[str] = []
    if any(t["workload"] == "noop" for t in trials):
        def noop_cells(runs: list[Trial]) -> list[str]:
            rates = [t["rate"] for t in runs]
            ns = sorted({t["n"] for t in runs})
            return [" / ".join(f"{n:,}" for n in ns), f"{statistics.median(rates):,.0f}",
                    f"{min(rates):,.0f} - {max(rates):,.0f}"]
        parts.append(f"**noop** (W={workers}; tasks/s = N / window, first put -> last ack)\n\n"
                     + _table(["system", "N", "tasks/s (median)", "range", "runs ok"],
                              _rows(trials, "noop", unavailable, noop_cells, 5)))
    if any(t["workload"] == "cpu" for t in trials):
        def cpu_cells(runs: list[Trial]) -> list[str]:
            eff = [t["efficiency"] for t in runs]
            return [f"{statistics.median(eff):.3f}", f"{min(eff):.3f} - {max(eff):.3f}",
                    f"{statistics.median(t['busy'] for t in runs):.3f}",
                    f"{statistics.median(t['utilisation'] for t in runs):.3f}",
                    f"{statistics.median(t['other_load_cores'] for t in runs):.2f}",
                    f"{1000 * statistics.median(t['t1_s'] for t in runs):.1f}",
                    f"{statistics.median(t['window_s'] for t in runs):.2f}"]
        n = next(t["n"] for t in trials if t["workload"] == "cpu")
        parts.append(f"**cpu** ({n} tasks, W={workers}; efficiency = {n} x t1 / (W x window)"
                     "; busy = time consumers spent in the handler / (W x window); "
                     "utilisation = consumers' CPU s / (W x window); other load = CPU "
                     "the rest of the machine used meanwhile, in cores)\n\n"
                     + _table(["system", "efficiency (median)", "range", "busy", "utilisation",
                               "other load", "t1 ms", "window s", "runs ok"],
                              _rows(trials, "cpu", unavailable, cpu_cells, 9)))
    if any(t["workload"] == "latency" for t in trials):
        def lat_cells(runs: list[Trial]) -> list[str]:
            return [f"{median_of(runs, 'latency_median_ms'):.3f}",
                    f"{median_of(runs, 'latency_p99_ms'):.3f}",
                    f"{max(t['latency_max_ms'] for t in runs):.2f}"]
        n = next(t["n"] for t in trials if t["workload"] == "latency")
        parts.append(f"**latency** (put -> handler start, {n} tasks one at a time, idle "
                     "queue; medians over runs)\n\n"
                     + _table(["system", "median ms", "p99 ms", "worst max ms", "runs ok"],
                              _rows(trials, "latency", unavailable, lat_cells, 5)))
    if any(t["workload"] == "memory" for t in trials):
        rows = []
        for system in _systems_in(trials, "memory"):
            for n in sorted({t["n"] for t in trials if t["workload"] == "memory"
                             and t["system"] == system}, reverse=True):
                runs = [t for t in ok(trials, "memory", system) if t["n"] == n]
                if not runs:
                    reason = unavailable.get(system) or _first_error(trials, "memory", system)
                    rows.append([SYSTEMS[system].label, f"{n:,}", "—", "—", "—", "—", reason])
                    continue
                peak = _peak_by_role(runs)
                rows.append([SYSTEMS[system].label, f"{n:,}",
                             *(_fmt(peak[r] / 1024 if r in peak else None, ".1f")
                               for r in ("producer", "consumer", "main")),
                             f"{statistics.median(t['rate'] for t in runs):,.0f}", "ok"])
        parts.append(f"**memory** (noop, maxsize 1000, W={workers}; peak RSS = VmHWM read "
                     "by each process as it exits, max per role, MiB)\n\n"
                     + _table(["system", "N", "producer", "consumer", "main (runs pcq.run)",
                               "tasks/s", "status"], rows))
    parts.append("**targets**\n\n" + _table(
        ["target", "goal", "measured", "verdict"],
        [[t.name, t.goal, t.detail, t.verdict] for t in tgts]))
    return "\n\n".join(parts) + "\n"


def targets_json(tgts: list[Target]) -> list[dict[str, Any]]:
    return [{**asdict(t), "verdict": t.verdict} for t in tgts]
