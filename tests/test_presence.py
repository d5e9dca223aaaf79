"""Subscribe/unsubscribe events in Redis, the meta they carry, and presence across nodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.redis.events import count_key, key

from .conftest import StartHub
from .hubprocess import Node, write_config
from .logcheck import rendered
from .redis_server import RedisServer
from .sseclient import SSEClient, http_request, open_stream, wait_until
from .test_auth import SECRET, token
from .test_metrics import ADMIN, one, scrape
from .test_slow_clients import open_stuck
from .test_workers import SPREAD

EVENTS = {"enabled": True}
ROOMS = {"chat": {}, "room.*": {"presence": True}, "lobby": {"presence": True}}

Messages = list[dict[str, Any]]


def strict(text: str | bytes) -> Any:
    """JSON as a browser's ``JSON.parse`` reads it: no NaN, Infinity or -Infinity."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
async def heard(redis_client: aioredis.Redis) -> AsyncIterator[Callable[..., Any]]:
    """``await heard(*channels)``: a list that fills with the JSON published on them."""
    tasks: list[asyncio.Task[None]] = []
    pubsubs: list[Any] = []

    async def listen(*channels: str) -> Messages:
        pubsub = redis_client.pubsub()
        await pubsub.subscribe(*channels)
        got: Messages = []

        async def run() -> None:
            async for m in pubsub.listen():
                if m["type"] == "message":
                    got.append({"_on": m["channel"].decode(), **strict(m["data"])})

        tasks.append(asyncio.create_task(run()))
        pubsubs.append(pubsub)
        return got

    yield listen
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for pubsub in pubsubs:
        await pubsub.aclose()


def of(messages: Messages, kind: str, session: str) -> Messages:
    return [m for m in messages if m.get("type") == kind and m["session_id"] == session]


# --- events -----------------------------------------------------------------------


