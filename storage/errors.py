"""Errors of the storage layer (extends the tree in ``kachery.protocol.errors``)::

    KacheryError
    └── StorageError              the local store or database could not do what was asked
        ├── NotFound              no such file, feed, task or key here
        ├── AlreadyExists         refusing to overwrite (``set(..., update=False)``)
        ├── StoreFull             the disk (or quota) is full; nothing unverified is kept
        ├── SourceUnreadable      the file to store is missing, a directory, or unreadable
        ├── SourceChanged         the file changed while it was being stored or served by link
        ├── CorruptData           stored bytes do not hash to their name
        ├── InviteRefused         an invite is unknown, expired or used up (the message says which)
        └── DatabaseError         the database failed or has a schema this version cannot use

SQLAlchemy and OS errors never leave storage/: they are translated into these.
"""

from __future__ import annotations

import errno

from kachery.protocol.errors import KacheryError


class StorageError(KacheryError):
    """The local store or database could not do what was asked."""


class NotFound(StorageError, KeyError):
    """No such file, feed, task or key in this node's storage."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExists(StorageError):
    """Refusing to overwrite an existing value."""


class StoreFull(StorageError):
    """No space left on the device (or quota exceeded). Nothing unverified is kept; a download
    keeps its verified pieces for the next attempt."""


class SourceUnreadable(StorageError):
    """A file to store is missing, is a directory, or cannot be read."""


class SourceChanged(StorageError):
    """A file changed while it was being stored, or since it was linked."""


class CorruptData(StorageError):
    """Bytes in the store do not hash to the name they are stored under."""


class InviteRefused(StorageError):
    """An invite cannot be redeemed; the message says why (unknown, expired, used up)."""


class DatabaseError(StorageError):
    """The database failed, or its schema is newer than this version of kachery-node."""


def is_no_space(exc: OSError) -> bool:
    """True if an OS error means the disk (or the user's quota) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
