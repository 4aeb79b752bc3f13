"""The kachery/1 session state machine, socket-free: two sessions wired together in memory."""

from __future__ import annotations

import ctypes
import os

import pytest

from kachery.protocol import CloseCode, KeyPair, LocalProtocolError, RemoteProtocolError
from kachery.protocol import session as session_module
from kachery.protocol.messages import ErrorReply, Ping, UnknownMessage, decode_message
from kachery.protocol.session import (
    Admission,
    Claim,
    DataReceived,
    HelloReceived,
    InitiatorIdentified,
    JoinProof,
    MessageReceived,
    Refused,
    ResponderIdentified,
    Session,
    Side,
    State,
    Welcomed,
)

ALICE = KeyPair(b"a" * 32)
BOB = KeyPair(b"b" * 32)
CHANNEL = KeyPair(b"c" * 32).id


def pair(expected: str | None = None) -> tuple[Session, Session]:
    i = Session(
        Side.INITIATOR,
        ALICE,
        ephemeral_secret=os.urandom(32),
        nonce=os.urandom(32),
        expected_peer=expected,
    )
    r = Session(Side.RESPONDER, BOB, ephemeral_secret=os.urandom(32), nonce=os.urandom(32))
    return i, r


def handshake(i: Session, r: Session, claim: Claim | None = None) -> InitiatorIdentified:
    assert isinstance(r.receive(i.send_hello()), HelloReceived)
    ev = i.receive(r.send_ack("ws://127.0.0.1:5555"))
    assert ev == ResponderIdentified(BOB.id, "ws://127.0.0.1:5555")
    ident = r.receive(i.send_identity(claim or Claim(channels=(CHANNEL,))))
    assert isinstance(ident, InitiatorIdentified)
    return ident


def established() -> tuple[Session, Session]:
    i, r = pair()
    handshake(i, r)
    ev = i.receive(r.send_welcome(Admission(channels=(CHANNEL,))))
    assert ev == Welcomed(Admission(channels=(CHANNEL,)))
    return i, r


def test_both_sides_learn_the_others_proven_identity_and_the_claim() -> None:
    i, r = pair(expected=BOB.id)
    join = JoinProof(invite_id=b"i" * 16, proof=b"p" * 32)
    claim = Claim(channels=(CHANNEL,), join=join, docs=({"x": 1},), addresses=("ws://h:1",))
    ident = handshake(i, r, claim)
    assert ident == InitiatorIdentified(ALICE.id, claim)
    assert r.peer_id == ALICE.id
    assert i.peer_id == BOB.id
    assert i.transcript_hash == r.transcript_hash


def test_messages_and_data_flow_both_ways_after_the_welcome() -> None:
    i, r = established()
    assert i.state is r.state is State.ESTABLISHED
    for _ in range(3):
        assert r.receive(i.send_message(Ping(nonce=7))) == MessageReceived(Ping(nonce=7))
        assert i.receive(
            r.send_message(ErrorReply(id=1, code="x", message="y"))
        ) == MessageReceived(ErrorReply(id=1, code="x", message="y"))
    ev = i.receive(r.send_data(5, 1 << 40, b"payload" * 1000))
    assert isinstance(ev, DataReceived)
    assert (ev.stream, ev.offset, bytes(ev.payload)) == (5, 1 << 40, b"payload" * 1000)


def test_a_refusal_reaches_the_initiator_with_its_code() -> None:
    i, r = pair()
    handshake(i, r)
    ev = i.receive(r.send_refusal(CloseCode.NOT_A_MEMBER, "not a member of any shared channel"))
    assert ev == Refused(CloseCode.NOT_A_MEMBER, "not a member of any shared channel")
    assert i.state is r.state is State.CLOSED


