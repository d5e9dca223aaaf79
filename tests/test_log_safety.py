"""Logs cannot be forged: client and publisher text is escaped and bounded, and
structured fields come from the record's data, never from parsing its message; and no
line, at any level, carries a token or a fragment of one."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from ssehub.http import auth
from ssehub.logs import HIDDEN_PARAMS, MAX_VALUE, JsonFormatter, TextFormatter, fields, redact

from .conftest import StartHub
from .logcheck import parse_text_line
from .sseclient import wait_until

FORMATTERS = {"text": TextFormatter, "json": JsonFormatter}


class Captured:
    """Lines the hub's own formatter (text or json) writes for the ``ssehub.access`` and
    ``ssehub.hub.ingest`` loggers, the ones that carry client and publisher text."""

    def __init__(self, format: str) -> None:
        self.format = format
        self.out = io.StringIO()
        self.handler = logging.StreamHandler(self.out)
        self.handler.setFormatter(FORMATTERS[format]())

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


@pytest.fixture(params=sorted(FORMATTERS))
def captured(request: pytest.FixtureRequest) -> Iterator[Captured]:
    cap = Captured(request.param)
    loggers = [logging.getLogger(name) for name in ("ssehub.access", "ssehub.hub.ingest")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(cap.handler)
        logger.setLevel(logging.INFO)
    yield cap
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(cap.handler)
        logger.setLevel(level)


def read_line(cap: Captured, line: str, msg: str) -> dict[str, Any]:
    """One written line's fields (envelope dropped), whichever the format; the line must
    be one line of printable, UTF-8-encodable text."""
    line.encode("utf-8")  # a lone surrogate written raw would fail here, or in the shipper
    assert line.isprintable(), line
    if cap.format == "text":
        return parse_text_line(line, msg)
    obj = json.loads(line)
    assert obj.pop("msg") == msg
    assert set(obj.pop(k) is not None for k in ("ts", "level", "logger")) == {True}
    return {k: str(v) for k, v in obj.items()}


@pytest.mark.parametrize(
    ("agent", "target"),
    [
        (b'x" status=500 remote=10.0.0.1 y="', b"/healthz"),
        (b"a\tb status=500 remote=10.0.0.1", b'/healthz?q="x"&status=500'),
        (b"\xff\xfe not utf-8", b"/channels/%22%20status=500%0aforged"),
        (b'\\" status=500 \\', b"/channels/chat?remote=10.0.0.1&x=\\"),
    ],
)
async def test_hostile_user_agent_and_path_cannot_forge_access_log_fields(
    start_hub: StartHub, captured: Captured, agent: bytes, target: bytes
) -> None:
    hub = await start_hub(logging={"access_log": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nUser-Agent: %s\r\n\r\n" % (target, agent))
        status = int((await asyncio.wait_for(reader.readline(), 5)).split()[1])
        await wait_until(lambda: captured.lines(), timeout=5)
    finally:
        writer.close()
    (line,) = captured.lines()
    assert read_line(captured, line, "request") == {
        "remote": "127.0.0.1",
        "method": "GET",
        "path": target.decode(),
        "status": str(status),
        "agent": agent.decode("utf-8", "surrogateescape"),
    }


async def test_publisher_text_in_log_lines_is_escaped_and_bounded(
    start_hub: StartHub, captured: Captured, redis_client: Any
) -> None:
    hub = await start_hub({"chat": {}}, juggernaut={"enabled": True})
    forged = 'x" reason=forged\n2026-01-01 00:00:00,000 ERROR ssehub.hub.hub forged \x1b[2J\u2028'
    names = [forged, "n" * 5000]
    await redis_client.publish("juggernaut", json.dumps({"channels": names, "data": "d"}))
    await wait_until(lambda: captured.lines(), timeout=5)
    (line,) = captured.lines()
    got = read_line(captured, line, "message rejected")
    assert (got["channel"], got["reason"]) == ("juggernaut", "unknown_channel")
    assert got["detail"].startswith(forged)
    assert len(got["detail"]) < MAX_VALUE + 30 and got["detail"].endswith(" more chars]")
    assert hub.hub.stats.rejected[("juggernaut", "unknown_channel")] == 2


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("chat", "chat"),
        ("", '""'),
        ("a b", '"a b"'),
        ("k=v", '"k=v"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("\x1b[31mred", '"\\u001b[31mred"'),
        ("del\x7f", '"del\\u007f"'),
        ("sep\u2028", '"sep\\u2028"'),
        ("lone\udcff", '"lone\\udcff"'),
        ("h\u00e9\u010d", "h\u00e9\u010d"),  # printable non-ASCII stays readable
        (200, "200"),
        (0.25, "0.25"),
        (None, "null"),
    ],
)
def test_text_values_are_quoted_and_escaped_when_needed(value: Any, shown: str) -> None:
    record = logging.LogRecord("ssehub.x", logging.INFO, "f", 1, "event", None, None)
    record.fields = {"v": value}
    assert TextFormatter().format(record).endswith(f" INFO ssehub.x event v={shown}")


def test_every_string_value_is_bounded_in_both_formats() -> None:
    record = logging.LogRecord("ssehub.x", logging.INFO, "f", 1, "event", None, None)
    record.fields = {"long": "x" * 10_000, "obj": ["y" * 10_000]}
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert len(line) < 2 * MAX_VALUE + 200
        assert line.count("more chars]") == 2


def test_json_fields_come_from_record_data_never_from_the_message() -> None:
    record = logging.LogRecord(
        "ssehub.x", logging.WARNING, "f", 1, "odd status=%s", ("500 remote=1.2.3.4",), None
    )
    record.fields = {"level": "forged", "msg": "forged", "channel": "chat"}
    obj = json.loads(JsonFormatter().format(record))
    assert obj == {
        "ts": obj["ts"],
        "level": "WARNING",
        "logger": "ssehub.x",
        "msg": "odd status=500 remote=1.2.3.4",
        "field_level": "forged",
        "field_msg": "forged",
        "channel": "chat",
    }


def test_fields_helper_is_for_extra() -> None:
    assert fields(channel="chat", n=1) == {"fields": {"channel": "chat", "n": 1}}


# --- credentials --------------------------------------------------------------------

SECRET = b"a-test-secret-that-is-long-enough-for-hs256"
JWT = jwt.encode({"exp": 1796278000, "ssehub": {"subscribe": ["user.42"]}}, SECRET)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/channels/a?token=abc", "/channels/a?token=REDACTED"),
        ("/e?channel=a&token=abc&channel=b", "/e?channel=a&token=REDACTED&channel=b"),
        ("/e?%74oken=abc&x=1", "/e?%74oken=REDACTED&x=1"),
        ("/e?tokens=abc&mytoken=1", "/e?tokens=abc&mytoken=1"),
        ("b'GET /c?token=a.b.c HTTP/1.1'", "b'GET /c?token=REDACTED HTTP/1.1'"),
        ("/channels/chat", "/channels/chat"),
        ("/c?meta=Ann&x=1", "/c?meta=REDACTED&x=1"),
        # A second '?' or a ';' starts a parameter too (issue 20).
        ("/c?x=1?token=abc", "/c?x=1?token=REDACTED"),
        ("/c?x=1;token=abc", "/c?x=1;token=REDACTED"),
        ("/c?x=1;%74oken=abc&y=2", "/c?x=1;%74oken=REDACTED&y=2"),
        ("/c?x=a?b=c;token=abc", "/c?x=a?b=c;token=REDACTED"),
        # A hidden value runs to the next '&', whatever it holds.
        ("/c?meta=a;b?c&x=1", "/c?meta=REDACTED&x=1"),
        # Anything shaped like a JWT, wherever it stands, and any fragment of one.
        (f"Bearer {JWT}", "Bearer REDACTED"),
        (f"a=1; ssehub_token={JWT}", "a=1; ssehub_token=REDACTED"),
        (f"b'Bearer {JWT[:93]}'...", "b'Bearer REDACTED'..."),
        (f"/c?x=1%26token={JWT}", "/c?x=1%26token=REDACTED"),
        ("heyJude eyJ", "heyJude REDACTED"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_the_token_query_parameter_is_one_that_logs_hide() -> None:
    assert auth.QUERY_PARAM in HIDDEN_PARAMS


def test_formatters_redact_every_string_the_message_fields_and_traceback() -> None:
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        record = logging.LogRecord(
            "aiohttp.x", logging.DEBUG, "f", 1, "got %s", (f"/c?x=1;token={JWT}",), True
        )
        record.exc_info = sys.exc_info()
    record.fields = {"header": f"Bearer {JWT}", "cookie": f"sid=1; ssehub_token={JWT}"}
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "REDACTED" in line
        for fragment in (JWT, JWT[:20], JWT.split(".")[1][:20], JWT.split(".")[2]):
            assert fragment not in line


@pytest.fixture(params=sorted(FORMATTERS))
def every_line(request: pytest.FixtureRequest) -> Iterator[Captured]:
    """Every record of every logger, down to DEBUG, through the hub's formatter."""
    cap = Captured(request.param)
    root = logging.getLogger()
    level = root.level
    root.addHandler(cap.handler)
    root.setLevel(logging.DEBUG)
    yield cap
    root.removeHandler(cap.handler)
    root.setLevel(level)


