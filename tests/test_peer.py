"""One session with one peer (node/daemon/peer.py) over in-memory links: what it queues for a
peer, and what a fault in a handler or in the link does (it ends that session, inside the peer
boundary, and nothing else).

The same faults from real peers through real sockets are in tests/test_hostile.py; here the
handlers and the link are the test's own, so every kind of fault can be raised on purpose.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from kachery.node.daemon.boundary import PeerFaults, PerPeerSlots
from kachery.node.daemon.peer import (
    CONTROL_QUEUE_BYTES,
    KEEPALIVE_TIMEOUT,
    MAX_CONCURRENT_MESSAGES,
    QUEUED_ENTRY_BYTES,
    PeerConnection,
    RequestFailed,
    handshake_as_initiator,
    handshake_as_responder,
)
from kachery.node.daemon.transport import MemoryLink
from kachery.protocol.identity import KeyPair
from kachery.protocol.messages import (
    DocAnnounce,
    DocRequest,
    DocResponse,
    Message,
    PeerListRequest,
    PeerListResponse,
)
from kachery.protocol.session import Admission, Claim, DataReceived

from .swarm import until

CHANNEL = KeyPair(b"c" * 32).id
BIG_DOC = {"body": b"x" * (1024 * 1024), "signature": b"s" * 64}


@dataclass
class Handlers:
    """A node's side of a session, as the test wants it: answers DocRequest with a 1 MiB
    document, PeerListRequest with nothing, and raises ``fault`` where it is told to."""

    fault: Callable[[], BaseException] | None = None
    where: str = ""
    messages: list[Message] = field(default_factory=list)
    stall_messages: bool = False
    """Never finish acting on a one-way message (each holds its slot)."""

    def _maybe_raise(self, where: str) -> None:
        if self.fault is not None and self.where == where:
            raise self.fault()

    def check(self, conn: PeerConnection, msg: Message) -> None:
        self._maybe_raise("check")

    async def handle_request(self, conn: PeerConnection, msg: Message) -> Message:
        self._maybe_raise("request")
        if isinstance(msg, DocRequest):
            return DocResponse(id=msg.id, docs=[BIG_DOC])
        return PeerListResponse(id=getattr(msg, "id", 0), announcements=[])

    async def handle_message(self, conn: PeerConnection, msg: Message) -> None:
        self._maybe_raise("message")
        self.messages.append(msg)
        if self.stall_messages:
            await trio.sleep_forever()

    async def handle_data(self, conn: PeerConnection, event: DataReceived) -> None:
        self._maybe_raise("data")


class FaultyLink(MemoryLink):
    """A memory link whose receive or send raises ``fault`` once armed (a transport fault)."""

    fault: Callable[[], BaseException] | None = None
    where = ""

    async def receive(self) -> bytes:
        if self.fault is not None and self.where == "receive":
            raise self.fault()
        return await super().receive()

    async def send(self, data: bytes) -> None:
        if self.fault is not None and self.where == "send":
            raise self.fault()
        await super().send(data)


@asynccontextmanager
async def sessions(
    handlers: Handlers, *, capacity: int = 16
) -> AsyncIterator[tuple[PeerConnection, PeerConnection, FaultyLink, PeerFaults]]:
    """The victim's connection (run inside a peer boundary) and the peer's, over memory."""
    victim_link, peer_link = FaultyLink.pair(capacity)
    assert isinstance(victim_link, FaultyLink)

    async def admit(_session: object, _identified: object) -> Admission:
        return Admission(channels=(CHANNEL,))

    peer_key, victim_key = KeyPair(os.urandom(32)), KeyPair(os.urandom(32))
    async with trio.open_nursery() as nursery:
        responder: list[PeerConnection] = []

        async def respond() -> None:
            session, _, admission = await handshake_as_responder(
                victim_link, victim_key, observed_address="memory:b", admit=admit
            )
            conn = PeerConnection(
                victim_link,
                session,
                direction="inbound",
                channels=set(admission.channels),
                handlers=handlers,  # type: ignore[arg-type]
            )
            responder.append(conn)
            with faults.contain(conn.node_id, "session with"):
                await conn.run()

        faults = PeerFaults()
        nursery.start_soon(respond)
        session, _, _ = await handshake_as_initiator(
            peer_link,
            peer_key,
            expected_peer=victim_key.id,
            make_claim=lambda _s, _i: Claim(channels=(CHANNEL,)),
        )
        peer = PeerConnection(
            peer_link,
            session,
            direction="outbound",
            channels={CHANNEL},
            handlers=Handlers(),  # type: ignore[arg-type]
        )
        nursery.start_soon(peer.run)
        await until(lambda: bool(responder))
        yield responder[0], peer, victim_link, faults
        nursery.cancel_scope.cancel()


async def test_replies_to_a_peer_that_does_not_read_are_bounded_by_bytes() -> None:
    """A peer asks for 64 replies of 1 MiB each and reads nothing: at most CONTROL_QUEUE_BYTES
    are queued for it (the other replies wait, holding their request slots)."""
    handlers = Handlers()
    async with sessions(handlers, capacity=1) as (victim, peer, _link, faults):
        peer.link.receive = trio.sleep_forever  # type: ignore[method-assign,assignment]
        highest = 0
        for request_id in range(1, 65):
            msg = DocRequest(id=request_id, channel=CHANNEL, after=0)
            await peer.link.send(peer.session.send_message(msg))
        for _ in range(100):
            await trio.sleep(0.01)
            highest = max(highest, victim.statistics()["controlQueuedBytes"])
        assert CONTROL_QUEUE_BYTES // 2 < highest <= CONTROL_QUEUE_BYTES
        assert not victim.closed.is_set()
        assert faults.contained == 0


async def test_a_peer_that_never_reads_its_replies_is_dropped_in_the_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    handlers = Handlers()
    async with sessions(handlers, capacity=1) as (victim, peer, _link, _faults):
        peer.link.receive = trio.sleep_forever  # type: ignore[method-assign,assignment]
        for request_id in range(1, 65):
            msg = DocRequest(id=request_id, channel=CHANNEL, after=0)
            await peer.link.send(peer.session.send_message(msg))
        with trio.fail_after(120):
            await victim.closed.wait()
        assert "not reading" in victim.close_reason


async def test_a_silent_peer_is_dropped_after_the_keepalive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session's timers run on Trio's clock, so the 45 s keepalive timeout passes in no
    time under a MockClock (with time.monotonic it would never pass here)."""
    async with sessions(Handlers()) as (victim, peer, _link, faults):

        async def drop(_data: bytes) -> None:  # the peer goes silent; its link stays open
            return None

        peer.link.send = drop  # type: ignore[method-assign]
        started = trio.current_time()
        with trio.fail_after(KEEPALIVE_TIMEOUT * 3):
            await victim.closed.wait()
        assert victim.close_reason == "keepalive timeout"
        assert KEEPALIVE_TIMEOUT <= trio.current_time() - started <= KEEPALIVE_TIMEOUT * 2
        assert faults.contained == 0


