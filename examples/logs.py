"""A three-stage pipeline: find the errors in a pile of log files and store them.

    files   ──read (a generator: one output per error line, none for a clean file)──►
    lines   ──parse (a plain function: one record per line)──►
    records ──store (one worker: a single SQLite writer)

On one host:

    pcq run examples/logs.py:produce examples/logs.py:read examples/logs.py:parse \\
        examples/logs.py:store --workers 4,2,1

Across hosts, with a redis-server at $PCQ_URL (the queues share the hash tag
{logs}, so this also works on a Redis Cluster):

    pcq consume examples/logs.py:read  --queue logs --to '{logs}.lines'          # hosts A, B
    pcq consume examples/logs.py:parse --queue '{logs}.lines' --to '{logs}.records'
    pcq consume examples/logs.py:store --queue '{logs}.records' --workers 1
    pcq produce examples/logs.py:produce --queue logs

From Python: ``python examples/logs.py`` runs the same pipeline with
``pcq.run`` and then counts errors per service with ``pcq.map``.  The log files
are made up on first use under $LOGS_DIR (default: a temp dir), $LOGS_FILES of
them (default 200); the database is $LOGS_DB (default: errors.sqlite3 in that dir).
"""

import json
import os
import random
import sqlite3
import tempfile
from pathlib import Path

import pcq

DIR = Path(os.environ.get("LOGS_DIR", Path(tempfile.gettempdir()) / "pcq-example-logs"))
DB = Path(os.environ.get("LOGS_DB", DIR / "errors.sqlite3"))
SERVICES = ["api", "auth", "billing", "search", "mailer"]
FILES = int(os.environ.get("LOGS_FILES", "200"))


def _make_logs(files=FILES, lines=500):
    """Invent some log files, about 1 line in 50 an error."""
    DIR.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for i in range(files):
        path = DIR / f"{SERVICES[i % len(SERVICES)]}-{i:04d}.log"
        if path.exists():
            continue
        with path.open("w") as f:
            for n in range(lines):
                level = "ERROR" if rng.random() < 0.02 else "INFO"
                f.write(f"2024-05-01T12:{n // 60 % 60:02d}:{n % 60:02d} {level} "
                        f"request {rng.randrange(10**6)} took {rng.randrange(900)} ms\n")


def produce():
    _make_logs()
    for path in sorted(DIR.glob("*.log")):
        yield str(path)


def read(path):
    """Stage 1 — a generator: zero or more outputs per file."""
    service = Path(path).name.split("-")[0]
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if " ERROR " in line:
                yield [service, path, number, line.rstrip("\n")]


def parse(item):
    """Stage 2 — a plain function: exactly one output per line."""
    service, path, number, line = item
    when, level, *words = line.split()
    return {"service": service, "file": path, "line": number, "at": when, "level": level,
            "message": " ".join(words)}


def store(record):
    """Stage 3 — the sink: one worker, so one SQLite writer."""
    with sqlite3.connect(DB) as db:
        db.execute("CREATE TABLE IF NOT EXISTS errors (file TEXT, line INTEGER, "
                   "service TEXT, record TEXT, PRIMARY KEY (file, line))")
        # The handoff between stages is exactly once, but a handler may run
        # again if its worker dies mid-task: make the sink idempotent.
        db.execute("INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?)",
                   (record["file"], record["line"], record["service"], json.dumps(record)))


def count_errors(service):
    with sqlite3.connect(DB) as db:
        return service, db.execute("SELECT COUNT(*) FROM errors WHERE service = ?",
                                   (service,)).fetchone()[0]


if __name__ == "__main__":
    summary = pcq.run(produce, read, parse, store, workers=[4, 2, 1])
    for stage in summary.stages:
        print(f"{stage.name:>6}: {stage.produced} in, {stage.done} done, {stage.failed} failed")
    for service, errors in pcq.map(count_errors, SERVICES, workers=2, ordered=True):
        print(f"{service:>8}: {errors} errors")
