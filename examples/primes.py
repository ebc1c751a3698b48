"""A CPU-bound job that spreads well over many hosts: count the primes in ranges.

    pcq run examples/primes.py:produce examples/primes.py:handle --workers 4
    # or across hosts, with a redis-server at $PCQ_URL:
    pcq consume examples/primes.py:handle --workers 4        # on every worker host
    pcq produce examples/primes.py:produce                    # on one host
"""

import os

RANGES = int(os.environ.get("PRIMES_RANGES", "200"))
WIDTH = int(os.environ.get("PRIMES_WIDTH", "20000"))


def produce():
    for start in range(0, RANGES * WIDTH, WIDTH):
        yield [start, start + WIDTH]


def is_prime(n):
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def handle(task):
    start, stop = task
    return sum(1 for n in range(start, stop) if is_prime(n))
