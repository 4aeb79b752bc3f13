"""The membership chain's rules: a removal stands, and a race between admins converges."""

from __future__ import annotations

import os

from kachery.protocol.channel import (
    ALL_ROLES,
    Accepted,
    ChannelHistory,
    Member,
    MembershipDoc,
    Role,
    SignedDoc,
)
from kachery.protocol.identity import KeyPair

ADMIN = frozenset({Role.ADMIN, Role.REQUEST_FILES})
PLAIN = frozenset({Role.REQUEST_FILES})


def key() -> KeyPair:
    return KeyPair(os.urandom(32))


def first(owner: KeyPair, *members: Member) -> SignedDoc:
    doc = MembershipDoc(channel_id=owner.id, label="lab", version=1, members=members)
    return doc.sign(owner)


def test_a_removed_admin_cannot_roll_the_chain_back() -> None:
    owner, x, y, m = key(), key(), key(), key()
    v1 = first(
        owner,
        Member(x.id, "x", ADMIN),
        Member(y.id, "y", ADMIN),
        Member(m.id, "m", PLAIN),
    )
    v2 = v1.doc.with_member(Member(key().id, "z", PLAIN), issued_at=2).sign(y)
    v3 = v2.doc.without_member(x.id, issued_at=3).sign(owner)
    history = ChannelHistory(owner.id, [v1, v2, v3])
    # X re-signs version 2 (dropping the innocent m), grinding until its signature is lower
    forged = None
    for t in range(1000):
        candidate = v1.doc.without_member(m.id, issued_at=100 + t).sign(x)
        if candidate.signature < v2.signature:
            forged = candidate
            break
    assert forged is not None
    assert history.accept(forged) is Accepted.KNOWN
    current = history.current
    assert current is not None
    assert current.doc.version == 3
    assert current.doc.member(x.id) is None
    assert current.doc.member(m.id) is not None


def test_two_admins_racing_converge_whichever_arrives_first() -> None:
    owner, x, y = key(), key(), key()
    v1 = first(owner, Member(x.id, "x", ADMIN), Member(y.id, "y", ADMIN))
    removes_y = v1.doc.without_member(y.id, issued_at=2).sign(x)
    adds_z = v1.doc.with_member(Member(key().id, "z", PLAIN), issued_at=2).sign(y)
    one = ChannelHistory(owner.id, [v1])
    one.accept(removes_y)
    one.accept(adds_z)
    other = ChannelHistory(owner.id, [v1])
    other.accept(adds_z)
    other.accept(removes_y)
    assert one.current is not None
    assert other.current is not None
    assert one.current.signature == other.current.signature == removes_y.signature


def test_the_owners_document_still_wins() -> None:
    owner, x = key(), key()
    v1 = first(owner, Member(x.id, "x", ADMIN))
    by_x = v1.doc.with_member(Member(key().id, "z", PLAIN), issued_at=2).sign(x)
    by_owner = v1.doc.without_member(x.id, issued_at=2).sign(owner)
    history = ChannelHistory(owner.id, [v1, by_x])
    assert history.accept(by_owner) is Accepted.NEW
    assert history.accept(by_x) is Accepted.KNOWN
    assert history.current is not None
    assert history.current.signature == by_owner.signature


def test_an_honest_chain_is_accepted_in_any_order() -> None:
    owner, a = key(), key()
    docs = [first(owner, Member(a.id, "a", ALL_ROLES))]
    for n in range(2, 7):
        doc = docs[-1].doc.with_member(Member(key().id, f"m{n}", PLAIN), issued_at=n)
        docs.append(doc.sign(a))
    for order in (docs, list(reversed(docs))):
        history = ChannelHistory(owner.id)
        for _ in range(len(order)):  # out of order, each pass takes one more
            for d in order:
                history.accept(d)
        assert history.version == 6
