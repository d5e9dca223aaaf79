"""Start and stop: the event loop, the listener, the broker task and signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket

from aiohttp import web

from .admin import create_admin_app
from .app import create_app
from .broker import Broker, BrokerState
from .config import Config
from .hub import Hub
from .logs import enable_access_log
from .metrics import Metrics
from .systemd import Notifier

__all__ = ["HubServer", "run"]

log = logging.getLogger(__name__)


def _listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class HubServer:
    """One hub process: hub + broker + HTTP listener. ``start()``/``stop()`` from code or tests."""

    def __init__(
        self,
        config: Config,
        shutdown_timeout: float = 10.0,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.hub = Hub(config)
        self.broker = Broker(
            config.redis,
            self.hub.redis_channels(),
            self.hub.publish,
            on_state=self._on_broker_state,
        )
        # systemd's notify socket (a no-op outside systemd): READY=1 waits for Redis.
        self.notifier = Notifier() if notifier is None else notifier
        self._ready_sent = False
        self.app = create_app(self.hub, self.broker)
        if config.logging.access_log:  # off by default: a line per request is noise at scale
            enable_access_log(self.app)
        # handler_cancellation: a client that goes away cancels its handler, which
        # is how a stream learns of the disconnect at once (run_app and the test
        # server default differently, so it is set here explicitly).
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,  # logging.access_log: see enable_access_log
            shutdown_timeout=shutdown_timeout,
        )
        self._broker_task: asyncio.Task[None] | None = None
        self.port = 0
        # The admin listener and its metrics exist only when configured, so a hub
        # without one does not even observe the delay histogram.
        self.metrics: Metrics | None = None
        self._admin_runner: web.AppRunner | None = None
        self.admin_port = 0
        if config.admin is not None:
            self.metrics = Metrics(self.hub, self.broker)
            self._admin_runner = web.AppRunner(
                create_admin_app(self.hub, self.broker, self.metrics),
                access_log=None,
                shutdown_timeout=shutdown_timeout,
            )

    async def start(self) -> None:
        """Listen, subscribe, start the heartbeat. Returns once the socket is bound."""
        await self._runner.setup()
        sock = _listen_socket(self.config.listen.host, self.config.listen.port)
        self.port = sock.getsockname()[1]
        # A large backlog so a reconnect storm of thousands queues instead of failing.
        site = web.SockSite(self._runner, sock, backlog=4096)
        await site.start()
        await self._start_admin()
        self._broker_task = asyncio.create_task(self.broker.run(), name="ssehub-broker")
        self.hub.start_heartbeat()
        self.notifier.start(self.status)
        log.info("listening host=%s port=%d", self.config.listen.host, self.port)

    def status(self) -> str:
        """One line for ``systemctl status``."""
        return f"connections={self.hub.connections} redis={self.broker.state.value}"

    def _on_broker_state(self, state: BrokerState) -> None:
        # Ready means serving *and* subscribed: a hub without Redis would accept
        # streams that never carry an event, so systemd must not count it started.
        if state is BrokerState.UP and not self._ready_sent:
            self._ready_sent = True
            log.info("ready port=%d channels=%d", self.port, len(self.hub.channels))
            self.notifier.notify_ready(self.status())
        else:
            self.notifier.notify_status(self.status())

    async def _start_admin(self) -> None:
        admin = self.config.admin
        if admin is None or self._admin_runner is None:
            return
        await self._admin_runner.setup()
        sock = _listen_socket(admin.host, admin.port)
        self.admin_port = sock.getsockname()[1]
        await web.SockSite(self._admin_runner, sock).start()
        log.info("admin listening host=%s port=%d", admin.host, self.admin_port)

    async def stop(self) -> None:
        """Stop accepting, end every stream cleanly, close Redis."""
        self.notifier.notify_stopping()
        self.hub.stop_heartbeat()
        await self._runner.cleanup()
        # After the public side: metrics and readiness stay readable while streams drain.
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._broker_task is not None:
            self._broker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broker_task
            self._broker_task = None
        self.notifier.close()
        log.info("stopped")


def _raise_fd_limit() -> None:
    # Every subscriber is a socket; use all the descriptors the system allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = HubServer(config)
    await server.start()
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
