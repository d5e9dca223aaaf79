"""Command line: arguments to a validated Config to a supervisor's ``run()``; exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .. import __version__, logs
from ..config import ConfigError, load

__all__ = ["main", "EXIT_CONFIG", "EXIT_STARTUP"]

EXIT_CONFIG = 2  # the config file is missing or invalid
EXIT_STARTUP = 3  # valid config, but the hub could not start (e.g. port in use)
# (1, EXIT_FAILED in supervisors/process.py: a long-lived task ended while running)

DEFAULT_CONFIG = "/etc/ssehub/ssehub.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssehub", description="Server-Sent Events hub fed by Redis pub/sub."
    )
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("SSEHUB_CONFIG", DEFAULT_CONFIG),
        help="YAML config file (default: $SSEHUB_CONFIG or %(default)s)",
    )
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.add_argument("--host", help="override listen.host")
    p.add_argument("--port", type=int, help="override listen.port")
    p.add_argument("--log-level", help="logging level, overriding logging.level in the config")
    p.add_argument("--version", action="version", version=f"ssehub {__version__}")
    return p


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, load the config, run the hub; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["token"]:  # a subcommand, leaving `ssehub --config …` as it was
        from .token import main as token_main

        return token_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.host is not None or args.port is not None:
            config = config.with_listen(args.host, args.port)
    except ConfigError as exc:
        print(f"ssehub: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        counts = config.counts()
        summary = ", ".join(
            _count(n, *words)
            for n, words in (
                (counts["channels"], ("channel", "channels")),
                (counts["families"], ("family", "families")),
                (config.workers, ("worker", "workers")),
            )
        )
        print(f"{args.config}: ok ({summary})")
        return 0

    try:
        logs.setup(config.logging, level=args.log_level)
    except ValueError as exc:  # an unknown --log-level
        print(f"ssehub: --log-level: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if config.workers > 1:
            from ..supervisors.multiprocess import run as run_node

            return run_node(config, args.log_level)
        from ..supervisors.single import run

        return run(config)
    except OSError as exc:
        logging.getLogger("ssehub").error("cannot start", extra=logs.fields(error=str(exc)))
        return EXIT_STARTUP
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside run()
        pass
    return 0
