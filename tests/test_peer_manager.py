"""Dial planning and backoff, socket-free."""

from __future__ import annotations

import random

from kachery.node.daemon.peer_manager import BACKOFF_CAP, Backoff, DialTarget, plan_dials


def plan(**overrides: object) -> list[DialTarget]:
    args: dict[str, object] = {
        "now": 100.0,
        "wanted": {},
        "addresses": {},
        "bootstrap": {},
        "connected": set(),
        "connected_channels": set(),
        "in_progress": set(),
        "backoff": {},
        "own_addresses": set(),
    }
    args.update(overrides)
    return plan_dials(**args)  # type: ignore[arg-type]


def test_members_with_known_addresses_are_dialed_most_shared_first() -> None:
    targets = plan(
        wanted={"a": {"c1"}, "b": {"c1", "c2"}, "nowhere": {"c1"}},
        addresses={"a": ["ws://a:1"], "b": ["ws://b:1"]},
    )
    assert targets == [DialTarget("ws://b:1", "b"), DialTarget("ws://a:1", "a")]


def test_connected_in_progress_and_backing_off_targets_are_skipped() -> None:
    waiting = Backoff()
    waiting.failed(now=100.0, jitter=0.5)
    targets = plan(
        wanted={"a": {"c"}, "b": {"c"}, "d": {"c"}, "e": {"c"}},
        addresses={n: [f"ws://{n}:1"] for n in "abde"},
        connected={"a"},
        in_progress={"b"},
        backoff={"d": waiting},
    )
    assert targets == [DialTarget("ws://e:1", "e")]


def test_bootstrap_addresses_are_used_while_no_member_of_the_channel_is_connected() -> None:
    targets = plan(bootstrap={"c": ["ws://own:1", "ws://boot:1"]}, own_addresses={"ws://own:1"})
    assert targets == [DialTarget("ws://boot:1", None)]
    assert plan(bootstrap={"c": ["ws://boot:1"]}, connected_channels={"c"}) == []


def test_connections_are_bounded() -> None:
    wanted = {f"n{i}": {"c"} for i in range(100)}
    addresses = {n: [f"ws://{n}:1"] for n in wanted}
    targets = plan(
        wanted=wanted,
        addresses=addresses,
        connected={f"x{i}" for i in range(60)},
        in_progress={"y1", "y2"},
        max_connections=64,
    )
    assert len(targets) == 2


def test_a_failing_target_rotates_through_its_addresses() -> None:
    state = Backoff()
    state.failed(now=0.0, jitter=0.0)
    targets = plan(
        now=1000.0,
        wanted={"a": {"c"}},
        addresses={"a": ["ws://first:1", "ws://second:1"]},
        backoff={"a": state},
    )
    assert targets == [DialTarget("ws://second:1", "a")]


def test_backoff_grows_exponentially_with_jitter_up_to_a_cap() -> None:
    rng = random.Random(7)
    state = Backoff()
    delays = []
    for _ in range(20):
        state.failed(now=0.0, jitter=rng.random())
        delays.append(state.next_at)
    assert delays[0] < 2
    assert delays[5] > delays[0] * 8
    assert max(delays) <= BACKOFF_CAP * 1.5
    assert min(delays[10:]) >= BACKOFF_CAP * 0.5
