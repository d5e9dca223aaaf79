"""Every combination: topology x process model x channel kind, with events and presence on.

Topologies: one Redis, Sentinel, a 3-master Cluster (each started once per session,
tests/topologies.py). Process models: a single process and ``workers: 2``, each a real
``ssehub`` process (tests/hubprocess.py) with its own config file. Channel kinds: pub/sub
(``pub``), a stream (``log``) and a family of streams (``fam.*``, member ``fam.7``), all
with presence, served by one hub per (topology, process model).

Each cell checks that a publish reaches subscribers on every worker (500 messages, in
order, none lost), that a resume with ``Last-Event-ID`` is exact (streams keep 2 entries
in memory: older ones come from Redis), that presence and the subscribe/unsubscribe
events follow a stream, and that a failover (the master killed) loses nothing on stream
channels and signals a ``redis_outage`` gap on pub/sub. The failover runs once per
topology, both process models watching it, after every other test of this module.

Cells that fail on main because of known defects are strict xfails naming the defect:
when the fix lands they pass, fail as XPASS, and their mark must go.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from ssehub.hub.resume import GAP_EVENT

from .hubprocess import WORKERS, Node
from .sseclient import Event, SSEClient, http_request, open_stream, wait_until
from .test_metrics import one, scrape
from .topologies import Topology

pytestmark = pytest.mark.slow

TOPOLOGIES = ("one", "sentinel", "cluster")
MODELS = ("single", "workers")
KINDS = ("pubsub", "stream", "family")

# Every key and channel of the matrix shares one hash tag: in a cluster they all live on
# one master, the one the failover kills.
TAG = "{mx}"
FAILOVER_KEY = f"{TAG}:failover"
MESSAGES = 500  # per publish check: more than a worker's every-100th could hide
PUBLISH_KEY = "matrix-publish-key-0123456789"  # POST /publish and POST /disconnect


# Cells that fail because of a known defect, and why (none now: issue 19's defect 4,
# Cluster with workers and Cluster presence, is fixed by the Redis layer's factory).
def known_defect(check: str, topology: str, model: str, kind: str) -> str | None:
    """Why a cell fails on main today (None: it must pass)."""
    return None


def cells(check: str) -> list[Any]:
    out = []
    for topology, model, kind in product(TOPOLOGIES, MODELS, KINDS):
        reason = known_defect(check, topology, model, kind)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(
            pytest.param(topology, model, kind, id=f"{topology}-{model}-{kind}", marks=marks)
        )
    return out


# --- one hub per (topology, process model) ------------------------------------------


@dataclass
class Hub:
    """A running hub of the matrix and what its channels are called."""

    topology: Topology
    model: str
    node: Node

    @property
    def workers(self) -> int:
        return WORKERS if self.model == "workers" else 0

    def name(self, kind: str) -> str:
        """The hub channel of ``kind`` (a family's: its member ``fam.7``)."""
        return {"pubsub": "pub", "stream": "log", "family": "fam.7"}[kind]

    def upstream(self, kind: str) -> str:
        """The Redis channel or stream key feeding ``kind``."""
        return f"{TAG}:{self.model}:" + {"pubsub": "pub", "stream": "log", "family": "fam:7"}[kind]

    def send(self, kind: str, data: list[str], replicated: bool = False) -> list[str]:
        """Publish (pub/sub) or XADD (streams) ``data``; the entry ids ([] for pub/sub)."""
        if kind == "pubsub":
            self.topology.publish(self.upstream(kind), data)
            return []
        return self.topology.xadd(self.upstream(kind), data, replicated)


def config(topology: Topology, model: str) -> dict[str, Any]:
    prefix = f"{TAG}:{model}"
    presence = {"presence": True}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "redis": topology.redis_config(),
        **({"workers": WORKERS} if model == "workers" else {}),
        "shutdown_timeout": 2,
        "events": {"enabled": True},
        "presence": {"ttl": 5},
        "channels": {
            "pub": {"redis_channel": f"{prefix}:pub", **presence},
            "log": {"stream": f"{prefix}:log", "history": 2, **presence},
            "fam.*": {"stream": f"{prefix}:fam:*", "history": 2, **presence},
        },
    }


