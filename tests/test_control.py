"""Disconnects over the control channel and POST /disconnect, on two nodes and on a node
of workers; refused reconnects (in memory, fed by the channel, loaded at start)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from ssehub.core import control
from ssehub.core.control import BadControl, Disconnect, Refusals, Refuse
from ssehub.server import HubServer

from .conftest import StartHub
from .redis_server import RedisServer
from .sseclient import SSEClient, http_request, open_stream, wait_until
from .test_auth import SECRET, token
from .test_metrics import one, scrape
from .test_workers import SPREAD, WORKERS, Node, spread, write_config

KEY = "k" * 24
ADMIN = {"host": "127.0.0.1", "port": 0}
CHANNELS: dict[str, Any] = {"chat": {}, "user.*": {"auth": "token"}}
DISCONNECT = "ssehub-disconnect"


@pytest.fixture
def auth(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return {"secret_file": str(path)}


@pytest.fixture
def publish_key(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("SSEHUB_TEST_PUBLISH_KEY", KEY)
    return {"key_env": "SSEHUB_TEST_PUBLISH_KEY"}


@pytest.fixture
async def nodes(
    start_hub: StartHub,
    auth: dict[str, Any],
    publish_key: dict[str, Any],
    redis_client: aioredis.Redis,
) -> list[HubServer]:
    """Two nodes on one Redis, each listening to the control channel."""
    await redis_client.delete("ssehub:control:refusals")
    started = [
        await start_hub(CHANNELS, auth=auth, admin=ADMIN, publish=publish_key) for _ in range(2)
    ]
    return started


def user_token(user: str, ttl: float = 60) -> str:
    return token(sub=user, ssehub={"subscribe": [f"user.{user}"]}, ttl=ttl)


async def user_stream(port: int, user: str, tok: str | None = None) -> SSEClient:
    headers = {"Authorization": f"Bearer {tok or user_token(user)}"}
    return await open_stream(port, f"/channels/user.{user}", headers=headers)


async def ended_with(client: SSEClient, reason: str, reconnect: bool = True) -> None:
    """The stream got ssehub-disconnect with ``reason``, then ended cleanly."""
    await client.read_to_eof()
    assert client.ended_cleanly
    (event,) = [e for e in client.events if e.event == DISCONNECT]
    assert json.loads(event.data) == {"reason": reason, "reconnect": reconnect}
    assert client.events[-1] is event


async def still_open(client: SSEClient, redis: aioredis.Redis, channel: str) -> None:
    """``client`` still gets events (a marker published now)."""
    await redis.publish(channel, "still here")
    await client.read_until(lambda c: any(e.data == "still here" for e in c.events))


# --- the messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"nope", "not JSON"),
        (b"[]", "expected"),
        (b'{"disconnect": {}}', "exactly one of session_id, user or channel"),
        (b'{"disconnect": {"user": "1", "channel": "c"}}', "exactly one"),
        (b'{"disconnect": {"user": ""}}', "disconnect.user"),
        (b'{"disconnect": {"user": 42}}', "disconnect.user"),
        (b'{"disconnect": {"user": "a", "colour": 1}}', "disconnect.colour: unknown field"),
        (b'{"disconnect": {"user": "a", "reconnect": "no"}}', "disconnect.reconnect"),
        (b'{"disconnect": {"channel": "c", "reconnect": false}}', "not a channel"),
        (b'{"disconnect": {"user": "a", "reconnect": false, "refuse_seconds": 0}}', "refuse_sec"),
        (b'{"disconnect": {"user": "a", "reason": "a\\nb"}}', "disconnect.reason: control"),
        (b'{"ban": {"user": "a"}}', "ban: unknown message"),
    ],
)
def test_a_bad_control_message_names_what_is_wrong(payload: bytes, error: str) -> None:
    with pytest.raises(BadControl, match=error):
        control.parse(payload)


def test_control_messages_round_trip() -> None:
    for command in (
        Disconnect("user", "42", "banned", False, 60.0, 123.0),
        Disconnect("session_id", "Xk.1", ""),
        Disconnect("channel", "room.*", "closed"),
        Refuse(control.user_key("42"), 99.5),
        Refuse(control.credential_key("a-token"), 99.5),
    ):
        assert control.parse(control.encode(command)) == command


def test_refusals_expire_and_the_later_one_wins() -> None:
    refusals = Refusals()
    now = time.time()
    refusals.add("user:1", now + 60)
    refusals.add("user:1", now + 30)  # an earlier end does not shorten it
    refusals.add("user:2", now - 1)
    assert refusals.until("user:1", "user:3") == now + 60
    assert refusals.until("user:2") == 0.0
    assert [k for k, _ in refusals.items()] == ["user:1"]


# --- disconnects across nodes ----------------------------------------------------------


async def test_a_session_is_disconnected_on_whichever_node_holds_it(
    nodes: list[HubServer],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, b = nodes
    target = await open_stream(b.port, "/channels/chat")
    other = await open_stream(a.port, "/channels/chat")
    clients += [target, other]
    message = {"disconnect": {"session_id": target.session, "reason": "moved"}}
    assert await redis_client.publish("ssehub:control", json.dumps(message)) == 2
    await ended_with(target, "moved")
    await still_open(other, redis_client, "chat")
    assert b.control.stats.disconnected["session_id"] == 1


async def test_a_user_is_disconnected_on_every_node(
    nodes: list[HubServer],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, b = nodes
    mine = [await user_stream(a.port, "42"), await user_stream(b.port, "42")]
    theirs = await user_stream(b.port, "7")
    clients += [*mine, theirs]
    await redis_client.publish("ssehub:control", '{"disconnect": {"user": "42"}}')
    for client in mine:
        await ended_with(client, "disconnected")
    await still_open(theirs, redis_client, "user.7")
    # reconnect: true (the default): the user comes straight back.
    clients.append(await user_stream(a.port, "42"))


async def test_a_channel_is_disconnected_everywhere_with_its_family_members(
    nodes: list[HubServer],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, b = nodes
    chat = [await open_stream(n.port, "/channels/chat") for n in nodes]
    mux = await open_stream(
        a.port,
        "/events?channel=chat&channel=user.42",
        headers={"Authorization": f"Bearer {user_token('42')}"},
    )
    member = await user_stream(b.port, "9")
    clients += [*chat, mux, member]
    await redis_client.publish("ssehub:control", '{"disconnect": {"channel": "chat"}}')
    for client in [*chat, mux]:
        await ended_with(client, "disconnected")
    await still_open(member, redis_client, "user.9")
    await redis_client.publish("ssehub:control", '{"disconnect": {"channel": "user.*"}}')
    await ended_with(member, "disconnected")


async def test_post_disconnect_on_one_node_ends_streams_on_the_other(
    nodes: list[HubServer], clients: list[SSEClient]
) -> None:
    a, b = nodes
    target = await user_stream(b.port, "42")
    clients.append(target)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{a.admin_port}/disconnect"
        body = {"disconnect": {"user": "42", "reason": "logged out"}}
        async with http.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert (r.status, await r.json()) == (200, {"nodes": 2})
        async with http.post(url, json=body) as r:
            assert r.status == 401
        bad = {"disconnect": {"user": "42", "channel": "chat"}}
        async with http.post(url, json=bad, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 400 and "exactly one" in await r.text()
        metrics = await (await http.get(f"http://127.0.0.1:{a.admin_port}/metrics")).text()
    await ended_with(target, "logged out")
    assert 'ssehub_disconnect_requests_total{result="ok"} 1.0' in metrics
    assert 'ssehub_disconnect_requests_total{result="bad_request"} 1.0' in metrics


# --- refused reconnects ---------------------------------------------------------------------


async def test_reconnect_false_refuses_the_user_on_every_node_and_nodes_started_later(
    nodes: list[HubServer],
    start_hub: StartHub,
    auth: dict[str, Any],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, _ = nodes
    target = await user_stream(a.port, "42")
    clients.append(target)
    message = {"disconnect": {"user": "42", "reconnect": False, "refuse_seconds": 2}}
    await redis_client.publish("ssehub:control", json.dumps(message))
    await ended_with(target, "disconnected", reconnect=False)
    # Each node hears the message on its own connection, and stores the refusal in Redis
    # in a task of its own: the stream's end on one node says neither happened elsewhere.
    await wait_until(lambda: all(n.control.refused_until("42", "") for n in nodes))
    headers = {"Authorization": f"Bearer {user_token('42')}", "Accept": "text/event-stream"}
    for node in nodes:
        status, head, body = await http_request(node.port, "/channels/user.42", headers=headers)
        assert status == 403 and b"refused" in body and 1 <= int(head["retry-after"]) <= 2
    # Kept in Redis: a node that starts now refuses the user too.
    await wait_until(lambda: redis_client.zscore("ssehub:control:refusals", "user:42"))
    late = await start_hub(CHANNELS, auth=auth)
    await wait_until(lambda: late.control.refused_until("42", ""))
    assert (await http_request(late.port, "/channels/user.42", headers=headers))[0] == 403
    clients.append(await user_stream(a.port, "7"))  # others are not refused
    await wait_until(lambda: not a.control.refused_until("42", ""), timeout=5)
    clients.append(await user_stream(a.port, "42"))  # and the refusal ends
    assert a.control.stats.refused >= 1


async def test_reconnect_false_on_a_session_refuses_its_token_everywhere(
    nodes: list[HubServer],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, b = nodes
    stolen = user_token("42")
    target = await user_stream(b.port, "42", stolen)
    clients.append(target)
    message = {"disconnect": {"session_id": target.session, "reconnect": False}}
    await redis_client.publish("ssehub:control", json.dumps(message))
    await ended_with(target, "disconnected", reconnect=False)
    # The node holding the session told the other one (and Redis) about its token.
    headers = {"Authorization": f"Bearer {stolen}"}
    await wait_until(lambda: a.control.refusals.until(control.credential_key(stolen)))
    for node in nodes:
        assert (await http_request(node.port, "/channels/user.42", headers=headers))[0] == 403
    stored = await redis_client.zrange("ssehub:control:refusals", 0, -1)
    assert stored == [control.credential_key(stolen).encode()]
    # The same user with another token (another device) is not refused.
    clients.append(await user_stream(a.port, "42", user_token("42", ttl=120)))


async def test_a_bad_control_message_breaks_nothing(
    nodes: list[HubServer],
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
) -> None:
    a, _ = nodes
    client = await open_stream(a.port, "/channels/chat")
    clients.append(client)
    await redis_client.publish("ssehub:control", '{"disconnect": {"everyone": true}}')
    await wait_until(lambda: a.plane is not None and a.plane.rejected == 1)
    await still_open(client, redis_client, "chat")
    m = await scrape(a.admin_port)
    assert one(m, "ssehub_control_messages_total", result="rejected") == 1


# --- a node of workers --------------------------------------------------------------------


@pytest.mark.slow
async def test_a_disconnect_reaches_streams_on_every_worker(
    tmp_path: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    clients: list[SSEClient],
    auth: dict[str, Any],
) -> None:
    extra = f"auth: {{secret_file: {auth['secret_file']}}}\n"
    config = write_config(
        tmp_path / "hub.yaml", redis_server.url, "{chat: {}, 'user.*': {auth: token}}", extra
    )
    node = Node(config)
    try:
        headers = {"Authorization": f"Bearer {user_token('42')}"}
        streams = await spread(node, clients, "/channels/user.42", headers=headers)
        message = {"disconnect": {"user": "42", "reason": "bye", "reconnect": False}}
        await redis_client.publish("ssehub:control", json.dumps(message))
        for client in streams:
            await ended_with(client, "bye", reconnect=False)
        # Every worker refuses the user now (SO_REUSEPORT spreads these attempts).
        for _ in range(6):
            status, _, _ = await http_request(node.port, "/channels/user.42", headers=headers)
            assert status == 403
        m = await scrape(node.admin_port)
        assert one(m, "ssehub_disconnected_total", target="user") == len(streams)
    finally:
        node.stop()
        await redis_client.delete("ssehub:control:refusals")


@pytest.mark.slow
async def test_max_per_user_counts_the_users_streams_on_the_whole_node(
    tmp_path: Path, redis_server: RedisServer, clients: list[SSEClient], auth: dict[str, Any]
) -> None:
    """With workers, main counts a user's streams for the node: two, not two per worker."""
    extra = f"auth: {{secret_file: {auth['secret_file']}}}\nlimits: {{max_per_user: 2}}\n"
    config = write_config(
        tmp_path / "hub.yaml", redis_server.url, "{chat: {}, 'user.*': {auth: token}}", extra
    )
    node = Node(config)
    headers = {"Authorization": f"Bearer {user_token('42')}", "Accept": "text/event-stream"}

    async def attempt() -> SSEClient:
        """One stream of user 42: its position line, or the busy event and the end."""
        c = await SSEClient.connect(node.port, "/channels/user.42", headers)
        clients.append(c)
        await c.read_until(lambda c: c.parser.last_id or c.events)
        return c

    try:
        # SO_REUSEPORT spreads them over both workers: counted per process, up to four
        # would get in.
        tried = [await attempt() for _ in range(SPREAD)]
        accepted = [c for c in tried if c.parser.last_id]
        assert len(accepted) == 2
        for c in tried:
            if c not in accepted:
                await c.read_to_eof()
                (event,) = c.events
                assert json.loads(event.data)["reason"] == "max_per_user"
        m = await scrape(node.admin_port)
        per = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        assert sum(per) == 2
        assert one(m, "ssehub_connections_closed_total", reason="limit") == SPREAD - 2
        # A client that is no EventSource gets 503 on either worker, as in one process.
        plain = {"Authorization": headers["Authorization"]}
        for _ in range(6):
            status, head, _ = await http_request(node.port, "/channels/user.42", headers=plain)
            assert status == 503 and "retry-after" in head
        # Another user is not counted; one of 42's streams ends: room for one more.
        other = await user_stream(node.port, "7")
        clients.append(other)
        await accepted[0].close()

        async def one_more() -> bool:
            return bool((await attempt()).parser.last_id)

        await wait_until(one_more, timeout=5)
        assert not (await attempt()).parser.last_id  # and only one
        # A worker holding some of 42's streams dies: their counts go with it.
        await other.close()

        async def per_worker() -> list[int]:
            m = await scrape(node.admin_port)
            return [int(one(m, "ssehub_worker_connections", worker=str(i))) for i in range(WORKERS)]

        async def only_42s() -> bool:
            return sum(await per_worker()) == 2

        await wait_until(only_42s, timeout=5)
        per = await per_worker()
        victim = next(i for i, n in enumerate(per) if n)
        mark = len(node.lines)
        os.kill(node.worker_pids()[victim], signal.SIGKILL)
        node.wait_for(rf"worker ready worker={victim}", mark)
        alive = 2 - per[victim]
        for _ in range(2 - alive):
            await wait_until(one_more, timeout=5)
        assert not (await attempt()).parser.last_id
    finally:
        node.stop()


