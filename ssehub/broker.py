"""The Redis side: one pub/sub connection per process, kept alive and resubscribed.

The subscription connection is the hub's only input, and with thousands of channels
it carries tens of thousands of messages a second. It is a bare asyncio protocol
feeding hiredis' C parser, handing each message to the hub synchronously from
``data_received``: no task, future or await per message. redis-py parses the URL.

Faults: a refused or dropped connection, an error reply, and a half-open
connection (no answer to PING within ``health_check_timeout``) all end the session;
the broker then reconnects with capped exponential backoff with full jitter and
resubscribes. It logs state changes, not every retry.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import ssl
import typing
from collections.abc import Callable, Iterable
from typing import Any

import hiredis
from redis.connection import parse_url

from .config import RedisConfig
from .logs import fields

__all__ = ["Broker", "BrokerState"]

log = logging.getLogger(__name__)


class BrokerState(enum.Enum):
    CONNECTING = "connecting"  # never connected yet
    UP = "up"  # subscribed to every channel
    DOWN = "down"  # lost after having been up


class _SessionEnded(Exception):
    """The current connection is unusable; reconnect."""


def _command(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        b = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


class _PubSubProtocol(asyncio.Protocol):
    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        self._on_message = on_message
        self._reader = hiredis.Reader()
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_rx = 0.0

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
            if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                try:
                    on_message(reply[1], reply[2])
                except Exception:  # a bug in delivery must not kill the input
                    log.exception(
                        "delivery failed", extra=fields(channel=reply[1].decode(errors="replace"))
                    )
            else:
                self._replies.put_nowait(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, *args: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise _SessionEnded("connection closed")
        self.transport.write(_command(*args))

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
                raise _SessionEnded(f"redis error: {reply}")
            return reply
        if self.lost.done():
            raise _SessionEnded("connection lost")
        raise _SessionEnded(f"no reply within {timeout:g}s")

    def drain_replies(self) -> list[Any]:
        out = []
        while not self._replies.empty():
            out.append(self._replies.get_nowait())
        return out


class Broker:
    """Keeps one subscription to every channel the hub needs, for as long as it runs."""

    def __init__(
        self,
        config: RedisConfig,
        channels: Iterable[str],
        on_message: Callable[[bytes, bytes], None],
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
    ) -> None:
        self.config = config
        self.channels = list(channels)
        self.state = BrokerState.CONNECTING
        self.reconnects = 0  # sessions established after the first
        self._on_message = on_message
        self._on_state = on_state
        self._params: dict[str, Any] = parse_url(config.url)  # type: ignore[no-untyped-call]
        self._proto: _PubSubProtocol | None = None

    def set_channels(self, channels: Iterable[str]) -> None:
        """Change the subscription (config reload) without dropping the connection.

        Never raises: the new list is kept whatever happens to the connection.
        """
        new = list(channels)
        add = [c for c in new if c not in self.channels]
        drop = [c for c in self.channels if c not in new]
        self.channels = new
        proto = self._proto
        if proto is None or not (add or drop):
            return  # the next session subscribes to the new list
        if self.state is not BrokerState.UP:
            # Mid-handshake with the old list: start over with the new one.
            if proto.transport is not None:
                proto.transport.abort()
            return
        # Confirmations arrive as replies; the health-check loop reads and drops them.
        try:
            if add:
                proto.send("SUBSCRIBE", *add)
            if drop:
                proto.send("UNSUBSCRIBE", *drop)
        except _SessionEnded:
            # The connection is going (its loss not yet seen): the next session
            # subscribes to the new list. Never raise into the reload.
            if proto.transport is not None:
                proto.transport.abort()

    @property
    def ready(self) -> bool:
        """True while subscribed to every channel on a healthy connection."""
        return self.state is BrokerState.UP

    def _set_state(self, state: BrokerState, why: str = "") -> None:
        old = self.state
        if state is old:
            return
        self.state = state
        if state is BrokerState.UP:
            log.info(
                "redis subscribed", extra=fields(url=self._safe_url(), channels=len(self.channels))
            )
        else:
            log.warning("redis down", extra=fields(url=self._safe_url(), reason=why))
        if self._on_state is not None:
            try:
                self._on_state(old, state)
            except Exception:  # like delivery: a listener's bug must not end the subscription
                log.exception(
                    "redis state listener failed", extra=fields(old=old.value, new=state.value)
                )

    def _safe_url(self) -> str:
        p = self._params
        if "path" in p:
            return f"unix://{p['path']}"
        return f"{p.get('host', '127.0.0.1')}:{p.get('port', 6379)}"

    async def run(self) -> None:
        """Connect, subscribe and read forever; cancel the task to stop."""
        attempt = 0
        first_failure_logged = False
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure of an attempt: log, back off, retry
                why = str(exc) or type(exc).__name__
                if not isinstance(exc, (OSError, _SessionEnded)):  # not a network fault: a bug?
                    why = f"{type(exc).__name__}: {why}"
                if self.state is BrokerState.UP:
                    attempt = 0
                    self._set_state(BrokerState.DOWN, why)
                elif not first_failure_logged:
                    log.warning(
                        "redis unavailable, retrying",
                        extra=fields(url=self._safe_url(), reason=why),
                    )
                first_failure_logged = True
            cap = min(self.config.reconnect_max, self.config.reconnect_min * 2**attempt)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(random.uniform(self.config.reconnect_min / 2, cap))

    async def _connect(self) -> _PubSubProtocol:
        loop = asyncio.get_running_loop()
        p = self._params
        proto = _PubSubProtocol(self._on_message)
        if "path" in p:
            coro = loop.create_unix_connection(lambda: proto, p["path"])
        else:
            tls: ssl.SSLContext | None = None
            if self.config.url.startswith("rediss://"):
                tls = ssl.create_default_context()
            coro = loop.create_connection(
                lambda: proto, p.get("host", "127.0.0.1"), p.get("port", 6379), ssl=tls
            )
        await asyncio.wait_for(coro, self.config.connect_timeout)
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
            if self.channels:
                proto.send("SUBSCRIBE", *self.channels)
                for _ in self.channels:
                    await proto.reply(cfg.connect_timeout)
            if self.state is not BrokerState.CONNECTING:
                self.reconnects += 1
            self._set_state(BrokerState.UP)
            await self._watch(proto)
        finally:
            self._proto = None
            if proto.transport is not None:
                proto.transport.abort()

    async def _watch(self, proto: _PubSubProtocol) -> None:
        """Health-check the idle connection until it is lost or stops answering."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        ping_sent: float | None = None
        tick = min(cfg.health_check_interval, cfg.health_check_timeout) / 2
        while True:
            await asyncio.wait({proto.lost}, timeout=tick)
            if proto.lost.done():
                raise _SessionEnded("connection lost")
            for reply in proto.drain_replies():
                if isinstance(reply, hiredis.ReplyError):
                    raise _SessionEnded(f"redis error: {reply}")
            now = loop.time()
            if ping_sent is not None:
                if proto.last_rx >= ping_sent:
                    ping_sent = None
                elif now - ping_sent > cfg.health_check_timeout:
                    raise _SessionEnded(
                        f"no answer to PING within {cfg.health_check_timeout:g}s (half-open?)"
                    )
            if ping_sent is None and now - proto.last_rx >= cfg.health_check_interval:
                proto.send("PING")
                ping_sent = now
