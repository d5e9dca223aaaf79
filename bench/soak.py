"""Soak: thousands of churning clients while messages flow and Redis is killed twice.

    python -m bench.soak --clients 2000 --duration 60 [--rate 10] [--restarts 2]

Everything is private and bounded: a redis-server on a free loopback port, the hub
in a subprocess (``python -m ssehub --config <tmp yaml> --port 0``, its port read
from the ``listening … port=N`` log line), and N simulated browsers that connect,
read for a random while, drop (FIN or RST) and come back, half of them with the
``Last-Event-ID`` of their previous stream, as ``EventSource`` does. A publisher
sends numbered messages at a fixed rate; Redis is ``kill -9``'d and restarted
``--restarts`` times.

Accounting is per stream (one connection of one simulated browser): every message
the publisher sent after the stream had its position marker, that Redis handed to
the hub (``PUBLISH`` answered >= 1), and whose answer came back more than
``--margin`` seconds before the stream ended, must have arrived: otherwise it is
lost. Messages Redis could not hand over (sent while the hub was away) are the
outage window: they are counted apart, and a stream connected across an outage
must have been told with ``ssehub-gap`` / ``redis_outage``. The hub's RSS is
sampled all along; "flat once warm" compares the last third with the middle one.

``run_soak()`` is the engine; ``tests/test_soak.py`` runs a short variant of it
against an in-process hub.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .soak_client import Stream, StreamProtocol, factory

__all__ = ["Report", "SoakConfig", "run_soak"]

CHANNEL = "soak"


class RedisLike(Protocol):
    """What the soak needs of a Redis it may kill (``tests.redis_server.RedisServer``)."""

    @property
    def url(self) -> str: ...

    def start(self, timeout: float = ...) -> None: ...
    def kill(self) -> None: ...


@dataclass
class SoakConfig:
    clients: int = 2000
    duration: float = 60.0
    rate: float = 10.0  # messages per second
    restarts: int = 2
    down: float = 1.0  # seconds Redis stays dead each time
    min_life: float = 1.0  # stream lifetime bounds (seconds)
    max_life: float = 10.0
    resume: float = 0.5  # share of reconnects that send Last-Event-ID
    margin: float = 1.0  # a message answered this long before a stream ends must arrive
    payload: int = 64  # message size in bytes
    sample: float = 1.0  # RSS sampling period (seconds)
    seed: int = 1


@dataclass
class Outage:
    killed_at: float
    answering_at: float = 0.0  # redis-server answers PING again
    ready_at: float = 0.0  # the hub's /readyz is 200 again


@dataclass
class Report:
    published: int = 0  # messages Redis handed to the hub
    unroutable: int = 0  # sent while the hub was not subscribed (outage window)
    failed: int = 0  # PUBLISH errors (Redis down)
    clients: int = 0
    streams: int = 0
    streams_failed: int = 0  # never got their position marker
    streams_ended_by_hub: int = 0
    delivered: int = 0  # message receptions counted in expected windows
    expected: int = 0
    lost: int = 0  # expected and not received, outside outage windows
    streams_with_loss: int = 0
    max_lost_per_stream: int = 0
    clients_with_loss: int = 0  # simulated browsers that lost something, over all streams
    lost_per_client: dict[int, int] = field(default_factory=dict)  # lost -> clients
    duplicates: int = 0
    missed_in_outage: int = 0  # outage-window messages a stream did not get
    across_outage: int = 0  # streams connected across a Redis outage
    across_outage_signalled: int = 0  # ... that got ssehub-gap / redis_outage
    gap_reasons: dict[str, int] = field(default_factory=dict)
    resubscribe_s: list[float] = field(default_factory=list)  # Redis answering -> ready
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)
    rss_warm_growth_mb: float = 0.0  # max of last third - max of middle third
    loss_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.across_outage == self.across_outage_signalled
            and self.streams_ended_by_hub == 0
        )

    def text(self) -> str:
        """A human summary."""
        lines = [
            f"published to the hub: {self.published} messages "
            f"(+{self.unroutable} in outage windows, {self.failed} PUBLISH errors)",
            f"streams: {self.streams} ({self.streams_failed} never opened, "
            f"{self.streams_ended_by_hub} ended by the hub)",
            f"delivered: {self.delivered}/{self.expected} expected receptions; "
            f"lost {self.lost} in {self.streams_with_loss} streams "
            f"(max {self.max_lost_per_stream} per stream); duplicates {self.duplicates}",
            f"per client: {self.clients_with_loss} of {self.clients} lost messages outside "
            f"outages; histogram lost->clients {dict(sorted(self.lost_per_client.items()))}",
            f"outage windows: {self.missed_in_outage} receptions missed; "
            f"{self.across_outage_signalled}/{self.across_outage} streams connected across "
            "an outage got ssehub-gap redis_outage",
            f"gap reasons: {self.gap_reasons}",
            "resubscribed after Redis answered: "
            + ", ".join(f"{s:.2f}s" for s in self.resubscribe_s),
            "hub RSS (t s: MB): "
            + "  ".join(f"{t:.0f}: {mb:.1f}" for t, mb in _thin(self.rss_mb, 12)),
            f"RSS once warm: {self.rss_warm_growth_mb:+.1f} MB "
            f"({'flat' if abs(self.rss_warm_growth_mb) < 5 else 'NOT flat'})",
            "verdict: " + ("OK" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


def _thin(samples: Sequence[tuple[float, float]], n: int) -> list[tuple[float, float]]:
    if len(samples) <= n:
        return list(samples)
    step = (len(samples) - 1) / (n - 1)
    return [samples[round(i * step)] for i in range(n)]


class _Soak:
    def __init__(
        self, port: int, redis: RedisLike, cfg: SoakConfig, rss: Callable[[], int]
    ) -> None:
        self.port = port
        self.redis = redis
        self.cfg = cfg
        self.rss = rss
        self.rng = random.Random(cfg.seed)
        self.streams: list[Stream] = []
        self.outages: list[Outage] = []
        # Per message number: when sent, when answered, and to how many subscribers.
        self.sent_at: list[float] = []
        self.acked_at: list[float | None] = []
        self.receivers: list[int] = []  # -1: PUBLISH failed
        self.rss_samples: list[tuple[float, float]] = []
        self.t0 = 0.0
        self.stop_at = 0.0

    async def run(self) -> Report:
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + self.cfg.duration
        tasks = [
            asyncio.create_task(self._publisher()),
            asyncio.create_task(self._faults()),
            asyncio.create_task(self._sampler()),
        ]
        clients = [asyncio.create_task(self._client(i)) for i in range(self.cfg.clients)]
        try:
            # Clients end on their own at the deadline; bound the wait anyway.
            done, pending = await asyncio.wait(clients, timeout=self.cfg.duration + 30)
            if pending:
                raise RuntimeError(f"{len(pending)} clients did not finish")
            for task in done:
                task.result()
        finally:
            for task in [*tasks, *clients]:
                task.cancel()
            await asyncio.gather(*tasks, *clients, return_exceptions=True)
        return self._report()

    async def _publisher(self) -> None:
        client = aioredis.Redis.from_url(
            self.redis.url, socket_connect_timeout=0.2, socket_timeout=1.0
        )
        pad = b"x" * max(0, self.cfg.payload - 12)
        period = 1.0 / self.cfg.rate
        loop = asyncio.get_running_loop()
        try:
            tick = loop.time()
            while time.monotonic() < self.stop_at:
                n = len(self.sent_at)
                self.sent_at.append(time.monotonic())
                self.acked_at.append(None)
                self.receivers.append(-1)
                with contextlib.suppress(RedisError, OSError):
                    self.receivers[n] = await client.publish(CHANNEL, b"%d %s" % (n, pad))
                    self.acked_at[n] = time.monotonic()
                tick = max(tick + period, loop.time())
                await asyncio.sleep(tick - loop.time())
        finally:
            await client.aclose()

    async def _ready(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port), 1
            )
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), 1)
            return line.split(b" ")[1:2] == [b"200"]
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _faults(self) -> None:
        n = self.cfg.restarts
        for k in range(1, n + 1):
            at = self.t0 + self.cfg.duration * k / (n + 1)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            outage = Outage(killed_at=time.monotonic())
            self.redis.kill()
            self.outages.append(outage)
            await asyncio.sleep(self.cfg.down)
            await asyncio.to_thread(self.redis.start)
            outage.answering_at = time.monotonic()
            deadline = outage.answering_at + 30
            while not await self._ready():
                if time.monotonic() > deadline:
                    raise RuntimeError("the hub did not get ready again within 30 s")
                await asyncio.sleep(0.02)
            outage.ready_at = time.monotonic()

    async def _sampler(self) -> None:
        while True:
            self.rss_samples.append((time.monotonic() - self.t0, self.rss() / 2**20))
            await asyncio.sleep(self.cfg.sample)

    async def _client(self, i: int) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(self.cfg.seed * 100_003 + i)
        last_id: str | None = None
        # Spread the first connections over the first second, as a page load would.
        await asyncio.sleep(rng.uniform(0, min(1.0, self.cfg.duration / 4)))
        while time.monotonic() < self.stop_at - self.cfg.min_life:
            resume = last_id is not None and rng.random() < self.cfg.resume
            s = Stream(client=i, resumed=resume, connect_at=time.monotonic())
            self.streams.append(s)
            opened: asyncio.Future[None] = loop.create_future()
            try:
                proto = StreamProtocol(s, opened)
                transport, _ = await asyncio.wait_for(
                    loop.create_connection(factory(proto), "127.0.0.1", self.port), 5
                )
            except (OSError, TimeoutError) as exc:
                s.error = f"connect: {exc!r}"
                s.closed_at = time.monotonic()
                await asyncio.sleep(rng.uniform(0.1, 0.5))
                continue
            head = f"GET /channels/{CHANNEL} HTTP/1.1\r\nHost: soak\r\n"
            head += "Accept: text/event-stream\r\n"
            if resume:
                head += f"Last-Event-ID: {last_id}\r\n"
            transport.write((head + "\r\n").encode())
            life = rng.uniform(self.cfg.min_life, self.cfg.max_life)
            end = min(time.monotonic() + life, self.stop_at)
            await asyncio.wait({opened, proto.lost}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            if opened.done():
                await asyncio.wait({proto.lost}, timeout=max(0.0, end - time.monotonic()))
            else:
                s.error = s.error or "no position marker within 5 s"
            s.closed_at = time.monotonic()
            if not proto.lost.done():
                proto.close(abort=rng.random() < 0.3)
            if s.last_id is not None:
                last_id = s.last_id
            # EventSource waits `retry` before reconnecting; keep churn brisk.
            await asyncio.sleep(rng.uniform(0.0, 0.2))

    # --- accounting -------------------------------------------------------------

    def _report(self) -> Report:
        cfg = self.cfg
        r = Report()
        routed = [x >= 1 for x in self.receivers]
        r.published = sum(routed)
        r.failed = sum(1 for x in self.receivers if x < 0)
        r.unroutable = sum(1 for x in self.receivers if x == 0) + r.failed
        # Around a kill, an answered PUBLISH may not have reached the hub's socket
        # yet when Redis dies: treat the last 100 ms before each kill as outage too.
        near_kill = [
            any(o.killed_at - 0.1 <= t <= o.killed_at for o in self.outages) for t in self.sent_at
        ]
        r.streams = len(self.streams)
        r.clients = cfg.clients
        client_lost = [0] * cfg.clients
        for s in self.streams:
            for reason in s.gaps:
                r.gap_reasons[reason] = r.gap_reasons.get(reason, 0) + 1
            if s.opened_at is None:
                r.streams_failed += 1
                continue
            if s.ended_by_hub:
                r.streams_ended_by_hub += 1
            r.duplicates += s.duplicates
            start, stop = s.opened_at, s.closed_at - cfg.margin
            lost: list[int] = []
            # Sent after the stream opened and before it closed (sent_at is sorted).
            first = bisect.bisect_right(self.sent_at, start)
            for n in range(first, bisect.bisect_left(self.sent_at, s.closed_at)):
                acked = self.acked_at[n]
                if routed[n] and not near_kill[n]:
                    if acked is not None and acked < stop:
                        r.expected += 1
                        if n in s.received:
                            r.delivered += 1
                        else:
                            lost.append(n)
                elif n not in s.received:
                    r.missed_in_outage += 1
            client_lost[s.client] += len(lost)
            if lost:
                r.lost += len(lost)
                r.streams_with_loss += 1
                r.max_lost_per_stream = max(r.max_lost_per_stream, len(lost))
                if len(r.loss_examples) < 5:
                    r.loss_examples.append(
                        {
                            "client": s.client,
                            "opened_at": round(s.opened_at - self.t0, 3),
                            "closed_at": round(s.closed_at - self.t0, 3),
                            "lost": lost[:10],
                            "error": s.error,
                        }
                    )
            for o in self.outages:
                if s.opened_at < o.killed_at and s.closed_at > o.ready_at + cfg.margin:
                    r.across_outage += 1
                    if "redis_outage" in s.gaps:
                        r.across_outage_signalled += 1
        for n in client_lost:
            r.lost_per_client[n] = r.lost_per_client.get(n, 0) + 1
        r.clients_with_loss = sum(1 for n in client_lost if n)
        r.resubscribe_s = [round(o.ready_at - o.answering_at, 3) for o in self.outages]
        r.rss_mb = [(round(t, 1), round(mb, 1)) for t, mb in self.rss_samples]
        third = len(r.rss_mb) // 3
        if third:
            middle = max(mb for _, mb in r.rss_mb[third : 2 * third])
            last = max(mb for _, mb in r.rss_mb[2 * third :])
            r.rss_warm_growth_mb = round(last - middle, 1)
        return r


async def run_soak(port: int, redis: RedisLike, cfg: SoakConfig, rss: Callable[[], int]) -> Report:
    """Run the soak against a hub on ``port`` fed by ``redis``; ``rss()`` is the hub's RSS."""
    return await _Soak(port, redis, cfg, rss).run()