# --- limits per user and per stream lifetime ------------------------------------------------


async def test_max_per_user_turns_the_users_next_stream_away_as_busy(
    start_hub: StartHub, auth: dict[str, Any], clients: list[SSEClient]
) -> None:
    hub = await start_hub(CHANNELS, auth=auth, limits={"max_per_user": 2})
    tok = user_token("42")
    clients += [await user_stream(hub.port, "42", tok) for _ in range(2)]
    headers = {"Authorization": f"Bearer {tok}", "Accept": "text/event-stream"}
    busy = await SSEClient.connect(hub.port, "/channels/user.42", headers)
    clients.append(busy)
    assert busy.status == 200
    await busy.read_to_eof()
    (event,) = busy.events
    assert event.event == "ssehub-busy" and json.loads(event.data)["reason"] == "max_per_user"
    del headers["Accept"]
    status, head, _ = await http_request(hub.port, "/channels/user.42", headers=headers)
    assert status == 503 and "retry-after" in head
    clients.append(await user_stream(hub.port, "7"))  # another user is not counted
    await clients[0].close()  # one of 42's streams ends: room for another
    await wait_until(lambda: not hub.control.over_user_limit("42"))
    clients.append(await user_stream(hub.port, "42", tok))


async def test_max_stream_seconds_ends_streams_cleanly_and_they_resume(
    start_hub: StartHub, redis_client: aioredis.Redis, clients: list[SSEClient]
) -> None:
    hub = await start_hub({"chat": {}}, limits={"max_stream_seconds": 1}, admin=ADMIN)
    # From before the stream opened: the hub's lifetime counts from then, however late
    # this test gets to see the first event.
    started = time.monotonic()
    client = await open_stream(hub.port, "/channels/chat")
    clients.append(client)
    await redis_client.publish("chat", "before")
    (event,) = await client.next_events(1)
    await client.read_to_eof(timeout=5)
    lived = time.monotonic() - started
    assert client.ended_cleanly and 0.5 <= lived <= 3.0, lived  # 75-100% of 1 s, a 1 s tick
    again = await open_stream(hub.port, "/channels/chat", last_id=event.id)
    clients.append(again)
    await redis_client.publish("chat", "after")
    assert [e.data for e in await again.next_events(1)] == ["after"]
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_connections_closed_total", reason="lifetime") == 1
