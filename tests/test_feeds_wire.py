"""Golden vectors for feeds (tests/vectors/feeds.json): each feed message type encodes to exactly
the recorded bytes and decodes back; a subfeed signed with a fixed key gives exactly the recorded
bodies, signatures, chain values and checkpoint. A failure means the wire or signing format
changed: that needs a new protocol version, not a new vector."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from kachery.protocol.feed_messages import (
    FeedGet,
    FeedGetResponse,
    FeedGraft,
    FeedHave,
    FeedPrune,
    FeedPush,
    FeedSubmit,
    FeedSubmitResponse,
    FeedSubscribe,
    FeedSubscribeResponse,
    FeedUnsubscribe,
)
from kachery.protocol.feed_values import encode_message_value, encode_metadata
from kachery.protocol.feeds import (
    Checkpoint,
    FeedSigner,
    Head,
    SubfeedRef,
    finish_batch,
    prepare_batch,
)
from kachery.protocol.identity import KeyPair
from kachery.protocol.messages import Message, MsgType, decode_message, encode_message

from .conftest import load_vectors

C = "c" * 64
F = "f" * 64
S = "0123456789abcdef0123456789abcdef01234567"
MESSAGES: dict[str, Message] = {
    "FeedSubscribe": FeedSubscribe(id=1, channel=C, feed_id=F, subfeed_hash=S, count=5),
    "FeedSubscribeResponse": FeedSubscribeResponse(id=1, count=7, mesh=True),
    "FeedHave": FeedHave(channel=C, feed_id=F, subfeed_hash=S, count=7),
    "FeedGet": FeedGet(id=2, channel=C, feed_id=F, subfeed_hash=S, start=5, limit=1000),
    "FeedGetResponse": FeedGetResponse(
        id=2,
        start=5,
        messages=[[b"\x01", b"\x02" * 64]],
        checkpoints=[[6, b"\x03" * 32, b"\x04" * 64]],
        count=7,
    ),
    "FeedPush": FeedPush(
        channel=C,
        feed_id=F,
        subfeed_hash=S,
        start=6,
        messages=[[b"\x05", b"\x06" * 64]],
        checkpoints=[],
    ),
    "FeedUnsubscribe": FeedUnsubscribe(channel=C, feed_id=F, subfeed_hash=S),
    "FeedSubmit": FeedSubmit(
        id=3, channel=C, feed_id=F, subfeed_hash=S, messages=[{"note": "x"}, 1.5]
    ),
    "FeedSubmitResponse": FeedSubmitResponse(id=3, start=7, count=2),
    "FeedPrune": FeedPrune(channel=C, feed_id=F, subfeed_hash=S),
    "FeedGraft": FeedGraft(channel=C, feed_id=F, subfeed_hash=S),
}
VECTORS: dict[str, Any] = load_vectors("feeds.json")


@pytest.mark.parametrize("vector", VECTORS["messages"], ids=lambda v: v["name"])
def test_feed_messages_encode_to_their_golden_bytes_and_back(vector: dict[str, Any]) -> None:
    msg = MESSAGES[vector["name"]]
    assert int(msg.TYPE) == vector["type"]
    assert encode_message(msg).hex() == vector["hex"]
    assert decode_message(bytes.fromhex(vector["hex"])) == msg


def test_every_feed_message_type_has_a_vector_and_the_numbers_are_fixed() -> None:
    assert {v["name"] for v in VECTORS["messages"]} == set(MESSAGES)
    assert {v["type"] for v in VECTORS["messages"]} == {int(t) for t in MsgType if 50 <= t < 70}
    assert MsgType.FEED_SUBSCRIBE == 50
    assert MsgType.FEED_SUBMIT_RESPONSE == 58
    assert MsgType.FEED_GRAFT == 60


def test_a_subfeed_signed_with_a_fixed_key_gives_the_recorded_bytes() -> None:
    v = VECTORS["signedSubfeed"]
    key = KeyPair(hashlib.sha256(v["seedSha256Of"].encode()).digest())
    assert key.id == v["feedId"]
    ref = SubfeedRef(key.id, v["subfeedHash"])
    assert ref.chain_start().hex() == v["chainStart"]
    batch = FeedSigner(key, ref, Head.empty(ref)).sign(
        [encode_message_value(m["message"]) for m in v["messages"]],
        timestamp=v["timestamp"],
        metadata=encode_metadata(v["metaData"]),
    )
    for i, m in enumerate(v["messages"]):
        assert batch.bodies[i].hex() == m["body"]
        assert batch.signatures[i].hex() == m["signature"]  # Ed25519 is deterministic
        assert batch.chains[i].hex() == m["chain"]
    cp = v["checkpoint"]
    checkpoint = Checkpoint(
        cp["count"], bytes.fromhex(cp["chainHash"]), bytes.fromhex(cp["signature"])
    )
    assert checkpoint == Checkpoint.sign(key, ref, cp["count"], batch.chains[-1])
    items = [[bytes.fromhex(m["body"]), bytes.fromhex(m["signature"])] for m in v["messages"]]
    prepared = prepare_batch(ref, Head.empty(ref), items, [checkpoint])
    assert prepared.proven == 2
    assert finish_batch(prepared).count == 2
