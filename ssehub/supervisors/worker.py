"""One worker process: the HTTP app and the fan-out, fed by the node's main process.

A worker subscribes to nothing and reads no stream. Its hub takes numbered entries
from the feed (``feed.py``) instead of numbering messages itself, so ids and history
are the node's: a browser that reconnects to another worker of the node resumes
exactly. ``FeedBroker`` stands where the Broker stands in a single-process hub: it
reads the feed, reports the node's Redis state, and tells streams when a new family
member is live (main subscribes it, for the whole node). ``FeedStreams`` stands
where the StreamReader stands: main reads the streams and says from where; the one
Redis connection a worker may open is for clients of stream channels that resume
from further back than the cache (``XRANGE``).

Started by the supervisor as ``python -m ssehub.supervisors.worker FD``: ``FD`` is its end of a
socketpair; the first frame on it is the snapshot (config, ids, history) it serves
from before it accepts a single connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from .. import logs
from ..config import Config, RedisConfig
from ..core.waiters import Changes
from ..http.proxy_auth import PROXY, ProxyGrant, Unavailable
from ..node import Node
from ..redis.factory import create_replays
from ..redis.pubsub import BrokerState
from ..redis.streams import Entry
from ..server import HubServer
from .feed import Batch, FrameProtocol, FrameReader, Kind, Op
from .process import EXIT_FAILED
from .process import run as run_loop
from .snapshot import Receiver
from .worker_hub import WorkerHub

__all__ = ["FeedBroker", "FeedProxy", "FeedSink", "FeedStreams", "FeedUsers", "main"]

log = logging.getLogger("ssehub.supervisors.worker")  # also when run as __main__

T = TypeVar("T")

# Seconds a stream waits for main to count it against limits.max_per_user.
_USER_ANSWER_TIMEOUT = 5.0
# Seconds past auth.proxy.timeout a stream waits for main's answer from the application.
_PROXY_MARGIN = 1.0


class FeedStreams:
    """The worker's stream side: main reads the streams (one reader for the node) and
    feeds their entries in order with the rest; it tells which streams it reads, from
    where, so that streams here wait for that as a single process waits for its
    reader. Clients resuming from further back than the cache read ``XRANGE`` pages
    through this worker's own replay reader (the Redis layer's), opened on first use.
    """

    def __init__(self, config: RedisConfig, hub: WorkerHub) -> None:
        self.replays = create_replays(config)
        self.hub = hub
        self.state = BrokerState.CONNECTING  # main's stream reader's
        # Streams main reads, each from a position this worker has.
        self.live: set[bytes] = set()
        self._changed = Changes()

    @property
    def ready(self) -> bool:
        return self.state is BrokerState.UP

    # Main follows the streams of the node's channels and members.
    def want(self, keys: Iterable[bytes]) -> None:
        pass

    def drop(self, keys: Iterable[bytes]) -> None:
        pass

    def set_streams(self, keys: Iterable[bytes]) -> None:
        pass

    async def wait_live(self, keys: Iterable[bytes], timeout: float) -> bool:
        """True once main reads every one of ``keys`` (or a stream's member is gone,
        so that the stream ends instead of waiting); False after ``timeout``."""
        wanted = list(keys)
        return await self._changed.until(lambda: self._settled(wanted), timeout)

    def _settled(self, keys: list[bytes]) -> bool:
        return all(k in self.live for k in keys) or not all(self.hub.serves_stream(k) for k in keys)

    def wake(self) -> None:
        self._changed.changed()

    async def read_range(self, key: bytes, after: bytes, until: bytes, count: int) -> list[Entry]:
        """Entries of ``key`` after ``after`` up to ``until``, from Redis."""
        return await self.replays.read_range(key, after, until, count)

    async def first_id(self, key: bytes) -> bytes | None:
        """The id of the oldest entry ``key`` still has."""
        return await self.replays.first_id(key)

    async def run(self) -> None:
        """Hold the replay reader's connections until cancelled."""
        await self.replays.run()