def readyz(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Hubs:
    """Hubs started on first use and kept for the session, each once; a start that failed
    is not tried again (its error is raised for every cell that needs it)."""

    dir: Path
    running: dict[tuple[str, str], Hub] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)  # every node started, to stop them all

    def get(self, topology: Topology, model: str) -> Hub:
        cell = (topology.name, model)
        if cell in self.failed:
            raise AssertionError(self.failed[cell])
        if cell in self.running:
            return self.running[cell]
        # A second start of the same hub would leak the first one's processes.
        assert not any(n.config.name == f"{topology.name}-{model}.yaml" for n in self.nodes)
        path = self.dir / f"{topology.name}-{model}.yaml"
        key_file = self.dir / "publish-key"
        key_file.write_text(PUBLISH_KEY)
        settings = {**config(topology, model), "publish": {"key_file": str(key_file)}}
        path.write_text(json.dumps(settings))  # YAML is a superset of JSON
        try:
            node = Node(path, single=model == "single")
            self.nodes.append(node)
            deadline = time.monotonic() + 15
            while not readyz(node.admin_port):
                assert node.proc.poll() is None, "".join(node.lines)
                assert time.monotonic() < deadline, "not ready:\n" + "".join(node.lines[-30:])
                time.sleep(0.05)
        except BaseException as exc:
            if self.nodes and self.nodes[-1].config == path:
                self.nodes[-1].stop()  # (a Node that failed to start stopped itself)
            self.failed[cell] = f"the {model} hub on {topology.name} did not start: {exc}"
            raise
        self.running[cell] = Hub(topology, model, node)
        return self.running[cell]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="module")
def hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hubs]:
    started = Hubs(tmp_path_factory.mktemp("matrix"))
    yield started
    started.stop()


def topology_of(request: pytest.FixtureRequest, name: str) -> Topology:
    """The session's topology ``name`` (started on first use)."""
    topology: Topology = request.getfixturevalue(f"{name}_topology")
    return topology


@pytest.fixture
async def hub(request: pytest.FixtureRequest, hubs: Hubs) -> AsyncIterator[Hub]:
    """The cell's hub, with no stream left open by an earlier cell."""
    topology_name, model = (
        request.node.callspec.params["topology"],
        request.node.callspec.params["model"],
    )
    topology = topology_of(request, topology_name)
    started = await asyncio.to_thread(hubs.get, topology, model)

    async def idle() -> bool:
        return one(await scrape(started.node.admin_port), "ssehub_connections") == 0

    await wait_until(idle, timeout=10, interval=0.05)
    yield started
    assert started.node.proc.poll() is None, "".join(started.node.lines[-30:])


async def on_every_worker(
    hub: Hub, clients: list[SSEClient], path: str, last_id: str | None = None
) -> list[SSEClient]:
    """Streams of ``path``, at least one on each worker (one stream for a single process).

    ``clients``: every stream the test holds open on this hub (the new ones are added).
    """
    new = [await open_stream(hub.node.port, path, last_id)]
    clients.extend(new)
    if not hub.workers:
        return new
    for _ in range(8):
        batch = [await open_stream(hub.node.port, path, last_id) for _ in range(3)]
        clients.extend(batch)
        new.extend(batch)
        per = await per_worker(hub, len(clients))
        if all(per):
            return new
    raise AssertionError(f"{len(new)} streams and still a worker without one: {per}")


async def per_worker(hub: Hub, total: int) -> list[float]:
    """The streams each worker holds, once the node counts ``total`` in all."""
    per: list[float] = []

    async def settled() -> bool:
        m = await scrape(hub.node.admin_port)
        per[:] = [one(m, "ssehub_worker_connections", worker=str(i)) for i in range(WORKERS)]
        return sum(per) == total

    await wait_until(settled, timeout=10, interval=0.05)
    return per


def gaps(client: SSEClient) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in client.events if e.event == GAP_EVENT]


