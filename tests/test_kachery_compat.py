"""kachery-client's own values (tests/vectors/kachery-client-1.2.0.json) are reproduced exactly, and
the same values are also derived here independently of kachery-node's code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kachery.node.home import NodeHome
from kachery.protocol import (
    Manifest,
    exact_kwargs_digest,
    hash_bytes,
    subfeed_hash,
    subfeed_hash_of_object,
    task_hash,
)

from .conftest import load_vectors, pattern_bytes

VECTORS = load_vectors("kachery-client-1.2.0.json")
SIZES = [0, 1, 19_999_999, 20_000_000, 20_000_001, 45_000_000]


def independent_uri(data: bytes) -> str:
    """What kachery computes, written out by hand: no kachery-node code involved."""
    digest = hashlib.sha1(data).hexdigest()
    if len(data) <= 20_000_000:
        return f"sha1://{digest}"
    parts = []
    for start in range(0, len(data), 20_000_000):
        end = min(start + 20_000_000, len(data))
        piece = hashlib.sha1(data[start:end]).hexdigest()
        parts.append(f'{{"start":{start},"end":{end},"sha1":"{piece}"}}')
    manifest = f'{{"size":{len(data)},"sha1":"{digest}","chunks":[{",".join(parts)}]}}'
    return f"sha1://{digest}?manifest={hashlib.sha1(manifest.encode()).hexdigest()}"


@pytest.mark.parametrize("size", SIZES)
def test_uri_of_bytes_matches_an_independent_derivation(size: int) -> None:
    data = pattern_bytes(size)
    assert str(hash_bytes(data).uri()) == independent_uri(data)


@pytest.mark.parametrize("vector", VECTORS["files"], ids=lambda v: str(v["size"]))
def test_file_vectors(vector: dict[str, object], home: NodeHome, tmp_path: Path) -> None:
    data = pattern_bytes(int(vector["size"]))  # type: ignore[call-overload]
    result = hash_bytes(data)
    assert result.sha1 == vector["sha1"]
    assert str(result.uri()) == vector["uri"]
    if "manifestJson" in vector:
        assert result.manifest is not None
        assert result.manifest.to_json_bytes().decode() == vector["manifestJson"]
        assert result.manifest.manifest_sha1 == vector["manifestSha1"]
        parsed = Manifest.from_json_bytes(
            str(vector["manifestJson"]).encode(), expected_sha1=str(vector["manifestSha1"])
        )
        assert parsed == result.manifest
    else:
        assert result.manifest is None
    # Storing the file through the node gives the same URI, and stores the manifest too.
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    entry = home.files.store_path(path)
    assert str(entry.uri()) == vector["uri"]
    if "manifestSha1" in vector:
        manifest_entry = home.files.get(str(vector["manifestSha1"]))
        assert manifest_entry is not None
        assert manifest_entry.path.read_text() == vector["manifestJson"]


@pytest.mark.parametrize("vector", VECTORS["taskHash"], ids=lambda v: v["functionId"])
def test_task_hash_vectors(vector: dict[str, object]) -> None:
    assert task_hash(vector["functionId"], vector["kwargs"]) == vector["taskHash"]  # type: ignore[arg-type]


def test_kachery_task_hash_collapses_non_integral_floats_but_the_exact_digest_does_not() -> None:
    # kachery-client writes a non-integral float as null: 5.5 and 6.5 share a task ID.
    assert (
        task_hash("f.1", {"t": 5.5})
        == task_hash("f.1", {"t": 6.5})
        == task_hash("f.1", {"t": None})
    )
    # kachery-node keeps the exact arguments beside each cached result, so they never mix up.
    assert exact_kwargs_digest("f.1", {"t": 5.5}) != exact_kwargs_digest("f.1", {"t": 6.5})
    assert exact_kwargs_digest("f.1", {"t": 2.0}) == exact_kwargs_digest("f.1", {"t": 2})
    # Written out by hand: sorted keys, compact separators, ASCII escapes, 1.0 written as 1.
    text = '{"functionId":"f.1","kwargs":{"a":1,"b":"\\u00e9"}}'
    assert task_hash("f.1", {"b": "é", "a": 1.0}) == hashlib.sha1(text.encode()).hexdigest()


@pytest.mark.parametrize("vector", VECTORS["subfeedHash"], ids=lambda v: str(v["name"]))
def test_subfeed_hash_vectors(vector: dict[str, object]) -> None:
    name = vector["name"]
    got = subfeed_hash(name) if isinstance(name, str) else subfeed_hash_of_object(name)  # type: ignore[arg-type]
    assert got == vector["subfeedHash"]
