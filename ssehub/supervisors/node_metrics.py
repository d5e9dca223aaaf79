"""A node of workers in one scrape: main's Redis and parsing counters, the workers' sums.

Workers serve the streams, so most families are theirs: main asks each one for its
counters when scraped (``gather``) and sums them. A dead worker's counters stay in the
totals (``fold``), so that they never go back; its gauges go with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..http.metrics import HubCollector, Metrics, ReporterCollector
from ..hub.hub import Hub
from ..redis.events import EventsWriter
from ..redis.pubsub import PubSubSource
from .slots import Slot

__all__ = ["NodeCollector", "NodeMetrics"]

# Metric families the main process counts (Redis, parsing, members); the rest is summed
# over the workers, which serve the streams.
_MAIN_OWNED = frozenset(
    {
        "ssehub_family_members",
        "ssehub_family_members_refused",
        "ssehub_family_members_dropped",
        "ssehub_messages_received",
        "ssehub_messages_rejected",
        "ssehub_stream_errors",
        "ssehub_redis_up",
        "ssehub_redis_state",
        "ssehub_redis_reconnects",
    }
)

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class NodeMetrics(Metrics):
    """The admin listener's registry for a node of workers (see ``NodeCollector``)."""

    def __init__(  # no super(): no local histogram
        self,
        slots: Sequence[Slot],
        ask: Callable[[Slot], None],
        hub: Hub,
        broker: PubSubSource,
        writer: EventsWriter,
        local: Collector | None = None,
    ) -> None:
        self.slots = slots
        # Main's own counters of families the workers count too (the control plane's:
        # POST /publish and /disconnect are served here), added to their sums.
        self._local = local
        self._ask = ask  # sends a worker the request for its counters
        # Counters of workers that died, so that the node's totals never go back.
        self._dead: dict[str, tuple[str, str, dict[SampleKey, float]]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(self, HubCollector(hub, broker)))
        self.registry.register(ReporterCollector(writer))

    @web.middleware
    async def fresh(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The admin app's middleware: ``/metrics`` answers with the workers' counters now."""
        if request.path == "/metrics":
            await self.gather()
        return await handler(request)

    async def gather(self, timeout: float = 2.0) -> None:
        """Ask every worker for its counters (the answers land in ``slot.stats``)."""
        loop = asyncio.get_running_loop()
        waiters = []
        for slot in self.slots:
            if slot.link is not None and slot.ready:
                slot.stats_waiter = loop.create_future()
                waiters.append(slot.stats_waiter)
                self._ask(slot)
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)

    def fold(self, slot: Slot) -> None:
        """Keep a dead worker's counters in the node's totals (gauges go with it)."""
        for metric in slot.stats:
            if metric.type == "gauge":
                continue
            _, _, sums = self._dead.setdefault(metric.name, (metric.documentation, metric.type, {}))
            _add_samples(sums, metric)
        slot.stats = []

    def merged(self) -> dict[str, Metric]:
        """The workers' families summed: live workers' values plus dead workers' counters."""
        sums: dict[str, tuple[str, str, dict[SampleKey, float]]] = {
            name: (doc, kind, dict(samples)) for name, (doc, kind, samples) in self._dead.items()
        }
        local = list(self._local.collect()) if self._local is not None else []
        for metric in local:
            _, _, acc = sums.setdefault(metric.name, (metric.documentation, metric.type, {}))
            _add_samples(acc, metric)
        for slot in self.slots:
            if slot.link is None:
                continue
            for metric in slot.stats:
                _, _, acc = sums.setdefault(metric.name, (metric.documentation, metric.type, {}))
                _add_samples(acc, metric)
        out = {}
        for name, (doc, kind, samples) in sums.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            out[name] = metric
        return out


def _add_samples(acc: dict[SampleKey, float], metric: Metric) -> None:
    for s in metric.samples:
        if s.name.endswith("_created"):
            continue  # a creation time is no count: it cannot be summed
        key = (s.name, tuple(sorted(s.labels.items())))
        acc[key] = acc.get(key, 0.0) + s.value


class NodeCollector(Collector):
    """The node in one scrape: main's Redis and parsing counters, the workers' sums."""

    def __init__(self, metrics: NodeMetrics, main: HubCollector) -> None:
        self._metrics = metrics
        self._main = main

    def collect(self) -> Iterable[Metric]:
        merged = self._metrics.merged()
        for metric in self._main.collect():
            theirs = merged.pop(metric.name, None)
            yield metric if theirs is None or metric.name in _MAIN_OWNED else theirs
        yield from merged.values()  # the delivery-delay histogram
        slots = self._metrics.slots
        workers = GaugeMetricFamily("ssehub_workers", "Worker processes serving.")
        workers.add_metric([], sum(1 for s in slots if s.ready))
        yield workers
        restarts = CounterMetricFamily("ssehub_worker_restarts", "Workers restarted after exiting.")
        restarts.add_metric([], sum(s.restarts for s in slots))
        yield restarts
        per = GaugeMetricFamily(
            "ssehub_worker_connections", "Open event streams per worker.", labels=["worker"]
        )
        for s in slots:
            per.add_metric([str(s.index)], _connections(s))
        yield per


def _connections(slot: Slot) -> float:
    """A worker's open streams: from its scrape answer when there is one, else its pong."""
    if slot.link is None:
        return 0
    for metric in slot.stats:
        if metric.name == "ssehub_connections":
            return float(metric.samples[0].value)
    return slot.connections
