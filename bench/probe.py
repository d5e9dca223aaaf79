"""Run the hub under tracemalloc and gc timing, from the outside: no hub code changes.

    python bench/probe.py --dir DIR [--frames N] -- --config F --port N ...

runs ``ssehub.cli.main.main`` (the ``ssehub`` command, the arguments after ``--``) in
this process, after:

- ``tracemalloc.start(N)`` (``--frames``, default 1: grouped by allocation line;
  0: no tracemalloc, for gc timings without its overhead);
- a ``gc.callbacks`` hook timing every collection, per generation (count, total and
  longest), so a full collection's cost during a storm can be read from outside.

Triggers (no admin listener needed): a file ``DIR/<name>.req`` (its JSON may say
``{"collect": false}`` or ``{"snapshot": false}``), or ``SIGUSR2`` (name ``usr2-<n>``).
A thread answers each: a timed explicit ``gc.collect()`` (unless told not to), then
``DIR/<name>.snap`` (``tracemalloc.Snapshot.dump``; ``Snapshot.load`` reads it) and
``DIR/<name>.json``: the gc figures so far, the collect's time, traced memory, gc
counts and the frozen count. ``<name>.json`` is written last (by rename): when it
exists, both are complete. ``compare()`` is what ``idle-memory --probe`` prints.

Run it as a script by path from the source tree under test with ``PYTHONPATH`` on it
(``sys.path[0]`` is ``bench/``), as ``bench/servers.py`` does: ``import ssehub`` then
finds that tree. Single process only: a worker's allocations are in another process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

__all__ = ["GcTimer", "compare", "main", "request"]


class GcTimer:
    """Per generation: collections, total and longest time, objects collected."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        gen = info["generation"]
        took = time.perf_counter() - self._t0
        self.count[gen] += 1
        self.total_s[gen] += took
        self.max_s[gen] = max(self.max_s[gen], took)
        self.collected[gen] += info.get("collected", 0)

    def figures(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "count": self.count[g],
                "total_ms": round(self.total_s[g] * 1000, 3),
                "max_ms": round(self.max_s[g] * 1000, 3),
                "collected": self.collected[g],
            }
            for g in range(3)
        }


def _answer(directory: Path, name: str, ask: dict[str, Any], timer: GcTimer) -> None:
    out: dict[str, Any] = {"name": name, "time": time.time()}
    if ask.get("collect", True):
        t0 = time.perf_counter()
        out["collect_freed"] = gc.collect()
        out["collect_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    if ask.get("snapshot", True) and tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot().filter_traces(
            (
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, __file__),
            )
        )
        snap.dump(str(directory / f"{name}.snap"))
        out["traced_bytes"], out["traced_peak_bytes"] = tracemalloc.get_traced_memory()
    out["gc"] = timer.figures()
    out["gc_counts"] = list(gc.get_count())
    out["gc_frozen"] = gc.get_freeze_count()
    tmp = directory / f"{name}.json.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(directory / f"{name}.json")


def _watch(directory: Path, timer: GcTimer) -> None:
    n = 0
    while True:
        got = signal.sigtimedwait({signal.SIGUSR2}, 0.05)
        if got is not None:
            n += 1
            _answer(directory, f"usr2-{n}", {}, timer)
        for req in sorted(directory.glob("*.req")):
            try:
                ask = json.loads(req.read_text() or "{}")
            except (OSError, ValueError):
                ask = {}
            with contextlib.suppress(OSError):
                req.unlink()
            _answer(directory, req.stem, ask, timer)


def request(directory: Path, name: str, timeout: float = 60.0, **ask: bool) -> dict[str, Any]:
    """Ask a probed hub for ``name`` (``collect``/``snapshot``: False to skip); wait
    for its answer and return the JSON (the bench's side)."""
    done = directory / f"{name}.json"
    done.unlink(missing_ok=True)
    tmp = directory / f"{name}.req.tmp"
    tmp.write_text(json.dumps(ask))
    tmp.rename(directory / f"{name}.req")
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the probe did not answer {name} within {timeout:.0f} s")
        time.sleep(0.05)
    result: dict[str, Any] = json.loads(done.read_text())
    return result


def compare(
    directory: Path, before: str, after: str, per: int, top: int = 15
) -> list[dict[str, Any]]:
    """Allocation sites that grew from ``before`` to ``after``, largest first, with
    their bytes and blocks divided by ``per`` (connections): the ``top`` ones, then one
    row for everything else."""
    old = tracemalloc.Snapshot.load(str(directory / f"{before}.snap"))
    new = tracemalloc.Snapshot.load(str(directory / f"{after}.snap"))
    stats = new.compare_to(old, "lineno")
    stats.sort(key=lambda s: s.size_diff, reverse=True)
    per = max(1, per)
    rows = []
    for s in stats[:top]:
        frame = s.traceback[0]
        rows.append(
            {
                "site": f"{_short(frame.filename)}:{frame.lineno}",
                "bytes_per_conn": round(s.size_diff / per, 1),
                "blocks_per_conn": round(s.count_diff / per, 2),
            }
        )
    rest = [s for s in stats[top:] if s.size_diff or s.count_diff]
    rows.append(
        {
            "site": f"(the other {len(rest)} lines that changed, net)",
            "bytes_per_conn": round(sum(s.size_diff for s in rest) / per, 1),
            "blocks_per_conn": round(sum(s.count_diff for s in rest) / per, 2),
        }
    )
    return rows


def _short(filename: str) -> str:
    """``…/site-packages/aiohttp/web.py`` -> ``aiohttp/web.py``; ``…/ssehub/x.py`` ->
    ``ssehub/x.py``."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1 :])
    if "ssehub" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("ssehub") :])
    return "/".join(parts[-2:])


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/probe.py")
    p.add_argument("--dir", required=True, type=Path, help="where requests and answers go")
    p.add_argument("--frames", type=int, default=1, help="tracemalloc frames (0: off)")
    p.add_argument("hub_args", nargs=argparse.REMAINDER, help="-- then the ssehub arguments")
    args = p.parse_args()
    hub_args = args.hub_args[1:] if args.hub_args[:1] == ["--"] else args.hub_args
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.frames > 0:
        tracemalloc.start(args.frames)
    timer = GcTimer()
    gc.callbacks.append(timer)
    # SIGUSR2 is taken by the watcher thread (sigtimedwait): blocked here, before any
    # other thread exists, so every thread inherits the mask and none runs a handler.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    threading.Thread(target=_watch, args=(args.dir, timer), daemon=True).start()
    (args.dir / "pid").write_text(str(os.getpid()))

    from ssehub.cli.main import main as hub_main

    return hub_main(hub_args)


if __name__ == "__main__":
    sys.exit(main())
