"""Every long-lived task has an owner: an unexpected end is logged with its traceback,
turns ``/readyz`` 503 and ends the process non-zero -- never a silently dead task."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssehub.redis.pubsub import Broker
from ssehub.tasks import Tasks

from .conftest import StartHub
from .hubprocess import Node, alive
from .planted import plant
from .redis_server import RedisServer
from .sseclient import http_request, wait_until

# --- the owner ------------------------------------------------------------------------


async def test_a_task_that_raises_is_logged_with_its_traceback_and_fails_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[str] = []
    tasks = Tasks(lambda: failures.append("stop"))

    async def broken() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    tasks.spawn(broken(), "ssehub-broken")
    await wait_until(lambda: tasks.failed is not None, timeout=5)
    assert tasks.failed == "ssehub-broken"
    (record,) = [r for r in caplog.records if r.getMessage() == "task failed"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])
    assert record.fields == {"task": "ssehub-broken"}  # type: ignore[attr-defined]
    assert failures == ["stop"]
    await tasks.close()


async def test_a_task_meant_to_run_forever_that_returns_is_a_failure_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[str] = []
    tasks = Tasks(lambda: failures.append("stop"))

    async def quits() -> None:
        await asyncio.sleep(0)

    done = tasks.spawn(quits(), "ssehub-once", forever=False)  # may end: fine
    await done
    await asyncio.sleep(0)  # (the done callback runs one iteration later)
    assert tasks.failed is None
    tasks.spawn(quits(), "ssehub-forever")
    await wait_until(lambda: tasks.failed is not None, timeout=5)
    assert tasks.failed == "ssehub-forever"
    assert "task ended unexpectedly" in caplog.text
    # Only the first failure stops the process (once).
    tasks.spawn(quits(), "ssehub-second")
    await asyncio.sleep(0.01)
    assert failures == ["stop"] and tasks.failed == "ssehub-forever"


async def test_tasks_ending_while_the_process_stops_are_no_failure() -> None:
    tasks = Tasks()

    async def forever() -> None:
        await asyncio.Event().wait()

    async def returns_when_told(stop: asyncio.Event) -> None:
        await stop.wait()

    told = asyncio.Event()
    tasks.spawn(forever(), "ssehub-a")
    writer = tasks.spawn(returns_when_told(told), "ssehub-writer")
    tasks.stopping()
    told.set()
    await writer
    await tasks.close()
    assert tasks.failed is None


# --- a hub whose source dies ------------------------------------------------------------------


@pytest.fixture
def failing_broker(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The real Broker, whose run() raises once the returned event is set (while its
    state still says UP: what a bug in it looks like)."""
    fail = asyncio.Event()
    original = Broker.run

    async def run(self: Broker) -> None:
        inner = asyncio.ensure_future(original(self))
        try:
            await fail.wait()
        finally:
            inner.cancel()
        raise RuntimeError("planted failure")

    monkeypatch.setattr(Broker, "run", run)
    return fail


async def test_a_dead_source_turns_readiness_503_on_both_listeners(
    start_hub: StartHub, failing_broker: asyncio.Event, caplog: pytest.LogCaptureFixture
) -> None:
    hub = await start_hub(admin={"host": "127.0.0.1", "port": 0})
    for port in (hub.port, hub.admin_port):
        assert (await http_request(port, "/readyz"))[0] == 200
    failing_broker.set()

    async def unready() -> bool:
        return (await http_request(hub.port, "/readyz"))[0] == 503

    await wait_until(unready, timeout=5)
    assert hub.broker.ready  # the source's own state never noticed
    for port in (hub.port, hub.admin_port):
        status, _, body = await http_request(port, "/readyz")
        assert (status, body) == (503, b"not ready: ssehub-broker failed\n")
    assert "planted failure" in caplog.text and "Traceback" in caplog.text


# --- real processes ------------------------------------------------------------------------


def config_file(tmp_path: Path, redis_url: str, extra: str = "") -> Path:
    path = tmp_path / "hub.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: 0}}\nredis: {{url: '{redis_url}'}}\n"
        f"shutdown_timeout: 2\nchannels: {{chat: {{}}}}\n{extra}"
    )
    return path


def traceback_after(node: Node, line: str) -> str:
    """The indented traceback lines that follow the log line ``line``."""
    rest = "".join(node.lines).split(line, 1)[1].splitlines()[1:]
    return "\n".join(x for x in rest if x.startswith("    "))


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for n in started:
        n.stop()


def test_a_process_whose_source_dies_says_why_and_exits_non_zero(
    tmp_path: Path, redis_server: RedisServer, nodes: list[Node]
) -> None:
    env, trigger = plant(tmp_path, "broker")
    p = Node(config_file(tmp_path, redis_server.url), env, single=True)
    nodes.append(p)
    p.wait_for("INFO ssehub.server ready")
    trigger.write_text("*")
    assert p.proc.wait(timeout=15) == 1
    line = p.wait_for("task failed").string
    assert "ERROR" in line and "task=ssehub-broker" in line
    assert "RuntimeError: planted failure in Broker.run" in traceback_after(p, line)
    assert p.count("stopping: a task failed task=ssehub-broker") == 1
    assert "stopped" in p.lines[-1]


def test_a_worker_whose_task_dies_is_restarted_by_main(
    tmp_path: Path, redis_server: RedisServer, nodes: list[Node]
) -> None:
    env, trigger = plant(tmp_path, "replays")
    p = Node(config_file(tmp_path, redis_server.url, "workers: 2\nadmin: {port: 0}\n"), env)
    nodes.append(p)
    pid = p.worker_pids()[0]
    mark = len(p.lines)
    trigger.write_text(str(pid))
    exited = p.wait_for("worker exited worker=0", mark).string
    assert f"pid={pid} code=1 " in exited
    line = p.wait_for("task failed", mark).string
    assert "task=ssehub-streams" in line
    assert "planted failure in StreamReplays.run" in traceback_after(p, line)
    # Main goes on, with a fresh worker 0 (whose pid the trigger does not name).
    p.wait_for("worker ready worker=0", mark)
    assert p.proc.poll() is None and p.worker_pids()[0] != pid
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(timeout=15) == 0


def test_main_whose_source_dies_stops_the_node_and_exits_non_zero(
    tmp_path: Path, redis_server: RedisServer, nodes: list[Node]
) -> None:
    env, trigger = plant(tmp_path, "broker")
    p = Node(config_file(tmp_path, redis_server.url, "workers: 2\n"), env)
    nodes.append(p)
    p.wait_for(r"ready port=\d+ workers=2")
    workers = p.worker_pids()
    trigger.write_text(str(p.proc.pid))
    assert p.proc.wait(timeout=15) == 1
    line = p.wait_for("task failed").string
    assert "task=ssehub-broker" in line
    assert "planted failure in Broker.run" in traceback_after(p, line)
    assert not any(alive(pid) for pid in workers.values())  # stopped first, cleanly
