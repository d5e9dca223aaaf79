"""The processes under test (ssehub and the baselines) and the private redis-server.

Every process is started in its own session (process group) and registered, so
``stop_all()`` can end whatever is left after an error or Ctrl-C. Servers under test
run under ``taskset -c 0``; Redis runs beside the load tools on core 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "BENCH_DIR",
    "FAMILY",
    "FAMILY_REDIS",
    "FD_CAP",
    "SERVERS",
    "FlaskRecipe",
    "FlaskSSE",
    "Nchan",
    "ProcessTree",
    "busy_pct",
    "core_ticks",
    "RedisServer",
    "Server",
    "SsehubAuthServer",
    "SsehubBaseServer",
    "SsehubServer",
    "XADD_PREFIX",
    "free_port",
    "listen_overflows",
    "member",
    "stop_all",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BENCH_VENV = BENCH_DIR / ".venv"
# Open files per process: the hard limit on these machines (a subscriber is a socket).
FD_CAP = 20_000
# The family of the family scenarios (one member per user) and the Redis channels
# feeding its members: subscriber i follows ``user.<i>``, fed by ``app:user:<i>``.
FAMILY = "user.*"
FAMILY_REDIS = "app:user:*"


# A publisher target starting with this is a Redis Stream key (XADD), not a channel.
XADD_PREFIX = "xadd:"


def member(i: int) -> str:
    """The family member of subscriber ``i``."""
    return FAMILY.replace("*", str(i))


_started: list[subprocess.Popen[bytes]] = []


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the kernel's choice, so never 6379 in use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(argv: list[str], core: int | str | None) -> list[str]:
    """Prefix ``taskset -c core`` when pinning is on and taskset exists (``core``: one
    core, or a taskset list such as ``0-1``)."""
    if core is None or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(core), *argv]


def spawn(
    argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path = REPO_DIR
) -> subprocess.Popen[bytes]:
    """Start a process in its own session, output to ``log``, registered for cleanup."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    # Children that outlived their leader (gunicorn workers, nginx workers).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _started:
        _started.remove(proc)


def stop_all() -> None:
    """Stop every process this module started and has not stopped yet."""
    for proc in list(reversed(_started)):
        with contextlib.suppress(Exception):
            stop(proc, timeout=5)


def http_get(port: int, path: str, timeout: float = 1.0) -> int:
    """Status code of a one-off ``GET`` on 127.0.0.1 (0 when nothing answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return 0
    try:
        return int(head[9:12])
    except ValueError:
        return 0


def wait_http(proc: subprocess.Popen[bytes], port: int, path: str, timeout: float) -> None:
    """Poll until ``path`` answers 200, the process dies, or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        if http_get(port, path) == 200:
            return
        time.sleep(0.05)
    raise RuntimeError(f"not ready within {timeout:.0f} s")


class ProcessTree:
    """CPU seconds and RSS of a process and its descendants, read from /proc."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def pids(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
        return out

    def cpu_s(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / self.TICK

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total


def core_ticks(core: int | None) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat; busy includes irq and softirq,
    where loopback TCP work often lands without being charged to any process."""
    if core is None:
        return (0, 0)
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
                return (sum(v) - idle, sum(v))
    return (0, 0)


def listen_overflows() -> int | None:
    """``TcpExtListenOverflows`` of this network namespace (every listener in it, not only
    the server's): SYNs dropped because an accept queue was full; each comes back only
    after the client's 1 s (then 3 s, …) retransmit timer."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of a core that was busy between two ``core_ticks`` readings, in %."""
    total = after[1] - before[1]
    return None if total <= 0 else round(100 * (after[0] - before[0]) / total, 1)


