"""The presence endpoint: ``GET /channels/<name>/presence``, answered from Redis.

What is stored and how (the node's writer, the reader's pruning of dead nodes) is the
Redis layer's: ssehub/redis/events.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ..hub.hub import Hub
from ..redis.clients import FAULTS
from ..redis.events import PresenceReader, dumps
from ..redis.factory import create_presence_reader

__all__ = ["PRESENCE", "add_presence_route"]

PRESENCE = web.AppKey("presence", PresenceReader)
PRESENCE_HUB = web.AppKey("presence_hub", Hub)
# On the public listener: raises the answer a stream request for the channel would get.
AUTHORIZE: web.AppKey[Callable[[web.Request, str], None]] = web.AppKey("presence_authorize")


def _presence_channel(hub: Hub, name: str) -> bool:
    """Whether ``name`` is a listed channel or a family member with ``presence: true``."""
    listed = hub.config.channels.get(name)
    if listed is not None and not listed.family:
        return listed.presence
    found = hub.families.find(name)
    return found is not None and found[0].config.presence


async def presence(request: web.Request) -> web.Response:
    """``GET /channels/<name>/presence[?cursor=N&count=M]``: count, members, next cursor."""
    hub = request.app[PRESENCE_HUB]
    name = request.match_info["name"]
    if not _presence_channel(hub, name):
        raise web.HTTPNotFound(text="no presence for this channel\n")
    authorize = request.app.get(AUTHORIZE)
    if authorize is not None:  # the public listener: the same answer a stream would get
        authorize(request, name)
    limit = hub.config.presence.max_page
    try:
        cursor = int(request.query.get("cursor", "0"))
        count = int(request.query.get("count", str(min(100, limit))))
    except ValueError:
        raise web.HTTPBadRequest(text="cursor and count are integers\n") from None
    # HSCAN's cursor is an unsigned 64-bit number: Redis refuses a larger one, and the
    # client's mistake must not read as "redis unavailable".
    if not 0 <= cursor < 2**64 or not 1 <= count <= limit:
        raise web.HTTPBadRequest(text=f"cursor 0 to 2**64-1, count 1-{limit}\n")
    try:
        answer = await request.app[PRESENCE].page(name, cursor, count)
    except FAULTS:
        raise web.HTTPServiceUnavailable(text="redis unavailable\n") from None
    return web.json_response(answer, dumps=dumps)


def add_presence_route(
    app: web.Application,
    hub: Hub,
    authorize: Callable[[web.Request, str], None] | None = None,
) -> None:
    """Serve the presence endpoint on ``app`` (its reader lives with the app)."""
    app[PRESENCE] = reader = create_presence_reader(hub.config.redis)
    app[PRESENCE_HUB] = hub
    if authorize is not None:
        app[AUTHORIZE] = authorize
    app.router.add_get("/channels/{name}/presence", presence)

    async def close_reader(app: web.Application) -> AsyncIterator[None]:
        yield
        await reader.close()

    app.cleanup_ctx.append(close_reader)
