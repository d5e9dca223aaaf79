"""The demo page in a real headless Chromium (Debian's), driven over the DevTools protocol.

These tests fail, not skip, when Chromium is missing: ``./dev test`` installs it, so a
missing browser means the set-up is broken and CI must say so.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from ssehub.config import Config
from ssehub.http.demo import render
from ssehub.server import HubServer

from .cdp import Browser, chromium_path, launch
from .conftest import hub_config
from .redis_server import RedisServer
from .sseclient import wait_until
from .test_auth import SECRET, token

pytestmark = pytest.mark.slow


@pytest.fixture
async def page() -> AsyncIterator[Browser]:
    exe = chromium_path()
    if exe is None:
        pytest.fail(
            "chromium is not installed; `./dev test` installs it "
            "(apt-get install chromium chromium-driver)"
        )
    async with launch(exe) as browser:
        yield browser


def card(channel: str, selector: str = "") -> str:
    return f'[data-channel="{channel}"] {selector}'.strip()


def shows(channel: str, cls: str, text: str) -> str:
    """A JS expression: a row of class ``cls`` in the channel's list contains ``text``."""
    rows = json.dumps(card(channel, f"li.{cls}"))
    has = f"li => li.textContent.includes({json.dumps(text)})"
    return f"[...document.querySelectorAll({rows})].some({has})"


def state_is(channel: str, state: str) -> str:
    sel = json.dumps(card(channel, ".state"))
    return f"document.querySelector({sel}).dataset.state === {json.dumps(state)}"


async def background(page: Browser, selector: str) -> str:
    value = await page.evaluate(
        f"getComputedStyle(document.querySelector({json.dumps(selector)})).backgroundColor"
    )
    return str(value)


async def start(config: Config) -> HubServer:
    server = HubServer(config)
    await server.start()
    await wait_until(lambda: server.broker.ready, timeout=10)
    return server


async def test_page_subscribes_shows_events_and_reconnects_after_hub_restart(
    page: Browser, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    # A short retry so the browser's reconnect after the restart is quick.
    config = hub_config(
        redis_server.url, {"chat": {}, "news": {"redis_channel": "site:news"}}, retry_ms=200
    )
    hub = await start(config)
    servers = [hub]
    try:
        await page.goto(f"http://127.0.0.1:{hub.port}/")
        assert await page.text(card("chat", "h2")) == "chat"
        assert await page.text(card("news", ".publish")) == "redis-cli PUBLISH site:news 'hello'"
        assert await page.text(card("chat", ".state")) == "not subscribed"

        await page.click(card("chat", "button.subscribe"))
        await page.wait_for(state_is("chat", "open"))
        await wait_until(lambda: len(hub.hub.channels["chat"]) == 1)
        await redis_client.publish("chat", "hello from redis")
        await page.wait_for(shows("chat", "event", "hello from redis"))
        assert await page.text(card("chat", "li.event .type")) == "message"
        # The other channel was not subscribed and shows nothing.
        assert (
            await page.evaluate(
                f"document.querySelectorAll({json.dumps(card('news', 'li'))}).length"
            )
            == 0
        )

        # Restart the hub on the same port: the page must come back by itself.
        port = hub.port
        await hub.stop()
        servers.remove(hub)
        hub = await start(config.with_listen(port=port))
        servers.append(hub)
        assert hub.port == port
        await wait_until(lambda: len(hub.hub.channels["chat"]) == 1, timeout=20)
        await page.wait_for(state_is("chat", "open"))
        await page.wait_for(shows("chat", "note", "stream open again"))
        # The browser resumed with an id of the old run: the new hub cannot know
        # what was published in between, and says so before the live stream.
        await page.wait_for(shows("chat", "gap", "events were missed"))
        await page.wait_for(shows("chat", "gap", '"reason":"unknown_id"'))
        await redis_client.publish("chat", "after the restart")
        await page.wait_for(shows("chat", "event", "after the restart"))
    finally:
        for server in servers:
            await server.stop()


async def test_page_shows_the_gap_signal(page: Browser) -> None:
    """The page makes an ``ssehub-gap`` event visible (served by a stand-in for the hub)."""
    config = hub_config("redis://127.0.0.1:1/0", {"chat": {}})
    opened = asyncio.Event()

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=render(config), content_type="text/html")

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b"retry: 200\n\n"
            b"id: 7\nevent: ssehub-gap\ndata: 3 events lost\n\n"
            b"id: 8\ndata: after the gap\n\n"
        )
        opened.set()
        await asyncio.sleep(3600)  # held open until the test ends (handler cancelled)
        return resp

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/channels/chat", stream)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await page.goto(f"http://127.0.0.1:{port}/")
        await page.click(card("chat", "button.subscribe"))
        await page.wait_for(shows("chat", "gap", "events were missed: 3 events lost"))
        assert await page.text(card("chat", "li.gap .type")) == "ssehub-gap"
        assert await page.text(card("chat", "li.gap .id")) == "#7"
        await page.wait_for(shows("chat", "event", "after the gap"))
        # Visibly marked: the gap row is styled apart from ordinary events.
        assert await background(page, card("chat", "li.gap")) != await background(
            page, card("chat", "li.event")
        )
        assert opened.is_set()
    finally:
        await page.evaluate("document.querySelector('button.subscribe.on')?.click()")
        await runner.cleanup()


