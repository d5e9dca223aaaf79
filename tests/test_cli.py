"""The daemon as systemd runs it: a real process, signals and exit codes."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .redis_server import RedisServer


class Daemon:
    """``python -m ssehub`` as a child process, its stderr read with deadlines.

    A thread does the blocking reads into a queue, so a daemon that falls silent
    fails the test at the caller's deadline instead of hanging it in readline().
    """

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssehub", "--config", str(config), *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)  # end of stderr

    def lines(self, timeout: float) -> Iterator[str]:
        """The daemon's next stderr lines, until ``timeout`` seconds have passed or
        stderr ends (then ``ended`` is true)."""
        deadline = time.monotonic() + timeout
        while not self.ended:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if line is None:
                self.ended = True
                return
            yield line

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def reap(self) -> None:
        """Kill the daemon if a test left it running, and close its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)  # stderr is at its end once the process is gone
        if self.proc.stderr is not None:
            self.proc.stderr.close()


LISTENING = re.compile(r"listening host=\S+ port=(\d+)")


def start_daemon(config: Path, *args: str) -> tuple[Daemon, int]:
    """Start the daemon and return it with the port it logged it listens on."""
    daemon = Daemon(config, *args)
    for line in daemon.lines(timeout=20):
        if match := LISTENING.search(line):
            return daemon, int(match.group(1))
    daemon.reap()
    raise AssertionError("daemon did not start listening")


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
    daemon, port = start_daemon(config, "--host", "127.0.0.1", "--port", "0")
    try:
        assert get(port, "/healthz").startswith(b"HTTP/1.0 200")
        deadline = time.monotonic() + 10
        while not get(port, "/readyz").startswith(b"HTTP/1.0 200"):
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
    finally:
        daemon.reap()


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
    daemon, port = start_daemon(config, "--port", "0")
    stream = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        config.write_text(base + "channels: {chat: {}, later: {}}\n")
        daemon.send_signal(signal.SIGHUP)
        reloaded = next((line for line in daemon.lines(timeout=10) if "reloaded" in line), "")
        assert "added=later" in reloaded, f"reload log line: {reloaded!r}"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
            probe.sendall(b"GET /channels/later HTTP/1.1\r\nHost: x\r\n\r\n")
            assert probe.recv(100).startswith(b"HTTP/1.1 200")
        # A stream that never reads does not hold up the shutdown past its timeout.
        stream.sendall(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stream.recv(100).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0
        assert time.monotonic() - started < 3 + 2
    finally:
        stream.close()
        daemon.reap()
