"""Publishing for ``POST /publish``: PUBLISH, SPUBLISH or XADD, batched, optionally idempotent.

A request's messages go out as **one pipeline** (one round trip; with Cluster, one per
master involved), each answered with what Redis said: the receivers of a PUBLISH or
SPUBLISH, the entry id of an XADD.

**Idempotency.** With an ``Idempotency-Key``, each message runs as one Lua script
that looks up its key, publishes only when the key is absent, and stores
``<fingerprint> <answer>`` under it for the window -- all in one atomic step inside
Redis. So there is no moment between publishing and recording: a hub that dies after
sending the script either had Redis run all of it or none of it, and two requests
with the same key racing on two nodes are serialised by Redis (the second gets the
first's answer). The fingerprint is a digest of the message; the same key with another
message is a conflict rather than a silent replay of something else. A batch's
messages are keyed one by one (``<key>:<index>``), so a batch cut off half-way by a
lost connection publishes only the rest when retried. Each message's key carries the
hash tag of its channel (or stream key), so with Redis Cluster the script's keys and
the channel it publishes to live on the same master.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ResponseError

from ..config import RedisConfig
from .clients import Client, close, command_client

__all__ = ["Conflict", "Message", "Publisher", "Replayed", "hash_tag", "idempotency_key"]

# Requests in flight to Redis at once, per process: past it they queue here rather
# than opening ever more connections.
_CONCURRENCY = 32

# Looks the key up, publishes only without it, stores "<fingerprint> <answer>".
# KEYS[1]: the idempotency key; KEYS[2] (XADD): the stream key.
# ARGV: window ms, fingerprint, command, target, then the payload, or (XADD) the
# MAXLEN (0: none) and the fields.
_SCRIPT = """
local seen = redis.call('GET', KEYS[1])
if seen then return {1, seen} end
local answer
if ARGV[3] == 'XADD' then
  local args = {KEYS[2]}
  local maxlen = tonumber(ARGV[5])
  if maxlen > 0 then
    table.insert(args, 'MAXLEN'); table.insert(args, '~'); table.insert(args, maxlen)
  end
  table.insert(args, '*')
  for i = 6, #ARGV do table.insert(args, ARGV[i]) end
  answer = redis.call('XADD', unpack(args))
else
  answer = redis.call(ARGV[3], ARGV[4], ARGV[5])
