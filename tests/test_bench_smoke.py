"""The benchmark harness itself must not rot: run its smoke mode end to end.

No timing assertions: only that real figures came out (events delivered, none lost,
every JSON line parses). The smoke run needs no baselines, only redis-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_delivers_every_event_and_prints_json_lines() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout + proc.stderr[-2000:]
    results = [json.loads(ln) for ln in lines]
    assert [(r["server"], r["scenario"]) for r in results] == [("ssehub", "smoke")]
    (r,) = results
    assert not r["error"] and not r["skipped"]
    assert r["subs"] == 6
    assert r["extra"]["published"] > 0
    assert r["extra"]["received"] == r["extra"]["expected"] > 0
    assert r["lost"] == 0
    assert r["achieved_dps"] > 0
    assert r["p50_ms"] is not None and r["max_ms"] is not None
    # The table is printed too.
    assert "| ssehub | smoke" in proc.stdout
