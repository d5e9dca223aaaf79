"""Results: one record per measurement, printed as a table and as JSON lines."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Result", "format_sites", "format_table", "json_line", "storm_ratios"]


@dataclass
class Result:
    """One measurement of one server in one scenario (or why there is none)."""

    server: str
    scenario: str
    label: str = ""
    subs: int = 0
    offered_dps: float = 0.0  # deliveries/s offered: messages/s x subscribers per channel
    achieved_dps: float = 0.0  # deliveries/s counted by the load clients
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    lost: int = 0
    server_cpu_pct: float | None = None
    server_rss_mb: float | None = None
    client_cpu_pct: float | None = None  # load clients + publisher, in % of one core
    load_core_pct: float | None = None  # everything on the load core (clients, pub, redis)
    client_bound: bool = False
    ok: bool = True
    skipped: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def json_line(r: Result) -> str:
    """The result as one JSON object on one line."""
    return json.dumps(asdict(r), sort_keys=True, separators=(",", ":"))


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _note(r: Result) -> str:
    if r.skipped:
        return "skipped: " + r.skipped
    if r.error:
        return "error: " + r.error.splitlines()[0][:80]
    bits = [f"{k}={v}" for k, v in r.extra.items() if k in NOTE_KEYS]
    if r.client_bound:
        bits.insert(0, "CLIENT-BOUND")
    if r.extra.get("load_shares_server_cores"):
        bits.insert(0, "LOAD SHARES SERVER CORES")
    if not r.ok:
        bits.insert(0, "FAIL")
    return " ".join(bits)


# Extra fields worth a place in the table's note column.
NOTE_KEYS = (
    "cores",
    "conns_per_s",
    "per_core_dps",
    "first_step_us_per_delivery",
    "traced_per_conn_b",
    "gc_full_ms",
    "gc_gen2_count",
    "gc_gen2_ms",
    "rss_per_conn_kb",
    "open_all_s",
    "live_all_s",
    "subscribe_calls",
    "caught_up_all_s",
    "caught_up_p50_s",
    "xrange_calls",
    "redis_cpu_s",
    "hub_us_per_delivery",
    "hub_cpu_s",
    "hub_cpu_s_resume_est",
    "peak_rss_mb",
    "redis_us_per_delivery",
    "listen_overflows",
    "failures",
    "last_delivery_ms",
    "dropped",
    "max_sustained_dps",
    "reason",
    "redis_cpu_pct",
    "server_core_busy_pct",
    "load_core_busy_pct",
)

COLUMNS = (
    "server",
    "scenario",
    "subs",
    "offered/s",
    "achieved/s",
    "p50 ms",
    "p99 ms",
    "p999 ms",
    "max ms",
    "lost",
    "srv cpu%",
    "srv rss MB",
    "load cpu%",
    "note",
)


def format_table(results: list[Result]) -> str:
    """A Markdown table (readable in a terminal too)."""
    rows = [COLUMNS]
    for r in results:
        rows.append(
            (
                r.server,
                f"{r.scenario} {r.label}".strip(),
                str(r.subs),
                _num(r.offered_dps, "{:,.0f}"),
                _num(r.achieved_dps, "{:,.0f}"),
                _num(r.p50_ms),
                _num(r.p99_ms),
                _num(r.p999_ms),
                _num(r.max_ms),
                str(r.lost),
                _num(r.server_cpu_pct, "{:.0f}"),
                _num(r.server_rss_mb),
                _num(r.load_core_pct, "{:.0f}"),
                _note(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def storm_ratios(results: list[Result]) -> list[str]:
    """``storm``'s ``open_all_s`` of each server against nchan's in the same run (issue
    22: <= 2.5x), with the live p99 beside it; nothing when nchan did not run it."""
    storms = [r for r in results if r.scenario == "storm" and r.extra.get("open_all_s")]
    nchan = next((r for r in storms if r.server == "nchan"), None)
    if nchan is None:
        return []
    base = nchan.extra["open_all_s"]
    lines = ["", f"storm open_all_s against nchan's {base:.3f} s (issue 22: <= 2.5x):"]
    for r in storms:
        if r is nchan:
            continue
        t = r.extra["open_all_s"]
        lines.append(
            f"  {r.server}: {t:.3f} s = {t / base:.2f}x nchan; live p99 {_num(r.p99_ms)} ms "
            f"(nchan {_num(nchan.p99_ms)} ms), max {_num(r.max_ms)} ms"
        )
    return lines


def format_sites(r: Result) -> str:
    """The probe's allocation sites per connection (``idle-memory --probe``)."""
    rows = [("site", "bytes/conn", "blocks/conn")]
    for s in r.extra["sites"]:
        rows.append((s["site"], f"{s['bytes_per_conn']:,.1f}", f"{s['blocks_per_conn']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    head = (
        f"{r.server} idle-memory {r.label}: tracemalloc growth per connection, "
        f"{r.extra.get('traced_per_conn_b')} B in all; full gc.collect() "
        f"{r.extra.get('gc_full_ms')} ms"
    )
    lines = [head, ""]
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
