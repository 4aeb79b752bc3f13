"""Planning the feed gossip: whom to push to, whom to tell, what to pull and from whom.

Replication follows GossipSub / PlumTree, per followed subfeed. Every node that follows a subfeed
subscribes to each peer that may serve it there (``provideFeeds`` in a shared channel); each peer
keeps the first MESH_DEGREE subscribers as its *mesh* (PlumTree's eager set) and pushes new
messages to them eagerly (everything new, batched per flush), and announces its head lazily
(``have``) to its other subscribers, HAVE_DELAY after the change and then at most once per
HAVE_INTERVAL each. A node that receives a push holding nothing new *prunes* the sender (which
then only announces to it), so the eager edges shrink towards a tree and each message crosses
about one session per node. A node that learns that a peer holds more than it does (a ``have``,
a push past its head, a subscribe answer) pulls the missing range from that peer, at once if the
gap is large (catch-up), else after PULL_GRACE, which leaves time for the eager push already on
its way; a node that had to pull a small gap *grafts* itself back into that peer's eager set.
Because messages are self-verifying, any node can serve them.
Duplicate suppression: a node records what each peer is known to hold (from what it announced,
pushed, or was pushed) and never pushes it anything below that; what arrives twice is dropped by
number and signature (node/services/feeds/receiver.py). A peer whose history forks from ours
is never pulled from.

A peer that sends invalid feed data is penalised (``kachery.protocol.penalties.PenaltyBox``).

Sans-I/O: times are arguments (``now``, seconds on any monotonic clock); the node carries out
what the plans say. Non-goals: sockets, storage, and checking messages (feeds.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MESH_DEGREE = 4
"""Subscribers a node pushes to eagerly, per subfeed (GossipSub's D). Lab channels hold tens of
nodes: 4 reaches 10 nodes in two hops while each message crosses each session about once."""

HAVE_DELAY = 0.005
"""Seconds between a change and its announcement to lazy subscribers: the eager path usually
delivers first, and announcements of several changes coalesce."""

HAVE_INTERVAL = 0.05
"""Seconds between two ``have`` announcements to one lazy subscriber (later heads coalesce)."""

MAX_MESH = 3 * MESH_DEGREE
"""Eager peers at most, grafts included."""

PULL_GRACE = 0.005
"""Seconds a node that fell a few messages behind waits for the eager push before pulling."""

LIVE_GAP = 64
"""A gap of more messages than this is catch-up: pulled at once, without grace."""


@dataclass(slots=True)
class PeerView:
    """What this node knows about one peer, for one subfeed.

    Attributes:
        node_id: the peer.
        channel: the channel the two talk about this subfeed in.
        subscriber: the peer subscribed here: it gets pushes (mesh) or announcements.
        source: this node subscribed to the peer: it may be pulled from.
        mesh: the peer gets new messages pushed eagerly.
        known: the peer holds at least this many messages.
        announced: the count this node last pushed or announced to the peer.
        announced_at: when it last sent the peer a ``have`` (-inf: never).
        pending_since: when the peer first fell behind what was announced to it (None: it
            is not behind).
        diverged: the peer's history forks from this node's: never pull from it.
    """

    node_id: str
    channel: str
    subscriber: bool = False
    source: bool = False
    mesh: bool = False
    known: int = 0
    announced: int = 0
    announced_at: float = -math.inf
    pending_since: float | None = None
    diverged: bool = False


@dataclass(frozen=True, slots=True)
class Push:
    """Send ``peer`` the messages from ``start`` to the current head."""

    peer: str
    channel: str
    start: int


@dataclass(frozen=True, slots=True)
class Have:
    """Tell ``peer`` this node holds ``count`` messages."""

    peer: str
    channel: str
    count: int


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """What to send after the head moved; plan again at ``wake_at`` if it is not None."""

    pushes: list[Push] = field(default_factory=list)
    haves: list[Have] = field(default_factory=list)
    wake_at: float | None = None


@dataclass(frozen=True, slots=True)
class Pull:
    """Fetch messages ``start .. end - 1`` from ``peer`` (and graft onto it if ``graft``)."""

    peer: str
    channel: str
    start: int
    end: int
    graft: bool = False


@dataclass(frozen=True, slots=True)
class PullPlan:
    """A pull to start now, or when to plan again (both None: nothing to pull)."""

    pull: Pull | None = None
    wake_at: float | None = None


class SubfeedGossip:
    """The gossip state of one followed (or served) subfeed on this node.

    Args:
        degree: mesh size (MESH_DEGREE).
        have_delay: seconds from a change to its first announcement to lazy subscribers.
        have_interval: seconds between announcements to one lazy subscriber.
        pull_grace: seconds to wait for an eager push before pulling a small gap.
        live_gap: gaps larger than this are pulled at once.
    """

    def __init__(
        self,
        *,
        degree: int = MESH_DEGREE,
        have_delay: float = HAVE_DELAY,
        have_interval: float = HAVE_INTERVAL,
        pull_grace: float = PULL_GRACE,
        live_gap: int = LIVE_GAP,
    ) -> None:
        self.degree = degree
        self.have_delay = have_delay
        self.have_interval = have_interval
        self.pull_grace = pull_grace
        self.live_gap = live_gap
        self.peers: dict[str, PeerView] = {}
        self._behind_since: float | None = None

    def _view(self, peer: str, channel: str) -> PeerView:
        view = self.peers.get(peer)
        if view is None:
            view = self.peers[peer] = PeerView(peer, channel)
        return view

    # -- events --------------------------------------------------------------------------------

    def subscribed(self, peer: str, channel: str, count: int) -> bool:
        """``peer`` subscribed here, holding ``count`` messages; True if it joins the mesh."""
        view = self._view(peer, channel)
        view.channel = channel
        view.subscriber = True
        view.known = max(view.known, count)
        view.announced = max(view.announced, count)
        if not view.mesh and self.mesh_size() < self.degree:
            view.mesh = True
        return view.mesh

    def unsubscribed(self, peer: str) -> None:
        """``peer`` no longer wants pushes or announcements from here."""
        view = self.peers.get(peer)
        if view is None:
            return
        was_mesh = view.mesh
        view.subscriber = view.mesh = False
        if not view.source:
            del self.peers[peer]
        if was_mesh:
            self._fill_mesh()

    def source_added(self, peer: str, channel: str, count: int) -> None:
        """This node subscribed to ``peer``, which holds ``count`` messages."""
        view = self._view(peer, channel)
        view.source = True
        view.known = max(view.known, count)

    def gone(self, peer: str) -> None:
        """The session with ``peer`` ended (or no longer serves the channel)."""
        view = self.peers.pop(peer, None)
        if view is not None and view.mesh:
            self._fill_mesh()

    def has(self, peer: str, count: int) -> None:
        """``peer`` holds at least ``count`` messages (it announced, pushed, or was pushed them)."""
        view = self.peers.get(peer)
        if view is not None and count > view.known:
            view.known = count

    def diverged(self, peer: str) -> None:
        """``peer``'s history forks from this node's: stop pulling from and pushing to it."""
        view = self.peers.get(peer)
        if view is not None:
            view.diverged = True
            if view.mesh:
                view.mesh = False
                self._fill_mesh()

    def pruned(self, peer: str) -> None:
        """``peer`` got our push as a duplicate: announce to it lazily from now on."""
        view = self.peers.get(peer)
        if view is not None:
            view.mesh = False

    def grafted(self, peer: str) -> None:
        """``peer`` had to pull from us: push to it eagerly again (up to MAX_MESH peers)."""
        view = self.peers.get(peer)
        if (
            view is not None
            and view.subscriber
            and not view.diverged
            and self.mesh_size() < MAX_MESH
        ):
            view.mesh = True

    def mesh_size(self) -> int:
        return sum(1 for v in self.peers.values() if v.mesh)

    def _fill_mesh(self) -> None:
        lazy = sorted(
            (v for v in self.peers.values() if v.subscriber and not v.mesh and not v.diverged),
            key=lambda v: (-v.known, v.node_id),
        )
        for view in lazy[: max(0, self.degree - self.mesh_size())]:
            view.mesh = True

    # -- plans ---------------------------------------------------------------------------------

    def plan_flush(self, count: int, cached_from: int, now: float) -> FlushPlan:
        """What to send now that this node holds ``count`` messages.

        Args:
            count: messages held here.
            cached_from: the oldest message still in memory: mesh peers further behind than that
                get an announcement and pull instead.
            now: the current time.
        """
        pushes: list[Push] = []
        haves: list[Have] = []
        wake_at: float | None = None
        for view in self.peers.values():
            if not view.subscriber or view.diverged or view.known >= count:
                continue
            if view.mesh and view.known >= cached_from:
                pushes.append(Push(view.node_id, view.channel, view.known))
                view.known = view.announced = count
                view.pending_since = None
                continue
            if view.announced >= count:
                continue
            if view.pending_since is None:
                view.pending_since = now
            due = max(view.announced_at + self.have_interval, view.pending_since + self.have_delay)
            if now >= due:
                haves.append(Have(view.node_id, view.channel, count))
                view.announced, view.announced_at, view.pending_since = count, now, None
            else:
                wake_at = due if wake_at is None else min(wake_at, due)
        return FlushPlan(pushes, haves, wake_at)

    def plan_pull(self, count: int, now: float, *, busy: frozenset[str] = frozenset()) -> PullPlan:
        """Whether to pull, given that this node holds ``count`` messages.

        Args:
            count: messages held here.
            now: the current time.
            busy: peers not to ask now (banned, or already serving a pull).
        """
        candidates = [
            v
            for v in self.peers.values()
            if v.source and not v.diverged and v.known > count and v.node_id not in busy
        ]
        if not candidates:
            if not any(v.known > count for v in self.peers.values() if v.source):
                self._behind_since = None
            return PullPlan()
        if self._behind_since is None:
            self._behind_since = now
        best = min(candidates, key=lambda v: (-v.known, v.node_id))
        due = self._behind_since + self.pull_grace
        if best.known - count > self.live_gap:
            self._behind_since = None
            return PullPlan(pull=Pull(best.node_id, best.channel, count, best.known))
        if now >= due:  # the eager push did not come: pull, and ask to be pushed to again
            self._behind_since = None
            return PullPlan(pull=Pull(best.node_id, best.channel, count, best.known, graft=True))
        return PullPlan(wake_at=due)
