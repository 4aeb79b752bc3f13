"""The chunk exchange on a node: serving files to peers, finding them, downloading them.

Serving. A ``FindFile`` is answered from the local index; a ``GetData`` streams the range as
bulk data frames read from the stored (or linked) file, at most MAX_UPLOADS_PER_PEER at once
per peer and MAX_UPLOADS in total, optionally capped at ``max_upload_rate`` bytes/s (the
writer of each session sends control messages first, so uploads never starve gossip).

Finding. ``find`` asks every session whose peer has ``provideFiles`` in a channel where this
node has ``requestFiles``; positive answers are cached for FIND_CACHE_SECONDS.

Downloading. ``download`` fetches a file piece by piece (kachery's 20,000,000-byte manifest
pieces; a small file is one piece) from every provider at once, following ``DownloadPlan``.
Each piece arrives into memory, is hashed in a worker thread, and only if it matches the
manifest is it written in place into the one partial file, fdatasync'ed, and recorded as
verified; so an interrupted download resumes without fetching a verified piece again. While
pieces arrive, a background task hashes the verified prefix of the partial file, so the
whole-file SHA-1 is known moments after the last piece; only if it matches the URI does the
file land in the blob store (a rename). A provider that sends a piece failing verification is
dropped for the file and penalised; one that disappears is replaced by the others.

Non-goal: the wire format and the plan (kachery.protocol.files), the blob store (storage).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import mmap
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.changes import Changes
from kachery.node.daemon.boundary import PerPeerSlots
from kachery.node.daemon.peer import PeerConnection, RequestFailed
from kachery.node.errors import NotPermitted, Unavailable, lone_error
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.progress import format_bytes
from kachery.protocol.channel import Role
from kachery.protocol.errors import CloseCode, InvalidInput, KacheryError
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
    frame_sizes,
    pieces_of,
)
from kachery.protocol.manifest import HashResult, Manifest, chunk_ranges
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.session import PAYLOAD_ALIGN, DataBlock, DataReceived
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.blobstore import hash_range
from kachery.storage.errors import NotFound, StorageError, StoreFull, is_no_space
from kachery.storage.files import FileEntry

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger(__name__)

MAX_UPLOADS = 16
"""Ranges served at once by this node, to everyone."""

MAX_UPLOADS_PER_PEER = 4
"""Ranges served at once to one peer (a downloader asks for at most 2 per provider)."""

READ_BLOCK = 4 * 1024 * 1024
"""Bytes read from disk per worker-thread call when serving (16 frames)."""

FIND_TIMEOUT = 5.0
"""Seconds to wait for one peer's answer to FindFile."""

FIND_WAIT = 10.0
"""Seconds to wait for a provider to be connected before saying a file is not in the channel."""

FIND_CACHE_SECONDS = 10.0
"""How long answers to FindFile are reused."""

MAX_FIND_CACHE = 4096
"""Finds cached at once (the oldest go first beyond it)."""

STALL_SECONDS = 30.0
"""A piece request that receives nothing for this long is abandoned (the provider stalled)."""

PROGRESS_SECONDS = 0.25
"""Interval of progress events of a streaming load."""

IOV_BATCH = 512
"""Frames per pwritev call: under every kernel's IOV_MAX (1024 on Linux), whatever a peer sent."""

KEPT_PIECES = 6
"""Verified pieces (20 MB each) a download keeps in memory for the whole-file hash."""


@dataclass(frozen=True, slots=True)
class Provider:
    """A peer that answered FindFile: it serves the file in ``channel``."""

    node_id: str
    channel: str
    size: int
    manifest_sha1: str | None


