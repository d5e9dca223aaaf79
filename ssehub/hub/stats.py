"""The hub's counters: plain numbers and Counters, read by the metrics collector at scrape
time (never on the hot path)."""

from __future__ import annotations

from collections import Counter

__all__ = ["Stats"]


class Stats:
    """Plain counters, shared by every part of the hub."""

    __slots__ = (
        "closed",
        "delivered",
        "evicted",
        "gaps",
        "members_dropped",
        "members_refused",
        "opened",
        "received",
        "redis_replays",
        "rejected",
        "replays",
        "slow_cut",
        "stream_errors",
    )

    def __init__(self) -> None:
        # "per channel" counters are keyed by Channel.label: a family counts as one.
        self.received: Counter[str] = Counter()  # per channel
        self.rejected: Counter[tuple[str, str]] = Counter()  # (channel, reason)
        self.delivered = 0  # event writes to subscribers
        self.opened: Counter[str] = Counter()  # per channel
        self.closed: Counter[str] = Counter()  # per reason
        self.slow_cut = 0
        self.replays: Counter[str] = Counter()  # per channel: resumes served from history
        # per stream channel: resumes older than the cache, read from Redis
        self.redis_replays: Counter[str] = Counter()
        self.gaps: Counter[str] = Counter()  # per channel: clients told they missed events
        self.members_refused: Counter[str] = Counter()  # per family: over limits.max_members
        self.members_dropped: Counter[str] = Counter()  # per family: grace period over
        self.evicted: Counter[tuple[str, str]] = Counter()  # (channel, reason): history drops
        # per channel: streams Redis refused to read (a key that holds no stream)
        self.stream_errors: Counter[str] = Counter()
