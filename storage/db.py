"""Opening the node's database: engine, SQLite pragmas, and migrations on open.

SQLite (WAL, ``synchronous=NORMAL``: a committed transaction survives the process being killed)
is the embedded default; any SQLAlchemy URL can be given, so an always-on lab node can use
PostgreSQL. Calls are synchronous: node/ runs them in worker threads.
Non-goal: an ORM. Queries are SQLAlchemy Core, written where they are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.exc import SQLAlchemyError

from . import schema
from .errors import DatabaseError, StorageError, StoreFull, is_no_space

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another process (the CLI beside the daemon) to finish writing."""


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite database file."""
    return f"sqlite:///{path}"


class Database:
    """The node's database: an engine whose schema is migrated to the current version on open.

    Args:
        url: an SQLAlchemy URL (``sqlite:///<home>/kachery.db`` by default).

    Raises:
        DatabaseError: the database cannot be opened, or was written by a newer kachery-node.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine: Engine = sqlalchemy.create_engine(url)
            if self.engine.dialect.name == "sqlite":
                event.listen(self.engine, "connect", _sqlite_pragmas)
            if self._version() != schema.SCHEMA_VERSION:
                self._migrate_atomically()
        except SQLAlchemyError as exc:
            raise translate(exc, f"cannot open database {url}") from exc

    def _version(self) -> int | None:
        """The schema version the database has (None: no schema yet); a read, no lock taken."""
        with self.engine.connect() as conn:
            if not sqlalchemy.inspect(conn).has_table(schema.schema_version.name):
                return None
            row = conn.execute(select(schema.schema_version.c.version)).first()
        return None if row is None else int(row.version)

    def _migrate_atomically(self) -> None:
        """Migrate in one transaction that holds the write lock from its first statement.

        Python's sqlite3 driver begins a transaction only before INSERT, UPDATE and DELETE, so
        DDL (CREATE, ALTER, DROP) would run and commit one statement at a time: a migration cut
        short (a crash, a full disk) would leave a half-changed schema at the old version, which
        the next start could not migrate. ``BEGIN IMMEDIATE`` makes the whole migration one
        transaction, and makes a second process opening the database meanwhile (the CLI beside
        a starting daemon) wait, then find the version already current.
        """
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            self._migrate(conn)
            conn.commit()

    @staticmethod
    def _migrate(conn: Connection) -> None:
        schema.schema_version.create(conn, checkfirst=True)
        row = conn.execute(select(schema.schema_version.c.version)).first()
        current = 0 if row is None else int(row.version)
        if current > schema.SCHEMA_VERSION:
            raise DatabaseError(
                f"the database has schema version {current}, but this kachery-node knows only up "
                f"to {schema.SCHEMA_VERSION}: upgrade kachery-node"
            )
        for version in range(current, schema.SCHEMA_VERSION):
            schema.MIGRATIONS[version](conn)
        if row is None:
            conn.execute(schema.schema_version.insert().values(version=schema.SCHEMA_VERSION))
        elif current != schema.SCHEMA_VERSION:
            conn.execute(schema.schema_version.update().values(version=schema.SCHEMA_VERSION))

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A connection inside a transaction, committed on success; errors become DatabaseError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise translate(exc) from exc

    def close(self) -> None:
        self.engine.dispose()


def translate(exc: BaseException, what: str = "database error") -> StorageError:
    """The one-line error for a failed database call: StoreFull when the disk (or quota) is full,
    else DatabaseError with the driver's own message (not SQLAlchemy's SQL and links)."""
    orig = getattr(exc, "orig", None) or exc
    text = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if (isinstance(orig, OSError) and is_no_space(orig)) or any(
        sign in text.lower() for sign in ("disk is full", "no space left", "disk full")
    ):
        return StoreFull(f"the disk holding the database is full ({text}): free space, retry")
    return DatabaseError(f"{what}: {text}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
