"""The load client in C (``sseload.c``), compiled with gcc at bench time.

Same interface as ``loadclient.LoadClient``: the Python client costs a few
microseconds per read, which at 10,000+ streams puts its own sweep time into the
latency figures; the C one reads with epoll and ``memchr``. ``python -m bench`` uses
it when gcc is there (``--client python`` forces the Python one).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from .loadclient import ClientStats, StatsPoller, Target

__all__ = ["CLoadClient", "build"]

SOURCE = Path(__file__).resolve().parent / "sseload.c"


def build(workdir: Path) -> Path | None:
    """Compile sseload.c into ``workdir``; None when gcc is missing or fails."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    exe = workdir / "sseload"
    r = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(exe), str(SOURCE)], capture_output=True, timeout=120
    )
    return exe if r.returncode == 0 else None


class CLoadClient(StatsPoller):
    """Several ``sseload`` processes, each on its own source address."""

    def __init__(self, exe: Path, workers: int, sources: list[str], workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(workers):
            self.procs.append(
                subprocess.Popen(
                    [str(exe), sources[i % len(sources)]],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        self.pending = [0] * workers
        self.bufs = [b""] * workers

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _send(self, i: int, line: str) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def _recv(self, i: int, timeout: float) -> str:
        # Own line buffer over os.read: select() cannot see lines a file object
        # has already buffered. The worker answers within milliseconds unless stuck.
        stdout = self.procs[i].stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.bufs[i]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise TimeoutError("sseload did not answer")
            chunk = os.read(stdout.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError("sseload exited")
            self.bufs[i] += chunk
        raw, self.bufs[i] = self.bufs[i].split(b"\n", 1)
        line = raw.decode()
        if line.startswith("connected"):
            self.pending[i] -= 1
        return line

    def start_connect(self, target: Target, n: int, concurrency: int = 256) -> None:
        """Ask the workers to open ``n`` connections between them (returns at once)."""
        pathfile = self.workdir / f"paths-{id(target)}.txt"
        pathfile.write_text("\n".join(target.lines()) + "\n")
        per, extra = divmod(n, len(self.procs))
        first = 0
        conc = max(1, concurrency // len(self.procs))
        for i in range(len(self.procs)):
            count = per + (1 if i < extra else 0)
            self._send(i, f"target {target.host} {target.port} {pathfile}")
            self._send(i, f"connect {count} {first} {conc}")
            self.pending[i] += 1
            first += count

    def wait_connected(self, timeout: float) -> bool:
        """Wait until every worker finished its connect round (bounded)."""
        deadline = time.monotonic() + timeout
        for i in range(len(self.procs)):
            while self.pending[i]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                try:
                    self._recv(i, left)
                except TimeoutError:
                    return False
        return True

    def _ask(self, cmd: str, timeout: float = 30.0) -> list[str]:
        for i in range(len(self.procs)):
            self._send(i, cmd)
        out = []
        for i in range(len(self.procs)):
            while True:
                line = self._recv(i, timeout)
                if not line.startswith("connected"):
                    out.append(line)
                    break
        return out

    def stats(self) -> ClientStats:
        """Merged counters of every worker."""
        total = ClientStats()
        for line in self._ask("stats"):
            total.merge(_parse_stats(line))
        return total

    def reset(self) -> None:
        """Zero event counters and the CPU baseline (connections stay)."""
        self._ask("reset")

    def goal(self, events: int) -> None:
        """From now on, note when each stream's event count reaches ``events``."""
        self._ask(f"goal {events}")

    def close(self) -> None:
        """Close every connection and end the workers (always; also after errors)."""
        for i, proc in enumerate(self.procs):
            with contextlib.suppress(OSError, ValueError):
                self._send(i, "close")
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()


def _parse_stats(line: str) -> ClientStats:
    f = line.split()
    assert f[0] == "stats", line
    opened, failed, dropped, events, max_us, cpu_us, wall_us, nb = (int(x) for x in f[1:9])
    pos = 9
    hist = {}
    for _ in range(nb):
        hist[int(f[pos])] = int(f[pos + 1])
        pos += 2
    nconn = int(f[pos])
    connect_s = [int(x) / 1e6 for x in f[pos + 1 : pos + 1 + nconn]]
    pos += 1 + nconn
    nlive = int(f[pos])
    live_s = [int(x) / 1e6 for x in f[pos + 1 : pos + 1 + nlive]]
    pos += 1 + nlive
    ndone = int(f[pos])
    done_s = [int(x) / 1e6 for x in f[pos + 1 : pos + 1 + ndone]]
    return ClientStats(
        opened=opened,
        failed=failed,
        dropped=dropped,
        events=events,
        hist=hist,
        max_us=max_us,
        connect_s=connect_s,
        live=nlive,
        live_s=live_s,
        done_s=done_s,
        cpu_s=cpu_us / 1e6,
        wall_s=wall_us / 1e6,
        errors={"failed": failed} if failed else {},
    )
