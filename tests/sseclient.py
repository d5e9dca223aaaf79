"""A small raw SSE client for tests: real sockets, byte-exact, with deadlines.

It speaks just enough HTTP/1.x to open a stream, de-chunks the body itself (so tests
see exactly the bytes the hub framed) and parses events the way the SSE spec's
``EventSource`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

from ssehub.hub.sessions import SESSION_EVENT

__all__ = ["Event", "SSEClient", "http_request", "open_stream", "wait_until"]


@dataclass
class Event:
    data: str
    event: str = "message"
    id: str = ""
    retry: int | None = None


@dataclass
class _Parser:
    """The EventSource parsing algorithm (WHATWG HTML, 9.2.6)."""

    buffer: str = ""
    data: list[str] = field(default_factory=list)
    event: str = ""
    last_id: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    # A CR at the end of a chunk may be the first half of a CRLF.
    pending_cr: bool = False

    def feed(self, text: str) -> list[Event]:
        if self.pending_cr and text.startswith("\n"):
            text = text[1:]
        self.pending_cr = False
        self.buffer += text
        out: list[Event] = []
        lines = re.split(r"\r\n|\r|\n", self.buffer)
        self.buffer = lines.pop()
        if self.buffer == "" and text.endswith("\r"):
            self.pending_cr = True
        for line in lines:
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self.data:
                self.event = ""
                return None
            ev = Event(
                data="\n".join(self.data),
                event=self.event or "message",
                id=self.last_id,
                retry=self.retry,
            )
            self.data, self.event = [], ""
            return ev
        if line.startswith(":"):
            self.comments.append(line[1:])
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


class SSEClient:
    """One streaming connection to the hub."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""  # de-chunked body bytes received so far
        self.events: list[Event] = []
        self.sessions: list[str] = []  # ssehub-session events' data, in order
        self.parser = _Parser()
        self.eof = False
        self._chunked = False
        self._raw = b""  # undecoded bytes (chunk framing included)
        self._decoder_done = False

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str,
        headers: dict[str, str] | None = None,
        *,
        method: str = "GET",
        version: str = "1.1",
        host: str = "127.0.0.1",
        timeout: float = 5.0,
    ) -> SSEClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self = cls(reader, writer)
        lines = [f"{method} {path} HTTP/{version}", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await self._read_head(timeout)
        return self

    async def _read_head(self, timeout: float) -> None:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            if line:
                k, _, v = line.partition(":")
                self.headers[k.strip().lower()] = v.strip()
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"

    def _decode(self) -> bytes:
        """Take complete chunks out of ``_raw``; return their payload."""
        if not self._chunked:
            raw, self._raw = self._raw, b""
            return raw
        out = bytearray()
        while not self._decoder_done:
            crlf = self._raw.find(b"\r\n")
            if crlf < 0:
                break
            size = int(self._raw[:crlf].split(b";")[0], 16)
            end = crlf + 2 + size + 2
            if size == 0:
                if len(self._raw) >= crlf + 4:
                    self._decoder_done = True
                    self._raw = self._raw[crlf + 4 :]
                break
            if len(self._raw) < end:
                break
            if self._raw[end - 2 : end] != b"\r\n":
                raise AssertionError(f"bad chunk framing: {self._raw[:end]!r}")
            out += self._raw[crlf + 2 : end - 2]
            self._raw = self._raw[end:]
        return bytes(out)

    async def _read_more(self, timeout: float) -> bool:
        if self.eof:
            return False
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        if not data:
            self.eof = True
            return False
        self._raw += data
        payload = self._decode()
        self.body += payload
        for ev in self.parser.feed(payload.decode("utf-8")):
            # The stream's session id (first thing in every stream) is kept apart,
            # so that ``events`` holds what the channels carried.
            if ev.event == SESSION_EVENT:
                self.sessions.append(ev.data)
            else:
                self.events.append(ev)
        return True

    @property
    def session(self) -> str:
        """The session id the hub gave this stream ("" before it arrived)."""
        return self.sessions[0] if self.sessions else ""

    async def read_until(self, predicate: object, timeout: float = 5.0) -> None:
        """Read until ``predicate(self)`` holds; AssertionError on deadline or EOF."""
        assert callable(predicate)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out; body so far: {self.body[-500:]!r}")
            try:
                more = await self._read_more(left)
            except TimeoutError:
                continue
            if not more and not predicate(self):
                raise AssertionError(f"stream ended; body: {self.body[-500:]!r}")

    async def next_events(self, n: int, timeout: float = 5.0) -> list[Event]:
        """Wait until at least ``n`` events have arrived in total; return all of them."""
        await self.read_until(lambda c: len(c.events) >= n, timeout)
        return self.events

    async def read_for(self, seconds: float) -> list[Event]:
        """Read for ``seconds`` (a window in which nothing is expected, not a wait for
        something); the events that arrived meanwhile."""
        before = len(self.events)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                if not await self._read_more(left):
                    break
            except TimeoutError:
                break
        return self.events[before:]

    async def read_to_eof(self, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.eof:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError("stream did not end")
            await self._read_more(left)

    @property
    def ended_cleanly(self) -> bool:
        """The body ended with the terminating zero-length chunk."""
        return self._decoder_done

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def open_stream(port: int, path: str, last_id: str | None = None, **kw: Any) -> SSEClient:
    """Open a stream, check it is a 200, and wait for its position marker (``id:``),
    which the hub writes in the same step as it registers the subscriber: from then
    on every published message reaches this client."""
    headers = dict(kw.pop("headers", None) or {})
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    client = await SSEClient.connect(port, path, headers, **kw)
    assert client.status == 200, (client.status, client.headers)
    await client.read_until(lambda c: c.parser.last_id)
    return client


async def http_request(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """A plain request on a fresh connection; returns status, headers and the body."""
    c = await SSEClient.connect(port, path, headers, method=method, timeout=timeout)
    try:
        if method == "HEAD" or c.status in (204, 304):
            return c.status, c.headers, b""
        length = c.headers.get("content-length")
        if length is not None:
            body = await asyncio.wait_for(c.reader.readexactly(int(length)), timeout)
            return c.status, c.headers, body
        await c.read_until(lambda cl: cl.ended_cleanly or cl.eof, timeout)
        return c.status, c.headers, c.body
    finally:
        await c.close()


async def wait_until(predicate: object, timeout: float = 5.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` (sync or async) until true; AssertionError at the deadline."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
