"""HTTP surface: stream set-up for ``/channels/{name}`` and ``/events``, health, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from aiohttp.http import HttpVersion11
from redis.exceptions import RedisError

from ..config import ChannelConfig
from ..core import sse
from ..core.ids import new_session_id
from ..core.messages import MAX_ID_LENGTH
from ..hub.channel import Channel, Subscriber
from ..hub.control import Control
from ..hub.hub import Hub, Refused, Unknown
from ..hub.resume import MAX_STREAMS_PER_EVENTS, resume_streams
from ..hub.sessions import META_PARAM, BadMeta, meta_of, session_event
from ..logs import fields
from ..redis.pubsub import PubSubSource
from ..tasks import Tasks
from . import demo
from .auth import Access, Denied
from .compat import HeadWithBody, close_connection_after, expect, read_no_more, stream_transport
from .control import CONTROL, refused
from .cors import add_preflight, cors_headers
from .headers import add_response_headers
from .presence import add_presence_route
from .proxy_auth import PROXY, ProxyAuth, Unavailable, add_proxy_auth
from .publish import add_publish_route

__all__ = [
    "ACCESS",
    "BROKER",
    "BUSY_EVENT",
    "CONTROL",
    "HUB",
    "TASKS",
    "create_app",
    "healthz",
    "readyz",
]

log = logging.getLogger(__name__)

# The named event that tells a client turned away by a limit why, before the stream ends.
BUSY_EVENT = "ssehub-busy"

HUB = web.AppKey("hub", Hub)
BROKER = web.AppKey("broker", PubSubSource)
ACCESS = web.AppKey("access", Access)
# The process's long-lived tasks: one that ended unexpectedly makes it unready.
TASKS = web.AppKey("tasks", Tasks)

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


# Characters of the names a 404 echoes, at most (a valid name has at most 200).
MAX_SHOWN = 200


def _shown(names: Sequence[str]) -> str:
    """Client-supplied names made safe to echo: bounded, and encodable (percent-decoded
    invalid UTF-8 arrives as lone surrogates, which cannot be encoded as they are)."""
    text = ", ".join(names)
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _rewind(request: web.Request) -> int | None:
    """``?rewind=N``: how many past events a first connection starts with."""
    value = request.query.get("rewind")
    if value is None:
        return None
    if not (value.isdigit() and value.isascii()) or len(value) > 9:
        raise web.HTTPBadRequest(text="rewind must be a non-negative integer\n")
    return int(value)


def _names(hub: Hub, request: web.Request, mux: bool) -> list[str]:
    """The channel names a stream asks for: the path's one, or ``/events``' ``?channel=``s."""
    if not mux:
        return [request.match_info["name"]]
    names = list(dict.fromkeys(request.query.getall("channel", [])))
    if not names:
        raise web.HTTPBadRequest(text="give at least one ?channel=\n")
    limit = hub.config.limits.max_channels_per_connection
    if len(names) > limit:
        raise web.HTTPBadRequest(text=f"at most {limit} channels per connection\n")
    return names


def _configs(hub: Hub, names: Sequence[str]) -> list[tuple[str, ChannelConfig]]:
    """Each name asked for with its channel's or its family's config (for access checks);
    names nothing serves are left out (``acquire`` answers them with a 404)."""
    out = []
    for name in names:
        channel = hub.channels.get(name)
        if channel is not None:
            out.append((name, channel.config))
            continue
        match = hub.families.find(name)
        if match is not None:
            out.append((name, match[0].config))
    return out


async def stream(request: web.Request) -> web.StreamResponse:
    """Open an event stream and hold it until either side ends it.

    One coroutine for both routes, with no inner await of another coroutine: its
    frame lives as long as the stream, so each one saved is memory per connection.
    """
    hub = request.app[HUB]
    control = request.app[CONTROL]
    mux = "name" not in request.match_info
    names = _names(hub, request, mux)
    wants_stream = "text/event-stream" in request.headers.get("Accept", "")
    configs = _configs(hub, names)
    try:
        # Before acquire: a request without the right token must not create a family
        # member (a Redis SUBSCRIBE) on its way to being refused.
        grant = request.app[ACCESS].grant(request, configs)
        proxied = None
        if any(cfg.auth == "proxy" for _, cfg in configs):
            proxied = await request.app[PROXY].grant(request, configs)
    except Denied as exc:
        raise exc.response() from None
    except Unavailable:  # the application did not answer: transient
        if not wants_stream:
            return _unavailable(hub, "auth_unavailable")
        return await _turn_away(hub, await _prepare(request), "auth_unavailable")
    # Who it is (a token's sub, the application's user) and what it showed (the token,
    # the cookies asked about): what disconnects, refusals and per-user limits know.
    user = (grant.sub if grant is not None else None) or (proxied.sub if proxied else "")
    user = str(user)
    credential = ";".join(
        c for c in (grant.token if grant else "", proxied.credential if proxied else "") if c
    )
    until = control.refused_until(user, credential)
    if until:
        control.stats.refused += 1
        return refused(until)
    try:
        meta = meta_of(grant, request.query.get(META_PARAM), hub.config.meta)
    except BadMeta as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    if proxied is not None and grant is None:
        meta = proxied.meta
    last_event_id = _last_event_id(request)
    asked_rewind = _rewind(request)
    if request.version.major != 1:
        # An HTTP/2 request line over plain HTTP/1 framing: nothing sensible to stream.
        raise web.HTTPBadRequest(text="HTTP/1.0 or HTTP/1.1 only\n")
    try:
        # Held from here to the end: a family member lives while a stream holds it.
        channels = hub.acquire(names)
    except Unknown as exc:
        raise web.HTTPNotFound(text=f"unknown channel: {_shown(exc.names)}\n") from None
    except Refused as exc:
        if not wants_stream:
            return _unavailable(hub, exc.reason)
        return await _turn_away(hub, await _prepare(request), exc.reason)
    sub: Subscriber | None = None
    session = ""
    hold = 0  # the node's count of this user's streams (with workers), until track()
    try:
        if mux and sum(c.stream for c in channels) > MAX_STREAMS_PER_EVENTS:
            raise web.HTTPBadRequest(
                text=f"at most {MAX_STREAMS_PER_EVENTS} stream channels per /events connection\n"
            )
        # A first connection may start with the last events (ignored on a resume):
        # ?rewind=N of every channel, else each channel's own `rewind` (None).
        rewind = asked_rewind
        if rewind is not None:
            rewind = min(rewind, hub.config.limits.max_rewind)
        if last_event_id is not None:
            rewind = 0
        refusal = _over_limit(hub, channels, mux, control, user)
        if refusal is None and control.gate is not None:
            # With workers, limits.max_per_user counts the node's streams: main answers.
            hold = await control.hold_user(user)
            if hold < 0:
                refusal = "max_per_user"
        if refusal is not None and not wants_stream:
            return _unavailable(hub, refusal)
        resp = await _prepare(request)
        if request.method == "HEAD":
            return resp
        # Again: the awaits above let others in (the node's count is held already).
        refusal = "max_per_user" if hold < 0 else _over_limit(hub, channels, mux, control, user)
        if refusal is not None:
            return await _turn_away(hub, resp, refusal)
        # The first bytes go through aiohttp's writer, which sends the buffered
        # headers with them. Once the subscriber is registered the hub writes
        # straight to the transport, and aiohttp's writer is not touched again
        # until the final chunk (before that, only the keepalives below use it).
        # The session id first, before any position or replay (see hub/sessions.py).
        session = new_session_id()
        # From here on the page may know it, and a publisher's except name it: even
        # while the stream waits on Redis below, such events stay out of its replay.
        hub.sessions.open(session)
        await resp.write(sse.retry(hub.config.retry_ms) + session_event(session))
        resp.forget_head()
        read_no_more(request)
        # A new family member is not live until Redis confirms its subscription:
        # a position given before that could miss what is published meanwhile.
        members = [c.redis for c in channels if c.family is not None and not c.stream]
        if members:
            broker = request.app[BROKER]
            while not await broker.wait_subscribed(members, hub.config.heartbeat):
                if _gone(hub, channels):
                    hub.stats.closed["channel_removed"] += 1
                    return await _end(resp)
                await resp.write(sse.comment())  # Redis away: keep proxies patient
        # A stream channel's position is its stream's: known once the reader has
        # read where the stream ends.
        streams = [c.redis for c in channels if c.stream]
        if streams and hub.streams is not None:
            while not await hub.streams.wait_live(streams, hub.config.heartbeat):
                if _gone(hub, channels):
                    hub.stats.closed["channel_removed"] += 1
                    return await _end(resp)
                await resp.write(sse.comment())
        await hub.caught_up(last_event_id, channels, mux)
        transport = stream_transport(request)
        if transport is None:
            return resp
        # Stream channels whose position is older than the hub's memory catch up
        # from Redis first, as the client reads (drain() waits at the bound).
        transport.set_write_buffer_limits(high=hub.replay_bound)
        try:
            last_event_id = await resume_streams(hub, channels, last_event_id, mux, resp.write)
        except RedisError as exc:
            log.warning("stream resume failed", extra=fields(error=str(exc)))
            return await _end(resp)  # the browser comes back with its last id
        except ConnectionError:
            # The client left while its replay was being written: nothing to report
            # (aiohttp would log it as an error with a traceback).
            return resp
        transport = stream_transport(request)
        if transport is None:
            return resp
        # The last checks and the registration in one step: no await between them.
        if control.over_user_limit(user):
            return await _turn_away(hub, resp, "max_per_user")
        if control.refused_until(user, credential):  # disconnected while setting up
            return await _end(resp)
        sub = Subscriber(transport, request.version == HttpVersion11, _future(), channels)
        sub.expires = _expires(grant.exp if grant else 0.0, proxied.exp if proxied else 0.0)
        sub.session = session
        sub.meta = meta
        live = hub.subscribe(sub, last_event_id, mux, rewind)
        control.track(sub, user, credential, hold)
        hold = 0  # the stream holds it now: forget() gives it back
        request.app[ACCESS].track(sub)
        # This frame lives as long as the stream: keep only what the end needs.
        del names, configs, grant, proxied, meta, members, streams, transport
        # A resume longer than the buffer bound goes out as the client reads it:
        # drain() waits on the transport's pause/resume_writing, nothing else.
        with contextlib.suppress(ConnectionError):
            while not live and not sub.waiter.done():
                await request.writer.drain()
                live = hub.catch_up(sub)
        await sub.waiter
    finally:
        control.release_user(hold)  # (a stream that never registered)
        if sub is not None:
            hub.unsubscribe(sub)
            control.forget(sub)
            request.app[ACCESS].forget(sub)
        hub.sessions.close(session)
        hub.release(channels)
    # Ended by the hub (shutdown, channel removed): finish the body cleanly so
    # the browser's EventSource reconnects rather than seeing an error.
    return await _end(resp)


async def _end(resp: web.StreamResponse) -> web.StreamResponse:
    """Finish a stream's body cleanly: the browser's EventSource reconnects."""
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


def _gone(hub: Hub, channels: Sequence[Channel]) -> bool:
    """True when a channel the stream holds was removed meanwhile (a reload)."""
    return any(hub.channels.get(c.name) is not c for c in channels)


def _future() -> asyncio.Future[str]:
    return asyncio.get_running_loop().create_future()


async def _prepare(request: web.Request) -> HeadWithBody:
    """A stream's headers: 200, ``text/event-stream``, no caching or buffering; sent
    with the stream's first bytes."""
    resp = HeadWithBody(status=200, headers=STREAM_HEADERS)
    # HTTP/1.1 bodies are chunked; an HTTP/1.0 body ends when the connection does
    # (every response closes its connection: see close_after in create_app).
    if request.version == HttpVersion11:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    return resp


