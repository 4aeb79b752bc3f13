"""The feed gossip replicator: push what is new, announce heads, pull what is missing.

After every change a flusher pushes everything new to the eager peers of each subfeed in one frame
each and announces the head to the lazy ones (``SubfeedGossip.plan_flush``); a push that brings
nothing new prunes its sender, and a node that had to pull a small gap grafts itself back
(PlumTree). A puller pulls missing ranges from whoever announced them (``plan_pull``), in batches
of up to 1000 messages or 1 MiB, PREFETCH requests in flight, aligned to the owner's checkpoints.
A session watcher subscribes followed subfeeds through each new session that may provide them.
The peer handlers here answer subscriptions and reads, and take pushes and announcements (what
they carry goes to the ``Receiver``).

Non-goals: the plans (kachery.protocol.feed_gossip) and checking messages (receiver.py).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import trio

from kachery.node.changes import Doorbell
from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted
from kachery.node.services.feeds.live import FeedStats, LiveSubfeed, chunks, names, size_of
from kachery.node.services.feeds.receiver import Receiver
from kachery.node.services.host import Host
from kachery.protocol.channel import Role
from kachery.protocol.errors import KacheryError
from kachery.protocol.feed_gossip import Pull
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
    FeedSubscribe,
    FeedSubscribeResponse,
    FeedUnsubscribe,
)
from kachery.protocol.feeds import SubfeedRef
from kachery.storage.errors import NotFound
from kachery.storage.feeds import FeedStore

log = logging.getLogger("kachery.node.services.feeds")

PREFETCH = 2
"""Pull requests in flight to one peer during catch-up."""


@dataclass
class Fetch:
    """One pull request in flight."""

    start: int
    limit: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: FeedGetResponse | None = None
    error: KacheryError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Replicator:
    """Gossip of the subfeeds this node holds, with the peers that follow or provide them."""

    def __init__(
        self,
        node: Host,
        store: FeedStore,
        receiver: Receiver,
        stats: FeedStats,
        live: dict[tuple[str, str], LiveSubfeed],
        held: Callable[[SubfeedRef], Awaitable[LiveSubfeed | None]],
        pull_wake: Doorbell,
    ) -> None:
        self.node = node
        self.store = store
        self.receiver = receiver
        self.stats = stats
        self.live = live
        self.held = held
        """The subfeed if this node can serve it (owned, followed or stored here)."""
        self.pull_wake = pull_wake
        self.flush_wake = Doorbell()
        self._dirty: set[LiveSubfeed] = set()
        self._flush_at: dict[LiveSubfeed, float] = {}

    def mark_dirty(self, live: LiveSubfeed) -> None:
        """Flush ``live`` to its peers soon (it advanced, or a peer is behind)."""
        self._dirty.add(live)
        self.flush_wake.ring()

    async def flusher(self) -> None:
        """Push new messages to mesh peers and announce heads to the others, after each change."""
        while True:
            deadline = min(self._flush_at.values(), default=math.inf)
            await self.flush_wake.wait(deadline=deadline)
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
            for start, chunk in chunks(push.start, items):
                end = start + len(chunk)
                cps = [c.to_wire() for c in live.checkpoints if start < c.count <= end]
                conn.send_quietly(
                    FeedPush(
                        channel=push.channel,
                        **names(ref),
                        start=start,
                        messages=[[b, s] for b, s in chunk],
                        checkpoints=cps[-MAX_BATCH_CHECKPOINTS:],
                    ),
                )
                self.stats.pushes_sent += 1
        for have in plan.haves:
            conn = self.node.connections.get(have.peer)
            if conn is not None:
                conn.send_quietly(
                    FeedHave(
                        channel=have.channel,
                        **names(ref),
                        count=have.count,
                    ),
                )
                self.stats.haves_sent += 1
        if plan.wake_at is not None:
            self._flush_at[live] = min(plan.wake_at, self._flush_at.get(live, math.inf))

    # -- gossip: pulling -----------------------------------------------------------------------

    async def puller(self) -> None:
        """Start pulls where a peer announced more than this node holds."""
        while True:
            now = trio.current_time()
            wake_at = math.inf
            banned = self.receiver.penalties.banned_peers(now)
            for live in list(self.live.values()):
                if live.pulling or live.deleted or not live.gossip.peers:
                    continue
                plan = live.gossip.plan_pull(live.head.count, now, busy=banned)
                if plan.pull is not None:
                    live.pulling = True
                    self.node.spawn(self._pull, live, plan.pull)
                elif plan.wake_at is not None:
                    wake_at = min(wake_at, plan.wake_at)
            await self.pull_wake.wait(deadline=wake_at)

    async def _pull(self, live: LiveSubfeed, pull: Pull) -> None:
        """Fetch ``pull.start .. pull.end`` from one peer, PREFETCH requests in flight."""
        self.stats.pulls += 1
        try:
            conn = self.node.connections.get(pull.peer)
            if conn is None:
                live.gossip.gone(pull.peer)
                return
            if pull.graft:
                conn.send_quietly(FeedGraft(channel=pull.channel, **names(live.ref)))
            await self._fetch_range(live, conn, pull)
        finally:
            live.pulling = False
            self.pull_wake.ring()

    async def _fetch_range(self, live: LiveSubfeed, conn: PeerConnection, pull: Pull) -> None:
        ref = live.ref
        ahead: deque[Fetch] = deque()
        next_start = live.head.count

        async def fetch(f: Fetch) -> None:
            with f.scope:
                try:
                    reply = await conn.request(
                        FeedGet(
                            id=0,
                            channel=pull.channel,
                            **names(ref),
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
                    f = Fetch(next_start, min(limit, pull.end - next_start))
                    ahead.append(f)
                    nursery.start_soon(fetch, f)
                    next_start += f.limit
                if not ahead:
                    break
                f = ahead.popleft()
                await f.done.wait()
                reply = f.reply
                if reply is None or self.receiver.banned(conn.node_id):
                    log.info("pull from %s... stopped: %s", conn.node_id[:16], f.error)
                    break
                if reply.start != f.start or len(reply.messages) > f.limit:
                    self.receiver.offence(
                        conn.node_id, "answered a feed request with another range"
                    )
                    break
                live.gossip.has(conn.node_id, reply.count)
                if reply.messages:
                    live.gossip.has(conn.node_id, reply.start + len(reply.messages))
                    await self.receiver.receive(
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

    async def session_watcher(self) -> None:
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
                    for live in list(self.live.values()):
                        for channel in sorted(live.channels & fresh):
                            self.subscribe_through(live, conn, channel)
                if old is not None and old[0] is conn:
                    for channel in old[1] - channels:
                        for live in self.live.values():
                            view = live.gossip.peers.get(peer)
                            if view is not None and view.channel == channel:
                                live.gossip.gone(peer)
            for peer in set(known) - set(current):
                for live in self.live.values():
                    live.gossip.gone(peer)
            known = current
            await self.node.wait_until(changed)

    def _peer_provides(self, conn: PeerConnection, channel: str) -> bool:
        return channel in conn.channels and Role.PROVIDE_FEEDS in self.node.membership.roles_of(
            channel, conn.node_id
        )

    def subscribe_through(self, live: LiveSubfeed, conn: PeerConnection, channel: str) -> None:
        if self._peer_provides(conn, channel):
            self.node.spawn(self._subscribe_to, live, conn, channel)

    async def _subscribe_to(self, live: LiveSubfeed, conn: PeerConnection, channel: str) -> None:
        try:
            reply = await conn.request(
                FeedSubscribe(
                    id=0,
                    channel=channel,
                    **names(live.ref),
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
        self.pull_wake.ring()
        self.node.notify()

    # -- peer messages -------------------------------------------------------------------------

    async def _served(self, conn: PeerConnection, msg: FeedSubscribe | FeedGet) -> LiveSubfeed:
        """The subfeed a peer asks to follow or read, if this node serves it to that peer."""
        if Role.PROVIDE_FEEDS not in self.node.membership.roles_of(msg.channel, self.node.node_id):
            name = self.node.membership.name_of(msg.channel)
            raise NotPermitted(f"this node does not provide feeds in channel {name}")
        if self.receiver.banned(conn.node_id):
            raise NotPermitted("this node refuses your feed traffic for now")
        live = await self.held(SubfeedRef(msg.feed_id, msg.subfeed_hash))
        if live is None:
            raise NotFound(f"this node holds no feed {msg.feed_id}")
        return live

    def _followed(self, conn: PeerConnection, msg: FeedHave | FeedPush) -> LiveSubfeed | None:
        """The subfeed a peer announces or pushes, if this node follows it and takes the peer's
        word (the node checked the peer's provideFeeds: routes.py)."""
        if self.receiver.banned(conn.node_id):
            return None
        live = self.live.get((msg.feed_id, msg.subfeed_hash))
        return live if live is not None and live.followed else None

    async def on_subscribe(self, conn: PeerConnection, msg: FeedSubscribe) -> FeedSubscribeResponse:
        live = await self._served(conn, msg)
        mesh = live.gossip.subscribed(conn.node_id, msg.channel, msg.count)
        if msg.count < live.head.count:
            self.mark_dirty(live)
        self.node.notify()
        return FeedSubscribeResponse(id=msg.id, count=live.head.count, mesh=mesh)

    async def on_prune(self, conn: PeerConnection, msg: FeedPrune) -> None:
        live = self.live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:  # the node checked the sender's requestFeeds (routes.py)
            live.gossip.pruned(conn.node_id)

    async def on_graft(self, conn: PeerConnection, msg: FeedGraft) -> None:
        live = self.live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:
            live.gossip.grafted(conn.node_id)
            self.mark_dirty(live)

    async def on_unsubscribe(self, conn: PeerConnection, msg: FeedUnsubscribe) -> None:
        live = self.live.get((msg.feed_id, msg.subfeed_hash))
        if live is not None:
            live.gossip.unsubscribed(conn.node_id)

    async def on_get(self, conn: PeerConnection, msg: FeedGet) -> FeedGetResponse:
        live = await self._served(conn, msg)
        count = live.head.count
        start = msg.start
        limit = min(msg.limit, count - start)
        if limit <= 0:
            return FeedGetResponse(id=msg.id, start=start, messages=[], checkpoints=[], count=count)
        items = live.recent.slice(start, start + limit)
        if items is None or size_of(items) > MAX_BATCH_BYTES:
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
        live = self._followed(conn, msg)
        if live is None:
            return
        live.gossip.has(conn.node_id, msg.count)
        if msg.count > live.head.count:
            self.pull_wake.ring()

    async def on_push(self, conn: PeerConnection, msg: FeedPush) -> None:
        live = self._followed(conn, msg)
        if live is None:
            return
        view = live.gossip.peers.get(conn.node_id)
        if view is not None and view.diverged:
            return  # its history forks from ours: evidence is kept, the branch refused
        live.gossip.has(conn.node_id, msg.start + len(msg.messages))
        await self.receiver.receive(
            live, conn.node_id, msg.channel, msg.start, msg.messages, msg.checkpoints, pushed=True
        )
