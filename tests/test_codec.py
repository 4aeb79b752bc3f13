from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kachery.protocol import LocalProtocolError, RemoteProtocolError, decode, encode
from kachery.protocol.codec import MAX_DEPTH
from kachery.protocol.errors import CloseCode

# Canonical CBOR written out by hand from RFC 8949 (not produced by the code under test).
GOLDEN: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (-1, "20"),
    (24, "1818"),
    (1000, "1903e8"),
    (2**64 - 1, "1bffffffffffffffff"),
    (-(2**64), "3bffffffffffffffff"),
    ("a", "6161"),
    ("é", "62c3a9"),
    (b"\x01\x02", "420102"),
    ([], "80"),
    ([1, [2, 3]], "8201820203"),
    ({"b": 1, "a": 2}, "a2616102616201"),  # keys sorted
    ({"aa": 1, "b": 2}, "a261620262616101"),  # shorter key first
    (True, "f5"),
    (False, "f4"),
    (None, "f6"),
    (1.5, "f93e00"),  # the shortest float that holds the value exactly
    (100000.0, "fa47c35000"),
    (1.1, "fb3ff199999999999a"),
]


@pytest.mark.parametrize(("value", "hex_bytes"), GOLDEN, ids=lambda x: repr(x)[:20])
def test_golden_encodings(value: Any, hex_bytes: str) -> None:
    assert encode(value).hex() == hex_bytes
    assert decode(bytes.fromhex(hex_bytes)) == value


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_like)
def test_round_trip_and_determinism(value: Any) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data


@pytest.mark.parametrize(
    ("hex_bytes", "complaint"),
    [
        ("c100", "tags are not allowed"),
        ("d81c81d81d00", "tags are not allowed"),  # shared references would build a cycle
        ("9fff", "indefinite-length"),
        ("f7", "simple value 23"),
        ("", "truncated"),
        ("1903", "truncated CBOR header"),
        ("0000", "1 trailing bytes"),
        ("6561", "string runs past the end"),
        ("9bffffffffffffffff00", "declares more items"),
        ("a2616101616102", "malformed CBOR"),  # duplicate key
        ("1c", "reserved"),
    ],
)
def test_refused_inputs(hex_bytes: str, complaint: str) -> None:
    with pytest.raises(RemoteProtocolError, match=complaint) as info:
        decode(bytes.fromhex(hex_bytes))
    assert info.value.close_code == CloseCode.BAD_FRAME


def test_depth_is_checked_before_decoding() -> None:
    deep = bytes([0x81] * (MAX_DEPTH + 1)) + b"\x00"
    with pytest.raises(RemoteProtocolError, match="deeper than"):
        decode(deep)
    ok = bytes([0x81] * (MAX_DEPTH - 1)) + b"\x00"
    assert decode(ok) is not None


def test_size_is_checked_first() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds") as info:
        decode(b"\x00" * 100, max_bytes=10)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    "value", [{1.5: 1}, {"x": {1, 2}}, object(), 2**64, [[[]]] * 0 + [object()]]
)
def test_values_that_cannot_be_sent_are_a_local_error(value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode(value)
