"""Publisher formats: what is accepted, what is rejected and why."""

from __future__ import annotations

import pytest

from ssehub.core.messages import Event, Rejected, parse, parse_juggernaut

MAX = 1000


def test_text_payload_is_the_data() -> None:
    assert parse("text", "h\u00e9\nllo".encode(), MAX) == Event(data="h\u00e9\nllo")


def test_json_fields() -> None:
    payload = b'{"data": "hi", "event": "tick", "id": "a-1", "retry": 5000}'
    assert parse("json", payload, MAX) == Event(data="hi", event="tick", id="a-1", retry=5000)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ('{"a": 1, "b": [1, 2]}', '{"a":1,"b":[1,2]}'),
        ("[1, 2]", "[1,2]"),
        ("12", "12"),
        ("null", "null"),
        ("true", "true"),
        ('"str\\nline"', "str\nline"),
        ('{"\\u010d": "\\u010d"}', '{"\u010d":"\u010d"}'),
    ],
)
def test_json_non_string_data_is_sent_as_compact_json(data: str, expected: str) -> None:
    assert parse("json", b'{"data": %s}' % data.encode(), MAX).data == expected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"just a string"', "invalid_json"),
        (b'{"event": "x"}', "bad_field"),
        (b'{"data": "x", "extra": 1}', "bad_field"),
        (b'{"data": "x", "id": 5}', "bad_field"),
        (b'{"data": "x", "event": ["a"]}', "bad_field"),
        (b'{"data": "x", "id": "a\\nid: b"}', "bad_field"),
        (b'{"data": "x", "id": "a\\rb"}', "bad_field"),
        (b'{"data": "x", "id": "a\\u0000b"}', "bad_field"),
        (b'{"data": "x", "event": "a\\n\\ndata: fake"}', "bad_field"),
        (b'{"data": "x", "retry": -1}', "bad_field"),
        (b'{"data": "x", "retry": "10"}', "bad_field"),
        (b'{"data": "x", "retry": true}', "bad_field"),
        (b'{"data": "x", "retry": 1.5}', "bad_field"),
        (b'{"data": "x", "id": "' + b"i" * 257 + b'"}', "bad_field"),
        (b'{"data": "\xff"}', "invalid_utf8"),
        (b'{"data": "' + b"x" * MAX + b'"}', "too_large"),
    ],
)
def test_json_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as info:
        parse("json", payload, MAX)
    assert info.value.reason == reason


def test_juggernaut_channels_and_channel() -> None:
    assert parse_juggernaut(b'{"channels": ["a", "b"], "data": {"x": 1}}', MAX) == (
        ["a", "b"],
        Event(data='{"x":1}'),
    )
    assert parse_juggernaut(b'{"channel": "a", "data": "hi"}', MAX) == (["a"], Event(data="hi"))
    # Juggernaut's `except` option is accepted (sessions do not exist yet).
    assert parse_juggernaut(b'{"channels": ["a", "a"], "data": 1, "except": "s1"}', MAX)[0] == ["a"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"data": 1}',
        b'{"channels": "a", "data": 1}',
        b'{"channels": [1], "data": 1}',
        b'{"channels": ["a"]}',
        b'{"channels": ["a"], "data": 1, "bogus": 2}',
        b"nope",
    ],
)
def test_juggernaut_rejections(payload: bytes) -> None:
    with pytest.raises(Rejected):
        parse_juggernaut(payload, MAX)