# --- the command: private Redis, hub in a subprocess ----------------------------


def _proc_rss(pid: int) -> Callable[[], int]:
    def rss() -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    return rss


async def _read_port(stderr: asyncio.StreamReader, log: list[str]) -> int:
    while True:
        line = (await stderr.readline()).decode(errors="replace")
        if not line:
            raise RuntimeError("the hub exited before listening:\n" + "".join(log[-20:]))
        log.append(line)
        if "listening " in line and "port=" in line:
            return int(line.rsplit("port=", 1)[1].split()[0])


async def _drain(stderr: asyncio.StreamReader, log: list[str]) -> None:
    """Keep reading the hub's log so it never blocks on a full pipe; keep its
    warnings and errors, with their tracebacks."""
    keep = False
    while line := await stderr.readline():
        text = line.decode(errors="replace")
        if text[:2].isdigit():  # a new record: "2026-11-25 12:00:00,000 LEVEL ..."
            keep = " WARNING " in text or " ERROR " in text or " CRITICAL " in text
            if keep:
                log.append(text)
        elif keep and log:  # a traceback line of the record kept last
            log[-1] += text
        del log[:-200]


def _write_config(directory: str, redis_url: str) -> str:
    path = os.path.join(directory, "soak.yaml")
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "redis": {"url": redis_url, "reconnect_max": 0.5},
        "heartbeat": 5,
        "channels": {CHANNEL: {"history": 1000}},
    }
    with open(path, "w") as f:
        json.dump(config, f)  # JSON is YAML
    return path


