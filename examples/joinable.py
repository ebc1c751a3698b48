"""The classic multiprocessing program, unchanged but for the line that makes
the queue: ``pcq.JoinableQueue`` instead of ``multiprocessing.JoinableQueue``.

    python examples/joinable.py                      # local: one machine, no server
    PCQ_URL=redis://127.0.0.1:6379/0 python examples/joinable.py   # on Redis, by name

A producer puts 20 sausages and joins the queue; 4 consumers eat until their
``None``; the parent puts one ``None`` per consumer and joins them.  Kill a
consumer with ``kill -9`` while it eats: on pcq its sausage goes to another
consumer and the program still ends (the standard library's would hang in the
producer's ``join()``).
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pcq

CONSUMERS = 4


class Producer(multiprocessing.Process):
    def __init__(self, queue: pcq.JoinableQueue) -> None:
        super().__init__()
        self.queue = queue

    def run(self) -> None:
        for i in range(20):
            self.queue.put(("sausage", i))
        self.queue.join()  # every sausage eaten
        print("producer: all 20 eaten", flush=True)


class Consumer(multiprocessing.Process):
    def __init__(self, queue: pcq.JoinableQueue) -> None:
        super().__init__()
        self.queue = queue

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                break
            time.sleep(0.05)  # eating
            print(f"consumer {os.getpid()} ate {item[0]} {item[1]}", flush=True)
            self.queue.task_done()


def main() -> None:
    url = os.environ.get("PCQ_URL")
    # The one line that changes:
    queue = pcq.JoinableQueue(16, url=url, name="sausages") if url else pcq.JoinableQueue(16)
    producer = Producer(queue)
    consumers = [Consumer(queue) for _ in range(CONSUMERS)]
    for p in [producer, *consumers]:
        p.start()
    producer.join()
    for _ in consumers:
        queue.put(None)
    for c in consumers:
        c.join()


if __name__ == "__main__":
    main()