@pytest.mark.parametrize("mutate", ["flip", "truncate", "replay", "reorder", "drop"])
def test_tampered_replayed_reordered_or_dropped_frames_end_the_session(mutate: str) -> None:
    i, r = established()
    f1 = i.send_message(Ping(nonce=1))
    f2 = i.send_message(Ping(nonce=2))
    if mutate == "flip":
        frames = [f1[:10] + bytes([f1[10] ^ 1]) + f1[11:]]
    elif mutate == "truncate":
        frames = [f1[:-1]]
    elif mutate == "replay":
        assert r.receive(f1) == MessageReceived(Ping(nonce=1))
        frames = [f1]
    elif mutate == "reorder":
        frames = [f2]
    else:  # drop f1, deliver f2
        frames = [f2]
    for f in frames[:-1]:
        r.receive(f)
    with pytest.raises(RemoteProtocolError, match="failed authentication") as info:
        r.receive(frames[-1])
    assert info.value.close_code == CloseCode.BAD_FRAME
    assert r.state is State.CLOSED


def test_a_version_mismatch_names_both_versions() -> None:
    from kachery.protocol.codec import encode

    r = Session(Side.RESPONDER, BOB, ephemeral_secret=os.urandom(32), nonce=os.urandom(32))
    m1 = encode({"protocol": "kachery/2", "e": os.urandom(32), "n": os.urandom(32)})
    with pytest.raises(
        RemoteProtocolError, match="'kachery/2', this node speaks 'kachery/1'"
    ) as info:
        r.receive(m1)
    assert info.value.close_code == CloseCode.VERSION_MISMATCH


def test_reaching_another_node_than_the_one_dialed_is_refused() -> None:
    i, r = pair(expected=KeyPair(b"z" * 32).id)
    r.receive(i.send_hello())
    with pytest.raises(RemoteProtocolError, match="dialed node") as info:
        i.receive(r.send_ack())
    assert info.value.close_code == CloseCode.AUTHENTICATION_FAILED


def test_an_impostor_cannot_reuse_a_signature_from_another_handshake() -> None:
    # Mallory relays Bob's M2 from one handshake into another: the transcript differs.
    i1, r1 = pair()
    i2, _ = pair()
    r1.receive(i1.send_hello())
    i2.send_hello()
    with pytest.raises(RemoteProtocolError):
        i2.receive(r1.send_ack())


def test_an_initiator_signature_is_bound_to_this_responder_and_transcript() -> None:
    i, r = pair()
    r.receive(i.send_hello())
    i.receive(r.send_ack())
    m3 = bytearray(i.send_identity(Claim()))
    m3[-40] ^= 1  # inside the encrypted box: authentication fails before anything is read
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        r.receive(bytes(m3))


@pytest.mark.parametrize(
    "data", [b"", b"\x00", b"garbage that is not cbor \xff", b"\xa0", os.urandom(100)]
)
def test_malformed_first_messages_are_protocol_errors(data: bytes) -> None:
    r = Session(Side.RESPONDER, BOB, ephemeral_secret=os.urandom(32), nonce=os.urandom(32))
    with pytest.raises(RemoteProtocolError):
        r.receive(data)
    assert r.state is State.CLOSED


def test_out_of_order_handshake_steps_are_refused() -> None:
    i, r = pair()
    with pytest.raises(LocalProtocolError, match="cannot send_identity"):
        i.send_identity(Claim())
    with pytest.raises(LocalProtocolError, match="cannot send_frame"):
        r.send_message(Ping(nonce=1))
    r.receive(i.send_hello())
    with pytest.raises(RemoteProtocolError, match="where the peer must wait"):
        r.receive(b"\xa0")


def test_oversized_frames_are_refused_before_decryption() -> None:
    _, r = established()
    with pytest.raises(RemoteProtocolError, match="exceeds") as info:
        r.receive(bytes(5 * 1024 * 1024))
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_an_unknown_message_type_is_an_event_not_a_crash() -> None:
    from kachery.protocol.codec import encode

    assert decode_message(encode([999, {"id": 4}])) == UnknownMessage(type=999, id=4)
    with pytest.raises(RemoteProtocolError, match="wrong type"):
        decode_message(encode([2, {"nonce": "seven"}]))
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        decode_message(encode([2, {"nonce": 1, "extra": 2}]))
    with pytest.raises(RemoteProtocolError, match=r"\[type, fields\]"):
        decode_message(encode({"nonce": 1}))


