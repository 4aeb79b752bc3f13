"""Synchronous persistence of kachery-node: SQLite through SQLAlchemy Core, and the blob store.

Never imports trio or kachery.node; node/ calls in here from worker threads.
"""

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
