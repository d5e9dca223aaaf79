"""Hostile and broken HTTP input: a 4xx or a clean close; never a 5xx, a hang, a crash or a leak.

Requests are raw bytes over real sockets. The hypothesis run drives blocking
sockets from a worker thread while the hub serves on the test's event loop, so
one hub serves every example.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct

import pytest
import redis.asyncio as aioredis
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ssehub.server import HubServer

from .conftest import StartHub
from .logcheck import rendered
from .sseclient import SSEClient, http_request, wait_until

CHANNELS: dict[str, dict[str, object]] = {"chat": {}, "news": {}, "a.b-c_d": {}}


def exchange(port: int, request: bytes, timeout: float = 3.0) -> bytes:
    """Send ``request``; return the response head (or b"" if the hub just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except ConnectionError:
            return b""  # closed on us before we finished writing: a clean refusal
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            try:
                data = sock.recv(4096)
            except ConnectionError:
                break
            if not data:
                break
            head += data
        return head


def status_of(head: bytes) -> int:
    """The status code of a response head; 0 when the hub closed without answering."""
    if not head:
        return 0
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/"), f"not a status line: {line!r}"
    return int(parts[1])


def assert_no_subscribers(hub: HubServer) -> None:
    """No stream is left registered anywhere in the hub."""
    assert hub.hub.connections == 0
    assert all(len(group) == 0 for group in hub.hub.groups())
    assert not hub.hub.fanout.mux  # /events groups are dropped with their last subscriber


def handler_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """ERROR records other than aiohttp's own report of a request it could not parse.

    aiohttp answers an unparsable request with a 400 itself and logs it at ERROR
    with a traceback (see test_malformed_requests_are_not_logged_as_errors); any
    other error record is a handler failing, i.e. a 500.
    """
    out = []
    for record in caplog.records:
        if record.levelno < logging.ERROR:
            continue
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "aiohttp.server" and isinstance(exc, HttpProcessingError):
            continue
        out.append(record)
    return out


# --- what the fuzzer sends ----------------------------------------------------------

PIECES = [
    "chat", "news", "a.b-c_d", "nope", "", ".", "..", "/", "//", "%2F", "%2f", "%2e%2e",
    "%252F", "%00", "%0d%0a", "%ff", "%fe%ff", "%", "%Z", "%zz", "%E2%80%A8", ";", ";x=y",
    "#frag", "?", "&", "=", "+", "%20", "~", "\u00e9", "%C3%A9", "\\", "..\\..", "*",
    "a" * 250, "b" * 3000,
]  # fmt: skip

piece = st.sampled_from(PIECES) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"), max_size=12
)
name = st.lists(piece, min_size=0, max_size=4).map("".join)
path = st.one_of(
    name.map(lambda n: "/channels/" + n),
    st.just("/events"),
    st.lists(piece, max_size=3).map(lambda ps: "/" + "/".join(ps)),
    st.sampled_from(["/healthz", "/readyz", "/", "*", "/channels", "/channels/"]),
)
query_key = st.sampled_from(["channel"] * 4 + ["lastEventId"] * 2 + ["channel[]", "", "x", "C"])
query_value = st.one_of(st.sampled_from(["chat", "news", "a.b-c_d"]), name)
query = st.lists(st.tuples(query_key, query_value), max_size=6).map(
    lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv) if kv else ""
)
METHODS = ["GET"] * 12 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
METHODS += ["TRACE", "CONNECT", "PRI", "PROPFIND", "get", "G ET", "G@T", "GET\x00", ""]
# Mostly methods a client would send, and a few a parser must reject.
method = st.sampled_from(METHODS)
VERSIONS = ["HTTP/1.1"] * 8 + ["HTTP/1.0"] * 2 + ["HTTP/0.9", "HTTP/2.0", "", "1.1"]
version = st.sampled_from(VERSIONS)
header_value = st.one_of(
    *[st.sampled_from(["https://ok.example", "text/event-stream", "*/*", "GET", *PIECES])] * 3,
    st.sampled_from(["", " ", "0", "-1", "abc-1", "\x7f", "null", "x" * 257, "y" * 9000]),
    st.text(max_size=40).map(lambda t: t.encode("utf-8").decode("latin-1")),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
HEADER_NAMES = ["Last-Event-ID", "Origin", "Accept"] * 5 + ["Access-Control-Request-Method"]
HEADER_NAMES += ["Access-Control-Request-Headers", "Content-Length", "Transfer-Encoding"]
HEADER_NAMES += ["Connection", "Host", "Upgrade", "Expect"]
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=5)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = f"{draw(method)} {draw(path)}{draw(query)} {draw(version)}".encode()
    lines = [line, b"Host: 127.0.0.1"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in draw(headers).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_fuzzed_requests_never_get_a_5xx_nor_leak(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(CHANNELS, cors={"allow_origins": ["https://ok.example"]})
    seen: dict[int, int] = {}

    @settings(
        max_examples=200,
        deadline=None,
        database=None,  # nothing written to the work tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(requests())
    # Always tried as well: a stream, an unknown channel, and a request aiohttp rejects.
    @example(
        b"GET /events?channel=chat&channel=news HTTP/1.1\r\nHost: x\r\nLast-Event-ID: x\r\n\r\n"
    )
    @example(b"GET /channels/..%2Fhealthz HTTP/1.1\r\nHost: x\r\n\r\n")
    @example(b"GET /channels/\xff HTTP/1.1\r\nHost: x\r\n\r\n")
    def fuzz(request: bytes) -> None:
        code = status_of(exchange(hub.port, request))
        seen[code] = seen.get(code, 0) + 1
        assert code < 500, request

    await asyncio.to_thread(fuzz)
    assert seen.get(200) and seen.get(400) and seen.get(404), seen
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)
    assert_no_subscribers(hub)
    assert (await http_request(hub.port, "/healthz"))[0] == 200
    errors = [str(r.exc_info[1]) if r.exc_info else r.getMessage() for r in handler_errors(caplog)]
    assert errors == []


@pytest.mark.parametrize("path", ["/channels/chat", "/events?channel=chat"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_http2_version_in_a_request_line_is_not_a_500(
    start_hub: StartHub, method: str, path: str
) -> None:
    hub = await start_hub(CHANNELS)
    request = f"{method} {path} HTTP/2.0\r\nHost: x\r\n\r\n".encode()
    code = status_of(await asyncio.to_thread(exchange, hub.port, request))
    assert 400 <= code < 500


@pytest.mark.parametrize("request_line", ["GET /healthz", "GET /channels/chat", "GET /nope"])
async def test_an_expect_header_that_is_not_utf8_is_not_a_500(
    start_hub: StartHub, request_line: str
) -> None:
    hub = await start_hub(CHANNELS)
    request = request_line.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: \xe9\r\n\r\n"
    code = status_of(await asyncio.to_thread(exchange, hub.port, request))
    assert 400 <= code < 500


@pytest.mark.parametrize(
    ("what", "request_bytes"),
    [
        ("request line", b"GET /channels/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("query", b"GET /events?" + b"channel=chat&" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "header",
            b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        ),
        (
            "Last-Event-ID header",
            b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nLast-Event-ID: "
            + b"1" * 9000
            + b"\r\n\r\n",
        ),
        (
            "header count",
            b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(500))
            + b"\r\n",
        ),
    ],
)
async def test_oversized_requests_get_a_4xx(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture, what: str, request_bytes: bytes
) -> None:
    hub = await start_hub(CHANNELS)
    head = await asyncio.to_thread(exchange, hub.port, request_bytes)
    # aiohttp's parser limits (8190-byte lines and fields, 128 headers) answer 400.
    assert status_of(head) == 400, head[:200]
    assert hub.hub.connections == 0
    assert handler_errors(caplog) == []


async def test_configured_line_and_field_limits_apply(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS, limits={"max_line_size": 1024, "max_field_size": 1024})
    for request in [
        b"GET /channels/" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n",
    ]:
        head = await asyncio.to_thread(exchange, hub.port, request)
        assert 400 <= status_of(head) < 500, head[:60]


async def test_garbage_gets_400(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS)
    head = await asyncio.to_thread(exchange, hub.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert status_of(head) == 400, head[:80]


async def test_invalid_utf8_in_a_channel_name_is_404_not_500(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS)
    for path in ["/channels/%80", "/channels/a%ff%fe", "/events?channel=%c3%28"]:
        status, _, body = await http_request(hub.port, path)
        assert status == 404, (path, status, body[:80])
        assert b"unknown channel: " in body


async def test_oversized_last_event_id_is_a_400_from_the_app(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS)
    for lei in ["x" * 257, "a\x00b"]:
        code, _, body = await http_request(
            hub.port, "/channels/chat", headers={"Last-Event-ID": lei}
        )
        assert code == 400 and b"Last-Event-ID" in body
    code, _, _ = await http_request(hub.port, "/channels/chat?lastEventId=%0Ainjected")
    assert code == 400
    assert hub.hub.connections == 0


async def test_malformed_requests_are_not_logged_as_errors(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(CHANNELS)
    caplog.set_level(logging.DEBUG, logger="ssehub.server")
    await asyncio.to_thread(
        exchange, hub.port, b"GET /channels/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    await wait_until(lambda: "bad request status=400" in rendered(caplog), timeout=2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert errors == []


async def test_partial_request_is_closed_after_the_request_timeout(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS, limits={"request_timeout": 0.2})
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        assert loop.time() - started < 1.5
        # Meanwhile and afterwards the hub serves others.
        status, _, _ = await http_request(hub.port, "/healthz")
        assert status == 200
    finally:
        writer.close()


async def test_streams_are_not_swept_as_idle(start_hub: StartHub) -> None:
    hub = await start_hub(CHANNELS, limits={"request_timeout": 0.1}, heartbeat=0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.6  # several sweep periods
        while loop.time() < end:
            chunk = await asyncio.wait_for(reader.read(4096), 2)
            assert chunk, "stream was closed"
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        assert hub.hub.connections == 1
    finally:
        writer.close()


async def test_slowloris_does_not_block_others(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(CHANNELS)
    loop = asyncio.get_running_loop()
    slow: list[socket.socket] = []
    client: SSEClient | None = None
    try:
        partial = b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1"
        for _ in range(50):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", hub.port))
            slow.append(sock)
        # Byte by byte, interleaved across all of them, then they stop mid-header.
        for i in range(len(partial)):
            for sock in slow:
                await loop.sock_sendall(sock, partial[i : i + 1])
            # Others are served meanwhile.
            if i % 10 == 0:
                assert (await http_request(hub.port, "/healthz", timeout=1))[0] == 200
        client = await SSEClient.connect(hub.port, "/channels/chat", timeout=1)
        assert client.status == 200
        await client.read_until(lambda c: c.parser.last_id, 1)
        await redis_client.publish("chat", "through")
        await client.next_events(1, timeout=1)
        assert client.events[0].data == "through"
        assert hub.hub.connections == 1  # the partial requests hold no stream
    finally:
        for sock in slow:
            sock.close()
        if client is not None:
            await client.close()
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)


def _rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _churn_one(port: int, i: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        kind = i % 5
        if kind == 0:  # connect, say nothing, go
            pass
        elif kind == 1:  # half a request
            await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHo")
        elif kind == 2:  # a whole stream request, gone before the answer is read
            await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        else:  # a stream opened and read up to its first bytes, then dropped
            path = b"/channels/chat" if kind == 3 else b"/events?channel=chat&channel=news"
            await loop.sock_sendall(sock, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            got = b""
            while b"retry:" not in got:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
                assert data, got
                got += data
        if i % 2:
            _rst(sock)
    finally:
        sock.close()


async def test_connections_opened_and_dropped_in_a_loop_leak_nothing(
    start_hub: StartHub,
) -> None:
    hub = await start_hub(CHANNELS, heartbeat=0.05)
    await wait_until(lambda: hub.hub.connections == 0)
    baseline = len(asyncio.all_tasks())
    for start in range(0, 500, 50):
        await asyncio.gather(*(_churn_one(hub.port, i) for i in range(start, start + 50)))
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)
    # Every handler task ended (the test's own task is in both counts).
    await wait_until(lambda: len(asyncio.all_tasks()) <= baseline, timeout=5)
    assert_no_subscribers(hub)
    # Every stream the hub registered follows chat (kinds 2, 3 and 4): each one closed
    # once, as client_gone. Kinds 3 and 4 (200) surely registered; some of kind 2 did.
    stats = hub.hub.stats
    assert stats.opened["news"] == 100
    assert stats.opened["chat"] >= 200
    assert dict(stats.closed) == {"client_gone": stats.opened["chat"]}
    assert (await http_request(hub.port, "/healthz"))[0] == 200


async def test_clients_vanishing_mid_delivery_do_not_disturb_others(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(CHANNELS)
    loop = asyncio.get_running_loop()
    survivor: SSEClient | None = None
    doomed: list[socket.socket] = []
    published = 0
    stop = False

    async def publisher() -> None:
        nonlocal published
        while not stop:
            await redis_client.publish("chat", f"m{published}")
            published += 1

    try:
        for i in range(300):
            if i == 100:  # registered between the doomed ones
                survivor = await SSEClient.connect(hub.port, "/channels/chat")
                await survivor.read_until(lambda c: c.parser.last_id)
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", hub.port))
            await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
            doomed.append(sock)
        await wait_until(lambda: hub.hub.connections == 301, timeout=5)
        sending = asyncio.create_task(publisher())
        # Vanish one by one while messages flow, as tabs close under a busy hub.
        for i, sock in enumerate(doomed):
            if i % 2:
                _rst(sock)
            else:
                sock.close()
            await asyncio.sleep(0.001)
        stop = True
        await sending
        await redis_client.publish("chat", "end")
        assert survivor is not None
        await survivor.read_until(lambda c: c.events and c.events[-1].data == "end", 10)
        got = [e.data for e in survivor.events[:-1]]
        missing = sorted(set(range(published)) - {int(d[1:]) for d in got})
        assert got == [f"m{i}" for i in range(published)], f"missing {missing[:20]}"
    finally:
        stop = True
        for sock in doomed:
            sock.close()
        if survivor is not None:
            await survivor.close()
    await wait_until(lambda: hub.hub.connections == 0, timeout=5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_heartbeats_survive_clients_vanishing(
    start_hub: StartHub, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # One timer for the whole hub re-arms itself after writing: it must survive
    # clients vanishing between two beats.
    hub = await start_hub(CHANNELS, heartbeat=0.002)
    loop = asyncio.get_running_loop()
    survivor = await SSEClient.connect(hub.port, "/channels/chat")
    doomed: list[socket.socket] = []
    try:
        await survivor.read_until(lambda c: c.parser.last_id)
        for _ in range(400):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", hub.port))
            await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
            doomed.append(sock)
        await wait_until(lambda: hub.hub.connections == 401, timeout=5)
        for i, sock in enumerate(doomed):
            if i % 2:
                _rst(sock)
            else:
                sock.close()
            if i % 4 == 0:
                await asyncio.sleep(0.001)
        await wait_until(lambda: hub.hub.connections == 1, timeout=5)
        # An event marks the stream: heartbeats behind it were written after the
        # clients vanished, whatever had queued up before.
        await redis_client.publish("chat", "all gone")
        mark = b"data: all gone\n\n"

        def beats_after_mark(c: SSEClient) -> int:
            return c.body.partition(mark)[2].count(b":\n\n")

        await survivor.read_until(lambda c: beats_after_mark(c) >= 5, 2)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        for sock in doomed:
            sock.close()
        await survivor.close()
    assert errors == []
