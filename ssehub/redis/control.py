"""The node's control plane on the Redis side: the control channel and the refusals kept in Redis.

The node's subscription (the single process's, or the main process's with workers)
carries ``control.redis_channel`` beside the channels -- classic pub/sub, also with
Redis Cluster, so that a message reaches every node whatever node it was published on;
no connection of its own. Each control message (core/control.py) goes to the node's
``Target``: the process's ``Control``, and in a main process on to its workers.

Refused reconnects live in a sorted set ``<control.redis_channel>:refusals`` (member:
the refusal key, score: when it ends, Unix time), expired members pruned on every
write; the set itself expires with its last refusal. Nodes keep the refusals in
memory (checking a connect costs no round trip) and read the set whenever their
subscription (re)starts, so a node that starts, or missed
messages while Redis was away, refuses what the others refuse.

Who writes a refusal: ``POST /disconnect`` before it publishes (the message then
carries ``until``); a message published by someone else without ``until`` is written
by every node that receives it (``ZADD GT``: the same outcome however many do); a
session's refusal by the node that holds the session, which alone knows its
credential, and which publishes it for the others as ``{"refuse": ...}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from redis.exceptions import RedisError

from ..config import Config
from ..core import control
from ..core.control import BadControl, Command, Disconnect, Refuse
from ..logs import fields
from .clients import Client, close, command_client
from .pubsub import BrokerState

__all__ = ["ControlPlane", "Target", "refusals_key"]

log = logging.getLogger(__name__)


class Target(Protocol):
    """What the node does with control commands (its streams, or its workers')."""

    def apply(self, command: Command) -> int: ...
    def load(self, refusals: list[Refuse]) -> None: ...


def refusals_key(config: Config) -> str:
    """The sorted set of refused reconnects."""
    return f"{config.control.redis_channel}:refusals"


class ControlPlane:
    """The control channel's messages and the refusals' store, for one node."""

    def __init__(self, config: Config, target: Target) -> None:
        self.config = config
        self.target = target
        self.channel = config.control.redis_channel.encode()
        self.key = refusals_key(config)
        self._client: Client | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.received = 0  # control messages taken
        self.rejected = 0  # control messages that were not valid

    # --- the channel ----------------------------------------------------------------

    def on_message(self, channel: bytes, payload: bytes) -> None:
        """A control message from the node's subscription: carried out here."""
        try:
            command = control.parse(payload)
        except BadControl as exc:
            self.rejected += 1
            log.warning("control message rejected", extra=fields(reason=str(exc)))
            return
        self.received += 1
        if isinstance(command, Disconnect) and not command.reconnect and not command.until:
            until = time.time() + self._seconds(command)
            command = dataclasses.replace(command, until=until)
            if command.target == "user":
                refusal = Refuse(control.user_key(command.value), until)
                self._spawn(self._store(refusal), "refusal not stored")
        self.target.apply(command)

    def on_state(self, old: BrokerState, new: BrokerState) -> None:
        """Subscribed (again): what was refused meanwhile is read from Redis."""
        if new is BrokerState.UP:
            self._spawn(self._load(), "refusals not read")

    def _seconds(self, command: Disconnect) -> float:
        return command.refuse_seconds or self.config.control.refuse_seconds

    # --- Redis ------------------------------------------------------------------------

    def _redis(self) -> Client:
        if self._client is None:
            redis = self.config.redis
            timeout = redis.health_check_timeout + redis.connect_timeout
            self._client = command_client(redis, socket_timeout=timeout)
        return self._client

    async def _load(self) -> None:
        now = time.time()
        pipe = self._redis().pipeline(transaction=False)
        pipe.zremrangebyscore(self.key, "-inf", now)
        pipe.zrangebyscore(self.key, now, "+inf", withscores=True)
        _, rows = await pipe.execute()
        refusals = [Refuse(member.decode(), float(score)) for member, score in rows]
        self.target.load(refusals)
        log.info("refusals read", extra=fields(refusals=len(refusals)))

    async def _store(self, refusal: Refuse) -> None:
        pipe = self._redis().pipeline(transaction=False)
        pipe.zadd(self.key, {refusal.key: refusal.until}, gt=True)
        pipe.zremrangebyscore(self.key, "-inf", time.time())
        # The set outlives its last refusal by nothing (NX for a new set, GT after).
        pipe.expireat(self.key, int(refusal.until) + 1, nx=True)
        pipe.expireat(self.key, int(refusal.until) + 1, gt=True)
        results = await pipe.execute(raise_on_error=False)
        if isinstance(results[0], Exception):
            raise results[0]

    async def publish(self, command: Command) -> int:
        """``POST /disconnect``: store the refusal it makes (if any), then tell every
        node; returns how many listeners received it (nodes, on one Redis)."""
        if isinstance(command, Disconnect) and not command.reconnect and not command.until:
            until = time.time() + self._seconds(command)
            command = dataclasses.replace(command, until=until)
            if command.target == "user":
                await self._store(Refuse(control.user_key(command.value), until))
        receivers: int = await self._redis().execute_command(
            "PUBLISH", self.channel, control.encode(command)
        )
        return receivers

    def refuse(self, refusal: Refuse) -> None:
        """A session refused by its credential here: store it and tell every node."""

        async def send() -> None:
            await self._store(refusal)
            await self._redis().execute_command("PUBLISH", self.channel, control.encode(refusal))

        self._spawn(send(), "refusal not stored")

    def _spawn(self, coro: Coroutine[Any, Any, None], failure: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except (RedisError, OSError) as exc:
                log.warning(failure, extra=fields(error=str(exc) or type(exc).__name__))

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop what is being written and close the connections."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await close(self._client)
            self._client = None
