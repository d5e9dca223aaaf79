"""The demo page at ``GET /``: the configured channels, live, in plain HTML and JavaScript.

The page is a static file with the channel list embedded at request time as JSON in a
``<script type="application/json">`` element: no build step, no extra endpoint, and
the page never shows a channel the hub does not serve.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources

from aiohttp import web

from ..config import ChannelConfig, Config
from ..hub.hub import Hub

Handler = Callable[[web.Request], Awaitable[web.Response]]

__all__ = ["channels_json", "index", "render"]

_PLACEHOLDER = "{{SSEHUB_CONFIG}}"


@cache
def _template() -> str:
    return resources.files("ssehub.http").joinpath("static/index.html").read_text(encoding="utf-8")


# A payload each format accepts: a json channel rejects a bare 'hello'.
_SAMPLE = {
    "text": "'hello'",
    "json": shlex.quote('{"data": "hello", "event": "greeting"}'),
}
# A stream entry's data in each format (json: a JSON value).
_ENTRY = {"text": "'hello'", "json": shlex.quote('"hello"')}


def _publish(ch: ChannelConfig) -> str:
    """The shell command that sends ``ch`` an event."""
    if ch.stream:
        return f"redis-cli XADD {shlex.quote(ch.stream)} '*' data {_ENTRY[ch.format]}"
    return f"redis-cli PUBLISH {shlex.quote(ch.redis_channel)} {_SAMPLE[ch.format]}"


def channels_json(config: Config) -> str:
    """The page's data: each channel, its URL, its Redis channel and the publish command.

    A family's entries keep the ``*``: the page asks for the member's part and puts
    it in the URL and the command (``family: true`` marks them).
    """
    channels = [
        {
            "name": ch.name,
            "url": f"/channels/{ch.name}",
            "redis_channel": ch.stream or ch.redis_channel,
            # "token": private; the page sends the pasted token as ?token=. "proxy":
            # private; the application is asked, with the site's cookies.
            "auth": ch.auth,
            "publish": _publish(ch),
            **({"family": True} if ch.family else {}),
        }
        for ch in config.channels.values()
    ]
    text = json.dumps({"channels": channels}, ensure_ascii=False, allow_nan=False)
    # Inside <script>, "</" could end the element early: escape "<" (and & for
    # safety); JSON.parse reads \u003c back as "<".
    return text.replace("<", "\\u003c").replace("&", "\\u0026")


def render(config: Config) -> str:
    """The page with this config's channels in it."""
    return _template().replace(_PLACEHOLDER, channels_json(config))


def index(hub: Hub) -> Handler:
    """The ``GET /`` handler; it reads ``hub.config`` per request, so a reload shows."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text=render(hub.config),
            content_type="text/html",
            headers={"Cache-Control": "no-cache"},
        )

    return handler
