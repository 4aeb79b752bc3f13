"""Members' signed address announcements: this node's own, and the freshest of every member's.

An announcement (kachery.protocol.channel.Announcement) is a member's list of addresses, signed
and timestamped by that member, so any member can relay it and nobody can forge or roll it back.
The book keeps the newest one per member (in memory, and in the channel store so a restart
dials at once), builds the ``PeerAnnounce`` for a channel, and takes a peer's: only members'
announcements of that channel, only newer ones, at most ``MAX_PER_MESSAGE`` looked at.

Non-goal: gossiping them (node.py relays what is fresh) and dialing (peer_manager.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kachery.node.daemon.membership import RunSync, now_ms
from kachery.node.home import NodeHome
from kachery.protocol.channel import Announcement, MembershipDoc
from kachery.protocol.errors import RemoteProtocolError
from kachery.protocol.messages import PeerAnnounce

log = logging.getLogger(__name__)

MAX_PER_MESSAGE = 1000
"""Announcements read from one ``PeerAnnounce``; the rest are ignored."""


class AddressBook:
    """Address announcements by node ID."""

    def __init__(self, home: NodeHome, run_sync: RunSync) -> None:
        self.home = home
        self._run_sync = run_sync
        self.by_node: dict[str, Announcement] = {}
        self.own: Announcement | None = None

    async def load(self) -> None:
        for announcement in await self._run_sync(self.home.channels.announcements):
            self.by_node[announcement.node_id] = announcement

    def refresh(self, addresses: Iterable[str]) -> None:
        """Sign this node's announcement afresh (at start, and every ANNOUNCE_REFRESH_SECONDS)."""
        self.own = Announcement.create(self.home.keypair, list(addresses), now_ms())
        self.by_node[self.own.node_id] = self.own

    def message(
        self, channel: str, doc: MembershipDoc | None, *, only_self: bool = False
    ) -> PeerAnnounce:
        """The announcements of ``channel``'s members (``doc``), or only this node's."""
        members = set() if doc is None else {m.node_id for m in doc.members}
        chosen = [self.own] if only_self else [a for n, a in self.by_node.items() if n in members]
        return PeerAnnounce(
            channel=channel, announcements=[a.to_wire() for a in chosen if a is not None]
        )

    async def take(
        self, wires: list[dict[str, Any]], doc: MembershipDoc, *, sender: str
    ) -> list[Announcement]:
        """Keep the newer announcements of ``doc``'s members among ``wires``; returns them."""
        fresh = []
        for wire in wires[:MAX_PER_MESSAGE]:
            try:
                announcement = Announcement.from_wire(wire)
            except RemoteProtocolError as exc:
                log.info("bad announcement from %s...: %s", sender[:16], exc)
                continue
            if doc.member(announcement.node_id) is None:
                continue  # only members' addresses travel in a channel
            held = self.by_node.get(announcement.node_id)
            if held is not None and held.timestamp >= announcement.timestamp:
                continue
            if announcement.node_id == self.home.node_id:
                continue
            self.by_node[announcement.node_id] = announcement
            await self._run_sync(self.home.channels.save_announcement, announcement)
            fresh.append(announcement)
        return fresh
