"""The blob store and file index: stored once, verified before visible, nothing partial kept."""

from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest
from sqlalchemy import Connection, inspect, select

from kachery.node.home import NodeHome
from kachery.protocol import parse_file_uri
from kachery.protocol.errors import InvalidInput
from kachery.protocol.manifest import Manifest, ManifestChunk, chunk_ranges
from kachery.storage import (
    AlreadyExists,
    Database,
    DatabaseError,
    NotFound,
    SourceChanged,
    SourceUnreadable,
    StoreFull,
    schema,
)
from kachery.storage.blobstore import BLOCK_SIZE, _TempFile, copy_to
from kachery.storage.db import sqlite_url

from .conftest import pattern_bytes


def rows(home: NodeHome) -> list[str]:
    with home.database.begin() as conn:
        return [r.sha1 for r in conn.execute(select(schema.files.c.sha1))]


def blobs_on_disk(home: NodeHome) -> list[str]:
    return sorted(home.files.blobs.iter_blobs())


def temp_files(home: NodeHome) -> list[Path]:
    return list(home.files.blobs.tmp_dir.iterdir())


def test_store_puts_the_blob_at_kacherys_path_once(home: NodeHome, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(b"hello kachery")
    sha1 = hashlib.sha1(b"hello kachery").hexdigest()
    entry = home.files.store_path(src)
    assert entry.sha1 == sha1
    assert entry.path == home.path / "store" / "sha1" / sha1[:2] / sha1[2:4] / sha1[4:6] / sha1
    assert entry.path.read_bytes() == b"hello kachery"
    again = home.files.store_path(src)
    assert again.sha1 == sha1
    assert blobs_on_disk(home) == [sha1]
    assert rows(home) == [sha1]
    assert temp_files(home) == []


def test_a_large_file_stores_its_manifest_as_a_blob_and_no_chunk_copies(
    home: NodeHome, tmp_path: Path
) -> None:
    data = pattern_bytes(45_000_000)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    entry = home.files.store_path(src)
    manifest = home.files.manifest(entry)
    assert manifest is not None
    assert [c.size for c in manifest.chunks] == [20_000_000, 20_000_000, 5_000_000]
    # Two blobs: the file and its manifest. Chunks are byte ranges, never copies.
    assert blobs_on_disk(home) == sorted([entry.sha1, manifest.manifest_sha1])
    chunk = manifest.chunks[1]
    assert home.files.read_range(entry, chunk.start, chunk.end) == data[chunk.start : chunk.end]


def test_a_chunk_is_located_in_its_whole_file_only_if_its_bytes_match(
    home: NodeHome, tmp_path: Path
) -> None:
    data = b"0123456789" * 100
    src = tmp_path / "small.bin"
    src.write_bytes(data)
    entry = home.files.store_path(src)
    right = hashlib.sha1(data[10:20]).hexdigest()
    uri = parse_file_uri(f"sha1://{right}?chunkOf={entry.sha1}~10~20")
    assert home.files.locate(uri) == (entry.path, 10, 20)
    typo = parse_file_uri(f"sha1://{'0' * 40}?chunkOf={entry.sha1}~10~20")
    with pytest.raises(InvalidInput, match=f"is wrong: bytes 10..20 of .* hash to {right}"):
        home.files.locate(typo)
    past = parse_file_uri(f"sha1://{right}?chunkOf={entry.sha1}~990~1010")
    with pytest.raises(InvalidInput, match=r"ends at byte 1010, past the end .* 1000 bytes"):
        home.files.locate(past)


def test_plain_ls_hides_manifests_whether_or_not_their_file_is_stored(home: NodeHome) -> None:
    def listed(include_manifests: bool = False, limit: int | None = None) -> list[str]:
        return [
            e.sha1 for e in home.files.entries(limit=limit, include_manifests=include_manifests)
        ]

    def manifest_of(hex_digit: str) -> Manifest:
        ranges = chunk_ranges(45_000_000)
        chunks = tuple(ManifestChunk(start, end, hex_digit * 40) for start, end in ranges)
        return Manifest(45_000_000, hex_digit * 40, chunks)

    stored = home.files.store_bytes(pattern_bytes(20_000_001))  # with its manifest
    assert stored.manifest_sha1 is not None
    # A ranged read of a remote big file: its manifest is stored, its bytes are a partial file.
    partial = manifest_of("a")
    fetched = home.files.store_bytes(partial.to_json_bytes())
    home.downloads.begin(partial.sha1, fetched.sha1, partial.size, len(partial.chunks))
    # The manifest of a file that was dropped (a load refused for space, a file removed).
    orphan = home.files.store_bytes(manifest_of("b").to_json_bytes())
    # Plain files, one of them JSON that begins like a manifest.
    lookalike = home.files.store_bytes(b'{"size":3,"sha1":"no","chunks":[]}')
    small = home.files.store_bytes(b"small")
    everything = [stored.sha1, stored.manifest_sha1, fetched.sha1, orphan.sha1, lookalike.sha1]
    assert sorted(listed(include_manifests=True)) == sorted([*everything, small.sha1])
    shown = {small.sha1, lookalike.sha1, stored.sha1}
    assert sorted(listed()) == sorted(shown)
    first_two = listed(limit=2)
    assert len(first_two) == 2
    assert set(first_two) < shown
    home.downloads.forget(partial.sha1)  # the download is dropped: its manifest stays hidden
    assert sorted(listed()) == sorted(shown)


def test_store_from_a_stream_of_unknown_length(home: NodeHome) -> None:
    data = pattern_bytes(20_000_001)
    entry = home.files.store_stream(io.BytesIO(data))
    assert str(entry.uri()) == (
        "sha1://445bc771805d84a7dcffffaede1b8faeb516d9ca?manifest=a0d7e88b8b467db6af0a91ce4964514c000f04a5"
    )


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_unreadable_sources_are_refused_clearly(home: NodeHome, tmp_path: Path, make: str) -> None:
    path = tmp_path / "x"
    if make == "directory":
        path.mkdir()
    with pytest.raises(
        SourceUnreadable, match="no such file" if make == "missing" else "directory"
    ):
        home.files.store_path(path)
    assert rows(home) == []


def test_a_full_disk_leaves_nothing_and_the_next_store_works(
    home: NodeHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(pattern_bytes(10_000_000))
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(StoreFull, match="no space left"):
        home.files.store_path(src)
    monkeypatch.setattr(os, "write", real_write)
    assert temp_files(home) == []
    assert blobs_on_disk(home) == []
    assert rows(home) == []
    entry = home.files.store_path(src)
    assert entry.path.read_bytes() == src.read_bytes()


def test_a_source_that_fails_midway_leaves_nothing(home: NodeHome) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: object) -> int:
            self.reads += 1
            if self.reads > 2:
                raise OSError(errno.EIO, "Input/output error")
            view = memoryview(buffer)  # type: ignore[arg-type]
            view[:1000] = b"x" * 1000
            return 1000

    with pytest.raises(SourceUnreadable, match="Input/output error"):
        home.files.store_stream(Broken())  # type: ignore[arg-type]
    assert (temp_files(home), blobs_on_disk(home), rows(home)) == ([], [], [])


def test_a_source_that_grows_while_stored_is_refused(home: NodeHome, tmp_path: Path) -> None:
    path = tmp_path / "grow.bin"
    path.write_bytes(b"a" * 100)
    with (
        pytest.raises(SourceChanged, match="changed while it was read"),
        open(path, "rb") as source,
    ):
        home.files.blobs.ingest(source, expected_size=50)
    assert temp_files(home) == []


def test_copy_to_copies_a_range_through_the_direct_writer_and_names_its_target_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load -o``'s copy: a range starting mid-block, several blocks long (O_DIRECT for the
    aligned blocks), a small one, a source that ends first, and a full disk."""
    data = pattern_bytes(3 * BLOCK_SIZE + 12_345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    for start, end in ((777, len(data) - 5), (10, 1010)):
        dest = tmp_path / "dest.bin"
        seen: list[int] = []
        with open(src, "rb", buffering=0) as source, open(dest, "wb", buffering=0) as out:
            source.seek(start)
            copy_to(source, out.fileno(), end - start, what="dest.bin", progress=seen.append)
        assert dest.read_bytes() == data[start:end]
        assert seen[-1] == end - start
    with (
        open(src, "rb", buffering=0) as source,
        open(tmp_path / "short.bin", "wb") as out,
        pytest.raises(SourceChanged, match="expected"),
    ):
        copy_to(source, out.fileno(), len(data) + 1, what="short.bin")

    def no_space(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    with (
        open(src, "rb", buffering=0) as source,
        open(tmp_path / "full.bin", "wb") as out,
        pytest.raises(StoreFull, match=r"no space left on the device for /x/full\.bin"),
    ):
        copy_to(source, out.fileno(), len(data), what="/x/full.bin")


def test_clean_temp_removes_only_files_whose_writer_died(home: NodeHome) -> None:
    blobs = home.files.blobs
    leftover = blobs.tmp_dir / "dead.part"
    leftover.write_bytes(b"partial")
    with _TempFile(blobs.tmp_dir) as live:
        assert blobs.clean_temp() == 1
        assert live.path.exists()
        assert not leftover.exists()
    assert temp_files(home) == []


def test_link_indexes_in_place_and_a_changed_target_is_never_served(
    home: NodeHome, tmp_path: Path
) -> None:
    path = tmp_path / "linked.bin"
    path.write_bytes(b"original bytes")
    entry = home.files.store_path(path, link=True)
    assert entry.linked
    assert entry.path == path.resolve()
    assert blobs_on_disk(home) == []
    assert home.files.get(entry.sha1) == entry
    path.write_bytes(b"changed bytes!")  # same size, new mtime
    os.utime(path, ns=(1, 1))
    assert home.files.get(entry.sha1) is None
    with pytest.raises(NotFound, match="not stored on this node"):
        home.files.require(parse_file_uri(f"sha1://{entry.sha1}"))


def test_a_deleted_link_target_is_absent(home: NodeHome, tmp_path: Path) -> None:
    path = tmp_path / "gone.bin"
    path.write_bytes(b"soon gone")
    entry = home.files.store_path(path, link=True)
    path.unlink()
    assert home.files.get(entry.sha1) is None


def test_a_stored_copy_beats_a_link(home: NodeHome, tmp_path: Path) -> None:
    path = tmp_path / "both.bin"
    path.write_bytes(b"both ways")
    home.files.store_path(path, link=True)
    stored = home.files.store_path(path)
    assert not stored.linked
    assert not home.files.store_path(path, link=True).linked


def test_verify_finds_and_removes_corrupt_blobs(home: NodeHome, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"good bytes")
    bad = tmp_path / "bad"
    bad.write_bytes(b"bad bytes")
    home.files.store_path(good)
    entry = home.files.store_path(bad)
    entry.path.chmod(0o644)
    entry.path.write_bytes(b"bad bytez")
    checked, problems = home.files.verify()
    assert checked == 2
    assert [(p.sha1, p.removed) for p in problems] == [(entry.sha1, False)]
    assert "hash to" in problems[0].problem
    _, problems = home.files.verify(remove=True)
    assert problems[0].removed
    assert home.files.get(entry.sha1) is None
    assert not entry.path.exists()
    assert home.files.verify() == (1, [])


def test_mutables_have_kachery_semantics(home: NodeHome) -> None:
    m = home.mutables
    assert m.get("alias") is None
    m.set("alias", "sha1://abc")
    assert m.get("alias") == "sha1://abc"
    m.set({"b": 2, "a": 1}, [1, {"x": None}])
    assert m.get({"a": 1, "b": 2}) == [1, {"x": None}]
    with pytest.raises(AlreadyExists):
        m.set("alias", "other", update=False)
    assert m.get("alias") == "sha1://abc"
    m.set("alias", "other")
    assert m.get("alias") == "other"
    assert m.delete("alias") is True
    assert m.delete("alias") is False
    from kachery.protocol import InvalidInput

    with pytest.raises(InvalidInput, match="not a JSON value"):
        m.set("k", {1, 2})


def test_the_schema_is_migrated_on_open_and_a_newer_one_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    db = Database(url)
    with db.begin() as conn:
        assert (
            conn.execute(select(schema.schema_version.c.version)).scalar() == schema.SCHEMA_VERSION
        )
        conn.execute(schema.schema_version.update().values(version=schema.SCHEMA_VERSION + 1))
    db.close()
    with pytest.raises(DatabaseError, match="upgrade kachery-node"):
        Database(url)


def test_the_database_is_in_wal_mode(home: NodeHome) -> None:
    with home.database.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_migration_cut_short_changes_nothing_and_the_next_open_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = sqlite_url(tmp_path / "k.db")
    Database(url).close()

    def half_done(conn: Connection) -> None:  # DDL, then a failure (a full disk, a crash)
        conn.exec_driver_sql("CREATE TABLE extra (x INTEGER)")
        conn.exec_driver_sql("ALTER TABLE feed_messages RENAME TO feed_messages_old")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, half_done])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    with pytest.raises(OSError, match="No space left"):
        Database(url)
    monkeypatch.undo()
    db = Database(url)
    try:
        tables = set(inspect(db.engine).get_table_names())
        assert "feed_messages" in tables
        assert not {"extra", "feed_messages_old"} & tables  # the DDL was rolled back too
        with db.begin() as conn:
            version = conn.execute(select(schema.schema_version.c.version)).scalar()
        assert version == schema.SCHEMA_VERSION
    finally:
        db.close()
