"""A hub as a real process (``python -m ssehub``), single or with ``workers:``.

Its log lines (stderr) are collected by a reader thread, so tests can wait for one
and find its fields; ``stop()`` kills whatever the test left running, workers too.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["WORKERS", "Node", "alive", "write_config"]

WORKERS = 2

# The public listener's line: a workers node's main process writes it once every
# worker listens (each worker writes the single process's line before that).
_LISTENING = r" listening host=\S+ port=(\d+) workers="
_LISTENING_SINGLE = r" ssehub.server listening host=\S+ port=(\d+)"
# A record at ERROR or above (text format: "<time> <LEVEL> <logger> ..."), or a
# traceback's first line (indented under its record).
_ERROR = re.compile(r"^\S+ (ERROR|CRITICAL) |Traceback \(most recent call last\)")


class Node:
    """``python -m ssehub --config <file>``; its log lines collected by a reader thread."""

    def __init__(
        self, config: Path, env: dict[str, str] | None = None, *, single: bool = False
    ) -> None:
        """Start it; return once it listens (``single``: a config without ``workers:``)."""
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssehub", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.port = int(self.wait_for(_LISTENING_SINGLE if single else _LISTENING)[1])
        except BaseException:
            self.stop()
            raise
        admin = [
            m for line in self.lines if (m := re.search(r"admin listening .*port=(\d+)", line))
        ]
        self.admin_port = int(admin[0][1]) if admin else 0

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, start: int = 0, timeout: float = 20.0) -> re.Match[str]:
        """The first log line from ``start`` on that matches ``pattern`` (polled)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(timeout=1)  # every line it wrote before it went
            for line in self.lines[start:]:
                match = re.search(pattern, line)
                if match:
                    return match
            assert not exited, f"node exited ({self.proc.returncode}) without {pattern!r}:\n" + (
                "".join(self.lines)
            )
            assert time.monotonic() < deadline, f"no {pattern!r}:\n{''.join(self.lines)}"
            time.sleep(0.02)

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def worker_pids(self) -> dict[int, int]:
        """The current pid of each worker, from the start lines."""
        pids = {}
        for line in self.lines:
            match = re.search(r"worker started worker=(\d+) pid=(\d+)", line)
            if match:
                pids[int(match[1])] = int(match[2])
        return pids

    def errors(self, start: int = 0) -> list[str]:
        """ERROR and CRITICAL lines and traceback lines logged from line ``start`` on."""
        return [line for line in self.lines[start:] if _ERROR.search(line)]

    def stop(self) -> None:
        """Kill what a test left running (main and workers) and close the pipe."""
        pids = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def write_config(path: Path, redis_url: str, channels: str = "{chat: {}}", extra: str = "") -> Path:
    """A ``workers: 2`` node's config file, with an admin listener on a free port."""
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_url}'}}\n"
        f"workers: {WORKERS}\nadmin: {{port: 0}}\nshutdown_timeout: 3\n{extra}"
        f"channels: {channels}\n"
    )
    return path