async def test_one_way_messages_in_hand_are_bounded_and_the_rest_dropped() -> None:
    """A peer floods one-way messages that never finish: at most MAX_CONCURRENT_MESSAGES are in
    hand at once (one task each), the rest are dropped and counted, and the session goes on."""
    handlers = Handlers(stall_messages=True)
    async with sessions(handlers) as (victim, peer, _link, faults):
        sent = MAX_CONCURRENT_MESSAGES * 3
        for version in range(sent):
            await peer.send(DocAnnounce(channel=CHANNEL, version=version))
            await trio.lowlevel.checkpoint()  # let the sender's writer drain its own queue
        await until(lambda: len(handlers.messages) + victim.messages_dropped == sent)
        assert len(handlers.messages) == MAX_CONCURRENT_MESSAGES
        assert victim.statistics()["messagesDropped"] == sent - MAX_CONCURRENT_MESSAGES
        assert not victim.closed.is_set()
        assert faults.contained == 0


async def test_a_burst_of_gossip_from_one_task_does_not_end_the_senders_session() -> None:
    """1,000 one-way messages queued without a yield (one per subfeed of a flush, say) wait
    for the writer: the queue is bounded by bytes, not by count, so the sender keeps its
    session, and the receiver hears each one or counts it dropped."""
    handlers = Handlers()
    async with sessions(handlers) as (victim, peer, _link, faults):
        sent = 1000
        for version in range(sent):
            peer.send_quietly(DocAnnounce(channel=CHANNEL, version=version))
        assert peer.statistics()["controlQueuedBytes"] >= sent * QUEUED_ENTRY_BYTES
        await until(lambda: len(handlers.messages) + victim.messages_dropped == sent)
        assert not peer.closed.is_set()
        assert not victim.closed.is_set()
        assert peer.statistics()["controlQueuedBytes"] == 0
        assert faults.contained == 0


