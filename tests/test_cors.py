"""CORS: allowed, denied, preflight."""

from __future__ import annotations

from pathlib import Path

from ssehub.config import load
from ssehub.server import HubServer

from .conftest import StartHub
from .redis_server import RedisServer
from .sseclient import SSEClient, http_request, wait_until

SITE = "https://app.example"


async def stream_headers(port: int, origin: str | None) -> dict[str, str]:
    client = await SSEClient.connect(port, "/channels/chat", {"Origin": origin} if origin else None)
    try:
        assert client.status == 200
        return client.headers
    finally:
        await client.close()


async def test_same_origin_only_by_default(start_hub: StartHub) -> None:
    """Without origins the answer is the same whatever Origin says: no CORS header,
    and no Vary either (no per-request CORS work at all)."""
    hub = await start_hub()
    for method, path in (("HEAD", "/channels/chat"), ("GET", "/channels/nope")):
        status, headers, _ = await http_request(hub.port, path, method, {"Origin": SITE})
        assert status in (200, 404)
        assert not [h for h in headers if h.startswith("access-control-") or h == "vary"]
    headers = await stream_headers(hub.port, SITE)
    assert "access-control-allow-origin" not in headers
    assert "vary" not in headers


async def test_origins_added_or_removed_by_a_reload_take_effect_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "hub.yaml"
    base = (
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_server.url}'}}\n"
        "shutdown_timeout: 2\nchannels: {chat: {}}\n"
    )
    path.write_text(base)
    server = HubServer(load(path))
    await server.start()
    try:
        await wait_until(lambda: server.broker.ready)
        assert "vary" not in await stream_headers(server.port, SITE)
        path.write_text(base + f"cors: {{allow_origins: ['{SITE}'], allow_credentials: true}}\n")
        assert server.reload()
        headers = await stream_headers(server.port, SITE)
        assert headers["vary"] == "Origin"
        assert headers["access-control-allow-origin"] == SITE
        assert headers["access-control-allow-credentials"] == "true"
        other = await stream_headers(server.port, "https://evil.example")
        assert other["vary"] == "Origin"
        assert "access-control-allow-origin" not in other
        path.write_text(base)
        assert server.reload()
        headers = await stream_headers(server.port, SITE)
        assert not [h for h in headers if h.startswith("access-control-") or h == "vary"]
    finally:
        await server.stop()


async def test_listed_origin_is_allowed_others_are_not(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": [SITE]})
    headers = await stream_headers(hub.port, SITE)
    assert headers["access-control-allow-origin"] == SITE
    assert "access-control-allow-credentials" not in headers
    assert headers["vary"] == "Origin"
    denied = await stream_headers(hub.port, "https://evil.example")
    assert "access-control-allow-origin" not in denied


async def test_credentials_echo_the_origin(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": [SITE], "allow_credentials": True})
    headers = await stream_headers(hub.port, SITE)
    assert headers["access-control-allow-origin"] == SITE
    assert headers["access-control-allow-credentials"] == "true"


async def test_star_allows_any_origin(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": ["*"]})
    headers = await stream_headers(hub.port, "https://anyone.example")
    assert headers["access-control-allow-origin"] == "*"


async def test_404_carries_cors_headers_too(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": [SITE]})
    status, headers, _ = await http_request(hub.port, "/channels/nope", headers={"Origin": SITE})
    assert status == 404
    assert headers["access-control-allow-origin"] == SITE


async def test_preflight_allowed(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": [SITE], "max_age": 120})
    status, headers, _ = await http_request(
        hub.port,
        "/events?channel=chat",
        method="OPTIONS",
        headers={
            "Origin": SITE,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id, cache-control",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == SITE
    assert headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    assert headers["access-control-allow-headers"] == "last-event-id, cache-control"
    assert headers["access-control-max-age"] == "120"


async def test_preflight_denied_for_other_origins_and_methods(start_hub: StartHub) -> None:
    hub = await start_hub(cors={"allow_origins": [SITE]})
    for origin, method in [("https://evil.example", "GET"), (SITE, "POST")]:
        status, headers, _ = await http_request(
            hub.port,
            "/channels/chat",
            method="OPTIONS",
            headers={"Origin": origin, "Access-Control-Request-Method": method},
        )
        assert status == 403
        if origin != SITE:
            assert "access-control-allow-origin" not in headers


async def test_plain_options_lists_methods(start_hub: StartHub) -> None:
    hub = await start_hub()
    status, headers, _ = await http_request(hub.port, "/channels/chat", method="OPTIONS")
    assert status == 204
    assert headers["allow"] == "GET, HEAD, OPTIONS"
