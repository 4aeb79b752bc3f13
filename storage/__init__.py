"""Synchronous persistence of kachery-node: SQLite through SQLAlchemy Core, and the blob store.

Never imports trio or kachery.node; node/ calls in here from worker threads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kachery.protocol.lazy import lazy_exports

if TYPE_CHECKING:
    from .blobstore import BlobStore
    from .db import Database, sqlite_url
    from .errors import (
        AlreadyExists,
        CorruptData,
        DatabaseError,
        NotFound,
        SourceChanged,
        SourceUnreadable,
        StorageError,
        StoreFull,
    )
    from .files import FileEntry, FileStats, LocalFiles, VerifyProblem
    from .mutables import Mutables

__all__ = [
    "AlreadyExists",
    "BlobStore",
    "CorruptData",
    "Database",
    "DatabaseError",
    "FileEntry",
    "FileStats",
    "LocalFiles",
    "Mutables",
    "NotFound",
    "SourceChanged",
    "SourceUnreadable",
    "StorageError",
    "StoreFull",
    "VerifyProblem",
    "sqlite_url",
]

_HOMES = {
    "AlreadyExists": ".errors",
    "BlobStore": ".blobstore",
    "CorruptData": ".errors",
    "Database": ".db",
    "DatabaseError": ".errors",
    "FileEntry": ".files",
    "FileStats": ".files",
    "LocalFiles": ".files",
    "Mutables": ".mutables",
    "NotFound": ".errors",
    "SourceChanged": ".errors",
    "SourceUnreadable": ".errors",
    "StorageError": ".errors",
    "StoreFull": ".errors",
    "VerifyProblem": ".files",
    "sqlite_url": ".db",
}
"""Where each name lives: imported on first use, so ``kachery.storage.errors`` (and the
command line) need not load SQLAlchemy."""


__getattr__ = lazy_exports(__name__, _HOMES)
