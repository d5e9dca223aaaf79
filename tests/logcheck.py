"""Log lines as the daemon writes them, for tests that check what was logged.

pytest's ``caplog.text`` shows only the messages; the facts are in each record's
structured fields, which ``rendered`` includes by formatting with the hub's own text
formatter. ``parse_text_line`` reads such a line back, strictly: a test that finds
the fields it expected knows no others were forged into the line.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from ssehub.logs import TextFormatter

__all__ = ["parse_text_line", "records_with", "rendered"]

_FORMATTER = TextFormatter()
_PAIR = re.compile(r' ([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)(?= |$)')


def rendered(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as the text format writes it, one per line."""
    return "\n".join(_FORMATTER.format(r) for r in caplog.records)


def parse_text_line(line: str, msg: str) -> dict[str, Any]:
    """The fields of one text line whose message is ``msg``; AssertionError if anything
    after the message is not a well-formed ``key=value`` pair."""
    assert "\n" not in line and "\r" not in line, line
    _, sep, rest = line.partition(f" {msg}")
    assert sep, (msg, line)
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(rest):
        m = _PAIR.match(rest, pos)
        assert m is not None, f"not a key=value pair at {rest[pos:]!r}"
        key, value = m.groups()
        assert key not in out, f"{key} twice in {line!r}"
        out[key] = json.loads(value) if value.startswith('"') else value
        pos = m.end()
    return out


def records_with(caplog: pytest.LogCaptureFixture, msg: str) -> list[dict[str, Any]]:
    """The structured fields of each captured record whose message is ``msg``."""
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == msg]
