"""CORS for the stream endpoints: allowed origins, credentials, preflight."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from ..config import Cors
from .headers import Extra

__all__ = ["add_preflight", "cors_headers"]

# Request headers an EventSource (or a polyfill, or a future auth token) may send.
_ALLOWED_HEADERS = ("last-event-id", "cache-control", "accept", "authorization", "x-requested-with")
_METHODS = "GET, HEAD, OPTIONS"


def _allowed(cors: Cors, origin: str | None) -> bool:
    return origin is not None and ("*" in cors.allow_origins or origin in cors.allow_origins)


def cors_headers(get_cors: Callable[[], Cors]) -> Extra:
    """What adds the CORS headers to a response (for ``add_response_headers``).

    ``get_cors`` is read per response, so a config reload takes effect at once. With
    no origin configured it adds nothing: every answer is then the same whatever the
    request's Origin, so there is nothing for caches to vary on.
    """

    def add(request: web.Request, response: web.StreamResponse) -> None:
        cors = get_cors()
        if not cors.allow_origins:
            return
        # The answer depends on Origin whatever it is: caches must key on it.
        response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if not _allowed(cors, origin):
            return  # no Access-Control-Allow-Origin: the browser blocks the read
        assert origin is not None
        if "*" in cors.allow_origins and not cors.allow_credentials:
            response.headers["Access-Control-Allow-Origin"] = "*"
        else:
            response.headers["Access-Control-Allow-Origin"] = origin
        if cors.allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"

    return add


def add_preflight(
    app: web.Application,
    get_cors: Callable[[], Cors],
    paths: Iterable[str],
    expect_handler: Callable[[web.Request], Awaitable[None]],
) -> None:
    """Answer preflights (``OPTIONS``) on ``paths``; ``get_cors`` is read per request."""

    async def preflight(request: web.Request) -> web.Response:
        cors = get_cors()
        origin = request.headers.get("Origin")
        method = request.headers.get("Access-Control-Request-Method")
        if origin is None or method is None:
            # Not a CORS preflight: a plain OPTIONS asks what the resource allows.
            return web.Response(status=204, headers={"Allow": _METHODS})
        if not _allowed(cors, origin) or method.upper() not in ("GET", "HEAD"):
            return web.Response(status=403, text="CORS request not allowed\n")
        asked = request.headers.get("Access-Control-Request-Headers", "")
        wanted = [h.strip().lower() for h in asked.split(",") if h.strip()]
        headers = {
            "Access-Control-Allow-Methods": _METHODS,
            "Access-Control-Allow-Headers": ", ".join(h for h in wanted if h in _ALLOWED_HEADERS)
            or ", ".join(_ALLOWED_HEADERS),
            "Access-Control-Max-Age": str(cors.max_age),
        }
        return web.Response(status=204, headers=headers)

    for path in paths:
        app.router.add_route("OPTIONS", path, preflight, expect_handler=expect_handler)
