"""Fuzzing every decoder that takes bytes from a peer (or a user), with hypothesis.

For any input the only outcomes are a value or the project's own error (a ``KacheryError``:
``RemoteProtocolError`` for a peer's bytes, ``InvalidInput`` for a user's); anything else
(KeyError, TypeError, RecursionError, nacl's RuntimeError, ...) is a bug in a decoder. Inputs are
both arbitrary and derived from real values (a real message, document, invite, feed message or
handshake transcript) with bytes flipped, cut, inserted or fields replaced, so the checks past
the outer framing are reached too.

The default budget keeps the file to seconds; a long run (5,000 examples per test, see
conftest.py): ``KACHERY_FUZZ=long .venv/bin/python -m pytest tests/test_fuzz_protocol.py
-o faulthandler_timeout=0``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from hypothesis import assume, currently_in_test_context, event, given
from hypothesis import strategies as st

from kachery.protocol import messages as messages_module
from kachery.protocol.channel import (
    Announcement,
    Invite,
    Member,
    MembershipDoc,
    Role,
    SignedDoc,
)
from kachery.protocol.codec import MAX_DEPTH, decode, encode
from kachery.protocol.errors import KacheryError, LocalProtocolError
from kachery.protocol.feed_values import encode_message_value
from kachery.protocol.feeds import (
    Checkpoint,
    FeedSigner,
    Head,
    SubfeedRef,
    check_message,
    decode_record,
)
from kachery.protocol.identity import KeyPair
from kachery.protocol.manifest import Manifest
from kachery.protocol.messages import decode_message, encode_message
from kachery.protocol.session import Admission, Claim, Session, Side, State
from kachery.protocol.uri import parse_uri

ADMIN = KeyPair(b"a" * 32)
FEED = KeyPair(b"f" * 32)
CHANNEL = KeyPair(b"c" * 32)

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


def outcome(fn: Callable[[], Any]) -> str:
    """Call ``fn``: "accepted" or "refused" (the project's error); any other exception fails."""
    try:
        fn()
    except KacheryError:
        result = "refused"
    else:
        result = "accepted"
    if currently_in_test_context():
        event(result)
    return result


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or the tail dropped."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data = data[:at]
    return bytes(data)


# -- CBOR and messages ---------------------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_decode_takes_any_bytes(data: bytes) -> None:
    outcome(lambda: decode(data))


@given(json_like.flatmap(lambda v: mutated(encode(v))))
def test_decode_takes_mutated_encodings(data: bytes) -> None:
    outcome(lambda: decode(data))


@given(st.integers(1, 100_000))
def test_deep_nesting_is_refused_not_a_recursion_error(depth: int) -> None:
    result = outcome(lambda: decode(b"\x81" * depth + b"\x00"))
    if depth > MAX_DEPTH:
        assert result == "refused"


def test_huge_declared_lengths_do_not_allocate() -> None:
    for header in [b"\x5b", b"\x7b", b"\x9b", b"\xbb"]:  # byte string, text, array, map: 2**64-1
        assert outcome(lambda header=header: decode(header + b"\xff" * 8)) == "refused"


REGISTRY = sorted(vars(messages_module)["_REGISTRY"].items())
field_values = st.one_of(
    json_like,
    st.just(CHANNEL.id),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.text(alphabet="0123456789abcdef", min_size=40, max_size=64),
)


@st.composite
def message_bodies(draw: st.DrawFn) -> bytes:
    """``[type, fields]`` of a registered type, its fields of random values, some missing or
    extra, sometimes a real value."""
    msg_type, cls = draw(st.sampled_from(REGISTRY))
    body: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing field
        body[messages_module.camel_case(f.name)] = draw(field_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=6))] = draw(field_values)
    return encode([int(msg_type), body])


@given(st.binary(max_size=500) | message_bodies())
def test_decode_message_takes_anything(data: bytes) -> None:
    def check() -> None:
        msg = decode_message(data)
        if not isinstance(msg, messages_module.UnknownMessage):
            assert decode_message(encode_message(msg)) == msg

    outcome(check)


@given(message_bodies().flatmap(mutated))
def test_decode_message_takes_mutated_messages(data: bytes) -> None:
    outcome(lambda: decode_message(data))


# -- channels: documents, invites, announcements ------------------------------------------------

DOC = MembershipDoc(
    channel_id=CHANNEL.id,
    label="lab",
    version=1,
    members=(Member(node_id=ADMIN.id, label="admin", roles=frozenset(Role)),),
    bootstrap=("ws://127.0.0.1:1",),
    issued_at=1,
).sign(CHANNEL)
INVITE = Invite(
    channel_id=CHANNEL.id,
    label="lab",
    name="lab",
    admin_id=ADMIN.id,
    bootstrap=("ws://127.0.0.1:1",),
    roles=frozenset(Role),
    expires_at=0,
    invite_id=b"i" * 16,
    secret=b"s" * 32,
).to_token(ADMIN)
ANNOUNCEMENT = Announcement.create(ADMIN, ["ws://127.0.0.1:1"], 1).to_wire()


@given(mutated(DOC.to_wire()["body"]), st.binary(max_size=80) | st.just(DOC.signature))
def test_signed_docs_from_the_wire(body: bytes, signature: bytes) -> None:
    outcome(lambda: SignedDoc.from_wire({"body": body, "signature": signature}))


@given(st.dictionaries(st.text(max_size=10), json_like, max_size=4))
def test_signed_docs_of_any_shape(value: dict[str, Any]) -> None:
    outcome(lambda: SignedDoc.from_wire(value))


def test_the_real_document_invite_and_announcement_are_accepted() -> None:
    assert SignedDoc.from_wire(DOC.to_wire()) == DOC
    assert Invite.from_token(INVITE).channel_id == CHANNEL.id
    assert Announcement.from_wire(ANNOUNCEMENT).node_id == ADMIN.id