async def _main(cfg: SoakConfig, as_json: bool) -> int:
    from tests.redis_server import RedisServer  # the suite's private redis-server

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cfg.clients + 100 > resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        print(f"soak: raise the open files limit above {cfg.clients + 100}", file=sys.stderr)
        return 2

    redis = RedisServer()
    hub: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ssehub-soak-") as tmp:
        try:
            redis.start()
            config = _write_config(tmp, redis.url)
            hub = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ssehub", "--config", config, "--port", "0",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert hub.stderr is not None
            port = await asyncio.wait_for(_read_port(hub.stderr, log), 15)
            log.clear()
            drain = asyncio.create_task(_drain(hub.stderr, log))
            print(
                f"soak: hub pid {hub.pid} on 127.0.0.1:{port}, redis on {redis.port}; "
                f"{cfg.clients} clients, {cfg.duration:g}s, {cfg.rate:g} msg/s, "
                f"{cfg.restarts} Redis restarts",
                file=sys.stderr,
            )
            report = await run_soak(port, redis, cfg, _proc_rss(hub.pid))
        finally:
            if hub is not None and hub.returncode is None:
                hub.terminate()
                try:
                    await asyncio.wait_for(hub.wait(), 15)
                except TimeoutError:
                    hub.kill()
                    await hub.wait()
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
            redis.stop()
    if as_json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=1))
    else:
        print(report.text())
        for example in report.loss_examples:
            print("loss:", example)
        if log:
            print(f"hub warnings/errors ({len(log)}; first lines of each, then the last in full):")
            print("".join(entry.split("\n", 1)[0] + "\n" for entry in log[-10:]), end="")
            print(log[-1], end="")
            errors: dict[str, int] = {}
            for entry in log:
                if " ERROR " in entry[:40]:
                    last = re.sub(r"0x[0-9a-f]+", "0x…", entry.strip().rsplit("\n", 1)[-1])
                    errors[last] = errors.get(last, 0) + 1
            if errors:
                lines = [f"{n} x {e}" for e, n in errors.items()]
                print("errors by last line:", *lines, sep="\n  ")
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    d = SoakConfig()
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--duration", type=float, default=d.duration, help="seconds")
    p.add_argument("--rate", type=float, default=d.rate, help="messages per second")
    p.add_argument("--restarts", type=int, default=d.restarts, help="Redis kill -9 + restart")
    p.add_argument("--down", type=float, default=d.down, help="seconds Redis stays dead")
    p.add_argument("--max-life", type=float, default=d.max_life, help="longest stream, s")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        clients=a.clients,
        duration=a.duration,
        rate=a.rate,
        restarts=a.restarts,
        down=a.down,
        max_life=a.max_life,
        seed=a.seed,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(_main(cfg, a.json))
    return uvloop.run(_main(cfg, a.json))


if __name__ == "__main__":
    sys.exit(main())
