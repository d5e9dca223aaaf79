"""Subscriber-side load: worker processes that each hold many SSE connections.

Each worker is a separate process (the 20,000 open-files cap is per process) running
uvloop with raw asyncio Protocols: no HTTP library, no per-event regex. Events are
counted by a one-byte marker (``~``) that starts every benchmark payload, so a count is
one C-level ``bytes.count`` per read whatever the framing (chunked or not, ``id:`` lines
or not). Latency is taken from the first complete payload in each read (the oldest event
in it, so the worst in that read) and weighted by the number of events in the read: a
conservative per-event figure at the cost of one parse per read, not per event.

The parent drives workers over a ``multiprocessing`` pipe with small command tuples.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

__all__ = ["HIST_BUCKET_US", "ClientStats", "LoadClient", "Target"]

# Latency histogram: 100 µs buckets up to 10 s (the last bucket takes everything above).
HIST_BUCKET_US = 100
HIST_SIZE = 100_001
MARK = b"~"
# Linux: defer the source-port choice to connect(), so one source address can reach
# ~28,000 ports per destination instead of sharing one pool for every destination.
IP_BIND_ADDRESS_NO_PORT = 24


@dataclass(frozen=True)
class Target:
    """Where connection ``i`` goes: ``paths[i % len(paths)]`` on host:port, with the
    header ``Last-Event-ID: last_ids[i % len(paths)]`` when ``last_ids`` is given."""

    host: str
    port: int
    paths: tuple[str, ...]
    last_ids: tuple[str, ...] = ()

    def last_id(self, i: int) -> str:
        """The Last-Event-ID that connection ``i`` sends ("" for none)."""
        return self.last_ids[i % len(self.paths)] if self.last_ids else ""

    def lines(self) -> list[str]:
        """``path`` or ``path<TAB>last id`` per path (sseload's path file)."""
        return [
            p + (f"\t{self.last_id(i)}" if self.last_ids else "") for i, p in enumerate(self.paths)
        ]


@dataclass
class ClientStats:
    """Counters of one worker (or merged over several)."""

    opened: int = 0
    failed: int = 0
    dropped: int = 0
    events: int = 0
    hist: dict[int, int] = field(default_factory=dict)
    max_us: int = 0
    connect_s: list[float] = field(default_factory=list)
    # Streams whose first ``id:`` line arrived (ssehub sends it once the stream's
    # channels are subscribed in Redis), and how long after connect() each took.
    live: int = 0
    live_s: list[float] = field(default_factory=list)
    # Streams whose event count reached the goal (``goal()``), and when after connect().
    done_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def merge(self, other: ClientStats) -> None:
        """Add another worker's counters into this one."""
        self.opened += other.opened
        self.failed += other.failed
        self.dropped += other.dropped
        self.events += other.events
        for k, v in other.hist.items():
            self.hist[k] = self.hist.get(k, 0) + v
        self.max_us = max(self.max_us, other.max_us)
        self.connect_s.extend(other.connect_s)
        self.live += other.live
        self.live_s.extend(other.live_s)
        self.done_s.extend(other.done_s)
        self.cpu_s += other.cpu_s
        self.wall_s = max(self.wall_s, other.wall_s)
        for k, n in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + n

    def quantile_ms(self, q: float) -> float | None:
        """Latency quantile from the weighted histogram (upper bucket edge), in ms."""
        total = sum(self.hist.values())
        if not total:
            return None
        rank = q * total
        seen = 0
        for bucket in sorted(self.hist):
            seen += self.hist[bucket]
            if seen >= rank:
                # Upper bucket edge, but never above the exact maximum seen.
                return min((bucket + 1) * HIST_BUCKET_US, self.max_us) / 1000
        return self.max_us / 1000


class _State:
    """Per-worker counters touched on every read; plain attributes for speed."""

    def __init__(self) -> None:
        self.reset()
        self.opened = 0
        self.failed = 0
        self.dropped = 0
        self.connect_s: list[float] = []
        self.live_s: list[float] = []
        self.done_s: list[float] = []
        self.goal = 0
        self.errors: dict[str, int] = {}

    def reset(self) -> None:
        self.events = 0
        self.hist = [0] * HIST_SIZE
        self.max_us = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class _SSEProtocol(asyncio.Protocol):
    __slots__ = ("closing", "done", "head", "is_live", "is_open", "n", "st", "t0", "transport")

    def __init__(self, st: _State, t0: float) -> None:
        self.st = st
        self.t0 = t0
        self.head = b""
        self.is_open = False
        self.is_live = False
        self.closing = False
        self.n = 0
        self.done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.is_open:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head[-16384:]
                return
            self.head = b""
            if head[9:12] != b"200":
                self.st.failed += 1
                self.st.error("status " + head[9:12].decode("latin-1"))
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
                return
            self.is_open = True
            self.st.opened += 1
            self.st.connect_s.append(time.monotonic() - self.t0)
            data = head[end + 4 :]
            self.head = b"\n"  # a body starting with "id:" starts a line
        if not self.is_live:
            # The first "id:" line (as in sseload.c); the kept tail catches a split one.
            seen = self.head + data
            if b"\nid:" in seen:
                self.is_live = True
                self.st.live_s.append(time.monotonic() - self.t0)
                self.head = b""
            else:
                self.head = seen[-3:]
        n = data.count(MARK)
        if not n:
            return
        st = self.st
        st.events += n
        self.n += n
        if st.goal and not self.done and self.n >= st.goal:
            self.done = True
            st.done_s.append(time.monotonic() - self.t0)
        i = data.find(MARK)
        j = data.find(b" ", i)
        k = data.find(b" ", j + 1)
        if k < 0:
            return  # first payload split across reads: counted, latency skipped
        try:
            sent = int(data[j + 1 : k])
        except ValueError:
            return
        us = (time.time_ns() - sent) // 1000
        if us > st.max_us:
            st.max_us = us
        b = us // HIST_BUCKET_US
        st.hist[b if 0 <= b < HIST_SIZE else HIST_SIZE - 1] += n

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_open and not self.closing:
            self.st.dropped += 1
            self.st.error("dropped")


class _Worker:
    """Runs inside a worker process: connections plus a command loop on the pipe."""

    def __init__(self, conn: Connection, source: str) -> None:
        self.conn = conn
        self.source = source
        self.st = _State()
        self.protos: list[_SSEProtocol] = []
        self.cpu0 = 0.0
        self.wall0 = time.monotonic()

    async def connect_one(
        self, target: Target, i: int, sem: asyncio.Semaphore, timeout: float
    ) -> None:
        path = target.paths[i % len(target.paths)]
        last_id = target.last_id(i)
        loop = asyncio.get_running_loop()
        async with sem:
            t0 = time.monotonic()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.source, 0))
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), timeout)
                proto = _SSEProtocol(self.st, t0)
                await loop.create_connection(lambda: proto, sock=sock)
            except (OSError, TimeoutError) as exc:
                sock.close()
                self.st.failed += 1
                self.st.error(
                    type(exc).__name__ + (f" {exc.errno}" if getattr(exc, "errno", None) else "")
                )
                return
            self.protos.append(proto)
            assert proto.transport is not None
            resume = f"Last-Event-ID: {last_id}\r\n" if last_id else ""
            proto.transport.write(
                f"GET {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n".encode()
            )

    async def connect(self, target: Target, count: int, first: int, concurrency: int) -> float:
        t0 = time.monotonic()
        sem = asyncio.Semaphore(concurrency)
        await asyncio.gather(
            *(self.connect_one(target, first + i, sem, 30.0) for i in range(count))
        )
        return time.monotonic() - t0

    def stats(self) -> ClientStats:
        st = self.st
        hist = {i: v for i, v in enumerate(st.hist) if v}
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ClientStats(
            opened=st.opened,
            failed=st.failed,
            dropped=st.dropped,
            events=st.events,
            hist=hist,
            max_us=st.max_us,
            connect_s=list(st.connect_s),
            live=len(st.live_s),
            live_s=list(st.live_s),
            done_s=list(st.done_s),
            cpu_s=ru.ru_utime + ru.ru_stime - self.cpu0,
            wall_s=time.monotonic() - self.wall0,
            errors=dict(st.errors),
        )

    def reset(self) -> None:
        self.st.reset()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0 = ru.ru_utime + ru.ru_stime
        self.wall0 = time.monotonic()

    def close_all(self) -> None:
        for p in self.protos:
            p.closing = True
            if p.transport is not None:
                p.transport.abort()
        self.protos.clear()

    def _recv_command(self) -> Any:
        # The loop made the pipe non-blocking; a large command (5,000 channel names)
        # arrives in several reads, so read the whole message blocking.
        os.set_blocking(self.conn.fileno(), True)
        return self.conn.recv()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        loop.add_reader(self.conn.fileno(), lambda: commands.put_nowait(self._recv_command()))
        tasks: set[asyncio.Task[Any]] = set()
        while True:
            cmd = await commands.get()
            op = cmd[0]
            if op == "connect":
                # Runs in the background so "stats" can be asked while connecting.
                task = loop.create_task(self._connect_and_reply(*cmd[1:]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif op == "stats":
                self.conn.send(self.stats())
            elif op == "reset":
                self.reset()
                self.conn.send(True)
            elif op == "goal":
                self.st.goal = cmd[1]
                self.conn.send(True)
            elif op == "close":
                self.close_all()
                self.conn.send(True)
                return

    async def _connect_and_reply(
        self, target: Target, count: int, first: int, concurrency: int
    ) -> None:
        elapsed = await self.connect(target, count, first, concurrency)
        self.conn.send(("connected", elapsed))


def _worker_main(conn: Connection, source: str) -> None:
    # Each worker may hold up to the hard limit of descriptors.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency of the project
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(_Worker(conn, source).serve())


class StatsPoller:
    """What both load clients (this one and the C one) share: waiting on their stats."""

    def stats(self) -> ClientStats:
        raise NotImplementedError

    def wait_open(self, n: int, timeout: float) -> ClientStats:
        """Poll until ``n`` streams are open or every attempt has resolved, or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.opened >= n or s.opened + s.failed >= n or time.monotonic() > deadline:
                return s
            time.sleep(0.1)

    def wait_live(self, n: int, timeout: float) -> ClientStats:
        """Poll until ``n`` streams had their first ``id:`` line, or every attempt has
        resolved without that, or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.live >= n or s.live + s.failed + s.dropped >= n or time.monotonic() > deadline:
                return s
            time.sleep(0.05)


class LoadClient(StatsPoller):
    """Parent-side handle on several worker processes holding ``n`` connections in all."""

    def __init__(self, workers: int, sources: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        # Connect rounds a worker has not reported done yet: their ("connected", s)
        # replies may arrive between other answers on the same pipe.
        self.pending = [0] * workers
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(child, sources[i % len(sources)]), daemon=True
            )
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def start_connect(self, target: Target, n: int, concurrency: int = 256) -> None:
        """Ask the workers to open ``n`` connections between them (returns at once)."""
        per, extra = divmod(n, len(self.pipes))
        first = 0
        for i, pipe in enumerate(self.pipes):
            count = per + (1 if i < extra else 0)
            pipe.send(("connect", target, count, first, max(1, concurrency // len(self.pipes))))
            self.pending[i] += 1
            first += count

    def wait_connected(self, timeout: float) -> bool:
        """Wait until every worker finished its connect round (bounded)."""
        deadline = time.monotonic() + timeout
        for i, pipe in enumerate(self.pipes):
            while self.pending[i]:
                left = deadline - time.monotonic()
                if left <= 0 or not pipe.poll(left):
                    return False
                self._recv(i)
        return True

    def _recv(self, i: int) -> Any:
        msg = self.pipes[i].recv()
        if isinstance(msg, tuple) and msg and msg[0] == "connected":
            self.pending[i] -= 1
        return msg

    def _ask(self, cmd: tuple[Any, ...], timeout: float = 30.0) -> list[Any]:
        for pipe in self.pipes:
            pipe.send(cmd)
        out = []
        deadline = time.monotonic() + timeout
        for i, pipe in enumerate(self.pipes):
            while True:
                if not pipe.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"load worker did not answer {cmd[0]!r}")
                msg = self._recv(i)
                if not (isinstance(msg, tuple) and msg and msg[0] == "connected"):
                    out.append(msg)
                    break
        return out

    def stats(self) -> ClientStats:
        """Merged counters of every worker."""
        total = ClientStats()
        for s in self._ask(("stats",)):
            total.merge(s)
        return total

    def reset(self) -> None:
        """Zero event counters and the CPU baseline (connections stay)."""
        self._ask(("reset",))

    def goal(self, events: int) -> None:
        """From now on, note when each stream's event count reaches ``events``."""
        self._ask(("goal", events))

    def close(self) -> None:
        """Close every connection and end the workers (always; also after errors)."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("close",))
        for proc, pipe in zip(self.procs, self.pipes, strict=True):
            with contextlib.suppress(OSError, EOFError):
                if pipe.poll(10):
                    pipe.recv()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            pipe.close()
