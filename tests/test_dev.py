"""The ./dev helpers a newcomer meets: `./dev ssehub` and `./dev stop`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .hubprocess import alive
from .redis_server import RedisServer, free_port
from .terminal import ROOT, http_status

DEV = str(ROOT / "dev")


def dev(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DEV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_dev_ssehub_runs_the_venv_command_from_the_caller_s_directory(tmp_path: Path) -> None:
    (tmp_path / "hub.yaml").write_text("channels: {chat: {}}\n")
    result = dev("ssehub", "--config", "hub.yaml", "--check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hub.yaml: ok (1 channel, ")
    (tmp_path / "bad.yaml").write_text("channels: {chat: {history: -3}}\n")
    result = dev("ssehub", "--config", "bad.yaml", "--check", cwd=tmp_path)
    assert result.returncode == 2  # ssehub's own exit code comes through
    assert "channels.chat.history" in result.stderr


@pytest.mark.slow
def test_dev_stop_stops_what_dev_run_started_and_nothing_else(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    hub_port, redis_port = free_port(), free_port()
    config = tmp_path / "hub.yaml"
    config.write_text(
        f"listen: {{port: {hub_port}}}\n"
        f"redis: {{url: 'redis://127.0.0.1:{redis_port}/0'}}\n"
        "channels: {chat: {}}\n"
    )
    run_dir = tmp_path / "run"
    env = {**os.environ, "DEV_RUN_DIR": str(run_dir)}
    # Something that is not ours, under a pid file of ours: left alone.
    other = subprocess.Popen(["sleep", "60"])
    hub = subprocess.Popen(
        [DEV, "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while http_status(hub_port, "/readyz") != 200:  # its own redis-server, started
            assert hub.poll() is None and time.monotonic() < deadline, "./dev run never got ready"
            time.sleep(0.05)
        assert int((run_dir / "ssehub.pid").read_text()) == hub.pid  # exec kept the pid
        redis_pid = int((run_dir / "redis.pid").read_text())
        assert alive(redis_pid)

        result = dev("stop", env=env)
        assert result.returncode == 0, result.stderr
        assert f"stopping the hub (pid {hub.pid})" in result.stderr
        assert f"stopping redis-server (pid {redis_pid})" in result.stderr
        assert hub.wait(timeout=5) == 0  # SIGTERM: a clean stop
        assert not alive(redis_pid)
        assert redis_server.proc is not None and redis_server.proc.poll() is None  # not ours

        (run_dir / "ssehub.pid").write_text(f"{other.pid}\n")
        (run_dir / "redis.pid").write_text(f"{other.pid}\n")
        result = dev("stop", env=env)
        assert result.returncode == 0
        assert "nothing to stop" in result.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        if hub.poll() is None:
            hub.kill()
            hub.wait()
        dev("stop", env=env)  # whatever is left
