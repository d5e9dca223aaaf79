"""The publisher: messages at a fixed rate, through Redis ``PUBLISH`` or nchan's HTTP endpoint.

A target named ``xadd:<key>`` (``servers.XADD_PREFIX``) is a Redis Stream instead:
``XADD <key> MAXLEN ~ 100000 * data <payload>`` (a stream channel's entry).

It runs in its own process (pinned with the load clients) so its CPU time can be
counted against the load side. Each tick sends every message that is due since the
start in one pipelined write, so the offered rate holds even when a tick is late.

A benchmark payload is ``~<seq> <time.time_ns()> xxx…`` padded to ~100 bytes: ``~``
is the marker the load client counts, the timestamp gives publish-to-receive latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

__all__ = ["PAYLOAD_BYTES", "PubResult", "Publisher", "payload"]

PAYLOAD_BYTES = 100
TICK_S = 0.005
XADD_PREFIX = b"xadd:"  # the same as servers.XADD_PREFIX
# Entries a stream keeps (XADD's approximate trim): memory stays bounded in long runs.
STREAM_MAXLEN = 100_000


def payload(seq: int, now_ns: int) -> bytes:
    """One benchmark payload of about ``PAYLOAD_BYTES`` bytes."""
    head = b"~%d %d " % (seq, now_ns)
    return head + b"x" * max(0, PAYLOAD_BYTES - len(head))


def _redis_cmd(channel: bytes, body: bytes, command: bytes = b"PUBLISH") -> bytes:
    """``PUBLISH``, or ``SPUBLISH`` (Redis Cluster's sharded publish, to the owning master)."""
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(command),
        command,
        len(channel),
        channel,
        len(body),
        body,
    )


def _xadd(key: bytes, body: bytes) -> bytes:
    """``XADD key MAXLEN ~ STREAM_MAXLEN * data body``."""
    args = [b"XADD", key, b"MAXLEN", b"~", b"%d" % STREAM_MAXLEN, b"*", b"data", body]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _nchan_req(channel: bytes, body: bytes) -> bytes:
    return (
        b"POST /pub?id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
        b"Accept: text/plain\r\n\r\n%s" % (channel, len(body), body)
    )


@dataclass
class PubResult:
    """What one run of the publisher did."""

    sent: list[int]  # per channel, in the order given
    acked: int
    cpu_s: float
    wall_s: float
    behind_max: int  # most messages that were due at once (a late publisher shows here)


