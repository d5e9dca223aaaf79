"""The main process <-> worker protocol: length-prefixed frames over a local socketpair.

Every frame is a list of operations, each a tuple ``(kind, *args)``. The main process
sends the node's changes in the order they happened -- numbered entries, members
created and dropped, outages, broker state, reloaded configs -- batched: one frame per
event-loop iteration, the same bytes written to every worker, never one per message
or per subscriber. Workers answer pings and stats requests and ask for family members.

Frames are pickled: both ends are this package, started by the main process over a
socketpair nobody else holds, and pickle is the cheapest codec for tuples of ints,
strings and bytes (C on both sides). ``Config`` travels too (its mappings are
read-only proxies, registered below).
"""

from __future__ import annotations

import asyncio
import copyreg
import logging
import pickle
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONFIG",
    "CONTROL",
    "ENTRY",
    "HOLD",
    "JOIN",
    "LEAVE",
    "LIVE",
    "MEMBER",
    "OUTAGE",
    "PING",
    "PONG",
    "READY",
    "REFUSALS",
    "REFUSE",
    "REFUSED",
    "RELEASE",
    "REMOVED",
    "SNAPSHOT",
    "STATE",
    "STATS",
    "STREAM",
    "STREAMS",
    "FrameProtocol",
    "FrameReader",
    "Op",
    "frame",
]

log = logging.getLogger(__name__)

Op = tuple[Any, ...]

# main -> worker, in the node's order
ENTRY = "e"  # (ENTRY, channel name, Entry, publisher_id, except: session ids)
MEMBER = "m"  # (MEMBER, name, marker seq): a family member now lives on the node
REMOVED = "d"  # (REMOVED, name): a member is gone
LIVE = "l"  # (LIVE, redis channel): Redis confirmed a member's subscription
OUTAGE = "o"  # (OUTAGE, seq): Redis was away; positions before seq get a gap
STATE = "s"  # (STATE, BrokerState value, reconnects)
CONFIG = "c"  # (CONFIG, Config): a reload
# (STREAM, key, entry id, started): main reads stream ``key`` on from this entry id (its
# entries up to it came before); started: it just began reading it (the key is live)
STREAM = "v"
STREAMS = "w"  # (STREAMS, BrokerState value): the state of main's stream reader
SNAPSHOT = "n"  # (SNAPSHOT, dict): the node's state, first frame to a new worker
REFUSED = "r"  # (REFUSED, token): a HOLD the node turned away
CONTROL = "k"  # (CONTROL, Command): a control message (core/control.py) for the streams
REFUSALS = "f"  # (REFUSALS, [Refuse]): refused reconnects read from Redis
PING = "p"  # (PING, n)
STATS = "t"  # main: (STATS,) asks; worker: (STATS, [Metric, ...]) answers
# worker -> main
READY = "y"  # (READY, port): listening
PONG = "q"  # (PONG, n, connections)
HOLD = "h"  # (HOLD, name, token): a stream on this worker holds the member
RELEASE = "x"  # (RELEASE, name, token): no stream on this worker holds it any more
JOIN = "j"  # (JOIN, channel, session, meta, presence): a stream registered
LEAVE = "v"  # (LEAVE, channel, session, meta, reason, presence): a stream ended
REFUSE = "u"  # (REFUSE, Refuse): a session here was refused by its credential

_LEN = struct.Struct("!I")


def _proxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


copyreg.pickle(types.MappingProxyType, lambda m: (_proxy, (dict(m),)))


def frame(ops: list[Op]) -> bytes:
    """One frame carrying ``ops``."""
    data = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


class FrameReader:
    """Bytes in, complete frames out; keeps a partial frame for the next bytes."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Op]]:
        buf = self._buf
        buf += data
        frames = []
        start = 0
        end = len(buf)
        while end - start >= 4:
            (size,) = _LEN.unpack_from(buf, start)
            if end - start - 4 < size:
                break
            frames.append(pickle.loads(buf[start + 4 : start + 4 + size]))
            start += 4 + size
        if start:
            del buf[:start]
        return frames


class FrameProtocol(asyncio.Protocol):
    """Reads frames and hands each one's operations to ``on_ops``, synchronously."""

    def __init__(
        self, on_ops: Callable[[list[Op]], None], reader: FrameReader | None = None
    ) -> None:
        self._on_ops = on_ops
        self._reader = FrameReader() if reader is None else reader
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for ops in self._reader.feed(data):
            self._on_ops(ops)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, ops: list[Op]) -> None:
        """Write one frame (dropped when the other side is gone: it is being replaced)."""
        self.write(frame(ops))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
