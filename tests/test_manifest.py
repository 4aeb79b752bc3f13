from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kachery.protocol import CHUNK_SIZE, InvalidManifest, Manifest, ManifestChunk, PieceHasher
from kachery.protocol.manifest import chunk_ranges, needs_manifest

from .conftest import pattern_bytes

S = "c958d91757eb1891055f1690ec49121121c03841"


def test_only_files_over_the_chunk_size_need_a_manifest() -> None:
    assert not needs_manifest(0)
    assert not needs_manifest(CHUNK_SIZE)
    assert needs_manifest(CHUNK_SIZE + 1)
    assert chunk_ranges(45_000_000) == [
        (0, 20_000_000),
        (20_000_000, 40_000_000),
        (40_000_000, 45_000_000),
    ]
    assert chunk_ranges(0) == []


@pytest.mark.parametrize(
    ("size", "chunks", "complaint"),
    [
        (100, [(0, 100)], "has no manifest"),
        (CHUNK_SIZE + 1, [(0, CHUNK_SIZE)], "do not cover"),
        (CHUNK_SIZE + 1, [(0, 10), (10, CHUNK_SIZE + 1)], "do not cover"),
    ],
)
def test_inconsistent_manifests_are_refused(
    size: int, chunks: list[tuple[int, int]], complaint: str
) -> None:
    with pytest.raises(InvalidManifest, match=complaint):
        Manifest(size, S, tuple(ManifestChunk(a, b, S) for a, b in chunks))


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"not json", "not JSON"),
        (b'{"size": 1}', "lacks a field"),
        (b'{"size": "x", "sha1": "' + S.encode() + b'", "chunks": []}', "must be integers"),
        (b"[1, 2]", "lacks a field"),
    ],
)
def test_malformed_manifest_json_is_refused(data: bytes, complaint: str) -> None:
    with pytest.raises(InvalidManifest, match=complaint):
        Manifest.from_json_bytes(data)


def test_manifest_bytes_must_hash_to_the_expected_sha1() -> None:
    data = pattern_bytes(CHUNK_SIZE + 5)
    hasher = PieceHasher()
    hasher.update(data)
    manifest = hasher.finish().manifest
    assert manifest is not None
    with pytest.raises(InvalidManifest, match="hash to"):
        Manifest.from_json_bytes(manifest.to_json_bytes(), expected_sha1="0" * 40)


@settings(max_examples=25, deadline=None)
@given(splits=st.lists(st.integers(min_value=0, max_value=CHUNK_SIZE + 3000), max_size=6))
def test_piece_hashes_do_not_depend_on_how_the_stream_is_split(splits: list[int]) -> None:
    size = CHUNK_SIZE + 3000
    data = pattern_bytes(size)
    cuts = sorted({0, size, *splits})
    hasher = PieceHasher()
    for a, b in itertools.pairwise(cuts):
        hasher.update(memoryview(data)[a:b])
    result = hasher.finish()
    assert result.sha1 == hashlib.sha1(data).hexdigest()
    assert result.manifest is not None
    assert [c.sha1 for c in result.manifest.chunks] == [
        hashlib.sha1(data[:CHUNK_SIZE]).hexdigest(),
        hashlib.sha1(data[CHUNK_SIZE:]).hexdigest(),
    ]


def test_a_known_small_size_skips_piece_hashing_but_a_longer_stream_is_caught() -> None:
    from kachery.protocol import LocalProtocolError

    hasher = PieceHasher(expected_size=10)
    assert not hasher.needs_pieces
    hasher.update(b"x" * 11)
    with pytest.raises(LocalProtocolError, match="expected 10 bytes, hashed 11"):
        hasher.finish()
