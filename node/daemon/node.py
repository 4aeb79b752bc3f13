"""The running node: listener, sessions, membership, gossip, dialer, and the local API.

``Node`` is the hub. It accepts and dials websockets, runs the handshake (admitting a peer only
if it shares a channel with this node, or redeems an invite), keeps one session per peer, routes
each incoming request through the membership and role check and then to the service registered
for its type, gossips membership documents and address announcements, and exposes the control
methods the local API serves (``status``, ``peers``, ``channel_*``).

``run_daemon`` is ``kachery-node start``: one node per home (a lock file refuses a second), the
local API on 127.0.0.1, ``daemon.json`` for clients, clean shutdown on Ctrl-C.

Non-goal: protocol rules (kachery.protocol) and persistence details (kachery.storage).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import trio

from kachery.node.changes import Changes, Doorbell
from kachery.node.daemon.boundary import PeerFaults
from kachery.node.daemon.membership import Membership, now_ms
from kachery.node.daemon.peer import (
    HandshakeFailed,
    PeerConnection,
    Refusal,
    handshake_as_initiator,
    handshake_as_responder,
)
from kachery.node.daemon.peer_manager import DIAL_INTERVAL, Backoff, DialTarget, plan_dials
from kachery.node.daemon.routes import DataHandler, RequestHandler, Route, peer_routes
from kachery.node.daemon.transport import DialError, Link, dial, listen
from kachery.node.errors import NodeError, NotPermitted, Unavailable, lone_error
from kachery.node.home import NodeHome
from kachery.node.localapi.methods import exposed
from kachery.node.services import Services
from kachery.protocol.channel import Accepted, Announcement, Invite, SignedDoc, parse_roles
from kachery.protocol.errors import CloseCode, InvalidInput, KacheryError, RemoteProtocolError
from kachery.protocol.messages import (
    ChannelLeave,
    DocAnnounce,
    DocPush,
    DocRequest,
    DocResponse,
    ErrorCode,
    ErrorReply,
    Message,
    MsgType,
    PeerAnnounce,
    PeerListRequest,
    PeerListResponse,
)
from kachery.protocol.session import (
    Admission,
    Claim,
    DataReceived,
    InitiatorIdentified,
    JoinProof,
    ResponderIdentified,
    Session,
)

log = logging.getLogger("kachery.node")

T = TypeVar("T")
LOCK_FILE = "daemon.lock"
_REFUSING_CODES = {
    CloseCode.INVITE_REFUSED,
    CloseCode.AUTHENTICATION_FAILED,
    CloseCode.NOT_A_MEMBER,
}
MAX_HANDSHAKING = 64
"""Inbound connections still in their handshake at once (unauthenticated: anyone can open one);
more are closed at once, so a flood cannot hold memory or the event loop."""

MAX_HANDSHAKING_PER_HOST = 8
"""The same, from one address: one host cannot take every slot."""

ANNOUNCE_REFRESH_SECONDS = 600.0
"""A node re-signs and re-gossips its address announcement this often."""


class Node:
    """A kachery node running inside a Trio nursery (see ``run``).

    Args:
        home: the node home.
        listen_host, listen_port: where to accept peers (port 0 picks a free one).
        announce: addresses to tell peers; by default derived from the listen address.
        max_upload_rate: cap on the bytes per second this node serves to peers (None: none).
    """

    def __init__(
        self,
        home: NodeHome,
        *,
        listen_host: str = "0.0.0.0",
        listen_port: int = 20432,
        announce: list[str] | None = None,
        max_upload_rate: float | None = None,
    ) -> None:
        self.home = home
        self.key = home.keypair
        self.node_id = home.node_id
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.max_upload_rate = max_upload_rate
        self._announce_config = list(announce or [])
        self.addresses: list[str] = []
        self.db_limiter = trio.CapacityLimiter(4)
        self.membership = Membership(home, self.run_sync)
        self.membership.on_change = self._on_channel_change
        self.connections: dict[str, PeerConnection] = {}
        self.faults = PeerFaults()
        """Where whatever goes wrong while serving one peer is contained and counted."""
        self._handshaking: dict[str, int] = {}
        self.refused_handshakes = 0
        self._nursery: trio.Nursery | None = None
        self._dialing: set[str] = set()
        self._backoff: dict[str, Backoff] = {}
        self._self_addresses: set[str] = set()
        self._announcements: dict[str, Announcement] = {}
        self._my_announcement: Announcement | None = None
        self._wake_dialer = Doorbell()
        self.changes = Changes()
        self._pending_join_names: dict[bytes, str | None] = {}
        self.started_at = time.time()
        self.shutdown_requested = trio.Event()
        self.unpermitted_messages = 0
        """One-way messages dropped because their sender lacks the role the route needs."""
        self.services = Services.build(self, max_upload_rate=max_upload_rate)
        self.routes: dict[MsgType, Route] = peer_routes(self, self.services)
        """Every peer message this node serves (node/daemon/routes.py)."""
        self.on_data: DataHandler = self.services.files.on_data

    # -- plumbing ------------------------------------------------------------------------------

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage call in a worker thread (bounded by ``db_limiter``)."""
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.db_limiter)

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background, in the node's nursery."""
        self.nursery.start_soon(fn, *args)

    def notify(self) -> None:
        """Wake everyone waiting in ``wait_until`` (state changed)."""
        self.changes.notify()

    def sessions_in(self, channel: str) -> list[PeerConnection]:
        """Open sessions that serve ``channel``."""
        return [c for c in self.connections.values() if channel in c.channels]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (without polling) until ``predicate()`` holds after some state change."""
        await self.changes.wait_until(predicate)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the node is not running"
        return self._nursery

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, load state, and keep sessions with channel members until cancelled."""
        await self.membership.load()
        for announcement in await self.run_sync(self.home.channels.announcements):
            self._announcements[announcement.node_id] = announcement
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            port = await self._listen(nursery)
            self.listen_port = port
            self.addresses = self._announce_config or default_addresses(self.listen_host, port)
            self._self_addresses = set(self.addresses) | {f"ws://127.0.0.1:{port}"}
            self._refresh_announcement()
            for service in self.services.all():
                await nursery.start(service.run)
            nursery.start_soon(self._dialer)
            nursery.start_soon(self._announcer)
            log.info(
                "node %s listening on %s:%d, reachable at %s",
                self.node_id[:16],
                self.listen_host,
                port,
                ", ".join(self.addresses),
            )
            task_status.started(port)

    async def _listen(self, nursery: trio.Nursery) -> int:
        """Start accepting peers on the listen address; returns the bound port.

        Raises:
            NodeError: the address cannot be bound (in use, not this host's, no permission).
        """
        start = functools.partial(
            listen, self._on_inbound, self.listen_host, self.listen_port, faults=self.faults
        )
        try:
            try:
                port: int = await nursery.start(start)
            except BaseExceptionGroup as group:
                raise lone_error(group) from None
        except OSError as exc:
            address = f"{self.listen_host}:{self.listen_port}"
            hint = "is another daemon running? " if exc.errno == errno.EADDRINUSE else ""
            raise NodeError(
                f"cannot listen for peers on {address}: {exc.strerror or exc}"
                f" ({hint}choose another address with --listen)"
            ) from None
        return port

    def _refresh_announcement(self) -> None:
        self._my_announcement = Announcement.create(self.key, self.addresses, now_ms())
        self._announcements[self.node_id] = self._my_announcement

    async def _announcer(self) -> None:
        while True:
            await trio.sleep(ANNOUNCE_REFRESH_SECONDS)
            self._refresh_announcement()
            for conn in list(self.connections.values()):
                for channel in conn.channels:
                    await conn.send_quietly(self._announce_message(channel, only_self=True))

    # -- sessions ------------------------------------------------------------------------------

    async def _on_inbound(self, link: Link) -> None:
        host = link.remote
        if (
            sum(self._handshaking.values()) >= MAX_HANDSHAKING
            or self._handshaking.get(host, 0) >= MAX_HANDSHAKING_PER_HOST
        ):
            self.refused_handshakes += 1
            await link.close(CloseCode.GOING_AWAY, "too many handshakes at once; retry later")
            return
        self._handshaking[host] = self._handshaking.get(host, 0) + 1
        try:
            session, identified, admission = await handshake_as_responder(
                link, self.key, observed_address=link.remote, admit=self._admit
            )
        except HandshakeFailed as exc:
            log.info("inbound session not opened: %s", exc)
            return
        finally:
            left = self._handshaking.pop(host) - 1
            if left:
                self._handshaking[host] = left
        if not admission.channels:  # a former member, told of its removal (_removal_news)
            log.info("told %s... it was removed from a channel", identified.node_id[:16])
            await link.close(CloseCode.NOT_A_MEMBER, "not a member of a shared channel any more")
            return
        conn = PeerConnection(
            link,
            session,
            direction="inbound",
            channels=set(admission.channels),
            handlers=self,
            listen_addresses=identified.claim.addresses,
        )
        await self._run_connection(conn)

    async def _admit(self, session: Session, identified: InitiatorIdentified) -> Admission:
        peer, claim = identified.node_id, identified.claim
        if peer == self.node_id:
            raise Refusal(CloseCode.GOING_AWAY, "a node cannot connect to itself")
        if claim.join is not None:
            channel = await self.membership.admit_joiner(
                peer, claim.join.invite_id, claim.join.proof, session.transcript_hash
            )
            docs = self.membership.history(channel).docs_after(0)
            return Admission(
                channels=(channel,),
                docs=tuple(d.to_wire() for d in docs),
                addresses=tuple(self.addresses),
            )
        await self._accept_claimed_docs(claim.docs, concerning=peer)
        channels = self.membership.shared_channels(peer, among=claim.channels)
        if not channels:
            news = self._removal_news(peer, claim)
            if news:  # the session opens only to tell it; both sides then close it
                return Admission(docs=tuple(news))
            raise Refusal(
                CloseCode.NOT_A_MEMBER,
                f"node {peer[:16]}... is not a member of any channel this node takes part in",
            )
        return Admission(
            channels=tuple(sorted(channels)),
            docs=tuple(self._current_docs(channels)),
            addresses=tuple(self.addresses),
        )

    def _removal_news(self, peer: str, claim: Claim) -> list[dict[str, Any]]:
        """For a node removed from claimed channels while it was away: the signed documents
        after the one it holds, up to the one that removes it (none later: it is not told who
        joined since). Without them it would re-dial their members, refused, for ever. Only a
        node that shows a document of ours listing it as a member is told anything."""
        news: list[dict[str, Any]] = []
        for wire in claim.docs:
            try:
                held = SignedDoc.from_wire(wire)
            except KacheryError:
                continue  # _accept_claimed_docs logged it
            channel, version = held.doc.channel_id, held.doc.version
            if (
                channel not in claim.channels
                or not self.membership.has(channel)
                or not self.membership.is_member(channel, self.node_id)
                or self.membership.is_member(channel, peer)
            ):
                continue
            later = self.membership.history(channel).docs_after(version - 1)
            if not later or later[0].signature != held.signature:
                continue  # not a document of this chain
            if held.doc.member(peer) is None:
                continue  # it was not a member then either
            for signed in later[1:]:
                news.append(signed.to_wire())
                if signed.doc.member(peer) is None:
                    break
        return news

    async def _accept_claimed_docs(
        self, wire_docs: tuple[dict[str, Any], ...], *, concerning: str | None = None
    ) -> None:
        """Take the documents a peer shows in its handshake, for channels this node is in.

        A dialer's documents are taken before it is admitted (it may have joined through an
        admin this node has not heard from since), but only a channel's documents whose newest
        lists the dialer (``concerning``) as a member: a stranger's documents change nothing.
        The usual rules then apply (signatures, authority, a removal stands)."""
        by_channel: dict[str, list[SignedDoc]] = {}
        for wire in wire_docs:
            try:
                signed = SignedDoc.from_wire(wire)
            except KacheryError as exc:
                log.debug("ignored a document offered in a handshake: %s", exc)
                continue
            if self.membership.has(signed.doc.channel_id):
                by_channel.setdefault(signed.doc.channel_id, []).append(signed)
        for channel, docs in by_channel.items():
            newest = max(docs, key=lambda d: d.doc.version)
            if concerning is not None and newest.doc.member(concerning) is None:
                continue
            try:
                await self.membership.accept_signed(channel, docs)
            except KacheryError as exc:
                log.debug("ignored documents offered in a handshake: %s", exc)

    def _current_docs(self, channels: set[str]) -> list[dict[str, Any]]:
        docs = []
        for c in sorted(channels):
            current = self.membership.current(c)
            if current is not None:
                docs.append(current.to_wire())
        return docs

    def _claim_for(self, identified: ResponderIdentified) -> Claim:
        channels = self.membership.shared_channels(identified.node_id)
        if not channels:  # a bootstrap address: offer every active channel; the peer intersects
            channels = set(self.membership.active_channels())
        return Claim(
            channels=tuple(sorted(channels)),
            docs=tuple(self._current_docs(channels)),
            addresses=tuple(self.addresses),
        )

    async def connect(
        self, address: str, *, expected_peer: str | None = None, invite: Invite | None = None
    ) -> PeerConnection:
        """Dial ``address`` and open a session (redeeming ``invite`` if given).

        The session then runs in the node's nursery; this returns once it is established.

        Raises:
            DialError, HandshakeFailed: unreachable, refused (with the reason), or not a member.
        """
        conn: PeerConnection = await self.nursery.start(
            self._outbound, address, expected_peer, invite
        )
        return conn

    async def _outbound(
        self,
        address: str,
        expected_peer: str | None,
        invite: Invite | None,
        task_status: trio.TaskStatus[PeerConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with dial(address) as link:
            conn = await self._open_outbound(link, address, expected_peer, invite)
            task_status.started(conn)
            with self.faults.contain(conn.node_id, "session with"):
                await self._run_connection(conn)

    async def _open_outbound(
        self, link: Link, address: str, expected_peer: str | None, invite: Invite | None
    ) -> PeerConnection:
        def make_claim(session: Session, identified: ResponderIdentified) -> Claim:
            if invite is None:
                return self._claim_for(identified)
            proof = JoinProof(
                invite_id=invite.invite_id, proof=invite.proof(session.transcript_hash)
            )
            return Claim(channels=(invite.channel_id,), join=proof, addresses=tuple(self.addresses))

        session, identified, admission = await handshake_as_initiator(
            link, self.key, expected_peer=expected_peer, make_claim=make_claim
        )
        peer = identified.node_id
        if invite is not None:
            if invite.channel_id not in admission.channels:
                await link.close(CloseCode.PROTOCOL_ERROR, "join not confirmed")
                raise HandshakeFailed(f"{address} did not confirm the join")
            name = self._pending_join_names.pop(invite.invite_id, None)
            try:
                await self.membership.joined(
                    invite.channel_id, name, admission.docs, suggested_name=invite.name
                )
            except KacheryError as exc:
                await link.close(CloseCode.PROTOCOL_ERROR, str(exc))
                raise
        else:
            await self._accept_claimed_docs(admission.docs)
        channels = self.membership.shared_channels(peer, among=admission.channels)
        if not channels:
            await link.close(CloseCode.NOT_A_MEMBER, "no shared channel")
            raise HandshakeFailed(f"{peer[:16]}... at {address} shares no channel with this node")
        return PeerConnection(
            link,
            session,
            direction="outbound",
            channels=channels,
            handlers=self,
            listen_addresses=admission.addresses,
        )

    async def _run_connection(self, conn: PeerConnection) -> None:
        existing = self.connections.get(conn.node_id)
        if existing is not None and not existing.closed.is_set():
            keep_new = (conn.direction == "outbound") == (self.node_id < conn.node_id)
            loser = existing if keep_new else conn
            await_close = loser is conn
            if await_close:
                await conn.link.close(CloseCode.GOING_AWAY, "duplicate connection")
                return
            self.nursery.start_soon(loser.close, CloseCode.GOING_AWAY, "duplicate connection")
        self.connections[conn.node_id] = conn
        self._backoff.pop(conn.node_id, None)
        log.info(
            "session with %s... (%s, %s) serving %s",
            conn.node_id[:16],
            conn.direction,
            conn.address,
            ", ".join(self.membership.name_of(c) for c in sorted(conn.channels)),
        )
        self.notify()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._greet, conn)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            if self.connections.get(conn.node_id) is conn:
                del self.connections[conn.node_id]
            why = " ".join(str(part) for part in (conn.close_code, conn.close_reason) if part)
            log.info("session with %s... ended%s", conn.node_id[:16], f" ({why})" if why else "")
            self.notify()
            self._wake_dialer.ring()

    async def _greet(self, conn: PeerConnection) -> None:
        await self.run_sync(self.home.channels.mark_connected, conn.node_id)
        for channel in sorted(conn.channels):
            await conn.send_quietly(self._announce_message(channel))
            history = self.membership.history(channel)
            await conn.send_quietly(DocAnnounce(channel=channel, version=history.version))

    # -- dialing -------------------------------------------------------------------------------

    def _known_addresses(self) -> dict[str, list[str]]:
        found = {n: list(a.addresses) for n, a in self._announcements.items()}
        for node_id, conn in self.connections.items():
            found.setdefault(node_id, list(conn.listen_addresses))
        return found

    async def _dialer(self) -> None:
        rng = random.Random()
        while True:
            targets = plan_dials(
                now=time.monotonic(),
                wanted=self.membership.members_to_reach(),
                addresses=self._known_addresses(),
                bootstrap={
                    c: self.membership.bootstrap_addresses(c)
                    for c in self.membership.active_channels()
                },
                connected=set(self.connections),
                connected_channels={c for conn in self.connections.values() for c in conn.channels},
                in_progress=set(self._dialing),
                backoff=self._backoff,
                own_addresses=self._self_addresses,
            )
            for target in targets:
                self._dialing.add(target.key)
                self.nursery.start_soon(self._dial_target, target, rng.random())
            await self._wake_dialer.wait(deadline=trio.current_time() + DIAL_INTERVAL)

    async def _dial_target(self, target: DialTarget, jitter: float) -> None:
        with self.faults.contain(target.node_id or target.address, "dial of"):
            await self._dial_once(target, jitter)

    async def _dial_once(self, target: DialTarget, jitter: float) -> None:
        try:
            await self.connect(target.address, expected_peer=target.node_id)
        except (DialError, HandshakeFailed) as exc:
            log.debug("dial %s failed: %s", target.address, exc)
            self._backoff.setdefault(target.key, Backoff()).failed(time.monotonic(), jitter)
            if isinstance(exc, HandshakeFailed) and "cannot connect to itself" in str(exc):
                self._self_addresses.add(target.address)
        except KacheryError as exc:
            log.info("dial %s failed: %s", target.address, exc)
            self._backoff.setdefault(target.key, Backoff()).failed(time.monotonic(), jitter)
        finally:
            self._dialing.discard(target.key)

    # -- incoming messages (the Handlers protocol of PeerConnection) ----------------------------

    def check(self, conn: PeerConnection, msg: Message) -> ErrorReply | None:
        request_id = getattr(msg, "id", 0)
        channel = getattr(msg, "channel", None)
        route = self.routes.get(msg.TYPE)
        if route is None or not route.request:
            return ErrorReply(
                id=request_id,
                code=ErrorCode.UNSUPPORTED,
                message=f"{type(msg).__name__} is not served",
            )
        if channel is None or channel not in conn.channels:
            return ErrorReply(
                id=request_id,
                code=ErrorCode.NOT_A_MEMBER,
                message="this session does not serve that channel",
            )
        role = route.role
        if role is not None and role not in self.membership.roles_of(channel, conn.node_id):
            return ErrorReply(
                id=request_id,
                code=ErrorCode.NOT_PERMITTED,
                message=(
                    f"not permitted: node {conn.node_id[:16]}... lacks role {role.value} in channel"
                    f" {self.membership.name_of(channel)}"
                ),
            )
        return None

    async def handle_request(self, conn: PeerConnection, msg: Message) -> Message:
        handler = cast(RequestHandler, self.routes[msg.TYPE].handler)  # check() saw a request
        return await handler(conn, msg)

    async def handle_message(self, conn: PeerConnection, msg: Message) -> None:
        route = self.routes.get(msg.TYPE)
        if route is None or route.request:
            return  # a type this node does not serve, or a request sent without an ID
        if route.role is not None:
            channel = getattr(msg, "channel", None)
            if channel not in conn.channels or route.role not in self.membership.roles_of(
                channel, conn.node_id
            ):
                self.unpermitted_messages += 1
                return
        await route.handler(conn, msg)

    async def handle_data(self, conn: PeerConnection, event: DataReceived) -> None:
        await self.on_data(conn, event)

    # -- membership gossip ---------------------------------------------------------------------

    async def on_doc_request(self, conn: PeerConnection, msg: DocRequest) -> DocResponse:
        docs = self.membership.history(msg.channel).docs_after(msg.after)
        return DocResponse(id=msg.id, docs=[d.to_wire() for d in docs])

    async def on_doc_push(self, conn: PeerConnection, msg: DocPush) -> None:
        await self._take_docs(conn, msg.channel, msg.docs)

    async def on_doc_announce(self, conn: PeerConnection, msg: DocAnnounce) -> None:
        if (
            self.membership.has(msg.channel)
            and msg.version > self.membership.history(msg.channel).version
        ):
            await self._fetch_docs(conn, msg.channel)

    async def _take_docs(
        self, conn: PeerConnection, channel: str, docs: list[dict[str, Any]]
    ) -> None:
        if not self.membership.has(channel):
            return
        try:
            outcome = await self.membership.accept_docs(channel, docs)
        except RemoteProtocolError as exc:
            log.warning("rejected a membership document from %s...: %s", conn.node_id[:16], exc)
            return
        if outcome is Accepted.NEED_PREDECESSOR:
            await self._fetch_docs(conn, channel)

    async def _fetch_docs(self, conn: PeerConnection, channel: str) -> None:
        after = 0  # ask for the whole chain: the peer's branch may differ from ours
        try:
            reply = await conn.request(DocRequest(id=0, channel=channel, after=after))
        except KacheryError as exc:
            log.debug("could not fetch documents from %s...: %s", conn.node_id[:16], exc)
            return
        reply = cast(DocResponse, reply)  # request() checked it
        try:
            await self.membership.accept_docs(channel, reply.docs)
        except RemoteProtocolError as exc:
            log.warning("rejected membership documents from %s...: %s", conn.node_id[:16], exc)

    async def _on_channel_change(self, channel: str) -> None:
        """A channel's document changed (or this node left it): gossip and re-check sessions."""
        current = self.membership.current(channel)
        push = None if current is None else DocPush(channel=channel, docs=[current.to_wire()])
        for conn in list(self.connections.values()):
            before = set(conn.channels)
            after = self.membership.shared_channels(conn.node_id)
            if push is not None and (channel in before or channel in after):
                await conn.send_quietly(push)  # removed members learn it too
            conn.channels = after
            if not after:
                label = self.membership.name_of(channel)
                self.nursery.start_soon(
                    conn.close,
                    CloseCode.MEMBER_REMOVED,
                    f"no longer a member of a shared channel ({label})",
                )
            elif channel in after and channel not in before:
                await conn.send_quietly(self._announce_message(channel))
        self.notify()
        self._wake_dialer.ring()

    def _announce_message(self, channel: str, *, only_self: bool = False) -> PeerAnnounce:
        current = self.membership.current(channel)
        members = set() if current is None else {m.node_id for m in current.doc.members}
        chosen = (
            [self._my_announcement]
            if only_self
            else [a for n, a in self._announcements.items() if n in members]
        )
        return PeerAnnounce(
            channel=channel, announcements=[a.to_wire() for a in chosen if a is not None]
        )

    async def on_peer_announce(self, conn: PeerConnection, msg: PeerAnnounce) -> None:
        if msg.channel not in conn.channels:
            return
        current = self.membership.current(msg.channel)
        if current is None:
            return
        fresh = []
        for wire in msg.announcements[:1000]:
            try:
                announcement = Announcement.from_wire(wire)
            except RemoteProtocolError as exc:
                log.info("bad announcement from %s...: %s", conn.node_id[:16], exc)
                continue
            if current.doc.member(announcement.node_id) is None:
                continue  # only members' addresses travel in a channel
            held = self._announcements.get(announcement.node_id)
            if held is not None and held.timestamp >= announcement.timestamp:
                continue
            if announcement.node_id == self.node_id:
                continue
            self._announcements[announcement.node_id] = announcement
            await self.run_sync(self.home.channels.save_announcement, announcement)
            fresh.append(announcement)
        if not fresh:
            return
        relay = PeerAnnounce(channel=msg.channel, announcements=[a.to_wire() for a in fresh])
        for other in list(self.connections.values()):
            if other is not conn and msg.channel in other.channels:
                await other.send_quietly(relay)
        self.notify()
        self._wake_dialer.ring()

    async def on_peer_list_request(
        self, conn: PeerConnection, msg: PeerListRequest
    ) -> PeerListResponse:
        return PeerListResponse(
            id=msg.id, announcements=self._announce_message(msg.channel).announcements
        )

    async def on_channel_leave(self, conn: PeerConnection, msg: ChannelLeave) -> None:
        conn.channels.discard(msg.channel)
        if not conn.channels:
            await conn.close(CloseCode.NORMAL, "no shared channel left")

    # -- control methods (served by the local API) ---------------------------------------------

    @exposed
    async def status(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "home": str(self.home.path),
            "listen": f"{self.listen_host}:{self.listen_port}",
            "addresses": self.addresses,
            "pid": os.getpid(),
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "peers": len(self.connections),
            **self.faults.statistics(),
            "handshakesRefusedBusy": self.refused_handshakes,
            "messagesRefusedRole": self.unpermitted_messages,
            "channels": [self.membership.describe(c) for c in self.membership.channel_ids()],
            **{s.name: s.statistics() for s in self.services.all()},
        }

    @exposed
    async def peers(self) -> list[dict[str, Any]]:
        result = []
        for conn in sorted(self.connections.values(), key=lambda c: c.node_id):
            stats = conn.statistics()
            stats["channels"] = [self.membership.name_of(c) for c in sorted(conn.channels)]
            result.append(stats)
        return result

    @exposed
    async def channel_create(self, name: str, label: str | None = None) -> dict[str, Any]:
        channel = await self.membership.create(name, label, self.addresses)
        return self.membership.describe(channel)

    @exposed
    async def channel_invite(
        self,
        name: str,
        roles: list[str],
        expires_seconds: float | None = None,
        uses: int | None = None,
    ) -> dict[str, Any]:
        token = await self.membership.invite(
            name,
            parse_roles(roles),
            expires_seconds=expires_seconds,
            uses=uses,
            addresses=self.addresses,
        )
        return {"token": token}

    @exposed
    async def channel_join(self, token: str, name: str | None = None) -> dict[str, Any]:
        invite = Invite.from_token(token)
        if invite.expires_at and now_ms() >= invite.expires_at:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(invite.expires_at / 1000))
            raise InvalidInput(f"this invite expired at {when}: ask for a new one")
        if self.membership.has(invite.channel_id) and self.membership.is_member(
            invite.channel_id, self.node_id
        ):
            return self.membership.describe(invite.channel_id)
        errors: list[str] = []
        refused = False
        for address in invite.bootstrap:
            self._pending_join_names[invite.invite_id] = name
            try:
                await self.connect(address, expected_peer=invite.admin_id, invite=invite)
            except HandshakeFailed as exc:
                if exc.code == CloseCode.AUTHENTICATION_FAILED and "dialed node" in str(exc):
                    errors.append(
                        f"the node at {address} is not the admin this invite names"
                        " (a forged invite, or a stale address)"
                    )
                else:
                    errors.append(str(exc))
                refused = refused or exc.code in _REFUSING_CODES
                continue
            except DialError as exc:
                errors.append(str(exc))
                continue
            finally:
                self._pending_join_names.pop(invite.invite_id, None)
            self.notify()
            return self.membership.describe(invite.channel_id)
        if refused:
            raise NotPermitted("invite refused: " + "; ".join(errors))
        raise Unavailable("could not join: " + "; ".join(errors or ["the invite lists no address"]))

    @exposed
    async def channel_list(self) -> list[dict[str, Any]]:
        return [self.membership.describe(c) for c in self.membership.channel_ids()]

    @exposed
    async def channel_members(self, name: str) -> dict[str, Any]:
        channel = self.membership.resolve(name)
        current = self.membership.current(channel)
        members = (
            []
            if current is None
            else [
                {
                    **m.to_wire(),
                    "connected": m.node_id in self.connections,
                    "self": m.node_id == self.node_id,
                }
                for m in current.doc.members
            ]
        )
        return {**self.membership.describe(channel), "members": members}

    @exposed
    async def channel_set_roles(self, name: str, node_id: str, roles: list[str]) -> dict[str, Any]:
        signed = await self.membership.set_roles(name, node_id, parse_roles(roles))
        return {"version": signed.doc.version}

    @exposed
    async def channel_remove(self, name: str, node_id: str) -> dict[str, Any]:
        signed = await self.membership.remove(name, node_id)
        return {"version": signed.doc.version}

    @exposed
    async def channel_leave(self, name: str) -> dict[str, Any]:
        channel = self.membership.resolve(name)
        for conn in list(self.connections.values()):
            if channel in conn.channels:
                await conn.send_quietly(ChannelLeave(channel=channel))
        await self.membership.leave(name)
        return {"channelId": channel}

    @exposed
    async def wait_peers(
        self, node_ids: list[str] | None = None, count: int = 1, within_seconds: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait until connected to all of ``node_ids`` (or to ``count`` peers); return the peers.

        Raises:
            Unavailable: not so within ``within_seconds``.
        """
        wanted = set(node_ids or [])

        def ready() -> bool:
            connected = set(self.connections)
            return wanted <= connected if wanted else len(connected) >= count

        with trio.move_on_after(within_seconds):
            await self.wait_until(ready)
        if not ready():
            have = len(self.connections)
            if wanted:
                missing = ", ".join(n[:16] + "..." for n in sorted(wanted - set(self.connections)))
                raise Unavailable(
                    f"not connected to {missing} within {within_seconds:g} s"
                    f" ({have} peer{'' if have == 1 else 's'} connected)"
                )
            raise Unavailable(f"only {have} of {count} peers connected within {within_seconds:g} s")
        return await self.peers()

    @exposed
    async def shutdown(self) -> dict[str, Any]:
        self.shutdown_requested.set()
        return {"stopping": True}


def default_addresses(host: str, port: int) -> list[str]:
    """Where peers can reach a node listening on ``host:port``, if not told (``--announce``)."""
    if host not in ("", "0.0.0.0", "::"):
        return [f"ws://{host}:{port}"]
    found = []
    try:
        for ip in socket.gethostbyname_ex(socket.gethostname())[2]:
            if not ip.startswith("127."):
                found.append(f"ws://{ip}:{port}")
    except OSError:
        pass
    return found or [f"ws://127.0.0.1:{port}"]


# -- kachery-node start ----------------------------------------------------------------------------


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


async def _stop_on_signals(
    node: Node, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ctrl-C (SIGINT) or SIGTERM (a service manager) starts an orderly shutdown.

    Handling the signal here, rather than letting Trio raise KeyboardInterrupt wherever the
    daemon happens to be (inside hypercorn, mid-request), makes the stop deterministic. Once the
    first signal is handled the default behaviour returns: a second Ctrl-C interrupts at once.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s received: stopping", signal.Signals(signum).name)
            node.shutdown_requested.set()
            return


def tune_malloc() -> bool:
    """Let glibc serve the daemon's large, short-lived buffers from its heap.

    By default glibc maps every buffer over 128 KiB fresh from the kernel and unmaps it when
    freed, so each 256 KiB websocket frame costs ~100 page faults; measured here (two processes
    over loopback, AEGIS and SHA-1 per frame) that halves to quarters session throughput. Raising
    the mmap threshold to 4 MiB and the trim threshold to 16 MiB keeps them in the heap, at the
    price of up to 16 MiB of freed memory held. Returns False where it does not apply (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20) and mallopt(_M_TRIM_THRESHOLD, 16 << 20))


