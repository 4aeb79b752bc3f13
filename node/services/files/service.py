"""The chunk exchange on a node: serving files to peers, and loading them from peers.

Serving. A ``FindFile`` is answered from the local index; a ``GetData`` streams the range as
bulk data frames read from the stored (or linked) file, at most MAX_UPLOADS_PER_PEER at once
per peer and MAX_UPLOADS in total, optionally capped at ``max_upload_rate`` bytes/s (the
writer of each session sends control messages first, so uploads never starve gossip).

Loading. ``download`` finds the providers (finding.py), reads the manifest, checks the disk has
room, and runs one ``Download`` (download.py) per file at a time; a chunk URI is one fetched
range, checked against its hash. ``fetch_range`` loads only the pieces covering a byte range.

Non-goal: the wire format and the plan (kachery.protocol.files), the blob store (storage).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.daemon.boundary import PerPeerSlots
from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.progress import format_bytes
from kachery.node.services.files.disk import read_blocks
from kachery.node.services.files.download import Download
from kachery.node.services.files.fetching import Fetcher
from kachery.node.services.files.finding import Finder, Provider, agreeing
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.files import (
    DATA_FRAME_BYTES,
    MAX_GET_BYTES,
    CancelData,
    DownloadPlan,
    FindFile,
    FindFileResponse,
    GetData,
    GetDataResponse,
    Piece,
    pieces_of,
)
from kachery.protocol.manifest import Manifest, chunk_ranges
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound, StoreFull
from kachery.storage.files import FileEntry

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger("kachery.node.services.files")

MAX_UPLOADS = 16
"""Ranges served at once by this node, to everyone."""

MAX_UPLOADS_PER_PEER = 4
"""Ranges served at once to one peer (a downloader asks for at most 2 per provider)."""

READ_BLOCK = 4 * 1024 * 1024
"""Bytes read from disk per worker-thread call when serving (16 frames)."""


class TokenBucket:
    """A bytes-per-second cap shared by all uploads (``kachery-node start --max-upload-rate``)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate / 10
        self._stamp = trio.current_time()

    async def take(self, n: int) -> None:
        now = trio.current_time()
        self._tokens = min(self.rate / 10, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class FileService:
    """Files over the network, for one node."""

    name = "files"

    def __init__(self, node: Host, *, max_upload_rate: float | None = None) -> None:
        self.node = node
        self.files = node.home.files
        self.downloads = node.home.downloads
        self._uploads = trio.Semaphore(MAX_UPLOADS)
        self._uploads_per_peer = PerPeerSlots(MAX_UPLOADS_PER_PEER)
        self._serving: set[tuple[str, int]] = set()
        """Streams being served now (bounded by MAX_UPLOADS_PER_PEER waiting per request)."""
        self._cancelled: set[tuple[str, int]] = set()
        """Of those, the ones the requester cancelled."""
        self.penalties = PenaltyBox()
        """Corrupt pieces (or chunks) sent by each peer; at the threshold, a ban from finds."""
        self.finder = Finder(node, self.penalties)
        self.fetcher = Fetcher(node, self.penalties)
        self._active: dict[str, trio.Event] = {}
        self.limiter = None if not max_upload_rate else TokenBucket(max_upload_rate)
        self.bytes_uploaded = 0
        self.kept_elsewhere: list[Callable[[str], Awaitable[bytes | None]]] = []
        """Other services' sources of small files they keep outside the blob store (the task
        service's results kept in their records): asked, by SHA-1, before the channel; what
        they give is checked against the hash and stored."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    # -- serving -------------------------------------------------------------------------------

    def _require_provide(self, channel: str) -> None:
        if Role.PROVIDE_FILES not in self.node.membership.roles_of(channel, self.node.node_id):
            name = self.node.membership.name_of(channel)
            raise NotPermitted(f"this node does not provide files in channel {name}")

    async def on_find(self, conn: PeerConnection, msg: FindFile) -> FindFileResponse:
        if Role.PROVIDE_FILES not in self.node.membership.roles_of(msg.channel, self.node.node_id):
            return FindFileResponse(id=msg.id, has=False)
        entry = await self._held(msg.sha1)
        if entry is None:
            return FindFileResponse(id=msg.id, has=False)
        return FindFileResponse(
            id=msg.id, has=True, size=entry.size, manifest_sha1=entry.manifest_sha1
        )

    async def on_get_data(self, conn: PeerConnection, msg: GetData) -> GetDataResponse:
        self._require_provide(msg.channel)
        entry: FileEntry | None = await self.node.run_sync(self.files.get, msg.sha1)
        if entry is None:
            raise NotFound(f"sha1://{msg.sha1} is not stored on this node")
        if msg.end > entry.size:
            raise InvalidInput(f"range end {msg.end} is past the file's {entry.size} bytes")
        key = (conn.node_id, msg.stream)
        sent = 0
        self._serving.add(key)
        async with self._uploads, self._uploads_per_peer.hold(conn.node_id):
            fd = await trio.to_thread.run_sync(os.open, entry.path, os.O_RDONLY)
            try:
                position = msg.start
                while position < msg.end and key not in self._cancelled:
                    # reads end on frame boundaries (see frame_sizes)
                    n = min(READ_BLOCK - position % DATA_FRAME_BYTES, msg.end - position)
                    blocks = await trio.to_thread.run_sync(read_blocks, fd, position, n)
                    if blocks is None:
                        raise NotFound(f"sha1://{msg.sha1} shrank on disk while being served")
                    for block in blocks:
                        if key in self._cancelled:
                            break
                        if self.limiter is not None:
                            await self.limiter.take(len(block))
                        await conn.send_data(msg.stream, position, block)
                        sent += len(block)
                        position += len(block)
            finally:
                os.close(fd)
                self._serving.discard(key)
                self._cancelled.discard(key)
        self.bytes_uploaded += sent
        log.debug("served %d bytes of %s to %s...", sent, msg.sha1[:12], conn.node_id[:12])
        return GetDataResponse(id=msg.id, sent=sent)

    async def on_cancel(self, conn: PeerConnection, msg: CancelData) -> None:
        key = (conn.node_id, msg.stream)
        if key in self._serving:  # a cancel for a stream never asked for is ignored
            self._cancelled.add(key)

    # -- downloading ---------------------------------------------------------------------------

    async def download(
        self,
        uri: FileURI,
        *,
        only: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> FileEntry:
        """Fetch a whole file (or a chunk URI's bytes) into the store; returns its entry.

        Raises:
            NotFound: no connected peer provides it (after a bounded wait).
            NotPermitted: this node may not request files, or a provider refused.
            Unavailable: every provider went away; verified pieces are kept for next time.
        """
        if uri.chunk_of is not None:
            return await self._download_chunk(uri, only)
        entry = await self._download_once(uri, only, progress)
        assert entry is not None  # a whole-file download lands or raises
        return entry

    async def _download(
        self,
        uri: FileURI,
        only: str | None,
        progress: Callable[[dict[str, Any]], None] | None,
        byte_range: tuple[int, int] | None = None,
    ) -> FileEntry | None:
        providers = await self.finder.find(uri.sha1, only=only)
        if not providers:
            raise self.finder.not_found(uri, only)
        if uri.manifest_sha1 is None:
            providers = agreeing(uri, providers)
        size = providers[0].size
        manifest_sha1 = uri.manifest_sha1 or providers[0].manifest_sha1
        manifest = None
        if manifest_sha1 is not None:
            try:
                manifest = await self._manifest(manifest_sha1, only)
            except NotFound:
                whose = "the URI names (manifest=)" if uri.manifest_sha1 else "providers name"
                raise NotFound(
                    f"the manifest sha1://{manifest_sha1} that {whose} was not found, though"
                    f" {len(providers)} member(s) provide sha1://{uri.sha1}: check the URI"
                    f" (loading sha1://{uri.sha1} without manifest= uses the providers' manifest)"
                ) from None
            if manifest.sha1 != uri.sha1:
                raise InvalidInput(
                    f"the manifest of {uri} describes another file ({manifest.sha1})"
                )
            size = manifest.size
            providers = [p for p in providers if p.size == size]
            if not providers:
                raise Unavailable(
                    f"no provider of {uri} claims the size its manifest gives ({size} bytes)"
                )
        pieces = pieces_of(size, uri.sha1, manifest)
        record = await self.node.run_sync(
            self.downloads.begin, uri.sha1, manifest_sha1, size, len(pieces)
        )
        wanted = None
        if byte_range is not None:
            wanted = {p.index for p in pieces if p.start < byte_range[1] and p.end > byte_range[0]}
            if len(wanted) == len(pieces):
                wanted = None
        plan = DownloadPlan(pieces, set(record.verified), [p.node_id for p in providers], wanted)
        await self._check_space(uri, plan, kept=bool(record.verified))
        providing = {p.node_id: p for p in providers}
        run = Download(
            self.node, self.finder, self.fetcher, uri, size, manifest, plan, providing, only
        )
        return await run.run(progress)

    async def _check_space(self, uri: FileURI, plan: DownloadPlan, *, kept: bool) -> None:
        """Refuse a download the disk cannot hold before fetching anything (a download with
        nothing verified yet leaves nothing behind).

        Raises:
            StoreFull: the pieces still wanted need more than the free space.
        """
        needed = sum(plan.pieces[i].size for i in plan.wanted - plan.verified)
        free = await self.node.run_sync(self.downloads.free_bytes)
        if needed <= free:
            return
        if not kept:
            await self.node.run_sync(self.downloads.forget, uri.sha1)
        raise StoreFull(
            f"not enough space to load {uri}: it needs {format_bytes(needed)} more in"
            f" {self.downloads.partial_dir}, which has {format_bytes(free)} free; free some space"
            " and load it again"
        )

    async def fetch_range(self, uri: FileURI, start: int, end: int | None) -> tuple[Path, int, int]:
        """Make the bytes ``[start, end)`` of a file readable on this node, fetching only the
        pieces that cover them (verified, into the partial file) unless it is stored here.

        ``start`` and ``end`` count from the beginning of the URI's bytes (of the chunk, for a
        chunk URI). Returns the file to read, and the absolute range in it.
        """
        entry: FileEntry | None
        if uri.chunk_of is not None:
            entry = await self.download(uri)
        else:
            entry = await self._held(uri.sha1)
        if entry is not None:
            lo, hi = check_range(start, end, entry.size)
            return entry.path, lo, hi
        providers = await self.finder.find(uri.sha1)
        if not providers:
            raise self.finder.not_found(uri)
        lo, hi = check_range(start, end, agreeing(uri, providers)[0].size)
        landed = await self._download_once(uri, byte_range=(lo, hi))
        if landed is not None:
            return landed.path, lo, hi
        return self.downloads.partial_path(uri.sha1), lo, hi

    async def _download_once(
        self,
        uri: FileURI,
        only: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
        byte_range: tuple[int, int] | None = None,
    ) -> FileEntry | None:
        """Download ``uri`` (all of it, or the pieces covering ``byte_range``) unless it is
        stored here; one download per file at a time: a second caller waits for the first, then
        finds the file stored (or starts its own, if the first fetched only a range)."""
        while uri.sha1 in self._active:
            await self._active[uri.sha1].wait()
        entry = await self._held(uri.sha1)
        if entry is not None:
            return entry
        with self._download_slot(uri.sha1):
            return await self._download(uri, only, progress, byte_range)

    @contextlib.contextmanager
    def _download_slot(self, sha1: str) -> Iterator[None]:
        """Hold a file's one slot for work on its partial download; whoever else wants it
        waits on ``_active[sha1]`` until this is released. The caller checked it was free."""
        done = self._active[sha1] = trio.Event()
        try:
            yield
        finally:
            del self._active[sha1]
            done.set()

    async def _held(self, sha1: str) -> FileEntry | None:
        """The file if this node holds it: in the store, or kept by another service (then it
        is stored first, if it hashes to ``sha1``)."""
        entry = await self.node.run_sync(self.files.get, sha1)
        if entry is not None:
            return entry
        for source in self.kept_elsewhere:
            data = await source(sha1)
            if data is not None and hashlib.sha1(data).hexdigest() == sha1:
                stored: FileEntry = await self.node.run_sync(self.files.store_bytes, data)
                return stored
        return None

    async def _manifest(self, manifest_sha1: str, only: str | None) -> Manifest:
        entry = await self.node.run_sync(self.files.get, manifest_sha1)
        if entry is None:
            entry = await self.download(FileURI(sha1=manifest_sha1), only=only)
        assert entry is not None
        data = await trio.to_thread.run_sync(entry.path.read_bytes)
        return Manifest.from_json_bytes(data, expected_sha1=manifest_sha1)

    async def _download_chunk(self, uri: FileURI, only: str | None) -> FileEntry:
        chunk = uri.chunk_of
        assert chunk is not None
        entry = await self.node.run_sync(self.files.get, uri.sha1)
        if entry is not None:
            return entry
        size = chunk.end - chunk.start
        if size > MAX_GET_BYTES:
            raise InvalidInput(f"a chunk URI names at most {MAX_GET_BYTES} bytes, not {size}")
        providers = await self.finder.find(chunk.file_sha1, only=only)
        if not providers:
            raise self.finder.not_found(uri, only)
        piece = Piece(0, chunk.start, chunk.end, uri.sha1)
        errors = []
        for provider in providers:
            try:
                receiver = await self.fetcher.fetch(provider, chunk.file_sha1, piece)
            except KacheryError as exc:
                errors.append(str(exc))
                continue
            digest = await trio.to_thread.run_sync(receiver.digest)
            if digest == uri.sha1:
                return await self.node.run_sync(self.files.store_bytes, receiver.data())
            # Either the provider lied or the URI is wrong (a typo, a chunk of another file):
            # only the file's manifest can tell, if one of its pieces is exactly this range.
            expected = await self._piece_hash(chunk.file_sha1, chunk.start, chunk.end, provider)
            if expected is not None and digest != expected:
                self.fetcher.penalise(
                    provider.node_id, f"sent a chunk of {chunk.file_sha1} failing its hash"
                )
            if expected is not None and expected != uri.sha1:
                raise InvalidInput(
                    f"{uri} is wrong: bytes {chunk.start}..{chunk.end} of sha1://{chunk.file_sha1}"
                    f" hash to {expected} (its manifest says so), not {uri.sha1}"
                )
            errors.append(
                f"{provider.node_id[:16]}... sent bytes hashing to {digest}"
                + (
                    " (it is penalised: the file's manifest gives the URI's hash)"
                    if expected
                    else ""
                )
            )
        raise Unavailable(
            f"could not fetch {uri}: "
            + "; ".join(errors)
            + ". Nothing was stored; if no provider sent the URI's hash, check the URI"
        )

    async def _piece_hash(
        self, file_sha1: str, start: int, end: int, provider: Provider
    ) -> str | None:
        """The SHA-1 that the manifest of ``file_sha1`` gives its piece ``[start, end)``, or None
        if the file has no manifest, it cannot be fetched, or no piece is exactly that range."""
        if provider.manifest_sha1 is None:
            return None
        try:
            manifest = await self._manifest(provider.manifest_sha1, None)
        except KacheryError as exc:
            log.debug("no manifest to check a chunk of %s against: %s", file_sha1[:12], exc)
            return None
        if manifest.sha1 != file_sha1:
            return None
        pieces = pieces_of(manifest.size, manifest.sha1, manifest)
        return next((p.sha1 for p in pieces if (p.start, p.end) == (start, end)), None)

    # -- local API -----------------------------------------------------------------------------

    @exposed
    async def file_find(self, uri: str) -> list[dict[str, Any]]:
        """Which connected peers provide a file."""
        parsed = parse_file_uri(uri)
        sha1 = parsed.chunk_of.file_sha1 if parsed.chunk_of else parsed.sha1
        providers = await self.finder.find(sha1, refresh=True)
        return [
            {
                "nodeId": p.node_id,
                "channel": self.node.membership.name_of(p.channel),
                "size": p.size,
                "manifestSha1": p.manifest_sha1,
            }
            for p in providers
        ]

    @exposed
    async def file_load(
        self, uri: str, from_node: str | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Fetch a file into the store, streaming progress events; the result names its path."""
        parsed = parse_file_uri(uri)
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        result: list[FileEntry] = []

        def progress(event: dict[str, Any]) -> None:
            with contextlib.suppress(trio.WouldBlock):  # a slow reader misses an update, no more
                send.send_nowait(event)

        async def fetch() -> None:
            async with send:
                only = None if from_node is None else self.finder.node_named(from_node)
                result.append(await self.download(parsed, only=only, progress=progress))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            async with receive:
                async for event in receive:
                    yield event
        entry = result[0]
        yield StreamResult(
            {"path": str(entry.path), "uri": str(entry.uri(parsed.label)), "size": entry.size}
        )

    @exposed
    async def file_fetch_range(
        self, uri: str, start: int = 0, end: int | None = None
    ) -> dict[str, Any]:
        """Make a byte range of a file readable here; answers the file and offsets to read."""
        path, lo, hi = await self.fetch_range(parse_file_uri(uri), start, end)
        return {"path": str(path), "start": lo, "end": hi}

    def statistics(self) -> dict[str, Any]:
        """Bytes served to peers since start, downloads in progress, penalties given."""
        return {
            "bytesUploaded": self.bytes_uploaded,
            "downloading": sorted(self._active),
            "penalties": dict(self.penalties.offences),
            "banned": sorted(self.penalties.banned_peers(trio.current_time())),
        }

    @exposed
    async def file_downloads(self) -> list[dict[str, Any]]:
        """Unfinished downloads (loading now, interrupted, or fetched only in part for a byte
        range), with their verified pieces and the bytes those hold on disk."""
        records = await self.node.run_sync(self.downloads.all)
        out = []
        for r in records:
            ranges = chunk_ranges(r.size) if r.manifest_sha1 is not None else [(0, r.size)]
            held = sum(b - a for i, (a, b) in enumerate(ranges) if i in r.verified)
            out.append(
                {
                    "sha1": r.sha1,
                    "size": r.size,
                    "manifestSha1": r.manifest_sha1,
                    "verifiedPieces": len(r.verified),
                    "pieces": len(ranges),
                    "verifiedBytes": held,
                    "active": r.sha1 in self._active,
                }
            )
        return out

    @exposed
    async def file_discard_download(self, uri: str) -> dict[str, Any]:
        """Drop an unfinished download, its partial file and its verified pieces, to free the
        space (a later load starts over). Not while it is loading.

        Raises:
            InvalidInput: ``uri`` is not a sha1:// URI, or that file is loading now.
            NotFound: there is no unfinished download of it.
        """
        sha1 = parse_file_uri(uri).sha1
        if sha1 in self._active:
            raise InvalidInput(f"sha1://{sha1} is loading now: stop that load first")
        with self._download_slot(sha1):  # a load asked for meanwhile waits, then starts over
            if await self.node.run_sync(self.downloads.get, sha1) is None:
                raise NotFound(f"no unfinished download of sha1://{sha1} on this node")
            freed = await self.node.run_sync(self.downloads.forget, sha1)
        log.info("discarded the unfinished download of sha1://%s (%d bytes)", sha1, freed)
        return {"sha1": sha1, "freedBytes": freed}


def check_range(start: int, end: int | None, size: int) -> tuple[int, int]:
    """``[start, end)`` of a ``size``-byte file (``end`` None: to its end), or InvalidInput
    saying in words what is wrong with it."""
    stop = size if end is None else end
    if start < 0 or stop < 0:
        raise InvalidInput(f"a byte position cannot be negative (start {start}, end {end})")
    for name, value in (("start", start), ("end", stop)):
        if value > size:
            raise InvalidInput(f"{name} {value} is past the end of the file ({size} bytes)")
    if start > stop:
        raise InvalidInput(f"start {start} is after end {stop}")
    return start, stop
