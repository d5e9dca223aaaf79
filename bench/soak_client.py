"""The soak's simulated browser: one SSE stream read as fast as it comes.

A bare protocol (no StreamReader, no per-line await) so that one process can hold
thousands of streams: it de-chunks the body, counts message numbers, records gap
reasons and the last id, and notices when the hub ends the stream first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Stream", "StreamProtocol", "factory"]


@dataclass
class Stream:
    """One connection of one simulated browser, as the soak accounts for it."""

    client: int
    resumed: bool
    connect_at: float
    opened_at: float | None = None  # the position marker arrived: subscribed
    closed_at: float = 0.0
    received: set[int] = field(default_factory=set)
    duplicates: int = 0
    gaps: list[str] = field(default_factory=list)  # reasons, in order
    last_id: str | None = None
    ended_by_hub: bool = False  # the hub closed or reset it before we did
    error: str = ""


class StreamProtocol(asyncio.Protocol):
    """Reads one chunked SSE stream: message numbers, gap reasons, the last id."""

    def __init__(self, stream: Stream, opened: asyncio.Future[None]) -> None:
        self.s = stream
        self.opened = opened
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self._head = b""
        self._status = 0
        self._raw = b""
        self._left = 0
        self._trailer = 0
        self._partial = b""
        self._event = b""
        self._data: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.s.ended_by_hub = True
            self.s.error = self.s.error or f"lost: {exc!r}"
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self._status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._status = int(self._head.split(b" ", 2)[1])
            if self._status != 200:
                self.s.error = f"status {self._status}"
                self.close(abort=False)
                return
            data, self._head = self._head[end + 4 :], b""
        self._raw += data
        raw, pos, out = self._raw, 0, []
        while pos < len(raw):
            if self._trailer:
                take = min(self._trailer, len(raw) - pos)
                self._trailer -= take
                pos += take
            elif self._left:
                take = min(self._left, len(raw) - pos)
                out.append(raw[pos : pos + take])
                self._left -= take
                pos += take
                if not self._left:
                    self._trailer = 2
            else:
                crlf = raw.find(b"\r\n", pos)
                if crlf < 0:
                    break
                self._left = int(raw[pos:crlf], 16)
                pos = crlf + 2
                if self._left == 0:  # the hub ended the stream cleanly
                    self.s.error = self.s.error or "ended"
        self._raw = raw[pos:]
        if out:
            self._lines(b"".join(out))

    def _lines(self, text: bytes) -> None:
        lines = (self._partial + text).split(b"\n")
        self._partial = lines.pop()
        s = self.s
        for line in lines:
            if not line:
                if self._data:
                    if self._event == b"ssehub-gap":
                        s.gaps.append(json.loads(b"\n".join(self._data))["reason"])
                    elif self._event == b"ssehub-session":
                        pass  # the stream's session id, first in every stream
                    else:
                        n = int(self._data[0].split(b" ", 1)[0])
                        if n in s.received:
                            s.duplicates += 1
                        s.received.add(n)
                self._event, self._data = b"", []
            elif line.startswith(b"data: "):
                self._data.append(line[6:])
            elif line.startswith(b"id: "):
                s.last_id = line[4:].decode()
                if not self.opened.done():
                    s.opened_at = time.monotonic()
                    self.opened.set_result(None)
            elif line.startswith(b"event: "):
                self._event = line[7:]

    def close(self, abort: bool) -> None:
        self.closing = True
        if self.transport is not None:
            if abort:
                sock = self.transport.get_extra_info("socket")
                if sock is not None:  # an RST, as a browser tab killed mid-stream
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                self.transport.abort()
            else:
                self.transport.close()


def factory(proto: StreamProtocol) -> Callable[[], StreamProtocol]:
    """A protocol factory for ``create_connection`` that hands over ``proto``."""
    return lambda: proto
