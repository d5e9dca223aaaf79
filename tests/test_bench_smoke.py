"""The benchmark harness itself must not rot: run its smoke mode end to end.

No timing assertions: only that real figures came out (events delivered, none lost,
every JSON line parses). The smoke run needs no baselines, only redis-server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _bench(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> list[Any]:
    """Run ``python -m bench ARGS`` (``env``: the whole environment); its JSON lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def test_bench_base_server_runs_the_hub_of_another_source_tree(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BENCH_BASE_SRC"}
    # Unset, or a directory without the package: skipped, saying why.
    (unset,) = _bench("--smoke", "--servers", "ssehub-base", env=env)
    assert unset["server"] == "ssehub-base" and "BENCH_BASE_SRC" in unset["skipped"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (nothing,) = _bench(
        "--smoke", "--servers", "ssehub-base", env={**env, "BENCH_BASE_SRC": str(empty)}
    )
    assert "no ssehub/__init__.py" in nothing["skipped"]
    # A copy of the package that notes every process importing it: the hub is one.
    base = tmp_path / "base"
    shutil.copytree(ROOT / "ssehub", base / "ssehub", ignore=shutil.ignore_patterns("__pycache__"))
    marks = tmp_path / "imports.txt"
    with open(base / "ssehub" / "__init__.py", "a") as f:
        f.write(f"\nimport sys as _s\nopen({str(marks)!r}, 'a').write(' '.join(_s.argv) + '\\n')\n")
    (r,) = _bench("--smoke", "--servers", "ssehub-base", env={**env, "BENCH_BASE_SRC": str(base)})
    assert r["server"] == "ssehub-base" and not r["skipped"] and not r["error"], r
    assert r["extra"]["received"] == r["extra"]["expected"] > 0
    argvs = marks.read_text().splitlines()
    assert any("--config" in a for a in argvs), argvs  # the hub, not only the import check


def test_bench_smoke_sized_issue_22_scenarios_report_their_figures() -> None:
    results = _bench(
        "--smoke",
        "--scenario",
        "storm,workers-scaling,idle-memory,stream-resume-storm",
        "--probe",
        timeout=240,
    )
    assert all(not r["error"] and not r["skipped"] for r in results), results
    by = {}
    for r in results:
        by.setdefault(r["scenario"], []).append(r)

    (storm,) = by["storm"]
    assert storm["subs"] == 200 and storm["extra"]["failures"] == 0
    assert storm["extra"]["open_all_s"] > 0
    # The live subscribers' delivery during the storm, beside its time.
    assert storm["extra"]["live_received"] == storm["extra"]["live_expected"] > 0
    assert storm["p99_ms"] is not None and storm["max_ms"] is not None
    # --probe: collections counted by the probe's gc.callbacks over the storm.
    assert storm["extra"]["gc_gen0_count"] > 0

    cores = len(os.sched_getaffinity(0))
    scaling = by["workers-scaling"]
    labels = [r["label"] for r in scaling]
    variants = ["single", "workers 1"] + [f"workers {k}" for k in range(2, cores + 1)]
    assert labels == [f"{v}: {what}" for v in variants for what in ("deliveries", "connections")]
    for r in scaling:
        if r["label"].endswith("deliveries"):
            assert r["extra"]["max_sustained_dps"] > 0 and r["extra"]["steps"]
        else:
            assert r["subs"] == 200 and r["extra"]["conns_per_s"] > 0
    if cores >= 2:
        # workers 2 may use both cores: the load's core is one of them, and it says so.
        assert all(
            bool(r["extra"].get("load_shares_server_cores")) == (r["extra"]["workers"] >= 2)
            for r in scaling
        )

    probe = next(r for r in by["idle-memory"] if r["label"].startswith("probe"))
    assert probe["subs"] == 100
    assert probe["extra"]["traced_per_conn_b"] > 0 and probe["extra"]["gc_full_ms"] >= 0
    sites = probe["extra"]["sites"]
    assert len(sites) == 16 and sites[0]["bytes_per_conn"] >= sites[14]["bytes_per_conn"]

    resumes = by["stream-resume-storm"]
    assert len(resumes) == 2
    for r in resumes:
        assert r["extra"]["caught_up"] == 50 and r["extra"]["live_after"] == 50
        assert r["extra"]["live_received"] == r["extra"]["live_expected"] > 0
        assert r["p99_ms"] is not None and r["extra"]["peak_rss_mb"] > 0
        assert r["extra"]["hub_cpu_s"] >= 0