class FeedBroker:
    """The worker's input: the node's feed, read like the broker reads Redis (a
    ``PubSubSource``: the node's Redis state, as main reports it); with ``streams``
    and ``sink``, the worker node's upstream (see node.Feed)."""

    def __init__(self, config: Config, hub: WorkerHub, sock: socket.socket) -> None:
        self.hub = hub
        # Main's subscriber's (main reads Redis for the node; a worker never connects).
        self.state = BrokerState.CONNECTING
        self.reconnects = 0
        self.node: Node | None = None  # the worker's node, once built on this feed
        self._sock = sock
        self.proto: FrameProtocol | None = None
        # Redis channels of members main confirmed live (it subscribes for the node).
        self.live: set[bytes] = set()
        self._changed = Changes()
        self.streams = FeedStreams(config.redis, hub)
        self.sink = FeedSink(self)
        self.users = FeedUsers(self._reply)
        self.proxy = FeedProxy(self._reply, lambda: hub.config)

    @property
    def broker(self) -> FeedBroker:
        """The feed stands where the pub/sub source stands (see node.Feed)."""
        return self

    @property
    def ready(self) -> bool:
        return self.state is BrokerState.UP

    # The node's broker (in main) follows members; a worker's hub asks main instead.
    def want(self, channels: Any) -> None:
        pass

    def drop(self, channels: Any) -> None:
        pass

    def set_channels(self, channels: Any) -> None:
        pass

    async def wait_subscribed(self, channels: Any, timeout: float) -> bool:
        """True once main reports every one of ``channels`` live (or the stream's member
        is gone, so that the stream ends instead of waiting); False after ``timeout``."""
        wanted = list(channels)
        return await self._changed.until(lambda: self._settled(wanted), timeout)

    def _settled(self, channels: list[bytes]) -> bool:
        if all(c in self.live for c in channels):
            return self.state is BrokerState.UP
        return not all(self.hub.serves(c) for c in channels)  # refused or dropped

    def _wake(self) -> None:
        self._changed.changed()
        self.streams.wake()

    async def connect(self, reader: FrameReader) -> None:
        """Take the feed socket over (``reader`` holds what came after the snapshot)."""
        loop = asyncio.get_running_loop()
        proto = FrameProtocol(self._apply, reader)
        await loop.create_unix_connection(lambda: proto, sock=self._sock)
        self.proto = self.hub.upstream = proto

    async def run(self) -> None:
        """Return when main goes away (which ends this worker: its task owner stops it)."""
        assert self.proto is not None
        try:
            await self.proto.lost
            log.warning("feed lost: the main process is gone; stopping")
        finally:
            if self.proto.transport is not None:
                self.proto.transport.close()

    def _apply(self, ops: list[Op]) -> None:
        hub = self.hub
        channels = hub.channels
        deliver = hub.deliver
        for op in ops:
            kind = op[0]
            if kind == Kind.ENTRY:
                e = op[2]
                hub.seq = e[0]
                channel = channels.get(op[1])
                if channel is not None:
                    deliver(channel, e, op[3], op[4])
            else:
                self._control(op)
        hub.advanced()

    def _control(self, op: Op) -> None:
        hub, kind = self.hub, op[0]
        if kind == Kind.MEMBER:
            hub.add_member(op[1], op[2])
        elif kind == Kind.REMOVED:
            channel = hub.remove_member(op[1])
            if channel is not None and channel.stream:
                if not hub.serves_stream(channel.redis):
                    self.streams.live.discard(channel.redis)
            elif channel is not None and not hub.serves(channel.redis):
                self.live.discard(channel.redis)
            self._wake()
        elif kind == Kind.STREAM:
            hub.stream_at(op[1], op[2], op[3])
            if op[3]:
                self.streams.live.add(op[1])
                self.streams.wake()
        elif kind == Kind.USER_ANSWER:
            self.users.answer(op[1], op[2])
        elif kind == Kind.PROXY_ANSWER:
            self.proxy.answer(op[1], op[2])
        elif kind == Kind.STREAM_FAILED:
            # Its streams here end as in one process; new ones wait until main reads it.
            self.streams.live.discard(op[1])
            hub.end_listed_stream(op[1])
            self.streams.wake()
        elif kind == Kind.STREAMS:
            self.streams.state = BrokerState(op[1])
            self.streams.wake()
        elif kind == Kind.LIVE:
            self.live.add(op[1])
            self._wake()
        elif kind == Kind.OUTAGE:
            hub.signal_outage(op[1])
        elif kind == Kind.STATE:
            old, self.state, self.reconnects = self.state, BrokerState(op[1]), op[2]
            if old is not self.state:
                self._wake()
        elif kind == Kind.CONFIG:
            hub.reload(op[1])
            self.streams.live.intersection_update(hub.stream_keys())  # main reads them anew
            if self.node is not None:
                self.node.config = op[1]
        elif kind == Kind.CONTROL:
            if self.node is not None:
                self.node.control.apply(op[1])
        elif kind == Kind.REFUSALS:
            if self.node is not None:
                self.node.control.load(op[1])
        elif kind == Kind.REFUSED:
            hub.refused(op[1])
            self._wake()
        elif kind == Kind.PING:
            self._reply((Kind.PONG, op[1], hub.connections))
        elif kind == Kind.STATS:
            metrics = self.node.metrics if self.node is not None else None
            self._reply((Kind.STATS, list(metrics.registry.collect()) if metrics else []))
        else:
            log.error("unknown feed operation kind=%r", kind)

    def send_ready(self, port: int) -> None:
        """Tell main this worker listens (and so may count towards READY=1)."""
        self._reply((Kind.READY, port))

    def _reply(self, op: Op) -> None:
        if self.proto is not None:
            self.proto.send([op])