class RedisServer:
    """A private ``redis-server`` on a free loopback port, pinned beside the load tools."""

    def __init__(self, workdir: Path, core: int | None, *extra: str) -> None:
        self.workdir = workdir
        self.core = core
        self.extra = extra  # more redis-server options (cluster nodes)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (./dev installs it)")
        self.port = free_port()
        argv = [
            exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--daemonize", "no",
            "--loglevel", "warning",
            # One connection per subscriber for the Flask baselines.
            "--maxclients", str(FD_CAP - 100),
            # Pub/sub clients of slow baselines must not be cut by the default limits.
            "--client-output-buffer-limit", "pubsub 0 0 0",
            *self.extra,
        ]  # fmt: skip
        self.proc = spawn(pinned(argv, self.core), self.workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cpu_s(self) -> float:
        return ProcessTree(self.proc.pid).cpu_s() if self.proc else 0.0

    def client(self) -> Any:
        """A redis-py client on this server (ssehub's dependency, in the bench's venv)."""
        import redis

        return redis.Redis(port=self.port)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as {field: value} (``cmdstat_subscribe`` -> ``calls=3,…``)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"INFO {section}\r\n".encode())
            buf = b""
            while b"\r\n" not in buf:
                buf += s.recv(65536) or b"\r\n"
            head, _, body = buf.partition(b"\r\n")
            if not head.startswith(b"$"):
                raise RuntimeError(f"INFO {section}: {head[:80]!r}")
            size = int(head[1:])
            while len(body) < size:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
        out = {}
        for line in body[:size].decode().splitlines():
            key, sep, value = line.partition(":")
            if sep and not key.startswith("#"):
                out[key] = value
        return out

    def command_calls(self, command: str) -> int:
        """How many times ``command`` ran since Redis started (``INFO commandstats``)."""
        stat = self.info("commandstats").get(f"cmdstat_{command.lower()}", "")
        fields = dict(f.split("=", 1) for f in stat.split(",") if "=" in f)
        return int(fields.get("calls", 0))

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


