"""The deploy kit: systemd unit, nginx example, Dockerfile and compose file.

Each is checked with the real tool. ``./dev test`` provides systemd-analyze and
nginx (Debian's, unpacked into .tools/nginx), so their tests fail rather than skip
without them: CI must run them. The image test skips when no Docker engine answers,
and says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from ssehub.config import load

from .conftest import StartHub
from .redis_server import free_port
from .sseclient import SSEClient, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# --- systemd ----------------------------------------------------------------------


def test_systemd_unit_uses_notify_watchdog_and_sandbox() -> None:
    unit = unit_settings((DEPLOY / "ssehub.service").read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "mixed",
        "WatchdogSec": "30",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert int(unit["LimitNOFILE"][0]) >= 65536


def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed; `./dev test` installs it (package systemd)")
    ssehub = Path(sys.executable).parent / "ssehub"
    text = (
        (DEPLOY / "ssehub.service").read_text().replace("/opt/ssehub/venv/bin/ssehub", str(ssehub))
    )
    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "ssehub.service"
        unit.write_text(text)
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
    # Complaints about the unit itself name it; others (the host's units) are noise.
    problems = [line for line in result.stderr.splitlines() if "ssehub.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


# --- nginx ------------------------------------------------------------------------


# Where ./dev test unpacks Debian's nginx when the machine has none.
PROJECT_NGINX = ROOT / ".tools" / "nginx" / "usr" / "sbin" / "nginx"


def nginx_exe() -> str:
    for exe in [shutil.which("nginx"), "/usr/sbin/nginx", str(PROJECT_NGINX)]:
        if exe is not None and os.access(exe, os.X_OK):
            return exe
    pytest.fail("nginx is not installed; `./dev test` unpacks Debian's into .tools/nginx")


def nginx_prefix(prefix: Path, upstream: int, http: int, https: int) -> Path:
    """deploy/nginx.conf inside a generated main config, on loopback ports, own cert."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "1", "-keyout", str(prefix / "key.pem"), "-out", str(prefix / "cert.pem")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    site = (DEPLOY / "nginx.conf").read_text()
    for old, new in [
        ("/etc/ssl/certs/sse.example.com.pem", str(prefix / "cert.pem")),
        ("/etc/ssl/private/sse.example.com.key", str(prefix / "key.pem")),
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{http};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https} ssl http2;"),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    return nginx_main(prefix, site)


