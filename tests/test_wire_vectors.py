"""Golden wire vectors (tests/vectors/messages.json): every message type encodes to exactly the
bytes recorded, and those bytes decode back to the same message. A failure here means the wire
format changed: that needs a new protocol version, not a new vector."""

from __future__ import annotations

from typing import Any

import pytest

from kachery.protocol.files import (
    CancelData,
    FindFile,
    FindFileResponse,
    GetData,
    GetDataResponse,
)
from kachery.protocol.messages import (
    ChannelLeave,
    DocAnnounce,
    DocPush,
    DocRequest,
    DocResponse,
    ErrorReply,
    Message,
    PeerAnnounce,
    PeerListRequest,
    PeerListResponse,
    Ping,
    Pong,
    decode_message,
    encode_message,
)

from .conftest import load_vectors

C = "c" * 64
H = "0123456789abcdef0123456789abcdef01234567"
MESSAGES: dict[str, Message] = {
    "ErrorReply": ErrorReply(id=7, code="not-permitted", message="lacks role requestFiles"),
    "Ping": Ping(nonce=1),
    "Pong": Pong(nonce=1),
    "DocAnnounce": DocAnnounce(channel=C, version=3),
    "DocRequest": DocRequest(id=2, channel=C, after=1),
    "DocResponse": DocResponse(id=2, docs=[{"body": b"\x01", "signature": b"\x02"}]),
    "DocPush": DocPush(channel=C, docs=[]),
    "PeerAnnounce": PeerAnnounce(channel=C, announcements=[]),
    "PeerListRequest": PeerListRequest(id=3, channel=C),
    "PeerListResponse": PeerListResponse(id=3, announcements=[]),
    "ChannelLeave": ChannelLeave(channel=C),
    "FindFile": FindFile(id=4, channel=C, sha1=H),
    "FindFileResponse": FindFileResponse(id=4, has=True, size=45000000, manifest_sha1=H),
    "GetData": GetData(id=5, channel=C, sha1=H, start=20000000, end=40000000, stream=9),
    "GetDataResponse": GetDataResponse(id=5, sent=20000000),
    "CancelData": CancelData(stream=9),
}
VECTORS: list[dict[str, Any]] = load_vectors("messages.json")["messages"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_message_encodes_to_its_golden_bytes_and_back(vector: dict[str, Any]) -> None:
    msg = MESSAGES[vector["name"]]
    assert encode_message(msg).hex() == vector["hex"]
    assert decode_message(bytes.fromhex(vector["hex"])) == msg


def test_every_vector_has_a_message_and_the_type_numbers_are_fixed() -> None:
    assert {v["name"] for v in VECTORS} == set(MESSAGES)
    numbers = {name: int(msg.TYPE) for name, msg in MESSAGES.items()}
    assert numbers == {
        "ErrorReply": 1,
        "Ping": 2,
        "Pong": 3,
        "DocAnnounce": 10,
        "DocRequest": 11,
        "DocResponse": 12,
        "DocPush": 13,
        "PeerAnnounce": 20,
        "PeerListRequest": 21,
        "PeerListResponse": 22,
        "ChannelLeave": 23,
        "FindFile": 30,
        "FindFileResponse": 31,
        "GetData": 32,
        "GetDataResponse": 33,
        "CancelData": 34,
    }


def test_one_encoding_derived_by_hand() -> None:
    # [2, {"nonce": 1}]: array(2), uint 2, map(1), text(5) "nonce", uint 1 (RFC 8949).
    assert encode_message(Ping(nonce=1)).hex() == "82" + "02" + "a1" + "656e6f6e6365" + "01"
