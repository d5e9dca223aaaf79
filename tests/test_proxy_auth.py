"""``auth: proxy``: the hub asks a real (small) aiohttp application on port 0; grants,
denials, the cache, one call per session in a storm, and the application down or slow
answered as busy -- never an open door, never a stranded browser."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from ssehub.server import HubServer

from .conftest import StartHub
from .redis_server import RedisServer, free_port
from .sseclient import SSEClient, http_request, open_stream
from .test_metrics import one, scrape
from .test_workers import SPREAD, WORKERS, Node, write_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "proxy_auth_app.py"
BUSY = {"Accept": "text/event-stream"}


class App:
    """The application: sessions by cookie, each call recorded; behaviour per session."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.in_flight: dict[str, int] = {}
        self.most_in_flight = 0
        self.delay = 0.0
        self.expire_at = 0.0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        asked = await request.json()
        self.calls.append(asked)
        session = asked["cookies"].get("sid", "")
        self.in_flight[session] = self.in_flight.get(session, 0) + 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight[session])
        try:
            await asyncio.sleep(self.delay)
            if session == "slow":
                await asyncio.sleep(5)
            if session == "broken":
                return web.Response(status=500)
            if session == "garbled":
                return web.json_response({"channels": "user.42"})
            if not session.startswith("user"):
                return web.Response(status=403)
            user = session.removeprefix("user")
            answer: dict[str, Any] = {
                "user": user,
                "channels": [f"user.{user}", "news.*"],
                "meta": {"name": f"n{user}"},
            }
            if self.expire_at:
                answer["expire_at"] = self.expire_at
            return web.json_response(answer)
        finally:
            self.in_flight[session] -= 1


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = App()
    application = web.Application()
    application.router.add_post("/auth", state.handle)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


CHANNELS: dict[str, Any] = {"chat": {}, "user.*": {"auth": "proxy"}, "news.*": {"auth": "proxy"}}


async def proxied_hub(start_hub: StartHub, port: int, **proxy: Any) -> HubServer:
    settings = {
        "url": f"http://127.0.0.1:{port}/auth",
        "cookies": ["sid"],
        # The application answers from this test's own loop: on a loaded machine 0.5 s
        # (with the storm's 0.2 s delay) could pass, and a grant turn into busy.
        "timeout": 5,
        **proxy,
    }
    return await start_hub(CHANNELS, auth={"proxy": settings}, admin={"port": 0})


def cookie(value: str, more: str = "") -> dict[str, str]:
    return {"Cookie": f"sid={value}{more}"}


async def test_the_application_grants_the_channels_it_lists(
    app: App, start_hub: StartHub, clients: list[SSEClient], redis_client: aioredis.Redis
) -> None:
    hub = await proxied_hub(start_hub, app.port)
    headers = cookie("user42", "; other=not-for-the-app")
    client = await open_stream(hub.port, "/channels/user.42", headers=headers)
    clients.append(client)
    # Asked once, with the channels and only the allowlisted cookie.
    assert app.calls == [{"channels": ["user.42"], "cookies": {"sid": "user42"}}]
    await redis_client.publish("user.42", "hello")
    assert [e.data for e in await client.next_events(1)] == ["hello"]
    # A pattern grants too: the cached answer (news.*) covers news.sport, no new call.
    mux = await open_stream(hub.port, "/events?channel=news.sport&channel=chat", headers=headers)
    clients.append(mux)
    assert len(app.calls) == 1
    # The application's user is the stream's: a disconnect by user reaches it.
    await redis_client.publish("ssehub:control", '{"disconnect": {"user": "42"}}')
    await client.read_to_eof()
    assert client.events[-1].event == "ssehub-disconnect"


async def test_a_denial_is_403_and_so_is_a_channel_not_granted(
    app: App, start_hub: StartHub, clients: list[SSEClient]
) -> None:
    hub = await proxied_hub(start_hub, app.port)
    for path, headers in (
        ("/channels/user.42", cookie("nobody")),
        ("/channels/user.42", {}),  # no cookie: asked with none, denied
        ("/channels/user.7", cookie("user42")),  # granted user.42, not user.7
    ):
        status, _, body = await http_request(hub.port, path, headers={**headers, **BUSY})
        assert status == 403 and b"not granted by the application" in body, (path, body)
    assert app.calls[1]["cookies"] == {}
    # The public channel never asks.
    calls = len(app.calls)
    clients.append(await open_stream(hub.port, "/channels/chat"))
    assert len(app.calls) == calls


@pytest.mark.parametrize("session", ["slow", "broken", "garbled", "down"])
async def test_the_application_down_or_slow_is_busy_never_open(
    app: App, start_hub: StartHub, session: str
) -> None:
    port = free_port() if session == "down" else app.port
    hub = await proxied_hub(start_hub, port, timeout=0.3)
    client = await SSEClient.connect(hub.port, "/channels/user.42", {**cookie(session), **BUSY})
    try:
        assert client.status == 200
        await client.read_to_eof()
        assert client.ended_cleanly
        (busy,) = client.events
        assert busy.event == "ssehub-busy"
        assert json.loads(busy.data)["reason"] == "auth_unavailable"
    finally:
        await client.close()
    # Not an EventSource: a 503 it may retry.
    status, head, _ = await http_request(hub.port, "/channels/user.42", headers=cookie(session))
    assert status == 503 and int(head["retry-after"]) >= 1
    metrics = (await http_request(hub.admin_port, "/metrics"))[2].decode()
    assert 'ssehub_auth_proxy_total{outcome="unavailable"} 2.0' in metrics


