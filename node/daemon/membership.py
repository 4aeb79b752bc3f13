"""Channel membership on this node: channels, their document chains, invites, and joins.

``Membership`` owns the in-memory view of every channel this node takes part in (a
``ChannelHistory`` per channel, loaded from and saved to storage) and the rules that change it:
creating a channel, issuing invites, admitting a joiner, changing roles, removing members. Every
change produces a new signed document version; ``on_change`` tells the node, which gossips it and
re-checks live sessions. Database work runs in worker threads through ``run_sync``.

Non-goal: sessions and sockets (peer.py, daemon.py), and deciding whom to dial (peer_manager.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from kachery.node.daemon.peer import Refusal
from kachery.node.errors import NotPermitted
from kachery.node.home import NodeHome
from kachery.protocol.channel import (
    ALL_ROLES,
    Accepted,
    ChannelHistory,
    Invite,
    Member,
    MembershipDoc,
    Role,
    SignedDoc,
    check_invite_proof,
    parse_roles,
)
from kachery.protocol.errors import CloseCode, InvalidInput, KacheryError, RemoteProtocolError
from kachery.protocol.identity import KeyPair
from kachery.storage.channels import InviteRecord
from kachery.storage.errors import InviteRefused, NotFound

log = logging.getLogger(__name__)

RunSync = Callable[..., Awaitable[Any]]

DEFAULT_INVITE_SECONDS = 7 * 24 * 3600
"""An invite expires after a week unless told otherwise."""


def now_ms() -> int:
    return int(time.time() * 1000)


class Membership:
    """The channels this node takes part in.

    Args:
        home: the node home (identity, channel keys, storage).
        run_sync: runs a blocking storage call in a worker thread (``trio.to_thread.run_sync``
            with the node's database limiter).
    """

    def __init__(self, home: NodeHome, run_sync: RunSync) -> None:
        self.home = home
        self.key = home.keypair
        self.node_id = home.node_id
        self._run_sync = run_sync
        self._histories: dict[str, ChannelHistory] = {}
        self._names: dict[str, str] = {}
        self.on_change: Callable[[str], Awaitable[None]] | None = None

    async def load(self) -> None:
        """Load every channel and its documents from storage."""
        records = await self._run_sync(self.home.channels.all)
        for record in records:
            docs = await self._run_sync(self.home.channels.load_docs, record.channel_id)
            self._histories[record.channel_id] = ChannelHistory(record.channel_id, docs)
            self._names[record.channel_id] = record.name

    # -- queries -------------------------------------------------------------------------------

    def channel_ids(self) -> list[str]:
        """Channels this node takes part in (whether or not it is still a member)."""
        return list(self._histories)

    def active_channels(self) -> list[str]:
        """Channels in which this node is currently a member."""
        return [
            c for c, h in self._histories.items() if h.current and self.is_member(c, self.node_id)
        ]

    def has(self, channel_id: str) -> bool:
        return channel_id in self._histories

    def name_of(self, channel_id: str) -> str:
        return self._names.get(channel_id, channel_id[:16])

    def history(self, channel_id: str) -> ChannelHistory:
        return self._histories[channel_id]

    def current(self, channel_id: str) -> SignedDoc | None:
        history = self._histories.get(channel_id)
        return None if history is None else history.current

    def roles_of(self, channel_id: str, node_id: str) -> frozenset[Role]:
        history = self._histories.get(channel_id)
        return frozenset() if history is None else history.roles_of(node_id)

    def is_member(self, channel_id: str, node_id: str) -> bool:
        current = self.current(channel_id)
        return current is not None and current.doc.member(node_id) is not None

    def shared_channels(self, peer_id: str, among: Iterable[str] | None = None) -> set[str]:
        """Channels (of ``among``, default all) in which both this node and the peer are members."""
        candidates = self._histories if among is None else among
        return {
            c for c in candidates if self.is_member(c, self.node_id) and self.is_member(c, peer_id)
        }

    def members_to_reach(self) -> dict[str, set[str]]:
        """Every other member of this node's active channels -> the channels shared with it."""
        wanted: dict[str, set[str]] = {}
        for c in self.active_channels():
            current = self.current(c)
            assert current is not None
            for m in current.doc.members:
                if m.node_id != self.node_id:
                    wanted.setdefault(m.node_id, set()).add(c)
        return wanted

    def bootstrap_addresses(self, channel_id: str) -> list[str]:
        current = self.current(channel_id)
        return [] if current is None else list(current.doc.bootstrap)

    def resolve(self, name_or_id: str) -> str:
        """A channel ID from a local name, an ID, or a unique ID prefix.

        Raises:
            NotFound: no such channel on this node.
        """
        for c, name in self._names.items():
            if name_or_id in (name, c):
                return c
        matches = [c for c in self._names if len(name_or_id) >= 8 and c.startswith(name_or_id)]
        if len(matches) == 1:
            return matches[0]
        names = ", ".join(sorted(self._names.values())) or "none"
        raise NotFound(f"no channel {name_or_id!r} on this node (channels: {names})")

    # -- changing documents --------------------------------------------------------------------

    async def accept_docs(self, channel_id: str, wire_docs: Iterable[dict[str, Any]]) -> Accepted:
        """Take documents from a peer (in any order); returns what happened to the chain.

        Raises:
            RemoteProtocolError: a document is malformed, forged, or signed without authority.
        """
        if channel_id not in self._histories:
            return Accepted.KNOWN
        return await self.accept_signed(channel_id, [SignedDoc.from_wire(d) for d in wire_docs])

    async def accept_signed(self, channel_id: str, docs: Iterable[SignedDoc]) -> Accepted:
        """``accept_docs`` for documents already parsed (their signatures checked)."""
        history = self._histories.get(channel_id)
        if history is None:
            return Accepted.KNOWN
        result = Accepted.KNOWN
        for signed in sorted(docs, key=lambda d: d.doc.version):
            outcome = history.accept(signed)
            if outcome is Accepted.NEW:
                result = Accepted.NEW
            elif outcome is Accepted.NEED_PREDECESSOR and result is not Accepted.NEW:
                result = Accepted.NEED_PREDECESSOR
        if result is Accepted.NEW:
            await self._persist(channel_id)
        return result

    async def _persist(self, channel_id: str) -> None:
        """Save the chain just changed in memory, and tell ``on_change``.

        Shielded: a caller cancelled here (the handler of a document pushed just before its
        session closed) would otherwise leave memory ahead of storage, and the node would go
        back to the old version when it restarts.
        """
        with trio.CancelScope(shield=True):
            history = self._histories[channel_id]
            await self._run_sync(self.home.channels.save_docs, channel_id, history.docs_after(0))
            current = history.current
            log.info(
                "channel %s is at version %d (%d members)",
                self.name_of(channel_id),
                history.version,
                0 if current is None else len(current.doc.members),
            )
            if self.on_change is not None:
                await self.on_change(channel_id)

    def _signer(self, channel_id: str) -> KeyPair:
        owner = self.home.key("channel", channel_id)
        if owner is not None:
            return owner
        if Role.ADMIN in self.roles_of(channel_id, self.node_id):
            return self.key
        raise NotPermitted(
            f"this node is not an admin of channel {self.name_of(channel_id)}: only an admin can"
            " change its members"
        )

    async def _publish(self, channel_id: str, doc: MembershipDoc) -> SignedDoc:
        signed = doc.sign(self._signer(channel_id))
        outcome = self._histories[channel_id].accept(signed)
        assert outcome is Accepted.NEW, outcome
        await self._persist(channel_id)
        return signed

    async def create(self, name: str, label: str | None, addresses: list[str]) -> str:
        """Create a channel owned by a new key; this node is its first member, an admin.

        Raises:
            AlreadyExists: the name is taken.
        """
        _check_name(name)
        owner = KeyPair(os.urandom(32))
        doc = MembershipDoc(
            channel_id=owner.id,
            label=label or name,
            version=1,
            members=(Member(node_id=self.node_id, label="owner", roles=ALL_ROLES),),
            bootstrap=tuple(addresses),
            issued_at=now_ms(),
        )
        await self._run_sync(self.home.channels.add, owner.id, name)
        await self._run_sync(self.home.save_key, "channel", owner)
        self._histories[owner.id] = ChannelHistory(owner.id)
        self._names[owner.id] = name
        await self._publish(owner.id, doc)
        return owner.id

    async def invite(
        self,
        name_or_id: str,
        roles: frozenset[Role],
        *,
        expires_seconds: float | None,
        uses: int | None,
        addresses: list[str],
    ) -> str:
        """Issue an invite token (this node must be able to sign new documents).

        Raises:
            NotPermitted: this node is not an admin of the channel.
            InvalidInput: no roles, or nowhere to reach this node.
        """
        channel_id = self.resolve(name_or_id)
        self._signer(channel_id)
        if not roles:
            raise InvalidInput("an invite must grant at least one role (--roles)")
        if not addresses:
            raise InvalidInput(
                "this node has no address to put in the invite: start it with --announce"
            )
        if uses is not None and uses < 1:
            raise InvalidInput("--uses must be at least 1")
        seconds = DEFAULT_INVITE_SECONDS if expires_seconds is None else expires_seconds
        current = self.current(channel_id)
        invite = Invite(
            channel_id=channel_id,
            label="" if current is None else current.doc.label,
            name=self.name_of(channel_id),
            admin_id=self.node_id,
            bootstrap=tuple(addresses),
            roles=roles,
            expires_at=0 if seconds <= 0 else now_ms() + int(seconds * 1000),
            invite_id=os.urandom(16),
            secret=os.urandom(32),
        )
        await self._run_sync(self.home.channels.add_invite, invite, uses)
        return invite.to_token(self.key)

    async def admit_joiner(
        self, peer_id: str, invite_id: bytes, proof: bytes, transcript_hash: bytes
    ) -> str:
        """Redeem an invite presented in a handshake: add the joiner; returns the channel ID.

        Raises:
            Refusal: the invite is unknown, expired, used up, or the proof does not verify.
        """
        record: InviteRecord | None = await self._run_sync(self.home.channels.get_invite, invite_id)
        if record is None:
            raise Refusal(
                CloseCode.INVITE_REFUSED,
                "unknown invite: forged, revoked, or issued by another node",
            )
        if not check_invite_proof(record.secret, transcript_hash, proof):
            raise Refusal(
                CloseCode.INVITE_REFUSED,
                "the invite proof does not verify: tampered or forged invite",
            )
        try:
            await self._run_sync(self.home.channels.redeem_invite, invite_id, now_ms())
        except InviteRefused as exc:
            raise Refusal(CloseCode.INVITE_REFUSED, str(exc)) from None
        channel_id = record.channel_id
        current = self.current(channel_id)
        if current is None:
            raise Refusal(
                CloseCode.INVITE_REFUSED, "this node no longer takes part in that channel"
            )
        existing = current.doc.member(peer_id)
        roles = record.roles | (existing.roles if existing else frozenset())
        try:
            doc = current.doc.with_member(
                Member(node_id=peer_id, label=peer_id[:8], roles=roles), issued_at=now_ms()
            )
            await self._publish(channel_id, doc)
        except KacheryError as exc:
            raise Refusal(CloseCode.INVITE_REFUSED, f"cannot add the member: {exc}") from None
        log.info(
            "%s... joined channel %s with %s", peer_id[:16], self.name_of(channel_id), sorted(roles)
        )
        return channel_id

    async def joined(
        self,
        channel_id: str,
        name: str | None,
        wire_docs: Iterable[dict[str, Any]],
        suggested_name: str = "",
    ) -> str:
        """(Joiner) record a channel just joined, with the documents the admin sent.

        Raises:
            RemoteProtocolError: the documents are invalid or do not list this node.
            AlreadyExists: the local name is taken.
        """
        docs = [SignedDoc.from_wire(d) for d in wire_docs]
        history = ChannelHistory(channel_id)
        for d in sorted(docs, key=lambda d: d.doc.version):
            if history.accept(d) is Accepted.NEED_PREDECESSOR:
                raise RemoteProtocolError("the admin sent a broken chain of membership documents")
        current = history.current
        if current is None or current.doc.member(self.node_id) is None:
            raise RemoteProtocolError("the admin's membership document does not list this node")
        local: str = name or _default_name(
            suggested_name or current.doc.label, set(self._names.values())
        )
        _check_name(local)
        await self._run_sync(self.home.channels.add, channel_id, local)
        self._histories[channel_id] = history
        self._names[channel_id] = local
        await self._persist(channel_id)
        return local

    async def set_roles(self, name_or_id: str, node_id: str, roles: frozenset[Role]) -> SignedDoc:
        channel_id = self.resolve(name_or_id)
        current = self.current(channel_id)
        assert current is not None
        member = current.doc.member(node_id)
        if member is None:
            raise NotFound(
                f"{node_id[:16]}... is not a member of channel {self.name_of(channel_id)}"
            )
        doc = current.doc.with_member(
            Member(node_id=node_id, label=member.label, roles=roles), issued_at=now_ms()
        )
        return await self._publish(channel_id, doc)

    async def remove(self, name_or_id: str, node_id: str) -> SignedDoc:
        channel_id = self.resolve(name_or_id)
        current = self.current(channel_id)
        assert current is not None
        if current.doc.member(node_id) is None:
            raise NotFound(
                f"{node_id[:16]}... is not a member of channel {self.name_of(channel_id)}"
            )
        if node_id == self.node_id and self.home.key("channel", channel_id) is not None:
            raise InvalidInput("the owner's node cannot remove itself; use 'leave' on another node")
        return await self._publish(
            channel_id, current.doc.without_member(node_id, issued_at=now_ms())
        )

    async def leave(self, name_or_id: str) -> str:
        """Stop taking part in a channel here (it stays listed until an admin removes it)."""
        channel_id = self.resolve(name_or_id)
        await self._run_sync(self.home.channels.remove, channel_id)
        del self._histories[channel_id]
        del self._names[channel_id]
        if self.on_change is not None:
            await self.on_change(channel_id)
        return channel_id

    def describe(self, channel_id: str) -> dict[str, Any]:
        current = self.current(channel_id)
        doc = None if current is None else current.doc
        return {
            "channelId": channel_id,
            "name": self.name_of(channel_id),
            "label": "" if doc is None else doc.label,
            "version": 0 if doc is None else doc.version,
            "members": 0 if doc is None else len(doc.members),
            "roles": sorted(r.value for r in self.roles_of(channel_id, self.node_id)),
            "member": self.is_member(channel_id, self.node_id),
            "owner": self.home.key("channel", channel_id) is not None,
        }


def _check_name(name: str) -> None:
    if not name or len(name) > 100 or any(c.isspace() for c in name) or "/" in name:
        raise InvalidInput(f"channel name {name!r} must be 1-100 characters with no spaces or '/'")


def _default_name(label: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-") or "channel"
    name, n = base[:90], 2
    while name in taken:
        name, n = f"{base[:90]}-{n}", n + 1
    return name


__all__ = ["Membership", "parse_roles"]
