"""``workers: N``: the node's main process, supervising N workers that share the port.

The main process owns no HTTP stream. It is the node's core: it holds the Redis
subscription (the Broker) and the stream reader (stream channels' entries, with each
stream's position), and runs the hub's ingest -- each message parsed, encoded
and numbered once, the node's history kept -- and feeds every numbered entry to every
worker over its socketpair (``feed.py``), one frame per event-loop iteration. Workers
(``worker.py``) run the HTTP app and the fan-out from that feed, so ids and history are
the same on every worker and a browser may reconnect to any of them.

As in gunicorn's arbiter and uvicorn's multiprocess supervisor, the loop here stays
small: it binds the public port first (so ``port: 0`` works; workers bind the same
port with ``SO_REUSEPORT``), starts workers and restarts a dead one with capped
backoff, forwards SIGTERM, reloads on SIGHUP (the config is validated once, here),
serves the admin listener (metrics summed over workers), and speaks systemd's notify
protocol for the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from functools import partial
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import Config, Listen
from ..core.control import Command, Refuse
from ..core.history import Entry
from ..http.control import ControlCollector
from ..http.metrics import HubCollector, Metrics, ReporterCollector
from ..hub.channel import Channel
from ..hub.hub import Refused, Unknown
from ..logs import fields
from ..node import Listener, Node, listen_socket
from ..redis.pubsub import BrokerState
from . import feed
from .feed import FrameProtocol, Op
from .process import EXIT_FAILED, capture_signals, raise_fd_limit
from .process import run as run_loop
from .systemd import Notifier

__all__ = ["NodeCollector", "Supervisor", "run", "supervise"]

log = logging.getLogger(__name__)

# Restart delays: doubled for each worker that dies within _STABLE seconds of its start.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 10.0
_STABLE = 10.0
# Seconds between liveness pings to the workers (shorter when the watchdog asks).
_PING = 0.5
# A worker whose unread feed grows past this is stuck: it is restarted (and catches
# up from a snapshot), like a subscriber that stops reading.
_MAX_FEED_BUFFER = 64 << 20
# Seconds for a worker to report it listens, at start-up.
_START_TIMEOUT = 30.0
# Metric families the main process counts (Redis, parsing, members); the rest is summed
# over the workers, which serve the streams.
_MAIN_OWNED = frozenset(
    {
        "ssehub_family_members",
        "ssehub_family_members_refused",
        "ssehub_family_members_dropped",
        "ssehub_messages_received",
        "ssehub_messages_rejected",
        "ssehub_redis_up",
        "ssehub_redis_state",
        "ssehub_redis_reconnects",
    }
)

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


class StartupError(OSError):
    """A worker exited before it listened (the CLI exits 3, as for a port in use)."""


class _Slot:
    """One worker position: its current process, feed link and what main knows of it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.link: FrameProtocol | None = None
        self.ready = False
        self.started = 0.0
        self.failures = 0  # quick deaths in a row (the backoff's exponent)
        self.restarts = 0
        self.last_pong = 0.0
        self.connections = 0
        # Members this worker's streams hold: one hub hold per name, counted here.
        self.held: Counter[str] = Counter()
        self.channels: dict[str, Channel] = {}
        self.stats: list[Metric] = []
        self.stats_waiter: asyncio.Future[None] | None = None
        # Its streams' registrations not yet ended: (channel, session) -> (meta,
        # presence); left with reason worker_exit should the worker die.
        self.sessions: dict[tuple[str, str], tuple[Any, bool]] = {}


