"""The feed message format and its checks (protocol/feeds.py): socket-free, synchronous.

Every fault the issue lists (bad signature, wrong number, broken chain, over the size limit) is
refused here before anything could be stored; the node tests check the same over websockets.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kachery.protocol.codec import encode
from kachery.protocol.errors import InvalidInput
from kachery.protocol.feed_values import MAX_MESSAGE_BYTES, encode_message_value, encode_metadata
from kachery.protocol.feeds import (
    CHECKPOINT_EVERY_MESSAGES,
    MAX_BODY_BYTES,
    BodyWriter,
    ChainDiverged,
    Checkpoint,
    FeedRejected,
    FeedSigner,
    Head,
    PreparedBatch,
    SubfeedRef,
    check_message,
    decode_record,
    finish_batch,
    first_bad_signature,
    fork_evidence,
    prepare_batch,
)
from kachery.protocol.identity import KeyPair, Nonce
from kachery.protocol.uri import subfeed_hash

KEY = KeyPair(hashlib.sha256(b"feed key").digest())
OTHER = KeyPair(hashlib.sha256(b"another key").digest())
REF = SubfeedRef(KEY.id, subfeed_hash("entries"))
T0 = 1_790_000_000_000

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def signed(count: int, *, start_head: Head | None = None) -> tuple[list[list[bytes]], FeedSigner]:
    signer = FeedSigner(KEY, REF, start_head or Head.empty(REF))
    batch = signer.sign([encode_message_value({"n": i}) for i in range(count)], timestamp=T0)
    signer.commit(batch)
    return [[b, s] for b, s in zip(batch.bodies, batch.signatures, strict=True)], signer


def accept(
    items: list[list[bytes]], checkpoints: Sequence[Checkpoint] = (), head: Head | None = None
) -> tuple[PreparedBatch, Head]:
    prepared = prepare_batch(REF, head or Head.empty(REF), items, checkpoints)
    bad = first_bad_signature(REF, prepared.bodies, prepared.signatures, prepared.unproven)
    if bad is not None:
        raise FeedRejected("bad signature", index=bad)
    return prepared, finish_batch(prepared)


def resign(body: dict[str, Any], key: KeyPair = KEY) -> list[bytes]:
    data = encode(body)
    return [data, key.sign(data)]


def body_of(item: list[bytes]) -> dict[str, Any]:
    value: dict[str, Any] = cbor2.loads(item[0])
    return value


# -- the format ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    message=json_values,
    number=st.integers(min_value=0, max_value=2**63 - 1),
    timestamp=st.integers(min_value=0, max_value=2**63 - 1),
    previous=st.none() | st.binary(min_size=64, max_size=64),
    name=st.text(min_size=1, max_size=30).filter(lambda s: not s.startswith("~")),
)
def test_the_fast_body_writer_produces_exactly_the_canonical_cbor(
    message: Any, number: int, timestamp: int, previous: bytes | None, name: str
) -> None:
    ref = SubfeedRef(KEY.id, subfeed_hash(name))
    body = {
        "feedId": ref.feed_id,
        "subfeedHash": ref.subfeed_hash,
        "messageNumber": number,
        "previousSignature": previous,
        "timestamp": timestamp,
        "message": message,
        "metaData": {"submittedBy": "x"},
    }
    fast = BodyWriter(ref).body(
        number,
        previous,
        timestamp,
        encode_message_value(message),
        encode_metadata({"submittedBy": "x"}),
    )
    assert fast == encode(body)


def test_messages_number_from_zero_and_each_names_the_signature_before_it() -> None:
    items, signer = signed(3)
    bodies = [body_of(i) for i in items]
    assert [b["messageNumber"] for b in bodies] == [0, 1, 2]
    assert bodies[0]["previousSignature"] is None
    assert bodies[1]["previousSignature"] == items[0][1]
    assert bodies[2]["previousSignature"] == items[1][1]
    assert set(bodies[0]) == {
        "feedId",
        "subfeedHash",
        "messageNumber",
        "previousSignature",
        "timestamp",
        "message",
        "metaData",
    }
    assert KeyPair.sign(KEY, items[1][0]) == items[1][1]  # the signature is over the body bytes
    assert signer.head.count == 3


def test_a_valid_history_is_accepted_and_decodes() -> None:
    items, signer = signed(5)
    prepared, head = accept(items)
    assert head == signer.head
    record = decode_record(prepared.bodies[4])
    assert (record.number, record.message, record.timestamp) == (4, {"n": 4}, T0)


def test_message_values_are_json_only_and_limited_in_size() -> None:
    for bad in (b"bytes", {1: "int key"}, float("nan"), 2**64, -(2**63) - 1, {"s": {1, 2}}):
        with pytest.raises(InvalidInput):
            encode_message_value(bad)
    encode_message_value({"ok": [1, 2.5, None, True, "x", 2**64 - 1, -(2**63)]})
    with pytest.raises(InvalidInput, match="over the 65,536-byte limit"):
        encode_message_value("x" * MAX_MESSAGE_BYTES)
    with pytest.raises(InvalidInput, match="metaData must be a JSON object"):
        encode_metadata([1])  # type: ignore[arg-type]


def test_a_lone_surrogate_is_invalid_input_naming_where_it_is() -> None:
    """JSON text can spell a lone surrogate ("\\ud800"); UTF-8 cannot encode it."""
    lone = json.loads('"\\ud800"')
    with pytest.raises(InvalidInput, match=r"message\['a'\]\[1\] holds a lone surrogate"):
        encode_message_value({"a": [1, lone]})
    with pytest.raises(InvalidInput, match=r"message key .* holds a lone surrogate"):
        encode_message_value({lone: 1})
    with pytest.raises(InvalidInput, match=r"metaData\['x'\] holds a lone surrogate"):
        encode_metadata({"x": lone})


# -- faults: each is refused before anything is stored ------------------------------------------


def test_a_bad_signature_is_refused() -> None:
    items, _ = signed(3)
    items[1] = [items[1][0], bytes(64)]
    with pytest.raises(FeedRejected) as info:
        accept(items)
    assert info.value.index == 1


def test_a_message_signed_by_another_key_is_refused() -> None:
    items, _ = signed(2)
    items[1] = resign(body_of(items[1]), OTHER)
    with pytest.raises(FeedRejected, match="bad signature"):
        accept(items)


def test_a_wrong_number_is_refused_even_when_validly_signed() -> None:
    items, _ = signed(3)
    body = body_of(items[2])
    body["messageNumber"] = 7
    items[2] = resign(body)
    with pytest.raises(FeedRejected, match="numbered 7"):
        accept(items)


def test_a_broken_chain_inside_a_batch_is_refused() -> None:
    items, _ = signed(3)
    body = body_of(items[2])
    body["previousSignature"] = bytes(64)
    items[2] = resign(body)
    with pytest.raises(FeedRejected, match="does not link"):
        accept(items)


def test_an_oversized_body_is_refused_before_it_is_verified_or_decoded() -> None:
    items, _ = signed(1)
    items[0] = [items[0][0] + b"\x00" * MAX_BODY_BYTES, items[0][1]]
    with pytest.raises(FeedRejected, match="over the"):
        prepare_batch(REF, Head.empty(REF), items)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("subfeedHash", "0" * 40, "another subfeed"),
        ("timestamp", -1, "invalid timestamp"),
        ("message", b"bytes are not JSON", "not a JSON value"),
        ("metaData", [1], "metaData is not an object"),
    ],
)
def test_validly_signed_but_malformed_bodies_are_refused(
    field: str, value: Any, match: str
) -> None:
    items, _ = signed(1)
    body = body_of(items[0])
    body[field] = value
    with pytest.raises(FeedRejected, match=match):
        accept([resign(body)])


def test_cbor_tags_and_extra_fields_are_refused() -> None:
    items, _ = signed(1)
    tagged = items[0][0].replace(cbor2.dumps({"n": 0}), b"\xa1\x61n\xc1\x00")  # a datetime tag
    with pytest.raises(FeedRejected, match="malformed body"):
        accept([[tagged, KEY.sign(tagged)]])
    body = body_of(items[0])
    body["extra"] = 1
    with pytest.raises(FeedRejected, match="has fields"):
        accept([resign(body)])


def test_a_signed_message_that_does_not_follow_the_held_head_is_a_suspected_fork() -> None:
    items, _ = signed(2)
    _, head = accept(items[:1])
    other = FeedSigner(KEY, REF, Head.empty(REF))
    other_batch = other.sign([encode_message_value("other branch")] * 2, timestamp=T0)
    # The other branch's message 1 is validly signed but links to its own message 0.
    with pytest.raises(ChainDiverged) as info:
        accept([[other_batch.bodies[1], other_batch.signatures[1]]], head=head)
    assert info.value.number == 1


# -- checkpoints ---------------------------------------------------------------------------------


def test_messages_signed_with_precomputed_nonces_or_without_make_one_valid_chain() -> None:
    """The signer takes a nonce per message when it has one and signs by RFC 8032 when not
    (a dry reserve); receivers check either kind the same way, and no nonce signs twice."""
    supply = [Nonce(os.urandom(64)) for _ in range(40)]
    calls = 0

    def take() -> Nonce | None:
        nonlocal calls
        calls += 1
        return None if calls % 3 == 0 else supply.pop()  # every third message: none ready

    signer = FeedSigner(KEY, REF, Head.empty(REF), nonces=take)
    values = [encode_message_value(i) for i in range(30)]
    first = signer.sign(values, timestamp=T0)
    assert first.precomputed == 20
    again = signer.sign(values, timestamp=T0)  # not stored, so signed again: with new nonces
    assert again.precomputed == 20
    assert not supply
    signer.commit(again)
    prepared, head = accept([[b, s] for b, s in zip(again.bodies, again.signatures, strict=True)])
    assert head == again.head
    assert len(prepared.unproven) == 30
    rfc = [s for s, b in zip(again.signatures, again.bodies, strict=True) if KEY.sign(b) == s]
    assert len(rfc) == 10  # the messages signed while no nonce was ready are plain RFC 8032
    assert {s[:32] for s in first.signatures}.isdisjoint(s[:32] for s in again.signatures)


def test_the_owner_signs_checkpoints_and_they_prove_a_whole_batch_with_one_signature() -> None:
    signer = FeedSigner(KEY, REF, Head.empty(REF))
    batch = signer.sign(
        [encode_message_value(i) for i in range(CHECKPOINT_EVERY_MESSAGES + 10)], timestamp=T0
    )
    assert [c.count for c in batch.checkpoints] == [CHECKPOINT_EVERY_MESSAGES]
    items = [[b, s] for b, s in zip(batch.bodies, batch.signatures, strict=True)]
    prepared = prepare_batch(REF, Head.empty(REF), items, batch.checkpoints)
    assert prepared.proven == CHECKPOINT_EVERY_MESSAGES
    assert list(prepared.unproven) == list(range(CHECKPOINT_EVERY_MESSAGES, len(items)))
    assert prepared.checkpoints == batch.checkpoints
    assert batch.checkpoints[0].verify(REF)
    assert finish_batch(prepared).count == len(items)


def test_a_proven_batch_with_one_altered_message_loses_its_proof() -> None:
    signer = FeedSigner(KEY, REF, Head.empty(REF))
    batch = signer.sign([encode_message_value(i) for i in range(500)], timestamp=T0)
    items = [[b, s] for b, s in zip(batch.bodies, batch.signatures, strict=True)]
    body = body_of(items[7])
    body["message"] = "tampered"
    items[7] = [encode(body), items[7][1]]  # the old signature does not cover the new bytes
    prepared = prepare_batch(REF, Head.empty(REF), items, batch.checkpoints)
    assert prepared.proven == 0  # the chain no longer matches: every signature is checked
    assert first_bad_signature(REF, prepared.bodies, prepared.signatures, prepared.unproven) == 7


def test_a_checkpoint_signed_by_another_key_or_for_another_subfeed_proves_nothing() -> None:
    signer = FeedSigner(KEY, REF, Head.empty(REF))
    batch = signer.sign([encode_message_value(i) for i in range(500)], timestamp=T0)
    items = [[b, s] for b, s in zip(batch.bodies, batch.signatures, strict=True)]
    real = batch.checkpoints[0]
    forged = Checkpoint(
        real.count, real.chain_hash, OTHER.sign_body(Checkpoint.body(REF, 500, real.chain_hash))
    )
    elsewhere = SubfeedRef(KEY.id, subfeed_hash("elsewhere"))
    replayed = Checkpoint.sign(KEY, elsewhere, real.count, real.chain_hash)
    for cp in (forged, replayed):
        assert prepare_batch(REF, Head.empty(REF), items, [cp]).proven == 0


def test_checkpoint_wire_form_is_checked() -> None:
    cp = Checkpoint.sign(KEY, REF, 3, bytes(32))
    assert Checkpoint.from_wire(cp.to_wire()) == cp
    for bad in ([3, bytes(32)], [0, bytes(32), bytes(64)], [3, bytes(31), bytes(64)], "x"):
        with pytest.raises(FeedRejected):
            Checkpoint.from_wire(bad)


# -- forks ---------------------------------------------------------------------------------------


def test_two_different_validly_signed_messages_with_one_number_are_fork_evidence() -> None:
    ours, _ = signed(1)
    theirs = FeedSigner(KEY, REF, Head.empty(REF)).sign(
        [encode_message_value("written on a second machine")], timestamp=T0
    )
    held = (ours[0][0], ours[0][1])
    other = (theirs.bodies[0], theirs.signatures[0])
    evidence = fork_evidence(REF, 0, held, other)
    assert evidence is not None
    assert (evidence.first, evidence.second, evidence.number) == (held, other, 0)
    assert fork_evidence(REF, 0, held, held) is None  # a duplicate is not a fork
    with pytest.raises(FeedRejected):  # a forgery is the sender's fault, not a fork
        fork_evidence(REF, 0, held, (theirs.bodies[0], bytes(64)))
    with pytest.raises(FeedRejected):
        check_message(REF, 1, theirs.bodies[0], theirs.signatures[0])  # wrong number
