"""The daemon as systemd runs it: a real process, signals and exit codes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .redis_server import RedisServer


def start_daemon(config: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssehub", "--config", str(config), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"listening host=\S+ port=(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    proc.wait()
    raise AssertionError("daemon did not start listening")


def reap(proc: subprocess.Popen[str]) -> None:
    """Kill the daemon if a test left it running, and close its pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_daemon_serves_and_exits_0_on_sigterm(tmp_path: Path, redis_server: RedisServer) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(f"redis: {{url: '{redis_server.url}'}}\nchannels: {{chat: {{}}}}\n")
    proc, port = start_daemon(config, "--host", "127.0.0.1", "--port", "0")
    try:
        assert get(port, "/healthz").startswith(b"HTTP/1.0 200")
        deadline = time.monotonic() + 10
        while not get(port, "/readyz").startswith(b"HTTP/1.0 200"):
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        reap(proc)


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "hub.yaml"
        config.write_text("channels: {chat: {}}\n")
        result = subprocess.run(
            [sys.executable, "-m", "ssehub", "--config", str(config), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
    assert result.returncode == 3
    assert "cannot start" in result.stderr


def test_sighup_reloads_and_sigterm_ends_streams_within_the_timeout(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "hub.yaml"
    base = f"redis: {{url: '{redis_server.url}'}}\nshutdown_timeout: 3\n"
    config.write_text(base + "channels: {chat: {}}\n")
    proc, port = start_daemon(config, "--port", "0")
    assert proc.stderr is not None
    stream = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        config.write_text(base + "channels: {chat: {}, later: {}}\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            line = proc.stderr.readline()
            assert time.monotonic() < deadline and line, "no reload log line"
            if "reloaded" in line:
                assert "added=later" in line
                break
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            probe.sendall(b"GET /channels/later HTTP/1.1\r\nHost: x\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.1 200")
        # A stream that never reads does not hold up the shutdown past its timeout.
        stream.sendall(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stream.recv(100).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 3 + 2
    finally:
        stream.close()
        reap(proc)
