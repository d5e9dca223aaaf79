"""Shells a test types the docs' commands into, as a reader would, against free ports.

A ``Desk`` holds what a reader's machine has (the repository, a Redis, configs) moved to
free ports: a copy of each config the docs name with the hub, admin and Redis addresses
replaced, ``redis-cli`` pointed at the test's Redis, and ``SSEHUB_CONFIG`` and
``DEV_RUN_DIR`` set so nothing touches the developer's own ``./dev run``. A ``Terminal``
is one bash reading the lines typed into it; what it prints is read with deadlines.
Commands are typed as the docs show them; only ``127.0.0.1:8080``, ``127.0.0.1:9090``
and the config paths are rewritten to the test's (and the example ``auth: proxy``
application is given a free port instead of its 8001).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .redis_server import free_port

__all__ = ["ROOT", "Desk", "Terminal", "http_status"]

ROOT = Path(__file__).resolve().parent.parent
HUB, ADMIN = "127.0.0.1:8080", "127.0.0.1:9090"
# examples/proxy_auth_app.py, the auth: proxy application (its port is its argument).
APP, APP_SCRIPT = "127.0.0.1:8001", "examples/proxy_auth_app.py"
REDIS_URL = "redis://127.0.0.1:6379/0"


def http_status(port: int, path: str) -> int | None:
    """The status of ``GET path`` on the loopback port, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return None
    m = re.match(rb"HTTP/1\.\d (\d{3})", head)
    return int(m.group(1)) if m else None


class Desk:
    """The reader's machine, on free ports."""

    def __init__(self, tmp: Path, redis_port: int) -> None:
        self.tmp = tmp
        self.hub_port = free_port()
        self.admin_port = free_port()
        self.app_port = free_port()
        self.redis_port = redis_port
        self.run_dir = tmp / "run"
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        real = shutil.which("redis-cli")
        assert real, "redis-cli is not installed (./dev installs redis-tools)"
        wrapper = bin_dir / "redis-cli"
        wrapper.write_text(f'#!/bin/sh\nexec {real} -p {redis_port} "$@"\n')
        wrapper.chmod(0o755)
        # curl shows no progress meter on a terminal; here its output is a file.
        (tmp / ".curlrc").write_text("no-progress-meter\n")
        self.configs: dict[str, Path] = {}
        for name in ["config/ssehub.yaml", *self._examples()]:
            self.configs[name] = self._copy(name)
        # ssehub itself (operations.md's commands) after everything else on the PATH.
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}:{venv_bin}",
            "SSEHUB_CONFIG": str(self.configs["config/ssehub.yaml"]),
            "DEV_RUN_DIR": str(self.run_dir),
            "TERM": "dumb",
            "CURL_HOME": str(tmp),
        }
        self.env.pop("SSEHUB_JWT_SECRET", None)
        self.env.pop("SSEHUB_PUBLISH_KEY", None)
        self.terminals: list[Terminal] = []

    @staticmethod
    def _examples() -> list[str]:
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "config/examples").glob("*.yaml"))

    def _copy(self, name: str) -> Path:
        text = (ROOT / name).read_text()
        for old, new in [
            ("port: 8080", f"port: {self.hub_port}"),
            ("port: 9090", f"port: {self.admin_port}"),
            (APP, f"127.0.0.1:{self.app_port}"),
            (REDIS_URL, f"redis://127.0.0.1:{self.redis_port}/0"),
        ]:
            text = text.replace(old, new)
        copy = self.tmp / name.replace("/", "_")
        copy.write_text(text)
        return copy

    def local(self, command: str) -> str:
        """The command as typed here: the docs' addresses and configs moved to the test's."""
        command = command.replace(HUB, f"127.0.0.1:{self.hub_port}")
        command = command.replace(ADMIN, f"127.0.0.1:{self.admin_port}")
        command = command.replace(APP_SCRIPT, f"{APP_SCRIPT} {self.app_port}")
        for name, copy in self.configs.items():
            command = command.replace(name, str(copy))
        return command

    def terminal(self) -> Terminal:
        term = Terminal(self, len(self.terminals))
        self.terminals.append(term)
        return term

    def wait_ready(self, timeout: float = 30) -> None:
        """Until the hub on the docs' port answers /readyz with 200."""
        deadline = time.monotonic() + timeout
        while http_status(self.hub_port, "/readyz") != 200:
            assert time.monotonic() < deadline, "the hub never got ready:\n" + self.screens()
            time.sleep(0.05)

    def wait_down(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while http_status(self.hub_port, "/healthz") is not None:
            assert time.monotonic() < deadline, "the hub is still up:\n" + self.screens()
            time.sleep(0.05)

    def screens(self) -> str:
        return "\n".join(f"--- terminal {t.index} ---\n{t.output()}" for t in self.terminals)

    def close(self) -> None:
        """End every terminal and what runs in it, then whatever ./dev run left."""
        for term in self.terminals:
            term.close()
        subprocess.run([str(ROOT / "dev"), "stop"], env=self.env, capture_output=True, timeout=30)


class Terminal:
    """One bash reading typed lines, its output (stdout and stderr) in a file."""

    def __init__(self, desk: Desk, index: int) -> None:
        self.desk = desk
        self.index = index
        self.path = desk.tmp / f"terminal-{index}.out"
        self._out = self.path.open("wb")
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=desk.env,
            start_new_session=True,  # its own process group: close() ends all it started
        )
        self._done = 0

    def output(self) -> str:
        return self.path.read_text(errors="replace")

    def type(self, command: str) -> None:
        """Type a line and press Enter, without waiting for it (a stream, a hub)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.desk.local(command).encode() + b"\n")
        self.proc.stdin.flush()

    def run(self, command: str, timeout: float = 60) -> str:
        """Type a line and wait for the prompt to come back; its output, exit status 0."""
        start = len(self.output())
        self.type(command)
        self._done += 1
        marker = f"__done_{self._done}__"
        assert self.proc.stdin is not None
        self.proc.stdin.write(f'echo "{marker} $?"\n'.encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while (m := re.search(rf"{marker} (\d+)\n", self.output()[start:])) is None:
            assert time.monotonic() < deadline, f"{command!r} did not end:\n{self.desk.screens()}"
            time.sleep(0.02)
        out = self.output()[start:][: m.start()]
        assert m.group(1) == "0", f"{command!r} exited {m.group(1)}:\n{out}"
        return out

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20) -> str:
        """Until the output matches ``pattern`` (a regex, multiline) ``count`` times."""
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.output(), re.M)) < count:
            assert time.monotonic() < deadline, (
                f"terminal {self.index}: no {pattern!r} (x{count}):\n{self.desk.screens()}"
            )
            time.sleep(0.02)
        return self.output()

    def close(self) -> None:
        """SIGTERM to everything it started (its process group), SIGKILL at a deadline."""
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            if self._gone(pgid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait
            while not self._gone(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.proc.wait(timeout=5)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self._out.close()

    def _gone(self, pgid: int) -> bool:
        self.proc.poll()  # reap bash, so that its zombie does not count as alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False
