"""One hub process's server: a node (see node.py) and its public HTTP listener.

``HubServer`` does not know which supervisor runs it (uvicorn's ``Server`` is the
model): the single process (``supervisors/single.py``) runs one with a node that reads
Redis, each worker (``supervisors/worker.py``) one whose node is fed by main.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import Config
from .http.app import TASKS, create_app
from .http.collector import Collector
from .http.compat import (
    QuietBadRequests,
    connections,
    headers_before_routing,
    request_in_progress,
)
from .http.metrics import Metrics
from .hub.control import Control
from .hub.hub import Hub
from .logs import enable_access_log, fields
from .node import Listener, Node, check_backlog, listen_socket
from .redis.control import ControlPlane
from .redis.events import EventsWriter
from .redis.pubsub import BrokerState, PubSubSource
from .redis.streams import StreamSource
from .tasks import Tasks

__all__ = ["HubServer", "Notify"]

log = logging.getLogger(__name__)


class Notify(Protocol):
    """Whom the server tells that it is ready, reloading or stopping: its supervisor's
    link to systemd (``supervisors/systemd.Notifier``), given by the supervisor."""

    def notify_ready(self, status: str | None = None) -> None: ...
    def notify_status(self, status: str) -> None: ...
    def notify_reloading(self) -> None: ...
    def notify_stopping(self) -> None: ...
    def start(self, status: Callable[[], str], alive: Callable[[], bool] | None = None) -> None: ...
    def close(self) -> None: ...


class _Unsupervised:
    """No one to tell (code, tests, a worker: only the node's main process notifies)."""

    def notify_ready(self, status: str | None = None) -> None:
        pass

    def notify_status(self, status: str) -> None:
        pass

    def notify_reloading(self) -> None:
        pass

    def notify_stopping(self) -> None:
        pass

    def start(self, status: Callable[[], str], alive: Callable[[], bool] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


# aiohttp logs every request it cannot parse with a traceback: one DEBUG line instead.
_quiet_bad_requests = QuietBadRequests(log)


class HubServer(Listener):
    """One hub process: a node + the public HTTP listener. ``start()``/``stop()`` from
    code or tests; ``node``: a node built elsewhere (a worker's, fed by main)."""

    def __init__(
        self,
        config: Config,
        notifier: Notify | None = None,
        *,
        node: Node | None = None,
        reuse_port: bool = False,
    ) -> None:
        if node is None:
            node = Node(config, listener=self)
        else:
            node.listener = self
        self.node = node
        self._reuse_port = reuse_port
        # systemd's notify socket, when the supervisor gives it: READY=1 waits for Redis.
        self.notifier: Notify = _Unsupervised() if notifier is None else notifier
        self._ready_sent = False
        self.app = create_app(self.hub, self.broker, node.control)
        self.app[TASKS] = self.tasks
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
        self._sweeper: asyncio.TimerHandle | None = None
        # The garbage collector's policy: the supervisor starts it (see collector.py).
        self.collector = Collector()
        self._unfinished: set[RequestHandler] = set()
        self.port = 0

    # The node's parts, as code and tests reach them.
    @property
    def config(self) -> Config:
        return self.node.config

    @config.setter
    def config(self, config: Config) -> None:
        self.node.config = config

    @property
    def hub(self) -> Hub:
        return self.node.hub

    @property
    def broker(self) -> PubSubSource:
        return self.node.broker

    @property
    def streams(self) -> StreamSource:
        return self.node.streams

    @property
    def reporter(self) -> EventsWriter | None:
        return self.node.reporter

    @property
    def metrics(self) -> Metrics | None:
        return self.node.metrics

    @property
    def tasks(self) -> Tasks:
        return self.node.tasks

    @property
    def control(self) -> Control:
        return self.node.control

    @property
    def plane(self) -> ControlPlane | None:
        return self.node.plane

    @property
    def admin_port(self) -> int:
        return self.node.admin_port

    def status(self) -> str:
        """One line for ``systemctl status``."""
        return f"connections={self.hub.connections} redis={self.broker.state.value}"

    @property
    def ready(self) -> bool:
        """Serving, subscribed to every pub/sub channel and reading every stream."""
        return self.node.ready

    def redis_state(self, old: BrokerState, new: BrokerState) -> None:
        self._check_ready()

    def streams_state(self, old: BrokerState, new: BrokerState) -> None:
        self._check_ready()

    def _check_ready(self) -> None:
        # Ready means serving *and* subscribed: a hub without Redis would accept
        # streams that never carry an event, so systemd must not count it started.
        if self.ready and not self._ready_sent:
            self._ready_sent = True
            log.info("ready", extra=fields(port=self.port, **self.config.counts()))
            self.notifier.notify_ready(self.status())
        else:
            self.notifier.notify_status(self.status())

    async def start(self) -> None:
        """Listen, subscribe, start the heartbeat. Returns once the socket is bound."""
        await self._runner.setup()
        headers_before_routing(self._runner)
        listen = self.config.listen
        sock = listen_socket(listen.host, listen.port, self._reuse_port)
        self.port = sock.getsockname()[1]
        if not self._reuse_port:  # (workers: main checks it once for the node)
            check_backlog(listen.backlog)
        site = web.SockSite(self._runner, sock, backlog=listen.backlog)
        await site.start()
        await self.node.start()
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
        # The same timer: a storm has settled by the next sweep.
        self.collector.settle(self.hub.connections)
        now_idle = {h for h in connections(self._runner) if not request_in_progress(h)}
        for handler in now_idle & self._unfinished:
            handler.force_close()
        self._unfinished = now_idle - self._unfinished

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP); keep running on the old one if it is invalid."""
        self.notifier.notify_reloading()
        try:
            return self.node.reload()
        finally:
            if self._ready_sent:
                self.notifier.notify_ready(self.status())
            else:  # not ready before the reload (Redis never answered): still not
                self.notifier.notify_status(self.status())

    async def stop(self) -> None:
        """Stop accepting, end every stream cleanly, close Redis."""
        self.notifier.notify_stopping()
        self.node.stopping()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.collector.stop()
        # Stops the listener first, then ends streams (app.on_shutdown), then waits
        # up to shutdown_timeout for handlers before cancelling what is left.
        await self._runner.cleanup()
        await self.node.close()
        self.notifier.close()
        log.info("stopped")
