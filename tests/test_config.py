"""Config loading: every error names the file, the key path and the reason."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssehub.config import (
    AuthConfig,
    ChannelConfig,
    ConfigError,
    Limits,
    MetaConfig,
    PresenceConfig,
    load,
)
from ssehub.core.messages import MAX_ID_LENGTH
from ssehub.http.app import MAX_SHOWN
from ssehub.hub.resume import MAX_STREAMS_PER_EVENTS
from ssehub.logs import MAX_VALUE
from ssehub.server import HubServer

from .logcheck import records_with
from .redis_server import RedisServer
from .sseclient import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "ssehub.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message[len(str(path)) + 2 :]


def test_example_config_loads() -> None:
    config = load(EXAMPLE)
    assert config.listen.port == 8080
    assert "chat" in config.channels
    assert config.source == str(EXAMPLE)


def test_defaults_and_redis_channel_mapping(tmp_path: Path) -> None:
    config = load(write(tmp_path, "channels:\n  chat: {}\n  news: {redis_channel: 'site:news'}\n"))
    assert config.channels["chat"].redis_channel == "chat"
    assert config.channels["news"].redis_channel == "site:news"
    assert config.channels["news"].name == "news"
    assert config.heartbeat == 15.0
    assert config.listen.host == "127.0.0.1"
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_empty_channel_value_is_allowed(tmp_path: Path) -> None:
    config = load(write(tmp_path, "channels:\n  chat:\n"))
    assert config.channels["chat"].redis_channel == "chat"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load(path)


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    assert error_of(tmp_path, "channels: {chat: [\n").startswith("invalid YAML at line")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels: {chat: {}}\nheartbeet: 3\n")
    assert msg.startswith("heartbeet: unknown key")


def test_unknown_nested_key(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels:\n  chat: {histroy: 3}\n")
    assert msg.startswith("channels.chat.histroy: unknown key")


def test_wrong_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels: {chat: {}}\nlisten: {port: 'eighty'}\n")
    assert msg == "listen.port: expected an integer, got str 'eighty'"


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels: {chat: {}}\nheartbeat: true\n")
    assert msg == "heartbeat: expected a number, got boolean True"


def test_non_positive_heartbeat(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels: {chat: {}}\nheartbeat: -3\n")
    assert msg == "heartbeat: expected a positive number, got -3.0"


@pytest.mark.parametrize("name", ["a b", "a/b", "caf\u00e9", "x?y", "%2F"])
def test_channel_names_must_be_url_safe(tmp_path: Path, name: str) -> None:
    msg = error_of(tmp_path, f"channels:\n  '{name}': {{}}\n")
    assert msg.startswith(f"channels.{name}: channel name {name!r} is not URL-safe")


def test_channels_required_and_non_empty(tmp_path: Path) -> None:
    assert error_of(tmp_path, "heartbeat: 5\n") == "channels: required key is missing"
    assert error_of(tmp_path, "channels: {}\n") == "channels: must not be empty"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert error_of(tmp_path, "- a\n- b\n") == "(top level): expected a mapping, got a list"


def test_bad_redis_url(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "channels: {chat: {}}\nredis: {url: 'http://x'}\n")
    assert msg.startswith("redis.url: expected a redis://")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ssehub", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_check_accepts_the_example_config() -> None:
    result = run_cli("--config", str(EXAMPLE), "--check")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


async def test_check_and_the_running_hub_count_channels_alike(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The example lists 4 channels and the family user.*: --check said "5 channels,
    # 1 workers" where the hub logged channels=4.
    result = run_cli("--config", str(EXAMPLE), "--check")
    assert result.stdout == f"{EXAMPLE}: ok (4 channels, 1 family, 1 worker)\n"
    config = load(EXAMPLE).with_listen(port=0)
    config = dataclasses.replace(
        config, redis=dataclasses.replace(config.redis, url=redis_server.url)
    )
    caplog.set_level(logging.INFO, logger="ssehub.server")
    server = HubServer(config)
    await server.start()
    try:
        await wait_until(lambda: records_with(caplog, "ready"), timeout=10)
    finally:
        await server.stop()
    (ready,) = records_with(caplog, "ready")
    assert (ready["channels"], ready["families"]) == (4, 1)
    assert load(EXAMPLE).counts() == {"channels": 4, "families": 1}


def test_check_says_one_of_each_in_the_singular(tmp_path: Path) -> None:
    path = write(tmp_path, "channels:\n  chat: {}\nworkers: 2\n")
    assert run_cli("--config", str(path), "--check").stdout == (
        f"{path}: ok (1 channel, 0 families, 2 workers)\n"
    )


def test_check_rejects_with_exit_2_and_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "channels:\n  news: {redis_channel: 5}\n")
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"ssehub: {path}: channels.news.redis_channel: expected a string, got int 5"]


def test_config_path_from_environment(tmp_path: Path) -> None:
    import os

    path = write(tmp_path, "channels: {chat: {}}\nlisten: {port: 99999}\n")
    result = run_cli("--check", env={**os.environ, "SSEHUB_CONFIG": str(path)})
    assert result.returncode == 2
    assert "listen.port: expected a port number 0-65535, got 99999" in result.stderr


def _security_rows() -> dict[str, str]:
    """The bounds table of the security section (README, or docs/ once it lives there):
    the first column's key -> the default column."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    for page in pages:
        if not page.exists():
            continue
        text = page.read_text(encoding="utf-8")
        match = re.search(r"^#+ Security\n(.*?)(?=^#+ |\Z)", text, re.M | re.S)
        if match:
            rows = re.findall(r"^\| (.+?) \| (.+?) \|", match.group(1), re.M)
            return {key.replace("`", ""): default for key, default in rows}
    raise AssertionError("no Security section")


def _shown_default(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_the_security_section_lists_each_bound_with_its_default() -> None:
    rows = {k: v.replace(",", "") for k, v in _security_rows().items()}
    wanted: dict[str, object] = {f"limits.{f.name}": f.default for f in dataclasses.fields(Limits)}
    channel, meta, presence, auth = ChannelConfig(), MetaConfig(), PresenceConfig(), AuthConfig()
    wanted.update(
        {
            "channels.<name>.history": channel.history,
            "channels.<name>.history_bytes": channel.history_bytes,
            "meta.max_bytes": meta.max_bytes,
            "presence.max_page": presence.max_page,
            "auth.cache_size": auth.cache_size,
            "auth.require_exp": auth.require_exp,
            "auth.leeway": auth.leeway,
            "Last-Event-ID": MAX_ID_LENGTH,
            "stream channels per /events": MAX_STREAMS_PER_EVENTS,
            "logged value": MAX_VALUE,
            "echoed name": MAX_SHOWN,
        }
    )
    for key, default in wanted.items():
        assert key in rows, f"{key} is not in the security section"
        assert rows[key] == _shown_default(default), (key, rows[key], default)
