"""A pipeline whose second stage is slow and whose second queue holds 2 tasks,
so the first stage's acks wait in the broker for room (issue #20 item 3).
Run as a script: ``python tests/apps/parking.py OUT``; it prints the job's
summary as JSON.  The slow stage touches ``OUT/slow-started`` at its first task.
"""

import json
import sys
import time
from pathlib import Path

import pcq

OUT = Path(sys.argv[1]) if __name__ == "__main__" else Path(".")


def produce():
    yield from range(100_000)


def forward(x):
    return x


def slow(x):
    marker = OUT / "slow-started"
    if not marker.exists():
        marker.touch()
    time.sleep(0.05)


if __name__ == "__main__":
    # A long grace: a stop that had to wait for it would show in the time taken.
    summary = pcq.run(produce, forward, slow, workers=[2, 1], maxsize=[1000, 2], grace=30)
    print(json.dumps({"exit_code": summary.exit_code, "elapsed_s": summary.elapsed_s,
                      "stages": [[s.produced, s.done] for s in summary.stages]}))
