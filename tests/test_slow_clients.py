"""Slow and stuck clients: a client that never reads is cut; nobody else notices.

The stuck client is a raw socket with a tiny receive buffer that never calls
``recv``; the healthy ones read through a lean counting reader (the test client in
``sseclient`` keeps whole bodies, too slow for tens of MB). The hub runs in this
process, so its memory is this process's RSS.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
import redis.asyncio as aioredis

from .conftest import StartHub
from .sseclient import wait_until

pytestmark = pytest.mark.slow

MESSAGE = 4096
TOTAL = 40 * 1024 * 1024  # bytes published
WINDOW = 256  # messages the publisher may be ahead of the hub (bounds Redis' buffer)


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def payload(n: int) -> bytes:
    return b"%08d" % n + b"x" * (MESSAGE - 8)


class CountingReader(asyncio.Protocol):
    """Reads a chunked SSE stream as fast as it comes; checks data lines' order.

    Keeps no body: only the count of data lines, whether they were in order, and
    whether the chunk framing held.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.raw = b""
        self.left = 0  # payload bytes left in the current chunk
        self.trailer = 0  # CRLF bytes left after the current chunk's payload
        self.partial = b""  # an SSE line not yet complete
        self.count = 0
        self.in_session = False
        self.in_order = True
        self.framing_ok = True
        self.lost = False
        self.retry_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def data_received(self, data: bytes) -> None:
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.head.split(b" ", 2)[1])
            data, self.head = self.head[end + 4 :], b""
        self.raw += data
        self._dechunk()

    def _dechunk(self) -> None:
        raw, pos, out = self.raw, 0, []
        while pos < len(raw):
            if self.trailer:
                take = min(self.trailer, len(raw) - pos)
                if raw[pos : pos + take] != b"\r\n"[2 - self.trailer : 2 - self.trailer + take]:
                    self.framing_ok = False
                self.trailer -= take
                pos += take
            elif self.left:
                take = min(self.left, len(raw) - pos)
                out.append(raw[pos : pos + take])
                self.left -= take
                pos += take
                if not self.left:
                    self.trailer = 2
            else:
                crlf = raw.find(b"\r\n", pos)
                if crlf < 0:
                    break
                self.left = int(raw[pos:crlf], 16)
                pos = crlf + 2
        self.raw = raw[pos:]
        if out:
            self._lines(b"".join(out))

    def _lines(self, text: bytes) -> None:
        lines = (self.partial + text).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line == b"event: ssehub-session":
                self.in_session = True  # its data line is the stream's session id
            elif line.startswith(b"data: ") and self.in_session:
                self.in_session = False
            elif line.startswith(b"data: "):
                if int(line[6:14]) != self.count:
                    self.in_order = False
                self.count += 1
            elif line.startswith(b"retry: "):
                self.retry_seen = True


async def open_reader(port: int) -> tuple[asyncio.Transport, CountingReader]:
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(CountingReader, "127.0.0.1", port)
    transport.write(b"GET /channels/chat HTTP/1.1\r\nHost: test\r\n\r\n")
    await wait_until(lambda: reader.retry_seen, timeout=5)
    return transport, reader


async def open_stuck(port: int) -> socket.socket:
    """A stream request from a client that will never read a byte of the answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHost: test\r\n\r\n")
    return sock


async def test_stuck_client_is_cut_and_memory_stays_bounded(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    limit = 256 * 1024
    hub = await start_hub(limits={"max_buffer_bytes": limit})
    stats = hub.hub.stats
    healthy = [await open_reader(hub.port) for _ in range(3)]
    stuck = await open_stuck(hub.port)
    try:
        await wait_until(lambda: hub.hub.connections == 4, timeout=5)
        count = TOTAL // MESSAGE
        batch = 64
        base = rss()
        peak = base
        sent = 0
        while sent < count:
            pipe = redis_client.pipeline(transaction=False)
            for n in range(sent, min(sent + batch, count)):
                pipe.publish("chat", payload(n))
            await pipe.execute()
            sent = min(sent + batch, count)
            # Pace the publisher on the hub's intake only, so Redis' own buffer for
            # the hub stays small; the stuck client gets no say in the pace.
            await wait_until(lambda n=sent: stats.received["chat"] >= n - WINDOW, timeout=10)
            peak = max(peak, rss())

        for _, reader in healthy:
            await wait_until(lambda r=reader: r.count == count, timeout=10)
        peak = max(peak, rss())

        # The stuck client was dropped, once, for being slow; nobody else was.
        assert stats.slow_cut == 1
        assert stats.closed["slow"] == 1
        assert hub.hub.connections == len(healthy)
        for _, reader in healthy:
            assert reader.status == 200
            assert reader.in_order and reader.framing_ok and not reader.lost
        growth = peak - base
        assert growth < 20 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MB for 40 MB"
        assert stats.received["chat"] == count
    finally:
        stuck.close()
        for transport, _ in healthy:
            transport.close()
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)


async def test_a_stuck_client_is_cut_as_its_unsent_bytes_pass_the_bound(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """Where the cut happens: the stuck stream's unsent bytes, sampled after every
    message the hub delivers, pass ``max_buffer_bytes`` by at most one message."""
    limit = 64 * 1024
    hub = await start_hub(limits={"max_buffer_bytes": limit})
    stats = hub.hub.stats
    stuck = await open_stuck(hub.port)
    try:
        await wait_until(lambda: hub.hub.connections == 1, timeout=5)
        (transport,) = hub.hub.channels["chat"].subs.chunked
        peak = sent = 0
        # The kernel's socket buffers take the first messages; then the hub's own.
        while not stats.slow_cut:
            assert sent < 5000, f"not cut after {sent} messages, {peak} bytes unsent"
            await redis_client.publish("chat", payload(sent))
            sent += 1
            await wait_until(lambda n=sent: stats.delivered >= n or stats.slow_cut, timeout=5)
            if not stats.slow_cut:
                peak = max(peak, transport.get_write_buffer_size())
        frame = MESSAGE + 100  # a message as written: its id, data line and chunk framing
        assert limit < peak <= limit + frame, (peak, limit)
        assert stats.closed["slow"] == 1 and hub.hub.connections == 0
    finally:
        stuck.close()
