"""The Redis side: one pub/sub connection per process, kept alive and resubscribed.

The subscription connection is the hub's only input, and with thousands of channels
it carries tens of thousands of messages a second. It is a bare asyncio protocol
feeding hiredis' C parser, handing each message to the hub synchronously from
``data_received``: no task, future or await per message. redis-py parses the URL.

Faults: a refused or dropped connection, an error reply, and a half-open
connection (no answer to PING within ``health_check_timeout``) all end the session;
the broker then reconnects with capped exponential backoff with full jitter and
resubscribes (the state machine every source shares: source.py). It logs state
changes, not every retry. Each connect reads ``INFO``: a Redis too old is refused
(info.py), and when Redis had closed the last connection itself the likely cause is
logged (a message past ``client-output-buffer-limit pubsub``, say).

Subscriptions change while the connection lives: the hub asks for Redis channels with
``want()`` and gives them up with ``drop()`` (family members come and go with their
browsers). Changes made within one event-loop iteration go out as one ``SUBSCRIBE``
and one ``UNSUBSCRIBE`` command, so a reconnect storm over thousands of members costs
a few commands, not a round trip per browser. Redis confirms each channel; a stream
that must not start before its channel is live awaits ``wait_subscribed()``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import typing
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import hiredis
from redis.connection import parse_url

from ..config import RedisConfig
from ..core.waiters import Waiters
from ..logs import fields
from .discovery import command
from .info import MIN_SHARDED_VERSION, MIN_VERSION, CloseDiagnosis, check_version, parse_info
from .source import BrokerState, SessionEnded, Source

__all__ = ["Broker", "BrokerState", "PubSubSource"]

log = logging.getLogger(__name__)


# Channels per SUBSCRIBE/UNSUBSCRIBE command: big enough that a storm of thousands
# of new members is a handful of commands, small enough to keep each one short.
_BATCH = 1000
# Seconds subscription changes wait for others to join them in one command.
_BATCH_WINDOW = 0.01
# Subscription confirmations, classic and sharded (Redis Cluster's SSUBSCRIBE), by kind.
_ACKS = {
    b"subscribe": b"subscribe",
    b"unsubscribe": b"unsubscribe",
    b"ssubscribe": b"subscribe",
    b"sunsubscribe": b"unsubscribe",
}


def _key(channel: str | bytes) -> bytes:
    return channel.encode() if isinstance(channel, str) else channel


def _confirm_timeout(config: RedisConfig, channels: int) -> float:
    """Time allowed for Redis to confirm ``channels`` subscriptions (more for many)."""
    return config.connect_timeout * (1 + channels / 50_000)


class _PubSubProtocol(asyncio.Protocol):
    def __init__(
        self,
        on_message: Callable[[bytes, bytes], None],
        on_ack: Callable[[bytes, bytes], None],
    ) -> None:
        self._on_message = on_message
        self._on_ack = on_ack
        self._reader = hiredis.Reader()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Set at the first error reply, so that a wait for confirmations ends at once.
        self.error: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx = 0.0
        self.closed_by_redis = False  # Redis closed the connection (not us, not the network)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_rx = asyncio.get_running_loop().time()
        reader = self._reader
        reader.feed(data)
        on_message = self._on_message
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                log.error("redis protocol error", extra=fields(error=str(exc)))
                if self.transport is not None:
                    self.transport.abort()
                return
            if reply is False:
                return
            if type(reply) is list and len(reply) == 3:
                kind = reply[0]
                if kind == b"message" or kind == b"smessage":
                    try:
                        on_message(reply[1], reply[2])
                    except Exception:  # a bug in delivery must not kill the input
                        log.exception(
                            "delivery failed",
                            extra=fields(channel=reply[1].decode(errors="replace")),
                        )
                    continue
                ack = _ACKS.get(kind) if type(kind) is bytes else None
                if ack is not None:
                    self._on_ack(ack, reply[1])
                    continue
            if isinstance(reply, hiredis.ReplyError) and not self.error.done():
                self.error.set_result(None)
            self._replies.put_nowait(reply)

    def eof_received(self) -> None:
        self.closed_by_redis = True  # (then connection_lost: the transport closes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, *args: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise SessionEnded("connection closed")
        self.transport.write(command(*args))

    def send_batched(self, command: str, channels: list[bytes]) -> None:
        """``command`` over ``channels``, a bounded number of arguments per command."""
        for i in range(0, len(channels), _BATCH):
            self.send(command, *channels[i : i + _BATCH])

    async def reply(self, timeout: float) -> Any:
        """The next non-message reply (subscribe confirmations, pong, errors)."""
        get = asyncio.ensure_future(self._replies.get())
        try:
            done, _ = await asyncio.wait(
                {get, self.lost}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not get.done():
                get.cancel()
        if get in done:
            reply = get.result()
            if isinstance(reply, hiredis.ReplyError):
                raise SessionEnded(f"redis error: {reply}")
            return reply
        if self.lost.done():
            raise SessionEnded("connection lost")
        raise SessionEnded(f"no reply within {timeout:g}s")

    def drain_replies(self) -> list[Any]:
        out = []
        while not self._replies.empty():
            out.append(self._replies.get_nowait())
        return out


class PubSubSource(Protocol):
    """What the hub, the HTTP app and the metrics need of the pub/sub side: a ``Broker``
    (or its Sentinel and Cluster forms) where the node reads Redis, a worker's feed
    (``supervisors/worker.py``) where main reads it for the node."""

    state: BrokerState
    reconnects: int

    @property
    def ready(self) -> bool: ...
    def want(self, channels: Iterable[bytes]) -> None: ...
    def drop(self, channels: Iterable[bytes]) -> None: ...
    def set_channels(self, channels: Iterable[str | bytes]) -> None: ...
    async def wait_subscribed(self, channels: Iterable[bytes], timeout: float) -> bool: ...
    async def run(self) -> None: ...


class Broker(Source):
    """Keeps the Redis subscriptions the hub wants, for as long as it runs."""

    log = log
    up_line = "redis subscribed"
    down_line = "redis down"
    unavailable_line = "redis unavailable, retrying"

    # Redis Cluster's sharded pub/sub (ssehub/redis/cluster.py) uses SSUBSCRIBE/SUNSUBSCRIBE.
    subscribe_command = "SUBSCRIBE"
    unsubscribe_command = "UNSUBSCRIBE"

    def __init__(
        self,
        config: RedisConfig,
        channels: Iterable[str | bytes],
        on_message: Callable[[bytes, bytes], None],
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
    ) -> None:
        super().__init__(config, on_state)
        self._on_message = on_message
        # One node's address and credentials (a ClusterBroker gives its first seed's).
        self._params: dict[str, Any] = parse_url(config.url)  # type: ignore[no-untyped-call]
        self._proto: _PubSubProtocol | None = None
        # What the hub wants; what Redis confirmed on this connection; and the
        # changes not yet sent (deltas against what the connection was told).
        self.wanted: set[bytes] = {_key(c) for c in channels}
        self.subscribed: set[bytes] = set()
        # Commands sent per channel and not yet confirmed: a channel counts as
        # subscribed only once the last of them (a SUBSCRIBE) is, so a drop and a
        # quick re-want never pass for live in between.
        self._unconfirmed: Counter[bytes] = Counter()
        self._add: set[bytes] = set()
        self._remove: set[bytes] = set()
        self._flush_scheduled = False
        self._last_flush = 0.0
        # The connection that has been sent the full subscription: deltas go to it.
        self._live: _PubSubProtocol | None = None
        # Confirmations still expected before the session counts as up.
        self._awaiting: set[bytes] = set()
        self._all_confirmed: asyncio.Future[None] | None = None
        # One future per channel someone awaits (shared, never one per stream).
        self._waiters = Waiters()
        # Why Redis closed the last connection, if it did (told at the next connect).
        self._diagnosis = CloseDiagnosis()
        self._closed_by_redis = False

    @property
    def channels(self) -> list[str]:
        """The Redis channels wanted, by name."""
        return sorted(c.decode(errors="backslashreplace") for c in self.wanted)

    def want(self, channels: Iterable[bytes]) -> None:
        """Subscribe to ``channels`` (batched with every other change this iteration)."""
        for c in channels:
            if c in self.wanted:
                continue
            self.wanted.add(c)
            if c in self._remove:
                self._remove.discard(c)  # never unsubscribed on the wire: keep it
                self._kept(c)
            else:
                self._add.add(c)
        self._schedule_flush()

    def _kept(self, channel: bytes) -> None:
        """``channel`` was dropped and wanted again before the UNSUBSCRIBE went out."""
        # drop() took it out of `subscribed`; if Redis had confirmed it, it still is
        # subscribed (else its confirmation, on the way, puts it back).
        if self._live is not None and not self._unconfirmed[channel]:
            self.subscribed.add(channel)
            self._waiters.wake(channel)

    def drop(self, channels: Iterable[bytes]) -> None:
        """Unsubscribe from ``channels`` (batched like ``want``)."""
        for c in channels:
            if c not in self.wanted:
                continue
            self.wanted.discard(c)
            if c in self._add:
                self._add.discard(c)  # never sent
            else:
                self._remove.add(c)
            self.subscribed.discard(c)
            self._waiters.forget(c)
        self._schedule_flush()

    def set_channels(self, channels: Iterable[str | bytes]) -> None:
        """Make the subscription exactly ``channels`` (on the live connection)."""
        new = {_key(c) for c in channels}
        self.drop(self.wanted - new)
        self.want(new - self.wanted)

    async def wait_subscribed(self, channels: Iterable[bytes], timeout: float) -> bool:
        """True once Redis confirmed every one of ``channels``; False after ``timeout``."""
        return await self._waiters.wait(channels, self.subscribed.__contains__, timeout)

    def _schedule_flush(self) -> None:
        if self._flush_scheduled or not (self._add or self._remove):
            return
        self._flush_scheduled = True
        # Like Nagle: a change after a quiet spell goes out in the next iteration;
        # changes within a window of the last command wait for it to pass, so that
        # a reconnect storm's arrivals, spread over many iterations, share commands.
        loop = asyncio.get_running_loop()
        wait = self._last_flush + _BATCH_WINDOW - loop.time()
        if wait > 0:
            loop.call_later(wait, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._last_flush = asyncio.get_running_loop().time()
        add, self._add = sorted(self._add), set()
        remove, self._remove = sorted(self._remove), set()
        proto = self._live
        if proto is None:
            return  # the next session subscribes to everything wanted
        try:
            if add:
                self._send(proto, self.subscribe_command, add)
            if remove:
                self._send(proto, self.unsubscribe_command, remove)
        except SessionEnded:
            pass  # the connection is going; the next session starts from `wanted`

    def _send(self, proto: _PubSubProtocol, command: str, channels: list[bytes]) -> None:
        proto.send_batched(command, channels)
        self._unconfirmed.update(channels)

    def _on_ack(self, kind: bytes, channel: bytes) -> None:
        if self._awaiting and kind == b"subscribe":
            self._awaiting.discard(channel)
            done = self._all_confirmed
            if not self._awaiting and done is not None and not done.done():
                done.set_result(None)
        left = self._unconfirmed[channel] - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return  # more changes on the way: not settled yet
        del self._unconfirmed[channel]
        if kind == b"unsubscribe" or channel not in self.wanted:
            self.subscribed.discard(channel)
            return
        self.subscribed.add(channel)
        self._waiters.wake(channel)

    def where(self) -> dict[str, Any]:
        return {"url": self._safe_url()}

    def up_fields(self) -> dict[str, Any]:
        return {"channels": len(self.wanted)}

    def _safe_url(self) -> str:
        p = self._params
        if "path" in p:
            return f"unix://{p['path']}"
        return f"{p.get('host', '127.0.0.1')}:{p.get('port', 6379)}"

    async def run(self) -> None:
        """Connect, subscribe and read forever; cancel the task to stop."""
        await self.reconnect_forever(self._session)

    async def _connect(self) -> _PubSubProtocol:
        loop = asyncio.get_running_loop()
        p = self._params
        proto = _PubSubProtocol(self._on_message, self._on_ack)
        if "path" in p:
            coro = loop.create_unix_connection(lambda: proto, p["path"])
        else:
            tls: ssl.SSLContext | None = None
            if self.config.url.startswith("rediss://"):
                tls = ssl.create_default_context()
            coro = loop.create_connection(
                lambda: proto, p.get("host", "127.0.0.1"), p.get("port", 6379), ssl=tls
            )
        async with asyncio.timeout(self.config.connect_timeout):  # (not wait_for: see query)
            await coro
        return proto

    async def _session(self) -> None:
        cfg = self.config
        proto = await self._connect()
        self._proto = proto
        try:
            password = self._params.get("password")
            if password:
                username = self._params.get("username")
                proto.send(*(("AUTH", username, password) if username else ("AUTH", password)))
                await proto.reply(cfg.connect_timeout)
            self._check_server(parse_info(await self._ask(proto, "INFO")))
            await self._subscribe_all(proto)
            self.mark_up()
            await self._watch(proto)
        finally:
            self._closed_by_redis = proto.closed_by_redis
            self._proto = None
            self._live = None
            self.subscribed.clear()
            self._unconfirmed.clear()
            self._awaiting.clear()
            if proto.transport is not None:
                proto.transport.abort()

    async def _ask(self, proto: _PubSubProtocol, *args: str) -> Any:
        proto.send(*args)
        return await proto.reply(self.config.connect_timeout)

    def _check_server(self, info: dict[str, str]) -> None:
        """Refuse a Redis too old; say why the last connection was closed, if Redis did."""
        sharded = self.subscribe_command == "SSUBSCRIBE"
        check_version(info, MIN_SHARDED_VERSION if sharded else MIN_VERSION, self._safe_url())
        if self._closed_by_redis:
            self._closed_by_redis = False
            log.warning(
                "redis had closed the subscription connection",
                extra=fields(
                    url=self._safe_url(),
                    cause=self._diagnosis.cause(info),
                    effect="what was published meanwhile is lost: streams get a gap event",
                ),
            )
        self._diagnosis.seen(info)

    async def _subscribe_all(self, proto: _PubSubProtocol) -> None:
        """Subscribe the new connection to everything wanted; wait for Redis to confirm."""
        # One synchronous step: from here on, changes are deltas sent to this connection.
        channels = sorted(self.wanted)
        self._add.clear()
        self._remove.clear()
        self._live = proto
        if not channels:
            return
        self._awaiting = set(channels)
        self._all_confirmed = asyncio.get_running_loop().create_future()
        self._send(proto, self.subscribe_command, channels)
        done, _ = await asyncio.wait(
            {self._all_confirmed, proto.lost, proto.error},
            timeout=_confirm_timeout(self.config, len(channels)),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._all_confirmed not in done:
            for reply in proto.drain_replies():
                if isinstance(reply, hiredis.ReplyError):
                    raise SessionEnded(f"redis error: {reply}")
            if proto.lost.done():
                raise SessionEnded("connection lost")
            raise SessionEnded(f"{len(self._awaiting)} subscriptions not confirmed in time")

    async def _watch(self, proto: _PubSubProtocol) -> None:
        """Health-check the idle connection until it is lost or stops answering."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        ping_sent: float | None = None
        tick = min(cfg.health_check_interval, cfg.health_check_timeout) / 2
        while True:
            await asyncio.wait({proto.lost}, timeout=tick)
            if proto.lost.done():
                closed = "closed by redis" if proto.closed_by_redis else "lost"
                raise SessionEnded(f"connection {closed}")
            for reply in proto.drain_replies():
                if isinstance(reply, hiredis.ReplyError):
                    raise SessionEnded(f"redis error: {reply}")
            now = loop.time()
            if ping_sent is not None:
                if proto.last_rx >= ping_sent:
                    ping_sent = None
                elif now - ping_sent > cfg.health_check_timeout:
                    raise SessionEnded(
                        f"no answer to PING within {cfg.health_check_timeout:g}s (half-open?)"
                    )
            if ping_sent is None and now - proto.last_rx >= cfg.health_check_interval:
                proto.send("PING")
                ping_sent = now