class _Acks(asyncio.Protocol):
    """Counts replies: RESP integers (one CRLF each) or HTTP status lines."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.count = 0
        self.tail = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        # Keep a short tail so a marker split across reads is still counted once.
        buf = self.tail + data
        self.count += buf.count(self.marker)
        keep = len(self.marker) - 1
        tail = buf[-keep:] if keep else b""
        self.tail = b"" if self.marker in tail else tail

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class _PubWorker:
    def __init__(self, conn: Connection, kind: str, host: str, port: int, fmt: str) -> None:
        self.conn = conn
        self.kind = kind
        self.host = host
        self.port = port
        self.fmt = fmt
        self.protos: list[_Acks] = []

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # nchan: 16 keep-alive connections, as nginx serves pipelined requests one by one.
        n = 16 if self.kind == "nchan" else 1
        marker = b"HTTP/1." if self.kind == "nchan" else b"\r\n"
        for _ in range(n):
            _, proto = await loop.create_connection(lambda: _Acks(marker), self.host, self.port)
            self.protos.append(proto)

    def body(self, seq: int, now_ns: int) -> bytes:
        p = payload(seq, now_ns)
        if self.fmt == "flask-sse":
            # flask-sse publishes JSON {"data": …}; a string ``data`` is sent as is.
            return b'{"data": "%s"}' % p
        return p

    def frame(self, channel: bytes, body: bytes) -> bytes:
        if channel.startswith(XADD_PREFIX):
            return _xadd(channel[len(XADD_PREFIX) :], body)
        if self.kind == "nchan":
            return _nchan_req(channel, body)
        if self.kind == "redis-cluster":
            return _redis_cmd(channel, body, b"SPUBLISH")
        return _redis_cmd(channel, body)

    async def run(self, channels: list[str], rate: float, duration: float) -> PubResult:
        chans = [c.encode() for c in channels]
        # Reply markers per message: XADD answers with a bulk string (two CRLFs).
        weight = [2 if c.startswith(XADD_PREFIX) else 1 for c in chans]
        replies = 0
        sent = [0] * len(chans)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        acked0 = sum(p.count for p in self.protos)
        t0 = time.monotonic()
        total = int(rate * duration)
        seq = 0
        behind_max = 0
        rr = 0
        while seq < total:
            due = min(total, int(rate * (time.monotonic() - t0)) + 1) - seq
            if due > 0:
                behind_max = max(behind_max, due)
                parts: list[list[bytes]] = [[] for _ in self.protos]
                now = time.time_ns()
                for _ in range(due):
                    ci = seq % len(chans)
                    parts[rr % len(parts)].append(self.frame(chans[ci], self.body(seq, now)))
                    sent[ci] += 1
                    replies += weight[ci]
                    seq += 1
                    rr += 1
                for proto, chunk in zip(self.protos, parts, strict=True):
                    if chunk and proto.transport is not None:
                        proto.transport.write(b"".join(chunk))
            await asyncio.sleep(TICK_S)
        # Wait (bounded) for every reply, so "sent" means the server took them.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded poll of the reply counters
            if sum(p.count for p in self.protos) - acked0 >= replies:
                break
            await asyncio.sleep(0.01)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        return PubResult(
            sent=sent,
            acked=sum(p.count for p in self.protos) - acked0,
            cpu_s=(ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            wall_s=time.monotonic() - t0,
            behind_max=behind_max,
        )

    async def prime(self, channels: list[str]) -> None:
        """One unmarked message per channel (wakes servers that send headers lazily)."""
        body = b'{"data": "prime"}' if self.fmt == "flask-sse" else b"prime"
        chunk = b"".join(self.frame(c.encode(), body) for c in channels)
        proto = self.protos[0]
        if proto.transport is not None:
            proto.transport.write(chunk)
        await asyncio.sleep(0)

    def _recv_command(self) -> Any:
        # The loop made the pipe non-blocking; a large command (5,000 channel names)
        # arrives in several reads, so read the whole message blocking.
        os.set_blocking(self.conn.fileno(), True)
        return self.conn.recv()

    async def serve(self) -> None:
        try:
            await self.open()
        except OSError as exc:
            self.conn.send(("error", str(exc)))
            return
        self.conn.send(("ready", None))
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(self.conn.fileno(), lambda: commands.put_nowait(self._recv_command()))
        while True:
            cmd = await commands.get()
            if cmd[0] == "run":
                self.conn.send(await self.run(*cmd[1:]))
            elif cmd[0] == "prime":
                await self.prime(cmd[1])
                self.conn.send(True)
            elif cmd[0] == "close":
                for p in self.protos:
                    if p.transport is not None:
                        p.transport.close()
                self.conn.send(True)
                return


def _pub_main(conn: Connection, kind: str, host: str, port: int, fmt: str) -> None:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_PubWorker(conn, kind, host, port, fmt).serve())


class Publisher:
    """Parent-side handle. ``kind``: ``redis`` or ``nchan``; ``fmt``: ``plain`` or ``flask-sse``."""

    def __init__(self, kind: str, host: str, port: int, fmt: str = "plain") -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_pub_main, args=(child, kind, host, port, fmt), daemon=True)
        self.proc.start()
        child.close()
        if not self.pipe.poll(30):
            self.close()
            raise RuntimeError("publisher did not start")
        status, detail = self.pipe.recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"publisher cannot connect: {detail}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def run(self, channels: list[str], rate: float, duration: float) -> PubResult:
        """Publish ``rate`` msg/s spread over ``channels`` for ``duration`` s (blocking)."""
        self.pipe.send(("run", channels, rate, duration))
        if not self.pipe.poll(duration + 60):
            raise TimeoutError("publisher did not finish")
        result: PubResult = self.pipe.recv()
        return result

    def prime(self, channels: list[str]) -> None:
        """Send one unmarked message to each channel."""
        self.pipe.send(("prime", channels))
        if self.pipe.poll(30):
            self.pipe.recv()

    def close(self) -> None:
        """Stop the process (always; also after errors)."""
        with contextlib.suppress(OSError):
            self.pipe.send(("close",))
            if self.pipe.poll(5):
                self.pipe.recv()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()
