"""Feeds on disk: feeds, subfeeds, signed messages, checkpoints, fork evidence, grants, follows.

Messages are stored exactly as signed (canonical CBOR body + signature) with the chain hash after
each (see ``kachery.protocol.feeds``), keyed by one integer made of a small subfeed number and the
message number (``message_key``), which is SQLite's rowid: a row costs its bytes and one b-tree
entry, and an append lands at the end of the table. Only messages that have been verified are
handed to this module; it never checks signatures itself.

**Writes.** Appends go through one dedicated connection (``append``), one transaction per batch,
so a batch is stored whole or not at all, and an append that returned is durable (WAL with
``synchronous=NORMAL`` survives the process being killed: measured, 20 of 20 kill -9 runs lost no
acknowledged row). On SQLite that transaction runs on the DBAPI connection under it: the driver's
implicit BEGIN, ``executemany`` of the inserts compiled from the ``feed_messages`` and
``feed_checkpoints`` tables, COMMIT (ROLLBACK on any error, so the connection is never left in a
transaction). Measured here, 20-26 us per one-row transaction (6-9 us more with SQLAlchemy's
``begin``/``commit`` around the same ``executemany``, 40 us more through ``Connection.execute``)
and 4-7 us per row in batches of 100. Every other query is SQLAlchemy Core. ``append`` may be called
without waiting for the database lock (``wait=False``: it raises ``WriteBusy`` at once when
another writer holds it), which lets the node run small appends inline on its event loop and fall
back to a worker thread only under contention. That connection does not checkpoint the WAL by
itself (its commits stay short); the node calls ``checkpoint_wal`` from a worker thread.

Non-goals: deciding what is valid (protocol/feeds.py), when to write (node/services/feeds/).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from kachery.protocol.feeds import Checkpoint

from . import schema
from .db import BUSY_TIMEOUT_MS, Database, translate
from .errors import AlreadyExists, DatabaseError, NotFound, StorageError
from .schema import MESSAGE_NUMBER_BITS

MAX_READ_MESSAGES = 10_000
"""Messages one ``read`` returns at most (callers page through longer ranges)."""


_NUMBER_MASK = (1 << MESSAGE_NUMBER_BITS) - 1
_MAX_SUBFEEDS = 1 << (63 - MESSAGE_NUMBER_BITS)


def message_key(sf: int, n: int) -> int:
    """The row key of message ``n`` of subfeed ``sf`` (``schema.feed_messages.c.msg_key``)."""
    return sf << MESSAGE_NUMBER_BITS | n


def _of_subfeed(key: Any, sf: Any) -> tuple[Any, Any]:
    """SQL conditions: ``key`` is a message key of subfeed ``sf`` (a number or a column)."""
    span = 1 << MESSAGE_NUMBER_BITS
    return key >= sf * span, key < (sf + 1) * span


def _check_key(sf: int, start: int, end: int) -> None:
    """Messages ``start .. end - 1`` of subfeed ``sf`` fit the row key."""
    if not (0 <= sf < _MAX_SUBFEEDS and 0 <= start <= end <= 1 << MESSAGE_NUMBER_BITS):
        raise DatabaseError(
            f"messages {start}..{end - 1} of subfeed {sf} are beyond what the feed table keys"
            f" (2**{MESSAGE_NUMBER_BITS} messages per subfeed)"
        )


class WriteBusy(DatabaseError):
    """Another writer holds the database lock and the caller asked not to wait."""


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """A feed this node knows: owned (it holds the key) or followed."""

    feed_id: str
    name: str | None
    owned: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class SubfeedRecord:
    """A subfeed held here, with its message count."""

    sf: int
    feed_id: str
    subfeed_hash: str
    subfeed_name: str | None
    count: int


@dataclass(frozen=True, slots=True)
class StoredHead:
    """The newest stored message of a subfeed (count 0: none) and the newest checkpoint count."""

    count: int
    last_signature: bytes | None
    chain: bytes | None
    last_checkpoint: int


@dataclass(frozen=True, slots=True)
class ForkRecord:
    """Stored evidence of a fork (two validly signed messages with one number)."""

    fork_id: int
    feed_id: str
    subfeed_hash: str
    message_number: int
    kept: tuple[bytes, bytes]
    other: tuple[bytes, bytes]
    reported_by: str | None
    detected_at: float


@dataclass(frozen=True, slots=True)
class Rows:
    """Messages ``start ..`` of subfeed ``sf`` to store, with their chain values and any
    checkpoints among them."""

    sf: int
    start: int
    bodies: Sequence[bytes]
    signatures: Sequence[bytes]
    chains: Sequence[bytes]
    checkpoints: Sequence[Checkpoint] = ()


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subfeed this node follows live in a channel."""

    feed_id: str
    subfeed_hash: str
    channel_id: str


