"""Where the time goes between a put and a handler, hop by hop (local backend).

    python -m benchmarks.hops latency [--tasks 500]   # idle queue, one task at a time
    python -m benchmarks.hops cpu [--tasks 400]       # ~20 ms tasks, the gap between two
    python -m benchmarks.hops cold                    # the same small code, warm and cold

A diagnostic, not a benchmark: it wraps the local wire's send/receive and the
broker's read/give (in this process, before ``pcq.run.run`` forks, so every
process inherits the wrappers) and has each process append ``tag time cpu`` to
a file of its own.  Each mark costs ~3 us (one write), so the figures are a
little high; the split between hops is what it is for.

latency, per task:  P0 yield -> P1 producer sends the put -> B1 broker reads
  -> B2 broker sent the lease -> C1 consumer has it -> H handler starts;
  "cpu" = CPU seconds the process used within the hop (all its threads).
cpu, per consumer:  E handler ends -> S ack-and-take sent -> R reply read
  -> H next handler starts; the gaps are what ``busy`` misses.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import select
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchmarks import tasks

_DIR = tempfile.mkdtemp(prefix="pcq-hops-")
_fds: dict[int, int] = {}


def mark(tag: str) -> None:
    t, cpu = time.monotonic(), time.process_time()
    fd = _fds.get(os.getpid())
    if fd is None:
        path = os.path.join(_DIR, str(os.getpid()))
        fd = _fds[os.getpid()] = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    os.write(fd, f"{tag} {t!r} {cpu!r}\n".encode())


def _instrument() -> None:
    from pcq.backends import local_broker, local_wire

    send, receive = local_wire.send, local_wire.receive
    broker = local_broker.Broker
    read, give = broker._read, broker._give

    def send_marked(sock: Any, data: bytes, point: str = "") -> None:
        mark("P1" if point == "put" else "S")
        send(sock, data, point)

    def receive_marked(sock: Any, point: str = "") -> Any:
        reply = receive(sock, point)
        if point == "take" and reply and reply[1]:
            mark("C1")
        return reply

    def read_marked(self: Any, conn: Any) -> None:
        mark("B1")
        read(self, conn)

    def give_marked(self: Any, conn: Any, ledger: Any, max_tasks: int) -> bool:
        given = give(self, conn, ledger, max_tasks)
        if given:
            mark("B2")
        return given

    local_wire.send, local_wire.receive = send_marked, receive_marked
    broker._read, broker._give = read_marked, give_marked  # type: ignore[method-assign]


def _events() -> list[tuple[float, str, float, int]]:
    out = []
    for path in glob.glob(os.path.join(_DIR, "*")):
        pid = int(os.path.basename(path))
        with open(path) as f:
            out += [(float(t), tag, float(c), pid) for tag, t, c in (ln.split() for ln in f)]
        os.unlink(path)
    return sorted(out)


def _us(values: list[float]) -> str:
    return f"median {1e6 * statistics.median(values):7.1f} us"


def latency(count: int) -> None:
    from pcq.run import run

    reply_r, reply_w = os.pipe()

    def produce() -> Iterator[float]:
        time.sleep(0.3)  # every consumer waiting
        for _ in range(count + 20):
            sent_at = time.monotonic()
            mark("P0")
            yield sent_at
            select.select([reply_r], [], [], 10)
            os.read(reply_r, 1)
            time.sleep(0.002)  # as the latency workload: the queue idle at each put

    def handle(_: float) -> None:
        mark("H")
        os.write(reply_w, b"x")

    run(produce, handle, workers=2, maxsize=1000, backend="local")
    order = ["P0", "P1", "B1", "B2", "C1", "H"]
    rows: list[dict[str, tuple[float, float]]] = []
    for t, tag, cpu, _ in _events():
        if tag == "P0":
            rows.append({"P0": (t, cpu)})
        elif rows and tag in order and tag not in rows[-1]:
            # The first of each after P0: B2 is marked after the broker's send
            # returns, so the consumer's C1 may come before it.
            rows[-1][tag] = (t, cpu)
    rows = [r for r in rows[20:] if len(r) == len(order)]
    print(f"latency: {len(rows)} tasks with every mark")
    for a, b in itertools.pairwise(order):
        line = f"  {a}->{b}: {_us([r[b][0] - r[a][0] for r in rows])}"
        if (a, b) in (("P0", "P1"), ("B1", "B2"), ("C1", "H")):  # one process
            line += f", cpu {_us([r[b][1] - r[a][1] for r in rows])}"
        print(line)
    print(f"  P0->H: {_us([r['H'][0] - r['P0'][0] for r in rows])}")


def cpu(count: int) -> None:
    from pcq.run import run

    k = tasks.calibrate_spin(0.02)

    def produce() -> Iterator[int]:
        mark("FIRST")
        yield from [k] * count

    def handle(k: int) -> None:
        mark("H")
        tasks.spin(k)
        mark("E")

    run(produce, handle, workers=2, maxsize=1000, backend="local")
    events = _events()
    for pid in sorted({p for _, tag, _, p in events if tag == "H"}):
        mine = [(t, tag) for t, tag, _, p in events if p == pid]
        starts = [t for t, tag in mine if tag == "H"]
        ends = [t for t, tag in mine if tag == "E"]
        hops: dict[str, list[float]] = {"E->S": [], "S->R": [], "R->H": []}
        for end, start in zip(ends, starts[1:], strict=False):
            between = [(t, tag) for t, tag in mine if end < t < start]
            sent = next(t for t, tag in between if tag == "S")
            got = next(t for t, tag in between if tag == "C1" and t > sent)
            hops["E->S"].append(sent - end)
            hops["S->R"].append(got - sent)
            hops["R->H"].append(start - got)
        busy = sum(e - s for s, e in zip(starts, ends, strict=False))
        gaps = [s - e for e, s in zip(ends, starts[1:], strict=False)]
        print(f"consumer {pid}: {len(starts)} tasks, handler {busy:.3f} s, gaps {sum(gaps):.3f} s "
              f"({_us(gaps)}, max {1e3 * max(gaps):.1f} ms); "
              + "; ".join(f"{h} {_us(v)} (sum {sum(v):.3f} s)" for h, v in hops.items()))


def cold(count: int) -> None:
    """Time one small piece of queue-like Python code (a short loop, a msgpack
    frame, two syscalls) run back to back, after a 2 ms sleep, and after 20 ms
    of spinning: every hop of a task runs code that just went cold."""
    import msgpack

    def work() -> None:
        x: list[int] = []
        for _ in range(20):
            x.append(len(x))
        msgpack.packb([1, "q", [b"x" * 60], 1])
        os.getpid()
        time.time()

    k = tasks.calibrate_spin(0.02)
    for name, before in (("warm", lambda: None), ("after sleep(2 ms)", lambda: time.sleep(0.002)),
                         ("after 20 ms of spin()", lambda: tasks.spin(k))):
        took = []
        for _ in range(count):
            before()
            t = time.perf_counter()
            work()
            took.append(time.perf_counter() - t)
        print(f"{name:>22}: {_us(took)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["latency", "cpu", "cold"])
    p.add_argument("--tasks", type=int, default=0, help="tasks (default 500 / 400)")
    args = p.parse_args()
    _instrument()
    try:
        if args.what == "latency":
            latency(args.tasks or 500)
        elif args.what == "cold":
            cold(args.tasks or 200)
        else:
            cpu(args.tasks or 400)
    finally:
        for path in glob.glob(os.path.join(_DIR, "*")):
            os.unlink(path)
        os.rmdir(_DIR)


if __name__ == "__main__":
    main()
