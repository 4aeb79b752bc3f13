"""One download in progress: a file fetched piece by piece from every provider at once.

A ``Download`` follows its ``DownloadPlan`` (kachery.protocol.files): each piece is fetched from
one provider (``Fetcher``), hashed in a worker thread, and only if it matches the manifest written
in place into the one partial file, fdatasync'ed and recorded as verified, so an interrupted load
resumes without fetching a verified piece again. A background task hashes the verified prefix, so
the whole-file SHA-1 is known moments after the last piece; only if it matches the URI does the
file land in the blob store. A provider whose piece fails its own claimed hash is penalised and
dropped for the file; one that goes away is replaced by the others (found again by the
``Finder``). Progress events are sent every PROGRESS_SECONDS.

Non-goal: choosing the pieces (the plan), finding and fetching (finding.py, fetching.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.changes import Changes
from kachery.node.errors import Unavailable, lone_error
from kachery.node.services.files.disk import PartialFile, hash_frames
from kachery.node.services.files.fetching import Fetcher
from kachery.node.services.files.finding import Finder, Provider
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.files import DownloadPlan, Piece
from kachery.protocol.manifest import HashResult, Manifest
from kachery.protocol.uri import FileURI
from kachery.storage.blobstore import hash_range
from kachery.storage.errors import StorageError, StoreFull, is_no_space
from kachery.storage.files import FileEntry

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger("kachery.node.services.files")

PROGRESS_SECONDS = 0.25
"""Interval of progress events of a streaming load."""

KEPT_PIECES = 6
"""Verified pieces (20 MB each) a download keeps in memory for the whole-file hash."""


class Download:
    """One download in progress (see FileService.download)."""

    def __init__(
        self,
        node: Host,
        finder: Finder,
        fetcher: Fetcher,
        uri: FileURI,
        size: int,
        manifest: Manifest | None,
        plan: DownloadPlan,
        providers: dict[str, Provider],
        only: str | None,
    ) -> None:
        self.node = node
        self.finder = finder
        self.fetcher = fetcher
        self.files = node.home.files
        self.downloads = node.home.downloads
        self.uri = uri
        self.size = size
        self.manifest = manifest
        self.plan = plan
        self.providers = providers
        self.only = only
        self.path = self.downloads.partial_path(uri.sha1)
        self.changed = Changes()
        self.written: set[int] = set(plan.verified)
        self.unsynced: set[int] = set()
        self.recorded: set[int] = set(plan.verified)
        self.started = trio.current_time()
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
        elapsed = max(trio.current_time() - self.started, 1e-6)
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
        partial = PartialFile(self.path)
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
            await self.node.run_sync(self.downloads.forget, self.uri.sha1)
            raise InvalidInput(
                f"the pieces of {self.uri} all verified, but the whole file hashes to {whole}: the"
                " manifest does not describe this URI"
            )
        return await self._land(progress)

    async def _report(self, progress: Callable[[dict[str, Any]], None]) -> None:
        while True:
            progress(self._progress())
            await trio.sleep(PROGRESS_SECONDS)

    async def _fetch_all(self, nursery: trio.Nursery, partial: PartialFile) -> None:
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
        found = await self.finder.find(self.uri.sha1, only=self.only, refresh=True)
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

    async def _fetch_piece(self, provider_id: str, piece: Piece, partial: PartialFile) -> None:
        """Fetch, verify and write one piece; every change to the plan wakes the loop."""
        try:
            await self._fetch_verify_write(provider_id, piece, partial)
        finally:
            self._wake()

    async def _fetch_verify_write(
        self, provider_id: str, piece: Piece, partial: PartialFile
    ) -> None:
        provider = self.providers[provider_id]
        started = trio.current_time()
        key = (provider_id, piece.index)
        log.debug("piece %d of %s from %s...", piece.index, self.uri.sha1[:12], provider_id[:12])
        with trio.CancelScope() as scope:
            self.scopes[key] = scope
            try:
                receiver = await self.fetcher.fetch(provider, self.uri.sha1, piece)
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
        self.plan.piece_arrived(provider_id, piece.index, trio.current_time() - started)
        self._wake()
        digest = await trio.to_thread.run_sync(receiver.digest)
        if digest != piece.sha1:
            self.plan.piece_failed(provider_id, piece.index, "sent a corrupt piece", corrupt=True)
            self.errors.append(f"{provider_id[:16]}... sent a corrupt piece")
            self.fetcher.penalise(
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
                self.downloads.mark_verified,
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
                await trio.to_thread.run_sync(hash_frames, hasher, frames)
            else:
                await trio.to_thread.run_sync(hash_range, hasher, fd, piece.start, piece.end)
        self.whole = hasher.hexdigest()
        self._wake()

    async def _land(self, progress: Callable[[dict[str, Any]], None] | None) -> FileEntry:
        result = HashResult(self.size, self.uri.sha1, self.manifest)
        await trio.to_thread.run_sync(self.files.blobs.adopt, self.path, self.uri.sha1)
        entry = await self.node.run_sync(self.files.adopt, result)
        await self.node.run_sync(self.downloads.forget, self.uri.sha1)
        if progress is not None:
            progress(self._progress())
        log.info(
            "loaded %s (%d bytes) in %.2f s",
            self.uri,
            self.size,
            trio.current_time() - self.started,
        )
        return entry
