"""Writing feed messages: one group commit for every writer, and the WAL kept short.

``GroupCommit.commit`` stores a ``Write`` durably and returns once it is committed. The first
writer to arrive becomes the committer and stores everything queued behind it in one
transaction: inline on the event loop when small (INLINE_WRITE rows) and the database is free,
else in a worker thread. Writes are stored in the order they were queued, which for an owner is
the order they were signed; ``stored`` is called for each, in that order, to move its subfeed's
head. Every WAL_CHECKPOINT_BYTES of WAL the WAL is checkpointed off the append path.

Non-goals: what is written (service.py, receiver.py) and SQL (kachery.storage.feeds).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from kachery.node.services.feeds.live import FeedStats, LiveSubfeed
from kachery.node.services.host import Host
from kachery.protocol.errors import KacheryError
from kachery.protocol.feeds import Checkpoint, Head
from kachery.protocol.identity import SIGNATURE_BYTES
from kachery.storage.feeds import FeedStore, Rows, WriteBusy

log = logging.getLogger("kachery.node.services.feeds")

T = TypeVar("T")

INLINE_WRITE = 128
"""Group commits up to this many rows are written on the event loop when the database is free
(about 5 us a row, so the loop is blocked for under a millisecond; a worker-thread hop costs
~100 us in this path)."""

YIELD_EVERY_SECONDS = 0.0005
"""Writes stored inline yield to the scheduler at least this often (see ``commit``)."""

WAL_CHECKPOINT_BYTES = 8 * 1024 * 1024
"""WAL bytes (estimated by ``wal_bytes``) written between two WAL checkpoints, run in a worker
thread off the append path (see ``_checkpoint_wal``)."""


def wal_bytes(rows: int, payload: int) -> int:
    """About how many bytes a commit of ``rows`` message rows (``payload`` bytes of bodies,
    signatures and chain values) adds to the WAL. Measured here (schema 6, rows of 546 bytes):
    5.2 KiB for one row (the last leaf page, rewritten), 17.6 KiB for 10, 71.5 KiB for 100,
    598 KiB for 1000; this estimate is within a factor of two of each."""
    return 5120 + payload * 9 // 8 if rows else 0


@dataclass(eq=False)
class Write:
    """Messages waiting for the group commit (see ``GroupCommit.commit``)."""

    live: LiveSubfeed
    start: int
    bodies: Sequence[bytes]
    signatures: Sequence[bytes]
    chains: Sequence[bytes]
    checkpoints: Sequence[Checkpoint]
    head: Head
    """The subfeed's head once these are stored."""
    done: trio.Event = field(default_factory=trio.Event)
    error: KacheryError | None = None