class Supervisor(Listener):
    """The node's main process: the node (sources, ingest hub, writer, admin) + workers
    + systemd."""

    def __init__(
        self, config: Config, log_level: str | None = None, notifier: Notifier | None = None
    ) -> None:
        self.log_level = log_level
        # The node, as one process builds it; every numbered change goes to the workers,
        # in order (the hub's tap), and so do the sources' states and stream positions
        # (the node's listener). Stream channels: the node's one reader, here. The
        # node's events and presence: workers report their streams, main writes.
        self.node = Node(config, listener=self, tap=self, metrics=partial(NodeMetrics, self))
        self.hub = self.node.hub
        self.broker = self.node.broker
        assert self.node.reader is not None
        self.streams = self.node.reader
        assert self.node.reporter is not None
        self.reporter = self.node.reporter
        self.notifier = Notifier() if notifier is None else notifier
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.port = 0
        self._sock: socket.socket | None = None
        self._ops: list[Op] = []
        self._flush_scheduled = False
        self._stopping = False
        self._ready_sent = False
        self._booted = False
        self._boot: asyncio.Future[None] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_n = 0
        wd = self.notifier.watchdog_interval
        self._ping_interval = _PING if wd is None else min(_PING, wd)
        # Counters of workers that died, so that the node's totals never go back.
        self._dead: dict[str, tuple[str, str, dict[SampleKey, float]]] = {}
        if self.node.admin is not None:
            self.node.admin.middlewares.append(self._fresh_metrics)

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
        self._push((feed.ENTRY, channel.name, e, publisher_id, exclude))

    def member(self, channel: Channel) -> None:
        self._push((feed.MEMBER, channel.name, channel.history.evicted_seq))
        if not channel.stream:  # (a stream member is live once the reader starts it)
            self._spawn_task(self._announce_live(channel), "ssehub-announce")

    def removed(self, channel: Channel) -> None:
        self._push((feed.REMOVED, channel.name))

    def outage(self, seq: int) -> None:
        self._push((feed.OUTAGE, seq))

    # --- the control plane: the workers hold the streams --------------------------------

    def control_message(self, command: Command) -> None:
        """Every worker carries a control message out (main keeps the refusals)."""
        self._push((feed.CONTROL, command))

    def refusals_read(self, refusals: list[Refuse]) -> None:
        self._push((feed.REFUSALS, refusals))

    # --- the feed: the node's listener --------------------------------------------------

    def stream_at(self, key: bytes, position: str, started: bool) -> None:
        """The workers get a stream's entries, then its position (``started``: from then
        on its streams there are live)."""
        self._push((feed.STREAM, key, position, started))

    def streams_state(self, old: BrokerState, new: BrokerState) -> None:
        # Nothing is lost on stream channels: the reader goes on from its positions.
        self._push((feed.STREAMS, new.value))
        self._check_ready()

    def redis_state(self, old: BrokerState, new: BrokerState) -> None:
        # (The node dropped idle members, and numbered an outage, before this.)
        self._push((feed.STATE, new.value, self.broker.reconnects))
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
        data = feed.frame(self._ops)
        self._ops = []
        for slot in self.slots:
            self._write(slot, data)

    def _send(self, slot: _Slot, ops: list[Op]) -> None:
        """To one worker, behind everything the node sent before."""
        self._flush()
        self._write(slot, feed.frame(ops))

    def _write(self, slot: _Slot, data: bytes) -> None:
        link = slot.link
        if link is None or link.transport is None:
            return
        link.write(data)
        if link.transport.get_write_buffer_size() > _MAX_FEED_BUFFER and slot.proc is not None:
            log.error("worker not reading its feed worker=%d pid=%d", slot.index, slot.proc.pid)
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()

    async def _announce_live(self, channel: Channel) -> None:
        """Tell the workers once Redis confirms a new member (its streams wait for it)."""
        while self.hub.channels.get(channel.name) is channel:
            if await self.broker.wait_subscribed((channel.redis,), 5.0):
                if self.hub.channels.get(channel.name) is channel:
                    self._push((feed.LIVE, channel.redis))
                return

    def _snapshot(self) -> dict[str, Any]:
        hub = self.hub
        members = [c for c in hub.channels.values() if c.family is not None]
        return {
            "config": self._worker_config(self.config),
            "log_level": self.log_level,
            "epoch": hub.epoch,
            "seq": hub.seq,
            "outage_seq": hub.outage_seq,
            "state": self.broker.state.value,
            "reconnects": self.broker.reconnects,
            "members": [(c.name, c.history.evicted_seq) for c in members],
            "live": [c.redis for c in members if c.redis in self.broker.subscribed],
            "history": {name: (c.history, c.last_seq) for name, c in hub.channels.items()},
            "streams": [k for k in hub.stream_keys() if self.streams.live(k)],
            "streams_state": self.streams.state.value,
            "refusals": [Refuse(k, u) for k, u in self.node.control.refusals.items()],
            "positions": {
                name: (c.stream_pos, c.flushed_pos) for name, c in hub.channels.items() if c.stream
            },
        }

    def _worker_config(self, config: Config) -> Config:
        # Workers listen on the port main bound; the admin listener is main's.
        return dataclasses.replace(config, admin=None, listen=Listen(config.listen.host, self.port))

    # --- what workers say ---------------------------------------------------------------

    def _on_worker(self, slot: _Slot, ops: list[Op]) -> None:
        for op in ops:
            kind = op[0]
            if kind == feed.PONG:
                if op[1] == self._ping_n:
                    slot.last_pong = asyncio.get_running_loop().time()
                slot.connections = op[2]
            elif kind == feed.JOIN:
                _, channel, session, meta, presence = op
                slot.sessions[(channel, session)] = (meta, presence)
                self.reporter.join(channel, session, meta, presence)
            elif kind == feed.LEAVE:
                _, channel, session, meta, reason, presence = op
                if slot.sessions.pop((channel, session), None) is not None:
                    self.reporter.leave(channel, session, meta, reason, presence)
            elif kind == feed.REFUSE:
                # A worker refused a session by its credential: main keeps it, stores it
                # and tells every node (whose workers, this one's siblings too, hear it).
                self.node.control.apply(op[1])
                if self.node.plane is not None:
                    self.node.plane.refuse(op[1])
            elif kind == feed.HOLD:
                self._hold(slot, op[1], op[2])
            elif kind == feed.RELEASE:
                self._release(slot, op[1])
            elif kind == feed.STATS:
                slot.stats = op[1]
                if slot.stats_waiter is not None and not slot.stats_waiter.done():
                    slot.stats_waiter.set_result(None)
            elif kind == feed.READY:
                slot.ready = True
                slot.last_pong = asyncio.get_running_loop().time()
                log.info("worker ready worker=%d port=%d", slot.index, op[1])
                self._check_ready()
            else:
                log.error("unknown worker operation worker=%d kind=%r", slot.index, kind)

    def _hold(self, slot: _Slot, name: str, token: int) -> None:
        """A stream on ``slot`` holds member ``name``: the node keeps it (one hold per worker)."""
        if not slot.held[name]:
            try:
                (slot.channels[name],) = self.hub.acquire([name])
            except (Unknown, Refused):
                del slot.held[name]
                self._send(slot, [(feed.REFUSED, token)])
                return
        slot.held[name] += 1

    def _release(self, slot: _Slot, name: str) -> None:
        slot.held[name] -= 1
        if slot.held[name] <= 0:
            del slot.held[name]
            channel = slot.channels.pop(name, None)
            if channel is not None:
                self.hub.release([channel])

    # --- workers' lives -----------------------------------------------------------------

    def _spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self.node.tasks.spawn(coro, name, forever=False)

    async def _spawn(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ssehub.supervisors.worker",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_worker_env(),
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        _, link = await loop.create_unix_connection(
            lambda: FrameProtocol(partial(self._on_worker, slot)), sock=parent
        )
        # One synchronous step: what the node numbered so far goes to the other
        # workers, this one gets it in the snapshot, and from here on the same frames.
        self._flush()
        link.send([(feed.SNAPSHOT, self._snapshot())])
        slot.proc, slot.link, slot.ready = proc, link, False
        slot.started = slot.last_pong = loop.time()
        log.info("worker started worker=%d pid=%d", slot.index, proc.pid)
        self._spawn_task(self._watch(slot, proc, link), f"ssehub-watch-{slot.index}")

    async def _watch(
        self, slot: _Slot, proc: asyncio.subprocess.Process, link: FrameProtocol
    ) -> None:
        code = await proc.wait()
        # What it said before it exited (its streams' unsubscribes) is read first.
        await asyncio.wait({link.lost}, timeout=1.0)
        self._sessions_gone(slot)
        if link.transport is not None:
            link.transport.close()
        slot.link = None
        slot.ready = False
        slot.connections = 0
        self._fold(slot)
        for channel in slot.channels.values():
            self.hub.release([channel])
        slot.held.clear()
        slot.channels.clear()
        if self._stopping:
            return
        if not self._booted:
            if self._boot is not None and not self._boot.done():
                self._boot.set_exception(
                    StartupError(f"worker {slot.index} exited during start-up (code {code})")
                )
            return
        loop = asyncio.get_running_loop()
        slot.failures = 0 if loop.time() - slot.started > _STABLE else slot.failures + 1
        delay = min(_BACKOFF_MIN * 2 ** max(slot.failures - 1, 0), _BACKOFF_MAX)
        slot.restarts += 1
        log.warning(
            "worker exited worker=%d pid=%d code=%s restart_in=%.1fs",
            slot.index,
            proc.pid,
            code,
            delay,
        )
        self.notifier.notify_status(self.status())
        await asyncio.sleep(delay)
        if not self._stopping:
            try:
                await self._spawn(slot)
            except OSError as exc:
                log.error("worker restart failed worker=%d error=%s", slot.index, exc)

    def _sessions_gone(self, slot: _Slot) -> None:
        """A worker exited: every stream it had not reported ended did end with it."""
        for (channel, session), (meta, presence) in slot.sessions.items():
            self.reporter.leave(channel, session, meta, "worker_exit", presence)
        slot.sessions.clear()

    def _check_ready(self) -> None:
        if all(s.ready for s in self.slots):
            if self._boot is not None and not self._boot.done():
                self._boot.set_result(None)
            if self.node.ready and not self._ready_sent:
                self._ready_sent = True
                log.info("ready port=%d workers=%d", self.port, len(self.slots))
                self.notifier.notify_ready(self.status())
        self.notifier.notify_status(self.status())

    # --- liveness, status ----------------------------------------------------------------

    def _ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self._ping_interval, self._ping)
        self._ping_n += 1
        self._flush()
        data = feed.frame([(feed.PING, self._ping_n)])
        for slot in self.slots:
            self._write(slot, data)

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

    # --- metrics ---------------------------------------------------------------------------

    @web.middleware
    async def _fresh_metrics(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/metrics":
            await self.gather()
        return await handler(request)

    async def gather(self, timeout: float = 2.0) -> None:
        """Ask every worker for its counters (the answers land in ``slot.stats``)."""
        loop = asyncio.get_running_loop()
        waiters = []
        for slot in self.slots:
            if slot.link is not None and slot.ready:
                slot.stats_waiter = loop.create_future()
                waiters.append(slot.stats_waiter)
                self._send(slot, [(feed.STATS,)])
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)

    def _fold(self, slot: _Slot) -> None:
        """Keep a dead worker's counters in the node's totals (gauges go with it)."""
        for metric in slot.stats:
            if metric.type == "gauge":
                continue
            _, _, sums = self._dead.setdefault(metric.name, (metric.documentation, metric.type, {}))
            _add_samples(sums, metric)
        slot.stats = []

    def merged(self) -> dict[str, Metric]:
        """The workers' families summed: live workers' values plus dead workers' counters."""
        sums: dict[str, tuple[str, str, dict[SampleKey, float]]] = {
            name: (doc, kind, dict(samples)) for name, (doc, kind, samples) in self._dead.items()
        }
        # Main's own control-plane counters (POST /publish, /disconnect) add to the workers'.
        for metric in ControlCollector(self.node.control, self.node.plane).collect():
            _, _, acc = sums.setdefault(metric.name, (metric.documentation, metric.type, {}))
            _add_samples(acc, metric)
        for slot in self.slots:
            if slot.link is None:
                continue
            for metric in slot.stats:
                _, _, acc = sums.setdefault(metric.name, (metric.documentation, metric.type, {}))
                _add_samples(acc, metric)
        out = {}
        for name, (doc, kind, samples) in sums.items():
            metric = Metric(name, doc, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            out[name] = metric
        return out

    # --- start, reload, stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind, subscribe, start every worker; returns once all of them listen."""
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        # Bound, never listening: it holds the port (and picks it for port 0) while
        # the workers' own SO_REUSEPORT sockets take the connections.
        self._sock = listen_socket(listen.host, listen.port, reuse_port=True)
        self.port = self._sock.getsockname()[1]
        # The admin listener, the sources, the writer, the hub's timers (in main: the
        # members' grace sweeps).
        await self.node.start()
        self._boot = loop.create_future()
        for slot in self.slots:
            await self._spawn(slot)
        await asyncio.wait_for(self._boot, _START_TIMEOUT)
        self._booted = True
        self._ping()
        self.notifier.start(self.status, self.alive)
        log.info("listening host=%s port=%d workers=%d", listen.host, self.port, len(self.slots))

    def reload(self) -> bool:
        """SIGHUP: validate the file once; if valid, apply it here and send it to every worker."""
        self.notifier.notify_reloading()
        try:
            if not self.node.reload():
                return False
            self._push((feed.CONFIG, self._worker_config(self.config)))
            return True
        finally:
            if self._ready_sent:
                self.notifier.notify_ready(self.status())
            else:
                self.notifier.notify_status(self.status())

    async def stop(self) -> None:
        """SIGTERM every worker (each drains within ``shutdown_timeout``), then close Redis."""
        self._stopping = True
        self.notifier.notify_stopping()
        if self._ping_timer is not None:
            self._ping_timer.cancel()
        self.node.stopping()
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in procs]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.config.shutdown_timeout + 2)
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker did not stop in time pid=%d; killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        links = {s.link.lost for s in self.slots if s.link is not None}
        if links:
            await asyncio.wait(links, timeout=1.0)
        for slot in self.slots:
            self._sessions_gone(slot)
        # The writer writes the streams' unsubscribes; then admin, Redis, the watchers.
        await self.node.close()
        if self._sock is not None:
            self._sock.close()
        self.notifier.close()
        log.info("stopped")


