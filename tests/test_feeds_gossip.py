"""The gossip planner, the penalty box and the feed wire messages: socket-free, time as numbers."""

from __future__ import annotations

import pytest

from kachery.protocol.errors import RemoteProtocolError
from kachery.protocol.feed_gossip import (
    Have,
    Pull,
    Push,
    SubfeedGossip,
)
from kachery.protocol.feed_messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    FeedGet,
    FeedGetResponse,
    FeedPush,
    FeedSubscribe,
)
from kachery.protocol.messages import decode_message, encode_message
from kachery.protocol.penalties import PenaltyBox

CH = "c" * 64
FEED = "f" * 64
SUB = "5" * 40


def peers(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(1, n + 1)]


def test_the_first_subscribers_form_the_mesh_the_rest_are_lazy() -> None:
    g = SubfeedGossip(degree=2)
    a, b, c = peers(3)
    assert g.subscribed(a, CH, 0) is True
    assert g.subscribed(b, CH, 0) is True
    assert g.subscribed(c, CH, 0) is False
    assert g.mesh_size() == 2


def test_new_messages_are_pushed_to_the_mesh_and_announced_to_the_rest() -> None:
    g = SubfeedGossip(degree=1, have_delay=0.0)
    a, b = peers(2)
    g.subscribed(a, CH, 0)
    g.subscribed(b, CH, 0)
    plan = g.plan_flush(count=3, cached_from=0, now=10.0)
    assert plan.pushes == [Push(a, CH, 0)]
    assert plan.haves == [Have(b, CH, 3)]
    # Nothing new: nothing to send (duplicate suppression by what each peer is known to hold).
    again = g.plan_flush(count=3, cached_from=0, now=11.0)
    assert again.pushes == []
    assert again.haves == []
    # The mesh peer gets exactly what it lacks.
    assert g.plan_flush(count=5, cached_from=0, now=12.0).pushes == [Push(a, CH, 3)]


def test_a_peer_known_to_hold_messages_is_not_sent_them_again() -> None:
    g = SubfeedGossip(degree=4)
    a, b = peers(2)
    g.subscribed(a, CH, 0)
    g.subscribed(b, CH, 0)
    g.has(a, 5)  # a pushed them to us (or announced them)
    plan = g.plan_flush(count=5, cached_from=0, now=0.0)
    assert plan.pushes == [Push(b, CH, 0)]


def test_announcements_to_a_lazy_peer_are_delayed_paced_and_coalesced() -> None:
    g = SubfeedGossip(degree=0, have_delay=0.005, have_interval=0.05)
    (a,) = peers(1)
    g.subscribed(a, CH, 0)
    delayed = g.plan_flush(count=1, cached_from=0, now=1.0)  # the eager path goes first
    assert delayed.haves == []
    assert delayed.wake_at == pytest.approx(1.005)
    assert g.plan_flush(count=2, cached_from=0, now=1.005).haves == [Have(a, CH, 2)]
    paced = g.plan_flush(count=3, cached_from=0, now=1.011)
    assert paced.haves == []
    assert paced.wake_at == pytest.approx(1.055)
    assert g.plan_flush(count=4, cached_from=0, now=1.06).haves == [Have(a, CH, 4)]


def test_a_mesh_peer_too_far_behind_the_memory_cache_is_told_to_pull() -> None:
    g = SubfeedGossip(degree=1, have_delay=0.0)
    (a,) = peers(1)
    g.subscribed(a, CH, 10)
    plan = g.plan_flush(count=5000, cached_from=1000, now=0.0)
    assert plan.pushes == []
    assert plan.haves == [Have(a, CH, 5000)]


def test_a_small_gap_waits_for_the_eager_push_then_pulls() -> None:
    g = SubfeedGossip(pull_grace=0.005, live_gap=64)
    a, b = peers(2)
    g.source_added(a, CH, 3)
    g.source_added(b, CH, 0)
    first = g.plan_pull(count=0, now=1.0)
    assert first.pull is None
    assert first.wake_at == pytest.approx(1.005)
    # The eager push did not come in time: pull, and graft back onto the announcer.
    assert g.plan_pull(count=0, now=1.006).pull == Pull(a, CH, 0, 3, graft=True)