def nginx_main(prefix: Path, site: str) -> Path:
    """A main nginx.conf in ``prefix`` that includes ``site`` (a server block file)."""
    # Nothing listens beyond loopback in tests.
    site = "\n".join(line for line in site.splitlines() if "listen [::]" not in line)
    (prefix / "site.conf").write_text(site)
    tmp = prefix / "tmp"
    tmp.mkdir()
    main = prefix / "nginx.conf"
    main.write_text(
        f"pid {prefix}/nginx.pid;\nerror_log stderr;\nworker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n  access_log off;\n"
        + "".join(
            f"  {k}_temp_path {tmp};\n"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"  include {prefix}/site.conf;\n}}\n"
    )
    return main


def test_nginx_conf_is_valid(tmp_path: Path) -> None:
    exe = nginx_exe()
    main = nginx_prefix(tmp_path, free_port(), free_port(), free_port())
    result = subprocess.run(
        [exe, "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """Yields (prefix, https port, upstream port); the caller starts the hub on upstream."""
    upstream, http, https = free_port(), free_port(), free_port()
    with run_nginx(tmp_path, nginx_prefix(tmp_path, upstream, http, https)):
        yield tmp_path, https, upstream


@contextlib.contextmanager
def run_nginx(prefix: Path, main: Path) -> Iterator[None]:
    proc = subprocess.Popen(
        [nginx_exe(), "-p", str(prefix), "-c", str(main), "-e", "stderr", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield
    finally:
        proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_nginx_streams_location_serves_both_stream_endpoints() -> None:
    """The location with the stream settings (no buffering, long timeouts) must take
    /events as well as /channels/<name>: elsewhere nginx's defaults (a 60 s read
    timeout, caching, gzip) apply to a stream."""
    site = (DEPLOY / "nginx.conf").read_text()
    (pattern,) = re.findall(r"location ~ (\S+) \{[^}]*proxy_buffering off;", site)
    for path in ["/channels/chat", "/events"]:
        assert re.match(pattern, path), path
    assert not re.match(pattern, "/healthz")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/channels/chat", "/events?channel=chat"])
async def test_events_stream_through_nginx_unbuffered(
    nginx_in_front: tuple[Path, int, int],
    start_hub: StartHub,
    redis_client: aioredis.Redis,
    path: str,
) -> None:
    _, https, upstream = nginx_in_front
    hub = await start_hub(listen={"host": "127.0.0.1", "port": upstream})
    # A blocking TLS client in a thread: its close is synchronous, so no TLS shutdown
    # is left pending on the test's event loop (which serves the hub meanwhile).
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the test's own self-signed certificate
    conn = http.client.HTTPSConnection("127.0.0.1", https, context=tls, timeout=5)

    def open_stream() -> http.client.HTTPResponse:
        deadline = time.monotonic() + 10
        while True:  # nginx may still be starting
            try:
                conn.request("GET", path)
                return conn.getresponse()
            except ConnectionRefusedError:
                conn.close()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    try:
        resp = await asyncio.to_thread(open_stream)
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream; charset=utf-8"
        assert await asyncio.to_thread(resp.readline) == b"retry: 3000\n"
        await wait_until(lambda: len(hub.hub.channels["chat"]) == 1)
        # One small event, then silence: it arrives only if nginx does not buffer.
        await redis_client.publish("chat", "through the proxy")
        # /events names each event's channel.
        named = [b"event: chat\n"] if path.startswith("/events") else []
        lines = [await asyncio.to_thread(resp.readline) for _ in range(9 + len(named))]
        epoch = hub.hub.epoch.encode()
        assert lines[2].startswith(b"data: ")
        assert lines == [
            b"\n",
            b"event: ssehub-session\n",  # the stream's session id
            lines[2],
            b"\n",
            b"id: %s-0\n" % epoch,  # the stream's position marker
            b"\n",
            b"id: %s-1\n" % epoch,
            *named,
            b"data: through the proxy\n",
            b"\n",
        ]
    finally:
        conn.close()


def nginx_lb(prefix: Path, nodes: tuple[int, int], listen: int) -> Path:
    """deploy/nginx-lb.conf with the nodes on the given loopback ports."""
    site = (DEPLOY / "nginx-lb.conf").read_text()
    for old, new in [
        ("server 127.0.0.1:8081;", f"server 127.0.0.1:{nodes[0]};"),
        ("server 127.0.0.1:8082;", f"server 127.0.0.1:{nodes[1]};"),
        ("listen 8000;", f"listen 127.0.0.1:{listen};"),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    return nginx_main(prefix, site)


@pytest.mark.slow
async def test_a_stream_channel_resumes_exactly_on_another_node_behind_nginx(
    tmp_path: Path, start_hub: StartHub, redis_client: aioredis.Redis
) -> None:
    """Two nodes behind deploy/nginx-lb.conf; the node serving a browser stops; its
    reconnect, through nginx with its Last-Event-ID, reaches the other node and gets
    exactly what it missed."""
    nodes = (free_port(), free_port())
    listen = free_port()
    channels = {"orders": {"stream": "lb:orders"}}
    hubs = [
        await start_hub(channels, listen={"host": "127.0.0.1", "port": port}, wait_ready=False)
        for port in nodes
    ]
    await wait_until(lambda: all(h.ready for h in hubs), timeout=10)
    with run_nginx(tmp_path, nginx_lb(tmp_path, nodes, listen)):
        deadline = time.monotonic() + 10
        while True:  # nginx may still be starting
            try:
                first = await SSEClient.connect(listen, "/channels/orders")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "nginx did not start"
                await asyncio.sleep(0.05)
        try:
            assert first.status == 200
            await first.read_until(lambda c: c.parser.last_id)
            sent = [(await redis_client.xadd("lb:orders", {"data": "one"})).decode()]
            await first.next_events(1)
            serving = next(h for h in hubs if h.hub.connections == 1)
            other = next(h for h in hubs if h is not serving)
            await serving.stop()  # a deploy: streams end cleanly, the node goes away
            # nginx ends the body with its last chunk and keeps the connection.
            await first.read_until(lambda c: c.ended_cleanly)
            last_id = first.events[-1].id
            sent += [
                (await redis_client.xadd("lb:orders", {"data": f"moved {i}"})).decode()
                for i in range(3)
            ]
        finally:
            await first.close()
        back = await SSEClient.connect(listen, "/channels/orders", {"Last-Event-ID": last_id})
        try:
            assert back.status == 200
            await wait_until(lambda: other.hub.connections == 1)
            sent.append((await redis_client.xadd("lb:orders", {"data": "live"})).decode())
            events = await back.next_events(4)
            assert [e.id for e in events] == sent[1:]
            assert [e.data for e in events] == ["moved 0", "moved 1", "moved 2", "live"]
        finally:
            await back.close()


# --- containers -----------------------------------------------------------------


def healthcheck_command() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])\s*$", text, re.M)
    assert match, "no exec-form HEALTHCHECK in deploy/Dockerfile"
    command: list[str] = json.loads(match.group(1))
    return command


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^USER ssehub$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["ssehub"\]$', text, re.M)
    assert "ENV SSEHUB_CONFIG=/etc/ssehub/ssehub.yaml" in text
    assert "/readyz" in text


async def test_dockerfile_healthcheck_follows_readiness(
    start_hub: StartHub, dead_redis_url: str
) -> None:
    """The image's exact HEALTHCHECK command, run here: 0 when ready, 1 when not."""
    command = healthcheck_command()
    assert command[0] == "python"
    ready = await start_hub()
    not_ready = await start_hub(redis_url=dead_redis_url, wait_ready=False)

    async def check(port: int) -> int:
        env = {**os.environ, "SSEHUB_HEALTH_URL": f"http://127.0.0.1:{port}/readyz"}
        # In a thread, so the hubs on this loop can answer it.
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, *command[1:]], env=env, timeout=30
        )
        return result.returncode

    assert await check(ready.port) == 0
    assert await check(not_ready.port) == 1
    assert await check(free_port()) == 1  # nothing listening