@contextmanager
def daemon_lock(home: NodeHome) -> Iterator[None]:
    """Hold the home's daemon lock, or raise NodeError naming the daemon that holds it."""
    path = home.path / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise NodeError(
                f"a kachery-node daemon is already running for {home.path} (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


async def serve_node(
    home: NodeHome,
    *,
    listen: str,
    api_port: int,
    announce: list[str],
    verbose: bool = False,
    max_upload_rate: float | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node and its local API until cancelled or asked to shut down."""
    from kachery.node.localapi.contract import (
        ensure_client_auth,
        remove_daemon_info,
        write_daemon_info,
    )
    from kachery.node.localapi.methods import methods_of
    from kachery.node.localapi.server import serve_api

    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidInput(f"--listen {listen!r} is not HOST:PORT") from None
    node = Node(
        home,
        listen_host=host or "0.0.0.0",
        listen_port=port,
        announce=announce,
        max_upload_rate=max_upload_rate,
    )
    token = ensure_client_auth(home.path)
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        bound_api = await nursery.start(
            functools.partial(
                serve_api,
                methods_of(node, *node.services.all()),
                node_id=node.node_id,
                token=token,
                port=api_port,
                verbose=verbose,
                locate=home.files.locate,
            )
        )
        write_daemon_info(
            home.path,
            {
                "pid": os.getpid(),
                "apiPort": bound_api,
                "nodeId": node.node_id,
                "listen": f"{node.listen_host}:{node.listen_port}",
            },
        )
        if threading.current_thread() is threading.main_thread():
            await nursery.start(_stop_on_signals, node)
        log.info("local API on 127.0.0.1:%d", bound_api)
        task_status.started(node)
        try:
            await node.shutdown_requested.wait()
        finally:
            remove_daemon_info(home.path)
            nursery.cancel_scope.cancel()


def run_daemon(
    home: NodeHome,
    *,
    listen: str,
    api_port: int,
    announce: list[str],
    verbose: bool,
    max_upload_rate: float | None = None,
) -> None:
    """``kachery-node start``: run in the foreground until Ctrl-C (or the ``shutdown`` call).

    Raises:
        KacheryError: the node could not start (home locked, port busy, bad address), as itself
            rather than inside the exception group that Trio's nurseries wrap errors in.
    """
    logging.getLogger("kachery").setLevel(logging.DEBUG if verbose else logging.INFO)
    tune_malloc()
    with daemon_lock(home):
        home.files.blobs.clean_temp()
        run = functools.partial(
            serve_node,
            home,
            listen=listen,
            api_port=api_port,
            announce=announce,
            verbose=verbose,
            max_upload_rate=max_upload_rate,
        )
        try:
            trio.run(run)
        except BaseException as exc:
            error = lone_error(exc)
            if isinstance(error, KeyboardInterrupt):
                log.info("stopped (Ctrl-C)")
                return
            if isinstance(error, KacheryError):
                raise error from None
            raise
        log.info("stopped")