def messages(client: SSEClient) -> list[Event]:
    return [e for e in client.events if e.event != GAP_EVENT]


def check_delivery(kind: str, events: list[Event], data: list[str], ids: list[str]) -> None:
    """``events`` are exactly ``data``, in order; with the entry ids on streams, and
    increasing hub ids on pub/sub."""
    assert [e.data for e in events] == data
    if kind == "pubsub":
        assert all(e.id for e in events)
    else:
        assert [e.id for e in events] == ids


# --- the checks ------------------------------------------------------------------------


@pytest.mark.parametrize(("topology", "model", "kind"), cells("publish"))
async def test_a_publish_reaches_a_subscriber_on_every_worker(
    hub: Hub, clients: list[SSEClient], topology: str, model: str, kind: str
) -> None:
    streams = await on_every_worker(hub, clients, f"/channels/{hub.name(kind)}")
    data = [f"{kind} {i}" for i in range(MESSAGES)]
    ids = await asyncio.to_thread(hub.send, kind, data)
    seen: list[list[tuple[str, str]]] = []
    for c in streams:
        await c.next_events(MESSAGES, timeout=15)
        check_delivery(kind, c.events, data, ids)
        seen.append([(e.id, e.data) for e in c.events])
    # One numbering for the node: every worker sent the same ids.
    assert all(s == seen[0] for s in seen)


@pytest.mark.parametrize(("topology", "model", "kind"), cells("control"))
async def test_publish_over_http_and_a_disconnect_reach_every_worker(
    hub: Hub, clients: list[SSEClient], topology: str, model: str, kind: str
) -> None:
    """POST /publish (idempotent: sent twice, delivered once) through the topology's
    Redis in the channel's kind (PUBLISH, or XADD for streams), then a disconnect of
    the channel through the control channel: every worker's streams end with it."""
    name = hub.name(kind)
    streams = await on_every_worker(hub, clients, f"/channels/{name}")
    body = json.dumps({"channel": name, "data": "over http"}).encode()
    key = f"mx-{topology}-{model}-{kind}-{time.time_ns()}"
    headers = {"Authorization": f"Bearer {PUBLISH_KEY}", "Idempotency-Key": key}
    answers = [
        await asyncio.to_thread(post, hub.node.admin_port, "/publish", body, headers)
        for _ in range(2)
    ]
    assert answers[0][0] == 200 and answers[1] == answers[0], answers
    if kind != "pubsub":
        assert json.loads(answers[0][1])["id"]  # the entry id
    disconnect = json.dumps({"disconnect": {"channel": name, "reason": kind}}).encode()
    status, _ = await asyncio.to_thread(
        post, hub.node.admin_port, "/disconnect", disconnect, headers
    )
    assert status == 200
    for c in streams:
        await c.read_to_eof(timeout=10)
        assert [e.data for e in messages(c) if e.event != "ssehub-disconnect"] == ["over http"]
        assert json.loads(c.events[-1].data) == {"reason": kind, "reconnect": True}


def post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("topology", "model", "kind"), cells("resume"))
async def test_a_resume_is_exact_on_every_worker(
    hub: Hub, clients: list[SSEClient], topology: str, model: str, kind: str
) -> None:
    path = f"/channels/{hub.name(kind)}"
    first = await open_stream(hub.node.port, path)
    clients.append(first)
    data = [f"r{i}" for i in range(5)]
    await asyncio.to_thread(hub.send, kind, data)
    seen = await first.next_events(5)
    # From the first event: 4 to replay (on streams, 2 from Redis and 2 from memory).
    resumed = await on_every_worker(hub, clients, path, last_id=seen[0].id)
    for c in resumed:
        await c.next_events(4)
        assert [(e.id, e.data) for e in c.events] == [(e.id, e.data) for e in seen[1:]]
        assert not gaps(c)
    ids = await asyncio.to_thread(hub.send, kind, ["live"])
    await first.next_events(6)
    want = [(e.id, e.data) for e in first.events]
    assert want[-1][1] == "live" and (kind == "pubsub" or want[-1][0] == ids[0])
    for c in resumed:
        await c.next_events(5)
        assert [(e.id, e.data) for e in c.events] == want[1:]


