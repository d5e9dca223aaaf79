"""The SSE encoder, byte for byte."""

from __future__ import annotations

import pytest

from ssehub.core import sse


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("hello", b"data: hello\n\n"),
        ("", b"data: \n\n"),
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\n", b"data: a\ndata: \n\n"),
        ("\n", b"data: \ndata: \n\n"),
        ("a\r\n\r\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        (" leading space", b"data:  leading space\n\n"),
        ("p\u0159\u00edli\u0161 \U0001f600", "data: p\u0159\u00edli\u0161 \U0001f600\n\n".encode()),
        ("x\n\ndata: injected", b"data: x\ndata: \ndata: data: injected\n\n"),
        ("x\r\rid: 9\r", b"data: x\ndata: \ndata: id: 9\ndata: \n\n"),
        ("nul\x00inside", b"data: nul\x00inside\n\n"),
    ],
)
def test_data_lines_split_on_every_line_break(data: str, expected: bytes) -> None:
    assert sse.encode(data) == expected


def test_all_fields_in_order() -> None:
    assert sse.encode("d", event="tick", id="42", retry=1500) == (
        b"id: 42\nevent: tick\nretry: 1500\ndata: d\n\n"
    )


def test_empty_event_type_is_omitted() -> None:
    assert sse.encode("d", event="") == b"data: d\n\n"


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\r\nb", "a\x00b", "\n\ndata: x"])
@pytest.mark.parametrize("field", ["id", "event"])
def test_line_breaks_or_nul_in_id_or_event_are_refused(field: str, bad: str) -> None:
    with pytest.raises(sse.EncodeError):
        sse.encode("d", **{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.5, "10"])
def test_retry_must_be_a_non_negative_int(bad: object) -> None:
    with pytest.raises(sse.EncodeError):
        sse.encode("d", retry=bad)  # type: ignore[arg-type]
    with pytest.raises(sse.EncodeError):
        sse.retry(bad)  # type: ignore[arg-type]


def test_comment_and_retry_lines() -> None:
    assert sse.comment() == b":\n\n"
    assert sse.comment("ping") == b":ping\n\n"
    assert sse.retry(0) == b"retry: 0\n\n"
    with pytest.raises(sse.EncodeError):
        sse.comment("a\nb")


def test_chunk_framing() -> None:
    assert sse.chunk(b"data: hi\n\n") == b"a\r\ndata: hi\n\n\r\n"
    payload = b"x" * 300
    assert sse.chunk(payload) == b"12c\r\n" + payload + b"\r\n"
    assert sse.LAST_CHUNK == b"0\r\n\r\n"
