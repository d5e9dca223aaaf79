"""Prometheus metrics, read from the hub's plain counters at scrape time.

The hot path only bumps plain ints and ``Counter`` entries (once per message, never
per subscriber); this collector turns them into metric families when ``/metrics`` is
scraped, so metrics cost nothing between scrapes. The one live instrument is the
delivery-delay histogram, observed once per flush.

Each ``HubServer`` gets its own ``CollectorRegistry`` rather than the global one, so
several hubs in one process (tests) do not clash. With worker processes, each worker
would run this same collector over its own counters and the admin listener would
merge them (prometheus-client's multiprocess mode, or summing the workers' scrapes):
nothing here assumes it is the only process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..core.history import REASONS
from ..hub.hub import Hub
from ..redis.pubsub import BrokerState, PubSubSource

if TYPE_CHECKING:
    from ..redis.events import EventsWriter

__all__ = ["CLOSE_REASONS", "DELAY_BUCKETS", "HubCollector", "Metrics", "ReporterCollector"]

# Every reason a stream can end for, reported even at zero so that rate() and
# alerts work before the first occurrence.
CLOSE_REASONS = (
    "client_gone",
    "slow",
    "shutdown",
    "limit",
    "channel_removed",
    "stream_error",
    "disconnect",
    "lifetime",
)

# Seconds from a message's arrival from Redis to its write to the subscribers:
# normally well under a millisecond (one loop iteration), so the buckets are fine there.
DELAY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class HubCollector(Collector):
    """Metric families built from ``hub.stats``, the channels and the broker on each scrape."""

    def __init__(self, hub: Hub, broker: PubSubSource) -> None:
        self.hub = hub
        self.broker = broker

    def collect(self) -> Iterable[Metric]:
        """Yield every family; labels come only from configured channels and fixed reasons."""
        hub, stats = self.hub, self.hub.stats
        # Labels: the config's channel and family names, never a member's name.
        names = sorted(hub.config.channels)
        streams: Counter[str] = Counter()
        for ch in hub.channels.values():
            streams[ch.label] += len(ch)

        total = GaugeMetricFamily("ssehub_connections", "Open event streams, all channels.")
        total.add_metric([], hub.connections)
        yield total

        per_channel = GaugeMetricFamily(
            "ssehub_channel_connections", "Open event streams per channel.", labels=["channel"]
        )
        for name in names:
            per_channel.add_metric([name], streams[name])
        yield per_channel

        families = sorted(n for n, c in hub.config.channels.items() if c.family)
        for kind, name, doc, counts in (
            (
                GaugeMetricFamily,
                "ssehub_family_members",
                "Live members per family (subscribed in Redis, with browsers or in grace).",
                hub.members,
            ),
            (
                CounterMetricFamily,
                "ssehub_family_members_refused",
                "New members turned away over limits.max_members, per family.",
                stats.members_refused,
            ),
            (
                CounterMetricFamily,
                "ssehub_family_members_dropped",
                "Members unsubscribed after their grace period, per family.",
                stats.members_dropped,
            ),
        ):
            family = kind(name, doc, labels=["family"])
            for member_family in families:
                family.add_metric([member_family], counts[member_family])
            yield family

        yield _per_channel(
            "ssehub_connections_opened",
            "Event streams opened per channel.",
            names,
            stats.opened,
        )

        closed = CounterMetricFamily(
            "ssehub_connections_closed", "Event streams ended, by reason.", labels=["reason"]
        )
        for reason in _with_known(stats.closed, CLOSE_REASONS):
            closed.add_metric([reason], stats.closed[reason])
        yield closed

        yield _per_channel(
            "ssehub_stream_errors",
            "Stream channels (or members) whose key Redis refused to read, per channel.",
            names,
            stats.stream_errors,
        )

        yield _per_channel(
            "ssehub_messages_received",
            "Messages received from Redis per channel.",
            names,
            stats.received,
        )

        rejected = CounterMetricFamily(
            "ssehub_messages_rejected",
            "Messages from Redis not delivered, by channel and reason.",
            labels=["channel", "reason"],
        )
        for (channel, reason), n in sorted(stats.rejected.items()):
            rejected.add_metric([channel, reason], n)
        yield rejected

        delivered = CounterMetricFamily(
            "ssehub_events_delivered", "Event writes to subscribers (events x subscribers)."
        )
        delivered.add_metric([], stats.delivered)
        yield delivered

        slow = CounterMetricFamily(
            "ssehub_slow_subscribers_cut", "Subscribers disconnected for not reading."
        )
        slow.add_metric([], stats.slow_cut)
        yield slow

        yield _per_channel(
            "ssehub_replays", "Resumes served from history per channel.", names, stats.replays
        )
        yield _per_channel(
            "ssehub_stream_replays",
            "Stream channel resumes older than the hub's cache, read from Redis.",
            names,
            stats.redis_replays,
        )
        yield _per_channel(
            "ssehub_gaps", "Clients told they missed events, per channel.", names, stats.gaps
        )

        evicted = CounterMetricFamily(
            "ssehub_history_evicted",
            "Events dropped from history, by channel and bound (count, bytes, age, hub).",
            labels=["channel", "reason"],
        )
        for name in names:
            for reason in REASONS:
                evicted.add_metric([name, reason], stats.evicted.get((name, reason), 0))
        yield evicted

        kept = GaugeMetricFamily("ssehub_history_bytes", "Encoded bytes kept in all histories.")
        kept.add_metric([], hub.budget.bytes)
        yield kept

        up = GaugeMetricFamily("ssehub_redis_up", "1 while subscribed to every Redis channel.")
        up.add_metric([], 1 if self.broker.ready else 0)
        yield up

        state = GaugeMetricFamily(
            "ssehub_redis_state",
            "Redis subscription state (1 for the current one).",
            labels=["state"],
        )
        for s in BrokerState:
            state.add_metric([s.value], 1 if self.broker.state is s else 0)
        yield state

        reconnects = CounterMetricFamily(
            "ssehub_redis_reconnects", "Redis subscription sessions established after the first."
        )
        reconnects.add_metric([], self.broker.reconnects)
        yield reconnects


def _with_known(counter: Iterable[str], known: Iterable[str]) -> list[str]:
    return sorted(set(known) | set(counter))


def _per_channel(
    name: str, doc: str, channels: list[str], counter: dict[str, int]
) -> CounterMetricFamily:
    # Only configured channels become labels: cardinality is bounded by the config.
    family = CounterMetricFamily(name, doc, labels=["channel"])
    for channel in channels:
        family.add_metric([channel], counter.get(channel, 0))
    return family


class ReporterCollector(Collector):
    """The subscribe/unsubscribe events and presence writer's counters (issue 16)."""

    def __init__(self, reporter: EventsWriter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterable[Metric]:
        """Events published to Redis, dropped while Redis was away, and pipelines sent."""
        r = self.reporter
        for name, doc, value in (
            (
                "ssehub_roster_events_published",
                "Subscribe/unsubscribe events published.",
                r.published,
            ),
            ("ssehub_roster_events_dropped", "Events dropped while Redis was away.", r.dropped),
            ("ssehub_roster_batches", "Pipelines of events and presence writes sent.", r.batches),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


class Metrics:
    """One hub's registry: the scrape-time collector plus the delivery-delay histogram."""

    def __init__(
        self, hub: Hub, broker: PubSubSource, reporter: EventsWriter | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(HubCollector(hub, broker))
        if reporter is not None:
            self.registry.register(ReporterCollector(reporter))
        self.delay = Histogram(
            "ssehub_delivery_delay_seconds",
            "Seconds from a message's arrival from Redis to its write to the subscribers.",
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )
        # Called by the hub once per flush, never per subscriber.
        hub.observe_delay = self.delay.observe

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric, in the format the scraper's Accept header asks for; and its type.

        Without an Accept header this is the classic text format 0.0.4, which every
        Prometheus version reads; Prometheus itself asks for OpenMetrics.
        """
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