class Server:
    """A server under test. Subclasses say how to start it and where subscribers go."""

    name = ""
    publish_kind = "redis"  # or "nchan": HTTP POST /pub?id=<channel>
    publish_fmt = "plain"  # or "flask-sse": JSON {"data": …}
    fds_per_sub = 1  # the Flask baselines hold a Redis connection per subscriber too
    needs_prime = False  # headers only go out with the first event
    # Why the family scenarios cannot run here (None: they can): the server must serve
    # any member of FAMILY on demand.
    no_families: str | None = "serves only channels it is configured with"
    # The first "id:" line of a stream means its channel is live (ssehub); without
    # one, a stream is live once its headers arrived (nchan creates channels in-process).
    live_on_id = False
    by_default = True  # in a run without --servers
    # Why the stream scenarios cannot run here (None: they can): channels fed from a
    # Redis Stream (``stream: <key>``), resumed by entry id.
    no_streams: str | None = "no Redis Stream channels"

    def __init__(self, workdir: Path, redis_url: str, core: int | str | None) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.core = core
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # Per channel: more options for its config entry (``{"stream": key}``).
        self.options: dict[str, dict[str, object]] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this server cannot run here, or None."""
        return None

    @classmethod
    def max_subs_for(cls) -> int:
        """Most subscribers one process can hold under the open-files cap."""
        return (FD_CAP - 200) // cls.fds_per_sub

    def path(self, channel: str) -> str:
        return f"/channels/{channel}"

    def paths(self, channels: list[str]) -> tuple[str, ...]:
        """Where subscribers go: connection i uses ``paths[i % len(paths)]``."""
        return tuple(self.path(c) for c in channels)

    def publish_name(self, channel: str) -> str:
        """Where the publisher sends what subscribers of ``channel`` get."""
        return channel

    def argv(self, channels: list[str]) -> list[str]:
        raise NotImplementedError

    def ready_path(self) -> str:
        return "/healthz"

    def start(self, channels: list[str]) -> None:
        self.port = free_port()
        log = self.workdir / f"{self.name}.log"
        self.proc = spawn(pinned(self.argv(channels), self.core), log, self.env(), self.cwd())
        try:
            wait_http(self.proc, self.port, self.ready_path(), 30)
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{self.name}: {exc}\n{tail}") from None

    def env(self) -> dict[str, str]:
        return {}

    def cwd(self) -> Path:
        return REPO_DIR

    def tree(self) -> ProcessTree:
        assert self.proc is not None
        return ProcessTree(self.proc.pid)

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


class SsehubServer(Server):
    """The hub, as deployed: ``python -m ssehub --config … --port …`` (uvloop).

    It runs the code of ``src()`` (this checkout; ``ssehub-base``: ``$BENCH_BASE_SRC``)
    with this interpreter: the process starts in that tree with ``PYTHONPATH`` on it,
    so ``import ssehub`` finds its code before anything installed in the venv.
    A scenario may set, before ``start()``: ``workers`` (> 1: the workers process
    model), ``node_model`` (with ``workers`` 1: the workers process model with one
    worker, through ``bench/hub_node.py``, instead of the single process the CLI runs)
    and ``probe_dir`` (run under ``bench/probe.py``: tracemalloc and gc timings)."""

    name = "ssehub"
    no_families: str | None = None
    no_streams: str | None = None
    live_on_id = True
    workers = 1

    def __init__(self, workdir: Path, redis_url: str, core: int | str | None) -> None:
        super().__init__(workdir, redis_url, core)
        self.node_model = False
        self.probe_dir: Path | None = None
        self.probe_frames = 1  # tracemalloc frames under the probe (0: gc timings only)

    @classmethod
    def src(cls) -> Path:
        """The source tree whose ``ssehub`` package runs."""
        return REPO_DIR

    def config(self, channels: list[str]) -> dict[str, object]:
        config: dict[str, object] = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "redis": {"url": self.redis_url},
            "heartbeat": 15,
            # FAMILY, when asked for, with its default grace (10 s) and history (100).
            "channels": {
                c: {"redis_channel": FAMILY_REDIS} if c == FAMILY else self.options.get(c, {})
                for c in channels
            },
        }
        if self.workers > 1:
            config["workers"] = self.workers
        return config

    def publish_name(self, channel: str) -> str:
        stream = self.options.get(channel, {}).get("stream")
        if stream:
            return f"{XADD_PREFIX}{stream}"
        prefix = FAMILY.partition("*")[0]
        if channel.startswith(prefix):
            return FAMILY_REDIS.replace("*", channel[len(prefix) :])
        return channel

    def argv(self, channels: list[str]) -> list[str]:
        config = self.config(channels)
        path = self.workdir / "ssehub.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        args = ["--config", str(path), "--port", str(self.port), "--log-level", "WARNING"]
        if self.probe_dir is not None:
            # A script by path: sys.path[0] is bench/, so ssehub comes from PYTHONPATH.
            probe = [sys.executable, str(BENCH_DIR / "probe.py"), "--dir", str(self.probe_dir)]
            return [*probe, "--frames", str(self.probe_frames), "--", *args]
        if self.node_model and self.workers == 1:
            return [sys.executable, str(BENCH_DIR / "hub_node.py"), *args]
        return [sys.executable, "-m", "ssehub", *args]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.src())}

    def cwd(self) -> Path:
        return self.src()

    def ready_path(self) -> str:
        return "/readyz"


BASE_SRC_ENV = "BENCH_BASE_SRC"


def imported_from(src: Path) -> str:
    """Where ``import ssehub`` resolves with ``src`` as the working directory and on
    ``PYTHONPATH`` (as the hub is started), or why it fails."""
    code = "import ssehub, sys; sys.stdout.write(ssehub.__file__ or '')"
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=src,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode:
        return "import failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return r.stdout


class SsehubBaseServer(SsehubServer):
    """The hub of ANOTHER source tree (``$BENCH_BASE_SRC``, e.g. a ``git worktree`` of
    main), run with this venv: the "before" beside ``ssehub``'s "after" in one run,
    with the same pinning, Redis and load."""

    name = "ssehub-base"
    by_default = False  # needs $BENCH_BASE_SRC

    @classmethod
    def src(cls) -> Path:
        return Path(os.environ.get(BASE_SRC_ENV, "")).resolve()

    @classmethod
    def unavailable(cls) -> str | None:
        value = os.environ.get(BASE_SRC_ENV)
        if not value:
            return f"${BASE_SRC_ENV} is not set (the source tree to compare with, e.g. a worktree)"
        src = cls.src()
        if not (src / "ssehub" / "__init__.py").is_file():
            return f"${BASE_SRC_ENV}={value}: no ssehub/__init__.py there"
        where = imported_from(src)
        if not where.startswith(str(src / "ssehub")):
            return f"${BASE_SRC_ENV}={value}: ssehub imports from {where or '?'}, not that tree"
        return None


class SsehubMetricsServer(SsehubServer):
    """The hub with its admin listener on, so metrics are live: the delay histogram is
    observed on every flush. Compared with ``ssehub`` in the same run, it shows what
    counting costs the hot path."""

    name = "ssehub+metrics"

    def config(self, channels: list[str]) -> dict[str, object]:
        return {**super().config(channels), "admin": {"host": "127.0.0.1", "port": free_port()}}


class SsehubPresenceServer(SsehubServer):
    """The hub with Juggernaut parity on: subscribe/unsubscribe events published to Redis
    and ``presence: true`` on every channel, so each connect and disconnect is an event
    and a presence entry (batched pipelines). Compared with ``ssehub`` in the same run
    (``storm-delivery``), it shows what they cost the delivery to existing subscribers."""

    name = "ssehub+presence"
    no_families = "the presence variant lists plain channels only"

    def config(self, channels: list[str]) -> dict[str, object]:
        config = super().config(channels)
        config["channels"] = {c: {"presence": True} for c in channels}
        config["events"] = {"enabled": True}
        return config


class SsehubAuthServer(SsehubServer):
    """The hub with every channel ``auth: token`` (HS256): each subscriber brings its own
    token in the query, so a connect storm verifies a signature per connection (no two
    share a token, so the verified-token cache never spares one). Compared with
    ``ssehub`` in the same run, it shows what verification costs."""

    name = "ssehub+auth"
    no_families = "its tokens grant c* only"
    no_streams = "not wired: its channels are configured with auth only"
    algorithm = "HS256"
    # Distinct tokens: one per subscriber of the largest storm.
    tokens = 10_000

    def _keys(self) -> tuple[object, dict[str, object]]:
        """The signing key, and the auth section that verifies it."""
        secret = os.urandom(32).hex().encode()
        (self.workdir / "auth-secret").write_bytes(secret)
        return secret, {"secret_file": str(self.workdir / "auth-secret")}

    def config(self, channels: list[str]) -> dict[str, object]:
        import jwt  # ssehub's own dependency, in the .venv the bench runs with

        key, auth = self._keys()
        exp = int(time.time()) + 3600
        self._tokens = [
            jwt.encode(
                {"sub": f"u{i}", "exp": exp, "ssehub": {"subscribe": ["c*"]}},
                key,
                algorithm=self.algorithm,
            )
            for i in range(self.tokens)
        ]
        return {
            **super().config(channels),
            "auth": {"algorithms": [self.algorithm], **auth},
            "channels": {c: {"auth": "token"} for c in channels},
        }

    def paths(self, channels: list[str]) -> tuple[str, ...]:
        # len(paths) is a multiple of len(channels) (1 or 5,000 in every scenario), so
        # connection i still lands on channel i mod k.
        n = len(channels) * max(1, self.tokens // len(channels))
        return tuple(
            f"/channels/{channels[i % len(channels)]}?token={self._tokens[i % self.tokens]}"
            for i in range(n)
        )


class SsehubAuthES256Server(SsehubAuthServer):
    """As ``ssehub+auth`` with ES256 (an ECDSA P-256 public key): a costlier check."""

    name = "ssehub+auth-es256"
    algorithm = "ES256"

    def _keys(self) -> tuple[object, dict[str, object]]:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        private = ec.generate_private_key(ec.SECP256R1())
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (self.workdir / "auth-key.pub").write_bytes(public)
        return private, {"key_file": str(self.workdir / "auth-key.pub")}


class SsehubWorkersServer(SsehubServer):
    """The hub with ``workers: 2``: a main process feeding two workers on one port.
    Pinned like the others (all three processes on the server core), its CPU per
    delivery shows what supervision and the feed add over one process."""

    name = "ssehub-w2"
    workers = 2


class SsehubClusterServer(SsehubServer):
    """The hub against a Redis Cluster of three masters (no replicas) started for it,
    on the load core like the single Redis: sharded pub/sub, and the publisher sends
    ``SPUBLISH`` to the master owning the channel. Compared with ``ssehub`` in the same
    run, it shows what the path through a cluster costs. Scenarios whose channels live
    on several masters are not supported (the publisher has one connection)."""

    name = "ssehub+cluster"
    publish_kind = "redis-cluster"
    # The hub reads streams on a cluster; the bench's cluster publisher does not XADD.
    no_streams = "the bench's cluster publisher sends SPUBLISH only, no XADD"
    by_default = False  # fan-out and other one-channel scenarios only

    def start(self, channels: list[str]) -> None:
        # A fresh directory per node and start: its nodes.conf must not be reused.
        # Core None: the nodes inherit the bench's own core, the load core.
        # The bus gets a free port of its own: the default, port + 10000, may not exist.
        cluster = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        self.nodes = [
            RedisServer(
                Path(tempfile.mkdtemp(dir=self.workdir)),
                None,
                *cluster,
                *("--cluster-port", str(free_port())),
            )
            for _ in range(3)
        ]
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RuntimeError("redis-cli is not installed (./dev installs redis-tools)")
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 20
            while not all(self._cluster_ok(n.port) for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not come up")
                time.sleep(0.05)
            self.redis_url = "redis+cluster://" + ",".join(addrs)
            super().start(channels)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _cluster_ok(port: int) -> bool:
        import redis

        with redis.Redis(port=port) as r:
            info = r.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        return b"cluster_state:ok" in info

    def publish_port(self, channels: list[str]) -> int:
        """The port of the master that owns every one of ``channels``."""
        import redis

        with redis.Redis(port=self.nodes[0].port) as r:
            command = r.execute_command  # untyped in redis-py
            slots = command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            owners = set()
            for channel in channels:
                slot = int(command("CLUSTER", "KEYSLOT", channel))  # type: ignore[no-untyped-call]
                owners.add(next(int(s[2][1]) for s in slots if s[0] <= slot <= s[1]))
        if len(owners) != 1:
            raise RuntimeError(f"{self.name}: channels on {len(owners)} masters")
        return owners.pop()

    def stop(self) -> None:
        super().stop()
        for node in getattr(self, "nodes", []):
            node.stop()


def _bench_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def _missing_modules(*mods: str) -> str | None:
    py = _bench_python()
    if not py.exists():
        return f"{BENCH_VENV} does not exist (run without --no-setup)"
    code = f"import {', '.join(mods)}"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode:
        return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "import failed"
    return None


class FlaskRecipe(Server):
    """The classic recipe: a thread and a Redis pub/sub connection per subscriber."""

    name = "flask-recipe"
    fds_per_sub = 2

    @classmethod
    def unavailable(cls) -> str | None:
        return _missing_modules("flask", "redis")

    def argv(self, channels: list[str]) -> list[str]:
        return [str(_bench_python()), str(BENCH_DIR / "baselines" / "flask_recipe.py")]

    def env(self) -> dict[str, str]:
        return {"BENCH_REDIS_URL": self.redis_url, "BENCH_PORT": str(self.port)}


class FlaskSSE(Server):
    """flask-sse under gunicorn, one gevent worker."""

    name = "flask-sse"
    publish_fmt = "flask-sse"
    fds_per_sub = 2
    needs_prime = True

    @classmethod
    def unavailable(cls) -> str | None:
        return _missing_modules("flask_sse", "gunicorn", "gevent")

    def path(self, channel: str) -> str:
        return f"/stream?channel={channel}"

    def argv(self, channels: list[str]) -> list[str]:
        return [
            str(BENCH_VENV / "bin" / "gunicorn"),
            "--worker-class", "gevent",
            "--workers", "1",
            "--worker-connections", str(FD_CAP),
            "--backlog", "4096",
            "--bind", f"127.0.0.1:{self.port}",
            "--chdir", str(BENCH_DIR / "baselines"),
            "--log-level", "warning",
            "flask_sse_app:app",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {"BENCH_REDIS_URL": self.redis_url}


NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")

NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {fds};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
load_module {module};
# nginx starts closing connections when fewer than 1/16 of worker_connections are
# free; the descriptor cap (worker_rlimit_nofile) must be the limit, not that.
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    # The publisher pipelines on keep-alive connections; nginx closes one after
    # 1,000 requests by default.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{ return 200 "ok\\n"; }}
        location ~ ^/channels/(.+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
        }}
        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_id;
            nchan_message_buffer_length 10;
        }}
    }}
}}
"""


