"""Golden wire vectors of the task messages (tests/vectors/task-messages.json): each encodes to
exactly the recorded bytes and decodes back. A failure means the wire format changed, which
needs a new protocol version, not a new vector."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from kachery.protocol.messages import Message, decode_message, encode_message
from kachery.protocol.tasks import (
    TaskCancel,
    TaskLookup,
    TaskLookupResponse,
    TaskProviders,
    TaskRequest,
    TaskRequestResponse,
    TaskStatusBatch,
)

from .conftest import load_vectors

C = "c" * 64
H = "0123456789abcdef0123456789abcdef01234567"
URI = f"sha1://{H}"
DATA = b'{"unit-1":1.33}'
DATA_URI = "sha1://" + hashlib.sha1(DATA).hexdigest()
MESSAGES: dict[str, Message] = {
    "TaskRequest": TaskRequest(
        id=1,
        channel=C,
        request_id="r1",
        function_id="spikesort.v1",
        task_type="pure-calculation",
        task_id=H,
        kwargs={"threshold": 5.5, "recording": URI},
    ),
    "TaskRequestResponse": TaskRequestResponse(
        id=1,
        status="finished",
        lease_ms=30000,
        result_uri=DATA_URI,
        result_kind="json",
        result_size=len(DATA),
        result_data=DATA,
    ),
    "TaskStatusBatch": TaskStatusBatch(
        channel=C,
        lease_ms=30000,
        updates=[
            {"requestId": "r1", "status": "running"},
            {"requestId": "r2", "status": "error", "error": "ValueError: no"},
            {
                "requestId": "r3",
                "status": "finished",
                "resultUri": DATA_URI,
                "resultKind": "json",
                "resultSize": len(DATA),
                "resultData": DATA,
            },
        ],
    ),
    "TaskProviders": TaskProviders(
        channel=C, generation=2, functions={"spikesort.v1": "pure-calculation", "note.v1": "action"}
    ),
    "TaskCancel": TaskCancel(channel=C, request_id="r1"),
    "TaskLookup": TaskLookup(
        id=2, channel=C, task_id=H, kwargs_digest=H, task_type="pure-calculation"
    ),
    "TaskLookupResponse": TaskLookupResponse(
        id=2,
        found=True,
        result_uri=URI,
        result_kind="bytes",
        result_size=1024,
        finished_at=1700000000000,
    ),
}
VECTORS: list[dict[str, Any]] = load_vectors("task-messages.json")["messages"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_task_message_encodes_to_its_golden_bytes_and_back(vector: dict[str, Any]) -> None:
    msg = MESSAGES[vector["name"]]
    assert encode_message(msg).hex() == vector["hex"]
    assert decode_message(bytes.fromhex(vector["hex"])) == msg


def test_every_task_message_has_a_vector_and_its_number_is_fixed() -> None:
    assert {v["name"] for v in VECTORS} == set(MESSAGES)
    assert {name: int(msg.TYPE) for name, msg in MESSAGES.items()} == {
        "TaskRequest": 70,
        "TaskRequestResponse": 71,
        "TaskStatusBatch": 72,
        "TaskProviders": 73,
        "TaskCancel": 74,
        "TaskLookup": 76,
        "TaskLookupResponse": 77,
    }


def test_one_task_encoding_derived_by_hand() -> None:
    # [74, {"channel": 64 x "c", "requestId": "r1"}] in canonical CBOR (RFC 8949 4.2.1: map keys
    # sorted by length first): array(2), uint 74 (0x18 0x4a), map(2), text(7) "channel",
    # text(64) (0x78 0x40) "ccc...", text(9) "requestId", text(2) "r1".
    expected = (
        "82"
        + "184a"
        + "a2"
        + "67"
        + b"channel".hex()
        + "7840"
        + "63" * 64
        + "69"
        + b"requestId".hex()
        + "62"
        + b"r1".hex()
    )
    assert encode_message(TaskCancel(channel=C, request_id="r1")).hex() == expected
