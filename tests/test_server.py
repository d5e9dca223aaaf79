"""The server's listeners: a port that cannot be taken is named in the error, and the
kernel's accept queue is the configured backlog."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from ssehub.config import ConfigError, Listen, load
from ssehub.logs import TextFormatter

from .conftest import StartHub


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


def kernel_backlog(sock: socket.socket) -> int:
    """The accept queue's bound Linux gives a listening socket (``tcp_info.tcpi_sacked``
    holds it for sockets in LISTEN)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 28)[0])


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


async def test_listen_backlog_is_the_accept_queue_and_a_kernel_cap_is_logged(
    start_hub: StartHub, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(listen={"host": "127.0.0.1", "port": 0, "backlog": 64})
    (site,) = hub._runner.sites
    assert isinstance(site, web.SockSite)
    assert kernel_backlog(site._sock) == 64
    assert "capped by the kernel" not in caplog.text
    over = somaxconn() + 1
    hub = await start_hub(listen={"host": "127.0.0.1", "port": 0, "backlog": over})
    (site,) = hub._runner.sites
    assert isinstance(site, web.SockSite)
    assert kernel_backlog(site._sock) == over - 1
    (record,) = [r for r in caplog.records if "capped by the kernel" in r.getMessage()]
    assert record.levelname == "WARNING"
    line = TextFormatter().format(record)
    assert f"backlog={over}" in line and f"somaxconn={over - 1}" in line, line


def test_the_command_lines_port_keeps_the_configured_backlog(tmp_path: Path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text("listen: {backlog: 100}\nchannels: {chat: {}}\n")
    assert load(config).with_listen(port=0).listen == Listen("127.0.0.1", 0, 100)
    with pytest.raises(ConfigError, match=r"listen\.backlog: expected a positive number, got 0"):
        config.write_text("listen: {backlog: 0}\nchannels: {chat: {}}\n")
        load(config)
