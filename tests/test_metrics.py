"""Metrics on the admin listener: values after a known sequence, and never on the public port."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from .conftest import StartHub
from .sseclient import SSEClient, http_request, open_stream, wait_until

ADMIN = {"host": "127.0.0.1", "port": 0}


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on ``/metrics`` as (name, sorted labels) -> value."""
    status, headers, body = await http_request(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metric_values_after_known_sequence(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    hub = await start_hub(
        {"chat": {}, "news": {"redis_channel": "site:news"}, "idle": {}}, admin=ADMIN
    )
    assert hub.admin_port not in (0, hub.port)
    chat = [await open_stream(hub.port, "/channels/chat") for _ in range(2)]
    news = await open_stream(hub.port, "/channels/news")
    try:
        # One transaction: Redis writes the four messages to the hub at once, so the
        # hub reads them together and delivers chat's three in one flush.
        async with redis_client.pipeline(transaction=True) as tx:
            for i in range(3):
                tx.publish("chat", f"m{i}")
            tx.publish("chat", b"\xff not utf-8")
            await tx.execute()
        for c in chat:
            await c.next_events(3)
        await redis_client.publish("site:news", "headline")  # once chat's flush is done
        await news.next_events(1)

        m = await scrape(hub.admin_port)
        assert one(m, "ssehub_connections") == 3
        assert one(m, "ssehub_channel_connections", channel="chat") == 2
        assert one(m, "ssehub_channel_connections", channel="news") == 1
        assert one(m, "ssehub_channel_connections", channel="idle") == 0
        assert one(m, "ssehub_connections_opened_total", channel="chat") == 2
        assert one(m, "ssehub_connections_opened_total", channel="idle") == 0
        assert one(m, "ssehub_messages_received_total", channel="chat") == 4
        assert one(m, "ssehub_messages_received_total", channel="news") == 1
        assert one(m, "ssehub_messages_rejected_total", channel="chat", reason="invalid_utf8") == 1
        assert one(m, "ssehub_events_delivered_total") == 3 * 2 + 1
        assert one(m, "ssehub_redis_up") == 1
        assert one(m, "ssehub_redis_state", state="up") == 1
        assert one(m, "ssehub_redis_state", state="down") == 0
        assert one(m, "ssehub_redis_reconnects_total") == 0
        assert one(m, "ssehub_replays_total", channel="chat") == 0
        assert one(m, "ssehub_gaps_total", channel="chat") == 0
        # Every close reason is reported, at zero before it first happens.
        for reason in ("client_gone", "slow", "shutdown", "limit", "channel_removed"):
            assert one(m, "ssehub_connections_closed_total", reason=reason) == 0
        # One observation per flush, whatever the messages in it: chat's, then news'.
        count = one(m, "ssehub_delivery_delay_seconds_count")
        assert count == 2
        assert one(m, "ssehub_delivery_delay_seconds_bucket", le="+Inf") == count

        await chat[0].close()
        await wait_until(lambda: hub.hub.connections == 2)
        m = await scrape(hub.admin_port)
        assert one(m, "ssehub_connections") == 2
        assert one(m, "ssehub_connections_closed_total", reason="client_gone") == 1
    finally:
        for c in [*chat, news]:
            await c.close()


async def test_metrics_count_redis_outage_and_reconnect(start_hub: StartHub) -> None:
    from .redis_server import RedisServer

    redis = RedisServer()
    redis.start()
    try:
        hub = await start_hub(redis_url=redis.url, admin=ADMIN)
        redis.kill()
        await wait_until(lambda: not hub.broker.ready)
        m = await scrape(hub.admin_port)
        assert one(m, "ssehub_redis_up") == 0
        assert one(m, "ssehub_redis_state", state="down") == 1
        status, _, _ = await http_request(hub.admin_port, "/readyz")
        assert status == 503
        redis.start()
        await wait_until(lambda: hub.broker.ready, timeout=10)
        m = await scrape(hub.admin_port)
        assert one(m, "ssehub_redis_up") == 1
        assert one(m, "ssehub_redis_reconnects_total") == 1
    finally:
        redis.stop()


async def test_admin_serves_health_and_public_port_has_no_metrics(start_hub: StartHub) -> None:
    hub = await start_hub(admin=ADMIN)
    assert (await http_request(hub.admin_port, "/healthz"))[0] == 200
    assert (await http_request(hub.admin_port, "/readyz"))[0] == 200
    assert (await http_request(hub.port, "/metrics"))[0] == 404
    # Streams are not served on the admin port.
    assert (await http_request(hub.admin_port, "/channels/chat"))[0] == 404


async def test_no_admin_listener_unless_configured(start_hub: StartHub) -> None:
    hub = await start_hub()
    assert hub.admin_port == 0
    assert hub.metrics is None
    assert hub.hub.observe_delay is None
    assert (await http_request(hub.port, "/metrics"))[0] == 404


async def test_two_hubs_in_one_process_keep_separate_registries(
    start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    a = await start_hub(admin=ADMIN)
    b = await start_hub(admin=ADMIN)
    client = await SSEClient.connect(a.port, "/channels/chat")
    try:
        await client.read_until(lambda c: c.parser.retry is not None)
        assert one(await scrape(a.admin_port), "ssehub_connections") == 1
        assert one(await scrape(b.admin_port), "ssehub_connections") == 0
    finally:
        await client.close()


async def test_openmetrics_when_the_scraper_asks_for_it(start_hub: StartHub) -> None:
    hub = await start_hub(admin=ADMIN)
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    status, headers, body = await http_request(hub.admin_port, "/metrics", headers=accept)
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_admin_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "hub.yaml"
        config.write_text(f"channels: {{chat: {{}}}}\nadmin: {{port: {port}}}\n")
        result = subprocess.run(
            [sys.executable, "-m", "ssehub", "--config", str(config), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 3
    assert "cannot start" in result.stderr