def _worker_env() -> dict[str, str]:
    # Only main talks to systemd (NotifyAccess=main): workers never see its socket.
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _add_samples(acc: dict[SampleKey, float], metric: Metric) -> None:
    for s in metric.samples:
        if s.name.endswith("_created"):
            continue  # a creation time is no count: it cannot be summed
        key = (s.name, tuple(sorted(s.labels.items())))
        acc[key] = acc.get(key, 0.0) + s.value


class NodeCollector(Collector):
    """The node in one scrape: main's Redis and parsing counters, the workers' sums."""

    def __init__(self, supervisor: Supervisor, node: Node) -> None:
        self.sup = supervisor
        self._main = HubCollector(node.hub, node.broker)

    def collect(self) -> Iterable[Metric]:
        merged = self.sup.merged()
        for metric in self._main.collect():
            theirs = merged.pop(metric.name, None)
            yield metric if theirs is None or metric.name in _MAIN_OWNED else theirs
        yield from merged.values()  # the delivery-delay histogram
        slots = self.sup.slots
        workers = GaugeMetricFamily("ssehub_workers", "Worker processes serving.")
        workers.add_metric([], sum(1 for s in slots if s.ready))
        yield workers
        restarts = CounterMetricFamily("ssehub_worker_restarts", "Workers restarted after exiting.")
        restarts.add_metric([], sum(s.restarts for s in slots))
        yield restarts
        per = GaugeMetricFamily(
            "ssehub_worker_connections", "Open event streams per worker.", labels=["worker"]
        )
        for s in slots:
            per.add_metric([str(s.index)], _connections(s))
        yield per


def _connections(slot: _Slot) -> float:
    """A worker's open streams: from its scrape answer when there is one, else its pong."""
    if slot.link is None:
        return 0
    for metric in slot.stats:
        if metric.name == "ssehub_connections":
            return float(metric.samples[0].value)
    return slot.connections


class NodeMetrics(Metrics):
    """The admin listener's registry for a node of workers (see ``NodeCollector``)."""

    def __init__(self, supervisor: Supervisor, node: Node) -> None:  # no super(): no histogram
        assert node.reporter is not None
        self.registry = CollectorRegistry()
        self.registry.register(NodeCollector(supervisor, node))
        self.registry.register(ReporterCollector(node.reporter))


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