async def test_answers_are_cached_by_cookies_and_never_past_expire_at(
    app: App, start_hub: StartHub, clients: list[SSEClient]
) -> None:
    hub = await proxied_hub(start_hub, app.port, cache_seconds=60)
    for _ in range(3):
        clients.append(await open_stream(hub.port, "/channels/user.42", headers=cookie("user42")))
    assert len(app.calls) == 1
    clients.append(await open_stream(hub.port, "/channels/user.7", headers=cookie("user7")))
    assert len(app.calls) == 2
    for _ in range(2):  # a denial is cached too
        await http_request(hub.port, "/channels/user.1", headers=cookie("nobody"))
    assert len(app.calls) == 3
    # An answer with expire_at: cached until then only, and the stream ends then.
    app.expire_at = time.time() + 2
    stream = await open_stream(hub.port, "/channels/user.9", headers=cookie("user9"))
    clients.append(stream)
    await stream.read_to_eof(timeout=6)
    assert stream.ended_cleanly
    assert "ssehub-auth-expired" in [e.event for e in stream.events]
    calls = len(app.calls)
    app.expire_at = 0
    clients.append(await open_stream(hub.port, "/channels/user.9", headers=cookie("user9")))
    assert len(app.calls) == calls + 1


async def test_a_connect_storm_makes_one_call_per_session_in_flight(
    app: App, start_hub: StartHub, clients: list[SSEClient]
) -> None:
    hub = await proxied_hub(start_hub, app.port)
    app.delay = 0.2  # the storm arrives while the first answers are on their way
    sessions = [f"user{n}" for n in range(5)]
    opened = await asyncio.gather(
        *(
            open_stream(hub.port, f"/channels/user.{s[4:]}", headers=cookie(s))
            for s in sessions * 40
        )
    )
    clients.extend(opened)
    assert len(app.calls) == len(sessions)
    assert app.most_in_flight == 1
    m = (await http_request(hub.admin_port, "/metrics"))[2].decode()
    assert 'ssehub_auth_proxy_total{outcome="called"} 5.0' in m
    assert 'ssehub_auth_proxy_total{outcome="granted"} 200.0' in m


@pytest.mark.slow
async def test_with_workers_the_node_asks_once_per_session_and_every_worker_decides(
    app: App, tmp_path: Path, redis_server: RedisServer, clients: list[SSEClient]
) -> None:
    """Main asks the application for its workers: one call per session in flight on the
    node and one cache, not one per worker; each worker decides on main's answer."""
    app.delay = 0.3  # the storm arrives while the first answer is on its way
    url = f"http://127.0.0.1:{app.port}/auth"
    extra = f"auth: {{proxy: {{url: '{url}', cookies: [sid], timeout: 5}}}}\n"
    channels = "{chat: {}, 'user.*': {auth: proxy}, 'news.*': {auth: proxy}}"
    node = Node(write_config(tmp_path / "hub.yaml", redis_server.url, channels, extra))
    try:
        storm = await asyncio.gather(
            *(
                open_stream(node.port, "/channels/user.42", headers=cookie("user42"))
                for _ in range(SPREAD)
            )
        )
        clients.extend(storm)
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        assert sum(per) == SPREAD and all(per)  # both workers asked
        assert len(app.calls) == 1
        # The node's cache answers later streams on any worker; a denial is 403 on each.
        clients.extend(
            [
                await open_stream(node.port, "/channels/news.x", headers=cookie("user42"))
                for _ in range(6)
            ]
        )
        for _ in range(6):
            status, _, _ = await http_request(node.port, "/channels/user.7", headers=cookie("x"))
            assert status == 403
        assert len(app.calls) == 2
        # The application failing is main's answer too: the busy stream, as in one process.
        busy = await SSEClient.connect(node.port, "/channels/user.9", {**cookie("broken"), **BUSY})
        clients.append(busy)
        await busy.read_to_eof()
        assert json.loads(busy.events[0].data)["reason"] == "auth_unavailable"
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_auth_proxy_total", outcome="called") == 3
        assert one(m, "ssehub_auth_proxy_total", outcome="unavailable") == 1
        assert one(m, "ssehub_auth_proxy_total", outcome="granted") == SPREAD + 6
        assert one(m, "ssehub_auth_proxy_total", outcome="denied") == 6
    finally:
        node.stop()


async def test_the_example_application_runs_as_the_docs_show(
    start_hub: StartHub, redis_client: aioredis.Redis, clients: list[SSEClient]
) -> None:
    spec = importlib.util.spec_from_file_location("proxy_auth_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    runner = web.AppRunner(module.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        auth = {"proxy": {"url": f"http://127.0.0.1:{port}/sse-auth", "cookies": ["sessionid"]}}
        hub = await start_hub({"user.*": {"auth": "proxy"}}, auth=auth)
        client = await open_stream(
            hub.port, "/channels/user.42", headers={"Cookie": "sessionid=s3cr3t"}
        )
        clients.append(client)
        await redis_client.publish("user.42", "for 42")
        assert [e.data for e in await client.next_events(1)] == ["for 42"]
        status, _, _ = await http_request(hub.port, "/channels/user.42", headers=BUSY)
        assert status == 403
    finally:
        await runner.cleanup()
