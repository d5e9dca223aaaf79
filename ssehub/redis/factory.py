"""Every Redis role the hub needs, for one Redis, Redis Sentinel or Redis Cluster.

The one way into the Redis layer: callers (the single process, a workers' main
process, a worker) ask here for a role and never build a client or a connection
themselves, so a topology supported once is supported by every role and process
model. The roles:

- ``create_broker``: the pub/sub source (``Broker``; ``SentinelBroker``;
  ``ClusterBroker``, sharded pub/sub over one connection per master);
- ``create_stream_reader``: the stream reader (``StreamReader``; with Cluster a
  ``ClusterStreamReader``, one reader per slot in use on its master);
- ``create_replays``: the replay reader (``XRANGE`` pages for resuming clients, in
  processes that do not read the streams themselves: workers);
- ``create_writer``: the events/presence writer (one per node);
- ``create_presence_reader``: presence queries;
- ``create_control``: the control channel's commands and the refusals' store;
- ``create_publisher``: ``POST /publish``'s PUBLISH/SPUBLISH/XADD (idempotent on demand).

Every role is inert until its ``run()``/``start()`` or first use: building one opens
no connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..config import Config, RedisConfig
from .cluster import ClusterBroker
from .cluster_streams import ClusterStreamReader
from .control import ControlPlane, Target
from .events import EventsWriter, PresenceReader
from .publish import Publisher
from .pubsub import Broker, BrokerState
from .sentinel import SentinelBroker
from .streams import Entry, StreamReader, StreamReplays

__all__ = [
    "create_broker",
    "create_control",
    "create_presence_reader",
    "create_publisher",
    "create_replays",
    "create_stream_reader",
    "create_writer",
]

StateListener = Callable[[BrokerState, BrokerState], None]


def create_broker(
    config: RedisConfig,
    channels: Iterable[str | bytes],
    on_message: Callable[[bytes, bytes], None],
    on_state: StateListener | None = None,
    sharded: Callable[[bytes], bool] | None = None,
) -> Broker:
    """The pub/sub source; ``sharded`` tells a cluster which channels use SSUBSCRIBE."""
    if config.cluster:
        return ClusterBroker(config, channels, on_message, on_state, sharded)
    if config.sentinel is not None:
        return SentinelBroker(config, channels, on_message, on_state)
    return Broker(config, channels, on_message, on_state)


def create_stream_reader(
    config: RedisConfig,
    on_entries: Callable[[bytes, list[Entry]], None],
    on_start: Callable[[bytes, list[Entry]], None],
    prefill: Callable[[bytes], int],
    on_state: StateListener | None = None,
    maxlen: Callable[[bytes], int] = lambda key: 0,
    *,
    on_failed: Callable[[bytes, str], None] | None = None,
) -> StreamReader | ClusterStreamReader:
    """The stream reader: it connects once a stream is wanted (``want``).

    ``on_failed(key, reason)``: Redis refused to read ``key`` (not a stream: a name a
    client chose); the reader dropped it, and its streams must end.
    """
    reader = ClusterStreamReader if config.cluster else StreamReader
    return reader(config, on_entries, on_start, prefill, on_state, maxlen, on_failed=on_failed)


def create_replays(config: RedisConfig) -> StreamReplays:
    """The replay reader for a process that does not read the streams (a worker)."""
    return StreamReplays(config)


def create_writer(config: Config, node: str) -> EventsWriter:
    """The node's events/presence writer; ``node`` is its id, random per start."""
    return EventsWriter(config, node)


def create_presence_reader(config: RedisConfig) -> PresenceReader:
    """Presence queries (count and members of a channel)."""
    return PresenceReader(config)


def create_publisher(config: RedisConfig) -> Publisher:
    """``POST /publish``'s sender (its connections open on first use)."""
    return Publisher(config)


def create_control(config: Config, target: Target) -> ControlPlane:
    """The node's control plane (its messages come through the node's subscription)."""
    return ControlPlane(config, target)