class GroupCommit:
    """The feed tables' one writer."""

    def __init__(
        self, node: Host, store: FeedStore, stats: FeedStats, stored: Callable[[Write], None]
    ) -> None:
        self.node = node
        self.store = store
        self.stats = stats
        self._stored = stored
        self.appenders = 0
        """Owners' appends in progress (a lone one skips the group commit's yield)."""
        self._queue: list[Write] = []
        self._committing = False
        self._yielded_at = 0.0
        self._write_lock = trio.Lock()
        self._wal_since_checkpoint = 0
        self._wal_checkpointing = False

    async def commit(self, write: Write) -> None:
        """Store ``write`` durably; returns once it is committed (and the head has moved).

        Group commit: the first writer to arrive becomes the committer, yields once so that
        writers already runnable can queue behind it, then stores everything queued in one
        transaction (inline on the event loop when small and the database is free, else in a
        worker thread), and repeats while more arrived meanwhile. Writes are stored and applied
        in the order they were queued, which for an owner is the order they were signed. A lone
        owner's append (no other appender, nothing queued) skips the yield: nobody could join it.

        A write stored inline without yielding returns without a schedule point unless the
        event loop has not had one from here for YIELD_EVERY_SECONDS (Tokio's cooperative budget,
        by time): a trip through Trio's scheduler is ~7 us, a tenth of a one-message append,
        and a caller appending in a tight loop still lets every other task run twice a
        millisecond. Cancellation is checked on every call.

        Raises:
            KacheryError: the write failed; nothing of it (or of later writes to the same
                subfeeds queued with it) was stored.
        """
        self._queue.append(write)
        if not self._committing:
            self._committing = True
            try:
                alone = self.appenders <= 1 and write.live.signer is not None
                if alone and len(self._queue) == 1 and self._write_inline(self._queue):
                    # Stored (or failed) without yielding: nothing else can have queued.
                    self._queue = []
                else:
                    with trio.CancelScope(shield=True):  # the others wait on this task's work
                        if not alone:
                            await trio.lowlevel.checkpoint()  # let runnable writers join in
                        while self._queue:
                            group, self._queue = self._queue, []
                            if not self._write_inline(group):
                                await self._write_in_thread(group)
            finally:
                self._committing = False
        if write.done.is_set():
            await self._cooperate()
        else:
            await write.done.wait()
        if write.error is not None:
            raise write.error

    async def _cooperate(self) -> None:
        """A schedule point if there was none here for YIELD_EVERY_SECONDS, else only a
        cancellation check (see ``_commit``)."""
        now = time.perf_counter()
        if now - self._yielded_at >= YIELD_EVERY_SECONDS:
            self._yielded_at = now
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    def _write_inline(self, group: list[Write]) -> bool:
        """Store a small group on the event loop if the database is free (the loop does not
        yield between the check and the write: no lock needed). False: not attempted, or the
        database was busy (nothing written); True: the group's writes are done (or failed)."""
        size = sum(len(w.bodies) for w in group)
        if size > INLINE_WRITE or self._write_lock.locked():
            return False
        try:
            self.store.append_many(_rows(group), wait=False)
        except WriteBusy:
            return False
        except Exception as exc:
            self._fail(group, exc)
            return True
        self.stats.inline_writes += 1
        self._written(group, size)
        return True

    async def _write_in_thread(self, group: list[Write]) -> None:
        try:
            async with self._write_lock:
                await self.node.run_sync(
                    functools.partial(self.store.append_many, _rows(group), wait=True)
                )
        except Exception as exc:
            self._fail(group, exc)
            return
        self.stats.thread_writes += 1
        self._written(group, sum(len(w.bodies) for w in group))

    def _written(self, group: list[Write], size: int) -> None:
        self.stats.commits += 1
        payload = sum(len(b) for w in group for b in w.bodies) + size * (SIGNATURE_BYTES + 32)
        self._after_write(wal_bytes(size, payload))
        for w in group:
            self._stored(w)
            w.done.set()

    def _fail(self, group: list[Write], exc: Exception) -> None:
        """A group write failed: fail it, and every queued write to the same subfeeds (they
        continue the failed ones); owners sign again from the stored head."""
        error = exc if isinstance(exc, KacheryError) else KacheryError(f"feed write failed: {exc}")
        if not isinstance(exc, KacheryError):
            log.error("feed write failed", exc_info=exc)
        failed = {w.live for w in group}
        later = [w for w in self._queue if w.live in failed]
        self._queue = [w for w in self._queue if w.live not in failed]
        for w in group + later:
            w.error = error
            w.done.set()
        for live in failed:
            if live.signer is not None:
                live.signer.head = live.head

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Any other write to the feed tables, in a worker thread."""
        async with self._write_lock:
            return await self.node.run_sync(functools.partial(fn, *args, **kwargs))

    def _after_write(self, wal: int) -> None:
        self._wal_since_checkpoint += wal
        if self._wal_since_checkpoint >= WAL_CHECKPOINT_BYTES and not self._wal_checkpointing:
            self._wal_since_checkpoint = 0
            self._wal_checkpointing = True
            self.node.spawn(self._checkpoint_wal)

    async def _checkpoint_wal(self) -> None:
        """Checkpoint the WAL in a worker thread: first while appends go on (most of the copying
        and the fsyncs, ~10 ms here), then again with the feed writes held back, for the frames
        they added meanwhile (~1 ms after one-message appends). Only a checkpoint that reaches
        the end of the WAL lets the next commit start the WAL over; without the second pass,
        steady appends never let one finish, and the WAL grew without bound (300 MB after 30k
        one-message appends, each commit then ~10 us slower). The second pass makes appends
        wait: WAL_CHECKPOINT_BYTES keeps it rare when commits are big (every ~70 batches of
        100 messages, ~8 for catch-up batches of 1000)."""
        try:
            await self.node.run_sync(self.store.checkpoint_wal)
            async with self._write_lock:
                await self.node.run_sync(self.store.checkpoint_wal)
        except KacheryError as exc:
            log.debug("WAL checkpoint skipped: %s", exc)
        finally:
            self._wal_checkpointing = False


def _rows(group: list[Write]) -> list[Rows]:
    return [
        Rows(w.live.sf, w.start, w.bodies, w.signatures, w.chains, w.checkpoints) for w in group
    ]
