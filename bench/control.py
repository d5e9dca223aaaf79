"""The control plane's costs (issue 23): ``POST /publish`` beside a raw ``PUBLISH``, and
what ``auth: proxy`` costs per connect in a storm.

``python -m bench.control`` (``--quick`` for short windows, ``--storm N`` for the
storm's size). It starts its own ``redis-server`` on a free loopback port and one hub
(``python -m ssehub``, a single process, pinned to core 0 like the main bench); the
load (the publishers, the storm's clients) and the proxy's application run in their own
process on core 1. Everything started is stopped at the end.

**publish**: messages per second into one channel with one subscriber (which counts
what arrives, so every message is checked as delivered), for the same concurrency (32
requests in flight) five ways: a raw ``PUBLISH`` per round trip (redis-py, what an
application does), raw ``PUBLISH`` pipelined 100 per round trip, ``POST /publish`` one
message per request, ``POST /publish`` with an ``Idempotency-Key`` (a script per
message), and ``POST /publish`` batches of 100. The hub's CPU per message is its
process's CPU time over the window divided by the messages.

**proxy-storm**: N clients connect at once (at most 1,000 connecting at a time) to
members of a family ``user.*``: public, then ``auth: proxy`` with a session per client
(a call to the application each), then both again with 100 members (100 sessions: the
cache and one call per session in flight). The public runs are the baselines: a new
member costs a Redis subscription either way, so the difference is what asking the
application costs. Each client counts as connected at its stream's first ``id:`` line.
Reported: the storm's duration, the hub's CPU per connect, the application's calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .servers import (
    ProcessTree,
    RedisServer,
    free_port,
    http_get,
    pinned,
    spawn,
    stop,
    wait_http,
)

KEY = "bench-publish-key-0123456789"
CONCURRENCY = 32
BATCH = 100
SERVER_CORE, LOAD_CORE = 0, 1


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})


class Hub:
    """``python -m ssehub`` with a config of the scenario's, pinned to the server core."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "admin": {"host": "127.0.0.1", "port": self.admin_port},
            "publish": {"key_env": "BENCH_PUBLISH_KEY", "max_batch": BATCH},
            "limits": {"max_members": 100_000},
            **config,
        }
        path = workdir / "control-hub.yaml"
        path.write_text(json.dumps(config))
        argv = [sys.executable, "-m", "ssehub", "--config", str(path), "--log-level", "WARNING"]
        env = {"BENCH_PUBLISH_KEY": KEY}
        self.proc = spawn(pinned(argv, SERVER_CORE), workdir / "control-hub.log", env)
        wait_http(self.proc, self.port, "/readyz", 30)

    def cpu_s(self) -> float:
        return ProcessTree(self.proc.pid).cpu_s()

    def stop(self) -> None:
        stop(self.proc)


# --- the load side (its own process) ------------------------------------------------------


async def _subscribe(port: int, path: str, cookie: str = "") -> asyncio.StreamReader:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
    if cookie:
        head += f"Cookie: sid={cookie}\r\n"
    writer.write((head + "\r\n").encode())
    # Live once the position line arrived (the stream is registered then).
    seen = b""
    while b"\nid: " not in seen:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError(f"{path}: ended before its position: {seen[-200:]!r}")
        seen += data
    reader._bench_writer = writer  # type: ignore[attr-defined]  # kept open
    return reader


async def _count(reader: asyncio.StreamReader, counter: list[int]) -> None:
    tail = b""  # a field split across two reads is counted once, in the second
    while True:
        data = await reader.read(1 << 20)
        if not data:
            return
        data = tail + data
        counter[0] += data.count(b"\ndata: ")
        tail = data[-6:]  # shorter than the 7-byte mark: never counted twice


async def _publish(
    kind: str, port: int, admin_port: int, redis_port: int, seconds: float
) -> dict[str, Any]:
    import aiohttp
    import redis.asyncio as aioredis

    sub = await _subscribe(port, "/channels/chat")
    got = [0]
    counting = asyncio.create_task(_count(sub, got))
    sent = [0]
    stop_at = time.monotonic() + seconds
    body = json.dumps({"channel": "chat", "data": "x" * 100}).encode()
    batch = json.dumps([{"channel": "chat", "data": "x" * 100}] * BATCH).encode()
    url = f"http://127.0.0.1:{admin_port}/publish"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    redis = aioredis.Redis(port=redis_port, max_connections=CONCURRENCY)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
    n = [0]

    async def one() -> None:
        while time.monotonic() < stop_at:
            if kind == "raw-publish":
                await redis.publish("chat", b"x" * 100)
                sent[0] += 1
            elif kind == "raw-publish-pipelined":
                pipe = redis.pipeline(transaction=False)
                for _ in range(BATCH):
                    pipe.publish("chat", b"x" * 100)
                await pipe.execute()
                sent[0] += BATCH
            else:
                extra = {}
                if kind == "http-publish-idempotent":
                    n[0] += 1
                    extra = {"Idempotency-Key": f"k{n[0]}-{time.time_ns()}"}
                data = batch if kind == "http-publish-batch" else body
                async with http.post(url, data=data, headers={**headers, **extra}) as resp:
                    assert resp.status == 200, (resp.status, await resp.text())
                    await resp.read()
                sent[0] += BATCH if kind == "http-publish-batch" else 1

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(CONCURRENCY)))
    wall = time.monotonic() - start
    deadline = time.monotonic() + 10
    while got[0] < sent[0] and time.monotonic() < deadline:  # noqa: ASYNC110 (a counter)
        await asyncio.sleep(0.05)
    counting.cancel()
    await http.close()
    await redis.aclose()
    return {"sent": sent[0], "delivered": got[0], "wall_s": wall}