async def test_page_follows_a_family_member_named_in_its_field(
    page: Browser, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    config = hub_config(redis_server.url, {"user.*": {"redis_channel": "app:user:*"}})
    hub = await start(config)
    try:
        await page.goto(f"http://127.0.0.1:{hub.port}/")
        field = json.dumps(card("user.*", "input.member"))
        await page.evaluate(
            f"(() => {{ const f = document.querySelector({field});"
            " f.value = 'alice'; f.dispatchEvent(new Event('input')); })()"
        )
        assert await page.text(card("user.*", ".publish")) == (
            "redis-cli PUBLISH 'app:user:alice' 'hello'"
        )
        await page.click(card("user.*", "button.subscribe"))
        await page.wait_for(state_is("user.*", "open"))
        await wait_until(lambda: "user.alice" in hub.hub.channels and hub.hub.connections == 1)
        await redis_client.publish("app:user:alice", "for alice")
        await page.wait_for(shows("user.*", "event", "for alice"))
    finally:
        await page.evaluate("document.querySelector('button.subscribe.on')?.click()")
        await hub.stop()


async def test_private_channel_takes_a_pasted_token_and_shows_its_expiry(
    page: Browser, redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    config = hub_config(
        redis_server.url,
        {"chat": {}, "user.42": {"auth": "token"}},
        auth={"secret_file": str(tmp_path / "secret"), "renew_before": 1},
        retry_ms=200,
    )
    hub = await start(config)
    try:
        await page.goto(f"http://127.0.0.1:{hub.port}/")
        assert await page.text(card("user.42", ".private")) == "private: token"
        assert await page.evaluate(
            f"!document.querySelector({json.dumps(card('chat', '.private'))})"
        )
        # No token: the hub answers 401, which closes an EventSource for good.
        await page.click(card("user.42", "button.subscribe"))
        await page.wait_for(state_is("user.42", "closed"))
        assert "paste a valid token" in await page.text(card("user.42", ".state"))

        exp = int(time.time()) + 4
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(token(exp=exp))}"
        )
        await page.click(card("user.42", "button.subscribe"))
        await page.wait_for(state_is("user.42", "open"))
        await wait_until(lambda: len(hub.hub.channels["user.42"]) == 1)
        await redis_client.publish("user.42", "for 42")
        await page.wait_for(shows("user.42", "event", "for 42"))
        # Before exp: the named event; at exp the stream ends, and the browser's own
        # reconnect with the same (now expired) token meets a 401.
        await page.wait_for(shows("user.42", "auth", "token expires soon"), timeout=8)
        await page.wait_for(state_is("user.42", "closed"), timeout=8)
        assert time.time() >= exp
    finally:
        await hub.stop()