class FeedStore:
    """The feed tables of one node's database.

    Args:
        db: the node's database (migrated to schema version 4 or later).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._writer: Connection | None = None
        self._raw_writer: sqlite3.Connection | None = None
        """The sqlite3 connection under ``_writer`` while its busy timeout is unchanged."""
        self._writer_waits = True
        self._writer_guard = threading.Lock()  # one user of the write connection at a time
        self._sqlite = db.engine.dialect.name == "sqlite"
        self._insert_sql = str(schema.feed_messages.insert().compile(dialect=db.engine.dialect))
        self._checkpoint_sql = str(
            schema.feed_checkpoints.insert().compile(dialect=db.engine.dialect)
        )

    # -- feeds ---------------------------------------------------------------------------------

    def add_feed(self, feed_id: str, *, name: str | None = None, owned: bool) -> FeedRecord:
        """Record a feed (``owned``: this node holds its key). A known feed becomes owned if
        ``owned``, and gets ``name`` if it had none.

        Raises:
            AlreadyExists: ``name`` is another feed's name here.
        """
        table = schema.feeds
        with self.db.begin() as conn:
            if name is not None:
                other = conn.execute(select(table.c.feed_id).where(table.c.name == name)).first()
                if other is not None and other.feed_id != feed_id:
                    raise AlreadyExists(f"a feed named {name!r} already exists: {other.feed_id}")
            row = conn.execute(select(table).where(table.c.feed_id == feed_id)).first()
            if row is None:
                conn.execute(
                    insert(table).values(
                        feed_id=feed_id, name=name, owned=owned, created_at=time.time()
                    )
                )
            else:
                values: dict[str, Any] = {}
                if owned and not row.owned:
                    values["owned"] = True
                if name is not None and row.name is None:
                    values["name"] = name
                if values:
                    conn.execute(table.update().where(table.c.feed_id == feed_id).values(**values))
            final = conn.execute(select(table).where(table.c.feed_id == feed_id)).one()
        return _feed(final)

    def feed(self, feed_id: str) -> FeedRecord | None:
        table = schema.feeds
        with self.db.begin() as conn:
            row = conn.execute(select(table).where(table.c.feed_id == feed_id)).first()
        return None if row is None else _feed(row)

    def feed_by_name(self, name: str) -> FeedRecord | None:
        table = schema.feeds
        with self.db.begin() as conn:
            row = conn.execute(select(table).where(table.c.name == name)).first()
        return None if row is None else _feed(row)

    def feeds(self) -> list[FeedRecord]:
        """Every feed known here, owned ones first, then by name and ID."""
        table = schema.feeds
        with self.db.begin() as conn:
            rows = conn.execute(select(table)).all()
        records = [_feed(r) for r in rows]
        return sorted(records, key=lambda f: (not f.owned, f.name or "\uffff", f.feed_id))

    def delete_feed(self, feed_id: str) -> int:
        """Remove a feed and everything held of it; returns the number of messages removed.

        Raises:
            NotFound: no such feed here.
        """
        msg = schema.feed_messages
        with self._write() as conn:
            sfs = [
                r.sf
                for r in conn.execute(
                    select(schema.subfeeds.c.sf).where(schema.subfeeds.c.feed_id == feed_id)
                )
            ]
            known = conn.execute(
                select(schema.feeds.c.feed_id).where(schema.feeds.c.feed_id == feed_id)
            ).first()
            if known is None and not sfs:
                raise NotFound(f"no feed {feed_id} on this node")
            removed = 0
            for sf in sfs:
                result = conn.execute(delete(msg).where(*_of_subfeed(msg.c.msg_key, sf)))
                removed += result.rowcount or 0
                conn.execute(
                    delete(schema.feed_checkpoints).where(schema.feed_checkpoints.c.sf == sf)
                )
            for table in (
                schema.subfeeds,
                schema.feed_subscriptions,
                schema.feed_grants,
                schema.feed_forks,
                schema.feeds,
            ):
                conn.execute(delete(table).where(table.c.feed_id == feed_id))
        return removed

    # -- subfeeds ------------------------------------------------------------------------------

    def subfeed(
        self, feed_id: str, subfeed_hash: str, *, create: bool, name: str | None = None
    ) -> int | None:
        """The subfeed's number here (created if ``create``), or None."""
        table = schema.subfeeds
        where = and_(table.c.feed_id == feed_id, table.c.subfeed_hash == subfeed_hash)
        with self.db.begin() as conn:
            row = conn.execute(select(table.c.sf, table.c.subfeed_name).where(where)).first()
            if row is not None:
                if name is not None and row.subfeed_name is None:
                    conn.execute(table.update().where(where).values(subfeed_name=name))
                return int(row.sf)
            if not create:
                return None
            try:
                result = conn.execute(
                    insert(table).values(
                        feed_id=feed_id,
                        subfeed_hash=subfeed_hash,
                        subfeed_name=name,
                        created_at=time.time(),
                    )
                )
            except IntegrityError:  # created meanwhile by another process (the CLI)
                return self.subfeed(feed_id, subfeed_hash, create=False)
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def empty_subfeeds(self, feed_id: str) -> int:
        """How many of the feed's subfeeds hold no message yet."""
        sub, msg = schema.subfeeds, schema.feed_messages
        holds = select(msg.c.msg_key).where(*_of_subfeed(msg.c.msg_key, sub.c.sf)).exists()
        query = select(func.count()).select_from(sub).where(sub.c.feed_id == feed_id, ~holds)
        with self.db.begin() as conn:
            return int(conn.execute(query).scalar_one())

    def subfeeds(self, feed_id: str | None = None) -> list[SubfeedRecord]:
        """Subfeeds held here (of one feed, or all), with their counts."""
        sub, msg = schema.subfeeds, schema.feed_messages
        last = (
            select(msg.c.msg_key)
            .where(*_of_subfeed(msg.c.msg_key, sub.c.sf))
            .order_by(msg.c.msg_key.desc())
            .limit(1)
            .scalar_subquery()
        )
        query = select(sub, last.label("last"))
        if feed_id is not None:
            query = query.where(sub.c.feed_id == feed_id)
        with self.db.begin() as conn:
            rows = conn.execute(query.order_by(sub.c.feed_id, sub.c.sf)).all()
        return [
            SubfeedRecord(
                sf=r.sf,
                feed_id=r.feed_id,
                subfeed_hash=r.subfeed_hash,
                subfeed_name=r.subfeed_name,
                count=0 if r.last is None else (int(r.last) & _NUMBER_MASK) + 1,
            )
            for r in rows
        ]

    def head(self, sf: int) -> StoredHead:
        """The newest stored message of subfeed ``sf`` and its newest checkpoint."""
        msg, cps = schema.feed_messages, schema.feed_checkpoints
        with self.db.begin() as conn:
            row = conn.execute(
                select(msg.c.msg_key, msg.c.signature, msg.c.chain)
                .where(*_of_subfeed(msg.c.msg_key, sf))
                .order_by(msg.c.msg_key.desc())
                .limit(1)
            ).first()
            last_cp = conn.execute(select(func.max(cps.c["count"])).where(cps.c.sf == sf)).scalar()
        if row is None:
            return StoredHead(0, None, None, int(last_cp or 0))
        count = (int(row.msg_key) & _NUMBER_MASK) + 1
        return StoredHead(count, bytes(row.signature), bytes(row.chain), int(last_cp or 0))

    # -- messages ------------------------------------------------------------------------------

    def append(
        self,
        sf: int,
        start: int,
        bodies: Sequence[bytes],
        signatures: Sequence[bytes],
        chains: Sequence[bytes],
        checkpoints: Sequence[Checkpoint] = (),
        *,
        wait: bool = True,
    ) -> None:
        """Store verified messages ``start ..`` of subfeed ``sf`` (and checkpoints) in one
        transaction, durably. See ``append_many``."""
        self.append_many([Rows(sf, start, bodies, signatures, chains, checkpoints)], wait=wait)

    def append_many(self, groups: Sequence[Rows], *, wait: bool = True) -> None:
        """Store several runs of verified messages (of one or more subfeeds) in one transaction:
        all of them durably, or none (a group commit).

        Args:
            wait: wait for the database lock (up to the busy timeout); if False, raise
                ``WriteBusy`` at once when another writer holds it.

        Raises:
            WriteBusy: ``wait`` is False and another writer holds the lock (nothing written).
            DatabaseError: the write failed (nothing written), for example because one of the
                messages is already stored.
        """
        for g in groups:
            _check_key(g.sf, g.start, g.start + len(g.bodies))
        rows = [
            (message_key(g.sf, g.start + i), g.bodies[i], g.signatures[i], g.chains[i])
            for g in groups
            for i in range(len(g.bodies))
        ]
        cp_rows = [
            (g.sf, c.count, c.chain_hash, c.signature) for g in groups for c in g.checkpoints
        ]
        if self._sqlite:
            self._append_sqlite(rows, cp_rows, wait=wait)
            return
        with self._write(wait=wait) as conn:
            for table, values in ((schema.feed_messages, rows), (schema.feed_checkpoints, cp_rows)):
                if values:
                    names = table.c.keys()
                    conn.execute(insert(table), [dict(zip(names, r, strict=True)) for r in values])

    def _append_sqlite(
        self, rows: list[tuple[Any, ...]], cp_rows: list[tuple[Any, ...]], *, wait: bool
    ) -> None:
        """``append_many``'s transaction on the DBAPI connection under the write connection:
        the driver's implicit BEGIN, the compiled inserts, COMMIT (or ROLLBACK on any error, so
        the connection is never left inside a transaction). The hot path of every append: it
        keeps the sqlite3 connection at hand instead of going through ``_writing`` (a one-row
        append 17.7k/s -> 20.0k/s here, A/B interleaved)."""
        if not self._writer_guard.acquire(blocking=wait):
            raise WriteBusy("another feed write is in progress")
        try:
            raw = self._raw_writer if wait == self._writer_waits else None
            if raw is None:  # first use, or the busy timeout changes
                raw = self._raw_writer = self._ready_writer(wait).connection.driver_connection
                assert isinstance(raw, sqlite3.Connection)
            try:
                if len(rows) == 1:
                    raw.execute(self._insert_sql, rows[0])
                else:
                    raw.executemany(self._insert_sql, rows)
                if cp_rows:
                    raw.executemany(self._checkpoint_sql, cp_rows)
                raw.commit()
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    raw.rollback()
                raise
        except (sqlite3.Error, SQLAlchemyError) as exc:
            self._raw_writer = None  # found again through SQLAlchemy next time
            raise _translate(exc) from exc
        finally:
            self._writer_guard.release()

    def add_checkpoints(self, sf: int, checkpoints: Sequence[Checkpoint]) -> None:
        """Store checkpoints (already checked against stored chain values); known ones are kept."""
        table = schema.feed_checkpoints
        with self._write() as conn:
            for c in checkpoints:
                known = conn.execute(
                    select(table.c.sf).where(table.c.sf == sf, table.c["count"] == c.count)
                ).first()
                if known is None:
                    conn.execute(
                        insert(table).values(
                            sf=sf, count=c.count, chain_hash=c.chain_hash, signature=c.signature
                        )
                    )

    def read(
        self, sf: int, start: int, limit: int, *, max_bytes: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Messages ``start .. start + limit - 1`` as (body, signature), fewer if not held (and at
        most ``max_bytes`` of bodies and signatures, but always at least one)."""
        msg = schema.feed_messages
        limit = max(0, min(limit, MAX_READ_MESSAGES))
        start = max(0, start)  # a negative number would reach into the previous subfeed's keys
        end = min(start + limit, 1 << MESSAGE_NUMBER_BITS)
        if start >= end:
            return []
        query = (
            select(msg.c.body, msg.c.signature)
            .where(msg.c.msg_key >= message_key(sf, start), msg.c.msg_key < message_key(sf, end))
            .order_by(msg.c.msg_key)
        )
        out: list[tuple[bytes, bytes]] = []
        size = 0
        with self.db.begin() as conn:
            for row in conn.execute(query):
                size += len(row.body) + len(row.signature)
                if max_bytes is not None and out and size > max_bytes:
                    break
                out.append((bytes(row.body), bytes(row.signature)))
        return out

    def message(self, sf: int, n: int) -> tuple[bytes, bytes] | None:
        """Message ``n`` as (body, signature), or None."""
        found = self.read(sf, n, 1)
        return found[0] if found else None

    def chain_after(self, sf: int, n: int) -> bytes | None:
        """The chain hash after message ``n`` (``c(n + 1)``), or None if it is not held."""
        msg = schema.feed_messages
        if not 0 <= n < 1 << MESSAGE_NUMBER_BITS:
            return None
        with self.db.begin() as conn:
            row = conn.execute(
                select(msg.c.chain).where(msg.c.msg_key == message_key(sf, n))
            ).first()
        return None if row is None else bytes(row.chain)

    def checkpoints(self, sf: int, after: int, upto: int) -> list[Checkpoint]:
        """Stored checkpoints with ``after < count <= upto``, oldest first."""
        table = schema.feed_checkpoints
        with self.db.begin() as conn:
            rows = conn.execute(
                select(table.c["count"], table.c.chain_hash, table.c.signature)
                .where(table.c.sf == sf, table.c["count"] > after, table.c["count"] <= upto)
                .order_by(table.c["count"])
            ).all()
        # (a Row has a count() method, so the column is read by position)
        return [Checkpoint(int(r[0]), bytes(r[1]), bytes(r[2])) for r in rows]

    # -- forks ---------------------------------------------------------------------------------

    def add_fork(
        self,
        feed_id: str,
        subfeed_hash: str,
        number: int,
        kept: tuple[bytes, bytes],
        other: tuple[bytes, bytes],
        *,
        reported_by: str | None,
    ) -> bool:
        """Keep fork evidence; False if this very evidence was already kept."""
        table = schema.feed_forks
        with self._write() as conn:
            known = conn.execute(
                select(table.c.fork_id).where(
                    table.c.feed_id == feed_id,
                    table.c.subfeed_hash == subfeed_hash,
                    table.c.message_number == number,
                    table.c.signature_other == other[1],
                )
            ).first()
            if known is not None:
                return False
            conn.execute(
                insert(table).values(
                    feed_id=feed_id,
                    subfeed_hash=subfeed_hash,
                    message_number=number,
                    body_kept=kept[0],
                    signature_kept=kept[1],
                    body_other=other[0],
                    signature_other=other[1],
                    reported_by=reported_by,
                    detected_at=time.time(),
                )
            )
        return True

    def forks(self, feed_id: str | None = None) -> list[ForkRecord]:
        """Fork evidence kept here (of one feed, or all), oldest first."""
        table = schema.feed_forks
        query = select(table).order_by(table.c.fork_id)
        if feed_id is not None:
            query = query.where(table.c.feed_id == feed_id)
        with self.db.begin() as conn:
            rows = conn.execute(query).all()
        return [
            ForkRecord(
                fork_id=r.fork_id,
                feed_id=r.feed_id,
                subfeed_hash=r.subfeed_hash,
                message_number=int(r.message_number),
                kept=(bytes(r.body_kept), bytes(r.signature_kept)),
                other=(bytes(r.body_other), bytes(r.signature_other)),
                reported_by=r.reported_by,
                detected_at=r.detected_at,
            )
            for r in rows
        ]

    # -- grants and subscriptions --------------------------------------------------------------

    def grant(self, feed_id: str, subfeed_hash: str, node_id: str, *, allow: bool = True) -> None:
        """Let ``node_id`` submit messages to a subfeed (or, with ``allow=False``, no longer)."""
        table = schema.feed_grants
        where = and_(
            table.c.feed_id == feed_id,
            table.c.subfeed_hash == subfeed_hash,
            table.c.node_id == node_id,
        )
        with self._write() as conn:
            conn.execute(delete(table).where(where))
            if allow:
                conn.execute(
                    insert(table).values(
                        feed_id=feed_id,
                        subfeed_hash=subfeed_hash,
                        node_id=node_id,
                        granted_at=time.time(),
                    )
                )

    def grants(self, feed_id: str, subfeed_hash: str | None = None) -> list[tuple[str, str]]:
        """(subfeed hash, node ID) pairs granted write access."""
        table = schema.feed_grants
        query = select(table.c.subfeed_hash, table.c.node_id).where(table.c.feed_id == feed_id)
        if subfeed_hash is not None:
            query = query.where(table.c.subfeed_hash == subfeed_hash)
        with self.db.begin() as conn:
            return [(r.subfeed_hash, r.node_id) for r in conn.execute(query)]

    def subscribe(self, feed_id: str, subfeed_hash: str, channel_id: str) -> bool:
        """Follow a subfeed in a channel; False if it was followed there already."""
        table = schema.feed_subscriptions
        where = and_(
            table.c.feed_id == feed_id,
            table.c.subfeed_hash == subfeed_hash,
            table.c.channel_id == channel_id,
        )
        with self._write() as conn:
            if conn.execute(select(table.c.feed_id).where(where)).first() is not None:
                return False
            conn.execute(
                insert(table).values(
                    feed_id=feed_id,
                    subfeed_hash=subfeed_hash,
                    channel_id=channel_id,
                    subscribed_at=time.time(),
                )
            )
        return True

    def unsubscribe(self, feed_id: str, subfeed_hash: str, channel_id: str | None = None) -> int:
        """Stop following a subfeed (in one channel, or all); returns how many follows ended."""
        table = schema.feed_subscriptions
        where = and_(table.c.feed_id == feed_id, table.c.subfeed_hash == subfeed_hash)
        if channel_id is not None:
            where = and_(where, table.c.channel_id == channel_id)
        with self._write() as conn:
            return conn.execute(delete(table).where(where)).rowcount or 0

    def subscriptions(self) -> list[Subscription]:
        table = schema.feed_subscriptions
        with self.db.begin() as conn:
            rows = conn.execute(select(table).order_by(table.c.subscribed_at)).all()
        return [Subscription(r.feed_id, r.subfeed_hash, r.channel_id) for r in rows]

    # -- the write connection ------------------------------------------------------------------

    @contextmanager
    def _write(self, *, wait: bool = True) -> Iterator[Connection]:
        """The dedicated write connection inside a transaction (committed on success)."""
        with self._writing(wait) as conn, conn.begin():
            yield conn

    @contextmanager
    def _writing(self, wait: bool) -> Iterator[Connection]:
        """The dedicated write connection, held by this thread alone, its busy timeout set for
        ``wait``; database errors inside come out as ``DatabaseError``.

        Raises:
            WriteBusy: ``wait`` is False and another write holds it.
        """
        if not self._writer_guard.acquire(blocking=wait):
            raise WriteBusy("another feed write is in progress")
        try:
            try:
                yield self._ready_writer(wait)
            except (sqlite3.Error, SQLAlchemyError) as exc:
                raise _translate(exc) from exc
        finally:
            self._writer_guard.release()

    def _ready_writer(self, wait: bool) -> Connection:
        """The write connection (opened if needed), its busy timeout set for ``wait``. The caller
        holds ``_writer_guard``."""
        conn = self._writer_connection()
        if self._sqlite and wait != self._writer_waits:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS if wait else 0}")
            conn.commit()
            self._writer_waits = wait
        return conn

    def _writer_connection(self) -> Connection:
        if self._writer is None or self._writer.closed:
            self._raw_writer = None
            try:
                self._writer = self.db.engine.connect()
                if self._sqlite:
                    # Checkpoints run from checkpoint_wal, off the append path.
                    self._writer.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
                    self._writer.commit()
                self._writer_waits = True
            except SQLAlchemyError as exc:
                raise translate(exc, "cannot open the feed database connection") from exc
        return self._writer

    def checkpoint_wal(self) -> None:
        """Copy committed WAL pages into the database file without blocking writers."""
        if not self._sqlite:
            return
        with self.db.begin() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = self._raw_writer = None


def _translate(exc: Exception) -> StorageError:
    text = str(getattr(exc, "orig", None) or exc)
    if "is locked" in text:
        return WriteBusy("another writer holds the database")
    if "UNIQUE constraint failed" in text:
        return DatabaseError(f"feed write refused: that row is already stored ({text})")
    return translate(exc, "feed database error")


def _feed(row: Any) -> FeedRecord:
    return FeedRecord(
        feed_id=row.feed_id, name=row.name, owned=bool(row.owned), created_at=row.created_at
    )
