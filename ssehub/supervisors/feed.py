"""The main process <-> worker protocol: length-prefixed frames over a local socketpair.

Every frame is a list of operations, each a tuple ``(Kind, *args)``. The main process
sends the node's changes in the order they happened -- numbered entries, members
created and dropped, outages, broker state, reloaded configs -- batched: one frame per
event-loop iteration, the same bytes written to every worker, never one per message
or per subscriber. Workers answer pings and stats requests and ask for family members.

Frames are pickled: both ends are this package, started by the main process over a
socketpair nobody else holds, and pickle is the cheapest codec for tuples of ints,
strings and bytes (C on both sides). ``Config`` travels too (its mappings are
read-only proxies, registered below). Nothing with live state travels: a new worker's
snapshot is the node's entries as data (snapshot.py), in frames of bounded size that
the socket's flow control paces (``FrameProtocol.drained``).
"""

from __future__ import annotations

import asyncio
import copyreg
import enum
import logging
import pickle
import struct
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["Batch", "FrameProtocol", "FrameReader", "Kind", "Op", "frame"]

log = logging.getLogger(__name__)

Op = tuple[Any, ...]


@enum.unique
class Kind(enum.IntEnum):
    """What an operation says: its first element. Unique values, checked at import."""

    # main -> worker, in the node's order
    ENTRY = 1  # (ENTRY, channel name, Entry, publisher_id, except: session ids)
    MEMBER = 2  # (MEMBER, name, marker seq): a family member now lives on the node
    REMOVED = 3  # (REMOVED, name): a member is gone
    LIVE = 4  # (LIVE, redis channel): Redis confirmed a member's subscription
    OUTAGE = 5  # (OUTAGE, seq): Redis was away; positions before seq get a gap
    STATE = 6  # (STATE, BrokerState value, reconnects)
    CONFIG = 7  # (CONFIG, Config): a reload
    # (STREAM, key, entry id, started): main reads stream ``key`` on from this entry
    # id (its entries up to it came before); started: it just began reading it (live)
    STREAM = 8
    STREAMS = 9  # (STREAMS, BrokerState value): the state of main's stream reader
    REFUSED = 10  # (REFUSED, token): a HOLD the node turned away
    PING = 11  # (PING, n)
    STATS = 12  # main: (STATS,) asks; worker: (STATS, [Metric, ...]) answers
    CONTROL = 13  # (CONTROL, Command): a control message (core/control.py) for the streams
    REFUSALS = 14  # (REFUSALS, [Refuse]): refused reconnects read from Redis
    # (STREAM_FAILED, key): main's reader was refused a listed channel's stream key (it
    # asks again at each heartbeat, and says STREAM ... started once it reads it)
    STREAM_FAILED = 15
    USER_ANSWER = 16  # (USER_ANSWER, token, granted): main's answer to a USER_HOLD
    # (PROXY_ANSWER, token, ProxyGrant | str): the application's answer to a PROXY_ASK,
    # or why there is none (the application unavailable)
    PROXY_ANSWER = 17
    # main -> a new worker, before anything else (see snapshot.py)
    SNAPSHOT = 20  # (SNAPSHOT, dict): the node's state but its histories
    HISTORY = 21  # (HISTORY, channel name, [Entry, ...], [seq with a publisher id, ...])
    SNAPSHOT_END = 22  # (SNAPSHOT_END,): the snapshot is complete
    # worker -> main
    READY = 30  # (READY, port): listening
    PONG = 31  # (PONG, n, connections)
    HOLD = 32  # (HOLD, name, token): a stream on this worker holds the member
    RELEASE = 33  # (RELEASE, name, token): no stream on this worker holds it any more
    JOIN = 34  # (JOIN, channel, session, meta, presence): a stream registered
    LEAVE = 35  # (LEAVE, channel, session, meta, reason, presence): a stream ended
    REFUSE = 36  # (REFUSE, Refuse): a session here was refused by its credential
    # (USER_HOLD, user, token): one more stream of ``user`` here (limits.max_per_user
    # counts the node's); USER_RELEASE (token): it ended, or never registered
    USER_HOLD = 37
    USER_RELEASE = 38
    # (PROXY_ASK, token, key, channel names, cookies): an ``auth: proxy`` stream here
    # (main asks the application, once per session in flight on the node, and caches)
    PROXY_ASK = 39


_LEN = struct.Struct("!I")


def _proxy(items: dict[Any, Any]) -> types.MappingProxyType[Any, Any]:
    return types.MappingProxyType(items)


copyreg.pickle(types.MappingProxyType, lambda m: (_proxy, (dict(m),)))


def frame(ops: list[Op]) -> bytes:
    """One frame carrying ``ops``."""
    data = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


class Batch:
    """The operations of one event-loop iteration, sent as one frame to ``write`` (never
    a frame per message, stream or subscriber)."""

    __slots__ = ("_ops", "_scheduled", "_write")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._ops: list[Op] = []
        self._scheduled = False

    def push(self, op: Op) -> None:
        """``op`` in this iteration's frame, in order."""
        self._ops.append(op)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """The frame now, with everything pushed since the last one."""
        self._scheduled = False
        if not self._ops:
            return
        data = frame(self._ops)
        self._ops = []
        self._write(data)


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
    """Reads frames and hands each one's operations to ``on_ops``, synchronously; tells
    when what it wrote is down to the transport's low-water mark (``drained``)."""

    def __init__(
        self, on_ops: Callable[[list[Op]], None], reader: FrameReader | None = None
    ) -> None:
        self._on_ops = on_ops
        self._reader = FrameReader() if reader is None else reader
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for ops in self._reader.feed(data):
            self._on_ops(ops)

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()  # nothing waits for a socket that is gone
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def drained(self) -> None:
        """Until the transport's buffer is below its low-water mark (or the socket is gone)."""
        await self._writable.wait()

    def send(self, ops: list[Op]) -> None:
        """Write one frame (dropped when the other side is gone: it is being replaced)."""
        self.write(frame(ops))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
