"""A planted failure: a real source whose ``run()`` raises on cue, in a real process.

``plant(tmp_path, env)`` writes a ``sitecustomize.py`` that Python imports at start-up
(in the hub's process and in every worker it starts, which inherit the environment)
and that wraps the real class's ``run``: it runs as always until the trigger file
names this process (its pid, or ``*``), then raises. That is what a bug in a source
looks like from outside: the task ends with an exception while its state still says
UP. ``what``: ``broker`` (the pub/sub Broker: a single process's, or main's) or
``replays`` (a worker's stream side, StreamReplays).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENV = "SSEHUB_PLANTED_FAILURE"


def plant(tmp_path: Path, what: str) -> tuple[dict[str, str], Path]:
    """The environment for a process with the failure planted, and its trigger file."""
    site = tmp_path / "planted"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from tests.planted import install\ninstall()\n"
    )
    trigger = tmp_path / "fail-now"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, ENV: f"{what}:{trigger}"}, trigger


def install() -> None:
    """Wrap the chosen class's ``run`` (from sitecustomize, when the variable is set)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    what, trigger = spec.split(":", 1)
    cls: Any
    if what == "broker":
        from ssehub.redis.pubsub import Broker as cls
    else:
        from ssehub.redis.streams import StreamReplays as cls
    original = cls.run

    async def run(self: Any) -> None:
        inner = asyncio.ensure_future(original(self))
        try:
            while not _triggered(trigger):  # noqa: ASYNC110 - a test's file, polled
                await asyncio.sleep(0.02)
        finally:
            inner.cancel()
        raise RuntimeError(f"planted failure in {type(self).__name__}.run")

    cls.run = run


def _triggered(trigger: str) -> bool:
    try:
        named = Path(trigger).read_text().split()
    except FileNotFoundError:
        return False
    return "*" in named or str(os.getpid()) in named