async def test_subscribe_and_unsubscribe_events_for_a_client_that_closes(
    start_hub: StartHub, heard: Callable[..., Any]
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub(ROOMS, events=EVENTS)
    c = await open_stream(hub.port, "/events?channel=chat&channel=room.7&meta=%7B%22n%22%3A1%7D")
    await wait_until(lambda: len(of(got, "subscribe", c.session)) == 2)
    node = hub.reporter.node if hub.reporter else ""
    assert sorted(of(got, "subscribe", c.session), key=lambda m: m["channel"]) == [
        {"_on": "ssehub:events", "type": "subscribe", "channel": name, "session_id": c.session,
         "meta": {"n": 1}, "node": node}
        for name in ("chat", "room.7")
    ]  # fmt: skip
    await c.close()
    await wait_until(lambda: len(of(got, "unsubscribe", c.session)) == 2)
    assert {m["reason"] for m in of(got, "unsubscribe", c.session)} == {"client_gone"}
    assert {m["channel"] for m in of(got, "unsubscribe", c.session)} == {"chat", "room.7"}


async def test_no_events_unless_enabled(
    start_hub: StartHub, heard: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    got = await heard("ssehub:events", "juggernaut:subscribe")
    hub = await start_hub({"chat": {}})
    c = await open_stream(hub.port, "/channels/chat")
    await c.close()
    await wait_until(lambda: hub.hub.connections == 0)
    # A marker published after the hub's last chance to write: nothing came before it.
    await redis_client.publish("ssehub:events", json.dumps({"type": "marker"}))
    await wait_until(lambda: got)
    assert got == [{"_on": "ssehub:events", "type": "marker"}]


async def test_a_client_vanishing_without_fin_gets_one_unsubscribe(
    start_hub: StartHub, heard: Callable[..., Any]
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub({"chat": {}}, events=EVENTS, heartbeat=0.05)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", hub.port))
    await loop.sock_sendall(sock, b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: len([m for m in got if m["type"] == "subscribe"]) == 1)
    (joined,) = got
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # an RST, no FIN: the hub finds out writing the heartbeat
    await wait_until(lambda: of(got, "unsubscribe", joined["session_id"]))
    await wait_until(lambda: hub.hub.connections == 0)
    # Nothing more about it comes: a marker stream's events go through the same writer,
    # which publishes in order, so anything queued about the vanished client before
    # them is heard before them. The marker lives for two heartbeats, so that what
    # the next beats might still do about the vanished client is queued before too.
    marker = await open_stream(hub.port, "/channels/chat")
    await marker.read_until(lambda c: len(c.parser.comments) >= 2)
    await marker.close()
    await wait_until(lambda: of(got, "unsubscribe", marker.session))
    assert len(of(got, "subscribe", joined["session_id"])) == 1
    assert len(of(got, "unsubscribe", joined["session_id"])) == 1


async def test_a_slow_client_cut_gets_unsubscribe_reason_slow(
    start_hub: StartHub, heard: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub({"chat": {}}, events=EVENTS, limits={"max_buffer_bytes": 65536})
    stuck = await open_stuck(hub.port)
    try:
        await wait_until(lambda: len(got) == 1)
        while not hub.hub.stats.slow_cut:
            await redis_client.publish("chat", "x" * 60_000)
            await asyncio.sleep(0)  # lets the hub read
        await wait_until(lambda: len(got) == 2)
        assert got[1]["type"] == "unsubscribe" and got[1]["reason"] == "slow"
        assert got[1]["session_id"] == got[0]["session_id"]
    finally:
        stuck.close()


async def test_shutdown_unsubscribes_every_stream(
    start_hub: StartHub, heard: Callable[..., Any], redis_client: aioredis.Redis
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub({"chat": {}, "lobby": {"presence": True}}, events=EVENTS)
    clients = [await open_stream(hub.port, f"/channels/{n}") for n in ("chat", "lobby", "lobby")]
    await wait_until(lambda: len(got) == 3)
    await hub.stop()
    # Written before stop() returned: the node's last batch. Redis passes messages on in
    # the order it ran them, so a marker published now is heard after all of that batch
    # (the listener reads on its own connection, and may not have it all yet).
    await redis_client.publish("ssehub:events", json.dumps({"type": "marker"}))
    await wait_until(lambda: got[-1]["type"] == "marker")
    gone = [m for m in got if m["type"] == "unsubscribe"]
    assert sorted(m["session_id"] for m in gone) == sorted(c.session for c in clients)
    assert {m["reason"] for m in gone} == {"shutdown"}
    for c in clients:
        await c.close()


async def test_juggernaut_event_channels_and_fields(
    start_hub: StartHub, heard: Callable[..., Any], tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    got = await heard("juggernaut:subscribe", "juggernaut:unsubscribe", "ssehub:events")
    hub = await start_hub(
        {"chat": {}, "user.42": {"auth": "token"}},
        events=EVENTS,
        juggernaut={"enabled": True},
        auth={"secret_file": str(secret_file)},
        meta={"claim": "name"},
    )
    c = await open_stream(hub.port, f"/channels/user.42?token={token(sub='u42', name='Ann')}")
    await wait_until(lambda: len(got) == 1)
    await c.close()
    await wait_until(lambda: len(got) == 2)
    meta = {"sub": "u42", "name": "Ann"}
    assert got == [
        {"_on": f"juggernaut:{kind}", "channel": "user.42", "meta": meta, "session_id": c.session}
        for kind in ("subscribe", "unsubscribe")
    ]


# --- meta ------------------------------------------------------------------------


async def test_meta_from_the_query_is_bounded_and_never_logged(
    start_hub: StartHub, heard: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub(
        {"chat": {}}, events=EVENTS, meta={"max_bytes": 32}, logging={"access_log": True}
    )
    caplog.set_level(logging.INFO)
    c = await open_stream(hub.port, "/channels/chat?meta=plain%20text%20secret")
    await wait_until(lambda: got)
    assert got[0]["meta"] == "plain text secret"
    status, _, body = await http_request(hub.port, "/channels/chat?meta=" + "Q" * 33)
    assert status == 400 and b"QQ" not in body and b"32 bytes" in body
    # JSON that spells a lone surrogate: no UTF-8 consumer could read it back.
    status, _, _ = await http_request(hub.port, "/channels/chat?meta=%22%5Cud800%22")
    assert status == 400
    await c.close()
    text = rendered(caplog)
    assert "secret" not in text and "QQQ" not in text and "meta=REDACTED" in text


@pytest.mark.parametrize(
    ("query", "meta"),
    [
        # Python's JSON extensions and a number no double holds: not JSON, so the text.
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("-Infinity", "-Infinity"),
        ("%5BNaN%5D", "[NaN]"),
        ("%7B%22x%22%3A1e999%7D", '{"x":1e999}'),
        ("[" * 1500 + "]" * 1500, "[" * 1500 + "]" * 1500),  # deeper than Python reads
        ("%7B%22x%22%3A1.5%7D", {"x": 1.5}),
    ],
)
async def test_meta_is_strict_json_or_the_text_so_every_answer_stays_json(
    start_hub: StartHub, heard: Callable[..., Any], query: str, meta: Any
) -> None:
    """``?meta=NaN`` was stored and published as bare NaN: the presence answer and every
    event of the channel failed JSON.parse for everyone (issue 20)."""
    got = await heard("ssehub:events")
    hub = await start_hub(ROOMS, events=EVENTS, admin=ADMIN, meta={"max_bytes": 4096})
    other = await open_stream(hub.port, "/channels/lobby?meta=%22ann%22")
    c = await open_stream(hub.port, f"/channels/lobby?meta={query}")
    try:
        await wait_until(lambda: len(got) == 2)
        assert got[1]["meta"] == meta

        async def both_listed() -> bool:
            return bool((await presence(hub.admin_port, "lobby"))["count"] == 2)

        # The writer stores presence after it published the events: heard first.
        await wait_until(both_listed)
        answer = await presence(hub.admin_port, "lobby")  # parsed strictly
        assert {m["session_id"]: m["meta"] for m in answer["members"]} == {
            other.session: "ann",
            c.session: meta,
        }
    finally:
        await c.close()
        await other.close()


async def test_a_token_claim_that_is_not_json_is_refused(
    start_hub: StartHub, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    hub = await start_hub(
        {"user.42": {"auth": "token", "presence": True}},
        events=EVENTS,
        auth={"secret_file": str(secret_file)},
        meta={"claim": "name"},
    )
    bad = token(sub="u42", name=float("nan"))  # PyJWT writes (and reads) a bare NaN
    status, _, body = await http_request(hub.port, f"/channels/user.42?token={bad}")
    assert status == 400 and b"not JSON" in body
    good = await open_stream(hub.port, f"/channels/user.42?token={token(sub='u42', name='x')}")
    await good.close()


# --- presence ----------------------------------------------------------------------


async def presence(port: int, channel: str, **query: Any) -> dict[str, Any]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    status, _, body = await http_request(port, f"/channels/{channel}/presence?{qs}")
    assert status == 200, body
    answer: dict[str, Any] = strict(body)
    return answer


async def test_presence_across_two_nodes(start_hub: StartHub, redis_client: aioredis.Redis) -> None:
    one = await start_hub(ROOMS, admin=ADMIN)
    two = await start_hub(ROOMS, admin=ADMIN, presence={"public": True})
    a = await open_stream(one.port, "/channels/room.7?meta=%22ann%22")
    b = await open_stream(two.port, "/events?channel=room.7&channel=chat&meta=%22bob%22")
    c = await open_stream(two.port, "/channels/room.8")
    try:
        want = {(a.session, "ann"), (b.session, "bob")}

        async def answers() -> list[dict[str, Any]]:
            return [
                await presence(one.admin_port, "room.7"),
                await presence(two.admin_port, "room.7"),
                await presence(two.port, "room.7"),  # public there
            ]

        async def settled() -> bool:
            # (room.8's stream opened last: its entry may come in a later write)
            room_8 = await presence(one.admin_port, "room.8")
            return all(x["count"] == 2 for x in await answers()) and room_8["count"] >= 1

        await wait_until(settled)
        for answer in await answers():
            assert {(m["session_id"], m["meta"]) for m in answer["members"]} == want
            assert answer["cursor"] == "0"
        assert (await presence(one.admin_port, "room.8"))["count"] == 1
        # Not a presence channel; not public on the first node.
        assert (await http_request(one.admin_port, "/channels/chat/presence"))[0] == 404
        assert (await http_request(one.port, "/channels/room.7/presence"))[0] == 404
        await b.close()

        async def one_left() -> bool:
            answer = await presence(one.admin_port, "room.7")
            return answer["count"] == 1 and [m["session_id"] for m in answer["members"]] == [
                a.session
            ]

        await wait_until(one_left)
    finally:
        for x in (a, b, c):
            await x.close()
    # The last leave deletes the nodes' fields: nothing of the channel stays in Redis.
    await wait_until(lambda: _empty(redis_client, "room.7"))


async def _empty(client: aioredis.Redis, channel: str) -> bool:
    return not await client.exists(key(channel), count_key(channel))


async def test_presence_pages_through_a_large_channel(start_hub: StartHub) -> None:
    hub = await start_hub(ROOMS, admin=ADMIN, presence={"max_page": 100})
    clients: list[SSEClient] = []
    try:
        # Values over 64 bytes: past Redis' small-hash encoding, so HSCAN really pages.
        meta = "m" * 70
        for _ in range(250):
            clients.append(await open_stream(hub.port, f"/channels/lobby?meta={meta}"))

        async def all_in() -> bool:
            return (await presence(hub.admin_port, "lobby"))["count"] == 250

        await wait_until(all_in, timeout=10)
        seen: set[str] = set()
        cursor, pages = "0", 0
        while True:
            page = await presence(hub.admin_port, "lobby", cursor=cursor, count=50)
            assert page["count"] == 250 and len(page["members"]) <= 100
            seen |= {m["session_id"] for m in page["members"]}
            pages += 1
            cursor = page["cursor"]
            if cursor == "0":
                break
        assert pages > 2
        assert seen == {c.session for c in clients}
        status, _, _ = await http_request(hub.admin_port, "/channels/lobby/presence?count=101")
        assert status == 400
        # A cursor past HSCAN's 64 bits is the client's error, not Redis being away.
        for bad in (2**64, 10**30, -1, "x"):
            status, _, body = await http_request(
                hub.admin_port, f"/channels/lobby/presence?cursor={bad}"
            )
            assert status == 400, body
        assert (await presence(hub.admin_port, "lobby", cursor=2**64 - 1))["count"] == 250
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
def second_node(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[int, Callable[[], None]]]:
    """Another hub, as its own process (presence ttl 1 s): its port, and how to SIGKILL it."""
    config = tmp_path / "node.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_server.url}'}}\n"
        "presence: {ttl: 1}\nchannels: {lobby: {presence: true}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssehub", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()

    def kill() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    try:
        deadline = time.monotonic() + 20
        while not any("listening" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.02)
        (line,) = [line for line in lines if "listening" in line]
        yield int(line.rsplit("port=", 1)[1].split()[0]), kill
    finally:
        kill()
        reader.join(timeout=5)
        proc.stderr.close()


@pytest.mark.slow
async def test_a_killed_nodes_entries_expire(
    start_hub: StartHub, second_node: tuple[int, Callable[[], None]]
) -> None:
    port, kill = second_node
    hub = await start_hub({"lobby": {"presence": True}}, admin=ADMIN, presence={"ttl": 1})
    mine = await open_stream(hub.port, "/channels/lobby")
    theirs = await open_stream(port, "/channels/lobby")
    try:

        async def count() -> int:
            return int((await presence(hub.admin_port, "lobby"))["count"])

        await wait_until(lambda: _is(count, 2))
        kill()
        killed = time.monotonic()
        await wait_until(lambda: _is(count, 1), timeout=5)
        assert time.monotonic() - killed < 2.5  # the TTL, plus a refresh's slack
        answer = await presence(hub.admin_port, "lobby")
        assert [m["session_id"] for m in answer["members"]] == [mine.session]
    finally:
        await mine.close()
        await theirs.close()


async def _is(get: Callable[[], Any], value: int) -> bool:
    return bool(await get() == value)


@pytest.mark.slow
async def test_workers_report_every_stream_once_whatever_ends_it(
    tmp_path: Path, redis_server: RedisServer, heard: Callable[..., Any]
) -> None:
    got = await heard("ssehub:events")
    config = write_config(
        tmp_path / "hub.yaml",
        redis_server.url,
        channels="{lobby: {presence: true}}",
        extra="events: {enabled: true}\n",
    )
    node = Node(config)
    clients: list[SSEClient] = []
    try:
        clients = [await open_stream(node.port, "/channels/lobby") for _ in range(SPREAD)]
        await wait_until(lambda: len(got) == SPREAD)

        async def count() -> int:
            return int((await presence(node.admin_port, "lobby"))["count"])

        await wait_until(lambda: _is(count, SPREAD))
        await clients[0].close()
        await wait_until(lambda: len(got) == SPREAD + 1)
        # A worker killed: main leaves its streams for it; the browsers reconnect elsewhere.
        os.kill(node.worker_pids()[0], signal.SIGKILL)
        await wait_until(lambda: any(m.get("reason") == "worker_exit" for m in got), timeout=10)
        node.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.proc.wait, 15) == 0
        sessions = {c.session for c in clients}
        await wait_until(lambda: len([m for m in got if m["type"] == "unsubscribe"]) >= SPREAD)
        for session in sessions:
            assert len(of(got, "subscribe", session)) == 1
            assert len(of(got, "unsubscribe", session)) == 1, session
        reasons = [m["reason"] for m in got if m["type"] == "unsubscribe"]
        assert reasons.count("client_gone") == 1 and "worker_exit" in reasons
        assert set(reasons) <= {"client_gone", "worker_exit", "shutdown"}
        assert len({m["node"] for m in got}) == 1  # the node's, whatever worker held it
    finally:
        for c in clients:
            await c.close()
        node.stop()


async def test_the_event_writer_is_counted_on_metrics(
    start_hub: StartHub, heard: Callable[..., Any]
) -> None:
    got = await heard("ssehub:events")
    hub = await start_hub(ROOMS, events=EVENTS, admin=ADMIN)
    c = await open_stream(hub.port, "/channels/chat")
    await c.close()
    await wait_until(lambda: len(of(got, "unsubscribe", c.session)) == 1)
    # The writer counts a batch once Redis' answer reaches it, on another connection than
    # the listener's: heard is not yet counted.
    reporter = hub.reporter
    assert reporter is not None
    await wait_until(lambda: reporter.published >= 2)
    m = await scrape(hub.admin_port)
    assert one(m, "ssehub_roster_events_published_total") == 2  # subscribe, unsubscribe
    assert one(m, "ssehub_roster_events_dropped_total") == 0
    assert one(m, "ssehub_roster_batches_total") >= 1