class _Asks(Generic[T]):
    """Questions this worker asks main, each by a token, and their answers."""

    def __init__(self, reply: Callable[[Op], None]) -> None:
        self._reply = reply
        self._tokens = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[T]] = {}

    async def ask(self, op: Callable[[int], Op], timeout: float) -> tuple[int, T]:
        """Send ``op(token)``; the token and main's answer. TimeoutError after
        ``timeout`` (main answers within its next loop iteration, unless it is gone, and
        then this worker stops too)."""
        token = next(self._tokens)
        answer: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting[token] = answer
        self._reply(op(token))
        try:
            return token, await asyncio.wait_for(answer, timeout)
        finally:
            self._waiting.pop(token, None)  # an answer still to come finds nobody

    def answer(self, token: int, value: T) -> bool:
        """Hand main's answer to its question; False when nobody waits for it any more."""
        answer = self._waiting.pop(token, None)
        if answer is None or answer.done():
            return False
        answer.set_result(value)
        return True


class FeedUsers:
    """A worker's ``UserGate``: main counts every worker's streams per user (relay.py)
    and answers each hold, so that ``limits.max_per_user`` bounds the node's."""

    def __init__(self, reply: Callable[[Op], None]) -> None:
        self._reply = reply
        self._asks: _Asks[bool] = _Asks(reply)

    async def hold(self, user: str) -> int:
        try:
            token, granted = await self._asks.ask(
                lambda token: (Kind.USER_HOLD, user, token), _USER_ANSWER_TIMEOUT
            )
        except TimeoutError:
            return -1  # no answer in time: a busy answer
        return token if granted else -1

    def answer(self, token: int, granted: bool) -> None:
        if not self._asks.answer(token, granted) and granted:
            self.release(token)  # the stream stopped waiting (it left, or timed out)

    def release(self, token: int) -> None:
        self._reply((Kind.USER_RELEASE, token))


class FeedProxy:
    """A worker's ``auth: proxy`` answers (http/proxy_auth.Remote): main asks the
    application for the node, once per session in flight, and caches its answers."""

    def __init__(self, reply: Callable[[Op], None], get_config: Callable[[], Config]) -> None:
        self._get_config = get_config
        self._asks: _Asks[ProxyGrant | str] = _Asks(reply)

    async def __call__(self, key: str, names: list[str], cookies: dict[str, str]) -> ProxyGrant:
        auth = self._get_config().auth
        timeout = (auth.proxy.timeout if auth and auth.proxy else 0.0) + _PROXY_MARGIN
        try:
            _, result = await self._asks.ask(
                lambda token: (Kind.PROXY_ASK, token, key, names, cookies), timeout
            )
        except TimeoutError:
            raise Unavailable("no answer from the main process") from None
        if isinstance(result, str):
            raise Unavailable(result)
        return result

    def answer(self, token: int, result: ProxyGrant | str) -> None:
        self._asks.answer(token, result)


