"""Hostile peers against a real node: each attack speaks the protocol through real sockets with
its own keys, and after each one an honest member still loads a file from the victim.

The victim runs in the test's own Trio loop (tests/swarm.py), so an exception that escaped the
peer boundary would end the swarm's nursery and fail the test: "the daemon stayed up" is checked
by the test finishing at all, and again by the honest load that follows every attack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio
import trio.lowlevel

from kachery.node.daemon.node import Node
from kachery.node.daemon.peer import HandshakeFailed, handshake_as_initiator
from kachery.node.daemon.transport import Link, LinkClosed, dial
from kachery.protocol.channel import Member
from kachery.protocol.codec import encode
from kachery.protocol.feed_messages import FeedHave, FeedPrune
from kachery.protocol.files import CancelData, FindFile, FindFileResponse
from kachery.protocol.identity import KeyPair
from kachery.protocol.messages import (
    DocAnnounce,
    DocPush,
    DocRequest,
    ErrorCode,
    ErrorReply,
    MsgType,
    PeerListResponse,
)
from kachery.protocol.session import PROTOCOL, Claim, MessageReceived, Session
from kachery.protocol.tasks import TaskLookup

from .swarm import WAIT, Swarm, channel_of, control, swarm, until, wait
from .test_files import files_of, store_random


def _host_port(node: Node) -> tuple[str, int]:
    parts = urlsplit(node.addresses[0])
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def honest_load(victim: Node, member: Node, tmp_path: Path) -> None:
    """The member loads a fresh file that only the victim holds."""
    entry, data = store_random(victim, tmp_path, 300_000, name=os.urandom(4).hex())
    with trio.fail_after(WAIT):
        await wait(member, lambda: victim.node_id in member.connections)
        got = await files_of(member).download(entry.uri())
    assert got.path.read_bytes() == data


async def victim_and_member(s: Swarm) -> tuple[Node, Node, KeyPair, str]:
    """A channel with the victim (its owner), an honest member, and a member whose node key the
    attacker holds (it joined honestly, then its node was stopped)."""
    victim, member, rogue = await channel_of(s, ["victim", "member", "rogue"])
    rogue_key = rogue.key
    channel = next(iter(victim.membership.active_channels()))
    s.stop("rogue")
    await wait(victim, lambda: rogue.node_id not in victim.connections)
    return victim, member, rogue_key, channel


@asynccontextmanager
async def session_as(
    key: KeyPair, victim: Node, channel: str
) -> AsyncIterator[tuple[Link, Session]]:
    """A session with the victim, as the member whose key is ``key``, driven by hand."""
    async with dial(victim.addresses[0]) as link:
        session, _, _ = await handshake_as_initiator(
            link,
            key,
            expected_peer=victim.node_id,
            make_claim=lambda _s, _i: Claim(channels=(channel,)),
        )
        yield link, session


async def closed_by_peer(link: Link, session: Session | None = None) -> LinkClosed:
    """Read (and decrypt, if ``session``) until the peer closes the link; its close."""
    with trio.fail_after(WAIT):
        while True:
            try:
                data = await link.receive()
            except LinkClosed as closed:
                return closed
            if session is not None:
                session.receive(data)


async def upgrade_then_reset(host: str, port: int, *, read_answer: bool) -> None:
    """Send a websocket upgrade and reset the TCP connection (SO_LINGER 0) at once."""
    sock = trio.socket.socket()
    await sock.connect((host, port))
    request = (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n"
    ).encode()
    await sock.send(request)
    if read_answer:
        with trio.move_on_after(1):
            await sock.recv(4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_upgrades_reset_at_once_end_only_their_connections(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        victim, member = await channel_of(s, ["victim", "member"])
        host, port = _host_port(victim)
        for i in range(60):
            await upgrade_then_reset(host, port, read_answer=i % 2 == 0)
        await honest_load(victim, member, tmp_path)
        assert victim.faults.contained == 0  # resets are the network's doing, not faults


@pytest.mark.parametrize(
    "point", [bytes(32), b"\x01" + bytes(31)], ids=["all-zero", "one-then-zeros"]
)
async def test_a_low_order_ephemeral_key_is_refused(tmp_path: Path, point: bytes) -> None:
    async with swarm(tmp_path) as s:
        victim, member = await channel_of(s, ["victim", "member"])
        for _ in range(3):
            async with dial(victim.addresses[0]) as link:
                await link.send(encode({"protocol": PROTOCOL, "e": point, "n": os.urandom(32)}))
                await closed_by_peer(link)
        await honest_load(victim, member, tmp_path)


async def test_a_low_order_key_in_m2_does_not_stop_the_dialer(tmp_path: Path) -> None:
    """An address that answers every M1 with a low-order M2 (an announced trap)."""

    async def trap(link: Link) -> None:
        await link.receive()
        await link.send(encode({"e": bytes(32), "n": os.urandom(32), "box": os.urandom(64)}))
        with trio.move_on_after(WAIT):
            await link.receive()

    async with swarm(tmp_path) as s:
        victim, member = await channel_of(s, ["victim", "member"])
        async with trio.open_nursery() as nursery:
            from kachery.node.daemon.boundary import PeerFaults
            from kachery.node.daemon.transport import listen

            port = await nursery.start(
                lambda task_status: listen(
                    trap, "127.0.0.1", 0, faults=PeerFaults(), task_status=task_status
                )
            )
            for _ in range(3):
                with pytest.raises(HandshakeFailed, match="low-order"):
                    await victim.connect(f"ws://127.0.0.1:{port}")
            nursery.cancel_scope.cancel()
        await honest_load(victim, member, tmp_path)


async def test_unauthentic_and_replayed_frames_end_only_that_session(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        victim, member, rogue_key, channel = await victim_and_member(s)
        for attempt in range(10):
            async with session_as(rogue_key, victim, channel) as (link, session):
                frame = session.send_message(DocAnnounce(channel=channel, version=1))
                await link.send(frame)
                # a replay of the same frame, or garbage, right after the handshake
                await link.send(frame if attempt % 2 else os.urandom(100))
                await closed_by_peer(link)
        await honest_load(victim, member, tmp_path)


async def test_documents_shown_by_a_stranger_in_its_handshake_change_nothing(
    tmp_path: Path,
) -> None:
    """A valid newer document that does not list the dialer is not taken from it (nor checked);
    one that lists it is (it joined through an admin the victim has not heard from)."""
    async with swarm(tmp_path) as s:
        owner, victim = await channel_of(s, ["owner", "victim"])
        channel = next(iter(victim.membership.active_channels()))
        current = victim.membership.current(channel)
        assert current is not None
        version = current.doc.version
        stranger, newcomer = KeyPair(os.urandom(32)), KeyPair(os.urandom(32))
        other = Member(node_id=KeyPair(os.urandom(32)).id, label="other", roles=frozenset())
        newer = current.doc.with_member(other, issued_at=current.doc.issued_at + 1)
        shown = (newer.sign(owner.key).to_wire(),)
        with pytest.raises(HandshakeFailed, match="not a member"):
            async with dial(victim.addresses[0]) as link:
                await handshake_as_initiator(
                    link,
                    stranger,
                    expected_peer=victim.node_id,
                    make_claim=lambda _s, _i: Claim(channels=(channel,), docs=shown),
                )
        assert victim.membership.history(channel).version == version
        joined = Member(node_id=newcomer.id, label="newcomer", roles=frozenset())
        admitting = current.doc.with_member(joined, issued_at=current.doc.issued_at + 1)
        async with dial(victim.addresses[0]) as link:
            await handshake_as_initiator(
                link,
                newcomer,
                expected_peer=victim.node_id,
                make_claim=lambda _s, _i: Claim(
                    channels=(channel,), docs=(admitting.sign(owner.key).to_wire(),)
                ),
            )
        assert victim.membership.history(channel).version == version + 1
        await honest_load(victim, owner, tmp_path)


async def test_a_reply_of_another_type_ends_the_session_not_the_node(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        victim, member, rogue_key, channel = await victim_and_member(s)
        before = victim.faults.contained
        async with session_as(rogue_key, victim, channel) as (link, session):
            # claim a newer membership document: the victim asks for it with a DocRequest...
            await link.send(session.send_message(DocAnnounce(channel=channel, version=99)))
            request = None
            with trio.fail_after(WAIT):
                while request is None:
                    event = session.receive(await link.receive())
                    if isinstance(event, MessageReceived) and isinstance(event.message, DocRequest):
                        request = event.message
            # ... and is answered with a PeerListResponse carrying the same id
            await link.send(session.send_message(PeerListResponse(id=request.id, announcements=[])))
            closed = await closed_by_peer(link, session)
        assert "answered DocRequest with PeerListResponse" in closed.reason
        assert victim.faults.contained == before
        await honest_load(victim, member, tmp_path)


async def test_a_fault_injected_into_a_real_nodes_handlers_ends_only_that_session(
    tmp_path: Path,
) -> None:
    """Handlers put in the node's table of routes raise: a request's fault is
    answered as an internal error, a one-way message's ends that session, inside the boundary;
    the node serves on (every kind of fault, and the link's, is in tests/test_peer.py)."""

    async def boom(_conn: object, _msg: object) -> None:
        raise RuntimeError("injected")

    async with swarm(tmp_path) as s:
        victim, member, rogue_key, channel = await victim_and_member(s)
        for msg_type in (MsgType.TASK_LOOKUP, MsgType.FEED_PRUNE):
            victim.routes[msg_type] = dataclasses.replace(victim.routes[msg_type], handler=boom)
        before = victim.faults.contained
        async with session_as(rogue_key, victim, channel) as (link, session):
            lookup = TaskLookup(
                id=7,
                channel=channel,
                task_id="1" * 40,
                kwargs_digest="2" * 40,
                task_type="pure-calculation",
            )
            await link.send(session.send_message(lookup))
            with trio.fail_after(WAIT):
                while True:
                    event = session.receive(await link.receive())
                    if isinstance(event, MessageReceived) and isinstance(event.message, ErrorReply):
                        break
            assert event.message.id == 7
            assert event.message.code == ErrorCode.INTERNAL
            prune = FeedPrune(channel=channel, feed_id="3" * 64, subfeed_hash="4" * 40)
            await link.send(session.send_message(prune))
            await closed_by_peer(link, session)
        # the close reaches the link as the session unwinds; the boundary counts it just after
        await until(lambda: victim.faults.contained > before)
        assert victim.faults.contained == before + 1
        assert victim.faults.kinds["RuntimeError"] >= 1
        await honest_load(victim, member, tmp_path)


async def test_cancels_for_streams_never_asked_for_are_not_kept(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        victim, member, rogue_key, channel = await victim_and_member(s)
        files = files_of(victim)
        async with session_as(rogue_key, victim, channel) as (link, session):
            for stream in range(5000):
                await link.send(session.send_message(CancelData(stream=stream)))
            await trio.sleep(0.2)  # let the victim read them (nothing to wait on: they do nothing)
        assert not files._cancelled
        await honest_load(victim, member, tmp_path)


async def test_a_handshake_flood_is_capped_and_honest_members_still_load(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        victim, member = await channel_of(s, ["victim", "member"])
        async with trio.open_nursery() as nursery:

            async def silent() -> None:
                async with dial(victim.addresses[0]) as link:
                    with trio.move_on_after(WAIT), contextlib.suppress(LinkClosed):
                        await link.receive()  # refused at once, or left in its handshake

            for _ in range(40):
                nursery.start_soon(silent)
            with trio.fail_after(WAIT):
                while not victim.refused_handshakes:  # noqa: ASYNC110 (polls a counter)
                    await trio.sleep(0.01)
            await honest_load(victim, member, tmp_path)
            nursery.cancel_scope.cancel()
        assert victim.refused_handshakes > 0


async def test_a_member_lying_about_a_size_gets_no_honest_provider_penalised(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        names = ["m1", "m2", "m3"]
        victim, *members = await channel_of(s, ["victim", *names])
        # the liar is the member whose ID sorts first: the one a download used to believe
        by_id = sorted(zip(members, names, strict=True), key=lambda m: m[0].node_id)
        (rogue, rogue_name), (p1, _), (p2, _) = by_id
        rogue_key, channel = rogue.key, next(iter(victim.membership.active_channels()))
        s.stop(rogue_name)
        await wait(victim, lambda: rogue.node_id not in victim.connections)
        data = os.urandom(500_000)
        source = tmp_path / "shared.bin"
        source.write_bytes(data)
        entry = p1.home.files.store_path(source)
        p2.home.files.store_path(source)
        lied = trio.Event()
        async with session_as(rogue_key, victim, channel) as (link, session):

            async def lie() -> None:
                while True:
                    event = session.receive(await link.receive())
                    if isinstance(event, MessageReceived) and isinstance(event.message, FindFile):
                        answer = FindFileResponse(
                            id=event.message.id, has=True, size=len(data) + 4096
                        )
                        await link.send(session.send_message(answer))
                        lied.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lie)
                await wait(victim, lambda: rogue.node_id in victim.connections)
                with trio.fail_after(WAIT):
                    got = await files_of(victim).download(entry.uri())
                nursery.cancel_scope.cancel()
        assert lied.is_set()
        assert got.path.read_bytes() == data
        penalties = files_of(victim).penalties
        assert not penalties.banned_peers(trio.current_time())
        assert not {p1.node_id, p2.node_id} & set(penalties.offences)
        await honest_load(victim, p1, tmp_path)


async def _hostile_connection(host: str, port: int, kind: int) -> None:
    """One of four: reset after the upgrade, half-closed, silent, or garbage."""
    if kind == 0:
        await upgrade_then_reset(host, port, read_answer=False)
        return
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            if kind == 1:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
                await stream.send_eof()
            elif kind == 2:
                await trio.sleep(0.5)  # silent: holds a slot, then goes
            else:
                await stream.send_all(os.urandom(2048))
            with trio.move_on_after(0.5):
                await stream.receive_some(4096)


async def test_chaos_during_a_1gb_transfer(tmp_path: Path) -> None:
    """1000 hostile connections to the provider while a member loads 1 GB from it."""
    async with swarm(tmp_path) as s:
        provider, member = await channel_of(s, ["provider", "member"])
        entry, _ = store_random(provider, tmp_path, 1 << 30, name="big.bin")
        host, port = _host_port(provider)
        opened = 0

        async def chaos() -> None:
            nonlocal opened
            limit = trio.CapacityLimiter(50)

            async def one(kind: int) -> None:
                async with limit:
                    await _hostile_connection(host, port, kind)

            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    await limit.acquire()  # pace: at most 50 at once
                    limit.release()
                    nursery.start_soon(one, i % 4)
                    opened += 1
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos)
            with trio.fail_after(120):
                got = await files_of(member).download(entry.uri())
        assert opened == 1000
        assert got.sha1 == entry.sha1
        assert provider.node_id in member.connections  # the honest session survived
        await honest_load(provider, member, tmp_path)


async def test_a_removed_admin_cannot_roll_the_membership_back(tmp_path: Path) -> None:
    """Case 5 through real sockets: Y (an admin, not the owner) signs version v; the owner removes
    X at v+1; X re-signs a version v of its own that drops the innocent M, ground until its
    signature is lower than Y's, and shows it in its handshake and (through a member whose key the
    attacker also holds) in a push. The removal stands and M stays a member, on the owner too."""
    async with swarm(tmp_path) as s:
        names = ["victim", "y", "x", "m", "rogue"]
        victim, y, x, m, rogue = await channel_of(s, names)
        channel = next(iter(victim.membership.active_channels()))
        await control(y).channel_set_roles("lab", m.node_id, ["requestFiles", "provideFiles"])
        by_y = y.membership.history(channel).version
        await wait(victim, lambda: victim.membership.history(channel).version == by_y)
        await control(victim).channel_remove("lab", x.node_id)
        removal = victim.membership.history(channel).version
        assert removal == by_y + 1
        signed_by_y = victim.membership.history(channel).docs_after(by_y - 1)[0]
        before_y = victim.membership.history(channel).docs_after(by_y - 2)[0]
        x_key, rogue_key = x.key, rogue.key
        s.stop("x")
        s.stop("rogue")
        forged = None
        for t in range(2000):
            candidate = before_y.doc.without_member(m.node_id, issued_at=before_y.doc.issued_at + t)
            signed = candidate.sign(x_key)
            if signed.signature < signed_by_y.signature:
                forged = signed
                break
        assert forged is not None
        assert forged.doc.version == by_y

        def unchanged() -> None:
            for node in (victim, y, m):
                current = node.membership.current(channel)
                assert current is not None
                assert current.doc.version == removal
                assert current.doc.member(x.node_id) is None
                assert current.doc.member(m.node_id) is not None

        with pytest.raises(HandshakeFailed, match="not a member"):
            async with dial(victim.addresses[0]) as link:
                await handshake_as_initiator(
                    link,
                    x_key,
                    expected_peer=victim.node_id,
                    make_claim=lambda _s, _i: Claim(channels=(channel,), docs=(forged.to_wire(),)),
                )
        unchanged()
        async with session_as(rogue_key, victim, channel) as (link, session):
            await link.send(session.send_message(DocPush(channel=channel, docs=[forged.to_wire()])))
            await link.send(session.send_message(DocAnnounce(channel=channel, version=by_y)))
            await trio.sleep(0.3)  # nothing to wait on: the push changes nothing
        unchanged()
        await honest_load(victim, m, tmp_path)


async def test_one_way_messages_need_the_role_their_route_names(tmp_path: Path) -> None:
    """A member with requestFiles only sends feed gossip (which needs requestFeeds or
    provideFeeds): the node drops it before any handler runs, and counts it."""
    async with swarm(tmp_path) as s:
        victim, member, rogue = await channel_of(
            s, ["victim", "member", "rogue"], roles={"rogue": "requestFiles"}
        )
        rogue_key, channel = rogue.key, next(iter(victim.membership.active_channels()))
        s.stop("rogue")
        await wait(victim, lambda: rogue.node_id not in victim.connections)
        feed, sub = "3" * 64, "4" * 40
        async with session_as(rogue_key, victim, channel) as (link, session):
            for msg in (
                FeedPrune(channel=channel, feed_id=feed, subfeed_hash=sub),
                FeedHave(channel=channel, feed_id=feed, subfeed_hash=sub, count=5),
            ):
                await link.send(session.send_message(msg))
            with trio.fail_after(WAIT):
                while victim.unpermitted_messages < 2:  # noqa: ASYNC110 (polls a counter)
                    await trio.sleep(0.01)
        assert victim.unpermitted_messages == 2
        assert (await control(victim).status())["messagesRefusedRole"] == 2
        await honest_load(victim, member, tmp_path)
