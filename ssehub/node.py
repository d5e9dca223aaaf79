"""One node, assembled from a Config: the hub, its upstream sources, the events and
presence writer, metrics and the admin listener -- and the owner of their tasks.

Both process models build their node here, so that a topology or a feature added
once works in both: the single process (``server.py`` under ``supervisors/single.py``)
and the main process of ``workers: N`` (``supervisors/multiprocess.py``) build the
same sources from the ``redis`` config; a worker builds the same node with one
difference, where its entries come from: the node's feed (``Feed``) stands where the
Redis sources stand, and its streams' comings and goings go to main, which writes
them for the node.

A node's owner hears what the hub does not tell by itself through a ``Listener``:
the sources' states (readiness, systemd's status, the workers' feed) and, for the
workers' feed, each stream's position.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from aiohttp import web

from .config import Config, ConfigError, load
from .core.control import Command, Refuse
from .core.ids import random_prefix
from .http.admin import create_admin_app
from .http.app import TASKS
from .http.compat import headers_before_routing
from .http.control import ControlCollector
from .http.metrics import Metrics
from .hub.control import Control
from .hub.hub import Hub, Tap
from .hub.sessions import Roster, Sink
from .logs import fields
from .redis.cluster_streams import ClusterStreamReader
from .redis.control import ControlPlane
from .redis.events import EventsWriter
from .redis.factory import create_broker, create_control, create_stream_reader, create_writer
from .redis.pubsub import Broker, BrokerState, PubSubSource
from .redis.streams import Entry as StreamEntry
from .redis.streams import StreamReader, StreamSource
from .tasks import Tasks

__all__ = ["RESTART_ONLY", "Feed", "Listener", "Node", "listen_socket", "reload_config"]

log = logging.getLogger(__name__)

# Settings a reload cannot change: they take effect on restart only.
RESTART_ONLY = (
    "listen",
    "redis",
    "admin",
    "logging",
    "shutdown_timeout",
    "workers",
    "events",
    "presence",
    "control",
)


def listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking TCP socket; an error names the address it could not take."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # workers: one listening socket each on the node's port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def check_backlog(backlog: int) -> None:
    """Warn when the kernel queues fewer connections than ``listen.backlog`` asks:
    Linux silently caps a listening socket's backlog at ``net.core.somaxconn``."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            cap = int(f.read())
    except (OSError, ValueError):
        return  # not Linux, or not readable here: nothing known to warn about
    if backlog > cap:
        log.warning(
            "listen.backlog capped by the kernel: raise net.core.somaxconn",
            extra=fields(backlog=backlog, somaxconn=cap),
        )


class Listener:
    """What a node's owner hears besides the hub's own changes (each a no-op here)."""

    def redis_state(self, old: BrokerState, new: BrokerState) -> None:
        """The pub/sub source went from ``old`` to ``new`` (the node reacted already)."""

    def streams_state(self, old: BrokerState, new: BrokerState) -> None:
        """The stream reader went from ``old`` to ``new``."""

    def stream_at(self, key: bytes, position: str, started: bool) -> None:
        """The reader read stream ``key`` up to ``position`` (``started``: it just began)."""

    def control_message(self, command: Command) -> None:
        """A control message came in (the node's own streams had it already)."""

    def refusals_read(self, refusals: list[Refuse]) -> None:
        """Refused reconnects were read from Redis (the node keeps them already)."""


class Feed(Protocol):
    """A worker's upstream: the node's feed, standing where the Redis sources stand."""

    @property
    def broker(self) -> PubSubSource: ...
    @property
    def streams(self) -> StreamSource: ...
    @property
    def sink(self) -> Sink: ...


