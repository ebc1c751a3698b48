"""A pipeline's queues: their names, and opening them on one server.

``pcq.run(produce, fetch, parse, save, workers=[16, 4, 1])`` runs ``produce``
into the first queue; ``fetch`` consumes it and its outputs go to the second
queue, ``parse`` consumes that, and so on; ``save``, the last stage, keeps
nothing.  How such a job runs and ends, stage after stage, is the job
engine's (:mod:`pcq.job`); this module only says where its queues are.

Queue names: the first stage reads ``queue``; stage ``k`` (1-based, k >= 2)
reads ``{queue}.k`` — on Redis all of a pipeline's queues share the hash tag
``{queue}``, so they live in one Cluster slot, as the atomic outputs-and-ack
script needs (a ``queue`` that already holds a tag keeps it: ``{crawl}.k``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pcq.backends import open_queue
from pcq.backends.base import Queue


def stage_queue(queue: str, stage: int) -> str:
    """The name of the queue that stage ``stage`` (0-based) reads."""
    if stage == 0:
        return queue
    return f"{queue}.{stage + 1}" if "{" in queue else f"{{{queue}}}.{stage + 1}"


def stage_name(handle: Callable[..., Any]) -> str:
    """A stage's name in progress lines and summaries: its handler's."""
    return str(getattr(handle, "__name__", None) or type(handle).__name__)


def open_stages(backend: str | None, url: str | None, queue: str, maxsizes: list[int],
                **options: Any) -> list[Queue]:
    """The input queue of each stage (one per entry of ``maxsizes``), all on the
    server of the first: a stage's outputs and its acks are one atomic step.
    If one cannot be opened, those already open are disposed of."""
    first = open_queue(backend, url=url, name=queue, maxsize=maxsizes[0], **options)
    queues = [first]
    try:
        for k in range(1, len(maxsizes)):
            queues.append(first.sibling(stage_queue(queue, k), maxsize=maxsizes[k]))
    except BaseException:
        for q in reversed(queues):
            q.dispose()
        raise
    return queues
