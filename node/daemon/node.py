"""The running node: listener, sessions, admission, routing, membership gossip and dialer.

``Node`` is the hub. It accepts and dials websockets, runs the handshake (admitting a peer only
if it shares a channel with this node, or redeems an invite), keeps one session per peer, checks
each incoming message against the table of routes (routes.py: the session must serve its
channel, the sender hold the role) and hands it to its handler, gossips membership documents and
address announcements (addresses.py), and dials the members it should hold sessions with. Its
services see it through ``kachery.node.services.host.Host``; its control methods are control.py;
the process around it (``kachery-node start``) is process.py.

Non-goal: protocol rules (kachery.protocol) and persistence details (kachery.storage).
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import trio

from kachery.node.changes import Changes, Doorbell
from kachery.node.daemon.addresses import AddressBook
from kachery.node.daemon.boundary import PeerFaults
from kachery.node.daemon.membership import Membership
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
from kachery.node.errors import NodeError, lone_error
from kachery.node.home import NodeHome
from kachery.node.services import Services
from kachery.protocol.channel import Accepted, Invite, SignedDoc
from kachery.protocol.errors import CloseCode, KacheryError, RemoteProtocolError
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
        self.address_book = AddressBook(home, self.run_sync)
        self._wake_dialer = Doorbell()
        self.changes = Changes()
        self.started_at = time.time()
        self.shutdown_requested = trio.Event()
        self.unpermitted_messages = 0
        """One-way messages dropped because their sender lacks the role the route needs."""
        self.services = Services.build(self, max_upload_rate=max_upload_rate)
        self.routes: dict[MsgType, Route] = peer_routes(self, self.services)
        """Every peer message this node serves (node/daemon/routes.py)."""
        self.on_data: DataHandler = self.services.files.fetcher.on_data

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
        await self.address_book.load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            port = await self._listen(nursery)
            self.listen_port = port
            self.addresses = self._announce_config or default_addresses(self.listen_host, port)
            self._self_addresses = set(self.addresses) | {f"ws://127.0.0.1:{port}"}
            self.address_book.refresh(self.addresses)
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

    async def _announcer(self) -> None:
        while True:
            await trio.sleep(ANNOUNCE_REFRESH_SECONDS)
            self.address_book.refresh(self.addresses)
            for conn in list(self.connections.values()):
                for channel in conn.channels:
                    conn.send_quietly(self._announce_message(channel, only_self=True))

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
        self,
        address: str,
        *,
        expected_peer: str | None = None,
        invite: Invite | None = None,
        join_name: str | None = None,
    ) -> PeerConnection:
        """Dial ``address`` and open a session (redeeming ``invite`` if given, to join its
        channel under ``join_name``, by default the name the invite suggests).

        The session then runs in the node's nursery; this returns once it is established.

        Raises:
            DialError, HandshakeFailed: unreachable, refused (with the reason), or not a member.
        """
        conn: PeerConnection = await self.nursery.start(
            self._outbound, address, expected_peer, invite, join_name
        )
        return conn

    async def _outbound(
        self,
        address: str,
        expected_peer: str | None,
        invite: Invite | None,
        join_name: str | None,
        task_status: trio.TaskStatus[PeerConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with dial(address) as link:
            conn = await self._open_outbound(link, address, expected_peer, invite, join_name)
            task_status.started(conn)
            with self.faults.contain(conn.node_id, "session with"):
                await self._run_connection(conn)

    async def _open_outbound(
        self,
        link: Link,
        address: str,
        expected_peer: str | None,
        invite: Invite | None,
        join_name: str | None,
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
            try:
                await self.membership.joined(
                    invite.channel_id, join_name, admission.docs, suggested_name=invite.name
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
            conn.send_quietly(self._announce_message(channel))
            history = self.membership.history(channel)
            conn.send_quietly(DocAnnounce(channel=channel, version=history.version))

    # -- dialing -------------------------------------------------------------------------------

    def _known_addresses(self) -> dict[str, list[str]]:
        found = {n: list(a.addresses) for n, a in self.address_book.by_node.items()}
        for node_id, conn in self.connections.items():
            found.setdefault(node_id, list(conn.listen_addresses))
        return found

    async def _dialer(self) -> None:
        rng = random.Random()
        while True:
            targets = plan_dials(
                now=trio.current_time(),
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
            self._backoff.setdefault(target.key, Backoff()).failed(trio.current_time(), jitter)
            if isinstance(exc, HandshakeFailed) and "cannot connect to itself" in str(exc):
                self._self_addresses.add(target.address)
        except KacheryError as exc:
            log.info("dial %s failed: %s", target.address, exc)
            self._backoff.setdefault(target.key, Backoff()).failed(trio.current_time(), jitter)
        finally:
            self._dialing.discard(target.key)

    # -- incoming messages (the Handlers protocol of PeerConnection) ----------------------------

    def check(self, conn: PeerConnection, msg: Message) -> ErrorReply | None:
        request_id = getattr(msg, "id", 0)
        channel = getattr(msg, "channel", None)
        route = self.routes.get(msg.TYPE)
        if route is None or msg.REPLY_TYPE is None:
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
        if route is None or msg.REPLY_TYPE is not None:
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
                conn.send_quietly(push)  # removed members learn it too
            conn.channels = after
            if not after:
                label = self.membership.name_of(channel)
                self.nursery.start_soon(
                    conn.close,
                    CloseCode.MEMBER_REMOVED,
                    f"no longer a member of a shared channel ({label})",
                )
            elif channel in after and channel not in before:
                conn.send_quietly(self._announce_message(channel))
        self.notify()
        self._wake_dialer.ring()

    def _announce_message(self, channel: str, *, only_self: bool = False) -> PeerAnnounce:
        current = self.membership.current(channel)
        doc = None if current is None else current.doc
        return self.address_book.message(channel, doc, only_self=only_self)

    async def on_peer_announce(self, conn: PeerConnection, msg: PeerAnnounce) -> None:
        if msg.channel not in conn.channels:
            return
        current = self.membership.current(msg.channel)
        if current is None:
            return
        fresh = await self.address_book.take(msg.announcements, current.doc, sender=conn.node_id)
        if not fresh:
            return
        relay = PeerAnnounce(channel=msg.channel, announcements=[a.to_wire() for a in fresh])
        for other in list(self.connections.values()):
            if other is not conn and msg.channel in other.channels:
                other.send_quietly(relay)
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
