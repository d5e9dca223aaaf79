"""Start and stop: the event loop, the listener, the broker task, signals and reload."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import resource
import signal
import socket

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import Config, ConfigError, load
from .http.admin import create_admin_app
from .http.app import create_app
from .http.compat import QuietBadRequests, connections, request_in_progress
from .http.control import CONTROL, ControlCollector
from .http.metrics import Metrics
from .hub.hub import Hub
from .hub.sessions import Roster, random_prefix
from .logs import enable_access_log, fields
from .redis.control import ControlPlane
from .redis.events import EventsWriter
from .redis.factory import create_broker, create_control, create_stream_reader, create_writer
from .redis.pubsub import Broker, BrokerState
from .redis.streams import StreamSource
from .supervisors.systemd import Notifier

__all__ = ["RESTART_ONLY", "HubServer", "reload_hub", "run", "serve"]

log = logging.getLogger(__name__)


def _listen_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # workers: one listening socket each on the node's port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


# aiohttp logs every request it cannot parse with a traceback: one DEBUG line instead.
_quiet_bad_requests = QuietBadRequests(log)


class HubServer:
    """One hub process: hub + broker + HTTP listener. ``start()``/``stop()`` from code or tests."""

    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        *,
        hub: Hub | None = None,
        broker: Broker | None = None,
        streams: StreamSource | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        # A worker brings its own hub and "broker" (the node's feed: see supervisors/feed.py).
        self.hub = Hub(config) if hub is None else hub
        self.broker = broker or create_broker(
            config.redis,
            self.hub.redis_channels(),
            self.hub.publish,
            self._on_redis_state,
            sharded=self.hub.sharded,
        )
        self._reuse_port = reuse_port
        self.hub.broker = self.broker  # family members subscribe and unsubscribe through it
        # Events and presence: written by this process, unless it is a worker (whose
        # roster reports to the node's main process instead: see supervisors/worker.py).
        self.reporter: EventsWriter | None = None
        if hub is None:
            self.reporter = create_writer(config, random_prefix())
            self.hub.roster = Roster(self.reporter, config.events.enabled)
        # Stream channels: one reader for all of them (it connects once one is wanted);
        # with Redis Cluster, one per slot in use, on the master owning it; a worker
        # brings its own stream side (main reads: see supervisors/worker.py).
        self.streams: StreamSource = streams or create_stream_reader(
            config.redis,
            self.hub.stream_entries,
            self.hub.stream_started,
            self.hub.stream_prefill,
            self._on_streams_state,
            self.hub.stream_maxlen,
        )
        self.streams.want(self.hub.stream_keys())
        self.hub.streams = self.streams
        # systemd's notify socket (a no-op outside systemd): READY=1 waits for Redis.
        self.notifier = Notifier() if notifier is None else notifier
        self._ready_sent = False
        self.app = create_app(self.hub, self.broker)
        # The control channel (disconnects, refusals): one listener per node, here
        # unless this is a worker (main listens and feeds it the commands).
        self.control = self.app[CONTROL]
        self.plane: ControlPlane | None = None
        if hub is None:
            self.plane = create_control(config, self.control)
            self.control.on_refuse = self.plane.refuse
        if config.logging.access_log:  # off by default: a line per request is noise at scale
            enable_access_log(self.app)
        server_log = logging.getLogger("aiohttp.server")
        if _quiet_bad_requests not in server_log.filters:
            server_log.addFilter(_quiet_bad_requests)
        limits = config.limits
        # handler_cancellation: a client that goes away cancels its handler, which
        # is how a stream learns of the disconnect at once (run_app and the test
        # server default differently, so it is set here explicitly).
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            # No per-connection keep-alive timer (a TimerHandle per stream, re-armed
            # every period): the hub-wide sweep below closes idle connections.
            keepalive_timeout=0,
            access_log=None,  # logging.access_log: see enable_access_log
            shutdown_timeout=config.shutdown_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
        )
        self._broker_task: asyncio.Task[None] | None = None
        self._streams_task: asyncio.Task[None] | None = None
        self._control_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._unfinished: set[RequestHandler] = set()
        self.port = 0
        # The admin listener and its metrics exist only when configured, so a hub
        # without one does not even observe the delay histogram.
        self.metrics: Metrics | None = None
        self._admin_runner: web.AppRunner | None = None
        self.admin_port = 0
        if config.admin is not None:
            self.metrics = Metrics(self.hub, self.broker, self.reporter)
            self.metrics.registry.register(ControlCollector(self.control, self.plane))
            self._admin_runner = web.AppRunner(
                create_admin_app(self.hub, self.broker, self.metrics, self.control, self.plane),
                access_log=None,
                shutdown_timeout=config.shutdown_timeout,
            )

    def status(self) -> str:
        """One line for ``systemctl status``."""
        return f"connections={self.hub.connections} redis={self.broker.state.value}"

    @property
    def ready(self) -> bool:
        """Serving, subscribed to every pub/sub channel and reading every stream."""
        return self.hub.upstream_ready

    def _on_streams_state(self, old: BrokerState, new: BrokerState) -> None:
        # Nothing was lost on stream channels: the reader goes on from its positions.
        self._check_ready()

    def _check_ready(self) -> None:
        # Ready means serving *and* subscribed: a hub without Redis would accept
        # streams that never carry an event, so systemd must not count it started.
        if self.ready and not self._ready_sent:
            self._ready_sent = True
            log.info("ready", extra=fields(port=self.port, channels=len(self.hub.channels)))
            self.notifier.notify_ready(self.status())
        else:
            self.notifier.notify_status(self.status())

    def _on_redis_state(self, old: BrokerState, new: BrokerState) -> None:
        if new is BrokerState.DOWN:
            # Members no browser holds would only be resubscribed for nothing (and
            # their history has a hole now): drop them before the next session.
            self.hub.drop_idle_members()
        if old is BrokerState.DOWN and new is BrokerState.UP:
            # What Redis published while we were away is gone: say so in-band.
            self.hub.signal_outage()
        self._check_ready()

    async def _start_admin(self) -> None:
        admin = self.config.admin
        if admin is None or self._admin_runner is None:
            return
        await self._admin_runner.setup()
        sock = _listen_socket(admin.host, admin.port)
        self.admin_port = sock.getsockname()[1]
        await web.SockSite(self._admin_runner, sock).start()
        log.info("admin listening", extra=fields(host=admin.host, port=self.admin_port))

    async def start(self) -> None:
        """Listen, subscribe, start the heartbeat. Returns once the socket is bound."""
        await self._runner.setup()
        listen = self.config.listen
        sock = _listen_socket(listen.host, listen.port, self._reuse_port)
        self.port = sock.getsockname()[1]
        # A large backlog so a reconnect storm of thousands queues instead of failing.
        site = web.SockSite(self._runner, sock, backlog=4096)
        await site.start()
        await self._start_admin()
        self._broker_task = asyncio.create_task(self.broker.run(), name="ssehub-broker")
        self._streams_task = asyncio.create_task(self.streams.run(), name="ssehub-streams")
        if self.plane is not None:
            self._control_task = asyncio.create_task(self.plane.run(), name="ssehub-control")
        self.hub.start_heartbeat()
        if self.reporter is not None:
            self.reporter.start()
        self._schedule_sweep()
        self.notifier.start(self.status)
        log.info("listening", extra=fields(host=self.config.listen.host, port=self.port))

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.config.limits.request_timeout, self._sweep)

    def _sweep(self) -> None:
        """Close connections that sent no complete request for a whole period.

        aiohttp has no header-read timeout, so a client trickling a request (or
        idling between requests) would hold its socket forever. One timer for all
        connections: a connection seen without a request in progress in two
        consecutive sweeps is closed, i.e. after one to two ``request_timeout``.
        """
        # Re-armed first, as the heartbeat is: whatever happens below (an aiohttp
        # upgrade breaking what aiohttp_compat reads), the guard does not stop for good.
        self._schedule_sweep()
        now_idle = {h for h in connections(self._runner) if not request_in_progress(h)}
        for handler in now_idle & self._unfinished:
            handler.force_close()
        self._unfinished = now_idle - self._unfinished

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP); keep running on the old one if it is invalid."""
        self.notifier.notify_reloading()
        try:
            return self._reload()
        finally:
            if self._ready_sent:
                self.notifier.notify_ready(self.status())
            else:  # not ready before the reload (Redis never answered): still not
                self.notifier.notify_status(self.status())

    def _reload(self) -> bool:
        new = reload_hub(self.hub, self.config)
        if new is None:
            return False
        self.config = new
        return True

    async def stop(self) -> None:
        """Stop accepting, end every stream cleanly, close Redis."""
        self.notifier.notify_stopping()
        self.hub.stop_heartbeat()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Stops the listener first, then ends streams (app.on_shutdown), then waits
        # up to shutdown_timeout for handlers before cancelling what is left.
        await self._runner.cleanup()
        if self.reporter is not None:  # every stream's unsubscribe is queued by now
            await self.reporter.close(self.config.shutdown_timeout)
        # After the public side: metrics and readiness stay readable while streams drain.
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        for task in (self._broker_task, self._streams_task, self._control_task):
            if task is not None:
                await _cancel(task)
        self._broker_task = self._streams_task = self._control_task = None
        self.notifier.close()
        log.info("stopped")


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


def reload_hub(hub: Hub, config: Config) -> Config | None:
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
            channels=len(new.channels),
            added=",".join(added) or "-",
            removed=",".join(removed) or "-",
            changed=",".join(changed) or "-",
        ),
    )
    return new


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again should it go on: a
    cancel can be lost in a race with what the task awaited (asyncio.wait_for on
    3.11), and a stop must never hang on it."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


def _raise_fd_limit() -> None:
    # Every subscriber is a socket; use all the descriptors the system allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = HubServer(config)
    # Before start(): once "listening" is logged, a SIGHUP must not kill the process.
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await server.start()
    # Everything allocated so far lives as long as the process: keep it out of
    # the collector's way, so full collections only walk per-connection objects.
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
        log.info("shutting down", extra=fields(connections=server.hub.connections))
    finally:
        await server.stop()


def run(config: Config) -> None:
    """Blocking entry point used by the CLI."""
    _raise_fd_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
