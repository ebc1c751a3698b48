"""Jobs for the job-engine tests, addressed as ``tests/apps/engine_jobs.py:NAME``.

``produce_one_dies``: every producer yields ``EJ_N`` items ``[pid, n]``; the
first producer to claim ``EJ_OUT/died`` SIGKILLs itself after five items (a
crash, the OOM killer) — so of ``--producers 2``, exactly one dies.
``handle`` and ``forward`` do nothing and pass the item on; ``fails_on_seven``
raises for item 7.
"""

import os
import signal
import time


def produce_one_dies():
    n = int(os.environ.get("EJ_N", "20"))
    try:
        fd = os.open(os.path.join(os.environ["EJ_OUT"], "died"), os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        dies = False
    else:
        os.close(fd)
        dies = True
    for k in range(n):
        if dies and k == 5:
            time.sleep(0.2)  # what was put reaches the queue
            os.kill(os.getpid(), signal.SIGKILL)
        yield [os.getpid(), k]


def forward(item):
    return item


def handle(item):
    return None