def _expires(*times: float) -> float:
    """The earliest of the expiry times that are set (0: none is)."""
    return min((t for t in times if t), default=0.0)


def _over_limit(
    hub: Hub, channels: Sequence[Channel], mux: bool, control: Control, user: str
) -> str | None:
    """Why a new stream must be turned away, or None."""
    limits = hub.config.limits
    if limits.max_connections and hub.connections >= limits.max_connections:
        return "max_connections"
    if control.over_user_limit(user):
        return "max_per_user"
    if limits.max_per_channel and any(len(c) >= limits.max_per_channel for c in channels):
        return "max_per_channel"
    if mux and hub.refuses_group(channels):
        return "max_event_groups"
    return None


def _busy_retry_ms(hub: Hub) -> int:
    # Jitter spreads the comeback of everyone turned away at the same moment.
    return int(hub.config.limits.busy_retry_ms * random.uniform(0.5, 1.5))


async def _turn_away(hub: Hub, resp: web.StreamResponse, reason: str) -> web.StreamResponse:
    """A full hub still answers an EventSource with 200: any other status would make
    the browser give up for good. The stream says why and when to come back, and ends."""
    retry_ms = _busy_retry_ms(hub)
    data = json.dumps({"reason": reason, "retry": retry_ms}, separators=(",", ":"), allow_nan=False)
    hub.stats.closed["limit"] += 1
    await resp.write(sse.retry(retry_ms) + sse.encode(data, event=BUSY_EVENT))
    return await _end(resp)


