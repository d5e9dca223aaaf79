"""Resumes from Redis that share their reads: one window of older entries per stream channel.

A reconnect storm after a deploy or a network blip brings thousands of clients back to
one stream channel, each with a ``Last-Event-ID`` a little older than the hub's memory.
Read per client, each would fetch, parse and encode the same entries again (10,000
clients resuming 1,000 entries took 80 s and 1.7 GB that way). Instead a channel keeps
one *window*: the entries of its stream between two ids, read from Redis once and
encoded once, extended backwards when a client's position is older than the window and
forwards when a client has reached its end but not the hub's memory. One read at a time
per channel extends it; the clients that need the same entries wait for that read and
then serve themselves from the window. A client's page is a slice of the window, joined
into one write.

A window holds every entry of its stream after ``lo`` up to ``hi`` (both entry ids or
markers; ``lo`` excluded): nothing between two of its entries is missing, so a position
inside it tells at once whether it is an entry of the stream. It is bounded by the
channel's ``history_bytes`` and by a sixteenth of what all windows together may hold
(the oldest or newest end is dropped past it, whichever is farther from the read being
made), and dropped when no resume used it for a heartbeat. All windows together hold at
most ``limit`` bytes (a quarter of ``limits.history_bytes``): past it the least recently
used are dropped, so that clients naming many family members cannot make the hub read
and keep a window for each.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.ids import just_before, stream_order
from .channel import Channel

if TYPE_CHECKING:
    from ..redis.streams import StreamSource

__all__ = ["Backfill", "Encode", "Window"]

# Turns one stream entry (id, fields) into its event's bytes; b"" for an entry the
# channel's format rejects (kept in the window, so positions still move past it).
Encode = Callable[[str, dict[bytes, bytes]], bytes]

# Bytes one XRANGE of a window's extension aims at (its COUNT follows the mean entry
# size seen so far), and the bounds of that COUNT.
READ_BYTES = 256 * 1024
MIN_COUNT = 10
MAX_COUNT = 1000


class Window:
    """Encoded entries of one stream, contiguous from after ``lo`` up to ``hi``."""

    __slots__ = ("hi", "ids", "lo", "lock", "orders", "raws", "size", "used")

    def __init__(self) -> None:
        self.lo = ""  # empty: the window holds nothing yet
        self.hi = ""
        self.ids: list[str] = []
        self.orders: list[tuple[int, int]] = []
        self.raws: list[bytes] = []
        self.size = 0  # bytes of raws
        # One extension at a time: the clients needing it wait here, then read it.
        self.lock = asyncio.Lock()
        self.used = 0.0  # loop time of the last page served

    def covers(self, order: tuple[int, int]) -> bool:
        """True when every entry after ``order`` up to ``hi`` is here."""
        return bool(self.hi) and stream_order(self.lo) <= order <= stream_order(self.hi)

    def count(self, size: int = 0, entries: int = 0, read_bytes: int = READ_BYTES) -> int:
        """The COUNT of the next XRANGE: about ``read_bytes`` of entries, by their mean
        size here and in what is being read into it (``size`` bytes in ``entries``)."""
        entries += len(self.raws)
        mean = (self.size + size) // entries if entries else 0
        # Nothing read yet: a first read of a few, whatever size the entries have.
        return MIN_COUNT if not mean else max(MIN_COUNT, min(MAX_COUNT, read_bytes // mean))

    def prepend(self, lo: str, ids: list[str], raws: list[bytes]) -> None:
        """Entries before the window (``ids`` ending at or before its ``lo``); the
        caller sets ``hi`` when the window was empty."""
        self.lo = lo
        self.ids[:0] = ids
        self.orders[:0] = [stream_order(i) for i in ids]
        self.raws[:0] = raws
        self.size += sum(map(len, raws))

    def append(self, hi: str, ids: list[str], raws: list[bytes]) -> None:
        """Entries after the window, up to ``hi``."""
        self.hi = hi
        self.ids += ids
        self.orders += [stream_order(i) for i in ids]
        self.raws += raws
        self.size += sum(map(len, raws))

    def clear(self) -> None:
        """Hold nothing (the lock and whoever waits on it stay)."""
        self.lo = self.hi = ""
        self.ids, self.orders, self.raws, self.size = [], [], [], 0

    def trim(self, max_bytes: int, keep_old: bool) -> None:
        """Past ``max_bytes``: drop from the newest end (``keep_old``) or the oldest."""
        while self.size > max_bytes and len(self.raws) > 1:
            n = max(1, len(self.raws) // 4)
            if keep_old:
                dropped = self.raws[-n:]
                del self.ids[-n:], self.orders[-n:], self.raws[-n:]
                self.hi = self.ids[-1]
            else:
                dropped = self.raws[:n]
                self.lo = self.ids[n - 1]
                del self.ids[:n], self.orders[:n], self.raws[:n]
            self.size -= sum(map(len, dropped))

    def holds(self, entry_id: str) -> bool | None:
        """Whether ``entry_id`` is an entry of the stream, as far as the window knows
        (None: it does not cover that id)."""
        order = stream_order(entry_id)
        if not self.covers(order) or order == stream_order(self.lo):
            return None
        i = bisect.bisect_left(self.orders, order)
        if i < len(self.orders) and self.orders[i] == order:
            return True
        # Not an entry, unless it is older than everything here: then it may be one
        # that was trimmed from the stream (``expired``), which Redis can tell.
        return False if i > 0 else None


class Backfill:
    """Every stream channel's window (see the module's docstring)."""

    def __init__(self, limit: int = 0) -> None:
        self.windows: dict[Channel, Window] = {}
        # Bytes all windows may hold together (0: no bound but each channel's).
        self.limit = limit

    def holds(self, channel: Channel, entry_id: str) -> bool | None:
        """See ``Window.holds``; None when ``channel`` has no window."""
        window = self.windows.get(channel)
        return None if window is None else window.holds(entry_id)

    async def page(
        self,
        streams: StreamSource,
        channel: Channel,
        position: str,
        page_bytes: int,
        encode: Encode,
    ) -> tuple[list[bytes], list[str], str]:
        """The events after ``position`` (about ``page_bytes`` of them), their entry ids,
        and the position they bring the client to: the last one's id, or, when there is
        nothing after ``position`` up to the stream's position as last read, that one.

        Reads Redis only when the window does not reach past ``position``; raises
        ``RedisError`` when it cannot."""
        window = self._window(channel)
        order = stream_order(position)
        # Until the window holds what follows ``position`` (an extension's trim may
        # drop it again when the bound is small: then it is read again from here).
        while not window.covers(order) or self._at_end(window, order, channel):
            async with window.lock:  # whoever came first may have read it meanwhile
                if window.covers(order):
                    if self._at_end(window, order, channel):
                        await self._forward(streams, channel, window, encode)
                else:
                    if window.hi and order > stream_order(window.lo):
                        # Past the window's end (it was trimmed behind this client):
                        # a window of its own from here.
                        window.clear()
                    await self._back(streams, channel, window, position, encode)
        window.used = asyncio.get_running_loop().time()
        i = bisect.bisect_right(window.orders, order)
        if i == len(window.ids):
            return [], [], window.hi  # nothing after it up to the stream's position
        j, size = i, 0
        raws = window.raws
        while j < len(raws) and size < page_bytes:
            size += len(raws[j])
            j += 1
        return raws[i:j], window.ids[i:j], window.ids[j - 1]

    @staticmethod
    def _at_end(window: Window, order: tuple[int, int], channel: Channel) -> bool:
        """True when ``order`` is the window's end and the stream goes further."""
        return order == stream_order(window.hi) and window.hi != channel.stream_pos

    def beat(self, idle: float) -> None:
        """Drop the windows no resume used for ``idle`` seconds."""
        now = asyncio.get_running_loop().time()
        for channel, window in list(self.windows.items()):
            if now - window.used > idle and not window.lock.locked():
                del self.windows[channel]

    def _window(self, channel: Channel) -> Window:
        window = self.windows.get(channel)
        if window is None:
            window = self.windows[channel] = Window()
        return window

    async def _back(
        self, streams: StreamSource, channel: Channel, window: Window, position: str, encode: Encode
    ) -> None:
        """Read from ``position`` (included, so that the window knows whether it is an
        entry) up to the window's start, or to the stream's position when it is empty."""
        empty = not window.hi
        until = channel.stream_pos if empty else window.lo
        max_bytes = self._bound(channel)
        after = just_before(position)
        ids: list[str] = []
        raws: list[bytes] = []
        size = 0
        while True:
            count = window.count(size, len(raws), min(READ_BYTES, max_bytes))
            entries = await streams.read_range(channel.redis, after.encode(), until.encode(), count)
            for entry_id, fields in entries:
                after = entry_id.decode()
                raw = encode(after, fields)
                ids.append(after)
                raws.append(raw)
                size += len(raw)
            if len(entries) < count:
                break  # reached ``until``
            if size > max_bytes:
                # More than the bound lies before the window: this read starts anew.
                window.clear()
                empty, until = True, after
                break
        lo = just_before(position) if ids and ids[0] == position else position
        window.prepend(lo, ids, raws)
        if empty:
            window.hi = until
        window.trim(max_bytes, keep_old=True)
        self._spill(window)

    async def _forward(
        self, streams: StreamSource, channel: Channel, window: Window, encode: Encode
    ) -> None:
        """One read past the window's end, towards the stream's position."""
        until = channel.stream_pos
        bound = self._bound(channel)
        count = window.count(read_bytes=min(READ_BYTES, bound))
        entries = await streams.read_range(channel.redis, window.hi.encode(), until.encode(), count)
        ids = [entry_id.decode() for entry_id, _ in entries]
        raws = [encode(i, fields) for i, (_, fields) in zip(ids, entries, strict=True)]
        window.append(ids[-1] if len(entries) == count else until, ids, raws)
        window.trim(bound, keep_old=False)
        self._spill(window)

    def _bound(self, channel: Channel) -> int:
        """The most one window of ``channel`` holds."""
        share = self.limit // 16
        return min(channel.config.history_bytes, share) if share else channel.config.history_bytes

    def _spill(self, keep: Window) -> None:
        """Past ``limit`` for all windows: drop the least recently used others. Clients
        keep no window between pages (a page is a slice), so a dropped one is freed
        once the extension being read into it, if any, is served; its clients' next
        pages read a new one."""
        total = sum(w.size for w in self.windows.values())
        if not self.limit or total <= self.limit:
            return
        for channel, window in sorted(self.windows.items(), key=lambda cw: cw[1].used):
            if window is not keep:
                del self.windows[channel]
                total -= window.size
                if total <= self.limit:
                    return
