"""The hub's workers process model with ``workers: 1``: main plus ONE worker.

``python -m ssehub`` runs a config with ``workers: 1`` as a single process; this entry
runs the same config as the CLI would with ``workers: 2`` or more (the node's main
process feeding its workers, ``ssehub.supervisors.multiprocess``), but with one
worker, so ``workers-scaling`` can tell what the process model costs from what a second
worker adds. Run as a script by path (``python bench/hub_node.py --config F --port N``)
from the source tree under test, with ``PYTHONPATH`` on it: ``sys.path[0]`` is then
``bench/``, so ``import ssehub`` finds that tree. It uses only what the CLI uses
(``ssehub.config.load``, ``logs.setup``, the supervisor's ``run``); no hub code changes.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/hub_node.py")
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--port", type=int)
    p.add_argument("--log-level")
    args = p.parse_args()

    from ssehub import logs
    from ssehub.config import load
    from ssehub.supervisors.multiprocess import run

    config = load(args.config)
    if args.port is not None:
        config = config.with_listen(None, args.port)
    logs.setup(config.logging, level=args.log_level)
    return run(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