@pytest.mark.parametrize("sender_direct", [True, False])
def test_direct_libsodium_and_pynacls_public_bindings_agree_frame_for_frame(
    monkeypatch: pytest.MonkeyPatch, sender_direct: bool
) -> None:
    """The fast path (PyNaCl's libsodium called directly) and the public bindings interoperate,
    including the tampering check, so a PyNaCl without the private module still talks to us."""
    assert session_module._SODIUM is not None, "this PyNaCl should expose libsodium directly"
    direct = session_module._SODIUM
    i, r = established()
    payload = os.urandom(256 * 1024 + 3)

    def use(fast: bool) -> None:
        monkeypatch.setattr(session_module, "_SODIUM", direct if fast else None)

    for n in range(3):
        use(sender_direct)
        frame = i.send_data(1, n, payload)
        message = i.send_message(Ping(nonce=n))
        use(not sender_direct)
        ev = r.receive(frame)
        assert isinstance(ev, DataReceived)
        assert (ev.offset, bytes(ev.payload)) == (n, payload)
        assert r.receive(message) == MessageReceived(Ping(nonce=n))
    use(sender_direct)
    frame = i.send_data(1, 9, payload)
    use(not sender_direct)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        r.receive(frame[:-1] + bytes([frame[-1] ^ 1]))


def test_large_data_payloads_start_on_a_page_boundary_in_memory() -> None:
    """So the downloader can write them with O_DIRECT without copying (node/services/files/)."""
    i, r = established()
    for size in (session_module.ALIGNED_FROM, 100_000, 256 * 1024, 4 << 20):
        for _ in range(3):
            ev = r.receive(i.send_data(7, size, os.urandom(size)))
            assert isinstance(ev, DataReceived)
            assert len(ev.payload) == size
            address = ctypes.addressof(ctypes.c_char.from_buffer(ev.payload))
            assert address % session_module.PAYLOAD_ALIGN == 0
    payload = os.urandom(256 * 1024)
    ev = r.receive(i.send_data(7, 0, payload))
    assert isinstance(ev, DataReceived)
    assert bytes(ev.payload) == payload


@pytest.mark.parametrize("size", [0, 1, 31])
def test_a_frame_shorter_than_its_tag_fails_authentication(size: int) -> None:
    _, r = established()
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        r.receive(os.urandom(size))
    assert r.state is State.CLOSED


def test_m1_and_m2_are_bounded_to_their_fixed_shapes_before_decoding() -> None:
    i, r = pair()
    hello = i.send_hello()
    assert len(hello) <= session_module.MAX_HELLO_BYTES
    padded = session_module.encode(
        {"protocol": session_module.PROTOCOL, "e": b"e" * 32, "n": b"n" * 32, "pad": b"x" * 64}
    )
    with pytest.raises(RemoteProtocolError) as info:
        r.receive(padded)
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
    assert "M1 of" in str(info.value)
    i, r = pair()
    r.receive(i.send_hello())
    ack = r.send_ack("ws://" + "h" * 1000 + ":1")  # an address past the bound is left out
    assert len(ack) <= session_module.MAX_ACK_BYTES
    event = i.receive(ack)
    assert event == ResponderIdentified(BOB.id, "")
    i, r = pair()
    r.receive(i.send_hello())
    with pytest.raises(RemoteProtocolError) as info:
        i.receive(b"\xa0" + b"\x00" * session_module.MAX_ACK_BYTES)
    assert info.value.close_code is CloseCode.MESSAGE_TOO_BIG
