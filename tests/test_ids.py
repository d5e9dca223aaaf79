"""Ids: epochs, sequence ids, stream entry ids, /events ids and session ids (core/ids.py)."""

from __future__ import annotations

import pytest

from ssehub.core.ids import (
    MAX_ENTRY_PART,
    Numbering,
    compact,
    expand,
    hub_part,
    just_before,
    mux_id,
    parse_stream_id,
    split_mux_id,
)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1700000000000-3", (1700000000000, 3)),
        ("0-0", (0, 0)),
        (f"{MAX_ENTRY_PART}-{MAX_ENTRY_PART}", (MAX_ENTRY_PART, MAX_ENTRY_PART)),
        # One past Redis's 64-bit range, in either half: no entry id.
        (f"1-{MAX_ENTRY_PART + 1}", None),
        (f"{MAX_ENTRY_PART + 1}-0", None),
        ("1700000000000-99999999999999999999", None),
        ("1-" + "9" * 21, None),
        ("1700000000000", None),
        ("-1-0", None),
        ("1-+2", None),
        ("\uff11-2", None),  # a full-width digit: isdigit() but not ASCII
        ("", None),
    ],
)
def test_parse_stream_id_takes_only_what_redis_takes(
    text: str, parsed: tuple[int, int] | None
) -> None:
    assert parse_stream_id(text) == parsed


def test_compact_ids_round_trip_and_out_of_range_ones_are_no_ids() -> None:
    for entry_id in ["0-0", "1700000000000-0", "1700000000000-17", f"{MAX_ENTRY_PART}-1"]:
        assert expand(compact(entry_id)) == entry_id
    assert expand("zzzzzzzzzzzzzzzzz") is None  # 36**17 - 1 > 2**64 - 1 ms
    assert expand("1-zzzzzzzzzzzzzzzzz") is None
    assert expand("a-") is None
    assert split_mux_id("e-5~zzzzzzzzzzzzzzzzz", 1) == ("e-5", None)


def test_mux_ids_carry_each_stream_position() -> None:
    value = mux_id("e", 5, ["1700000000000-0", "1700000000001-2"])
    assert split_mux_id(value, 2) == ("e-5", ["1700000000000-0", "1700000000001-2"])
    assert hub_part(value) == "e-5" and hub_part("e-6") == "e-6"
    assert split_mux_id(value, 1) == ("e-5", None)  # the channel list changed


def test_just_before_is_the_greatest_id_below() -> None:
    assert just_before("5-3") == "5-2"
    assert just_before("5-0") == f"4-{MAX_ENTRY_PART}"
    assert just_before("0-0") == "0-0"


def test_numbering_knows_only_its_own_positions() -> None:
    numbering = Numbering("ep")
    numbering.seq = 7
    assert numbering.position() == "ep-7"
    assert numbering.own("ep-7") == 7
    assert numbering.own("ep-8") is None  # not handed out yet
    assert numbering.own("other-3") is None
    assert numbering.seq_of("ep-8") == 8
    assert Numbering().epoch != Numbering().epoch
