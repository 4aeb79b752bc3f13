"""The node's files: what is stored or linked here, found by SHA-1, read by byte range.

``LocalFiles`` joins the blob store (bytes) and the ``files`` table (size, manifest, where the bytes
are). A stored file's bytes are in the blob store; a linked file's bytes stay where the user keeps
them, and the row remembers their size and mtime: if either changed, the link is treated as absent
and never served. A file over 20,000,000 bytes also stores its manifest, as a blob of its own.
Chunks are byte ranges of the stored file, never second copies.

Non-goal: fetching from other nodes (node/ does that, and lands verified files through ``adopt``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import Connection, Row, delete, func, select

from kachery.protocol.errors import InvalidInput, InvalidManifest
from kachery.protocol.manifest import MAX_MANIFEST_BYTES, HashResult, Manifest
from kachery.protocol.uri import FileURI

from . import schema
from .blobstore import (
    BLOCK_SIZE,
    BlobStore,
    Progress,
    hash_path,
    hash_range,
    hash_stream,
    open_source,
)
from .db import Database
from .errors import NotFound, SourceChanged, SourceUnreadable


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file this node can serve.

    Attributes:
        sha1: the SHA-1 of its bytes.
        size: its length in bytes.
        manifest_sha1: for files over 20,000,000 bytes, the SHA-1 of its manifest's JSON.
        path: where its bytes are (a blob, or the linked file).
        linked: True if ``path`` is a user's file indexed in place.
        stored_at: when it was stored or linked (seconds since the epoch).
        linked_mtime_ns: for a linked file, the mtime it had when it was hashed.
    """

    sha1: str
    size: int
    manifest_sha1: str | None
    path: Path
    linked: bool
    stored_at: float
    linked_mtime_ns: int | None = None

    def uri(self, label: str = "") -> FileURI:
        """The file's kachery URI."""
        return FileURI(sha1=self.sha1, label=label, manifest_sha1=self.manifest_sha1)


@dataclass(frozen=True, slots=True)
class FileStats:
    """Counts for ``kachery-node info``."""

    count: int
    total_bytes: int
    linked: int


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """A file that failed ``verify``: which one, what is wrong, and whether it was removed."""

    sha1: str
    path: Path
    problem: str
    removed: bool


