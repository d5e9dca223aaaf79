"""Log formats: json lines parse and carry stable fields; --log-level overrides the config."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ssehub.config import ConfigError, LoggingConfig, parse
from ssehub.logs import _log_response, fields, setup

from .conftest import StartHub
from .redis_server import RedisServer
from .test_cli import Daemon, get


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("ssehub.access").setLevel(logging.NOTSET)


def test_json_lines_carry_stable_fields(restore_root_logging: None) -> None:
    out = io.StringIO()
    setup(LoggingConfig(format="json", level="DEBUG"), stream=out)
    log = logging.getLogger("ssehub.hub.hub")
    log.warning(
        "message rejected", extra=fields(channel="chat", reason="too_large", detail="9 > 8")
    )
    log.debug('quote "inside" é')
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("delivery failed", extra=fields(channel="chat"))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    first = lines[0]
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert first["level"] == "WARNING"
    assert first["logger"] == "ssehub.hub.hub"
    assert first["msg"] == "message rejected"
    assert (first["channel"], first["reason"], first["detail"]) == ("chat", "too_large", "9 > 8")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert lines[1]["msg"] == 'quote "inside" é'
    assert "ValueError: boom" in lines[2]["exc"]


def test_level_argument_overrides_config(restore_root_logging: None) -> None:
    out = io.StringIO()
    setup(LoggingConfig(level="ERROR"), level="debug", stream=out)
    logging.getLogger("ssehub").debug("shown")
    assert "DEBUG ssehub shown" in out.getvalue()


def test_logging_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"logging\.format: expected one of text, json"):
        parse({"channels": {"a": {}}, "logging": {"format": "xml"}})
    with pytest.raises(ConfigError, match=r"logging\.level"):
        parse({"channels": {"a": {}}, "logging": {"level": "LOUD"}})


def read_json_lines(daemon: Daemon, until: str, timeout: float = 15) -> list[Any]:
    """Parse stderr lines (each must be JSON) until one whose msg is ``until``."""
    out: list[Any] = []
    for line in daemon.lines(timeout):
        out.append(json.loads(line))
        if out[-1]["msg"] == until:
            return out
    end = "stderr ended" if daemon.ended else f"{timeout}s passed"
    raise AssertionError(f"{end} before a {until!r} line: {out}")


def test_daemon_logs_json_lines(tmp_path: Path, redis_server: RedisServer) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(
        f"redis: {{url: '{redis_server.url}'}}\nchannels: {{chat: {{}}}}\n"
        "logging: {format: json, access_log: true}\n"
    )
    daemon = Daemon(config, "--port", "0")
    try:
        lines = read_json_lines(daemon, "ready")
        listening = next(line for line in lines if line["msg"] == "listening")
        port = listening["port"]
        assert isinstance(port, int)
        assert get(port, "/healthz?x=1").startswith(b"HTTP/1.0 200")
        access = read_json_lines(daemon, "request")[-1]
        assert access["logger"] == "ssehub.access"
        assert (access["method"], access["path"], access["status"]) == ("GET", "/healthz?x=1", 200)
        assert access["remote"] == "127.0.0.1"
        # A stream is logged when it opens, even though it never returns normally.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /channels/chat HTTP/1.1\r\nHost: x\r\nUser-Agent: test agent\r\n\r\n")
            access = read_json_lines(daemon, "request")[-1]
        assert (access["path"], access["status"], access["agent"]) == (
            "/channels/chat",
            200,
            "test agent",
        )

        with redis.Redis.from_url(redis_server.url) as r:
            r.publish("chat", b"\xff")
        rejected = read_json_lines(daemon, "message rejected")[-1]
        assert rejected["level"] == "WARNING"
        assert (rejected["channel"], rejected["reason"]) == ("chat", "invalid_utf8")

        daemon.send_signal(signal.SIGTERM)
        assert read_json_lines(daemon, "stopped")
        assert daemon.wait(timeout=15) == 0
    finally:
        daemon.reap()


async def test_access_log_is_off_unless_configured(start_hub: StartHub) -> None:
    quiet = await start_hub()
    loud = await start_hub(logging={"access_log": True})
    assert _log_response not in quiet.app.on_response_prepare
    assert _log_response in loud.app.on_response_prepare
