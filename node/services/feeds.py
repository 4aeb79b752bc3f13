"""The feed service: local feeds, live watching, and the gossip replicator between nodes.

``FeedService`` keeps, per subfeed in use, a ``LiveSubfeed``: its head (count, last signature,
chain value), the newest messages in memory, the gossip state (``SubfeedGossip``), and for owned
feeds the signer. It serves the local API (``feed_*`` methods: create, list, delete, append,
read, count, watch, grant, submit, subscribe, forks) and the peer messages of feed_messages.py.

The paths, and where their time goes:

- **Append** (owner): encode and check the values, sign (in series: the chain forbids signing in
  parallel; ~2.5 us each with a nonce precomputed on another core by ``NonceReserve``, ~20 us by
  RFC 8032 when the reserve is dry), store in one transaction, then acknowledge. Small appends
  write inline on the event loop (a one-row commit costs ~17-20 us, a hop to a worker thread ~54
  us more); bigger ones, and any write that finds the database locked, go to a worker thread. Only
  after the commit is a message pushed to peers: a message the owner could lose after publishing
  would make it sign a different message with the same number (a fork) after a restart.
- **Live push**: after every change, a flusher task pushes everything new to the eager peers in
  one frame each and announces the head to the lazy ones (``plan_flush``). A receiver checks the
  message (inline for a few messages: a thread hop costs as much as a signature check), stores
  it, and relays it the same way. A push that brings nothing new prunes its sender; a node that
  had to pull a small gap grafts itself back (PlumTree): in a 10-node swarm each message then
  crosses about one session per node instead of four.
- **Catch-up**: the puller pulls missing ranges from whoever announced them (``plan_pull``), in
  batches of up to 1000 messages or 1 MiB, two requests in flight, aligned to the owner's
  checkpoints so that a batch costs one signature check and a hash per message
  (protocol/feeds.py explains why that suffices); messages past the last checkpoint are verified
  one by one, split across worker threads (libsodium releases the GIL).
- **Faults**: a peer that sends invalid feed data is penalised (``PenaltyBox``); a validly signed
  message that conflicts with a held one is fork evidence: both are kept in ``feed_forks``, the
  held history stays, the other branch is refused.

Roles: following needs ``requestFeeds`` in the channel (the peer checks it on every request);
serving needs ``provideFeeds`` (this node refuses requests in channels where it lacks it, and
ignores pushes and announcements from peers that lack it). A feed ID is a capability: any member
who knows it may ask for it where this node provides feeds.

Non-goals: the message format and checks (kachery.protocol.feeds), what to send to whom
(kachery.protocol.feed_gossip), SQL (kachery.storage.feeds).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

import trio

from kachery.node.changes import Changes, Doorbell
from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.services.nonces import NonceReserve
from kachery.protocol.channel import Role
from kachery.protocol.errors import CloseCode, InvalidInput, KacheryError
from kachery.protocol.feed_gossip import Pull, SubfeedGossip
from kachery.protocol.feed_messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_CHECKPOINTS,
    MAX_BATCH_MESSAGES,
    FeedGet,
    FeedGetResponse,
    FeedGraft,
    FeedHave,
    FeedPrune,
    FeedPush,
    FeedSubmit,
    FeedSubmitResponse,
    FeedSubscribe,
    FeedSubscribeResponse,
    FeedUnsubscribe,
)
from kachery.protocol.feed_values import encode_message_value, encode_metadata
from kachery.protocol.feeds import (
    ChainDiverged,
    Checkpoint,
    FeedRejected,
    FeedSigner,
    ForkEvidence,
    Head,
    PreparedBatch,
    SubfeedRef,
    decode_record,
    finish_batch,
    first_bad_signature,
    fork_evidence,
    prepare_batch,
)
from kachery.protocol.identity import SEED_BYTES, SIGNATURE_BYTES, KeyPair, public_key_from_id
from kachery.protocol.kachery_json import JSONValue
from kachery.protocol.messages import Message, camel_case
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.uri import FeedURI, parse_feed_uri, subfeed_hash
from kachery.storage.errors import AlreadyExists, NotFound
from kachery.storage.feeds import FeedStore, Rows, WriteBusy

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger(__name__)

MAX_EMPTY_SUBFEEDS = 10_000
"""Subfeeds of an owned feed that peers may name before anything is written to them (each is a
row, kept so that its subscribers hear of its first message); beyond it a peer's subscription to
an unwritten subfeed is answered not found."""

T = TypeVar("T")

RECENT_MESSAGES = 4096
"""Newest messages of a subfeed kept in memory (pushes, duplicate checks, live reads)..."""

RECENT_BYTES = 4 * 1024 * 1024
"""...and at most this many bytes of them."""

INLINE_VERIFY = 4
"""Received batches up to this many messages are checked on the event loop (~60 us each);
larger ones in worker threads."""

INLINE_WRITE = 128
"""Group commits up to this many rows are written on the event loop when the database is free
(about 5 us a row, so the loop is blocked for under a millisecond; a worker-thread hop costs
~100 us in this path)."""

YIELD_EVERY_SECONDS = 0.0005
"""Writes stored inline yield to the scheduler at least this often (see ``_commit``)."""

VERIFY_THREADS = 2
"""Worker threads that check signatures of a batch in parallel (libsodium releases the GIL)."""

PREFETCH = 2
"""Pull requests in flight to one peer during catch-up."""

STASH_MESSAGES = 4096
"""Messages received ahead of a gap, held (unverified, in memory only) until the gap fills."""

WAL_CHECKPOINT_BYTES = 8 * 1024 * 1024
"""WAL bytes (estimated by ``wal_bytes``) written between two WAL checkpoints, run in a worker
thread off the append path (see ``_checkpoint_wal``)."""


def wal_bytes(rows: int, payload: int) -> int:
    """About how many bytes a commit of ``rows`` message rows (``payload`` bytes of bodies,
    signatures and chain values) adds to the WAL. Measured here (schema 6, rows of 546 bytes):
    5.2 KiB for one row (the last leaf page, rewritten), 17.6 KiB for 10, 71.5 KiB for 100,
    598 KiB for 1000; this estimate is within a factor of two of each."""
    return 5120 + payload * 9 // 8 if rows else 0


READ_LIMIT = 1000
"""Messages ``feed_read`` returns by default."""

DEFAULT_SUBFEED = "default"


def now_ms() -> int:
    return int(time.time() * 1000)


class _Recent:
    """The newest messages of a subfeed, in memory: numbers ``start .. start + len - 1``."""

    __slots__ = ("bodies", "bytes", "signatures", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.bodies: list[bytes] = []
        self.signatures: list[bytes] = []
        self.bytes = 0

    def extend(self, start: int, bodies: Sequence[bytes], signatures: Sequence[bytes]) -> None:
        if start != self.start + len(self.bodies):
            self.start, self.bodies, self.signatures, self.bytes = start, [], [], 0
        self.bodies.extend(bodies)
        self.signatures.extend(signatures)
        self.bytes += sum(len(b) for b in bodies)
        if len(self.bodies) > RECENT_MESSAGES or self.bytes > RECENT_BYTES:
            drop = len(self.bodies) // 2
            self.bytes -= sum(len(b) for b in self.bodies[:drop])
            del self.bodies[:drop]
            del self.signatures[:drop]
            self.start += drop

    def get(self, n: int) -> tuple[bytes, bytes] | None:
        i = n - self.start
        if 0 <= i < len(self.bodies):
            return self.bodies[i], self.signatures[i]
        return None

    def slice(self, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
        """Messages ``start .. end - 1`` if all are here."""
        if start < self.start or end > self.start + len(self.bodies):
            return None
        a, b = start - self.start, end - self.start
        return list(zip(self.bodies[a:b], self.signatures[a:b], strict=True))


@dataclass(eq=False)
class LiveSubfeed:
    """A subfeed in use on this node (see the module docstring)."""

    ref: SubfeedRef
    sf: int
    name: str | None
    head: Head
    signer: FeedSigner | None = None
    channels: set[str] = field(default_factory=set)
    """Channels this node follows the subfeed in."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    changed: Changes = field(default_factory=Changes)
    gossip: SubfeedGossip = field(default_factory=SubfeedGossip)
    recent: _Recent = field(init=False)
    checkpoints: deque[Checkpoint] = field(default_factory=lambda: deque(maxlen=16))
    stash: dict[int, tuple[bytes, bytes, str]] = field(default_factory=dict)
    forked: bool = False
    pulling: bool = False
    deleted: bool = False

    def __post_init__(self) -> None:
        self.recent = _Recent(self.head.count)

    @property
    def count(self) -> int:
        return self.head.count

    @property
    def followed(self) -> bool:
        return bool(self.channels)

    async def wait_beyond(self, count: int) -> None:
        """Wait until more than ``count`` messages are held (or the subfeed is deleted)."""
        while self.head.count <= count and not self.deleted:
            await self.changed.wait()