class LocalFiles:
    """Files stored in (or linked into) this node."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    # -- adding files --------------------------------------------------------------------------

    def store_path(
        self, path: Path, *, link: bool = False, progress: Progress | None = None
    ) -> FileEntry:
        """Store a copy of the file at ``path`` (or, with ``link``, index it where it lies).

        Raises:
            SourceUnreadable: missing, a directory, unreadable.
            SourceChanged: it changed while being read.
            StoreFull: the disk filled up (nothing partial kept).
        """
        path = Path(path)
        if link:
            return self._link(path, progress)
        with open_source(path) as (source, size):
            result = self.blobs.ingest(source, expected_size=size, progress=progress)
        return self._record(result)

    def store_stream(self, source: BinaryIO, *, progress: Progress | None = None) -> FileEntry:
        """Store everything read from ``source`` (for example standard input)."""
        return self._record(self.blobs.ingest(source, progress=progress))

    def store_bytes(self, data: bytes) -> FileEntry:
        """Store in-memory bytes."""
        return self._record(self.blobs.write_bytes(data))

    def _link(self, path: Path, progress: Progress | None) -> FileEntry:
        path = path.resolve()
        before = _stat(path)
        result = hash_path(path, progress=progress)
        after = _stat(path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise SourceChanged(f"{path} changed while it was being hashed; try again")
        if result.manifest is not None:
            self._store_manifest(result.manifest)
        with self.db.begin() as conn:
            existing = self._row(conn, result.sha1)
            if existing is not None and existing.linked_path is None:
                return self._entry(existing)  # a stored copy beats a link
            conn.execute(delete(schema.files).where(schema.files.c.sha1 == result.sha1))
            conn.execute(
                schema.files.insert().values(
                    sha1=result.sha1,
                    size=result.size,
                    manifest_sha1=None
                    if result.manifest is None
                    else result.manifest.manifest_sha1,
                    linked_path=str(path),
                    linked_mtime_ns=after.st_mtime_ns,
                    stored_at=time.time(),
                )
            )
            row = self._row(conn, result.sha1)
        assert row is not None
        return self._entry(row)

    def _store_manifest(self, manifest: Manifest) -> None:
        data = manifest.to_json_bytes()
        self._record(self.blobs.write_bytes(data))

    def _record(self, result: HashResult) -> FileEntry:
        """Index a blob that is now in the blob store (its manifest too, if it has one)."""
        if result.manifest is not None:
            self._store_manifest(result.manifest)
        manifest_sha1 = None if result.manifest is None else result.manifest.manifest_sha1
        with self.db.begin() as conn:
            row = self._row(conn, result.sha1)
            if row is None or row.linked_path is not None:
                conn.execute(delete(schema.files).where(schema.files.c.sha1 == result.sha1))
                conn.execute(
                    schema.files.insert().values(
                        sha1=result.sha1,
                        size=result.size,
                        manifest_sha1=manifest_sha1,
                        linked_path=None,
                        linked_mtime_ns=None,
                        stored_at=time.time(),
                    )
                )
                row = self._row(conn, result.sha1)
        assert row is not None
        return self._entry(row)

    def adopt(self, result: HashResult) -> FileEntry:
        """Index a blob that another component put into the blob store after verifying it."""
        if not self.blobs.has(result.sha1):
            raise NotFound(f"no blob {result.sha1} in the store to adopt")
        return self._record(result)

    # -- finding files -------------------------------------------------------------------------

    def get(self, sha1: str) -> FileEntry | None:
        """The file named ``sha1`` if this node can serve it now, else None.

        A link whose target is gone or changed (size or mtime) is forgotten here.
        """
        with self.db.begin() as conn:
            row = self._row(conn, sha1)
            if row is None:
                return None
            if row.linked_path is None:
                if not self.blobs.has(sha1):
                    conn.execute(delete(schema.files).where(schema.files.c.sha1 == sha1))
                    return None
                return self._entry(row)
            try:
                st = os.stat(row.linked_path)
            except OSError:
                st = None
            if st is None or (st.st_size, st.st_mtime_ns) != (row.size, row.linked_mtime_ns):
                conn.execute(delete(schema.files).where(schema.files.c.sha1 == sha1))
                return None
            return self._entry(row)

    def require(self, uri: FileURI) -> FileEntry:
        """The entry a URI names (the whole file for a chunk URI).

        Raises:
            NotFound: this node does not have it.
        """
        sha1 = uri.chunk_of.file_sha1 if uri.chunk_of is not None else uri.sha1
        entry = self.get(sha1)
        if entry is None:
            raise NotFound(f"{uri} is not stored on this node")
        if uri.chunk_of is not None and uri.chunk_of.end > entry.size:
            raise NotFound(f"{uri} asks for bytes past the end of a {entry.size}-byte file")
        return entry

    def locate(self, uri: FileURI) -> tuple[Path, int, int] | None:
        """Where the bytes a URI names are on this node: (file, start, end), or None.

        A chunk URI is read from the whole file if it is here (once its bytes there are checked
        against the chunk's SHA-1), else from the chunk's own blob.

        Raises:
            InvalidInput: the whole file is here and the chunk's bytes in it do not hash to the
                URI's SHA-1, or the chunk runs past its end: the URI is wrong.
        """
        if uri.chunk_of is not None:
            whole = self.get(uri.chunk_of.file_sha1)
            if whole is not None and uri.chunk_of.end > whole.size:
                raise InvalidInput(
                    f"{uri} is wrong: it ends at byte {uri.chunk_of.end}, past the end of"
                    f" sha1://{uri.chunk_of.file_sha1} (stored here: {whole.size} bytes)"
                )
            if whole is not None:
                hasher = hashlib.sha1()
                with open(whole.path, "rb", buffering=0) as f:
                    hash_range(hasher, f.fileno(), uri.chunk_of.start, uri.chunk_of.end)
                got = hasher.hexdigest()
                if got != uri.sha1:
                    raise InvalidInput(
                        f"{uri} is wrong: bytes {uri.chunk_of.start}..{uri.chunk_of.end} of"
                        f" sha1://{uri.chunk_of.file_sha1} (stored here) hash to {got}"
                    )
                return whole.path, uri.chunk_of.start, uri.chunk_of.end
        entry = self.get(uri.sha1)
        return None if entry is None else (entry.path, 0, entry.size)

    def manifest(self, entry: FileEntry) -> Manifest | None:
        """The manifest of a large file (loaded from its blob), or None for small files."""
        if entry.manifest_sha1 is None:
            return None
        manifest_entry = self.get(entry.manifest_sha1)
        if manifest_entry is None:
            return None
        return Manifest.from_json_bytes(
            manifest_entry.path.read_bytes(), expected_sha1=entry.manifest_sha1
        )

    def entries(
        self, *, limit: int | None = None, include_manifests: bool = True
    ) -> list[FileEntry]:
        """Stored and linked files, newest first (optionally without manifests).

        A manifest is left out whether or not its file is here: named by a stored file or by a
        download in progress (a ranged read leaves one), or recognised by its bytes (the
        manifest of a file removed, or of a download that was dropped).
        """
        files = schema.files
        query = select(files).order_by(files.c.stored_at.desc())
        if include_manifests:
            if limit is not None:
                query = query.limit(limit)
            with self.db.begin() as conn:
                return [self._entry(row) for row in conn.execute(query)]
        other = files.alias("other")
        downloads = schema.downloads
        query = query.where(
            ~select(other.c.sha1).where(other.c.manifest_sha1 == files.c.sha1).exists(),
            ~select(downloads.c.sha1).where(downloads.c.manifest_sha1 == files.c.sha1).exists(),
        )
        found: list[FileEntry] = []
        with self.db.begin() as conn:
            for row in conn.execute(query):
                if limit is not None and len(found) >= limit:
                    break
                entry = self._entry(row)
                if not _is_manifest(entry):
                    found.append(entry)
        return found

    def stats(self) -> FileStats:
        query = select(
            func.count(),
            func.coalesce(func.sum(schema.files.c.size), 0),
            func.count(schema.files.c.linked_path),
        )
        with self.db.begin() as conn:
            count, total, linked = conn.execute(query).one()
        return FileStats(count=int(count), total_bytes=int(total), linked=int(linked))

    # -- reading -------------------------------------------------------------------------------

    def iter_range(
        self, entry: FileEntry, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a file, in blocks.

        Raises:
            SourceChanged: a linked file changed while it was read.
        """
        end = entry.size if end is None else end
        if not 0 <= start <= end <= entry.size:
            raise ValueError(f"range {start}..{end} is outside 0..{entry.size}")
        try:
            source = open(entry.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except OSError as exc:
            raise SourceUnreadable(f"cannot open {entry.path}: {exc.strerror}") from None
        with source:
            source.seek(start)
            remaining = end - start
            while remaining:
                block = source.read(min(BLOCK_SIZE, remaining))
                if not block:
                    raise SourceChanged(f"{entry.path} is shorter than the {entry.size} indexed")
                remaining -= len(block)
                yield block
        if entry.linked:
            st = _stat(entry.path)
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.linked_mtime_ns):
                raise SourceChanged(f"linked file {entry.path} changed while it was read")

    def read_range(self, entry: FileEntry, start: int, end: int) -> bytes:
        """The bytes ``[start, end)`` of a file, in memory."""
        return b"".join(self.iter_range(entry, start, end))

    # -- checking ------------------------------------------------------------------------------

    def verify(
        self, *, remove: bool = False, progress: Progress | None = None
    ) -> tuple[int, list[VerifyProblem]]:
        """Re-hash every stored and linked file.

        Args:
            remove: delete corrupt blobs and their index rows (linked files are only unindexed).
            progress: called with the bytes hashed so far.

        Returns:
            The number of files checked, and the problems found.
        """
        problems: list[VerifyProblem] = []
        checked = 0
        done = 0
        for entry in self.entries():
            checked += 1
            base = done

            def step(n: int, base: int = base) -> None:
                if progress is not None:
                    progress(base + n)

            problem = self._check(entry, step)
            done += entry.size
            if problem is not None:
                if remove:
                    self.remove(entry.sha1)
                problems.append(VerifyProblem(entry.sha1, entry.path, problem, remove))
        return checked, problems

    def _check(self, entry: FileEntry, progress: Progress) -> str | None:
        try:
            with open_source(entry.path) as (source, size):
                if size != entry.size:
                    return f"size is {size}, expected {entry.size}"
                result = hash_stream(source, expected_size=size, progress=progress)
        except (SourceUnreadable, SourceChanged) as exc:
            return str(exc)
        if result.sha1 != entry.sha1:
            return f"bytes hash to {result.sha1}"
        return None

    def remove(self, sha1: str) -> None:
        """Forget a file; delete its blob if it was stored (a linked file is left alone)."""
        with self.db.begin() as conn:
            row = self._row(conn, sha1)
            conn.execute(delete(schema.files).where(schema.files.c.sha1 == sha1))
        if row is None or row.linked_path is None:
            self.blobs.remove(sha1)

    # -- rows ----------------------------------------------------------------------------------

    @staticmethod
    def _row(conn: Connection, sha1: str) -> Row[Any] | None:
        return conn.execute(select(schema.files).where(schema.files.c.sha1 == sha1)).first()

    def _entry(self, row: Row[Any]) -> FileEntry:
        linked = row.linked_path is not None
        return FileEntry(
            sha1=row.sha1,
            size=int(row.size),
            manifest_sha1=row.manifest_sha1,
            path=Path(row.linked_path) if linked else self.blobs.blob_path(row.sha1),
            linked=linked,
            stored_at=float(row.stored_at),
            linked_mtime_ns=row.linked_mtime_ns,
        )


_MANIFEST_START = b'{"size":'
"""How a manifest's JSON begins (kachery writes its keys in a fixed order)."""


def _is_manifest(entry: FileEntry) -> bool:
    """True if a stored blob is a kachery manifest (read only if it begins like one)."""
    if entry.linked or not len(_MANIFEST_START) <= entry.size <= MAX_MANIFEST_BYTES:
        return False
    try:
        with open(entry.path, "rb") as f:
            if f.read(len(_MANIFEST_START)) != _MANIFEST_START:
                return False
            data = _MANIFEST_START + f.read()
    except OSError:
        return False
    try:
        Manifest.from_json_bytes(data, expected_sha1=entry.sha1)
    except InvalidManifest:
        return False
    return True


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise SourceUnreadable(f"{path}: no such file") from None
    except OSError as exc:
        raise SourceUnreadable(f"{path}: {exc.strerror}") from None
