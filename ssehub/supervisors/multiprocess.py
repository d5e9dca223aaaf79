"""``workers: N``: the node's main process, supervising N workers that share the port.

The main process owns no HTTP stream. It is the node's core: it builds the node a
single process builds (``node.py``: the Redis sources, the stream reader, the events
writer, the admin listener), runs the hub's ingest -- each message parsed, encoded and
numbered once, the node's history kept -- and feeds every numbered entry to every
worker over its socketpair (``relay.py``, ``feed.py``), one frame per event-loop
iteration. Workers
(``worker.py``) run the HTTP app and the fan-out from that feed, so ids and history are
the same on every worker and a browser may reconnect to any of them.

As in gunicorn's arbiter and uvicorn's multiprocess supervisor, the loop here stays
small: it binds the public port first (so ``port: 0`` works; workers bind the same
port with ``SO_REUSEPORT``), starts workers and restarts a dead one (``slots.py``),
forwards SIGTERM, reloads on SIGHUP (the config is validated once, here), serves the
admin listener (metrics summed over workers: ``node_metrics.py``), and speaks
systemd's notify protocol for the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

from ..config import Config
from ..http.collector import freeze
from ..http.control import ControlCollector
from ..logs import fields
from ..node import Node, check_backlog, listen_socket
from .feed import Kind, Op, frame
from .node_metrics import NodeMetrics
from .process import EXIT_FAILED, capture_signals, raise_fd_limit
from .process import run as run_loop
from .relay import Relay
from .slots import Slot, StartupError, Workers
from .snapshot import Snapshot
from .systemd import Notifier

__all__ = ["StartupError", "Supervisor", "run", "supervise"]

log = logging.getLogger(__name__)

# Seconds between liveness pings to the workers (shorter when the watchdog asks).
_PING = 0.5


class Supervisor:
    """The node's main process: the node (sources, ingest hub, writer, admin) fed out to
    the workers (``relay.py``), the workers' processes (``slots.py``), systemd."""

    def __init__(
        self, config: Config, log_level: str | None = None, notifier: Notifier | None = None
    ) -> None:
        self.log_level = log_level
        self.workers = Workers(
            config.workers, self._on_worker, self._snapshot, self._gone, self._status
        )
        self.slots = self.workers.slots
        self.metrics: NodeMetrics | None = None  # with an admin listener
        # The node, as one process builds it; every numbered change goes to the workers,
        # in order (the hub's tap), and so do the sources' states and stream positions
        # (the node's listener). Stream channels: the node's one reader, here. The
        # node's events and presence: workers report their streams, main writes.
        self.relay = Relay(self.slots, self._check_ready)
        self.node = Node(config, listener=self.relay, tap=self.relay, metrics=self._metrics)
        self.relay.node = self.node
        self.hub = self.node.hub
        self.broker = self.node.broker
        self.notifier = Notifier() if notifier is None else notifier
        self.port = 0
        self._sock: socket.socket | None = None
        self._ready_sent = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_n = 0
        wd = self.notifier.watchdog_interval
        self._ping_interval = _PING if wd is None else min(_PING, wd)

    def _metrics(self, node: Node) -> NodeMetrics:
        assert node.reporter is not None
        self.metrics = NodeMetrics(
            self.slots,
            self._ask_stats,
            node.hub,
            node.broker,
            node.reporter,
            ControlCollector(node.control, node.plane),
        )
        return self.metrics

    @property
    def config(self) -> Config:
        return self.node.config

    @property
    def admin_port(self) -> int:
        return self.node.admin_port

    def _snapshot(self) -> Snapshot:
        return self.relay.snapshot(
            config=self._worker_config(self.config), log_level=self.log_level
        )

    def _worker_config(self, config: Config) -> Config:
        # Workers listen on the port main bound; the admin listener is main's.
        listen = dataclasses.replace(config.listen, port=self.port)
        return dataclasses.replace(config, admin=None, listen=listen)

    # --- what workers say ---------------------------------------------------------------

    def _on_worker(self, slot: Slot, ops: list[Op]) -> None:
        for op in ops:
            kind = op[0]
            if kind == Kind.PONG:
                if op[1] == self._ping_n:
                    slot.last_pong = asyncio.get_running_loop().time()
                slot.connections = op[2]
            elif kind == Kind.STATS:
                slot.stats = op[1]
                if slot.stats_waiter is not None and not slot.stats_waiter.done():
                    slot.stats_waiter.set_result(None)
            elif kind == Kind.READY:
                slot.ready = True
                slot.last_pong = asyncio.get_running_loop().time()
                log.info("worker ready worker=%d port=%d", slot.index, op[1])
                self.workers.listening()
                self._check_ready()
            elif not self.relay.take(slot, op):
                log.error("unknown worker operation worker=%d kind=%r", slot.index, kind)

    def _ask_stats(self, slot: Slot) -> None:
        self.relay.send(slot, [(Kind.STATS,)])

    def _gone(self, slot: Slot) -> None:
        """A worker exited: its streams and holds go (the relay's), its counters stay in
        the node's totals."""
        self.relay.gone(slot)
        if self.metrics is not None:
            self.metrics.fold(slot)

    def _check_ready(self) -> None:
        if all(s.ready for s in self.slots) and self.node.ready and not self._ready_sent:
            self._ready_sent = True
            log.info("ready port=%d workers=%d", self.port, len(self.slots))
            self.notifier.notify_ready(self.status())
        self._status()

    # --- liveness, status ----------------------------------------------------------------

    def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self._ping_interval, self._ping)
        self._ping_n += 1
        self.relay.flush()
        data = frame([(Kind.PING, self._ping_n)])
        for slot in self.slots:
            slot.write(data)

    def alive(self) -> bool:
        """True while every worker runs and answered a recent ping (the watchdog's test)."""
        limit = asyncio.get_running_loop().time() - 4 * self._ping_interval
        return all(s.link is not None and s.ready and s.last_pong >= limit for s in self.slots)

    @property
    def connections(self) -> int:
        """Open streams on the node, as the workers last reported them."""
        return sum(s.connections for s in self.slots if s.link is not None)

    def status(self) -> str:
        """One line for ``systemctl status``."""
        up = sum(1 for s in self.slots if s.ready)
        return (
            f"connections={self.connections} redis={self.broker.state.value} "
            f"workers={up}/{len(self.slots)}"
        )

    def _status(self) -> None:
        self.notifier.notify_status(self.status())

    # --- start, reload, stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, subscribe, start every worker; returns once all of them listen."""
        listen = self.config.listen
        # Bound, never listening: it holds the port (and picks it for port 0) while
        # the workers' own SO_REUSEPORT sockets take the connections.
        self._sock = listen_socket(listen.host, listen.port, reuse_port=True)
        check_backlog(listen.backlog)
        self.port = self._sock.getsockname()[1]
        # The admin listener, the sources, the writer, the hub's timers (in main: the
        # members' grace sweeps).
        if self.node.admin is not None and self.metrics is not None:
            self.node.admin.middlewares.append(self.metrics.fresh)
        await self.node.start()
        await self.workers.start(self.node.tasks)
        self._ping()
        self.notifier.start(self.status, self.alive)
        log.info("listening host=%s port=%d workers=%d", listen.host, self.port, len(self.slots))

    def reload(self) -> bool:
        """SIGHUP: validate the file once; if valid, apply it here and send it to every worker."""
        self.notifier.notify_reloading()
        try:
            if not self.node.reload():
                return False
            self.relay.push((Kind.CONFIG, self._worker_config(self.config)))
            return True
        finally:
            if self._ready_sent:
                self.notifier.notify_ready(self.status())
            else:
                self._status()

    async def stop(self) -> None:
        """SIGTERM every worker (each drains within ``shutdown_timeout``), then close Redis."""
        self.notifier.notify_stopping()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        self.node.stopping()
        await self.workers.stop(self.config.shutdown_timeout + 2)
        for slot in self.slots:
            self._gone(slot)
        # The writer writes the streams' unsubscribes; then admin, Redis, the watchers.
        await self.node.close()
        await self.relay.close()
        if self._sock is not None:
            self._sock.close()
        self.notifier.close()
        log.info("stopped")


async def supervise(config: Config, log_level: str | None = None) -> int:
    """Run the node until SIGTERM or SIGINT (or a failed task); SIGHUP reloads every
    worker. Returns the process's exit code."""
    stop = asyncio.Event()
    sup = Supervisor(config, log_level)
    sup.node.tasks.on_failure = stop.set
    capture_signals(stop, sup.reload)
    try:
        await sup.start()
        freeze()  # main serves no stream: its start-up objects only
        await stop.wait()
        if sup.node.tasks.failed is not None:
            log.error("stopping: a task failed", extra=fields(task=sup.node.tasks.failed))
        log.info("shutting down connections=%d", sup.connections)
    finally:
        await sup.stop()
    return EXIT_FAILED if sup.node.tasks.failed is not None else 0


def run(config: Config, log_level: str | None = None) -> int:
    """Blocking entry point used by the CLI for ``workers`` > 1; returns the exit code."""
    raise_fd_limit()
    return run_loop(supervise(config, log_level))
