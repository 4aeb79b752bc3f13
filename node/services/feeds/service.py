"""The feed service: local feeds, live watching, and the gossip replicator between nodes.

``FeedService`` keeps, per subfeed in use, a ``LiveSubfeed`` (live.py): its head, the newest
messages in memory, the gossip state, and for owned feeds the signer. It loads subfeeds, appends
to owned ones, and follows others; its parts are writer.py (the group commit), receiver.py
(checking and storing what peers send), gossip.py (the replicator and its peer handlers) and
api.py (the ``feed_*`` methods of the local API).

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
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import trio

from kachery.node.changes import Doorbell
from kachery.node.daemon.membership import now_ms
from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted
from kachery.node.services.feeds.gossip import Replicator
from kachery.node.services.feeds.live import READ_LIMIT, FeedStats, LiveSubfeed, record_json
from kachery.node.services.feeds.receiver import Receiver
from kachery.node.services.feeds.writer import GroupCommit, Write
from kachery.node.services.nonces import NonceReserve
from kachery.protocol.channel import Role
from kachery.protocol.feed_messages import FeedSubmit, FeedSubmitResponse
from kachery.protocol.feed_values import encode_message_value, encode_metadata
from kachery.protocol.feeds import FeedSigner, Head, SubfeedRef
from kachery.protocol.identity import KeyPair
from kachery.protocol.kachery_json import JSONValue
from kachery.protocol.messages import camel_case
from kachery.storage.errors import NotFound
from kachery.storage.feeds import FeedStore

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger("kachery.node.services.feeds")

MAX_EMPTY_SUBFEEDS = 10_000
"""Subfeeds of an owned feed that peers may name before anything is written to them (each is a
row, kept so that its subscribers hear of its first message); beyond it a peer's subscription to
an unwritten subfeed is answered not found."""


class FeedService:
    """Feeds on one node (a ``Service``: see node/services/__init__.py).

    Args:
        node: the node it runs in.
    """

    name = "feeds"

    def __init__(self, node: Host) -> None:
        self.node = node
        self.store = FeedStore(node.home.database)
        self.nonces = NonceReserve()
        self.stats = FeedStats()
        self.live: dict[tuple[str, str], LiveSubfeed] = {}
        """Subfeeds in use, by (feed ID, subfeed hash)."""
        self.keys: dict[str, KeyPair] = {}
        self.grants: dict[tuple[str, str], set[str]] = {}
        self._load_lock = trio.Lock()
        pull_wake = Doorbell()
        self.writer = GroupCommit(node, self.store, self.stats, self._stored)
        self.receiver = Receiver(node, self.store, self.writer, self.stats, self.live, pull_wake)
        self.penalties = self.receiver.penalties
        self.replicator = Replicator(
            node, self.store, self.receiver, self.stats, self.live, self.held, pull_wake
        )
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load followed subfeeds, then flush, pull and watch sessions until cancelled."""
        for sub in await self.node.run_sync(self.store.subscriptions):
            live = await self.load(SubfeedRef(sub.feed_id, sub.subfeed_hash), create=True)
            assert live is not None
            live.channels.add(sub.channel_id)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.replicator.flusher)
                nursery.start_soon(self.replicator.puller)
                nursery.start_soon(self.replicator.session_watcher)
                nursery.start_soon(self.nonces.run)
                task_status.started()
        finally:
            self.store.close()

    def key_of(self, feed_id: str) -> KeyPair | None:
        key = self.keys.get(feed_id)
        if key is None:
            key = self.node.home.key("feed", feed_id)
            if key is not None:
                self.keys[feed_id] = key
        return key

    async def adopt_key(self, seed: bytes, *, name: str | None = None) -> str:
        """Hold a feed's private key (mode 0600 under the node home) and own the feed here.

        Used by ``feed_create``. Giving one key to two nodes makes forks possible: the tests do
        it on purpose.
        """
        key = KeyPair(seed)
        await self.node.run_sync(self.node.home.save_key, "feed", key)
        self.keys[key.id] = key
        await self.node.run_sync(
            functools.partial(self.store.add_feed, key.id, name=name, owned=True)
        )
        for live in self.live.values():
            if live.ref.feed_id == key.id and live.signer is None:
                stored = await self.node.run_sync(self.store.head, live.sf)
                live.signer = self._new_signer(key, live, stored.last_checkpoint)
        return key.id

    def _new_signer(self, key: KeyPair, live: LiveSubfeed, last_checkpoint: int) -> FeedSigner:
        """The owner's signer of a loaded subfeed, signing with the reserve's nonces."""
        return FeedSigner(
            key, live.ref, live.head, last_checkpoint=last_checkpoint, nonces=self.nonces.take
        )

    async def load(
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
        live = self.live.get(key)
        if live is not None:
            return live
        async with self._load_lock:
            live = self.live.get(key)
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
            key_pair = self.key_of(ref.feed_id)
            if key_pair is not None:
                live.signer = self._new_signer(key_pair, live, stored.last_checkpoint)
            self.live[key] = live
            return live

    async def held(self, ref: SubfeedRef) -> LiveSubfeed | None:
        """A subfeed this node can serve: its feed is owned, followed or stored here."""
        live = self.live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            return live
        return await self.load(ref, create=False, by_peer=True)

    def _stored(self, w: Write) -> None:
        """Messages ``w.start ..`` are stored: move the head, wake watchers, schedule gossip."""
        live = w.live
        live.head = w.head
        live.recent.extend(w.start, w.bodies, w.signatures)
        live.checkpoints.extend(w.checkpoints)
        live.changed.notify()
        if live.gossip.peers:
            self.replicator.mark_dirty(live)

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
        live = await self.load(ref, create=False, name=subfeed_name)
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
        self.writer.appenders += 1
        try:
            await self.writer.commit(
                Write(
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
            self.writer.appenders -= 1
        self.stats.appended += len(batch)
        self.stats.signed_with_precomputed_nonce += batch.precomputed
        return batch.start, len(batch)

    async def on_submit(self, conn: PeerConnection, msg: FeedSubmit) -> FeedSubmitResponse:
        ref = SubfeedRef(msg.feed_id, msg.subfeed_hash)
        if self.key_of(ref.feed_id) is None:
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
        granted = self.grants.get(key)
        if granted is None:
            pairs = await self.node.run_sync(self.store.grants, ref.feed_id, ref.subfeed_hash)
            granted = self.grants[key] = {node for _, node in pairs}
        return granted

    def count(self, ref: SubfeedRef) -> int:
        """Messages of a subfeed held here (0 if it is not loaded)."""
        live = self.live.get((ref.feed_id, ref.subfeed_hash))
        return 0 if live is None else live.head.count

    async def wait_count(self, ref: SubfeedRef, count: int) -> None:
        """Wait until at least ``count`` messages of a subfeed are held here."""
        live = await self.load(ref, create=True)
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
        live = await self.load(ref, create=True)
        assert live is not None
        async for record in self.follow(live, start):
            yield record

    async def follow(self, live: LiveSubfeed, position: int) -> AsyncIterator[dict[str, Any]]:
        """The messages of ``live`` from ``position`` on, then each new one as it is stored,
        until the subfeed is deleted."""
        while not live.deleted:
            if position < live.head.count:
                for body, signature in await self.read_items(live, position, READ_LIMIT):
                    yield record_json(body, signature, signed=False)
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
        live = await self.load(ref, create=True, name=name)
        assert live is not None
        await self.writer.write(self.store.subscribe, ref.feed_id, ref.subfeed_hash, channel)
        if channel not in live.channels:
            live.channels.add(channel)
            for conn in self.node.sessions_in(channel):
                self.replicator.subscribe_through(live, conn, channel)
        return live.head.count

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status`` (camelCase keys)."""
        now = trio.current_time()
        return {
            **{camel_case(k): v for k, v in vars(self.stats).items()},
            "subfeedsLoaded": len(self.live),
            "noncesReady": self.nonces.ready(),
            "offencesByPeer": {k: v for k, v in self.receiver.penalties.offences.items() if v},
            "banned": sorted(self.receiver.penalties.banned_peers(now)),
        }
