"""Redis Sentinel: the same broker, with the master's address asked of the sentinels.

Sentinel is a way to find the address, not a new broker: before every connection
attempt the broker asks the configured sentinels for the master through redis-py's own
Sentinel client (``discover_master``: in order, skipping a sentinel that sees the master
down; the first that answers is asked first next time), connects as usual, and checks
with ``ROLE`` that the node is the master before subscribing. A failover ends the
session in one of three ways — the connection to the old master is lost, a sentinel
publishes ``+switch-master`` (watched on one sentinel's pub/sub at a time), or the node
answers ``ROLE`` as a replica — and the broker's usual reconnect (capped, jittered
backoff) asks the sentinels again. Once it is subscribed on
the new master the hub sees DOWN then UP and tells every stream ``redis_outage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from ..config import RedisConfig
from ..logs import fields
from .clients import FAULTS, close_sentinels, sentinels
from .discovery import Address, show
from .pubsub import Broker, _PubSubProtocol
from .source import Backoff, BrokerState, Parts, SessionEnded

__all__ = ["SentinelBroker"]

log = logging.getLogger(__name__)


class SentinelBroker(Broker):
    """A ``Broker`` whose master is found (and found again) through Redis Sentinel."""

    def __init__(
        self,
        config: RedisConfig,
        channels: Iterable[str | bytes],
        on_message: Callable[[bytes, bytes], None],
        on_state: Callable[[BrokerState, BrokerState], None] | None = None,
    ) -> None:
        super().__init__(config, channels, on_message, on_state)
        assert config.sentinel is not None
        self.master_name = config.sentinel.master
        self.sentinels: list[Address] = config.sentinel.addresses()  # (the watch's)
        self.master: Address | None = None  # as last resolved
        self._finder = sentinels(config)

    def _safe_url(self) -> str:
        where = show(self.master) if self.master is not None else "unresolved"
        return f"sentinel:{self.master_name}@{where}"

    async def resolve(self) -> Address:
        """The master's address according to the first sentinel that knows it."""
        try:
            host, port = await self._finder.discover_master(self.master_name)
        except FAULTS as exc:  # (MasterNotFoundError is a ConnectionError)
            raise SessionEnded(f"no sentinel gave the master: {exc}") from None
        return str(host), int(port)

    async def _connect(self) -> _PubSubProtocol:
        self.master = await self.resolve()
        self._params = {**self._params, "host": self.master[0], "port": self.master[1]}
        return await super()._connect()

    async def _subscribe_all(self, proto: _PubSubProtocol) -> None:
        # A demoted master may still be reachable, and sentinels may lag: only a
        # node that says it is the master gets the subscriptions.
        proto.send("ROLE")
        role = await proto.reply(self.config.connect_timeout)
        if not isinstance(role, list) or not role or role[0] != b"master":
            kind = role[0] if isinstance(role, list) and role else role
            raise SessionEnded(f"{self._safe_url()} is not a master (ROLE {kind!r})")
        await super()._subscribe_all(proto)

    async def run(self) -> None:
        """Run the broker and, beside it, the watch for ``+switch-master``; either
        ending on its own ends this (the process's task owner hears of it)."""
        ended = asyncio.Event()
        parts = Parts(ended)
        parts.spawn(super().run(), "ssehub-sentinel-broker")
        parts.spawn(self._watch_sentinels(), "ssehub-sentinel-watch")
        try:
            await ended.wait()
            parts.check()
        finally:
            await parts.aclose()
            await close_sentinels(self._finder)

    def _on_switch(self, channel: bytes, payload: bytes) -> None:
        # "<name> <old-ip> <old-port> <new-ip> <new-port>"
        parts = payload.split()
        if len(parts) != 5 or parts[0].decode(errors="replace") != self.master_name:
            return
        new = (parts[3].decode(), int(parts[4]))
        log.info("sentinel switch-master", extra=fields(master=self.master_name, new=show(new)))
        proto = self._proto
        if new != self.master and proto is not None and proto.transport is not None:
            proto.transport.abort()  # the session ends; the reconnect resolves again

    async def _watch_sentinels(self) -> None:
        """Follow ``+switch-master`` on one sentinel at a time, moving on when it goes."""
        backoff = Backoff(self.config)
        while True:
            for addr in list(self.sentinels):
                with contextlib.suppress(OSError, SessionEnded):
                    await self._watch_one(addr)
                await backoff.wait()

    async def _watch_one(self, addr: Address) -> None:
        proto = _PubSubProtocol(self._on_switch, _ignore_ack)
        loop = asyncio.get_running_loop()
        try:
            connect = loop.create_connection(lambda: proto, *addr)
            async with asyncio.timeout(self.config.connect_timeout):  # (see query)
                await connect
            proto.send("SUBSCRIBE", "+switch-master")
            await proto.lost
        finally:
            if proto.transport is not None:
                proto.transport.abort()


def _ignore_ack(kind: bytes, channel: bytes) -> None:
    """The watch needs no confirmation: a missed switch is caught by ROLE or a lost link."""