@given(st.text(max_size=300) | mutated(INVITE.encode()).map(lambda b: b.decode("latin-1")))
def test_invite_tokens(token: str) -> None:
    outcome(lambda: Invite.from_token(token))


@given(
    st.dictionaries(st.text(max_size=10), json_like, max_size=6)
    | st.builds(
        lambda key, value: {**ANNOUNCEMENT, key: value},
        st.sampled_from(sorted(ANNOUNCEMENT)),
        json_like,
    )
)
def test_announcements(value: dict[str, Any]) -> None:
    outcome(lambda: Announcement.from_wire(value))


# -- feeds ---------------------------------------------------------------------------------------

REF = SubfeedRef(FEED.id, "1" * 40)
BATCH = FeedSigner(FEED, REF, Head.empty(REF)).sign(
    [encode_message_value({"n": i}, "message") for i in range(2)], timestamp=1
)


@given(st.integers(0, 2), mutated(BATCH.bodies[1]), st.sampled_from(BATCH.signatures))
def test_feed_message_bodies(number: int, body: bytes, signature: bytes) -> None:
    outcome(lambda: check_message(REF, number, body, signature))
    outcome(lambda: decode_record(body))


def test_real_feed_messages_are_accepted() -> None:
    for number, (body, signature) in enumerate(zip(BATCH.bodies, BATCH.signatures, strict=True)):
        check_message(REF, number, body, signature)
        decode_record(body)


@given(json_like)
def test_checkpoints_from_the_wire(value: Any) -> None:
    outcome(lambda: Checkpoint.from_wire(value))


# -- what users type or files hold ---------------------------------------------------------------


@given(st.binary(max_size=600))
def test_manifests(data: bytes) -> None:
    outcome(lambda: Manifest.from_json_bytes(data))


@given(
    st.text(max_size=200)
    | st.builds(lambda t: "sha1://" + t, st.text(max_size=120))
    | st.builds(lambda t: "feed://" + t, st.text(max_size=140))
)
def test_uris(text: str) -> None:
    outcome(lambda: parse_uri(text))


# -- the session, on both sides ------------------------------------------------------------------


def pair() -> tuple[Session, Session]:
    i = Session(Side.INITIATOR, ADMIN, ephemeral_secret=os.urandom(32), nonce=os.urandom(32))
    r = Session(Side.RESPONDER, FEED, ephemeral_secret=os.urandom(32), nonce=os.urandom(32))
    return i, r


def transcript() -> tuple[list[tuple[str, bytes]], Session, Session]:
    """A real session, established: M1..M4, a message and a data frame, each delivered; returns
    (who received it, frame) in order and the two sessions."""
    i, r = pair()
    frames: list[tuple[str, bytes]] = []
    m1 = i.send_hello()
    frames.append(("r", m1))
    r.receive(m1)
    m2 = r.send_ack("ws://127.0.0.1:9")
    frames.append(("i", m2))
    i.receive(m2)
    m3 = i.send_identity(Claim(channels=(CHANNEL.id,), docs=(DOC.to_wire(),)))
    frames.append(("r", m3))
    r.receive(m3)
    m4 = r.send_welcome(Admission(channels=(CHANNEL.id,), docs=(DOC.to_wire(),)))
    frames.append(("i", m4))
    i.receive(m4)
    ping = i.send_message(messages_module.Ping(nonce=1))
    frames.append(("r", ping))
    r.receive(ping)
    data = r.send_data(3, 0, b"data")
    frames.append(("i", data))
    i.receive(data)
    return frames, i, r


def feed(session: Session, frames: list[bytes]) -> None:
    """Give ``frames`` to ``session`` until one is refused (the session is closed then)."""
    for frame in frames:
        if session.state is State.CLOSED:
            return
        try:
            session.receive(frame)
        except LocalProtocolError:
            raise
        except KacheryError:
            assert session.state is State.CLOSED
            return


@given(st.sampled_from(["initiator", "responder"]), st.lists(st.binary(max_size=300), max_size=6))
def test_a_session_takes_any_frames_in_any_state(side: str, frames: list[bytes]) -> None:
    i, r = pair()
    session = i if side == "initiator" else r
    if side == "initiator":
        i.send_hello()
    feed(session, frames)


@given(st.data())
def test_a_session_takes_a_mutated_real_transcript(data: st.DataObject) -> None:
    frames, _, _ = transcript()
    # replay against fresh sessions: the transcript's ephemeral keys are not theirs, so the
    # responder sees a real M1 (and answers it), and everything after is someone else's
    i, r = pair()
    i.send_hello()
    order = data.draw(st.permutations(range(len(frames))))
    chosen = [frames[k] for k in order[: data.draw(st.integers(1, len(frames)))]]
    changed = []
    for who, frame in chosen:
        if data.draw(st.booleans()):
            frame = data.draw(mutated(frame))
        changed.append((who, frame))
    feed(i, [f for who, f in changed if who == "i"])
    feed(r, [f for who, f in changed if who == "r"])


@given(st.data())
def test_an_established_session_takes_mutated_frames_from_its_peer(data: st.DataObject) -> None:
    """Both sides established (the real handshake); then the peer's frames are mutated,
    duplicated, reordered or truncated: each is a message, data, or the session's end."""
    _, i, r = transcript()
    later = [i.send_message(messages_module.Ping(nonce=n)) for n in range(3)]
    later.append(i.send_data(1, 0, os.urandom(64)))
    picked = data.draw(st.lists(st.sampled_from(later), min_size=1, max_size=6))
    sent = [data.draw(mutated(f)) if data.draw(st.booleans()) else f for f in picked]
    assume(sent)
    feed(r, sent)
