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
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .app import create_app
from .broker import Broker, BrokerState
from .config import Config, ConfigError, load
from .hub import Hub

__all__ = ["HubServer", "run", "serve"]

log = logging.getLogger(__name__)


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse at ERROR with a traceback, so any
    client could fill the logs. A malformed request is the client's problem and
    already got its 4xx: log it on one line at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("bad request status=%s reason=%s", exc.code, exc.message)
            return False
        return True


_quiet_bad_requests = _QuietBadRequests()


class HubServer:
    """One hub process: hub + broker + HTTP listener. ``start()``/``stop()`` from code or tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hub = Hub(config)
        self.broker = Broker(
            config.redis, self.hub.redis_channels(), self.hub.publish, self._on_redis_state
        )
        self.app = create_app(self.hub, self.broker)
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
            access_log=None,
            shutdown_timeout=config.shutdown_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
        )
        self._broker_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._unfinished: set[RequestHandler] = set()
        self.port = 0

    def _on_redis_state(self, old: BrokerState, new: BrokerState) -> None:
        if old is BrokerState.DOWN and new is BrokerState.UP:
            # What Redis published while we were away is gone: say so in-band.
            self.hub.signal_outage()

    async def start(self) -> None:
        """Listen, subscribe, start the heartbeat. Returns once the socket is bound."""
        await self._runner.setup()
        sock = _listen_socket(self.config.listen.host, self.config.listen.port)
        self.port = sock.getsockname()[1]
        # A large backlog so a reconnect storm of thousands queues instead of failing.
        site = web.SockSite(self._runner, sock, backlog=4096)
        await site.start()
        self._broker_task = asyncio.create_task(self.broker.run(), name="ssehub-broker")
        self.hub.start_heartbeat()
        self._schedule_sweep()
        log.info("listening host=%s port=%d", self.config.listen.host, self.port)

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
        server = self._runner.server
        if server is not None:
            now_idle = {h for h in server.connections if h._current_request is None}
            for handler in now_idle & self._unfinished:
                handler.force_close()
            self._unfinished = now_idle - self._unfinished
        self._schedule_sweep()

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP); keep running on the old one if it is invalid."""
        try:
            new = load(self.config.source)
        except ConfigError as exc:
            log.error("reload rejected, still running the previous config: %s", exc)
            return False
        if new.listen != self.config.listen or new.redis != self.config.redis:
            log.warning("reload: listen and redis changes take effect on restart only")
            new = dataclasses.replace(new, listen=self.config.listen, redis=self.config.redis)
        added, removed, changed = self.hub.reload(new)
        self.broker.set_channels(self.hub.redis_channels())
        self.config = new
        log.info(
            "reloaded channels=%d added=%s removed=%s changed=%s",
            len(new.channels),
            ",".join(added) or "-",
            ",".join(removed) or "-",
            ",".join(changed) or "-",
        )
        return True

    async def stop(self) -> None:
        """Stop accepting, end every stream cleanly, close Redis."""
        self.hub.stop_heartbeat()
        if self._sweeper is not None:
            self._sweeper.cancel()
        # Stops the listener first, then ends streams (app.on_shutdown), then waits
        # up to shutdown_timeout for handlers before cancelling what is left.
        await self._runner.cleanup()
        if self._broker_task is not None:
            self._broker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broker_task
            self._broker_task = None
        log.info("stopped")


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
        log.info("shutting down connections=%d", server.hub.connections)
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