class Node:
    """The parts of one node and their tasks; ``start()``/``stopping()``/``close()``.

    ``feed``: a worker's node, fed by main (no Redis source, no writer of its own).
    ``tap``: told of every numbered change (main's feed to its workers).
    ``metrics``: builds the admin listener's registry (main's sums its workers').
    """

    def __init__(
        self,
        config: Config,
        *,
        hub: Hub | None = None,
        feed: Feed | None = None,
        listener: Listener | None = None,
        tap: Tap | None = None,
        metrics: Callable[[Node], Metrics] | None = None,
    ) -> None:
        self.config = config
        self.tasks = Tasks()
        self.hub = hub = Hub(config) if hub is None else hub
        self.listener = Listener() if listener is None else listener
        self.reporter: EventsWriter | None = None
        self.broker: PubSubSource
        self.streams: StreamSource
        # The node's subscriber and stream reader, where it reads Redis (not in a worker).
        self.subscriber: Broker | None = None
        self.reader: StreamReader | ClusterStreamReader | None = None
        if feed is None:
            self.broker = self.subscriber = create_broker(
                config.redis,
                hub.redis_channels(),
                hub.publish,
                self._on_redis_state,
                sharded=hub.sharded,
            )
            # Stream channels: one reader for all of them (it connects once one is
            # wanted); with Redis Cluster, one per slot in use, on the master owning it.
            self.streams = self.reader = create_stream_reader(
                config.redis,
                self._stream_entries,
                self._stream_started,
                hub.stream_prefill,
                self._on_streams_state,
                hub.stream_maxlen,
                on_failed=hub.stream_failed,
            )
            # Events and presence: written by the process that owns the node's Redis
            # side, under a node id random per start.
            self.reporter = create_writer(config, random_prefix())
            sink: Sink = self.reporter
        else:
            self.broker, self.streams, sink = feed.broker, feed.streams, feed.sink
        # The control plane (disconnects, refusals, limits per user and lifetime): this
        # process's streams and, where the node reads Redis, the control channel (on
        # the same subscription). A worker's commands come from main through the feed.
        self.control = Control(lambda: self.config)
        self.plane: ControlPlane | None = None
        if feed is None:
            self.plane = create_control(config, self)
            self.control.on_refuse = self.plane.refuse
            hub.on_control = self.plane.on_message
        # Family members subscribe and unsubscribe through the sources.
        hub.broker = self.broker
        hub.streams = self.streams
        self.streams.want(hub.stream_keys())
        hub.roster = Roster(sink, config.events.enabled)
        if tap is not None:
            hub.tap = tap
        # Metrics exist only where they are read (the admin listener; a worker's answers
        # to main's scrape), so a hub without them does not even observe the delays.
        self.metrics: Metrics | None = None
        if config.admin is not None or feed is not None:
            if metrics is None:
                self.metrics = Metrics(hub, self.broker, self.reporter)
                self.metrics.registry.register(ControlCollector(self.control, self.plane))
            else:  # (main's sums its own control counters with the workers')
                self.metrics = metrics(self)
        self.admin: web.Application | None = None
        self._admin_runner: web.AppRunner | None = None
        self.admin_port = 0
        if config.admin is not None and self.metrics is not None:
            self.admin = create_admin_app(hub, self.broker, self.metrics, self.control, self.plane)
            self.admin[TASKS] = self.tasks
            self._admin_runner = web.AppRunner(
                self.admin, access_log=None, shutdown_timeout=config.shutdown_timeout
            )

    @property
    def ready(self) -> bool:
        """Every task alive, subscribed to every pub/sub channel, reading every stream."""
        return self.tasks.failed is None and self.hub.upstream_ready

    # --- the sources' callbacks ----------------------------------------------------------

    # --- the control plane's target ------------------------------------------------------

    def apply(self, command: Command) -> int:
        """A control message: this process's streams, then the owner (main: the workers')."""
        ended = self.control.apply(command)
        self.listener.control_message(command)
        return ended

    def load(self, refusals: list[Refuse]) -> None:
        """Refusals read from Redis (at start, after the listener reconnected)."""
        self.control.load(refusals)
        self.listener.refusals_read(refusals)

    def _on_redis_state(self, old: BrokerState, new: BrokerState) -> None:
        if new is BrokerState.DOWN:
            # Members no browser holds would only be resubscribed for nothing (and
            # their history has a hole now): drop them before the next session.
            self.hub.drop_idle_members()
        if old is BrokerState.DOWN and new is BrokerState.UP:
            # What Redis published while we were away is gone: say so in-band.
            self.hub.signal_outage()
        if self.plane is not None:  # subscribed (again): read the refusals
            self.plane.on_state(old, new)
        self.listener.redis_state(old, new)

    def _on_streams_state(self, old: BrokerState, new: BrokerState) -> None:
        # Nothing was lost on stream channels: the reader goes on from its positions.
        self.listener.streams_state(old, new)

    def _stream_started(self, key: bytes, entries: list[StreamEntry]) -> None:
        """The reader knows where ``key`` ends: its recent entries, then its position."""
        self.hub.stream_started(key, entries)
        self.listener.stream_at(key, entries[-1][0].decode() if entries else "0-0", True)

    def _stream_entries(self, key: bytes, entries: list[StreamEntry]) -> None:
        self.hub.stream_entries(key, entries)
        # The stream's position, also past entries the hub rejected (one call per batch).
        self.listener.stream_at(key, entries[-1][0].decode(), False)

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the admin listener, start the sources, the writer and the hub's timers."""
        admin = self.config.admin
        if admin is not None and self._admin_runner is not None:
            await self._admin_runner.setup()
            headers_before_routing(self._admin_runner)
            sock = listen_socket(admin.host, admin.port)
            self.admin_port = sock.getsockname()[1]
            await web.SockSite(self._admin_runner, sock).start()
            log.info("admin listening", extra=fields(host=admin.host, port=self.admin_port))
        self.tasks.spawn(self.broker.run(), "ssehub-broker")
        self.tasks.spawn(self.streams.run(), "ssehub-streams")
        if self.reporter is not None:
            self.reporter.start(self.tasks)
        self.hub.start_heartbeat()
        self.control.start()

    def stopping(self) -> None:
        """The process stops: no more timers, and tasks ending is expected from now on."""
        self.tasks.stopping()
        self.hub.stop_heartbeat()
        self.control.stop()

    async def close(self) -> None:
        """After the owner's streams drained: write what is queued, close the admin
        listener (metrics and readiness stay readable while streams drain), then Redis."""
        self.stopping()
        if self.reporter is not None:  # every stream's unsubscribe is queued by now
            try:
                await self.reporter.close(self.config.shutdown_timeout)
            except Exception:  # the rest of the stop must happen all the same
                if self.tasks.failed is None:  # (else its task's failure was logged)
                    log.exception("events writer failed at shutdown")
                    self.tasks.fail("ssehub-events-writer")
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.plane is not None:
            await self.plane.close()
        await self.tasks.close()

    def reload(self) -> bool:
        """Re-read the config file into the hub (SIGHUP); keep the old one if it is invalid."""
        new = reload_config(self.hub, self.config)
        if new is None:
            return False
        self.config = new
        return True


def reload_config(hub: Hub, config: Config) -> Config | None:
    """Re-read ``config``'s file into ``hub``: the new config, or None (logged) if invalid."""
    try:
        new = load(config.source)
    except ConfigError as exc:
        log.error(
            "reload rejected, still running the previous config", extra=fields(error=str(exc))
        )
        return None
    pending = [k for k in RESTART_ONLY if getattr(new, k) != getattr(config, k)]
    if pending:
        log.warning(
            "reload: these changes take effect on restart only",
            extra=fields(keys=",".join(pending)),
        )
        new = dataclasses.replace(new, **{k: getattr(config, k) for k in RESTART_ONLY})
    # The hub switches and updates its Redis subscriptions (which never raises: a
    # connection that fails meanwhile resubscribes from the hub's wanted set).
    added, removed, changed = hub.reload(new)
    log.info(
        "reloaded",
        extra=fields(
            **new.counts(),
            added=",".join(added) or "-",
            removed=",".join(removed) or "-",
            changed=",".join(changed) or "-",
        ),
    )
    return new