@contextlib.asynccontextmanager
async def heard_events(topology: Topology) -> AsyncIterator[list[dict[str, Any]]]:
    """The JSON messages published on ``ssehub:events`` while the block runs."""
    port = await asyncio.to_thread(topology.listen_port)
    client = aioredis.Redis(port=port)
    pubsub = client.pubsub()
    await pubsub.subscribe("ssehub:events")
    got: list[dict[str, Any]] = []

    async def run() -> None:
        async for m in pubsub.listen():
            if m["type"] == "message":
                got.append(json.loads(m["data"]))

    task = asyncio.create_task(run())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()
        await client.aclose()


async def members(hub: Hub, channel: str) -> set[tuple[str, Any]]:
    status, _, body = await http_request(hub.node.admin_port, f"/channels/{channel}/presence")
    assert status == 200, body
    return {(m["session_id"], m["meta"]) for m in json.loads(body)["members"]}


async def presence_and_events(hub: Hub, got: list[dict[str, Any]], kind: str) -> None:
    """A stream of ``kind`` is listed in presence and announced, until it closes."""
    name = hub.name(kind)
    c = await open_stream(hub.node.port, f"/channels/{name}?meta=%22cell%22")
    me = (c.session, "cell")

    def event(kind: str) -> list[dict[str, Any]]:
        return [
            m
            for m in got
            if m["type"] == kind and m["session_id"] == c.session and m["channel"] == name
        ]

    async def listed() -> bool:
        return me in await members(hub, name)

    try:
        # Within a few ms when it works: a short deadline keeps the known failures cheap.
        await wait_until(lambda: event("subscribe"), timeout=5)
        await wait_until(listed, timeout=5, interval=0.05)
    finally:
        await c.close()
    await wait_until(lambda: event("unsubscribe"), timeout=5)
    await wait_until(lambda: _not(listed), timeout=5, interval=0.05)
    assert len(event("subscribe")) == len(event("unsubscribe")) == 1
    assert event("unsubscribe")[0]["reason"] == "client_gone"


async def _not(check: Callable[[], Awaitable[bool]]) -> bool:
    return not await check()


async def each_kind(check: Callable[[str], Awaitable[None]]) -> dict[str, str]:
    """``check`` run for every kind at once: what went wrong with each ("" when nothing)."""

    async def outcome(kind: str) -> str:
        try:
            await check(kind)
        except AssertionError as exc:
            return str(exc) or repr(exc)
        return ""

    return dict(zip(KINDS, await asyncio.gather(*(outcome(k) for k in KINDS)), strict=True))


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, ...], dict[Any, str]]:
    """Checks run once for several cells: each cell's outcome, by check and hub."""
    return {}


@pytest.mark.parametrize(("topology", "model", "kind"), cells("presence"))
async def test_presence_and_events_follow_a_stream(
    hub: Hub,
    outcomes: dict[tuple[str, ...], dict[Any, str]],
    topology: str,
    model: str,
    kind: str,
) -> None:
    # The three kinds of a hub at once: one wait, not three, where events are missing.
    key = ("presence", topology, model)
    if key not in outcomes:
        async with heard_events(hub.topology) as got:
            outcomes[key] = await each_kind(lambda k: presence_and_events(hub, got, k))
    problem = outcomes[key][kind]
    assert not problem, problem


# --- the failover: once per topology, watched by both process models -------------------


Outcomes = dict[tuple[str, str], str]  # (model, kind) -> what went wrong ("" when nothing)


