"""systemd notify: a real datagram socket stands in for systemd."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssehub.server import HubServer
from ssehub.supervisors.systemd import Notifier

from .conftest import hub_config
from .redis_server import RedisServer, free_port
from .sseclient import wait_until


class FakeSystemd:
    """A bound AF_UNIX datagram socket, as systemd's notify socket is."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir = tempfile.mkdtemp(prefix="ssehub-notify-")
        if abstract:
            name = f"ssehub-test-{secrets.token_hex(8)}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # sun_path is short (108 bytes): a short private directory, not tmp_path.
            path = os.path.join(self.dir, "notify")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float = 10.0) -> dict[str, str]:
        """The next datagram, as its KEY=value fields."""
        self.sock.settimeout(timeout)
        raw = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in raw.split("\n") if line)
        self.messages.append(fields)
        return fields

    def receive_until(self, key: str, timeout: float = 10.0) -> list[dict[str, str]]:
        """Datagrams up to and including the first that carries ``key``."""
        deadline = time.monotonic() + timeout
        out: list[dict[str, str]] = []
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {key} within {timeout}s; got {out}"
            fields = self.receive(left)
            out.append(fields)
            if key in fields:
                return out

    def close(self) -> None:
        self.sock.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def systemd(request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(abstract=request.param)
    yield fake
    fake.close()


def run_daemon(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ssehub", "--config", str(config), "--port", "0"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, redis_server: RedisServer, systemd: FakeSystemd
) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"redis: {{url: '{redis_server.url}'}}\nchannels: {{chat: {{}}}}\n")
    # 200 ms watchdog: a ping every 100 ms.
    proc = run_daemon(config, {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "200000"})
    try:
        first = systemd.receive_until("READY")
        ready = first[-1]
        assert ready["READY"] == "1"
        assert re.fullmatch(r"connections=0 redis=up", ready["STATUS"])
        # Nothing but watchdog pings can come before READY (Redis answers at once).
        assert all("STOPPING" not in m for m in first)
        pings = 0
        while pings < 3:
            if systemd.receive().get("WATCHDOG") == "1":
                pings += 1
        proc.send_signal(signal.SIGTERM)
        tail = systemd.receive_until("STOPPING")
        assert tail[-1]["STOPPING"] == "1"
        assert proc.wait(timeout=15) == 0
        # Once stopping, the watchdog stops too: systemd's stop timeout governs.
        systemd.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            systemd.sock.recv(4096)
    finally:
        stop(proc)


def test_ready_waits_for_redis(tmp_path: Path, systemd: FakeSystemd) -> None:
    redis = RedisServer()
    redis.port = free_port()  # nothing listens there yet
    config = tmp_path / "hub.yaml"
    config.write_text(
        f"redis: {{url: '{redis.url}', reconnect_max: 0.1}}\nchannels: {{chat: {{}}}}\n"
    )
    proc = run_daemon(config, {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "100000"})
    try:
        # Listening but not subscribed: the loop is alive (pings), READY is held back.
        for _ in range(5):
            assert "READY" not in systemd.receive_until("WATCHDOG")[-1]
        assert not any("READY" in m for m in systemd.messages)
        redis.start()
        ready = systemd.receive_until("READY")[-1]
        assert ready["STATUS"] == "connections=0 redis=up"
        proc.send_signal(signal.SIGTERM)
        systemd.receive_until("STOPPING")
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
        redis.stop()


def test_reload_helpers_send_reloading_with_monotonic_clock(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value})
    try:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        notifier.notify_reloading()
        fields = systemd.receive()
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= before + 10_000_000
        notifier.notify_ready("connections=0 redis=up")
        assert systemd.receive() == {"READY": "1", "STATUS": "connections=0 redis=up"}
        # STATUS is sent only when it changes.
        notifier.notify_status("connections=0 redis=up")
        notifier.notify_status("connections=1 redis=up")
        assert systemd.receive() == {"STATUS": "connections=1 redis=up"}
    finally:
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.send("READY=1") is False
    notifier.notify_ready()
    notifier.notify_stopping()


def test_watchdog_for_another_pid_is_ignored() -> None:
    env = {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000"}
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.5
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_unreachable_socket_does_not_break_the_hub() -> None:
    notifier = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.close()


async def test_status_follows_connections_and_redis_state(systemd: FakeSystemd) -> None:
    from .sseclient import open_stream

    redis = RedisServer()
    redis.start()
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "100000"})
    hub = HubServer(hub_config(redis.url), notifier=notifier)
    await hub.start()

    async def status_becomes(text: str) -> None:
        # The fake systemd blocks on recv: read it in a thread while the hub runs here.
        def read() -> None:
            deadline = time.monotonic() + 10
            while systemd.receive(max(deadline - time.monotonic(), 0.01)).get("STATUS") != text:
                pass

        await asyncio.to_thread(read)

    try:
        await status_becomes("connections=0 redis=up")
        client = await open_stream(hub.port, "/channels/chat")
        try:
            await status_becomes("connections=1 redis=up")
        finally:
            await client.close()
        await status_becomes("connections=0 redis=up")
        redis.kill()
        await status_becomes("connections=0 redis=down")
    finally:
        await hub.stop()
        redis.stop()


async def test_a_stuck_event_loop_stops_the_watchdog(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "100000"})
    # Each ping timestamped as it arrives, by a thread that reads all along (also while
    # the loop is blocked): read later, pings sent meanwhile would pass for a pause.
    arrivals: list[float] = []
    done = threading.Event()

    def collect() -> None:
        systemd.sock.settimeout(0.02)
        while not done.is_set():
            try:
                raw = systemd.sock.recv(4096)
            except TimeoutError:
                continue
            if b"WATCHDOG=1" in raw.split(b"\n"):
                arrivals.append(time.monotonic())

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    notifier.start(lambda: "status")
    try:
        await wait_until(lambda: len(arrivals) >= 2, timeout=5)
        blocked = time.monotonic()
        # The stuck loop under test (blocking on purpose), not a synchronisation.
        time.sleep(0.6)  # noqa: ASYNC251
        unblocked = time.monotonic()
        after = len(arrivals)
        await wait_until(lambda: len(arrivals) >= after + 2, timeout=5)
    finally:
        notifier.close()
        done.set()
        reader.join(timeout=5)
    # Pings every 50 ms while the loop runs; none while it was blocked (one sent just
    # before the block may be read a little late).
    during = [t - blocked for t in arrivals if blocked + 0.1 < t < unblocked]
    assert during == [], during
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.5, gaps
    assert min(gaps) < 0.3, gaps