def test_a_large_gap_is_pulled_at_once_from_whoever_has_the_most() -> None:
    g = SubfeedGossip(live_gap=64)
    a, b, c = peers(3)
    g.source_added(a, CH, 500)
    g.source_added(b, CH, 100_000)  # any node may serve: not only the owner
    g.source_added(c, CH, 0)
    assert g.plan_pull(count=0, now=0.0).pull == Pull(b, CH, 0, 100_000)
    assert g.plan_pull(count=0, now=0.0, busy=frozenset({b})).pull == Pull(a, CH, 0, 500)
    assert g.plan_pull(count=100_000, now=0.0).pull is None


def test_a_pruned_peer_gets_announcements_until_it_grafts_back() -> None:
    g = SubfeedGossip(degree=2, have_delay=0.0)
    a, b = peers(2)
    g.subscribed(a, CH, 0)
    g.subscribed(b, CH, 0)
    g.pruned(a)  # a got our push as a duplicate: it has another eager path
    plan = g.plan_flush(count=1, cached_from=0, now=0.0)
    assert plan.pushes == [Push(b, CH, 0)]
    assert plan.haves == [Have(a, CH, 1)]
    assert g.mesh_size() == 1  # a prune does not pull another peer into the eager set
    g.grafted(a)  # a had to pull what we announced: push to it again
    # (an announcement is not a delivery: a is pushed everything it is not known to hold)
    assert g.plan_flush(count=2, cached_from=0, now=1.0).pushes == [
        Push(a, CH, 0),
        Push(b, CH, 1),
    ]


def test_a_diverged_peer_is_never_pulled_from_nor_pushed_to() -> None:
    g = SubfeedGossip(degree=2, live_gap=0)
    a, b = peers(2)
    g.source_added(a, CH, 10)
    g.subscribed(a, CH, 0)
    g.subscribed(b, CH, 0)
    g.diverged(a)
    assert g.plan_pull(count=0, now=0.0).pull is None
    assert [p.peer for p in g.plan_flush(count=3, cached_from=0, now=0.0).pushes] == [b]


def test_when_a_mesh_peer_leaves_a_lazy_one_takes_its_place() -> None:
    g = SubfeedGossip(degree=1)
    a, b = peers(2)
    g.subscribed(a, CH, 0)
    g.subscribed(b, CH, 0)
    g.gone(a)
    assert g.peers[b].mesh
    g.unsubscribed(b)
    assert g.mesh_size() == 0


def test_penalties_close_a_repeat_offender_and_ban_it_for_a_while() -> None:
    box = PenaltyBox(threshold=3, ban_seconds=60)
    (a,) = peers(1)
    assert box.offence(a, 0.0) is False
    assert box.offence(a, 1.0) is False
    assert not box.banned(a, 1.0)
    assert box.offence(a, 2.0) is True
    assert box.banned(a, 30.0)
    assert box.banned_peers(30.0) == frozenset({a})
    assert not box.banned(a, 62.1)


# -- wire messages ------------------------------------------------------------------------------


def test_feed_messages_round_trip_and_check_their_fields() -> None:
    push = FeedPush(
        channel=CH,
        feed_id=FEED,
        subfeed_hash=SUB,
        start=4,
        messages=[[b"body", bytes(64)]],
        checkpoints=[[5, bytes(32), bytes(64)]],
    )
    assert decode_message(encode_message(push)) == push
    with pytest.raises(RemoteProtocolError, match="feedId"):
        FeedSubscribe(id=1, channel=CH, feed_id="F" * 64, subfeed_hash=SUB, count=0)
    with pytest.raises(RemoteProtocolError, match="limit"):
        FeedGet(id=1, channel=CH, feed_id=FEED, subfeed_hash=SUB, start=0, limit=0)
    with pytest.raises(RemoteProtocolError, match="over 1000 messages"):
        FeedGetResponse(
            id=1,
            start=0,
            messages=[[b"", b""]] * (MAX_BATCH_MESSAGES + 1),
            checkpoints=[],
            count=0,
        )
    with pytest.raises(RemoteProtocolError, match="bytes of messages"):
        FeedGetResponse(
            id=1, start=0, messages=[[b"x" * MAX_BATCH_BYTES, b"y"]], checkpoints=[], count=0
        )
    with pytest.raises(RemoteProtocolError, match="wrong type"):
        FeedPush(
            channel=CH,
            feed_id=FEED,
            subfeed_hash=SUB,
            start=0,
            messages=[["not bytes", b""]],  # type: ignore[list-item]
            checkpoints=[],
        )
