"""``/metrics``: every queue's counters in the Prometheus text format.

One series per queue, labelled ``queue`` and nothing else, with the numbers
``pcq status --json`` gives at that moment: counters
``pcq_tasks_{produced,done,failed,retried}_total`` and gauges
``pcq_tasks_ready``, ``pcq_tasks_in_flight``, ``pcq_tasks_pending``,
``pcq_dead_letters``, ``pcq_consumers``, ``pcq_producers``.

The exposition is prometheus-client's (a custom collector on a private
registry, so no process or platform metrics of the dashboard itself get mixed
in); it is an optional dependency: ``pip install 'pcq[metrics]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from pcq.backends.base import Counters
from pcq.errors import ConfigError

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError:  # the page works without it; /metrics says what to install
    CollectorRegistry = None  # type: ignore[assignment,misc]

#: What /metrics answers when prometheus-client is missing.
MISSING = "pcq: /metrics needs prometheus-client: pip install 'pcq[metrics]'"

#: (metric name, Counters field, help); counters get ``_total`` in the output.
COUNTERS = (
    ("pcq_tasks_produced", "produced", "Tasks put on the queue."),
    ("pcq_tasks_done", "done", "Tasks handled successfully."),
    ("pcq_tasks_failed", "failed", "Tasks that ended without success after their retries."),
    ("pcq_tasks_retried", "retried", "Failed attempts that were retried."),
)
GAUGES = (
    ("pcq_tasks_ready", "ready", "Tasks waiting to be taken (retries due included)."),
    ("pcq_tasks_in_flight", "in_flight", "Tasks taken by a consumer, not yet acknowledged."),
    ("pcq_tasks_pending", "pending", "Tasks put and not yet acknowledged."),
    ("pcq_dead_letters", "dead", "Dead letters waiting in the queue."),
    ("pcq_consumers", "consumers", "Live consumers."),
    ("pcq_producers", "producers", "Live producers."),
)


def available() -> bool:
    return CollectorRegistry is not None


class QueueCollector:
    """A prometheus-client collector that reads ``read()`` at each scrape:
    [(queue name, Counters), ...]."""

    def __init__(self, read: Callable[[], list[tuple[str, Counters]]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        rows = self.read()
        families: list[Any] = []
        for name, field, text in COUNTERS:
            family = CounterMetricFamily(name, text, labels=["queue"])
            for queue, c in rows:
                family.add_metric([queue], getattr(c, field))
            families.append(family)
        for name, field, text in GAUGES:
            gauge = GaugeMetricFamily(name, text, labels=["queue"])
            for queue, c in rows:
                gauge.add_metric([queue], getattr(c, field))
            families.append(gauge)
        yield from families


class Exposition:
    """``render()`` gives the text of one scrape; raises what ``read`` raises."""

    def __init__(self, read: Callable[[], list[tuple[str, Counters]]]) -> None:
        if CollectorRegistry is None:
            raise ConfigError(MISSING)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(QueueCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
