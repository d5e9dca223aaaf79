"""``python -m bench``: set up, run the scenarios on each server, print table + JSON lines."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import install
from .cclient import build
from .report import Result, format_sites, format_table, json_line, storm_ratios
from .scenarios import SCENARIOS, Ctx, smoke
from .servers import SERVERS, RedisServer, stop_all

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="ssehub against nchan, flask-sse and the Flask recipe (issue 5).",
    )
    p.add_argument(
        "--scenario",
        default="all",
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--servers",
        default=None,
        help=f"comma-separated, from: {', '.join(SERVERS)} "
        "(default: all but ssehub+cluster and ssehub-base; --smoke: ssehub)",
    )
    p.add_argument("--quick", action="store_true", help="3 s windows instead of 10 s")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few streams and messages, no set-up; seconds (with --scenario: those "
        "scenarios at smoke size)",
    )
    p.add_argument(
        "--live-subs",
        type=int,
        default=1000,
        help="existing subscribers (--live-rate msg/s) whose delivery storm and "
        "stream-resume-storm measure while they run (default 1,000; 0: none)",
    )
    p.add_argument(
        "--live-rate",
        type=float,
        default=100.0,
        help="msg/s to those subscribers (default 100: 100,000 deliveries/s to 1,000)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="idle-memory: a tracemalloc breakdown per connection (bench/probe.py); "
        "storm: garbage collections during the storm",
    )
    p.add_argument(
        "--resume-clients",
        type=int,
        default=None,
        help="clients of stream-resume-storm (default 2,000; --quick 1,000; issue 13: 10,000)",
    )
    p.add_argument("--no-setup", action="store_true", help="install nothing (apt, venv)")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--client",
        choices=("c", "python"),
        default="c",
        help="load client: C (compiled with gcc here; default) or Python (uvloop)",
    )
    return p


def _split(value: str, known: Sequence[str], what: str) -> list[str]:
    if value == "all":
        return list(known)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return items


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Unwind through every finally block, which stops what was started.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (0 even when a target is missed)."""
    args = _parser().parse_args(argv)
    if args.servers is None:
        default = [n for n, cls in SERVERS.items() if cls.by_default]
        servers = ["ssehub"] if args.smoke else default
    else:
        servers = _split(args.servers, list(SERVERS), "server")
    # --smoke alone: the smoke fan-out; with --scenario, those scenarios at smoke size.
    scenarios = (
        ["smoke"]
        if args.smoke and args.scenario == "all"
        else _split(args.scenario, list(SCENARIOS), "scenario")
    )
    cores = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cores) >= 2 and shutil.which("taskset") is not None
    server_core, load_core = (cores[0], cores[1]) if pin else (None, None)
    if load_core is not None:
        # Everything this process starts (load clients, publisher) inherits core 1.
        os.sched_setaffinity(0, {load_core})
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # never raises KeyboardInterrupt, so the run would go on after a kill -INT.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="ssehub-bench-"))
    redis = RedisServer(workdir, load_core)
    results: list[Result] = []
    interrupted = False
    try:
        reasons = {} if args.smoke or args.no_setup else install.setup(servers)
        redis.start()
        ctx = Ctx(workdir, redis, server_core, load_core, quick=args.quick, smoke=args.smoke)
        ctx.resume_clients = args.resume_clients
        ctx.cores = cores
        ctx.live_subs = max(0, args.live_subs)
        ctx.live_rate = args.live_rate
        ctx.probe = args.probe
        if args.client == "c":
            ctx.client_exe = build(workdir)
            if ctx.client_exe is None:
                _log("gcc could not build bench/sseload.c: using the Python load client")
        for name in servers:
            cls = SERVERS[name]
            reason = reasons.get(name) or cls.unavailable()
            if reason:
                results.append(Result(name, "all", skipped=reason, ok=False))
                print(json_line(results[-1]), flush=True)
                continue
            for scen in scenarios:
                _log(f"{name}: {scen}")
                fn = smoke if scen == "smoke" else SCENARIOS[scen]
                try:
                    got = fn(ctx, cls)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    got = [Result(name, scen, ok=False, error=f"{type(exc).__name__}: {exc}")]
                for r in got:
                    results.append(r)
                    print(json_line(r), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: stopping everything")
    finally:
        stop_all()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(format_table(results))
    for line in storm_ratios(results):
        print(line)
    for r in results:
        if r.extra.get("sites"):
            print()
            print(format_sites(r))
    pinning = f"server on core {server_core}, load on core {load_core}" if pin else "no pinning"
    print(f"\n{len(results)} results; {pinning}; load cpu% = load clients + publisher + redis")
    return 130 if interrupted else 0


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