def assert_no_token(lines: list[str]) -> None:
    for line in lines:
        line.encode("utf-8")
        for fragment in ("eyJ", JWT.split(".")[1][:12], JWT.split(".")[2][:12]):
            assert fragment not in line, line


async def test_no_query_spelling_of_a_token_reaches_a_log_line(
    start_hub: StartHub, every_line: Captured
) -> None:
    hub = await start_hub(logging={"access_log": True})
    targets = [
        f"/channels/chat?x=1?token={JWT}",
        f"/channels/chat?x=1;token={JWT}",
        f"/healthz?x=1;token={JWT}&y=2",
        f"/nope?x=1?%74oken={JWT}",
    ]
    for target in targets:
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
    await wait_until(
        lambda: sum('"request"' in ln or " request " in ln for ln in every_line.lines()) >= 4
    )
    assert_no_token(every_line.lines())
    assert sum("REDACTED" in line for line in every_line.lines()) >= 4


@pytest.mark.parametrize("header", ["Authorization: Bearer {}", "Cookie: ssehub_token={}"])
async def test_an_oversized_credential_header_logs_no_fragment_of_it(
    start_hub: StartHub, every_line: Captured, header: str
) -> None:
    hub = await start_hub(logging={"access_log": True})
    value = header.format(JWT + "x" * 9000)  # over limits.max_field_size
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    try:
        writer.write(f"GET /channels/chat HTTP/1.1\r\nHost: x\r\n{value}\r\n\r\n".encode())
        status = int((await asyncio.wait_for(reader.readline(), 5)).split()[1])
    finally:
        writer.close()
    assert status in (400, 431)
    await wait_until(lambda: any("bad request" in ln for ln in every_line.lines()))
    assert_no_token(every_line.lines())
    (line,) = [ln for ln in every_line.lines() if "bad request" in ln]
    assert "LineTooLong" in line