async def _storm(port: int, n: int, members: int, cookies: bool) -> dict[str, Any]:
    """``n`` clients over ``members`` members of ``user.*``; with ``cookies``, each
    member's clients carry its session's cookie."""
    gate = asyncio.Semaphore(1000)
    readers: list[asyncio.StreamReader] = []
    failed = [0]

    async def one(i: int) -> None:
        async with gate:
            m = i % members
            cookie = f"user{m}" if cookies else ""
            try:
                readers.append(await _subscribe(port, f"/channels/user.{m}", cookie))
            except (OSError, ConnectionError):
                failed[0] += 1

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.monotonic() - start
    for r in readers:
        r._bench_writer.close()  # type: ignore[attr-defined]
    return {"connected": len(readers), "failed": failed[0], "wall_s": wall}


def _load_main(conn: Connection, what: str, args: dict[str, Any]) -> None:
    _pin(LOAD_CORE)
    import resource

    import uvloop

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    coro = _publish(**args) if what == "publish" else _storm(**args)
    conn.send(uvloop.run(coro))


def _in_load_process(what: str, **args: Any) -> dict[str, Any]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_load_main, args=(child, what, args))
    proc.start()
    result: dict[str, Any] = parent.recv()
    proc.join(30)
    return result


# --- the proxy's application (its own process) -----------------------------------------------


def _app_main(port: int, calls: Any) -> None:
    _pin(LOAD_CORE)
    from aiohttp import web

    async def authorize(request: web.Request) -> web.Response:
        asked = await request.json()
        with calls.get_lock():
            calls.value += 1
        user = asked["cookies"].get("sid", "").removeprefix("user")
        return web.json_response({"user": user, "channels": [f"user.{user}"]})

    app = web.Application()
    app.router.add_post("/auth", authorize)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _wait_app(port: int) -> None:
    deadline = time.monotonic() + 10
    while http_get(port, "/auth") == 0:  # any answer (405 for a GET) means it listens
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy's application did not start")
        time.sleep(0.05)


# --- the scenarios ------------------------------------------------------------------------------


def publish(workdir: Path, redis: RedisServer, seconds: float) -> list[dict[str, Any]]:
    out = []
    for kind in (
        "raw-publish",
        "raw-publish-pipelined",
        "http-publish",
        "http-publish-idempotent",
        "http-publish-batch",
    ):
        hub = Hub(workdir, {"redis": {"url": redis.url}, "channels": {"chat": {}}})
        try:
            cpu0, rcpu0 = hub.cpu_s(), redis.cpu_s()
            r = _in_load_process(
                "publish",
                kind=kind,
                port=hub.port,
                admin_port=hub.admin_port,
                redis_port=redis.port,
                seconds=seconds,
            )
            cpu, rcpu = hub.cpu_s() - cpu0, redis.cpu_s() - rcpu0
        finally:
            hub.stop()
        out.append(
            {
                "scenario": "publish",
                "kind": kind,
                "msgs_per_s": round(r["sent"] / r["wall_s"]),
                "delivered": f"{r['delivered']}/{r['sent']}",
                "hub_cpu_us_per_msg": round(cpu / max(r["sent"], 1) * 1e6, 1),
                "redis_cpu_us_per_msg": round(rcpu / max(r["sent"], 1) * 1e6, 1),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def proxy_storm(workdir: Path, redis: RedisServer, n: int) -> list[dict[str, Any]]:
    out = []
    cases = (
        ("public, a member each", n, False),
        ("proxy, a session and member each", n, True),
        ("public, 100 members", 100, False),
        ("proxy, 100 sessions and members", 100, True),
    )
    for label, members, proxied in cases:
        app_port = free_port()
        calls = mp.get_context("spawn").Value("i", 0)
        app = mp.get_context("spawn").Process(target=_app_main, args=(app_port, calls))
        app.start()
        config: dict[str, Any] = {
            "redis": {"url": redis.url},
            "channels": {"chat": {}, "user.*": {"auth": "proxy" if proxied else "public"}},
            "auth": {"proxy": {"url": f"http://127.0.0.1:{app_port}/auth", "cookies": ["sid"]}},
        }
        hub = Hub(workdir, config)
        try:
            _wait_app(app_port)
            cpu0 = hub.cpu_s()
            r = _in_load_process("storm", port=hub.port, n=n, members=members, cookies=proxied)
            cpu = hub.cpu_s() - cpu0
        finally:
            hub.stop()
            app.terminate()
            app.join(10)
        out.append(
            {
                "scenario": "proxy-storm",
                "kind": label,
                "clients": n,
                "connected": r["connected"],
                "storm_s": round(r["wall_s"], 2),
                "hub_cpu_us_per_connect": round(cpu / max(r["connected"], 1) * 1e6),
                "app_calls": calls.value,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__)
    p.add_argument("--scenario", default="publish,proxy-storm")
    p.add_argument("--quick", action="store_true", help="3 s publish windows, a 2,000 storm")
    p.add_argument("--storm", type=int, default=0, help="clients in the storm (10,000)")
    args = p.parse_args(argv)
    seconds = 3.0 if args.quick else 10.0
    storm = args.storm or (2000 if args.quick else 10_000)
    load = os.getloadavg()
    print(json.dumps({"loadavg_before": [round(x, 2) for x in load]}), flush=True)
    with tempfile.TemporaryDirectory(prefix="ssehub-bench-control-") as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir, LOAD_CORE)
        redis.start()
        try:
            if "publish" in args.scenario:
                publish(workdir, redis, seconds)
            if "proxy-storm" in args.scenario:
                proxy_storm(workdir, redis, storm)
        finally:
            redis.stop()
    print(json.dumps({"loadavg_after": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
