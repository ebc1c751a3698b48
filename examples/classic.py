"""The classic pattern, class style: subclass Producer and Consumer, start them,
join them, close the queue.  Unlike a bare JoinableQueue, None is a valid task,
and a consumer that dies does not make join() hang.

    python examples/classic.py
"""

import pcq


class Numbers(pcq.Producer):
    def produce(self):
        yield None  # a real task, not a sentinel
        yield from range(1, 10)


class Printer(pcq.Consumer):
    def handle(self, item):
        print(f"{self.name} got {item!r}", flush=True)


if __name__ == "__main__":
    queue = pcq.open_queue("local", maxsize=16)
    producer = Numbers(queue)
    consumers = [Printer(queue) for _ in range(4)]
    for process in [producer, *consumers]:
        process.start()
    producer.join()
    queue.close()  # one sentinel per live consumer (already done by the last producer)
    for consumer in consumers:
        consumer.join()
    queue.join()
    print("all alive?", any(p.is_alive() for p in [producer, *consumers]))
    print(queue.counters())
    queue.dispose()