end
local stored = ARGV[2] .. ' ' .. answer
redis.call('SET', KEYS[1], stored, 'PX', ARGV[1])
return {0, stored}
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One message to send: ``PUBLISH``/``SPUBLISH`` a payload, or ``XADD`` fields."""

    command: str  # "PUBLISH", "SPUBLISH" or "XADD"
    target: bytes  # the Redis channel or stream key
    payload: bytes = b""  # PUBLISH / SPUBLISH
    fields: tuple[tuple[bytes, bytes], ...] = ()  # XADD
    maxlen: int = 0  # XADD: trim to about this many entries (0: leave it)

    def fingerprint(self) -> str:
        """A digest of everything the message does (an idempotency key's owner)."""
        digest = hashlib.sha256(b"%s\0%s\0%d\0" % (self.command.encode(), self.target, self.maxlen))
        digest.update(self.payload)
        for name, value in self.fields:
            digest.update(b"\0%d:%s%d:%s" % (len(name), name, len(value), value))
        return digest.hexdigest()[:32]


class Replayed:
    """The answer stored for an idempotency key: this message was published before."""

    __slots__ = ("answer",)

    def __init__(self, answer: int | str) -> None:
        self.answer = answer


class Conflict(Exception):
    """The idempotency key was used for another message within its window."""


def hash_tag(key: bytes) -> bytes:
    """What Redis Cluster hashes for ``key``: the part between the first ``{`` and the
    next ``}`` when not empty, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@functools.lru_cache(maxsize=1024)
def _slot_tag(target: bytes) -> bytes:
    """A hash tag in the slot of ``target``: its own, unless that holds a brace (a name
    such as ``{}x``), which cannot be written inside one; then a short one found."""
    tag = hash_tag(target)
    if b"{" not in tag and b"}" not in tag:
        return tag
    slot = key_slot(target)
    return next(t for n in itertools.count() if key_slot(t := b"s%d" % n) == slot)


def idempotency_key(key: str, index: int, target: bytes) -> bytes:
    """The Redis key remembering message ``index`` of a request sent with ``key``; in
    the slot of ``target`` (Redis Cluster: the script's keys and channel on one master)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return b"ssehub:idem:{%s}:%s:%d" % (_slot_tag(target), digest.encode(), index)


def _answer(message: Message, raw: Any) -> int | str:
    if message.command == "XADD":
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(raw)


class Publisher:
    """Sends ``POST /publish``'s messages (its own connections, opened on first use)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self._client: Client | None = None
        self._slots = asyncio.Semaphore(_CONCURRENCY)

    def _redis(self) -> Client:
        if self._client is None:
            timeout = self.config.health_check_timeout + self.config.connect_timeout
            self._client = command_client(self.config, socket_timeout=timeout)
        return self._client

    async def send(
        self, messages: list[Message], key: str | None = None, window: float = 300.0
    ) -> list[int | str | Replayed | Exception]:
        """Send ``messages`` in one pipeline; each one's answer, in order.

        An answer is the receivers (int) or entry id (str); ``Replayed`` when ``key``
        had already published it; a ``ResponseError`` Redis gave for that message, or a
        ``Conflict``. Redis unreachable raises (``RedisError``/``OSError``).
        """
        async with self._slots:
            redis = self._redis()
            # One message (the common request) without a pipeline's bookkeeping.
            batch: Any = _One(redis) if len(messages) == 1 else redis.pipeline(transaction=False)
            for i, m in enumerate(messages):
                if key is None:
                    _queue(batch, m)
                else:
                    _queue_once(batch, m, idempotency_key(key, i, m.target), window)
            results = await batch.execute(raise_on_error=False)
        out: list[int | str | Replayed | Exception] = []
        for m, raw in zip(messages, results, strict=True):
            if isinstance(raw, Exception):
                out.append(raw)
            elif key is None:
                out.append(_answer(m, raw))
            else:
                out.append(_stored(m, raw))
        return out

    async def close(self) -> None:
        if self._client is not None:
            await close(self._client)
            self._client = None


class _One:
    """A pipeline's interface for a single command, sent as it is: one round trip, no
    pipeline object (a ResponseError comes back as the answer, as a pipeline's would)."""

    __slots__ = ("_call", "_redis")

    def __init__(self, redis: Client) -> None:
        self._redis = redis
        self._call: tuple[Any, ...] = ()

    def execute_command(self, *args: Any) -> None:
        self._call = args

    def xadd(self, name: bytes, fields: Any, maxlen: int | None, approximate: bool) -> None:
        args: list[Any] = ["XADD", name]
        if maxlen:
            args += ["MAXLEN", "~" if approximate else "=", maxlen]
        args.append("*")
        for field, value in fields.items():
            args += [field, value]
        self._call = tuple(args)

    async def execute(self, raise_on_error: bool = False) -> list[Any]:
        try:
            return [await self._redis.execute_command(*self._call)]
        except ResponseError as exc:
            return [exc]


def _queue(pipe: Any, m: Message) -> None:
    if m.command == "XADD":
        fields = dict(m.fields)
        pipe.xadd(m.target, fields, maxlen=m.maxlen or None, approximate=True)
    else:
        # execute_command, not pipe.publish(): redis-py's cluster pipeline refuses the
        # latter, though the command itself is fine there (any node carries it).
        pipe.execute_command(m.command, m.target, m.payload)


def _queue_once(pipe: Any, m: Message, key: bytes, window: float) -> None:
    ms = max(1, int(window * 1000))
    if m.command == "XADD":
        args: list[Any] = [2, key, m.target, ms, m.fingerprint(), m.command, m.target, m.maxlen]
        for name, value in m.fields:
            args += [name, value]
    else:
        args = [1, key, ms, m.fingerprint(), m.command, m.target, m.payload]
    pipe.execute_command("EVAL", _SCRIPT, *args)


def _stored(m: Message, raw: Any) -> int | str | Replayed | Exception:
    seen, stored = int(raw[0]), raw[1].decode()
    fingerprint, _, answer = stored.partition(" ")
    if fingerprint != m.fingerprint():
        return Conflict("the Idempotency-Key was used for another message")
    value = answer if m.command == "XADD" else int(answer)
    return Replayed(value) if seen else value