def _unavailable(hub: Hub, reason: str) -> web.Response:
    """For clients that are not an EventSource: a plain 503 with Retry-After."""
    hub.stats.closed["limit"] += 1
    seconds = max(1, round(_busy_retry_ms(hub) / 1000))
    return web.Response(status=503, text=f"busy: {reason}\n", headers={"Retry-After": str(seconds)})


async def healthz(request: web.Request) -> web.Response:
    """200 while the process serves."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """200 only while the hub holds a live Redis subscription for its channels (and
    every long-lived task of the process runs)."""
    tasks = request.app.get(TASKS)
    if tasks is not None and tasks.failed is not None:
        return web.Response(status=503, text=f"not ready: {tasks.failed} failed\n")
    broker = request.app[BROKER]
    if request.app[HUB].upstream_ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text=f"not ready: redis {broker.state.value}\n")


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


def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    # The server keeps no keep-alive timer per connection (see server.py), so a
    # connection closes once its response is done: say so, or a keep-alive
    # client would send its next request into a closing socket.
    close_connection_after(response)


def create_app(hub: Hub, broker: PubSubSource, control: Control) -> web.Application:
    """The public application; streams end cleanly on shutdown. ``control``: the
    process's streams by session and user (its node's, hub/control.py)."""
    app = web.Application()
    app[HUB] = hub
    app[BROKER] = broker
    app[ACCESS] = access = Access(lambda: hub.config)
    app[CONTROL] = control
    add_proxy_auth(app, ProxyAuth(lambda: hub.config, control.stats))
    if hub.config.publish is not None and hub.config.publish.public:
        add_publish_route(app, control, lambda: hub.config)
    app.router.add_get("/channels/{name}", stream, expect_handler=expect)
    app.router.add_get("/events", stream, expect_handler=expect)
    app.router.add_get("/healthz", healthz, expect_handler=expect)
    app.router.add_get("/readyz", readyz, expect_handler=expect)
    add_preflight(app, lambda: hub.config.cors, ["/channels/{name}", "/events"], expect)
    if hub.config.demo:
        app.router.add_get("/", demo.index(hub), expect_handler=expect)
    if hub.config.presence.public:

        def authorize(request: web.Request, name: str) -> None:
            try:
                access.authorize(request, _configs(hub, [name]))
            except Denied as exc:
                raise exc.response() from None

        add_presence_route(app, hub, authorize)
    # Last: every other path and method, so that no request reaches aiohttp's own
    # expect handler (see aiohttp_compat.expect); it answers 405/404 as the router would.
    app.router.add_route("*", "/{tail:.*}", not_routed, expect_handler=expect)

    add_response_headers(app, _close_after, cors_headers(lambda: hub.config.cors))

    async def end_streams(app: web.Application) -> None:
        app[HUB].close_all("shutdown")

    app.on_shutdown.append(end_streams)

    # The expiry timer runs while the app does (one for all streams, see auth.Access).
    async def expiry_timer(app: web.Application) -> AsyncIterator[None]:
        access.start()
        yield
        access.stop()

    app.cleanup_ctx.append(expiry_timer)
    return app
