"""The classic multiprocessing program, as people write it, with one line that
makes the queue: the standard library's, or pcq's on the local backend or on Redis.

    python classic_joinable.py stdlib|local|redis OUTDIR [--kill ITEM] [--url URL --name NAME]
        [--start fork|spawn|forkserver]

A producer process puts N items and joins the queue; 16 consumer processes get
and task_done until a None (and break on it without task_done, as the classic
ones do); the parent joins the producer, puts one None per consumer and joins
the consumers.  Each consumer appends what it handled to OUTDIR/<pid>.  With
``--kill ITEM`` the first consumer to get ITEM SIGKILLs itself before it handles
it (between get() and task_done()); the standard library's program then hangs
in the producer's join() for ever.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time

import pcq

N = 200
CONSUMERS = 16


def make_queue(kind: str, url: str, name: str) -> object:
    """The one line that differs."""
    if kind == "stdlib":
        return multiprocessing.JoinableQueue(16)
    if kind == "local":
        return pcq.JoinableQueue(16)
    return pcq.JoinableQueue(16, url=url, name=name, heartbeat_ttl=1)


class Producer(multiprocessing.Process):
    def __init__(self, queue, n):
        super().__init__()
        self.queue = queue
        self.n = n

    def run(self):
        for i in range(self.n):
            self.queue.put(i)
        self.queue.join()


class Consumer(multiprocessing.Process):
    def __init__(self, queue, outdir, kill):
        super().__init__()
        self.queue = queue
        self.outdir = outdir
        self.kill = kill

    def run(self):
        while True:
            item = self.queue.get()
            if item is None:
                break
            if item == self.kill and self.first_to_die():
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.001)  # the work
            with open(os.path.join(self.outdir, str(os.getpid())), "a") as out:
                out.write(f"{item}\n")
            self.queue.task_done()

    def first_to_die(self):
        try:
            os.close(os.open(os.path.join(self.outdir, "killed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["stdlib", "local", "redis"])
    parser.add_argument("outdir")
    parser.add_argument("--kill", type=int, default=-1)
    parser.add_argument("--url", default="")
    parser.add_argument("--name", default="classic")
    parser.add_argument("--start", default="fork")
    args = parser.parse_args()
    multiprocessing.set_start_method(args.start)

    queue = make_queue(args.kind, args.url, args.name)
    producer = Producer(queue, N)
    consumers = [Consumer(queue, args.outdir, args.kill) for _ in range(CONSUMERS)]
    for process in [*consumers, producer]:
        process.start()
    producer.join()
    for _ in consumers:
        queue.put(None)
    for consumer in consumers:
        consumer.join()
    codes = sorted(str(p.exitcode) for p in [producer, *consumers])
    print("exit codes", " ".join(codes), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