@dataclass
class _Stats:
    appended: int = 0
    signed_with_precomputed_nonce: int = 0
    received: int = 0
    duplicates: int = 0
    proven_by_checkpoint: int = 0
    verified_one_by_one: int = 0
    pushes_sent: int = 0
    haves_sent: int = 0
    pulls: int = 0
    offences: int = 0
    forks: int = 0
    commits: int = 0
    inline_writes: int = 0
    thread_writes: int = 0


@dataclass(eq=False)
class _Write:
    """Messages waiting for the group commit (see ``FeedService._commit``)."""

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


@dataclass
class _Fetch:
    """One pull request in flight."""

    start: int
    limit: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: FeedGetResponse | None = None
    error: KacheryError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class FeedService:
    """Feeds on one node (a ``Service``: see node/services/__init__.py).

    Args:
        node: the node it runs in.
    """

    name = "feeds"

    def __init__(self, node: Host) -> None:
        self.node = node
        self.store = FeedStore(node.home.database)
        self.penalties = PenaltyBox()
        self.nonces = NonceReserve()
        self.verify_every_signature = False
        """Ignore checkpoints and verify each received signature (in VERIFY_THREADS threads):
        slower; kept so the benchmark can compare the two."""
        self.stats = _Stats()
        self._live: dict[tuple[str, str], LiveSubfeed] = {}
        self._keys: dict[str, KeyPair] = {}
        self._grants: dict[tuple[str, str], set[str]] = {}
        self._load_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._verify_limiter = trio.CapacityLimiter(VERIFY_THREADS)
        self._dirty: set[LiveSubfeed] = set()
        self._flush_at: dict[LiveSubfeed, float] = {}
        self._flush_wake = Doorbell()
        self._pull_wake = Doorbell()
        self._queue: list[_Write] = []
        self._committing = False
        self._appenders = 0
        self._yielded_at = 0.0
        self._wal_since_checkpoint = 0
        self._wal_checkpointing = False
        self._nursery: trio.Nursery | None = None

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load followed subfeeds, then flush, pull and watch sessions until cancelled."""
        for sub in await self.node.run_sync(self.store.subscriptions):
            live = await self._load(SubfeedRef(sub.feed_id, sub.subfeed_hash), create=True)
            assert live is not None
            live.channels.add(sub.channel_id)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._puller)
                nursery.start_soon(self._session_watcher)
                nursery.start_soon(self.nonces.run)
                task_status.started()
        finally:
            self.store.close()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the feed service is not running"
        return self._nursery

    # -- keys and subfeeds ---------------------------------------------------------------------

    def _key(self, feed_id: str) -> KeyPair | None:
        key = self._keys.get(feed_id)
        if key is None:
            key = self.node.home.key("feed", feed_id)
            if key is not None:
                self._keys[feed_id] = key
        return key

    async def adopt_key(self, seed: bytes, *, name: str | None = None) -> str:
        """Hold a feed's private key (mode 0600 under the node home) and own the feed here.

        Used by ``feed_create``. Giving one key to two nodes makes forks possible: the tests do
        it on purpose.
        """
        key = KeyPair(seed)
        await self.node.run_sync(self.node.home.save_key, "feed", key)
        self._keys[key.id] = key
        await self.node.run_sync(
            functools.partial(self.store.add_feed, key.id, name=name, owned=True)
        )
        for live in self._live.values():
            if live.ref.feed_id == key.id and live.signer is None:
                stored = await self.node.run_sync(self.store.head, live.sf)
                live.signer = self._new_signer(key, live, stored.last_checkpoint)
        return key.id

    def _new_signer(self, key: KeyPair, live: LiveSubfeed, last_checkpoint: int) -> FeedSigner:
        """The owner's signer of a loaded subfeed, signing with the reserve's nonces."""
        return FeedSigner(
            key, live.ref, live.head, last_checkpoint=last_checkpoint, nonces=self.nonces.take
        )

    async def _load(
        self, ref: SubfeedRef, *, create: bool, name: str | None = None, by_peer: bool = False
    ) -> LiveSubfeed | None:
        """The live state of a subfeed (loaded from storage on first use).

        Args:
            create: record the subfeed (and its feed, as followed) if it is not known here.
                A subfeed of an owned feed is recorded in any case.
            name: the subfeed's name, if known.
            by_peer: a peer named the subfeed (see MAX_EMPTY_SUBFEEDS).

        Returns:
            None if the feed is not known here and ``create`` is False.
        """
        key = (ref.feed_id, ref.subfeed_hash)
        live = self._live.get(key)
        if live is not None:
            return live
        async with self._load_lock:
            live = self._live.get(key)
            if live is not None:
                return live
            run = self.node.run_sync
            feed = await run(self.store.feed, ref.feed_id)
            if feed is None:
                if not create:
                    return None
                await run(functools.partial(self.store.add_feed, ref.feed_id, owned=False))
            subfeed = functools.partial(
                self.store.subfeed, ref.feed_id, ref.subfeed_hash, name=name
            )
            sf = await run(functools.partial(subfeed, create=create))
            # A peer may name any subfeed hash: rows are made for it only in owned feeds (so a
            # subscriber can wait for a subfeed not written yet), and only MAX_EMPTY_SUBFEEDS.
            if (
                sf is None
                and feed is not None
                and feed.owned
                and (
                    not by_peer
                    or await run(self.store.empty_subfeeds, ref.feed_id) < MAX_EMPTY_SUBFEEDS
                )
            ):
                sf = await run(functools.partial(subfeed, create=True))
            if sf is None:
                return None
            stored = await run(self.store.head, sf)
            head = (
                Head.empty(ref)
                if stored.count == 0
                else Head(stored.count, stored.last_signature, stored.chain or b"")
            )
            forks = await run(self.store.forks, ref.feed_id)
            live = LiveSubfeed(ref=ref, sf=sf, name=name, head=head)
            live.forked = any(f.subfeed_hash == ref.subfeed_hash for f in forks)
            key_pair = self._key(ref.feed_id)
            if key_pair is not None:
                live.signer = self._new_signer(key_pair, live, stored.last_checkpoint)
            self._live[key] = live
            return live

    async def _held(self, ref: SubfeedRef) -> LiveSubfeed | None:
        """A subfeed this node can serve: its feed is owned, followed or stored here."""
        live = self._live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            return live
        return await self._load(ref, create=False, by_peer=True)

    # -- writing -------------------------------------------------------------------------------

    async def _commit(self, write: _Write) -> None:
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
                alone = self._appenders <= 1 and write.live.signer is not None
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

    def _write_inline(self, group: list[_Write]) -> bool:
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

    async def _write_in_thread(self, group: list[_Write]) -> None:
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

    def _written(self, group: list[_Write], size: int) -> None:
        self.stats.commits += 1
        payload = sum(len(b) for w in group for b in w.bodies) + size * (SIGNATURE_BYTES + 32)
        self._after_write(wal_bytes(size, payload))
        for w in group:
            self._advanced(w.live, w.start, w.bodies, w.signatures, w.head, w.checkpoints)
            w.done.set()

    def _fail(self, group: list[_Write], exc: Exception) -> None:
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

    async def _write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Any other write to the feed tables, in a worker thread."""
        async with self._write_lock:
            return await self.node.run_sync(functools.partial(fn, *args, **kwargs))

    def _after_write(self, wal: int) -> None:
        self._wal_since_checkpoint += wal
        if self._wal_since_checkpoint >= WAL_CHECKPOINT_BYTES and not self._wal_checkpointing:
            self._wal_since_checkpoint = 0
            self._wal_checkpointing = True
            self.nursery.start_soon(self._checkpoint_wal)

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

    def _advanced(
        self,
        live: LiveSubfeed,
        start: int,
        bodies: Sequence[bytes],
        signatures: Sequence[bytes],
        head: Head,
        checkpoints: Sequence[Checkpoint],
    ) -> None:
        """Messages ``start ..`` are stored: move the head, wake watchers, schedule gossip."""
        live.head = head
        live.recent.extend(start, bodies, signatures)
        live.checkpoints.extend(checkpoints)
        live.changed.notify()
        if live.gossip.peers:
            self._mark_dirty(live)

    def _mark_dirty(self, live: LiveSubfeed) -> None:
        self._dirty.add(live)
        self._flush_wake.ring()

    # -- appending (the owner) -----------------------------------------------------------------

    async def append(
        self,
        ref: SubfeedRef,
        messages: Sequence[JSONValue],
        *,
        metadata: dict[str, JSONValue] | None = None,
        subfeed_name: str | None = None,
    ) -> tuple[int, int]:
        """Sign and durably append ``messages`` to a subfeed of a feed owned here.

        This is the in-process append (like hypercore's ``core.append``); ``feed_append`` is the
        same through the local API.

        Returns:
            (number of the first message, number of messages appended).

        Raises:
            InvalidInput: a message is not a JSON value or is over the size limit.
            NotPermitted: this node does not hold the feed's key.
        """
        payloads = [encode_message_value(m, f"message {i}") for i, m in enumerate(messages)]
        meta = encode_metadata(metadata)
        live = await self._load(ref, create=False, name=subfeed_name)
        if live is None or live.signer is None:
            raise NotPermitted(
                f"feed {ref.feed_id} is not owned by this node: only the holder of its key"
                " appends (a granted writer uses 'feed submit')"
            )
        if not payloads:
            return live.head.count, 0
        # Signed and queued without yielding in between, so queue order is signing order.
        signer = live.signer
        batch = signer.sign(payloads, timestamp=now_ms(), metadata=meta)
        signer.commit(batch)
        self._appenders += 1
        try:
            await self._commit(
                _Write(
                    live,
                    batch.start,
                    batch.bodies,
                    batch.signatures,
                    batch.chains,
                    batch.checkpoints,
                    batch.head,
                )
            )
        finally:
            self._appenders -= 1
        self.stats.appended += len(batch)
        self.stats.signed_with_precomputed_nonce += batch.precomputed
        return batch.start, len(batch)

    # -- receiving -----------------------------------------------------------------------------

    async def _receive(
        self,
        live: LiveSubfeed,
        peer: str,
        channel: str,
        start: int,
        items: Sequence[Sequence[bytes]],
        wire_checkpoints: Sequence[Sequence[Any]],
        *,
        pushed: bool = False,
    ) -> None:
        """Take messages ``start ..`` from ``peer``: drop duplicates, keep fork evidence, stash
        what is ahead of a gap, verify and store what continues the head. A push that brought
        nothing new prunes its sender (it will announce instead of pushing)."""
        try:
            checkpoints = [Checkpoint.from_wire(c) for c in wire_checkpoints]
        except FeedRejected as exc:
            self._offence(peer, str(exc))
            return
        diverged: ChainDiverged | None = None
        async with live.lock:
            count = live.head.count
            known = max(0, min(len(items), count - start))
            if known and not await self._check_known(live, peer, start, items[:known]):
                return
            new, new_start = items[known:], start + known
            if not new:
                if pushed:
                    self._send_to(peer, FeedPrune(channel=channel, **_names(live.ref)))
                return
            if live.signer is not None:
                # Only this node extends a feed it owns; a validly signed message from elsewhere
                # that does not match ours was caught above as a fork.
                return
            if new_start > count:
                self._stash(live, peer, new_start, new)
                return
            try:
                await self._accept(live, new_start, new, checkpoints)
            except FeedRejected as exc:
                self._offence(peer, str(exc))
                return
            except ChainDiverged as exc:
                diverged = exc
            else:
                await self._drain_stash(live)
        if diverged is not None:
            await self._investigate(live, peer, channel, diverged)

    async def _accept(
        self,
        live: LiveSubfeed,
        start: int,
        items: Sequence[Sequence[bytes]],
        checkpoints: Sequence[Checkpoint],
    ) -> None:
        """Verify messages that continue the head, store them, move the head (lock held)."""
        assert start == live.head.count
        ref, head = live.ref, live.head
        if self.verify_every_signature:
            checkpoints = ()
        if len(items) <= INLINE_VERIFY:
            prepared = prepare_batch(ref, head, items, checkpoints)
            bad = first_bad_signature(ref, prepared.bodies, prepared.signatures, prepared.unproven)
            if bad is not None:
                raise FeedRejected(f"message {start + bad} has a bad signature", index=bad)
            new_head = finish_batch(prepared)
        else:
            prepared, new_head = await self._verify_in_threads(ref, head, items, checkpoints)
        self.stats.proven_by_checkpoint += prepared.proven
        self.stats.verified_one_by_one += len(prepared) - prepared.proven
        await self._commit(
            _Write(
                live,
                start,
                prepared.bodies,
                prepared.signatures,
                prepared.chains,
                prepared.checkpoints,
                new_head,
            )
        )
        self.stats.received += len(prepared)

    async def _verify_in_threads(
        self,
        ref: SubfeedRef,
        head: Head,
        items: Sequence[Sequence[bytes]],
        checkpoints: Sequence[Checkpoint],
    ) -> tuple[PreparedBatch, Head]:
        def prepare_and_finish() -> tuple[PreparedBatch, Head | None]:
            prepared = prepare_batch(ref, head, items, checkpoints)
            if prepared.proven < len(prepared):
                return prepared, None
            return prepared, finish_batch(prepared)

        run = functools.partial(trio.to_thread.run_sync, limiter=self._verify_limiter)
        prepared, new_head = await run(prepare_and_finish)
        if new_head is not None:
            return prepared, new_head
        unproven = prepared.unproven
        parts = _split(unproven, VERIFY_THREADS if len(unproven) >= 64 else 1)
        bad: list[int] = []

        async def verify(part: range) -> None:
            found = await run(first_bad_signature, ref, prepared.bodies, prepared.signatures, part)
            if found is not None:
                bad.append(found)

        async with trio.open_nursery() as nursery:
            for part in parts:
                nursery.start_soon(verify, part)
        if bad:
            index = min(bad)
            raise FeedRejected(f"message {head.count + index} has a bad signature", index=index)
        return prepared, await run(finish_batch, prepared)

    async def _check_known(
        self, live: LiveSubfeed, peer: str, start: int, items: Sequence[Sequence[bytes]]
    ) -> bool:
        """Messages below the head: duplicates are dropped; a conflicting, validly signed one is
        fork evidence. Returns False if the rest of the batch must be ignored."""
        for i, item in enumerate(items):
            number = start + i
            theirs = (item[0], item[1])
            held = live.recent.get(number)
            if held is None:
                held = await self.node.run_sync(self.store.message, live.sf, number)
            if held is None or held == theirs:
                self.stats.duplicates += 1
                continue
            try:
                evidence = fork_evidence(live.ref, number, held, theirs)
            except FeedRejected as exc:
                self._offence(peer, str(exc))
                return False
            if evidence is not None:
                await self._record_fork(live, evidence, peer)
                return False
        return True

    def _stash(
        self, live: LiveSubfeed, peer: str, start: int, items: Sequence[Sequence[bytes]]
    ) -> None:
        """Keep messages that arrived ahead of a gap (the puller will fill it)."""
        if len(live.stash) + len(items) > STASH_MESSAGES:
            live.stash.clear()
        for i, item in enumerate(items):
            live.stash.setdefault(start + i, (item[0], item[1], peer))
        self._pull_wake.ring()

    async def _drain_stash(self, live: LiveSubfeed) -> None:
        """Accept stashed messages that now continue the head (lock held)."""
        for n in [n for n in live.stash if n < live.head.count]:
            del live.stash[n]
        while live.head.count in live.stash:
            run: list[list[bytes]] = []
            n = live.head.count
            peer = live.stash[n][2]
            while n in live.stash and len(run) < MAX_BATCH_MESSAGES and live.stash[n][2] == peer:
                body, signature, _ = live.stash.pop(n)
                run.append([body, signature])
                n += 1
            try:
                await self._accept(live, live.head.count, run, list(live.checkpoints))
            except (FeedRejected, ChainDiverged) as exc:
                live.stash.clear()
                if isinstance(exc, FeedRejected):
                    self._offence(peer, str(exc))
                return

    async def _investigate(
        self, live: LiveSubfeed, peer: str, channel: str, diverged: ChainDiverged
    ) -> None:
        """A validly signed message did not follow our head: ask the peer for its version of
        the message before it, and keep the two as evidence if they differ. A peer that cannot
        show a conflicting message sent a message that chains to nothing: its fault."""
        number = diverged.number - 1
        conn = self.node.connections.get(peer)
        if conn is None:
            return
        try:
            reply = await conn.request(
                FeedGet(
                    id=0,
                    channel=channel,
                    **_names(live.ref),
                    start=number,
                    limit=1,
                )
            )
        except Unavailable as exc:
            log.info("could not ask %s... about a suspected fork: %s", peer[:16], exc)
            return
        except KacheryError as exc:
            self._offence(peer, f"sent message {diverged.number} but not message {number} ({exc})")
            return
        reply = cast(FeedGetResponse, reply)  # request() checked it
        held = live.recent.get(number) or await self.node.run_sync(
            self.store.message, live.sf, number
        )
        if not reply.messages or held is None:
            self._offence(peer, f"sent message {diverged.number} without a message {number}")
            return
        theirs = (reply.messages[0][0], reply.messages[0][1])
        try:
            evidence = fork_evidence(live.ref, number, held, theirs)
        except FeedRejected as exc:
            self._offence(peer, str(exc))
            return
        if evidence is None:
            self._offence(peer, f"message {diverged.number} does not link to message {number}")
            return
        await self._record_fork(live, evidence, peer)

    async def _record_fork(self, live: LiveSubfeed, evidence: ForkEvidence, peer: str) -> None:
        live.gossip.diverged(peer)
        new = await self._write(
            self.store.add_fork,
            live.ref.feed_id,
            live.ref.subfeed_hash,
            evidence.number,
            evidence.first,
            evidence.second,
            reported_by=peer,
        )
        live.forked = True
        if new:
            self.stats.forks += 1
            log.warning(
                "FORK of feed %s subfeed %s at message %d: two different messages signed by the"
                " feed key (the other from %s...); keeping this node's history, refusing the"
                " other branch",
                live.ref.feed_id,
                live.ref.subfeed_hash,
                evidence.number,
                peer[:16],
            )
            self.node.notify()

    def _offence(self, peer: str, reason: str) -> None:
        """Penalise ``peer`` for invalid feed data; cut it off past the threshold."""
        self.stats.offences += 1
        log.warning("refused feed data from %s...: %s", peer[:16], reason)
        if self.penalties.offence(peer, trio.current_time()):
            log.warning("closing the session with %s...: repeated invalid feed data", peer[:16])
            for live in self._live.values():
                live.gossip.gone(peer)
            conn = self.node.connections.get(peer)
            if conn is not None:
                self.nursery.start_soon(
                    conn.close, CloseCode.PROTOCOL_ERROR, f"invalid feed data: {reason}"[:120]
                )
        self.node.notify()

    def _banned(self, peer: str) -> bool:
        return self.penalties.banned(peer, trio.current_time())

    # -- gossip: flushing ----------------------------------------------------------------------

    async def _flusher(self) -> None:
        """Push new messages to mesh peers and announce heads to the others, after each change."""
        while True:
            deadline = min(self._flush_at.values(), default=math.inf)
            await self._flush_wake.wait(deadline=deadline)
            now = trio.current_time()
            due = [live for live, at in self._flush_at.items() if at <= now]
            for live in due:
                del self._flush_at[live]
            dirty, self._dirty = self._dirty | set(due), set()
            for live in dirty:
                if not live.deleted:
                    self._flush(live, now)

    def _flush(self, live: LiveSubfeed, now: float) -> None:
        count = live.head.count
        plan = live.gossip.plan_flush(count, live.recent.start, now)
        ref = live.ref
        for push in plan.pushes:
            conn = self.node.connections.get(push.peer)
            items = live.recent.slice(push.start, count)
            if conn is None or items is None:
                continue
            for start, chunk in _chunks(push.start, items):
                end = start + len(chunk)
                cps = [c.to_wire() for c in live.checkpoints if start < c.count <= end]
                self._send(
                    conn,
                    FeedPush(
                        channel=push.channel,
                        **_names(ref),
                        start=start,
                        messages=[[b, s] for b, s in chunk],
                        checkpoints=cps[-MAX_BATCH_CHECKPOINTS:],
                    ),
                )
                self.stats.pushes_sent += 1
        for have in plan.haves:
            conn = self.node.connections.get(have.peer)
            if conn is not None:
                self._send(
                    conn,
                    FeedHave(
                        channel=have.channel,
                        **_names(ref),
                        count=have.count,
                    ),
                )
                self.stats.haves_sent += 1
        if plan.wake_at is not None:
            self._flush_at[live] = min(plan.wake_at, self._flush_at.get(live, math.inf))

    def _send_to(self, peer: str, msg: Message) -> None:
        conn = self.node.connections.get(peer)
        if conn is not None:
            self._send(conn, msg)

    def _send(self, conn: PeerConnection, msg: Message) -> None:
        if conn.closed.is_set():
            return
        self.nursery.start_soon(conn.send_quietly, msg)

    # -- gossip: pulling -----------------------------------------------------------------------

    async def _puller(self) -> None:
        """Start pulls where a peer announced more than this node holds."""
        while True:
            now = trio.current_time()
            wake_at = math.inf
            banned = self.penalties.banned_peers(now)
            for live in list(self._live.values()):
                if live.pulling or live.deleted or not live.gossip.peers:
                    continue
                plan = live.gossip.plan_pull(live.head.count, now, busy=banned)
                if plan.pull is not None:
                    live.pulling = True
                    self.nursery.start_soon(self._pull, live, plan.pull)
                elif plan.wake_at is not None:
                    wake_at = min(wake_at, plan.wake_at)
            await self._pull_wake.wait(deadline=wake_at)

    async def _pull(self, live: LiveSubfeed, pull: Pull) -> None:
        """Fetch ``pull.start .. pull.end`` from one peer, PREFETCH requests in flight."""
        self.stats.pulls += 1
        try:
            conn = self.node.connections.get(pull.peer)
            if conn is None:
                live.gossip.gone(pull.peer)
                return
            if pull.graft:
                self._send(conn, FeedGraft(channel=pull.channel, **_names(live.ref)))
            await self._fetch_range(live, conn, pull)
        finally:
            live.pulling = False
            self._pull_wake.ring()

    async def _fetch_range(self, live: LiveSubfeed, conn: PeerConnection, pull: Pull) -> None:
        ref = live.ref
        ahead: deque[_Fetch] = deque()
        next_start = live.head.count

        async def fetch(f: _Fetch) -> None:
            with f.scope:
                try:
                    reply = await conn.request(
                        FeedGet(
                            id=0,
                            channel=pull.channel,
                            **_names(ref),
                            start=f.start,
                            limit=f.limit,
                        )
                    )
                    reply = cast(FeedGetResponse, reply)  # request() checked it
                    f.reply = reply
                except KacheryError as exc:
                    f.error = exc
            f.done.set()

        async with trio.open_nursery() as nursery:
            while True:
                while len(ahead) < PREFETCH and next_start < pull.end:
                    # End each request at a multiple of the batch size: the owner's checkpoints
                    # fall there when messages are small, so each batch is proven by one.
                    limit = MAX_BATCH_MESSAGES - next_start % MAX_BATCH_MESSAGES
                    f = _Fetch(next_start, min(limit, pull.end - next_start))
                    ahead.append(f)
                    nursery.start_soon(fetch, f)
                    next_start += f.limit
                if not ahead:
                    break
                f = ahead.popleft()
                await f.done.wait()
                reply = f.reply
                if reply is None or self._banned(conn.node_id):
                    log.info("pull from %s... stopped: %s", conn.node_id[:16], f.error)
                    break
                if reply.start != f.start or len(reply.messages) > f.limit:
                    self._offence(conn.node_id, "answered a feed request with another range")
                    break
                live.gossip.has(conn.node_id, reply.count)
                if reply.messages:
                    live.gossip.has(conn.node_id, reply.start + len(reply.messages))
                    await self._receive(
                        live,
                        conn.node_id,
                        pull.channel,
                        reply.start,
                        reply.messages,
                        reply.checkpoints,
                    )
                if len(reply.messages) < f.limit or live.head.count < f.start + f.limit:
                    break  # a short answer or a refused batch: plan again from the head
            for f in ahead:
                f.scope.cancel()

    # -- sessions ------------------------------------------------------------------------------

    async def _session_watcher(self) -> None:
        """Subscribe followed subfeeds through each new session; forget ended ones."""
        known: dict[str, tuple[PeerConnection, frozenset[str]]] = {}

        def snapshot() -> dict[str, tuple[PeerConnection, frozenset[str]]]:
            return {n: (c, frozenset(c.channels)) for n, c in self.node.connections.items()}

        def changed() -> bool:
            return snapshot() != known

        while True:
            current = snapshot()
            for peer, (conn, channels) in current.items():
                old = known.get(peer)
                fresh = channels if old is None or old[0] is not conn else channels - old[1]
                if fresh:
                    for live in list(self._live.values()):
                        for channel in sorted(live.channels & fresh):
                            self._subscribe_through(live, conn, channel)
                if old is not None and old[0] is conn:
                    for channel in old[1] - channels:
                        for live in self._live.values():
                            view = live.gossip.peers.get(peer)
                            if view is not None and view.channel == channel:
                                live.gossip.gone(peer)
            for peer in set(known) - set(current):
                for live in self._live.values():
                    live.gossip.gone(peer)
            known = current
            await self.node.wait_until(changed)

    def _peer_provides(self, conn: PeerConnection, channel: str) -> bool:
        return channel in conn.channels and Role.PROVIDE_FEEDS in self.node.membership.roles_of(
            channel, conn.node_id
        )

    def _subscribe_through(self, live: LiveSubfeed, conn: PeerConnection, channel: str) -> None:
        if self._peer_provides(conn, channel):
            self.nursery.start_soon(self._subscribe_to, live, conn, channel)

    async def _subscribe_to(self, live: LiveSubfeed, conn: PeerConnection, channel: str) -> None:
        try:
            reply = await conn.request(
                FeedSubscribe(
                    id=0,
                    channel=channel,
                    **_names(live.ref),
                    count=live.head.count,
                )
            )
        except KacheryError as exc:
            log.debug("%s... does not serve %s: %s", conn.node_id[:16], live.ref, exc)
            return
        reply = cast(FeedSubscribeResponse, reply)  # request() checked it
        if conn.closed.is_set() or live.deleted:
            return
        live.gossip.source_added(conn.node_id, channel, reply.count)
        self._pull_wake.ring()
        self.node.notify()

    # -- peer messages -------------------------------------------------------------------------

    def _require_provider(self, channel: str) -> None:
        if Role.PROVIDE_FEEDS not in self.node.membership.roles_of(channel, self.node.node_id):
            name = self.node.membership.name_of(channel)
            raise NotPermitted(f"this node does not provide feeds in channel {name}")

    async def on_subscribe(self, conn: PeerConnection, msg: FeedSubscribe) -> FeedSubscribeResponse:
        self._require_provider(msg.channel)
        if self._banned(conn.node_id):
            raise NotPermitted("this node refuses your feed traffic for now")
        live = await self._held(SubfeedRef(msg.feed_id, msg.subfeed_hash))
        if live is None:
            raise NotFound(f"this node holds no feed {msg.feed_id}")
        mesh = live.gossip.subscribed(conn.node_id, msg.channel, msg.count)
        if msg.count < live.head.count:
            self._mark_dirty(live)
        self.node.notify()
        return FeedSubscribeResponse(id=msg.id, count=live.head.count, mesh=mesh)

    async def on_prune(self, conn: PeerConnection, msg: FeedPrune) -> None:
        live = self._live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:  # the node checked the sender's requestFeeds (routes.py)
            live.gossip.pruned(conn.node_id)

    async def on_graft(self, conn: PeerConnection, msg: FeedGraft) -> None:
        live = self._live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:
            live.gossip.grafted(conn.node_id)
            self._mark_dirty(live)

    async def on_unsubscribe(self, conn: PeerConnection, msg: FeedUnsubscribe) -> None:
        live = self._live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:
            live.gossip.unsubscribed(conn.node_id)

    async def on_get(self, conn: PeerConnection, msg: FeedGet) -> FeedGetResponse:
        self._require_provider(msg.channel)
        if self._banned(conn.node_id):
            raise NotPermitted("this node refuses your feed traffic for now")
        live = await self._held(SubfeedRef(msg.feed_id, msg.subfeed_hash))
        if live is None:
            raise NotFound(f"this node holds no feed {msg.feed_id}")
        count = live.head.count
        start = msg.start
        limit = min(msg.limit, count - start)
        if limit <= 0:
            return FeedGetResponse(id=msg.id, start=start, messages=[], checkpoints=[], count=count)
        items = live.recent.slice(start, start + limit)
        if items is None or _size(items) > MAX_BATCH_BYTES:
            items = await self.node.run_sync(
                functools.partial(self.store.read, live.sf, start, limit, max_bytes=MAX_BATCH_BYTES)
            )
        end = start + len(items)
        checkpoints = [c for c in live.checkpoints if start < c.count <= end]
        if not checkpoints or checkpoints[0].count > start + 1:
            checkpoints = await self.node.run_sync(self.store.checkpoints, live.sf, start, end)
        if checkpoints and len(items) < limit and checkpoints[-1].count < end:
            items = items[: checkpoints[-1].count - start]  # cut at a checkpoint, not mid-way
        return FeedGetResponse(
            id=msg.id,
            start=start,
            messages=[[b, s] for b, s in items],
            checkpoints=[c.to_wire() for c in checkpoints[-MAX_BATCH_CHECKPOINTS:]],
            count=count,
        )

    async def on_have(self, conn: PeerConnection, msg: FeedHave) -> None:
        if self._banned(conn.node_id):  # its provideFeeds was checked by the node (routes.py)
            return
        live = self._live.get((msg.feed_id, msg.subfeed_hash))
        if live is None or not live.followed:
            return
        live.gossip.has(conn.node_id, msg.count)
        if msg.count > live.head.count:
            self._pull_wake.ring()

    async def on_push(self, conn: PeerConnection, msg: FeedPush) -> None:
        if self._banned(conn.node_id):  # its provideFeeds was checked by the node (routes.py)
            return
        live = self._live.get((msg.feed_id, msg.subfeed_hash))
        if live is None or not live.followed:
            return
        view = live.gossip.peers.get(conn.node_id)
        if view is not None and view.diverged:
            return  # its history forks from ours: evidence is kept, the branch refused
        live.gossip.has(conn.node_id, msg.start + len(msg.messages))
        await self._receive(
            live, conn.node_id, msg.channel, msg.start, msg.messages, msg.checkpoints, pushed=True
        )

    async def on_submit(self, conn: PeerConnection, msg: FeedSubmit) -> FeedSubmitResponse:
        ref = SubfeedRef(msg.feed_id, msg.subfeed_hash)
        if self._key(ref.feed_id) is None:
            raise NotFound(f"this node does not own feed {ref.feed_id}")
        if conn.node_id not in await self._granted(ref):
            raise NotPermitted(
                f"node {conn.node_id[:16]}... may not write to subfeed {ref.subfeed_hash} of feed"
                f" {ref.feed_id}: the owner grants it with 'feed grant'"
            )
        start, count = await self.append(ref, msg.messages, metadata={"submittedBy": conn.node_id})
        return FeedSubmitResponse(id=msg.id, start=start, count=count)

    async def _granted(self, ref: SubfeedRef) -> set[str]:
        key = (ref.feed_id, ref.subfeed_hash)
        granted = self._grants.get(key)
        if granted is None:
            pairs = await self.node.run_sync(self.store.grants, ref.feed_id, ref.subfeed_hash)
            granted = self._grants[key] = {node for _, node in pairs}
        return granted

    # -- the in-process API --------------------------------------------------------------------

    def count(self, ref: SubfeedRef) -> int:
        """Messages of a subfeed held here (0 if it is not loaded)."""
        live = self._live.get((ref.feed_id, ref.subfeed_hash))
        return 0 if live is None else live.head.count

    async def wait_count(self, ref: SubfeedRef, count: int) -> None:
        """Wait until at least ``count`` messages of a subfeed are held here."""
        live = await self._load(ref, create=True)
        assert live is not None
        while live.head.count < count:
            await live.changed.wait()

    async def read_items(
        self, live: LiveSubfeed, start: int, limit: int
    ) -> list[tuple[bytes, bytes]]:
        """Stored messages ``start ..`` (at most ``limit``) as (body, signature)."""
        end = min(live.head.count, start + limit)
        if end <= start:
            return []
        items = live.recent.slice(start, end)
        if items is not None:
            return items
        return await self.node.run_sync(self.store.read, live.sf, start, end - start)

    async def messages(self, ref: SubfeedRef, start: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Every message from ``start`` on, then each new one as it arrives (Trio-native)."""
        live = await self._load(ref, create=True)
        assert live is not None
        async for record in self._follow(live, start):
            yield record

    async def _follow(self, live: LiveSubfeed, position: int) -> AsyncIterator[dict[str, Any]]:
        """The messages of ``live`` from ``position`` on, then each new one as it is stored,
        until the subfeed is deleted."""
        while not live.deleted:
            if position < live.head.count:
                for body, signature in await self.read_items(live, position, READ_LIMIT):
                    yield _record(body, signature, signed=False)
                    position += 1
            else:
                await live.wait_beyond(position)

    async def subscribe(self, ref: SubfeedRef, channel: str, *, name: str | None = None) -> int:
        """Follow a subfeed live in a channel; returns the messages held now."""
        if Role.REQUEST_FEEDS not in self.node.membership.roles_of(channel, self.node.node_id):
            raise NotPermitted(
                "this node lacks the requestFeeds role in channel"
                f" {self.node.membership.name_of(channel)}"
            )
        live = await self._load(ref, create=True, name=name)
        assert live is not None
        await self._write(self.store.subscribe, ref.feed_id, ref.subfeed_hash, channel)
        if channel not in live.channels:
            live.channels.add(channel)
            for conn in self.node.sessions_in(channel):
                self._subscribe_through(live, conn, channel)
        return live.head.count

    # -- local API -----------------------------------------------------------------------------

    def _uri(self, uri: str, *, subfeed_required: bool = True) -> tuple[SubfeedRef, str | None]:
        parsed = parse_feed_uri(uri)
        if parsed.subfeed_name is None:
            if subfeed_required:
                raise InvalidInput(
                    f"{uri} names a whole feed: name a subfeed, like"
                    f" feed://{parsed.feed_id}/{DEFAULT_SUBFEED}"
                )
            return SubfeedRef(parsed.feed_id, subfeed_hash(DEFAULT_SUBFEED)), DEFAULT_SUBFEED
        name = None if parsed.subfeed_name.startswith("~") else parsed.subfeed_name
        assert parsed.subfeed_hash is not None
        return SubfeedRef(parsed.feed_id, parsed.subfeed_hash), name

    async def _known(self, ref: SubfeedRef) -> LiveSubfeed:
        """A subfeed of a feed known here (an unknown subfeed of it is empty, as in kachery)."""
        live = self._live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            return live
        if await self.node.run_sync(self.store.feed, ref.feed_id) is None:
            raise NotFound(
                f"feed {ref.feed_id} is not on this node: follow one of its subfeeds with"
                " 'kachery-node feed subscribe URI CHANNEL'"
            )
        live = await self._load(ref, create=True)
        assert live is not None
        return live

    @exposed
    async def feed_create(self, name: str | None = None, exist_ok: bool = False) -> dict[str, Any]:
        """Create a feed (a new key pair), optionally under a local name."""
        if name is not None:
            if not name or len(name) > 200:
                raise InvalidInput("a feed name is 1 to 200 characters")
            existing = await self.node.run_sync(self.store.feed_by_name, name)
            if existing is not None:
                if exist_ok:
                    return {"feedId": existing.feed_id, "name": name, "created": False}
                raise AlreadyExists(f"a feed named {name!r} already exists: {existing.feed_id}")
        feed_id = await self.adopt_key(os.urandom(SEED_BYTES), name=name)
        log.info("created feed %s%s", feed_id, f" ({name})" if name else "")
        return {"feedId": feed_id, "name": name, "created": True}

    @exposed
    async def feed_list(self) -> list[dict[str, Any]]:
        """Feeds on this node, with their subfeeds, counts, follows and forks."""
        feeds = await self.node.run_sync(self.store.feeds)
        subfeeds = await self.node.run_sync(self.store.subfeeds)
        subs = await self.node.run_sync(self.store.subscriptions)
        forks = await self.node.run_sync(self.store.forks)
        out = []
        for feed in feeds:
            entries = []
            for s in subfeeds:
                if s.feed_id != feed.feed_id:
                    continue
                live = self._live.get((s.feed_id, s.subfeed_hash))
                entries.append(
                    {
                        "subfeedHash": s.subfeed_hash,
                        "name": s.subfeed_name,
                        "count": live.head.count if live is not None else s.count,
                        "following": [
                            self.node.membership.name_of(x.channel_id)
                            for x in subs
                            if x.feed_id == s.feed_id and x.subfeed_hash == s.subfeed_hash
                        ],
                        "uri": str(FeedURI(feed_id=s.feed_id, subfeed_name=_name_of(s))),
                    }
                )
            out.append(
                {
                    "feedId": feed.feed_id,
                    "name": feed.name,
                    "owned": feed.owned,
                    "uri": f"feed://{feed.feed_id}",
                    "subfeeds": entries,
                    "forks": sum(1 for f in forks if f.feed_id == feed.feed_id),
                }
            )
        return out

    @exposed
    async def feed_delete(self, feed_id: str, force: bool = False) -> dict[str, Any]:
        """Remove a feed and all its messages from this node (an owned feed's key too)."""
        feed_id = parse_feed_uri(f"feed://{feed_id.removeprefix('feed://')}").feed_id
        owned = self._key(feed_id) is not None
        if owned and not force:
            raise InvalidInput(
                f"feed {feed_id} is owned by this node: deleting it destroys its private key, and"
                " nobody can ever append to it again; to do it anyway, pass force=True"
                " (on the command line, --force)"
            )
        removed = await self._write(self.store.delete_feed, feed_id)
        for key in [k for k in self._live if k[0] == feed_id]:
            live = self._live.pop(key)
            live.deleted = True
            live.changed.notify()
            for peer, view in list(live.gossip.peers.items()):
                conn = self.node.connections.get(peer)
                if conn is not None and view.source:
                    self._send(
                        conn,
                        FeedUnsubscribe(
                            channel=view.channel,
                            **_names(live.ref),
                        ),
                    )
        self._grants = {k: v for k, v in self._grants.items() if k[0] != feed_id}
        if owned:
            self._keys.pop(feed_id, None)
            self.node.home.forget_key("feed", feed_id)
        self.node.notify()
        return {"feedId": feed_id, "messages": removed, "owned": owned}

    @exposed
    async def feed_append(self, uri: str, messages: list[Any]) -> dict[str, Any]:
        """Sign and append messages to an owned subfeed; answers after they are durable."""
        if not isinstance(messages, list):
            raise InvalidInput("messages must be a JSON array of messages")
        ref, name = self._uri(uri)
        start, count = await self.append(ref, messages, subfeed_name=name)
        return {"start": start, "count": count}

    @exposed
    async def feed_count(self, uri: str) -> int:
        """Messages of a subfeed held here."""
        ref, _ = self._uri(uri)
        return (await self._known(ref)).head.count

    @exposed
    async def feed_read(
        self,
        uri: str,
        start: int = 0,
        limit: int = READ_LIMIT,
        wait_msec: float = 0,
        signed: bool = False,
    ) -> dict[str, Any]:
        """Messages from ``start`` (at most ``limit``); waits up to ``wait_msec`` for the first."""
        ref, _ = self._uri(uri)
        live = await self._known(ref)
        if start < 0 or limit < 0:
            raise InvalidInput("start and limit must be >= 0")
        if wait_msec > 0 and live.head.count <= start:
            with trio.move_on_after(wait_msec / 1000):
                await live.wait_beyond(start)
        items = await self.read_items(live, start, min(limit, 10_000))
        return {
            "start": start,
            "messages": [_record(b, s, signed=signed) for b, s in items],
            "count": live.head.count,
            "forked": live.forked,
        }

    @exposed
    async def feed_watch(
        self, uri: str, start: int | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Stream messages as they arrive (from ``start``, default: only new ones)."""
        ref, _ = self._uri(uri)
        live = await self._known(ref)
        position = live.head.count if start is None else max(0, start)
        async for record in self._follow(live, position):
            position += 1
            yield record
        yield StreamResult({"deleted": True, "position": position})

    @exposed
    async def feed_grant(self, uri: str, node_id: str, revoke: bool = False) -> dict[str, Any]:
        """Let a node submit messages to an owned subfeed (or revoke that)."""
        ref, _ = self._uri(uri)
        if self._key(ref.feed_id) is None:
            raise NotPermitted(f"feed {ref.feed_id} is not owned by this node")
        node_id = node_id.lower()
        public_key_from_id(node_id)  # InvalidInput unless 64 hex digits
        await self._write(
            self.store.grant, ref.feed_id, ref.subfeed_hash, node_id, allow=not revoke
        )
        self._grants.pop((ref.feed_id, ref.subfeed_hash), None)
        return {"subfeedHash": ref.subfeed_hash, "nodeId": node_id, "granted": not revoke}

    @exposed
    async def feed_submit(
        self, uri: str, messages: list[Any], channel: str | None = None
    ) -> dict[str, Any]:
        """Ask the owner's node (any connected peer that owns the feed) to append messages."""
        ref, _ = self._uri(uri)
        if not isinstance(messages, list) or not messages:
            raise InvalidInput("messages must be a non-empty JSON array")
        for i, m in enumerate(messages):
            encode_message_value(m, f"message {i}")
        if self._key(ref.feed_id) is not None:
            start, count = await self.append(
                ref, messages, metadata={"submittedBy": self.node.node_id}
            )
            return {"start": start, "count": count, "owner": self.node.node_id}
        channels = (
            [self.node.membership.resolve(channel)]
            if channel is not None
            else self.node.membership.active_channels()
        )
        errors: list[str] = []
        for conn in list(self.node.connections.values()):
            for ch in sorted(set(channels) & conn.channels):
                try:
                    reply = await conn.request(
                        FeedSubmit(
                            id=0,
                            channel=ch,
                            **_names(ref),
                            messages=messages,
                        )
                    )
                except NotFound:
                    break  # not the owner
                except KacheryError as exc:
                    errors.append(f"{conn.node_id[:16]}...: {exc}")
                    break
                reply = cast(FeedSubmitResponse, reply)  # request() checked it
                return {"start": reply.start, "count": reply.count, "owner": conn.node_id}
        if errors:
            raise NotPermitted("submission refused: " + "; ".join(errors))
        raise Unavailable(f"no connected peer owns feed {ref.feed_id}")

    @exposed
    async def feed_subscribe(self, uri: str, channel: str) -> dict[str, Any]:
        """Follow a subfeed live through a channel (kept across restarts)."""
        ref, name = self._uri(uri)
        channel_id = self.node.membership.resolve(channel)
        count = await self.subscribe(ref, channel_id, name=name)
        return {"count": count, "channel": self.node.membership.name_of(channel_id)}

    @exposed
    async def feed_unsubscribe(self, uri: str, channel: str | None = None) -> dict[str, Any]:
        """Stop following a subfeed (in one channel, or all); what is held stays."""
        ref, _ = self._uri(uri)
        channel_id = None if channel is None else self.node.membership.resolve(channel)
        ended = await self._write(self.store.unsubscribe, ref.feed_id, ref.subfeed_hash, channel_id)
        live = self._live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            gone = set(live.channels) if channel_id is None else {channel_id}
            live.channels -= gone
            for peer, view in list(live.gossip.peers.items()):
                if view.channel in gone and view.source:
                    conn = self.node.connections.get(peer)
                    if conn is not None:
                        self._send(
                            conn,
                            FeedUnsubscribe(
                                channel=view.channel,
                                **_names(ref),
                            ),
                        )
                    view.source = False
        return {"unsubscribed": ended}

    @exposed
    async def feed_forks(self, feed_id: str | None = None) -> list[dict[str, Any]]:
        """Evidence of forks: pairs of different messages with one number, both validly signed."""
        records = await self.node.run_sync(self.store.forks, feed_id)
        out = []
        for r in records:
            kept, other = decode_record(r.kept[0]), decode_record(r.other[0])
            out.append(
                {
                    "feedId": r.feed_id,
                    "subfeedHash": r.subfeed_hash,
                    "messageNumber": r.message_number,
                    "kept": _evidence(r.kept, kept.message, kept.timestamp),
                    "other": _evidence(r.other, other.message, other.timestamp),
                    "reportedBy": r.reported_by,
                    "detectedAt": r.detected_at,
                }
            )
        return out

    @exposed
    async def feed_statistics(self) -> dict[str, Any]:
        """Counters of the feed service, and the offences and bans of peers."""
        return self.statistics()

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status`` (camelCase keys)."""
        now = trio.current_time()
        return {
            **{camel_case(k): v for k, v in vars(self.stats).items()},
            "subfeedsLoaded": len(self._live),
            "noncesReady": self.nonces.ready(),
            "offencesByPeer": {k: v for k, v in self.penalties.offences.items() if v},
            "banned": sorted(self.penalties.banned_peers(now)),
        }


# -- helpers -------------------------------------------------------------------------------------


def _rows(group: list[_Write]) -> list[Rows]:
    return [
        Rows(w.live.sf, w.start, w.bodies, w.signatures, w.chains, w.checkpoints) for w in group
    ]


def _chunks(
    start: int, items: list[tuple[bytes, bytes]]
) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """Split messages into batches within MAX_BATCH_MESSAGES and MAX_BATCH_BYTES."""
    out: list[tuple[int, list[tuple[bytes, bytes]]]] = []
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for item in items:
        n = len(item[0]) + len(item[1])
        if chunk and (len(chunk) >= MAX_BATCH_MESSAGES or size + n > MAX_BATCH_BYTES):
            out.append((start, chunk))
            start += len(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        out.append((start, chunk))
    return out


def _size(items: Sequence[tuple[bytes, bytes]]) -> int:
    return sum(len(b) + len(s) for b, s in items)


def _split(indices: range, parts: int) -> list[range]:
    step = max(1, math.ceil(len(indices) / parts))
    return [range(i, min(i + step, indices.stop)) for i in range(indices.start, indices.stop, step)]


def _record(body: bytes, signature: bytes, *, signed: bool) -> dict[str, Any]:
    record = decode_record(body)
    out: dict[str, Any] = {
        "messageNumber": record.number,
        "timestamp": record.timestamp,
        "message": record.message,
        "metaData": record.metadata,
    }
    if signed:
        out["body"] = body.hex()
        out["signature"] = signature.hex()
    return out


def _evidence(item: tuple[bytes, bytes], message: JSONValue, timestamp: int) -> dict[str, Any]:
    return {
        "message": message,
        "timestamp": timestamp,
        "body": item[0].hex(),
        "signature": item[1].hex(),
    }


def _names(ref: SubfeedRef) -> dict[str, str]:
    return {"feed_id": ref.feed_id, "subfeed_hash": ref.subfeed_hash}


def _name_of(s: Any) -> str:
    return str(s.subfeed_name) if s.subfeed_name is not None else f"~{s.subfeed_hash}"
