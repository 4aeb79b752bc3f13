"""The content-addressed blob store on disk, in kachery's layout.

A blob with SHA-1 ``abcdef...`` lives at ``<store>/sha1/ab/cd/ef/abcdef...``. Every write goes to
a temporary file under ``<store>/tmp`` (same filesystem), is hashed while it is written, fsynced,
and only then renamed into place: a reader never sees a partial or unverified blob. A writer holds
an exclusive ``flock`` on its temporary file, so ``clean_temp`` (run at start-up) removes only the
leftovers of writers that died, never the file of a store still in progress in another process.

Storing reads the source once. The whole-file SHA-1, the piece SHA-1s (files over 20,000,000
bytes) and the copy each run in a thread of their own, fed through bounded queues (hashlib and
os.write release the GIL), and the copy bypasses the page cache (O_DIRECT) where it can, so on
two cores storing costs little more than one hashing pass.

Non-goal: the index of what is stored (files.py) and anything about the network.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from kachery.protocol.manifest import HashResult, PieceHasher

from .errors import SourceChanged, SourceUnreadable, StorageError, StoreFull, is_no_space

BLOCK_SIZE = 4 * 1024 * 1024
"""Bytes read, hashed and written per step: large enough that hashlib releases the GIL and the
per-block Python overhead vanishes, small enough to keep memory flat."""

Progress = Callable[[int], None]
"""Called with the number of bytes processed so far."""


class BlobStore:
    """Blobs named by SHA-1 under ``root`` (``<home>/store``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_root = root / "sha1"
        self.tmp_dir = root / "tmp"
        make_private_dirs(self.tmp_dir)
        make_private_dirs(self.blob_root)

    def blob_path(self, sha1: str) -> Path:
        """Where the blob named ``sha1`` lives (whether or not it exists)."""
        return self.blob_root / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1

    def has(self, sha1: str) -> bool:
        return self.blob_path(sha1).is_file()

    def iter_blobs(self) -> Iterator[str]:
        """The SHA-1s of all blobs on disk."""
        for path in self.blob_root.glob("??/??/??/*"):
            if len(path.name) == 40:
                yield path.name

    def remove(self, sha1: str) -> None:
        self.blob_path(sha1).unlink(missing_ok=True)

    def clean_temp(self) -> int:
        """Remove temporary files left by writers that died; returns how many were removed."""
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            else:
                path.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        return removed

    def ingest(
        self,
        source: BinaryIO,
        *,
        expected_size: int | None = None,
        progress: Progress | None = None,
    ) -> HashResult:
        """Copy ``source`` into the store under its SHA-1, hashing as it goes.

        Args:
            source: a binary stream read to its end (a file, stdin).
            expected_size: the source's size if known: pieces are then hashed only when needed,
                and a source that grows or shrinks meanwhile is refused.
            progress: called with the bytes copied so far.

        Raises:
            StoreFull: the disk filled up; the temporary file is removed.
            SourceChanged: the source's length differs from ``expected_size``.
            StorageError: another I/O error, with nothing partial kept.
        """
        with _TempFile(self.tmp_dir) as temp:
            result = _copy_and_hash(source, temp.fd, expected_size, progress)
            _fsync(temp.fd, "the new blob")
            final = self.blob_path(result.sha1)
            if final.is_file() and final.stat().st_size == result.size:
                return result  # already stored: keep the existing copy
            _makedirs(final.parent)
            temp.commit(final)
        return result

    def adopt(self, path: Path, sha1: str) -> Path:
        """Move a verified file (on this filesystem, e.g. a finished download) into place.

        The caller has checked that its bytes hash to ``sha1``; this only renames.
        """
        final = self.blob_path(sha1)
        _makedirs(final.parent)
        os.replace(path, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def write_bytes(self, data: bytes) -> HashResult:
        """Store in-memory bytes (manifests, JSON values)."""
        return self.ingest(io.BytesIO(data), expected_size=len(data))


def hash_stream(
    source: BinaryIO, *, expected_size: int | None = None, progress: Progress | None = None
) -> HashResult:
    """Hash a stream without storing it (for ``link`` and ``verify``)."""
    return _copy_and_hash(source, None, expected_size, progress)


def hash_range(hasher: Any, fd: int, start: int, end: int) -> None:
    """Feed bytes ``[start, end)`` of an open file to ``hasher`` (a hashlib object), a block at
    a time (hashlib releases the GIL: call it in a worker thread).

    Raises:
        SourceChanged: the file ends before ``end``.
    """
    position = start
    while position < end:
        block = os.pread(fd, min(BLOCK_SIZE, end - position), position)
        if not block:
            raise SourceChanged(f"the file ends at byte {position}, before {end}")
        hasher.update(block)
        position += len(block)


def hash_path(path: Path, *, progress: Progress | None = None) -> HashResult:
    """Hash a file on disk; raises SourceUnreadable or SourceChanged."""
    with open_source(path) as (source, size):
        return hash_stream(source, expected_size=size, progress=progress)


@contextmanager
def open_source(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open a file to be stored, with clear errors for the usual mistakes; yields (stream, size)."""
    if path.is_dir():
        raise SourceUnreadable(f"{path} is a directory; store the files in it one by one")
    try:
        source = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise SourceUnreadable(f"{path}: no such file") from None
    except OSError as exc:
        raise SourceUnreadable(f"{path}: cannot read: {exc.strerror}") from None
    with source:
        yield source, os.fstat(source.fileno()).st_size


def copy_to(
    source: BinaryIO, dest_fd: int, size: int, *, what: str, progress: Progress | None = None
) -> None:
    """Copy the next ``size`` bytes of ``source`` to ``dest_fd``, an empty file opened for
    writing (``what`` names it in errors), bypassing the page cache where the filesystem allows:
    the reader fills page-aligned buffers and a writer thread writes them with O_DIRECT.

    Raises:
        SourceChanged: ``source`` ends first.
        SourceUnreadable: reading failed.
        StoreFull: the disk filled up.
        StorageError: another error writing.
    """
    bounded = _Bounded(source, size)
    if size >= BLOCK_SIZE:
        _pump(bounded, [_Writer(dest_fd, what)], size, progress)
        return
    _write_all(dest_fd, _read_small(bounded, size), what)
    if progress is not None:
        progress(size)


def _copy_and_hash(
    source: BinaryIO, dest_fd: int | None, expected_size: int | None, progress: Progress | None
) -> HashResult:
    """Read ``source`` once; hash it (whole and pieces) and copy it to ``dest_fd`` concurrently."""
    hasher = PieceHasher(expected_size=expected_size)
    if expected_size is not None and expected_size < BLOCK_SIZE:
        data = _read_small(source, expected_size)
        hasher.update(data)
        if dest_fd is not None:
            _write_all(dest_fd, data, "the store")
        return hasher.finish()
    functions: list[Callable[[memoryview], object]] = [hasher.update_whole, hasher.update_pieces]
    if dest_fd is not None:
        functions.append(_Writer(dest_fd, "the store"))
    _pump(source, functions, expected_size, progress)
    return hasher.finish()


def _pump(
    source: BinaryIO | io.RawIOBase,
    functions: list[Callable[[memoryview], object]],
    expected_size: int | None,
    progress: Progress | None,
) -> None:
    """Read ``source`` to its end once, handing every block to each of ``functions``.

    The calling thread reads blocks into page-aligned buffers and hands each to one stage per
    function, each a thread with a bounded queue (the hashes, the writer). A buffer is reused
    once every stage is done with it.

    Raises:
        SourceChanged: the source's length differs from ``expected_size``.
        SourceUnreadable: reading failed.
        (and whatever a function raised, once every stage has stopped)
    """
    stages = [_Stage(fn) for fn in functions]
    pool = _BufferPool(STAGE_QUEUE_BLOCKS + 1)
    done = 0
    try:
        while True:
            buffer = pool.get()
            try:
                n = _read_full(source, buffer)
            except OSError as exc:
                raise SourceUnreadable(f"cannot read the source: {exc.strerror}") from None
            if n == 0:
                break
            done += n
            if expected_size is not None and done > expected_size:
                break
            block = _Block(pool, buffer, n, len(stages))
            for stage in stages:
                stage.raise_error()
                stage.put(block)
            if progress is not None:
                progress(done)
    finally:
        for stage in stages:
            stage.close()
    for stage in stages:
        stage.raise_error()
    if expected_size is not None and done != expected_size:
        raise SourceChanged(
            f"the source changed while it was read: expected {expected_size} bytes, got {done}"
        )


def _read_small(source: BinaryIO | io.RawIOBase, size: int) -> bytes:
    """All of a source under one block (threads would cost more than they save)."""
    try:
        data = source.read(size + 1)
    except OSError as exc:
        raise SourceUnreadable(f"cannot read the source: {exc.strerror}") from None
    if len(data) != size:
        raise SourceChanged(
            f"the source changed while it was read: expected {size} bytes, got {len(data)}"
        )
    return data


class _Bounded(io.RawIOBase):
    """The next ``size`` bytes of a stream, as a stream (``_pump`` reads to the end)."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        self._source = source
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self._left]
        n = self._source.readinto(view) if view else 0  # type: ignore[attr-defined]
        self._left -= n or 0
        return n or 0


STAGE_QUEUE_BLOCKS = 6
"""Blocks a stage may fall behind the reader: bounds memory to a few tens of MiB per store."""

_ALIGN = 4096
"""O_DIRECT needs buffers, offsets and lengths aligned to the device block (4096 covers all)."""


def _read_full(source: BinaryIO | io.RawIOBase, buffer: mmap.mmap) -> int:
    """Fill ``buffer`` from ``source`` unless it ends first (pipes return short reads)."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(view):
        n = source.readinto(view[filled:])  # type: ignore[union-attr]
        if not n:
            break
        filled += n
    view.release()
    return filled


class _BufferPool:
    """Page-aligned buffers of BLOCK_SIZE, handed out and returned; ``get`` waits for one."""

    def __init__(self, count: int) -> None:
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, BLOCK_SIZE))

    def get(self) -> mmap.mmap:
        return self._free.get()

    def put(self, buffer: mmap.mmap) -> None:
        self._free.put(buffer)


class _Block:
    """``n`` bytes in a pooled buffer, returned to the pool when every stage is done with it."""

    def __init__(self, pool: _BufferPool, buffer: mmap.mmap, n: int, users: int) -> None:
        self._pool = pool
        self.buffer = buffer
        self.n = n
        self._users = users
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self._pool.put(self.buffer)


class _Stage:
    """A thread that applies ``fn`` to each block put to it, in order.

    After an error it keeps draining its queue (so the reader never blocks on it) and
    ``raise_error`` re-raises the error in the reader's thread.
    """

    def __init__(self, fn: Callable[[memoryview], object]) -> None:
        self._fn = fn
        self._queue: queue.Queue[_Block | None] = queue.Queue(STAGE_QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kachery-store", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is None:
                view = memoryview(block.buffer)[: block.n]
                try:
                    self._fn(view)
                except BaseException as exc:  # handed to the reader by raise_error
                    self._error = exc
                finally:
                    view.release()
            block.release()

    def put(self, block: _Block) -> None:
        self._queue.put(block)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class _Writer:
    """Writes blocks to a file, with O_DIRECT while the filesystem and alignment allow it.

    O_DIRECT skips the page cache: the bytes go to the device without a copy, so the final
    fsync has nothing left to flush and the CPU stays free for hashing. An unaligned block (the
    last one) or a filesystem that refuses O_DIRECT switches to ordinary writes.
    """

    def __init__(self, fd: int, what: str) -> None:
        self._fd = fd
        self._what = what
        self._direct = _set_direct(fd, True)

    def __call__(self, block: memoryview) -> None:
        if self._direct and len(block) % _ALIGN:
            self._direct = _set_direct(self._fd, False)
        try:
            _write_all(self._fd, block, self._what)
        except _DirectRefused:
            self._direct = _set_direct(self._fd, False)
            _write_all(self._fd, block, self._what)


class _DirectRefused(Exception):
    """The filesystem refused an O_DIRECT write (EINVAL) before writing anything."""


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for ``fd``; returns whether it is now on."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
    except OSError:
        return False
    return on


def _write_all(fd: int, data: bytes | memoryview, what: str) -> None:
    view = memoryview(data)
    first = True
    while view:
        try:
            written = os.write(fd, view)
        except OSError as exc:
            if first and exc.errno == errno.EINVAL:
                raise _DirectRefused from None
            raise _translate_write_error(exc, what) from None
        first = False
        view = view[written:]


def _translate_write_error(exc: OSError, what: str = "the store") -> StorageError:
    if is_no_space(exc):
        return StoreFull(f"no space left on the device for {what}: {exc.strerror}")
    return StorageError(f"cannot write to {what}: {exc.strerror}")


def _fsync(fd: int, what: str) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _translate_write_error(exc) from None


def _makedirs(path: Path) -> None:
    try:
        make_private_dirs(path)
    except OSError as exc:
        raise _translate_write_error(exc) from None


PRIVATE_DIR = 0o700
"""Every folder a node makes in its home: its store, keys and database are its user's alone."""


def make_private_dirs(path: Path) -> None:
    """``mkdir -p`` whose every new folder is 0700 whatever the umask (``Path.mkdir`` makes the
    parents with the umask's mode); ``path`` itself, if it existed looser, is tightened."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(new, PRIVATE_DIR)
        os.chmod(new, PRIVATE_DIR)
    if not missing and path.stat().st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR)


class _TempFile:
    """A temporary file in the store's tmp dir, locked while alive, removed unless committed."""

    def __init__(self, tmp_dir: Path) -> None:
        self.path = tmp_dir / f"{secrets.token_hex(8)}.part"
        self.fd = -1

    def __enter__(self) -> _TempFile:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _translate_write_error(exc) from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def commit(self, final: Path) -> None:
        """Rename into place (atomic on one filesystem) and make the rename durable."""
        os.replace(self.path, final)
        self.path = final  # nothing to remove any more
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.fd, fd = -1, self.fd
        os.close(fd)

    def __exit__(self, *exc_info: object) -> None:
        if self.fd != -1:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
