"""HTTP surface: stream set-up for ``/channels/{name}`` and ``/events``, health, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import Sequence

from aiohttp import web
from aiohttp.http import HttpVersion11

from . import demo, sse
from .broker import Broker
from .channel import Channel
from .cors import add_cors
from .hub import Hub
from .messages import MAX_ID_LENGTH
from .subscriber import Subscriber

__all__ = ["BROKER", "BUSY_EVENT", "HUB", "create_app", "healthz", "readyz"]

# The named event that tells a client turned away by a limit why, before the stream ends.
BUSY_EVENT = "ssehub-busy"

HUB = web.AppKey("hub", Hub)
BROKER = web.AppKey("broker", Broker)

STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tells nginx (and proxies that copy its convention) not to buffer the stream.
    "X-Accel-Buffering": "no",
}

_BAD_ID = re.compile(r"[\r\n\x00]")


def _last_event_id(request: web.Request) -> str | None:
    """The position to resume from: the header browsers send on reconnect wins over
    ``?lastEventId=`` (which only a first connection needs, and which stays in the URL)."""
    value = request.headers.get("Last-Event-ID")
    if value is None:
        value = request.query.get("lastEventId")
    if not value:
        return None  # an empty id means "none", as in the SSE spec
    if len(value) > MAX_ID_LENGTH or _BAD_ID.search(value):
        raise web.HTTPBadRequest(text=f"malformed Last-Event-ID (at most {MAX_ID_LENGTH} chars)\n")
    return value


def _shown(name: str) -> str:
    """A client-supplied name made safe to echo: percent-decoded invalid UTF-8
    arrives as lone surrogates, which cannot be encoded as they are."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _channel(hub: Hub, request: web.Request) -> Sequence[Channel]:
    """``/channels/{name}``: the one channel named in the path."""
    name = request.match_info["name"]
    channel = hub.channels.get(name)
    if channel is None:
        raise web.HTTPNotFound(text=f"unknown channel: {_shown(name)}\n")
    return channel.alone


def _channel_list(hub: Hub, request: web.Request) -> Sequence[Channel]:
    """``/events?channel=a&channel=b``: several channels through one connection."""
    names = list(dict.fromkeys(request.query.getall("channel", [])))
    if not names:
        raise web.HTTPBadRequest(text="give at least one ?channel=\n")
    limit = hub.config.limits.max_channels_per_connection
    if len(names) > limit:
        raise web.HTTPBadRequest(text=f"at most {limit} channels per connection\n")
    unknown = [n for n in names if n not in hub.channels]
    if unknown:
        raise web.HTTPNotFound(text=f"unknown channel: {_shown(', '.join(unknown))}\n")
    return tuple(hub.channels[n] for n in names)


async def stream(request: web.Request) -> web.StreamResponse:
    """Open an event stream and hold it until either side ends it.

    One coroutine for both routes, with no inner await of another coroutine: its
    frame lives as long as the stream, so each one saved is memory per connection.
    """
    hub = request.app[HUB]
    mux = "name" not in request.match_info
    channels = _channel_list(hub, request) if mux else _channel(hub, request)
    last_event_id = _last_event_id(request)
    wants_stream = "text/event-stream" in request.headers.get("Accept", "")
    refusal = _over_limit(hub, channels)
    if refusal is not None and not wants_stream:
        return _unavailable(hub, refusal)
    if request.version.major != 1:
        # An HTTP/2 request line over plain HTTP/1 framing: nothing sensible to stream.
        raise web.HTTPBadRequest(text="HTTP/1.0 or HTTP/1.1 only\n")
    resp = web.StreamResponse(status=200, headers=STREAM_HEADERS)
    # HTTP/1.1 bodies are chunked; an HTTP/1.0 body ends when the connection does
    # (every response closes its connection: see close_after in create_app).
    chunked = request.version == HttpVersion11
    if chunked:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    refusal = _over_limit(hub, channels)  # again: the awaits above let others in
    if refusal is not None:
        return await _turn_away(hub, resp, refusal)
    # The first bytes go through aiohttp's writer, which sends the buffered
    # headers with them; after this the hub writes straight to the transport,
    # and aiohttp's writer is not touched again until the final chunk.
    await resp.write(sse.retry(hub.config.retry_ms))
    transport = request.transport
    if transport is None or transport.is_closing():
        return resp

    sub = Subscriber(transport, chunked, asyncio.get_running_loop().create_future(), channels)
    live = hub.subscribe(sub, last_event_id, mux)
    try:
        # A resume longer than the buffer bound goes out as the client reads it:
        # drain() waits on the transport's pause/resume_writing, nothing else.
        with contextlib.suppress(ConnectionError):
            while not live and not sub.waiter.done():
                await request.writer.drain()
                live = hub.catch_up(sub)
        await sub.waiter
    finally:
        hub.unsubscribe(sub)
    # Ended by the hub (shutdown, channel removed): finish the body cleanly so
    # the browser's EventSource reconnects rather than seeing an error.
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


