"""The feed tables (storage/feeds.py): atomic appends, reads, busy handling, evidence, follows."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from kachery.protocol.feeds import Checkpoint
from kachery.storage import schema
from kachery.storage.db import Database, sqlite_url
from kachery.storage.errors import AlreadyExists, DatabaseError, NotFound
from kachery.storage.feeds import FeedStore, Rows, WriteBusy

FEED = "ab" * 32
SUB = "cd" * 20


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedStore]:
    db = Database(sqlite_url(tmp_path / "k.db"))
    feeds = FeedStore(db)
    yield feeds
    feeds.close()
    db.close()


def rows(sf: int, start: int, n: int) -> Rows:
    return Rows(
        sf,
        start,
        [b"body%d" % i for i in range(start, start + n)],
        [os.urandom(64) for _ in range(n)],
        [bytes([i % 256]) * 32 for i in range(start, start + n)],
    )


def test_appends_are_read_back_in_order_and_give_the_head(store: FeedStore) -> None:
    store.add_feed(FEED, name="notebook", owned=True)
    sf = store.subfeed(FEED, SUB, create=True, name="entries")
    assert sf is not None
    r = rows(sf, 0, 5)
    cp = Checkpoint(5, r.chains[4], os.urandom(64))
    store.append_many([Rows(sf, 0, r.bodies, r.signatures, r.chains, [cp])])
    assert store.read(sf, 1, 2) == [(b"body1", r.signatures[1]), (b"body2", r.signatures[2])]
    head = store.head(sf)
    assert (head.count, head.last_signature, head.chain) == (5, r.signatures[4], r.chains[4])
    assert head.last_checkpoint == 5
    assert store.checkpoints(sf, 0, 5) == [cp]
    assert store.chain_after(sf, 2) == r.chains[2]
    assert store.read(sf, 0, 10, max_bytes=1) == [(b"body0", r.signatures[0])]  # at least one
    [record] = store.subfeeds(FEED)
    assert (record.subfeed_name, record.count) == ("entries", 5)


def test_a_failed_group_commit_stores_nothing_and_leaves_nothing_for_the_next(
    store: FeedStore,
) -> None:
    store.add_feed(FEED, owned=True)
    a = store.subfeed(FEED, SUB, create=True)
    b = store.subfeed(FEED, "ef" * 20, create=True)
    assert a is not None
    assert b is not None
    store.append_many([rows(a, 0, 3)])
    with pytest.raises(DatabaseError, match="already stored"):
        store.append_many([rows(b, 0, 2), rows(a, 2, 2)])  # b's rows go in before the failure
    assert store.head(b).count == 0  # b's rows were rolled back with the failed group
    assert store.head(a).count == 3
    store.append_many([rows(a, 3, 1)])  # commits its own transaction, not the failed one's rows
    store.grant(FEED, SUB, "01" * 32)  # and SQLAlchemy writes on the same connection still work
    assert store.head(b).count == 0
    assert store.head(a).count == 4
    assert store.grants(FEED) == [(SUB, "01" * 32)]


@pytest.mark.parametrize("sqlite_path", [True, False], ids=["dbapi", "portable"])
def test_both_append_paths_store_messages_and_checkpoints_alike(
    store: FeedStore, sqlite_path: bool
) -> None:
    store._sqlite = sqlite_path  # the portable path (any SQLAlchemy database) also runs on SQLite
    store.add_feed(FEED, owned=True)
    sf = store.subfeed(FEED, SUB, create=True)
    assert sf is not None
    r = rows(sf, 0, 4)
    cps = [Checkpoint(2, r.chains[1], os.urandom(64)), Checkpoint(4, r.chains[3], os.urandom(64))]
    store.append_many([Rows(sf, 0, r.bodies[:2], r.signatures[:2], r.chains[:2], cps[:1])])
    store.append(sf, 2, r.bodies[2:], r.signatures[2:], r.chains[2:], cps[1:])
    assert store.read(sf, 0, 10) == list(zip(r.bodies, r.signatures, strict=True))
    assert [store.chain_after(sf, n) for n in range(4)] == r.chains
    assert store.checkpoints(sf, 0, 4) == cps
    with pytest.raises(DatabaseError, match="already stored"):
        store.append(sf, 3, r.bodies[3:], r.signatures[3:], r.chains[3:])


def test_a_write_that_must_not_wait_says_busy_when_another_writer_holds_the_lock(
    store: FeedStore, tmp_path: Path
) -> None:
    store.add_feed(FEED, owned=True)
    sf = store.subfeed(FEED, SUB, create=True)
    assert sf is not None
    other = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a CLI process in the middle of a write
    try:
        with pytest.raises(WriteBusy):
            store.append_many([rows(sf, 0, 1)], wait=False)
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.append_many([rows(sf, 0, 1)], wait=False)
    assert store.head(sf).count == 1


def test_feed_names_are_unique_and_feeds_are_deleted_whole(store: FeedStore) -> None:
    store.add_feed(FEED, name="notebook", owned=True)
    with pytest.raises(AlreadyExists, match="notebook"):
        store.add_feed("ef" * 32, name="notebook", owned=True)
    found = store.feed_by_name("notebook")
    assert found is not None
    assert found.feed_id == FEED
    sf = store.subfeed(FEED, SUB, create=True)
    assert sf is not None
    store.append_many([rows(sf, 0, 4)])
    store.grant(FEED, SUB, "01" * 32)
    store.subscribe(FEED, SUB, "02" * 32)
    assert store.delete_feed(FEED) == 4
    assert store.feed(FEED) is None
    assert store.read(sf, 0, 10) == []
    assert store.grants(FEED) == []
    assert store.subscriptions() == []
    with pytest.raises(NotFound):
        store.delete_feed(FEED)


def test_fork_evidence_is_kept_once(store: FeedStore) -> None:
    kept, other = (b"a", bytes(64)), (b"b", b"\x01" * 64)
    assert store.add_fork(FEED, SUB, 3, kept, other, reported_by="01" * 32)
    assert not store.add_fork(FEED, SUB, 3, kept, other, reported_by="02" * 32)
    [fork] = store.forks(FEED)
    assert (fork.message_number, fork.kept, fork.other) == (3, kept, other)


def test_grants_and_follows_can_be_taken_back(store: FeedStore) -> None:
    node = "01" * 32
    store.grant(FEED, SUB, node)
    assert store.grants(FEED, SUB) == [(SUB, node)]
    store.grant(FEED, SUB, node, allow=False)
    assert store.grants(FEED, SUB) == []
    assert store.subscribe(FEED, SUB, "02" * 32)
    assert not store.subscribe(FEED, SUB, "02" * 32)
    assert store.unsubscribe(FEED, SUB) == 1


def test_a_version_5_database_keeps_its_feed_messages_under_the_new_keys(tmp_path: Path) -> None:
    """Schema 6 re-keys message rows by one integer: every stored message is still read back,
    in order, in its own subfeed, and appends continue after it."""
    path = tmp_path / "old.db"
    engine = sqlalchemy.create_engine(sqlite_url(path))  # migrated only to version 5
    with engine.begin() as conn:
        schema.schema_version.create(conn)
        for migrate in schema.MIGRATIONS[:5]:
            migrate(conn)
        conn.execute(schema.schema_version.insert().values(version=5))
        conn.exec_driver_sql(
            "INSERT INTO subfeeds (sf, feed_id, subfeed_hash, created_at) VALUES (1, ?, ?, 0),"
            " (2, ?, ?, 0)",
            (FEED, SUB, FEED, "ef" * 20),
        )
        old = [
            (sf, n, b"b%d.%d" % (sf, n), bytes([n]) * 64, bytes([sf]) * 32)
            for sf in (1, 2)
            for n in range(3 * sf)
        ]
        conn.exec_driver_sql("INSERT INTO feed_messages VALUES (?, ?, ?, ?, ?)", old)
    engine.dispose()

    db = Database(sqlite_url(path))
    store = FeedStore(db)
    try:
        assert store.read(1, 0, 10) == [(b"b1.%d" % n, bytes([n]) * 64) for n in range(3)]
        assert store.read(2, 2, 10) == [(b"b2.%d" % n, bytes([n]) * 64) for n in range(2, 6)]
        assert store.head(2).count == 6
        assert store.chain_after(1, 2) == bytes([1]) * 32
        assert [(r.sf, r.count) for r in store.subfeeds(FEED)] == [(1, 3), (2, 6)]
        store.append_many([rows(1, 3, 2)])
        assert [body for body, _ in store.read(1, 0, 10)][2:] == [b"b1.2", b"body3", b"body4"]
        assert store.delete_feed(FEED) == 11
    finally:
        store.close()
        db.close()


def test_message_numbers_beyond_the_row_key_are_refused(store: FeedStore) -> None:
    sf = store.subfeed(FEED, SUB, create=True)
    assert sf is not None
    with pytest.raises(DatabaseError, match="beyond what the feed table keys"):
        store.append_many([rows(sf, (1 << 40) - 1, 2)])
    with pytest.raises(DatabaseError, match="beyond what the feed table keys"):
        store.append_many([rows(sf, -1, 2)])
    assert store.read(sf, (1 << 40) - 1, 2) == []
    assert store.head(sf).count == 0


def test_a_read_never_reaches_into_another_subfeeds_rows(store: FeedStore) -> None:
    first = store.subfeed(FEED, SUB, create=True)
    second = store.subfeed(FEED, "ef" * 20, create=True)
    assert first is not None
    assert second is not None
    store.append_many([rows(first, 0, 3), rows(second, 0, 2)])
    assert [b for b, _ in store.read(second, -2, 10)] == [b"body0", b"body1"]
    assert [b for b, _ in store.read(first, 1, 10)] == [b"body1", b"body2"]
    assert store.read(first, 3, 10) == []
    assert (store.head(first).count, store.head(second).count) == (3, 2)