class TokenBucket:
    """A bytes-per-second cap shared by all uploads (``kachery-node start --max-upload-rate``)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate / 10
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.rate / 10, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class _Receiver:
    """One piece request in flight: its frames, kept as they arrived (no copy into a buffer).

    Frames of one range come in order from their provider. Nothing is hashed on arrival: the
    event loop only decrypts and files the frames, and ``digest`` runs in a worker thread once
    the piece is complete (hashlib releases the GIL), so receiving the next piece overlaps
    checking this one. Written with one ``pwritev`` per piece.
    """

    def __init__(self, piece: Piece) -> None:
        self.piece = piece
        self.frames: list[memoryview] = []
        self.received = 0
        self.last_data = time.monotonic()
        self.error = ""

    def put(self, offset: int, payload: memoryview) -> None:
        if offset != self.piece.start + self.received:
            self.error = f"sent bytes at {offset}, expected {self.piece.start + self.received}"
            return
        if self.received + len(payload) > self.piece.size:
            self.error = f"sent bytes past the end of the requested piece ({self.piece.end})"
            return
        self.frames.append(payload)
        self.received += len(payload)
        self.last_data = time.monotonic()

    def digest(self) -> str:
        """The SHA-1 of the received bytes (blocking: call it in a worker thread)."""
        hasher = hashlib.sha1()
        _hash_frames(hasher, self.frames)
        return hasher.hexdigest()

    def data(self) -> bytes:
        return b"".join(self.frames)


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
        self._receivers: dict[tuple[str, int], _Receiver] = {}
        self._streams = itertools.count(1)
        self._find_cache: dict[str, tuple[float, list[Provider]]] = {}
        self.penalties = PenaltyBox()
        """Corrupt pieces (or chunks) sent by each peer; at the threshold, a ban from finds."""
        self._active: dict[str, trio.Event] = {}
        self.limiter = None if not max_upload_rate else TokenBucket(max_upload_rate)
        self.find_wait = FIND_WAIT
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
                    blocks = await trio.to_thread.run_sync(_read_blocks, fd, position, n)
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

    async def on_data(self, conn: PeerConnection, event: DataReceived) -> None:
        receiver = self._receivers.get((conn.node_id, event.stream))
        if receiver is not None:
            receiver.put(event.offset, event.payload)

    # -- finding -------------------------------------------------------------------------------

    def _asking_channels(self, conn: PeerConnection) -> list[str]:
        """Channels in which this node may ask ``conn``'s peer for files."""
        m = self.node.membership
        return [
            c
            for c in sorted(conn.channels)
            if Role.REQUEST_FILES in m.roles_of(c, self.node.node_id)
            and Role.PROVIDE_FILES in m.roles_of(c, conn.node_id)
        ]

    def _check_may_request(self) -> None:
        m = self.node.membership
        if not any(
            Role.REQUEST_FILES in m.roles_of(c, self.node.node_id) for c in m.active_channels()
        ):
            raise NotPermitted(
                "not permitted: this node lacks role requestFiles in every channel it is in"
            )

    async def find(
        self, sha1: str, *, only: str | None = None, refresh: bool = False
    ) -> list[Provider]:
        """Providers of a file among connected peers (waiting up to FIND_WAIT for one).

        Raises:
            NotPermitted: this node may not request files in any channel.
        """
        self._check_may_request()
        cached = self._find_cache.get(sha1)
        if cached is not None and not refresh and time.monotonic() - cached[0] < FIND_CACHE_SECONDS:
            found = cached[1]
        else:
            found = await self._ask_all(sha1)
            if not found:
                with trio.move_on_after(self.find_wait):
                    asked = set(self._candidates())
                    await self.node.wait_until(lambda: bool(set(self._candidates()) - asked))
                    found = await self._ask_all(sha1)
            if found:  # "nobody has it" is never cached: a provider may connect any moment
                self._remember_find(sha1, found)
        if only is not None:
            found = [p for p in found if p.node_id == only]
        banned = self.penalties.banned_peers(trio.current_time())
        return [p for p in found if p.node_id not in banned]

    def _remember_find(self, sha1: str, found: list[Provider]) -> None:
        """Cache a find; expired entries go first, then the oldest beyond MAX_FIND_CACHE."""
        now = time.monotonic()
        cache = self._find_cache
        cache.pop(sha1, None)
        cache[sha1] = (now, found)  # insertion order is age order
        while (
            len(cache) > MAX_FIND_CACHE or now - next(iter(cache.values()))[0] > FIND_CACHE_SECONDS
        ):
            del cache[next(iter(cache))]

    def _candidates(self) -> list[str]:
        return [n for n, conn in self.node.connections.items() if self._asking_channels(conn)]

    async def _ask_all(self, sha1: str) -> list[Provider]:
        found: list[Provider] = []

        async def ask(conn: PeerConnection, channel: str) -> None:
            try:
                reply = await conn.request(
                    FindFile(id=0, channel=channel, sha1=sha1), reply_timeout=FIND_TIMEOUT
                )
            except Unavailable as exc:
                current = self.node.connections.get(conn.node_id)
                if current is not None and current is not conn:  # the session was replaced
                    await ask(current, channel)
                else:
                    log.debug("FindFile to %s...: %s", conn.node_id[:16], exc)
                return
            except KacheryError as exc:
                log.debug("FindFile to %s...: %s", conn.node_id[:16], exc)
                return
            if isinstance(reply, FindFileResponse) and reply.has and reply.size is not None:
                found.append(Provider(conn.node_id, channel, reply.size, reply.manifest_sha1))

        async with trio.open_nursery() as nursery:
            for conn in list(self.node.connections.values()):
                channels = self._asking_channels(conn)
                if channels:
                    nursery.start_soon(ask, conn, channels[0])
        return sorted(found, key=lambda p: p.node_id)

    def _node_named(self, name: str) -> str:
        """The connected node whose ID starts with ``name`` (as ``peers`` prints them), if
        exactly one does; else ``name`` itself (a full ID, or one that finds nobody)."""
        matches = [n for n in self.node.connections if n.startswith(name.lower())]
        return matches[0] if len(matches) == 1 else name

    def _not_found(self, uri: FileURI, only: str | None = None) -> NotFound:
        """The error for a file no usable provider has, saying whom it asked."""
        banned = self.penalties.banned_peers(trio.current_time())
        if only is not None:
            if only in banned:
                why = "is not asked for a while: it sent corrupt data repeatedly"
            elif only not in self.node.connections:
                why = "is not connected to this node (see 'kachery-node peers')"
            elif only not in self._candidates():
                why = (
                    "does not provide files (role provideFiles) in a channel shared with this node"
                )
            else:
                why = "does not have it"
            return NotFound(f"{uri}: node {only[:16]}... {why}")
        channels = ", ".join(
            self.node.membership.name_of(c) for c in self.node.membership.active_channels()
        )
        candidates = self._candidates()
        asked = len(candidates) - len(banned.intersection(candidates))
        detail = (
            f" ({len(banned)} more sent corrupt data and are not asked for now)" if banned else ""
        )
        return NotFound(
            f"{uri} was not found in channel {channels or '(none)'}: none of the {asked} connected"
            f" peers that provide files has it{detail}"
        )

    # -- fetching bytes ------------------------------------------------------------------------

    async def _fetch(self, provider: Provider, sha1: str, piece: Piece) -> _Receiver:
        """Ask ``provider`` for ``piece`` of ``sha1``; return when all its bytes arrived.

        Raises:
            Unavailable, NotPermitted, RequestFailed: it did not deliver (the message says why).
        """
        conn = self.node.connections.get(provider.node_id)
        if conn is None:
            raise Unavailable(f"{provider.node_id[:16]}... is no longer connected")
        stream = next(self._streams)
        receiver = _Receiver(piece)
        self._receivers[(conn.node_id, stream)] = receiver
        request = GetData(
            id=0,
            channel=provider.channel,
            sha1=sha1,
            start=piece.start,
            end=piece.end,
            stream=stream,
        )
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_stall, receiver, nursery.cancel_scope)
                    try:
                        await conn.request(request, reply_timeout=float("inf"))
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise lone_error(group) from None
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._send_cancel(conn, stream)
            raise
        finally:
            del self._receivers[(conn.node_id, stream)]
        if receiver.error:
            raise RequestFailed("bad-data", f"{conn.node_id[:16]}... {receiver.error}")
        if receiver.received != piece.size:
            raise Unavailable(
                f"{conn.node_id[:16]}... sent {receiver.received} of {piece.size} bytes"
                + (" (stalled)" if time.monotonic() - receiver.last_data >= STALL_SECONDS else "")
            )
        return receiver

    async def _watch_stall(self, receiver: _Receiver, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(STALL_SECONDS / 3)
            if time.monotonic() - receiver.last_data >= STALL_SECONDS:
                scope.cancel()
                return

    async def _send_cancel(self, conn: PeerConnection, stream: int) -> None:
        with contextlib.suppress(Unavailable):
            await conn.send(CancelData(stream=stream))

    def _penalise(self, node_id: str, reason: str) -> None:
        """An offence: ``node_id`` sent bytes that are provably not what was asked for."""
        banned = self.penalties.offence(node_id, trio.current_time())
        ban = f": not asked for {self.penalties.ban_seconds:.0f} s" if banned else ""
        log.warning("%s... %s%s", node_id[:16], reason, ban)
        conn = self.node.connections.get(node_id)
        if banned and conn is not None:
            self.node.spawn(conn.close, CloseCode.PROTOCOL_ERROR, "sent corrupt data repeatedly")

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
        providers = await self.find(uri.sha1, only=only)
        if not providers:
            raise self._not_found(uri, only)
        if uri.manifest_sha1 is None:
            providers = _agreeing(uri, providers)
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
        run = _Download(self, uri, size, manifest, plan, {p.node_id: p for p in providers}, only)
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
            lo, hi = _check_range(start, end, entry.size)
            return entry.path, lo, hi
        providers = await self.find(uri.sha1)
        if not providers:
            raise self._not_found(uri)
        lo, hi = _check_range(start, end, _agreeing(uri, providers)[0].size)
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
        providers = await self.find(chunk.file_sha1, only=only)
        if not providers:
            raise self._not_found(uri, only)
        piece = Piece(0, chunk.start, chunk.end, uri.sha1)
        errors = []
        for provider in providers:
            try:
                receiver = await self._fetch(provider, chunk.file_sha1, piece)
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
                self._penalise(
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
        providers = await self.find(sha1, refresh=True)
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
                only = None if from_node is None else self._node_named(from_node)
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


def _agreeing(uri: FileURI, providers: list[Provider]) -> list[Provider]:
    """The providers whose own claim of a file's size and manifest is the one most of them make
    (ties: the larger size, then the manifest hash), for a URI that pins neither.

    Only providers that made the claim a download follows are asked for its pieces, so a piece
    that fails the claimed hashes contradicts its sender's own authenticated answer: proof
    enough to penalise it. A member that lies about the size or the manifest only keeps itself
    out of the download; it cannot get honest providers penalised.
    """
    claims: dict[tuple[int, str], list[Provider]] = {}
    for p in providers:
        claims.setdefault((p.size, p.manifest_sha1 or ""), []).append(p)
    if len(claims) == 1:
        return providers
    chosen = max(claims, key=lambda c: (len(claims[c]), c))
    others = [p.node_id[:16] + "..." for c, ps in claims.items() if c != chosen for p in ps]
    log.warning(
        "providers of %s disagree on its size or manifest; following the claim of %d of them"
        " (%d bytes), not that of %s",
        uri.sha1[:12],
        len(claims[chosen]),
        chosen[0],
        ", ".join(others),
    )
    return claims[chosen]


def _check_range(start: int, end: int | None, size: int) -> tuple[int, int]:
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


class _Download:
    """One download in progress (see FileService.download)."""

    def __init__(
        self,
        service: FileService,
        uri: FileURI,
        size: int,
        manifest: Manifest | None,
        plan: DownloadPlan,
        providers: dict[str, Provider],
        only: str | None,
    ) -> None:
        self.service = service
        self.node = service.node
        self.uri = uri
        self.size = size
        self.manifest = manifest
        self.plan = plan
        self.providers = providers
        self.only = only
        self.path = service.downloads.partial_path(uri.sha1)
        self.changed = Changes()
        self.written: set[int] = set(plan.verified)
        self.unsynced: set[int] = set()
        self.recorded: set[int] = set(plan.verified)
        self.started = time.monotonic()
        self.fetched_bytes = 0
        self.scopes: dict[tuple[str, int], trio.CancelScope] = {}
        self.whole: str | None = None
        self._in_memory: dict[int, list[memoryview]] = {}
        """Verified pieces kept for the whole-file hash (so it need not read them back)."""
        self.errors: list[str] = []
        self.failure: KacheryError | None = None
        """Why the download stopped early (writing to the disk failed), if it did."""
        self._scope: trio.CancelScope | None = None

    def _wake(self) -> None:
        """Wake every task waiting in ``self.changed.wait()`` (they re-check their condition)."""
        self.changed.notify()

    def _progress(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return {
            "done": self.plan.verified_bytes(),
            "total": self.size,
            "rate": self.fetched_bytes / elapsed,
            "providers": len(self.plan.usable),
            "pieces": len(self.plan.verified),
            "piecesTotal": len(self.plan.pieces),
        }

    async def run(self, progress: Callable[[dict[str, Any]], None] | None) -> FileEntry | None:
        """Fetch the wanted pieces; land and return the file if it is whole (else None)."""
        whole_file = self.plan.wanted == set(range(len(self.plan.pieces)))
        partial = _PartialFile(self.path)
        fd = partial.fd
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self.manifest is not None and whole_file:
                    nursery.start_soon(self._hash_whole, fd)
                if progress is not None:
                    nursery.start_soon(self._report, progress)
                nursery.start_soon(self._persist, fd)
                await self._fetch_all(nursery, partial)
                while self.recorded != self.plan.verified:
                    await self.changed.wait()
                while whole_file and self.manifest is not None and self.whole is None:
                    await self.changed.wait()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise lone_error(group) from None
        finally:
            partial.close()
        if self.failure is not None:
            raise self.failure
        if not whole_file:
            return None
        whole = self.whole if self.manifest is not None else self.plan.pieces[0].sha1
        if whole != self.uri.sha1:
            await self.node.run_sync(self.service.downloads.forget, self.uri.sha1)
            raise InvalidInput(
                f"the pieces of {self.uri} all verified, but the whole file hashes to {whole}: the"
                " manifest does not describe this URI"
            )
        return await self._land(progress)

    async def _report(self, progress: Callable[[dict[str, Any]], None]) -> None:
        while True:
            progress(self._progress())
            await trio.sleep(PROGRESS_SECONDS)

    async def _fetch_all(self, nursery: trio.Nursery, partial: _PartialFile) -> None:
        while not self.plan.done:
            for assignment in self.plan.next_assignments():
                nursery.start_soon(
                    self._fetch_piece, assignment.provider, assignment.piece, partial
                )
            if not self.plan.in_flight() and not self.plan.checking:
                await self._more_providers()
                continue
            await self.changed.wait()

    async def _more_providers(self) -> None:
        """Nobody is fetching and pieces are missing: find providers again, or give up."""
        found = await self.service.find(self.uri.sha1, only=self.only, refresh=True)
        fresh = [
            p
            for p in found
            if not self.plan.providers.get(p.node_id, None)
            or (
                self.plan.providers[p.node_id].dropped
                and not self.plan.providers[p.node_id].corrupt
            )
        ]
        if not fresh:
            kept = len(self.plan.verified)
            detail = "; ".join(dict.fromkeys(self.errors[-5:])) or "no provider is connected"
            raise Unavailable(
                f"could not finish {self.uri}: {detail}. {kept} of {len(self.plan.pieces)} pieces"
                " are verified and kept: run the same load again to resume"
            )
        for p in fresh:
            self.providers[p.node_id] = p
            self.plan.add_provider(p.node_id)

    async def _fetch_piece(self, provider_id: str, piece: Piece, partial: _PartialFile) -> None:
        """Fetch, verify and write one piece; every change to the plan wakes the loop."""
        try:
            await self._fetch_verify_write(provider_id, piece, partial)
        finally:
            self._wake()

    async def _fetch_verify_write(
        self, provider_id: str, piece: Piece, partial: _PartialFile
    ) -> None:
        provider = self.providers[provider_id]
        started = time.monotonic()
        key = (provider_id, piece.index)
        log.debug("piece %d of %s from %s...", piece.index, self.uri.sha1[:12], provider_id[:12])
        with trio.CancelScope() as scope:
            self.scopes[key] = scope
            try:
                receiver = await self.service._fetch(provider, self.uri.sha1, piece)
            except KacheryError as exc:
                log.debug("piece %d from %s... failed: %s", piece.index, provider_id[:12], exc)
                self.errors.append(str(exc))
                if piece.index not in self.plan.verified | self.plan.checking:
                    self.plan.piece_failed(provider_id, piece.index, str(exc), corrupt=False)
                else:
                    self.plan.piece_cancelled(provider_id, piece.index)
                return
            finally:
                self.scopes.pop(key, None)
        if scope.cancelled_caught:  # another provider's copy was verified first
            self.plan.piece_cancelled(provider_id, piece.index)
            return
        if piece.index in self.plan.verified or piece.index in self.plan.checking:
            self.plan.piece_cancelled(provider_id, piece.index)
            return  # a duplicate from the end game that lost the race
        # The provider's slot is free now: the next piece flows while this one is checked.
        self.plan.piece_arrived(provider_id, piece.index, time.monotonic() - started)
        self._wake()
        digest = await trio.to_thread.run_sync(receiver.digest)
        if digest != piece.sha1:
            self.plan.piece_failed(provider_id, piece.index, "sent a corrupt piece", corrupt=True)
            self.errors.append(f"{provider_id[:16]}... sent a corrupt piece")
            self.service._penalise(
                provider_id, f"sent piece {piece.index} of {self.uri.sha1} failing its hash"
            )
            return
        self.fetched_bytes += piece.size
        try:
            await trio.to_thread.run_sync(partial.write, piece.start, receiver.frames)
        except OSError as exc:
            self._stop_writing(exc)
            return
        for other in self.plan.piece_verified(piece.index):
            other_scope = self.scopes.get((other, piece.index))
            if other_scope is not None:
                other_scope.cancel()
        self.written.add(piece.index)
        self.unsynced.add(piece.index)
        self._keep_for_hash(piece.index, receiver.frames)

    async def _persist(self, fd: int) -> None:
        """Make written pieces durable, then record them as verified (coalescing many)."""
        while True:
            while not self.unsynced:
                await self.changed.wait()
            batch, self.unsynced = self.unsynced, set()
            try:
                await trio.to_thread.run_sync(os.fdatasync, fd)
            except OSError as exc:
                self._stop_writing(exc)  # the batch may not be on disk: it is not recorded
                return
            self.recorded |= batch
            await self.node.run_sync(
                self.service.downloads.mark_verified,
                self.uri.sha1,
                set(self.recorded),
                len(self.plan.pieces),
            )
            self._wake()

    def _stop_writing(self, exc: OSError) -> None:
        """Writing to the partial file failed (a full disk, an I/O error): stop the download,
        keeping the pieces already recorded, and let ``run`` raise why."""
        if self.failure is None:
            kept = (
                f"{len(self.recorded)} of {len(self.plan.pieces)} pieces are verified and kept in"
                f" {self.path}"
            )
            if is_no_space(exc):
                self.failure = StoreFull(
                    f"no space left on the device while loading {self.uri}: {kept}; free some"
                    " space and run the same load again to resume"
                )
            else:
                self.failure = StorageError(
                    f"cannot write the download of {self.uri}: {exc.strerror}; {kept}"
                )
        assert self._scope is not None
        self._scope.cancel()

    def _keep_for_hash(self, index: int, frames: list[memoryview]) -> None:
        """Keep a verified piece in memory for the whole-file hash, if there is room."""
        if self.manifest is not None and len(self._in_memory) < KEPT_PIECES:
            self._in_memory[index] = frames

    async def _hash_whole(self, fd: int) -> None:
        """Hash the verified pieces in file order as they come; set ``whole`` at the end.

        A piece still in memory is hashed from there; one that was not kept (it came far out
        of order, or before a restart) is read back from the partial file.
        """
        hasher = hashlib.sha1()
        for piece in self.plan.pieces:
            while piece.index not in self.written:
                await self.changed.wait()
            frames = self._in_memory.pop(piece.index, None)
            if frames is not None:
                await trio.to_thread.run_sync(_hash_frames, hasher, frames)
            else:
                await trio.to_thread.run_sync(hash_range, hasher, fd, piece.start, piece.end)
        self.whole = hasher.hexdigest()
        self._wake()

    async def _land(self, progress: Callable[[dict[str, Any]], None] | None) -> FileEntry:
        result = HashResult(self.size, self.uri.sha1, self.manifest)
        service = self.service
        await trio.to_thread.run_sync(service.files.blobs.adopt, self.path, self.uri.sha1)
        entry = await self.node.run_sync(service.files.adopt, result)
        await self.node.run_sync(service.downloads.forget, self.uri.sha1)
        if progress is not None:
            progress(self._progress())
        log.info(
            "loaded %s (%d bytes) in %.2f s",
            self.uri,
            self.size,
            time.monotonic() - self.started,
        )
        return entry


class _PartialFile:
    """A download's partial file, open for writing verified pieces in place.

    A frame that lies on a page boundary both in the file and in memory, and covers whole
    pages, is written with O_DIRECT through a second descriptor: the device takes the bytes
    from the frame itself, with no copy into the page cache and nothing left for the fdatasync
    that records the piece to write back. Providers break ranges at frame boundaries of the file
    and the session puts large frames' payloads on page boundaries in memory, so all frames of a
    piece but its first and last qualify; ``scripts/bench/transfer`` measured loads at ~1.25x the
    speed of writing every frame through the page cache. The rest is written normally, all of it
    where the filesystem refuses O_DIRECT. Both descriptors are one file: ``fd`` reads it and
    fdatasyncs every write.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self._direct_fd = _open_direct(path)
        self.direct = self._direct_fd >= 0
        """Whether aligned frames go through O_DIRECT (until the filesystem refuses one)."""

    def write(self, offset: int, frames: list[memoryview]) -> int:
        """Write a piece's frames at ``offset``; returns how many bytes bypassed the page cache.

        Blocking: call it in a worker thread (several may write different pieces at once).
        """
        runs: list[tuple[bool, int, list[memoryview]]] = []  # (direct?, offset, frames)
        for frame in frames:
            direct = self.direct and _page_aligned(frame, offset)
            if runs and runs[-1][0] == direct:
                runs[-1][2].append(frame)
            else:
                runs.append((direct, offset, [frame]))
            offset += len(frame)
        direct_bytes = 0
        for direct, at, views in runs:
            if direct and self.direct:
                try:
                    _write_views(self._direct_fd, at, views)
                    direct_bytes += sum(len(v) for v in views)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.info("O_DIRECT refused (%s): writing through the page cache", exc)
                    self.direct = False  # the descriptor stays open: other threads may use it
            _write_views(self.fd, at, views)
        return direct_bytes

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
        os.close(self.fd)


def _open_direct(path: Path) -> int:
    """``path`` opened for writing with O_DIRECT, or -1 where there is no such thing."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:  # EINVAL: a filesystem without O_DIRECT (tmpfs before Linux 6.6, ...)
        return -1


_PAGE = max(mmap.PAGESIZE, PAYLOAD_ALIGN)


def _page_aligned(view: memoryview, offset: int) -> bool:
    """Whether O_DIRECT can write ``view`` at ``offset``: whole pages, from a page boundary in
    the file and a PAYLOAD_ALIGN boundary in memory (enough for any common disk's DMA)."""
    if offset % _PAGE or len(view) % _PAGE or not len(view) or view.readonly:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % PAYLOAD_ALIGN == 0


def _write_views(fd: int, offset: int, views: list[memoryview]) -> None:
    """Write ``views`` at ``offset`` with as few system calls as the kernel allows."""
    pending = list(views)
    while pending:
        written = os.pwritev(fd, pending[:IOV_BATCH], offset)
        offset += written
        _consume(pending, written)


def _read_blocks(fd: int, position: int, size: int) -> list[DataBlock] | None:
    """``size`` bytes at ``position`` read straight into data frames' payloads (None if the file
    ends first): the session seals them where they lie, so no copy is made on the way."""
    blocks = [DataBlock(n) for n in frame_sizes(position, size)]
    views = [block.payload for block in blocks]
    while views:
        got = os.preadv(fd, views[:IOV_BATCH], position)
        if got == 0:
            return None
        position += got
        _consume(views, got)
    return blocks


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` (after a vectored read or write of ``n`` bytes)."""
    while views and n >= len(views[0]):
        n -= len(views.pop(0))
    if n:
        views[0] = views[0][n:]


def _hash_frames(hasher: Any, frames: list[memoryview]) -> None:
    for frame in frames:
        hasher.update(frame)