class FeedSink:
    """A worker's roster sink: its streams' joins and leaves go to the main process,
    which writes them to Redis for the node (one frame per event-loop iteration)."""

    def __init__(self, broker: FeedBroker) -> None:
        self._broker = broker
        self._out = Batch(self._write)
        self.flush = self._out.flush

    def join(self, channel: str, session: str, meta: Any, presence: bool) -> None:
        self._out.push((Kind.JOIN, channel, session, meta, presence))

    def leave(self, channel: str, session: str, meta: Any, reason: str, presence: bool) -> None:
        self._out.push((Kind.LEAVE, channel, session, meta, reason, presence))

    def _write(self, data: bytes) -> None:
        if self._broker.proto is not None:
            self._broker.proto.write(data)

    async def drain(self, timeout: float) -> None:
        """Send what is queued and wait (a while) until the socket took it: at exit."""
        self.flush()
        proto = self._broker.proto
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A plain transport has no "all written" event to wait for; this runs once, at exit.
        while (  # noqa: ASYNC110
            proto is not None
            and proto.transport is not None
            and proto.transport.get_write_buffer_size()
            and loop.time() < deadline
        ):
            await asyncio.sleep(0.01)


async def serve(
    sock: socket.socket, header: dict[str, Any], receiver: Receiver, hub: WorkerHub
) -> int:
    """Serve until SIGTERM (forwarded by main), until main goes away or a task fails;
    returns the exit code."""
    stop = asyncio.Event()
    config: Config = header["config"]
    broker = FeedBroker(config, hub, sock)
    broker.state = BrokerState(header["state"])
    broker.reconnects = header["reconnects"]
    broker.live = set(header["live"])
    broker.streams.live = set(header["streams"])
    broker.streams.state = BrokerState(header["streams_state"])
    # The node a single process builds, with its entries from the feed.
    broker.node = node = Node(config, hub=hub, feed=broker)
    node.tasks.on_failure = stop.set
    # The node's control plane is main's: commands and refusals come in the feed; a
    # session refused here by its credential goes to main, which tells every node.
    node.control.load(header["refusals"])
    node.control.on_refuse = lambda refusal: broker._reply((Kind.REFUSE, refusal))
    node.control.gate = broker.users  # limits.max_per_user: main counts the node's
    # Only SIGTERM, from main: SIGINT and SIGHUP are ignored (see main()).
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = HubServer(config, node=node, reuse_port=True)  # (no systemd: main's)
    server.app[PROXY].remote = broker.proxy  # auth: proxy: main asks for the node
    for ops in receiver.later:
        broker._apply(ops)
    await broker.connect(receiver.reader)
    await server.start()
    broker.send_ready(server.port)
    server.collector.start()  # as the single process does (see http/collector.py)
    try:
        await stop.wait()
        if node.tasks.failed is not None:
            log.error("stopping: a task failed", extra=logs.fields(task=node.tasks.failed))
        log.info("shutting down connections=%d", hub.connections)
    finally:
        await server.stop()
        await broker.sink.drain(1.0)  # the streams' unsubscribes, before the process ends
    return EXIT_FAILED if node.tasks.failed is not None else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ssehub.supervisors.worker FD``: read the snapshot, then serve."""
    args = sys.argv[1:] if argv is None else argv
    # Main forwards what it gets (SIGTERM); a terminal's Ctrl-C or a reload signal
    # sent to the whole group must not stop or confuse a worker on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    sock.setblocking(True)
    receiver = Receiver(sock)
    header = receiver.header()
    logs.setup(header["config"].logging, level=header["log_level"])
    hub = receiver.hub(header)
    sock.setblocking(False)
    return run_loop(serve(sock, header, receiver, hub))


if __name__ == "__main__":
    sys.exit(main())
