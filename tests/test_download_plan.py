"""The download plan, socket-free: assignment order, rate ranking, end game, failures."""

from __future__ import annotations

from kachery.protocol.files import (
    MAX_PROVIDER_FAILURES,
    PIECES_PER_PROVIDER,
    DownloadPlan,
    Piece,
    pieces_of,
)
from kachery.protocol.manifest import hash_bytes


def plan(n: int, providers: list[str], verified: set[int] | None = None) -> DownloadPlan:
    pieces = [Piece(i, i * 10, i * 10 + 10, f"{i:040x}") for i in range(n)]
    return DownloadPlan(pieces, verified or set(), providers)


def finish(p: DownloadPlan, provider: str, index: int, seconds: float = 1.0) -> list[str]:
    p.piece_arrived(provider, index, seconds)
    return p.piece_verified(index)


def test_pieces_go_in_file_order_up_to_the_slots_of_each_provider() -> None:
    p = plan(6, ["a", "b"])
    first = [(a.provider, a.piece.index) for a in p.next_assignments()]
    assert sorted(i for _, i in first) == [0, 1, 2, 3]
    assert sum(1 for who, _ in first if who == "a") == PIECES_PER_PROVIDER
    assert p.next_assignments() == []  # every slot is busy
    finish(p, "a", 0)
    assert [(a.provider, a.piece.index) for a in p.next_assignments()] == [("a", 4)]


def test_verified_pieces_of_a_resumed_download_are_never_asked_for() -> None:
    p = plan(4, ["a"], verified={0, 2})
    assert [a.piece.index for a in p.next_assignments()] == [1, 3]


def test_faster_providers_are_served_first() -> None:
    p = plan(8, ["slow", "fast"])
    for a in p.next_assignments():
        finish(p, a.provider, a.piece.index, seconds=10.0 if a.provider == "slow" else 1.0)
    assert p.next_assignments()[0].provider == "fast"


def test_the_end_game_duplicates_pieces_in_flight_and_the_first_copy_wins() -> None:
    p = plan(2, ["a", "b", "c"])
    assigned = [(a.provider, a.piece.index) for a in p.next_assignments()]
    # Two pieces for three providers: once both are out, the idle one duplicates piece 0.
    assert assigned == [("a", 0), ("b", 1), ("c", 0)]
    assert finish(p, "c", 0) == ["a"]  # c's copy verified first: cancel a's
    assert p.providers["a"].in_flight == set()
    assert 0 in p.verified
    assert not p.done
    finish(p, "b", 1)
    assert p.done


def test_a_corrupt_copy_does_not_cancel_a_good_duplicate() -> None:
    p = plan(1, ["bad", "good"])
    p.next_assignments()
    p.next_assignments()  # end game: the other provider fetches the same piece
    p.piece_arrived("bad", 0, 1.0)
    p.piece_failed("bad", 0, "corrupt", corrupt=True)
    assert p.providers["good"].in_flight == {0}
    assert finish(p, "good", 0) == []
    assert p.done


def test_a_corrupt_provider_is_never_revived_but_an_unreachable_one_is() -> None:
    p = plan(4, ["bad", "gone"])
    p.next_assignments()
    p.piece_failed("bad", 0, "corrupt", corrupt=True)
    p.piece_failed("gone", 1, "closed", corrupt=False)
    assert not p.revivable("bad")
    assert p.revivable("gone")
    p.add_provider("bad")
    p.add_provider("gone")
    assert {a.provider for a in p.next_assignments()} == {"gone"}
    for _ in range(MAX_PROVIDER_FAILURES):
        p.piece_failed("gone", 0, "closed", corrupt=False)
    assert not p.revivable("gone")


def test_a_byte_range_fetches_only_the_pieces_it_touches() -> None:
    pieces = [Piece(i, i * 10, i * 10 + 10, f"{i:040x}") for i in range(5)]
    p = DownloadPlan(pieces, set(), ["a", "b"], wanted={1, 2})
    assert sorted(a.piece.index for a in p.next_assignments()) == [1, 2]
    finish(p, "a", 1)
    finish(p, "b", 2)
    assert p.done


def test_a_small_file_is_one_piece_hashed_as_the_whole_file() -> None:
    result = hash_bytes(b"hello")
    [piece] = pieces_of(5, result.sha1, None)
    assert (piece.start, piece.end, piece.sha1) == (0, 5, result.sha1)