async def contained(faults: PeerFaults) -> None:
    """Wait until the boundary has contained exactly one fault."""
    await until(lambda: faults.contained > 0)
    assert faults.contained == 1


FAULTS: list[Callable[[], BaseException]] = [
    lambda: RuntimeError("injected"),
    lambda: KeyError("injected"),
    lambda: AssertionError("injected"),
    lambda: ZeroDivisionError(),
    lambda: ExceptionGroup("injected", [ValueError("inner")]),
]


@pytest.mark.parametrize("where", ["check", "request", "message", "data"])
@pytest.mark.parametrize("fault", FAULTS, ids=["runtime", "key", "assert", "zerodiv", "group"])
async def test_a_fault_in_any_handler_ends_at_most_that_session(
    where: str, fault: Callable[[], BaseException]
) -> None:
    handlers = Handlers(fault=fault, where=where)
    async with sessions(handlers) as (victim, peer, _link, faults):
        if where == "request":
            # a request handler's fault is answered as an internal error; the session goes on
            with pytest.raises(RequestFailed, match="internal error"):
                await peer.request(PeerListRequest(id=0, channel=CHANNEL))
            handlers.fault = None
            reply = await peer.request(PeerListRequest(id=0, channel=CHANNEL))
            assert isinstance(reply, PeerListResponse)
            assert not victim.closed.is_set()
            return
        if where == "check":
            await peer.send(PeerListRequest(id=1, channel=CHANNEL))
        elif where == "message":
            await peer.send(DocAnnounce(channel=CHANNEL, version=1))
        else:
            await peer.send_data(1, 0, b"payload")
        await contained(faults)
        assert victim.closed.is_set()
        assert sum(faults.kinds.values()) == 1  # counted by kind, as status shows it


@pytest.mark.parametrize("where", ["receive", "send"])
@pytest.mark.parametrize("fault", FAULTS, ids=["runtime", "key", "assert", "zerodiv", "group"])
async def test_a_fault_in_the_link_ends_that_session_only(
    where: str, fault: Callable[[], BaseException]
) -> None:
    handlers = Handlers()
    async with sessions(handlers) as (victim, peer, link, faults):
        link.fault, link.where = fault, where
        await peer.send(DocAnnounce(channel=CHANNEL, version=1))
        if where == "send":
            await victim.send(DocAnnounce(channel=CHANNEL, version=2))
        await contained(faults)
        assert victim.closed.is_set()


async def test_per_peer_slots_are_kept_only_while_held() -> None:
    slots = PerPeerSlots(2)
    inside = 0
    most = 0

    async def hold(peer: str) -> None:
        nonlocal inside, most
        async with slots.hold(peer):
            inside += 1
            most = max(most, inside)
            await trio.sleep(0.01)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(hold, "one")
        for i in range(100):
            nursery.start_soon(hold, f"passer-by {i}")
        await trio.testing.wait_all_tasks_blocked()
        assert len(slots) == 101
    assert len(slots) == 0  # nothing is kept for peers that came by once
    async with trio.open_nursery() as nursery:
        inside = most = 0
        for _ in range(6):
            nursery.start_soon(hold, "one")
    assert most == 2