def nchan_module() -> Path | None:
    """The nchan .so shipped by libnginx-mod-nchan, if installed."""
    for d in NCHAN_MODULE_DIRS:
        p = Path(d) / "ngx_nchan_module.so"
        if p.exists():
            return p
    return None


class Nchan(Server):
    """nginx-light + nchan: one worker, eventsource subscribers, HTTP publisher."""

    name = "nchan"
    publish_kind = "nchan"
    no_families = None  # nchan_channel_id $1: any channel id, created on demand

    @classmethod
    def unavailable(cls) -> str | None:
        if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
            return "nginx is not installed (apt-get install nginx-light)"
        if nchan_module() is None:
            return "nchan module not found (apt-get install libnginx-mod-nchan)"
        return None

    def argv(self, channels: list[str]) -> list[str]:
        d = self.workdir / "nginx"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=d, module=nchan_module(), port=self.port, fds=FD_CAP, conns=FD_CAP * 17 // 15
            )
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        return [nginx, "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]


SERVERS: dict[str, type[Server]] = {
    "ssehub": SsehubServer,
    "ssehub-base": SsehubBaseServer,
    "ssehub+metrics": SsehubMetricsServer,
    "ssehub+presence": SsehubPresenceServer,
    "ssehub+auth": SsehubAuthServer,
    "ssehub+auth-es256": SsehubAuthES256Server,
    "ssehub-w2": SsehubWorkersServer,
    "ssehub+cluster": SsehubClusterServer,
    "nchan": Nchan,
    "flask-sse": FlaskSSE,
    "flask-recipe": FlaskRecipe,
}
