"""The database schema and its migrations.

Tables are SQLAlchemy Core ``Table`` objects on one ``metadata``. The schema is versioned: the
``schema_version`` table holds the number of migrations applied, and ``MIGRATIONS[i]`` takes the
database from version ``i`` to ``i + 1``. A migration, once released, never changes; a new one is
appended. A migration that introduces a table creates it from its ``Table`` below; when a later
migration alters that table, the earlier one must be given a frozen copy of the original shape.
Non-goal: downgrades (a database newer than the code is refused, not rewritten).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("sha1", String(40), primary_key=True),
    Column("size", BigInteger, nullable=False),
    # SHA-1 of the manifest's JSON bytes, for files over 20,000,000 bytes.
    Column("manifest_sha1", String(40), nullable=True),
    # NULL: the bytes are in the blob store. Otherwise an absolute path indexed where it lies
    # (``link``), valid only while its size and mtime are unchanged.
    Column("linked_path", Text, nullable=True),
    Column("linked_mtime_ns", BigInteger, nullable=True),
    Column("stored_at", Float, nullable=False),
    Index("files_by_manifest", "manifest_sha1"),
)

mutables = Table(
    "mutables",
    metadata,
    # Canonical JSON of the key (sorted keys, compact), so equal JSON keys are one row.
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)


def _v1_files_and_mutables(conn: Connection) -> None:
    files.create(conn)
    mutables.create(conn)


MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_files_and_mutables,
]
"""``MIGRATIONS[i]`` moves the schema from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)
