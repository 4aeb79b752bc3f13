"""Downloads in progress: which pieces of a file being fetched are verified and on disk.

A download writes into one partial file, ``<store>/partial/<sha1>.part``, each piece in place
after it was verified; the piece's bit in ``downloads.verified`` is set only after the piece's
bytes were fdatasync'ed, so a download interrupted any way (Ctrl-C, kill -9, reboot) resumes
without fetching a verified piece again. Non-goal: fetching (node/services/files/).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select, update

from . import schema
from .blobstore import make_private_dirs
from .db import Database


@dataclass(frozen=True, slots=True)
class DownloadRecord:
    """A download in progress: the file, and the indexes of its verified pieces."""

    sha1: str
    manifest_sha1: str | None
    size: int
    verified: frozenset[int]


def _bits(indexes: set[int] | frozenset[int], count: int) -> bytes:
    data = bytearray((count + 7) // 8)
    for i in indexes:
        data[i // 8] |= 1 << (i % 8)
    return bytes(data)


def _indexes(data: bytes) -> frozenset[int]:
    return frozenset(i for i in range(len(data) * 8) if data[i // 8] >> (i % 8) & 1)


class Downloads:
    """The downloads table and the partial files beside the blob store."""

    def __init__(self, db: Database, store_root: Path) -> None:
        self.db = db
        self.partial_dir = store_root / "partial"
        make_private_dirs(self.partial_dir)

    def partial_path(self, sha1: str) -> Path:
        return self.partial_dir / f"{sha1}.part"

    def free_bytes(self) -> int:
        """The space this user may still fill on the partial files' filesystem."""
        st = os.statvfs(self.partial_dir)
        return st.f_bavail * st.f_frsize

    def get(self, sha1: str) -> DownloadRecord | None:
        """The record of a download, if its partial file is still there."""
        table = schema.downloads
        with self.db.begin() as conn:
            row = conn.execute(select(table).where(table.c.sha1 == sha1)).first()
        if row is None:
            return None
        path = self.partial_path(sha1)
        if not path.exists() or path.stat().st_size != row.size:
            self.forget(sha1)
            return None
        return DownloadRecord(row.sha1, row.manifest_sha1, int(row.size), _indexes(row.verified))

    def begin(self, sha1: str, manifest_sha1: str | None, size: int, pieces: int) -> DownloadRecord:
        """Start (or find) a download: create the partial file of the right size."""
        existing = self.get(sha1)
        if existing is not None and existing.manifest_sha1 == manifest_sha1:
            return existing
        self.forget(sha1)
        path = self.partial_path(sha1)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        now = time.time()
        with self.db.begin() as conn:
            conn.execute(
                schema.downloads.insert().values(
                    sha1=sha1,
                    manifest_sha1=manifest_sha1,
                    size=size,
                    verified=_bits(set(), pieces),
                    started_at=now,
                    updated_at=now,
                )
            )
        return DownloadRecord(sha1, manifest_sha1, size, frozenset())

    def mark_verified(self, sha1: str, verified: set[int], pieces: int) -> None:
        """Record the verified pieces (after their bytes were made durable)."""
        table = schema.downloads
        with self.db.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.sha1 == sha1)
                .values(verified=_bits(verified, pieces), updated_at=time.time())
            )

    def forget(self, sha1: str) -> int:
        """Drop the record and the partial file (after landing it, or to start over); returns
        the disk space the partial file took (it is sparse: only what was written)."""
        with self.db.begin() as conn:
            conn.execute(delete(schema.downloads).where(schema.downloads.c.sha1 == sha1))
        path = self.partial_path(sha1)
        try:
            freed = path.stat().st_blocks * 512
        except FileNotFoundError:
            return 0
        path.unlink(missing_ok=True)
        return freed

    def all(self) -> list[DownloadRecord]:
        with self.db.begin() as conn:
            rows = conn.execute(select(schema.downloads)).all()
        return [
            DownloadRecord(r.sha1, r.manifest_sha1, int(r.size), _indexes(r.verified)) for r in rows
        ]
