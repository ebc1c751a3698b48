"""Failures on purpose: every seventh task raises, to see retries and dead letters.

    pcq run examples/flaky.py:produce examples/flaky.py:handle --retries 2
    # exits 1: the tasks that kept failing are counted failed (and, on Redis,
    # kept in the dead-letter list: `pcq dead list`).
"""


def produce():
    yield from range(50)


def handle(n):
    if n % 7 == 0:
        raise ValueError(f"task {n} is unlucky")