async def failover(topology: Topology, hubs: Hubs) -> Outcomes:
    """Kill the master all the matrix's keys live on; what each (model, kind) saw."""
    outcomes: Outcomes = {}
    watching: list[Hub] = []
    for model in MODELS:
        try:
            watching.append(await asyncio.to_thread(hubs.get, topology, model))
        except AssertionError as exc:
            outcomes.update({(model, kind): str(exc) for kind in KINDS})
    opened: dict[str, list[SSEClient]] = {model: [] for model in MODELS}
    try:
        before: dict[tuple[str, str], tuple[list[SSEClient], list[str]]] = {}
        for hub in list(watching):
            try:
                for kind in KINDS:
                    path = f"/channels/{hub.name(kind)}"
                    streams = await on_every_worker(hub, opened[hub.model], path)
                    ids = await asyncio.to_thread(hub.send, kind, ["before"], True)
                    before[(hub.model, kind)] = (streams, ids)
                    for c in streams:
                        await c.next_events(1)
            except AssertionError as exc:
                watching.remove(hub)
                outcomes.update(
                    {(hub.model, kind): f"before the failover: {exc}" for kind in KINDS}
                )
        await asyncio.to_thread(topology.fail_master, FAILOVER_KEY)

        async def after(hub: Hub, kind: str) -> None:
            streams, ids = before[(hub.model, kind)]
            if kind == "pubsub":
                # What was published while the master was away is lost: each stream is
                # told, once it is subscribed again; then delivery goes on.
                for c in streams:
                    await c.read_until(lambda c: gaps(c), timeout=30)
                await asyncio.to_thread(hub.send, kind, ["after"])
                for c in streams:
                    await c.read_until(lambda c: len(messages(c)) >= 2, timeout=10)
                    assert [e.data for e in messages(c)] == ["before", "after"]
                    assert [(g["channel"], g["reason"]) for g in gaps(c)] == [
                        ("pub", "redis_outage")
                    ]
                    assert [e.event for e in c.events] == ["message", GAP_EVENT, "message"]
            else:
                # A stream loses nothing: the reader goes on from its position.
                ids = ids + await asyncio.to_thread(hub.send, kind, ["after 1", "after 2"])
                for c in streams:
                    await c.next_events(3, timeout=30)
                    check_delivery(kind, c.events, ["before", "after 1", "after 2"], ids)
                    assert not gaps(c)

        async def outcome(hub: Hub, kind: str) -> None:
            try:
                await after(hub, kind)
                outcomes[(hub.model, kind)] = ""
            except AssertionError as exc:
                outcomes[(hub.model, kind)] = f"{exc}" or repr(exc)

        await asyncio.gather(*(outcome(hub, kind) for hub in watching for kind in KINDS))
        # Late duplicates or gaps: a marker sent after everything arrives next, alone,
        # and after it nothing more arrives (every stream read on for a while).
        checked: dict[tuple[str, str], list[tuple[SSEClient, int]]] = {}
        for hub in watching:
            for kind in KINDS:
                if outcomes[(hub.model, kind)]:
                    continue
                streams, _ = before[(hub.model, kind)]
                checked[(hub.model, kind)] = [(c, len(c.events)) for c in streams]
                await asyncio.to_thread(hub.send, kind, ["marker"])
        for streams_seen in checked.values():
            for c, n in streams_seen:
                await c.next_events(n + 1)
        quiet = [c.read_for(0.3) for streams_seen in checked.values() for c, _ in streams_seen]
        await asyncio.gather(*quiet)
        for cell, streams_seen in checked.items():
            for c, n in streams_seen:
                if [e.data for e in c.events[n:]] != ["marker"]:
                    outcomes[cell] = f"after the marker: {c.events[n:]}"
    finally:
        for streams in opened.values():
            for c in streams:
                await c.close()
    return outcomes


@pytest.mark.parametrize(("topology", "model", "kind"), cells("failover"))
async def test_a_failover_loses_nothing_on_streams_and_signals_a_gap_on_pubsub(
    request: pytest.FixtureRequest,
    hubs: Hubs,
    outcomes: dict[tuple[str, ...], dict[Any, str]],
    topology: str,
    model: str,
    kind: str,
) -> None:
    key = ("failover", topology)
    if key not in outcomes:
        outcomes[key] = await failover(topology_of(request, topology), hubs)
    problem = outcomes[key][(model, kind)]
    assert not problem, problem
