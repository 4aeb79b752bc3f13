"""The chunk exchange between real nodes on loopback: loads, providers, and every named fault."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from kachery.node.daemon.node import Node
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import StreamResult
from kachery.node.services.files.disk import PartialFile, read_blocks
from kachery.node.services.files.finding import (
    FIND_CACHE_SECONDS,
    MAX_FIND_CACHE,
    Finder,
    Provider,
)
from kachery.node.services.files.service import FileService, check_range
from kachery.node.services.host import Host
from kachery.protocol import FileURI, parse_file_uri
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput
from kachery.protocol.files import DATA_FRAME_BYTES, FindFile, frame_sizes
from kachery.protocol.messages import DocRequest
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.session import DataReceived
from kachery.storage import NotFound, StoreFull
from kachery.storage.downloads import Downloads
from kachery.storage.files import FileEntry

from .swarm import WAIT, channel_of, control, swarm, wait
from .test_session import established

PIECE = 20_000_000
SLOW = 40e6
"""Upload cap (bytes/s) for providers a test stops mid-transfer: slow enough to catch them."""


def files_of(node: Node) -> FileService:
    return node.services.files


def store_random(
    node: Node, tmp_path: Path, size: int, name: str = "data.bin"
) -> tuple[FileEntry, bytes]:
    data = os.urandom(size)
    path = tmp_path / f"{node.node_id[:8]}-{name}"
    path.write_bytes(data)
    return node.home.files.store_path(path), data


def nothing_partial(node: Node) -> bool:
    return not list(node.home.downloads.partial_dir.iterdir()) and not node.home.downloads.all()


async def test_a_member_loads_a_large_file_verified_piece_by_piece(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        entry, data = store_random(provider, tmp_path, 45_000_000)
        got = await files_of(downloader).download(entry.uri())
        assert got.sha1 == entry.sha1
        assert got.manifest_sha1 == entry.manifest_sha1
        assert got.path.read_bytes() == data
        assert downloader.home.files.get(str(entry.manifest_sha1)) is not None
        assert nothing_partial(downloader)
        # A second load is answered from the store.
        assert (await files_of(downloader).download(entry.uri())).path == got.path


async def test_small_files_and_chunk_uris_fetch_only_what_they_name(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        small, small_data = store_random(provider, tmp_path, 1000, "small.bin")
        got = await files_of(downloader).download(small.uri())
        assert got.path.read_bytes() == small_data
        big, big_data = store_random(provider, tmp_path, 45_000_000, "big.bin")
        before = files_of(provider).bytes_uploaded
        tail = big_data[40_000_000:]
        chunk = parse_file_uri(
            f"sha1://{hashlib.sha1(tail).hexdigest()}?chunkOf={big.sha1}~40000000~45000000"
        )
        got_chunk = await files_of(downloader).download(chunk)
        assert got_chunk.path.read_bytes() == tail
        assert files_of(provider).bytes_uploaded - before == 5_000_000
        assert downloader.home.files.get(big.sha1) is None


def chunk_uri(data: bytes, whole: FileEntry, start: int, end: int) -> FileURI:
    sha1 = hashlib.sha1(data[start:end]).hexdigest()
    return parse_file_uri(f"sha1://{sha1}?chunkOf={whole.sha1}~{start}~{end}")


async def test_a_wrong_chunk_uri_is_the_uris_fault_not_the_providers(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        service = files_of(downloader)
        small, small_data = store_random(provider, tmp_path, 3000, "small.bin")
        typo = parse_file_uri(f"sha1://{'2' * 40}?chunkOf={small.sha1}~0~100")
        for _ in range(3):  # no manifest to judge by: nobody is blamed
            with pytest.raises(Unavailable, match=r"sent bytes hashing to .* check the URI"):
                await service.download(typo)
        big, big_data = store_random(provider, tmp_path, 45_000_000, "big.bin")
        # A piece of a file with a manifest: the manifest shows the URI is wrong.
        wrong_piece = parse_file_uri(f"sha1://{'3' * 40}?chunkOf={big.sha1}~0~{PIECE}")
        with pytest.raises(InvalidInput, match=r"is wrong: .* \(its manifest says so\)"):
            await service.download(wrong_piece)
        assert service.penalties.offences == {}
        assert provider.node_id in downloader.connections
        # The honest provider still serves everything.
        right = chunk_uri(big_data, big, PIECE, 2 * PIECE)
        assert (await service.download(right)).path.read_bytes() == big_data[PIECE : 2 * PIECE]
        assert (await service.download(small.uri())).path.read_bytes() == small_data


async def test_a_provider_lying_about_a_chunk_is_penalised(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        bad, downloader = await channel_of(s, ["bad", "downloader"])
        entry, data = store_random(bad, tmp_path, 45_000_000)
        entry.path.chmod(0o644)
        with entry.path.open("r+b") as f:  # its disk rots inside piece 1
            f.seek(PIECE + 10)
            f.write(b"\xff" * 10)
        service = files_of(downloader)
        with pytest.raises(Unavailable, match="it is penalised"):
            await service.download(chunk_uri(data, entry, PIECE, 2 * PIECE))
        assert service.penalties.offences == {bad.node_id: 1}


async def test_load_from_a_named_node_says_why_it_cannot(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, asker, downloader = await channel_of(
            s, ["provider", "asker", "downloader"], roles={"asker": "requestFiles"}
        )
        entry, _ = store_random(provider, tmp_path, 1000)
        service = files_of(downloader)
        service.finder.find_wait = 0.2
        with pytest.raises(NotFound, match=r"node deadbeefdeadbeef\.\.\. is not connected"):
            await service.download(entry.uri(), only="deadbeef" * 8)
        with pytest.raises(NotFound, match=r"does not provide files .* shared with this node"):
            await service.download(entry.uri(), only=asker.node_id)
        # As the command line passes it: a prefix of a connected node's ID, as 'peers' prints.
        events = [e async for e in service.file_load(str(entry.uri()), provider.node_id[:16])]
        assert isinstance(events[-1], StreamResult)
        assert events[-1].value["size"] == 1000


async def test_a_uri_naming_an_unknown_manifest_says_so(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        entry, _ = store_random(provider, tmp_path, 45_000_000)
        service = files_of(downloader)
        service.finder.find_wait = 0.2
        wrong = parse_file_uri(f"sha1://{entry.sha1}/m.dat?manifest={'1' * 40}")
        with pytest.raises(
            NotFound, match=r"manifest sha1://1{40} that the URI names .* 1 member.s. provide"
        ):
            await service.download(wrong)


async def test_find_lists_providers_and_an_unknown_hash_is_not_found(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        a, b, c = await channel_of(s, ["a", "b", "c"])
        entry, _ = store_random(a, tmp_path, 1234)
        store_path = tmp_path / "copy.bin"
        store_path.write_bytes(entry.path.read_bytes())
        b.home.files.store_path(store_path)
        found = await c.services.files.file_find(str(entry.uri()))
        assert sorted(p["nodeId"] for p in found) == sorted([a.node_id, b.node_id])
        files_of(c).finder.find_wait = 0.2
        with pytest.raises(NotFound, match="was not found in channel lab"):
            await files_of(c).download(FileURI(sha1="0" * 40))


async def test_a_member_without_the_role_is_told_it_is_not_permitted(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, viewer = await channel_of(s, ["owner", "viewer"], {"viewer": "provideFiles"})
        entry, _ = store_random(owner, tmp_path, 1000)
        with pytest.raises(NotPermitted, match="lacks role requestFiles"):
            await files_of(viewer).download(entry.uri())
        # The provider refuses too, explicitly, if asked anyway.
        conn = viewer.connections[owner.node_id]
        channel = next(iter(conn.channels))
        with pytest.raises(NotPermitted, match="lacks role requestFiles in channel lab"):
            await conn.request(FindFile(id=0, channel=channel, sha1=entry.sha1))


async def test_three_providers_share_one_download(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        nodes = await channel_of(s, ["p1", "p2", "p3", "downloader"])
        *providers, downloader = nodes
        data = os.urandom(100_000_000)
        path = tmp_path / "shared.bin"
        path.write_bytes(data)
        entry = None
        for p in providers:
            entry = p.home.files.store_path(path)
        assert entry is not None
        got = await files_of(downloader).download(entry.uri())
        assert hashlib.sha1(got.path.read_bytes()).hexdigest() == entry.sha1
        served = [files_of(p).bytes_uploaded for p in providers]
        assert all(n > 0 for n in served), served
        assert sum(served) >= 100_000_000


async def download_watching(
    node: Node, uri: FileURI, when: Callable[[dict[str, Any]], bool], then: Callable[[], None]
) -> FileEntry:
    """Download, calling ``then()`` once, when a progress event satisfies ``when``."""
    fired = False

    def progress(event: dict[str, Any]) -> None:
        nonlocal fired
        if not fired and when(event):
            fired = True
            then()

    return await files_of(node).download(uri, progress=progress)


async def test_a_provider_killed_mid_transfer_is_replaced(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        slow = {"p1": {"max_upload_rate": SLOW}, "p2": {"max_upload_rate": SLOW}}
        p1, p2, downloader = await channel_of(s, ["p1", "p2", "downloader"], options=slow)
        data = os.urandom(100_000_000)
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        entry = p1.home.files.store_path(path)
        p2.home.files.store_path(path)
        got = await download_watching(
            downloader, entry.uri(), lambda e: e["pieces"] >= 1, lambda: s.stop("p1")
        )
        assert got.path.read_bytes() == data
        assert p1.node_id not in downloader.connections


async def test_a_provider_serving_corrupt_bytes_is_dropped_and_nothing_corrupt_lands(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        bad, good, downloader = await channel_of(s, ["bad", "good", "downloader"])
        data = os.urandom(60_000_000)
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        entry = bad.home.files.store_path(path)
        good.home.files.store_path(path)
        # The bad provider's disk rots: every piece it serves fails verification.
        corrupted = bytearray(data)
        for start in range(0, len(corrupted), PIECE):
            corrupted[start + 1000] ^= 0xFF
        entry.path.chmod(0o644)
        entry.path.write_bytes(bytes(corrupted))
        service = files_of(downloader)
        got = await service.download(entry.uri())
        assert got.path.read_bytes() == data
        # Penalised: one offence per corrupt piece it got to send, a ban at the third.
        banned = bad.node_id in service.penalties.banned_peers(trio.current_time())
        assert banned or service.penalties.offences.get(bad.node_id, 0) >= 1
        assert nothing_partial(downloader)


async def test_when_every_provider_goes_the_verified_pieces_wait_for_the_next_attempt(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        slow = {"provider": {"max_upload_rate": SLOW}}
        provider, downloader = await channel_of(s, ["provider", "downloader"], options=slow)
        data = os.urandom(100_000_000)
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        entry = provider.home.files.store_path(path)
        service = files_of(downloader)
        service.finder.find_wait = 0.5
        with pytest.raises(Unavailable, match="run the same load again to resume"):
            await download_watching(
                downloader, entry.uri(), lambda e: e["pieces"] >= 2, lambda: s.stop("provider")
            )
        record = downloader.home.downloads.get(entry.sha1)
        assert record is not None
        kept = len(record.verified)
        assert kept >= 2
        provider.home.close()
        again = await s.start("provider", max_upload_rate=SLOW)
        await wait(downloader, lambda: again.node_id in downloader.connections)
        got = await service.download(entry.uri())
        assert got.path.read_bytes() == data
        # The second attempt fetched no verified piece again.
        assert files_of(again).bytes_uploaded == 100_000_000 - kept * PIECE


async def test_a_downloader_stopped_halfway_resumes_after_restart(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        slow = {"provider": {"max_upload_rate": SLOW}}
        provider, downloader = await channel_of(s, ["provider", "downloader"], options=slow)
        data = os.urandom(100_000_000)
        path = tmp_path / "f.bin"
        path.write_bytes(data)
        entry = provider.home.files.store_path(path)
        half = trio.Event()

        async def first_attempt() -> None:
            await download_watching(
                downloader, entry.uri(), lambda e: e["done"] >= 50_000_000, half.set
            )

        s.nursery.start_soon(first_attempt)
        with trio.fail_after(WAIT):
            await half.wait()
        s.stop("downloader")  # the node stops mid-download, as if killed
        await wait(provider, lambda: downloader.node_id not in provider.connections)
        downloader.home.close()
        served_before = files_of(provider).bytes_uploaded
        again = await s.start("downloader")
        record = again.home.downloads.get(entry.sha1)
        assert record is not None
        verified = len(record.verified)
        assert verified >= 2
        await wait(again, lambda: provider.node_id in again.connections)
        got = await files_of(again).download(entry.uri())
        assert got.path.read_bytes() == data
        resent = files_of(provider).bytes_uploaded - served_before
        remaining = 100_000_000 - verified * PIECE
        assert resent <= remaining + PIECE


async def test_a_load_the_disk_cannot_hold_is_refused_before_fetching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        entry, _ = store_random(provider, tmp_path, 45_000_000)
        monkeypatch.setattr(Downloads, "free_bytes", lambda self: 30_000_000)
        with pytest.raises(StoreFull, match=r"needs 42\.9 MiB more .* which has 28\.6 MiB free"):
            await files_of(downloader).download(entry.uri())
        assert nothing_partial(downloader)
        assert files_of(provider).bytes_uploaded < 100_000  # the manifest, no piece
        # A range needs room only for the pieces that cover it.
        assert await files_of(downloader).fetch_range(entry.uri(), 0, 1000)


async def test_a_disk_that_fills_up_mid_load_keeps_the_verified_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = True
    written: list[int] = []
    real_write = PartialFile.write

    def write(partial: PartialFile, offset: int, frames: list[memoryview]) -> None:
        if full and offset >= 2 * PIECE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(partial, offset, frames)
        written.append(offset)

    monkeypatch.setattr(PartialFile, "write", write)
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        entry, data = store_random(provider, tmp_path, 100_000_000)
        service = files_of(downloader)
        with pytest.raises(StoreFull, match=r"pieces are verified and kept .* to resume"):
            await service.download(entry.uri())
        assert downloader.home.files.get(entry.sha1) is None  # nothing unverified landed
        record = downloader.home.downloads.get(entry.sha1)
        assert record is not None
        assert record.verified <= {0, 1}
        partial = downloader.home.downloads.partial_path(entry.sha1).read_bytes()
        for i in record.verified:
            assert partial[i * PIECE : (i + 1) * PIECE] == data[i * PIECE : (i + 1) * PIECE]
        full = False
        written.clear()
        got = await service.download(entry.uri())
        assert got.path.read_bytes() == data
        assert sorted(written) == [i * PIECE for i in range(5) if i not in record.verified]


async def test_an_unfinished_download_is_listed_and_can_be_discarded_to_free_its_space(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        provider, downloader = await channel_of(s, ["provider", "downloader"])
        entry, data = store_random(provider, tmp_path, 45_000_000)
        service = files_of(downloader)
        await service.fetch_range(entry.uri(), PIECE + 5, PIECE + 10)  # only piece 1 is fetched
        [listed] = await service.file_downloads()
        assert listed["sha1"] == entry.sha1
        assert (listed["verifiedPieces"], listed["pieces"]) == (1, 3)
        assert listed["verifiedBytes"] == PIECE
        assert not listed["active"]
        partial = downloader.home.downloads.partial_path(entry.sha1)
        service._active[entry.sha1] = trio.Event()  # as if a load of it were running
        with pytest.raises(InvalidInput, match="is loading now"):
            await service.file_discard_download(str(entry.uri()))
        del service._active[entry.sha1]
        assert partial.exists()
        done = await service.file_discard_download(str(entry.uri()))
        assert done["freedBytes"] >= PIECE  # the verified piece's blocks (the file is sparse)
        assert nothing_partial(downloader)
        assert await service.file_downloads() == []
        with pytest.raises(NotFound, match="no unfinished download"):
            await service.file_discard_download(str(entry.uri()))
        got = await service.download(entry.uri())  # a later load starts over, and lands
        assert got.path.read_bytes() == data


async def test_changing_a_members_roles_takes_effect_everywhere(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, member = await channel_of(s, ["owner", "member"])
        entry, data = store_random(owner, tmp_path, 1000)
        assert (await files_of(member).download(entry.uri())).path.read_bytes() == data
        member.home.files.remove(entry.sha1)
        await control(owner).channel_set_roles("lab", member.node_id, ["provideFiles"])
        channel = owner.membership.resolve("lab")
        await wait(
            member,
            lambda: member.membership.roles_of(channel, member.node_id) == {Role.PROVIDE_FILES},
        )
        with pytest.raises(NotPermitted, match="lacks role requestFiles"):
            await files_of(member).download(entry.uri())


async def test_a_member_that_leaves_is_no_longer_served(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, member = await channel_of(s, ["owner", "member"])
        await control(member).channel_leave("lab")
        assert not member.membership.channel_ids()
        await wait(owner, lambda: member.node_id not in owner.connections)
        await wait(member, lambda: not member.connections)


async def test_a_bulk_transfer_does_not_starve_control_messages(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        slow = {"provider": {"max_upload_rate": SLOW}}
        provider, downloader = await channel_of(s, ["provider", "downloader"], options=slow)
        entry, _ = store_random(provider, tmp_path, 100_000_000)
        conn = downloader.connections[provider.node_id]
        channel = next(iter(conn.channels))
        finished = trio.Event()
        answered_during = 0

        async def load() -> None:
            await files_of(downloader).download(entry.uri())
            finished.set()

        s.nursery.start_soon(load)
        with trio.fail_after(WAIT):
            while not finished.is_set() and answered_during < 5:
                await conn.request(DocRequest(id=0, channel=channel, after=0))
                if not finished.is_set():
                    answered_during += 1
            await finished.wait()
        assert answered_during == 5


def test_a_byte_range_the_file_cannot_give_is_refused_in_words() -> None:
    assert check_range(10, None, 100) == (10, 100)
    assert check_range(0, 0, 100) == (0, 0)
    for start, end, message in [
        (9999999, None, "start 9999999 is past the end of the file (100 bytes)"),
        (0, 101, "end 101 is past the end of the file (100 bytes)"),
        (50, 40, "start 50 is after end 40"),
        (-1, None, "a byte position cannot be negative"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(message)):
            check_range(start, end, 100)


def test_served_ranges_are_read_straight_into_frame_payloads_split_at_frame_boundaries(
    tmp_path: Path,
) -> None:
    """The provider's vectored read into DataBlocks moves every byte to its place, in frames
    that break at multiples of DATA_FRAME_BYTES of the file; a file that ends early is reported."""
    data = os.urandom(3 * DATA_FRAME_BYTES + 12345)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        blocks = read_blocks(fd, 100, len(data) - 100)
        assert blocks is not None
        assert [len(b) for b in blocks] == [DATA_FRAME_BYTES - 100] + [DATA_FRAME_BYTES] * 2 + [
            12345
        ]
        assert b"".join(bytes(b.payload) for b in blocks) == data[100:]
        assert [len(b) for b in read_blocks(fd, DATA_FRAME_BYTES, 5) or []] == [5]
        assert read_blocks(fd, len(data) - 10, 11) is None  # the file ends first
    finally:
        os.close(fd)


def received_frames(data: bytes, start: int) -> list[memoryview]:
    """``data`` (at file offset ``start``) as a downloader receives it: split by the provider's
    rule, sealed by one session and opened by the other."""
    sender, receiver = established()
    frames, at = [], 0
    for size in frame_sizes(start, len(data)):
        event = receiver.receive(sender.send_data(1, start + at, data[at : at + size]))
        assert isinstance(event, DataReceived)
        frames.append(event.payload)
        at += size
    return frames


def direct_io_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        probe.unlink()


def test_a_piece_is_written_in_place_page_aligned_frames_with_o_direct(tmp_path: Path) -> None:
    """The frames of a piece land at their offsets; those on page boundaries (all but the first
    and last here) bypass the page cache, the rest go through it, and a piece that starts
    mid-page next to another shares that page correctly."""
    start = 3 * DATA_FRAME_BYTES + 1000  # like the odd pieces of a manifest (20,000,000 * k)
    first = os.urandom(4 * DATA_FRAME_BYTES + 777)
    second = os.urandom(2 * DATA_FRAME_BYTES)
    size = start + len(first) + len(second)
    target = tmp_path / "target.part"
    target.write_bytes(b"")
    os.truncate(target, size)
    partial = PartialFile(target)
    try:
        direct = partial.write(start + len(first), received_frames(second, start + len(first)))
        direct += partial.write(start, received_frames(first, start))
        os.fdatasync(partial.fd)
    finally:
        partial.close()
    assert target.read_bytes() == bytes(start) + first + second
    # the middle frames, three of one piece and one of the other, where O_DIRECT exists
    assert direct == (4 * DATA_FRAME_BYTES if direct_io_works(tmp_path) else 0)


def test_a_filesystem_that_refuses_o_direct_midway_gets_page_cache_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "target.part"
    target.write_bytes(bytes(4 * DATA_FRAME_BYTES))
    data = os.urandom(4 * DATA_FRAME_BYTES)
    partial = PartialFile(target)
    if not partial.direct:
        partial.close()
        pytest.skip("this filesystem has no O_DIRECT to refuse")
    real_pwritev = os.pwritev

    def refuse_direct(fd: int, views: Any, offset: int) -> int:
        if fd != partial.fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, views, offset)

    monkeypatch.setattr(os, "pwritev", refuse_direct)
    try:
        assert partial.write(0, received_frames(data, 0)) == 0
        assert not partial.direct
    finally:
        partial.close()
    assert target.read_bytes() == data


async def test_the_find_cache_is_bounded_and_forgets_old_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Finds are cached per file hash, which peers' answers and users' URIs choose: at most
    MAX_FIND_CACHE at once, and none past FIND_CACHE_SECONDS (on Trio's clock)."""
    finder = Finder(cast(Host, None), PenaltyBox())  # caching needs no node
    found = [Provider("a" * 64, "c" * 64, 1, None)]
    for i in range(MAX_FIND_CACHE + 100):
        finder._remember_find(f"{i:040x}", found)
    assert len(finder._cache) == MAX_FIND_CACHE
    assert f"{0:040x}" not in finder._cache  # the oldest went first
    await trio.sleep(FIND_CACHE_SECONDS + 1)
    finder._remember_find("f" * 40, found)
    assert list(finder._cache) == ["f" * 40]