def _over_limit(hub: Hub, channels: Sequence[Channel]) -> str | None:
    """Why a new stream must be turned away, or None."""
    limits = hub.config.limits
    if limits.max_connections and hub.connections >= limits.max_connections:
        return "max_connections"
    if limits.max_per_channel and any(len(c) >= limits.max_per_channel for c in channels):
        return "max_per_channel"
    return None


def _busy_retry_ms(hub: Hub) -> int:
    # Jitter spreads the comeback of everyone turned away at the same moment.
    return int(hub.config.limits.busy_retry_ms * random.uniform(0.5, 1.5))


async def _turn_away(hub: Hub, resp: web.StreamResponse, reason: str) -> web.StreamResponse:
    """A full hub still answers an EventSource with 200: any other status would make
    the browser give up for good. The stream says why and when to come back, and ends."""
    retry_ms = _busy_retry_ms(hub)
    data = json.dumps({"reason": reason, "retry": retry_ms}, separators=(",", ":"))
    hub.stats.closed["limit"] += 1
    await resp.write(sse.retry(retry_ms) + sse.encode(data, event=BUSY_EVENT))
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


def _unavailable(hub: Hub, reason: str) -> web.Response:
    """For clients that are not an EventSource: a plain 503 with Retry-After."""
    hub.stats.closed["limit"] += 1
    seconds = max(1, round(_busy_retry_ms(hub) / 1000))
    return web.Response(status=503, text=f"busy: {reason}\n", headers={"Retry-After": str(seconds)})


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 only while the hub holds a live Redis subscription for its channels."""
    broker = request.app[BROKER]
    if broker.ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: redis {broker.state.value}\n")


async def expect(request: web.Request) -> None:
    """The ``Expect:`` header. Nothing here takes a request body, so ``100-continue``
    needs no interim answer, and anything else is a 417 that does not echo the value:
    aiohttp's default handler echoes it, and a value that is not UTF-8 then fails to
    encode, a 500 for any client that sends one."""
    expect = request.headers.get("Expect", "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="unsupported Expect header\n")


async def not_routed(request: web.Request) -> web.StreamResponse:
    """A path or method no route serves: 405 where the path exists, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is request.match_info.route.resource:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def create_app(hub: Hub, broker: Broker) -> web.Application:
    """The public application; streams end cleanly on shutdown."""
    app = web.Application()
    app[HUB] = hub
    app[BROKER] = broker
    app.router.add_get("/channels/{name}", stream, expect_handler=expect)
    app.router.add_get("/events", stream, expect_handler=expect)
    app.router.add_get("/healthz", healthz, expect_handler=expect)
    app.router.add_get("/readyz", readyz, expect_handler=expect)
    add_cors(app, lambda: hub.config.cors, ["/channels/{name}", "/events"], expect)
    if hub.config.demo:
        app.router.add_get("/", demo.index(hub), expect_handler=expect)
    # Last: every other path and method, so that no request reaches aiohttp's own
    # expect handler (see `expect`); it answers 405/404 as the router would.
    app.router.add_route("*", "/{tail:.*}", not_routed, expect_handler=expect)

    async def close_after(request: web.Request, response: web.StreamResponse) -> None:
        # The server keeps no keep-alive timer per connection (see server.py), so a
        # connection closes once its response is done: say so, or a keep-alive
        # client would send its next request into a closing socket. (This hook runs
        # after aiohttp chose its Connection header, hence the header by hand.)
        response.force_close()
        response.headers["Connection"] = "close"

    app.on_response_prepare.append(close_after)

    async def end_streams(app: web.Application) -> None:
        app[HUB].close_all("shutdown")

    app.on_shutdown.append(end_streams)
    return app
