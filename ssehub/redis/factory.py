"""Which broker a config asks for: one Redis, Redis Sentinel, or Redis Cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..config import RedisConfig
from .cluster import ClusterBroker
from .pubsub import Broker, BrokerState
from .sentinel import SentinelBroker

__all__ = ["create_broker"]


def create_broker(
    config: RedisConfig,
    channels: Iterable[str | bytes],
    on_message: Callable[[bytes, bytes], None],
    on_state: Callable[[BrokerState, BrokerState], None] | None = None,
    sharded: Callable[[bytes], bool] | None = None,
) -> Broker:
    """The broker for ``config``; ``sharded`` tells a cluster which channels use SSUBSCRIBE."""
    if config.cluster:
        return ClusterBroker(config, channels, on_message, on_state, sharded)
    if config.sentinel is not None:
        return SentinelBroker(config, channels, on_message, on_state)
    return Broker(config, channels, on_message, on_state)