def test_compose_runs_the_image_next_to_redis_with_a_valid_config() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"ssehub", "redis"}
    hub = services["ssehub"]
    assert hub["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert hub["depends_on"]["redis"]["condition"] == "service_healthy"
    (mount,) = hub["volumes"]
    source, target, mode = mount.split(":")
    assert (target, mode) == ("/etc/ssehub/ssehub.yaml", "ro")
    config = load(DEPLOY / source)
    assert config.redis.url == "redis://redis:6379/0"
    assert config.listen.port == 8080
    assert all(p.startswith("127.0.0.1:") for p in hub["ports"])


def docker_or_skip() -> str:
    exe = shutil.which("docker")
    if exe is None:
        pytest.skip("no Docker engine: the `docker` command is not installed")
    try:
        info = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine answers `docker info`: no answer within 60 s")
    if info.returncode != 0:
        said = " ".join(info.stderr.split()) or f"exit status {info.returncode}, nothing on stderr"
        pytest.skip(f"no Docker engine answers `docker info`, which said: {said}")
    return exe


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_image_delivers_a_published_message(tmp_path: Path) -> None:
    docker = docker_or_skip()
    tag = f"ssehub-test:{os.getpid()}"
    net = f"ssehub-test-{os.getpid()}"

    def run(*args: str, timeout: float = 600) -> str:
        result = subprocess.run(
            [docker, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
        return result.stdout.strip()

    config = tmp_path / "ssehub.yaml"
    config.write_text(
        "listen: {host: 0.0.0.0, port: 8080}\n"
        f"redis: {{url: 'redis://{net}-redis:6379/0'}}\nchannels: {{chat: {{}}}}\n"
    )
    config.chmod(0o644)
    run("build", "-f", "deploy/Dockerfile", "-t", tag, ".")
    run("network", "create", net)
    try:
        run("run", "-d", "--rm", "--network", net, "--name", f"{net}-redis", "redis:7-alpine")
        run(
            "run", "-d", "--rm", "--network", net, "--name", f"{net}-hub",
            "-v", f"{config}:/etc/ssehub/ssehub.yaml:ro", "-p", "127.0.0.1::8080", tag,
        )  # fmt: skip
        port = int(run("port", f"{net}-hub", "8080/tcp").splitlines()[0].rsplit(":", 1)[1])

        async def healthy() -> bool:
            state = await asyncio.to_thread(
                run, "inspect", "-f", "{{.State.Health.Status}}", f"{net}-hub"
            )
            return state == "healthy"

        await wait_until(healthy, timeout=90, interval=1)
        client = await SSEClient.connect(port, "/channels/chat")
        try:
            await client.read_until(lambda c: c.parser.retry is not None)
            await asyncio.to_thread(
                run, "exec", f"{net}-redis", "redis-cli", "PUBLISH", "chat", "from redis"
            )
            events = await client.next_events(1, timeout=10)
            assert events[0].data == "from redis"
        finally:
            await client.close()
    finally:
        cleanup = [["rm", "-f", f"{net}-hub", f"{net}-redis"], ["network", "rm", net]]
        for args in cleanup:
            await asyncio.to_thread(
                subprocess.run, [docker, *args], capture_output=True, timeout=60
            )
