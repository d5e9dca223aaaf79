"""The server's listeners: a port that cannot be taken is named in the error."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def taken() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("where", "extra"),
    [
        ("listen", ""),
        ("listen", "workers: 2\n"),  # the workers' main binds the port first
        ("admin", ""),
    ],
)
def test_a_port_in_use_is_named_in_the_start_up_error(
    tmp_path: Path, taken: int, where: str, extra: str
) -> None:
    config = tmp_path / "hub.yaml"
    listen = taken if where == "listen" else 0
    admin = f"admin: {{host: 127.0.0.1, port: {taken}}}\n" if where == "admin" else ""
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {listen}}}\n{admin}{extra}channels: {{chat: {{}}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "ssehub", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    (line,) = [x for x in result.stderr.splitlines() if "cannot start" in x]
    assert f"cannot listen on 127.0.0.1:{taken}: Address already in use" in line, line
