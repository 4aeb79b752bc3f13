"""kachery manifests: how a file over 20,000,000 bytes is cut into verifiable pieces.

A manifest is kachery's JSON, byte for byte as kachery-client writes it (compact separators, keys
in the order size, sha1, chunks and start, end, sha1), so the SHA-1 of those bytes, which large
file URIs carry as ``?manifest=``, matches kachery's::

    {"size":45000000,"sha1":"...","chunks":[{"start":0,"end":20000000,"sha1":"..."},...]}

``PieceHasher`` computes, in one pass over a file's bytes, its SHA-1 and the SHA-1 of each piece.
Non-goals: reading files (storage/ does) and choosing pieces to fetch (the download planner does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ._hex import is_sha1_hex
from .errors import InvalidManifest, LocalProtocolError
from .uri import FileURI

CHUNK_SIZE = 20_000_000
"""kachery's piece size; a file gets a manifest only when it is larger than this."""

MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Refuse to parse larger manifests: 64 MiB of JSON describes files of about 10 PB."""


def needs_manifest(size: int) -> bool:
    """True if a file of ``size`` bytes is described by a manifest (kachery's rule)."""
    return size > CHUNK_SIZE


def chunk_ranges(size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of a file's pieces: all CHUNK_SIZE but the last."""
    return [(start, min(start + CHUNK_SIZE, size)) for start in range(0, size, CHUNK_SIZE)]


@dataclass(frozen=True, slots=True)
class ManifestChunk:
    """One piece of a file: bytes ``[start, end)`` with SHA-1 ``sha1``."""

    start: int
    end: int
    sha1: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Manifest:
    """A file's size, SHA-1 and pieces; construct through ``from_json_bytes`` or a ``PieceHasher``.

    Construction checks consistency: pieces are contiguous from 0 to ``size``, all CHUNK_SIZE long
    but the last, and the file is large enough to have a manifest at all.
    """

    size: int
    sha1: str
    chunks: tuple[ManifestChunk, ...]

    def __post_init__(self) -> None:
        if not is_sha1_hex(self.sha1):
            raise InvalidManifest(f"manifest sha1 {self.sha1!r} is not 40 lowercase hex digits")
        if not needs_manifest(self.size):
            raise InvalidManifest(
                f"a file of {self.size} bytes has no manifest "
                f"(only files over {CHUNK_SIZE} bytes do)"
            )
        # compare counts first: a huge size must not build a huge list of expected ranges
        count = -(-self.size // CHUNK_SIZE)
        got = [(c.start, c.end) for c in self.chunks]
        if len(got) != count or got != chunk_ranges(self.size):
            raise InvalidManifest(
                f"manifest chunks do not cover 0..{self.size} in {CHUNK_SIZE}-byte pieces"
            )
        for c in self.chunks:
            if not is_sha1_hex(c.sha1):
                raise InvalidManifest(f"chunk sha1 {c.sha1!r} is not 40 lowercase hex digits")

    def to_json_bytes(self) -> bytes:
        """kachery-client's exact JSON bytes for this manifest."""
        doc = {
            "size": self.size,
            "sha1": self.sha1,
            "chunks": [{"start": c.start, "end": c.end, "sha1": c.sha1} for c in self.chunks],
        }
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @property
    def manifest_sha1(self) -> str:
        """SHA-1 of ``to_json_bytes()``: the ``?manifest=`` of the file's URI."""
        return hashlib.sha1(self.to_json_bytes()).hexdigest()

    def chunk_index_at(self, offset: int) -> int:
        """Index of the piece that holds byte ``offset``."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside 0..{self.size}")
        return offset // CHUNK_SIZE

    @classmethod
    def from_json_bytes(cls, data: bytes, *, expected_sha1: str | None = None) -> Manifest:
        """Parse and check a manifest.

        Args:
            data: the manifest's JSON bytes.
            expected_sha1: if given, the SHA-1 the bytes must have (the URI's ``?manifest=``).

        Raises:
            InvalidManifest: not a consistent kachery manifest, or not the expected bytes.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidManifest(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        if expected_sha1 is not None:
            got = hashlib.sha1(data).hexdigest()
            if got != expected_sha1:
                raise InvalidManifest(f"manifest bytes hash to {got}, not {expected_sha1}")
        try:
            doc = json.loads(data)
        except ValueError as exc:  # also UnicodeDecodeError, and integers over 4300 digits
            raise InvalidManifest(f"manifest is not JSON: {exc}") from None
        except RecursionError:
            raise InvalidManifest("manifest is not JSON: it nests too deeply") from None
        try:
            size, sha1, chunks = doc["size"], doc["sha1"], doc["chunks"]
            parsed = tuple(ManifestChunk(c["start"], c["end"], c["sha1"]) for c in chunks)
        except (KeyError, TypeError) as exc:
            raise InvalidManifest(f"manifest lacks a field or has a wrong type: {exc!r}") from None
        ints = [size] + [v for c in parsed for v in (c.start, c.end)]
        hashes = [sha1] + [c.sha1 for c in parsed]
        if not all(type(v) is int for v in ints) or not all(type(h) is str for h in hashes):
            raise InvalidManifest("manifest sizes and offsets must be integers, hashes strings")
        return cls(size, sha1, parsed)

    def uri(self, label: str = "") -> FileURI:
        """The URI of the file this manifest describes."""
        return FileURI(sha1=self.sha1, label=label, manifest_sha1=self.manifest_sha1)


@dataclass(frozen=True, slots=True)
class HashResult:
    """What one pass over a file's bytes found: its size, SHA-1, and manifest if it needs one."""

    size: int
    sha1: str
    manifest: Manifest | None

    def uri(self, label: str = "") -> FileURI:
        """The kachery URI of these bytes."""
        if self.manifest is not None:
            return self.manifest.uri(label)
        return FileURI(sha1=self.sha1, label=label)


class PieceHasher:
    """SHA-1 of a byte stream and of each CHUNK_SIZE piece of it, in one pass.

    The two halves are separate so a caller can run them in two threads (hashlib releases the GIL
    on large buffers): ``update_whole`` and ``update_pieces`` must each see every byte in order.
    ``update`` does both in the calling thread.

    Args:
        expected_size: the stream's length if known in advance. When it is known to be too small
            for a manifest, piece hashing is skipped (half the work); if the stream then turns
            out longer, ``finish`` raises.
    """

    def __init__(self, expected_size: int | None = None) -> None:
        self._expected_size = expected_size
        self.needs_pieces = expected_size is None or needs_manifest(expected_size)
        self._whole = hashlib.sha1()
        self._piece = hashlib.sha1()
        self._piece_fill = 0
        self._piece_hashes: list[str] = []
        self._size_whole = 0
        self._size_pieces = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.update_whole(data)
        self.update_pieces(data)

    def update_whole(self, data: bytes | bytearray | memoryview) -> None:
        self._whole.update(data)
        self._size_whole += len(data)

    def update_pieces(self, data: bytes | bytearray | memoryview) -> None:
        self._size_pieces += len(data)
        if not self.needs_pieces:
            return
        view = memoryview(data)
        while len(view):
            take = min(len(view), CHUNK_SIZE - self._piece_fill)
            self._piece.update(view[:take])
            self._piece_fill += take
            view = view[take:]
            if self._piece_fill == CHUNK_SIZE:
                self._piece_hashes.append(self._piece.hexdigest())
                self._piece = hashlib.sha1()
                self._piece_fill = 0

    def finish(self) -> HashResult:
        """The result; the hasher must not be used afterwards."""
        if self._size_whole != self._size_pieces:
            raise AssertionError("update_whole and update_pieces saw different byte counts")
        size = self._size_whole
        if self._expected_size is not None and size != self._expected_size:
            raise LocalProtocolError(f"expected {self._expected_size} bytes, hashed {size}")
        sha1 = self._whole.hexdigest()
        if not needs_manifest(size):
            return HashResult(size, sha1, None)
        hashes = list(self._piece_hashes)
        if self._piece_fill:
            hashes.append(self._piece.hexdigest())
        chunks = tuple(
            ManifestChunk(start, end, digest)
            for (start, end), digest in zip(chunk_ranges(size), hashes, strict=True)
        )
        return HashResult(size, sha1, Manifest(size, sha1, chunks))


def hash_bytes(data: bytes | bytearray | memoryview) -> HashResult:
    """Hash an in-memory byte string (see ``PieceHasher``)."""
    hasher = PieceHasher(expected_size=len(data))
    hasher.update(data)
    return hasher.finish()
