"""``workers: N``: the node's main process, supervising N workers that share the port.

The main process owns no HTTP stream. It is the node's core: it builds the node a
single process builds (``node.py``: the Redis sources, the stream reader, the events
writer, the admin listener), runs the hub's ingest -- each message parsed, encoded and
numbered once, the node's history kept -- and feeds every numbered entry to every
worker over its socketpair (``feed.py``), one frame per event-loop iteration. Workers
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
import gc
import logging
import socket

from ..config import Config, Listen
from ..core.control import Command, Refuse
from ..core.history import Entry
from ..http.control import ControlCollector
from ..hub.channel import Channel
from ..hub.hub import Refused, Unknown
from ..logs import fields
from ..node import Listener, Node, listen_socket
from ..redis.pubsub import BrokerState
from . import snapshot
from .feed import Kind, Op, frame
from .node_metrics import NodeMetrics
from .process import EXIT_FAILED, capture_signals, raise_fd_limit
from .process import run as run_loop
from .slots import Slot, StartupError, Workers
from .systemd import Notifier

__all__ = ["StartupError", "Supervisor", "run", "supervise"]

log = logging.getLogger(__name__)

# Seconds between liveness pings to the workers (shorter when the watchdog asks).
_PING = 0.5


class Supervisor(Listener):
    """The node's main process: the node (sources, ingest hub, writer, admin) + workers
    + systemd."""

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
        self.node = Node(config, listener=self, tap=self, metrics=self._metrics)
        self.hub = self.node.hub
        self.broker = self.node.broker
        assert self.node.reader is not None and self.node.reporter is not None
        self.streams = self.node.reader
        self.reporter = self.node.reporter
        self.notifier = Notifier() if notifier is None else notifier
        self.port = 0
        self._sock: socket.socket | None = None
        self._ops: list[Op] = []
        self._flush_scheduled = False
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

    # --- the feed: the hub's tap ------------------------------------------------------

    def entry(
        self, channel: Channel, e: Entry, publisher_id: bool, exclude: tuple[str, ...]
    ) -> None:
        self._push((Kind.ENTRY, channel.name, e, publisher_id, exclude))

    def member(self, channel: Channel) -> None:
        self._push((Kind.MEMBER, channel.name, channel.history.evicted_seq))
        if not channel.stream:  # (a stream member is live once the reader starts it)
            self.node.tasks.spawn(self._announce_live(channel), "ssehub-announce", forever=False)

    def removed(self, channel: Channel) -> None:
        self._push((Kind.REMOVED, channel.name))

    def outage(self, seq: int) -> None:
        self._push((Kind.OUTAGE, seq))

    # --- the control plane: the workers hold the streams --------------------------------

    def control_message(self, command: Command) -> None:
        """Every worker carries a control message out (main keeps the refusals)."""
        self._push((Kind.CONTROL, command))

    def refusals_read(self, refusals: list[Refuse]) -> None:
        self._push((Kind.REFUSALS, refusals))

    # --- the feed: the node's listener --------------------------------------------------

    def stream_at(self, key: bytes, position: str, started: bool) -> None:
        """The workers get a stream's entries, then its position (``started``: from then
        on its streams there are live)."""
        self._push((Kind.STREAM, key, position, started))

    def streams_state(self, old: BrokerState, new: BrokerState) -> None:
        # Nothing is lost on stream channels: the reader goes on from its positions.
        self._push((Kind.STREAMS, new.value))
        self._check_ready()

    def redis_state(self, old: BrokerState, new: BrokerState) -> None:
        # (The node dropped idle members, and numbered an outage, before this.)
        self._push((Kind.STATE, new.value, self.broker.reconnects))
        self._check_ready()

    def _push(self, op: Op) -> None:
        self._ops.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One frame for everything since the last flush, the same bytes to every worker."""
        self._flush_scheduled = False
        if not self._ops:
            return
        data = frame(self._ops)
        self._ops = []
        for slot in self.slots:
            slot.write(data)

    def _send(self, slot: Slot, ops: list[Op]) -> None:
        """To one worker, behind everything the node sent before."""
        self._flush()
        slot.write(frame(ops))

    async def _announce_live(self, channel: Channel) -> None:
        """Tell the workers once Redis confirms a new member (its streams wait for it)."""
        while self.hub.channels.get(channel.name) is channel:
            if await self.broker.wait_subscribed((channel.redis,), 5.0):
                if self.hub.channels.get(channel.name) is channel:
                    self._push((Kind.LIVE, channel.redis))
                return

    def _snapshot(self) -> snapshot.Snapshot:
        """The node's state for a new worker. What the node numbered so far goes to the
        other workers first: the new one gets it in the snapshot."""
        self._flush()
        members = [c for c in self.hub.channels.values() if c.family is not None]
        return snapshot.take(
            self.hub,
            config=self._worker_config(self.config),
            log_level=self.log_level,
            state=self.broker.state.value,
            reconnects=self.broker.reconnects,
            live=[c.redis for c in members if c.redis in self.broker.subscribed],
            streams=[k for k in self.hub.stream_keys() if self.streams.live(k)],
            streams_state=self.streams.state.value,
            refusals=[Refuse(k, u) for k, u in self.node.control.refusals.items()],
        )

    def _worker_config(self, config: Config) -> Config:
        # Workers listen on the port main bound; the admin listener is main's.
        return dataclasses.replace(config, admin=None, listen=Listen(config.listen.host, self.port))

    # --- what workers say ---------------------------------------------------------------

    def _on_worker(self, slot: Slot, ops: list[Op]) -> None:
        for op in ops:
            kind = op[0]
            if kind == Kind.PONG:
                if op[1] == self._ping_n:
                    slot.last_pong = asyncio.get_running_loop().time()
                slot.connections = op[2]
            elif kind == Kind.JOIN:
                _, channel, session, meta, presence = op
                slot.sessions[(channel, session)] = (meta, presence)
                self.reporter.join(channel, session, meta, presence)
            elif kind == Kind.LEAVE:
                _, channel, session, meta, reason, presence = op
                if slot.sessions.pop((channel, session), None) is not None:
                    self.reporter.leave(channel, session, meta, reason, presence)
            elif kind == Kind.REFUSE:
                # A worker refused a session by its credential: main keeps it, stores it
                # and tells every node (whose workers, this one's siblings too, hear it).
                self.node.control.apply(op[1])
                if self.node.plane is not None:
                    self.node.plane.refuse(op[1])
            elif kind == Kind.HOLD:
                self._hold(slot, op[1], op[2])
            elif kind == Kind.RELEASE:
                self._release(slot, op[2])
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
            else:
                log.error("unknown worker operation worker=%d kind=%r", slot.index, kind)

    def _hold(self, slot: Slot, name: str, token: int) -> None:
        """A stream on ``slot`` holds member ``name`` (the worker's ``token`` for it)."""
        try:
            (slot.held[token],) = self.hub.acquire([name])
        except (Unknown, Refused):
            self._send(slot, [(Kind.REFUSED, token)])

    def _release(self, slot: Slot, token: int) -> None:
        channel = slot.held.pop(token, None)
        if channel is not None:
            self.hub.release([channel])

    def _ask_stats(self, slot: Slot) -> None:
        self._send(slot, [(Kind.STATS,)])

    def _gone(self, slot: Slot) -> None:
        """A worker exited: every stream it had not reported ended did end with it, its
        holds go, its counters stay in the node's totals."""
        for (channel, session), (meta, presence) in slot.sessions.items():
            self.reporter.leave(channel, session, meta, "worker_exit", presence)
        slot.sessions.clear()
        if self.metrics is not None:
            self.metrics.fold(slot)
        self.hub.release(list(slot.held.values()))
        slot.held.clear()

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
        self._flush()
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
            self._push((Kind.CONFIG, self._worker_config(self.config)))
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
        gc.collect()
        gc.freeze()
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
