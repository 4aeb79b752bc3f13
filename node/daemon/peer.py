"""A running session with one peer: the handshake, then a reader, a writer and requests.

``handshake_as_initiator`` and ``handshake_as_responder`` drive the sans-I/O ``Session`` through
M1..M4 over a ``Link`` within HANDSHAKE_TIMEOUT. ``PeerConnection.run`` then runs three tasks:

- the reader decrypts each frame; replies resolve the request waiting for them; requests are
  checked (membership and role, by ``Handlers.check``) before anything else is read from them,
  then handled in their own task, at most MAX_CONCURRENT_REQUESTS at once (more are answered
  ``busy``); a protocol error closes this session only, with its close code;
- the writer encrypts and sends, always emptying the control queue before it sends the next bulk
  data frame, so a bulk transfer never starves gossip and requests on the same session (the
  reply that closes a bulk transfer travels in the bulk queue, behind its frames); a ``close``
  lets it send the control messages already queued (gossip such as the document removing the
  peer) before the link closes;
- the keepalive pings and closes a session whose peer stopped answering.

Non-goal: deciding who may connect or what a request means (membership.py, the services).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from kachery.node.daemon.transport import Link
from kachery.node.errors import LinkClosed, NodeError, NotPermitted, Unavailable
from kachery.protocol.errors import (
    CloseCode,
    KacheryError,
    LocalProtocolError,
    RemoteProtocolError,
)
from kachery.protocol.identity import KeyPair
from kachery.protocol.messages import ErrorCode, ErrorReply, Message, Ping, Pong, UnknownMessage
from kachery.protocol.session import (
    Admission,
    Claim,
    DataBlock,
    DataReceived,
    InitiatorIdentified,
    MessageReceived,
    Refused,
    ResponderIdentified,
    Session,
    Side,
    State,
    Welcomed,
    message_plaintext,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
"""Seconds for M1..M4; a peer that stalls longer is dropped."""

KEEPALIVE_INTERVAL = 15.0
KEEPALIVE_TIMEOUT = 45.0
"""A session with no frame from the peer for this long is closed."""

REQUEST_TIMEOUT = 30.0
MAX_CONCURRENT_REQUESTS = 64
"""Requests from one peer handled at once; more are answered ``busy``."""

MAX_CONCURRENT_MESSAGES = 64
"""One-way messages from one peer acted on at once; more are dropped (and counted): gossip
recovers what is lost (heads are announced again, ranges are pulled), and a peer that floods
cannot make this node hold one task per message."""

QUEUED_ENTRY_BYTES = 64
"""What one queued control message costs beyond its bytes (the bytes object and its slot in the
queue), counted against CONTROL_QUEUE_BYTES: the bound holds for memory, however small the
messages. There is no bound by count: a burst of gossip (one message per subfeed, say) from one
task must not end the session because the writer had no turn yet."""

CONTROL_QUEUE_BYTES = 16 * 1024 * 1024
"""Bytes of control messages waiting to be sent to one peer. A reply waits for room, keeping its
request's slot, so a peer that asks and does not read stops being answered at this bound. A
one-way message or a request finding twice this much queued ends the session instead (the peer
is not reading): gossip to every peer must not wait on one slow peer."""

BULK_QUEUE = 4
"""Bulk data frames waiting to be sent: a bulk sender waits when the writer falls behind."""

CLOSE_FLUSH_TIMEOUT = 5.0
"""Seconds ``close`` gives the writer to send the control messages queued before it."""


class HandshakeFailed(NodeError):
    """The handshake did not complete; the message says why (refused, timed out, closed)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestFailed(NodeError):
    """A peer answered a request with an error; ``code`` is its ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _SessionOver(Exception):
    """The session closed under the writer: it stops sending."""


class Refusal(Exception):
    """Raised by an admission callback to refuse a session: ``code`` and ``reason`` are sent."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def raise_for_reply(reply: ErrorReply) -> None:
    """Raise the local error that matches a peer's error reply."""
    if reply.code == ErrorCode.NOT_PERMITTED or reply.code == ErrorCode.NOT_A_MEMBER:
        raise NotPermitted(reply.message)
    if reply.code == ErrorCode.BUSY:
        raise Unavailable(reply.message)
    raise RequestFailed(reply.code, reply.message)


# -- handshakes ----------------------------------------------------------------------------------


@asynccontextmanager
async def _handshake_errors(link: Link, closed: str) -> AsyncIterator[None]:
    """Bound a handshake by HANDSHAKE_TIMEOUT and turn what can go wrong into HandshakeFailed,
    closing the link with the protocol's close code when the peer misbehaved."""
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            yield
    except trio.TooSlowError:
        await link.close(CloseCode.GOING_AWAY, "handshake timed out")
        raise HandshakeFailed(f"{link.remote}: handshake timed out") from None
    except RemoteProtocolError as exc:
        await link.close(exc.close_code, str(exc))
        raise HandshakeFailed(f"{link.remote}: {exc}", exc.close_code) from None
    except LinkClosed as exc:
        reason = f": {exc.reason}" if exc.reason else ""
        raise HandshakeFailed(f"{link.remote} {closed}{reason}", exc.code) from None


async def handshake_as_initiator(
    link: Link,
    identity: KeyPair,
    *,
    expected_peer: str | None,
    make_claim: Callable[[Session, ResponderIdentified], Claim],
) -> tuple[Session, ResponderIdentified, Admission]:
    """Dial side of the handshake.

    Raises:
        HandshakeFailed: refused (with the responder's reason), timed out, or closed.
    """
    session = Session(
        Side.INITIATOR,
        identity,
        ephemeral_secret=os.urandom(32),
        nonce=os.urandom(32),
        expected_peer=expected_peer,
    )
    async with _handshake_errors(link, "closed the connection"):
        await link.send(session.send_hello())
        identified = session.receive(await link.receive())
        assert isinstance(identified, ResponderIdentified)
        await link.send(session.send_identity(make_claim(session, identified)))
        verdict = session.receive(await link.receive())
    if isinstance(verdict, Refused):
        await link.close(verdict.code, verdict.reason)
        raise HandshakeFailed(f"refused by {link.remote}: {verdict.reason}", verdict.code)
    assert isinstance(verdict, Welcomed)
    return session, identified, verdict.admission


async def handshake_as_responder(
    link: Link,
    identity: KeyPair,
    *,
    observed_address: str,
    admit: Callable[[Session, InitiatorIdentified], Awaitable[Admission]],
) -> tuple[Session, InitiatorIdentified, Admission]:
    """Listen side of the handshake; ``admit`` returns the admission or raises ``Refusal``.

    Raises:
        HandshakeFailed: the initiator was refused, misbehaved, timed out or went away.
    """
    session = Session(
        Side.RESPONDER, identity, ephemeral_secret=os.urandom(32), nonce=os.urandom(32)
    )
    async with _handshake_errors(link, "went away during the handshake"):
        session.receive(await link.receive())
        await link.send(session.send_ack(observed_address))
        identified = session.receive(await link.receive())
        assert isinstance(identified, InitiatorIdentified)
        try:
            admission = await admit(session, identified)
        except Refusal as refusal:
            await link.send(session.send_refusal(refusal.code, refusal.reason))
            await link.close(refusal.code, refusal.reason)
            raise HandshakeFailed(
                f"refused {identified.node_id[:16]}... from {link.remote}: {refusal.reason}",
                refusal.code,
            ) from None
        await link.send(session.send_welcome(admission))
    return session, identified, admission


# -- the running session -------------------------------------------------------------------------


class Handlers(Protocol):
    """What a connection asks of the node about incoming messages."""

    def check(self, conn: PeerConnection, msg: Message) -> ErrorReply | None:
        """Membership and role check of a request; an ErrorReply refuses it."""

    async def handle_request(self, conn: PeerConnection, msg: Message) -> Message:
        """Answer a request (raise a KacheryError to answer with an error)."""

    async def handle_message(self, conn: PeerConnection, msg: Message) -> None:
        """Act on a one-way message."""

    async def handle_data(self, conn: PeerConnection, event: DataReceived) -> None:
        """Take a bulk data block."""


@dataclasses.dataclass
class _Pending:
    event: trio.Event = dataclasses.field(default_factory=trio.Event)
    reply: Message | None = None


class PeerConnection:
    """An established session with one peer.

    Attributes:
        node_id: the peer's proven node ID.
        channels: channel IDs this session serves (updated when membership changes).
        direction: ``"outbound"`` (we dialed) or ``"inbound"``.
        address: where we dialed, or where the peer connected from.
        listen_addresses: where the peer says it can be reached.
    """

    def __init__(
        self,
        link: Link,
        session: Session,
        *,
        direction: str,
        channels: set[str],
        handlers: Handlers,
        listen_addresses: tuple[str, ...] = (),
    ) -> None:
        assert session.peer_id is not None
        self.node_id: str = session.peer_id
        self.link = link
        self.session = session
        self.direction = direction
        self.address = link.remote
        self.channels = channels
        self.listen_addresses = listen_addresses
        self.handlers = handlers
        self.connected_at = time.time()
        self.rtt: float | None = None
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._control_send, self._control_recv = trio.open_memory_channel[bytes](math.inf)
        self._queued_bytes = 0
        self._room = trio.lowlevel.ParkingLot()
        self._bulk_send, self._bulk_recv = trio.open_memory_channel[
            tuple[int, int, DataBlock | bytes | memoryview] | Message
        ](BULK_QUEUE)
        self._work = trio.Event()
        self._closing = False
        self._flushed = trio.Event()
        self._last_heard = trio.current_time()
        self._busy = trio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._message_slots = trio.Semaphore(MAX_CONCURRENT_MESSAGES)
        self.messages_dropped = 0
        self._cancel = trio.CancelScope()
        self._ping_sent: dict[int, float] = {}
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        return f"PeerConnection({self.node_id[:12]}..., {self.direction}, {self.address})"

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until the session ends (by either side, an error, or ``close``)."""
        try:
            with self._cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._keepalive)
                    await self._reader(nursery)
                    nursery.cancel_scope.cancel()
        finally:
            for pending in self._pending.values():
                pending.event.set()
            self._flushed.set()
            self.closed.set()
            with trio.CancelScope(shield=True):
                await self.link.close(self.close_code or CloseCode.GOING_AWAY, self.close_reason)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session, telling the peer ``code`` and ``reason``.

        Control messages queued before the close (such as the membership document that removes
        the peer) are sent first, for at most CLOSE_FLUSH_TIMEOUT; queued bulk data is dropped.
        """
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if not self._closing:
            self._closing = True
            self._work.set()
            with trio.move_on_after(CLOSE_FLUSH_TIMEOUT):
                await self._flushed.wait()
        self._cancel.cancel()
        await self.closed.wait()

    async def _reader(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                data = await self.link.receive()
            except LinkClosed as exc:
                if self.close_code is None:
                    self.close_code, self.close_reason = exc.code, exc.reason
                return
            self._last_heard = trio.current_time()
            self.bytes_received += len(data)
            try:
                event = self.session.receive(data)
            except RemoteProtocolError as exc:
                log.warning("closing session with %s: %s", self.node_id[:16], exc)
                self.close_code, self.close_reason = exc.close_code, str(exc)
                return
            if isinstance(event, DataReceived):
                await self.handlers.handle_data(self, event)
            elif isinstance(event, MessageReceived):
                self._dispatch(event.message, nursery)
            else:  # handshake events cannot occur once established
                self.close_code, self.close_reason = CloseCode.PROTOCOL_ERROR, "unexpected event"
                return

    def _dispatch(self, msg: Message | UnknownMessage, nursery: trio.Nursery) -> None:
        if isinstance(msg, UnknownMessage):
            if msg.id is not None:
                reply = ErrorReply(
                    id=msg.id,
                    code=ErrorCode.UNSUPPORTED,
                    message=f"unknown message type {msg.type}",
                )
                self._queue_control(reply)
            return
        if isinstance(msg, Ping):
            self._queue_control(Pong(nonce=msg.nonce))
            return
        if isinstance(msg, Pong):
            sent = self._ping_sent.pop(msg.nonce, None)
            if sent is not None:
                self.rtt = trio.current_time() - sent
            return
        if msg.REPLY:
            pending = self._pending.get(getattr(msg, "id", -1))
            if pending is not None:
                pending.reply = msg
                pending.event.set()
            return
        request_id = getattr(msg, "id", None)
        if request_id is None:
            try:
                self._message_slots.acquire_nowait()
            except trio.WouldBlock:
                self.messages_dropped += 1
                return
            nursery.start_soon(self._handle_message, msg)
            return
        refusal = self.handlers.check(self, msg)
        if refusal is not None:
            self._queue_control(refusal)
            return
        try:
            self._busy.acquire_nowait()
        except trio.WouldBlock:
            self._queue_control(
                ErrorReply(id=request_id, code=ErrorCode.BUSY, message="too many requests; retry")
            )
            return
        nursery.start_soon(self._handle_request, msg, request_id)

    async def _handle_request(self, msg: Message, request_id: int) -> None:
        """Answer one request; its slot is held until the reply is queued (backpressure)."""
        try:
            try:
                reply = await self.handlers.handle_request(self, msg)
            except KacheryError as exc:
                reply = ErrorReply(id=request_id, code=error_code_of(exc), message=str(exc))
            except Exception:
                log.exception("error handling %s from %s", type(msg).__name__, self.node_id[:16])
                reply = ErrorReply(id=request_id, code=ErrorCode.INTERNAL, message="internal error")
            if reply.AFTER_DATA:
                with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                    await self._bulk_send.send(reply)
                self._work.set()
            else:
                await self._queue_reply(reply)
        finally:
            self._busy.release()

    async def _handle_message(self, msg: Message) -> None:
        try:
            await self.handlers.handle_message(self, msg)
        except KacheryError as exc:
            log.info("ignored %s from %s: %s", type(msg).__name__, self.node_id[:16], exc)
        finally:
            self._message_slots.release()

    async def _writer(self) -> None:
        with contextlib.suppress(_SessionOver):
            await self._write_frames()

    async def _write_frames(self) -> None:
        while True:
            try:
                plaintext = self._control_recv.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                self._queued_bytes -= len(plaintext) + QUEUED_ENTRY_BYTES
                self._room.unpark_all()
                await self._send_frame(self._seal(self.session.send_plaintext, plaintext))
                continue
            if self._closing:  # every control message queued before the close has gone out
                self._flushed.set()
                await trio.sleep_forever()
            try:
                item = self._bulk_recv.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                if isinstance(item, Message):  # a reply that closes a bulk transfer
                    await self._send_frame(self._seal_message(item))
                else:
                    await self._send_frame(self._seal(self.session.send_data, *item))
                continue
            self._work = trio.Event()
            await self._work.wait()

    def _seal_message(self, msg: Message) -> bytes:
        return self._seal(self.session.send_message, msg)

    def _seal(self, send: Callable[..., bytes], *args: Any) -> bytes:
        """Encrypt one frame; once the reader has closed the session (the peer sent an
        unauthentic frame), the frames still queued are dropped and the writer ends quietly."""
        try:
            return send(*args)
        except LocalProtocolError:
            if self.session.state is not State.CLOSED:
                raise
            self._cancel.cancel()
            raise _SessionOver from None

    async def _send_frame(self, frame: bytes) -> None:
        try:
            await self.link.send(frame)
        except LinkClosed:
            self._cancel.cancel()
            await trio.sleep_forever()
        self.bytes_sent += len(frame)

    async def _keepalive(self) -> None:
        """Ping at once (to measure the round trip), then every KEEPALIVE_INTERVAL."""
        for nonce in itertools.count(1):
            if trio.current_time() - self._last_heard > KEEPALIVE_TIMEOUT:
                self.close_code, self.close_reason = CloseCode.GOING_AWAY, "keepalive timeout"
                self._cancel.cancel()
                return
            self._ping_sent = {nonce: trio.current_time()}
            self._queue_control(Ping(nonce=nonce))
            await trio.sleep(KEEPALIVE_INTERVAL)

    def _end(self, code: int, reason: str) -> None:
        """End the session now (from any task), telling the peer ``code`` and ``reason``."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._cancel.cancel()

    # -- sending -------------------------------------------------------------------------------

    def _queue_control(self, msg: Message) -> None:
        """Queue ``msg`` now; a peer that lets twice CONTROL_QUEUE_BYTES pile up is not reading,
        and its session ends (dropping would lose replies)."""
        plaintext = message_plaintext(msg)
        cost = len(plaintext) + QUEUED_ENTRY_BYTES
        if self._queued_bytes and self._queued_bytes + cost > 2 * CONTROL_QUEUE_BYTES:
            self._end(CloseCode.GOING_AWAY, f"peer is not reading ({self._queued_bytes} B queued)")
            return
        try:
            self._control_send.send_nowait(plaintext)
        except trio.ClosedResourceError:
            return
        self._queued_bytes += cost
        self._work.set()

    async def _queue_reply(self, reply: Message) -> None:
        """Queue a reply once the control queue has room for it (see CONTROL_QUEUE_BYTES)."""
        cost = len(message_plaintext(reply)) + QUEUED_ENTRY_BYTES
        with trio.move_on_after(REQUEST_TIMEOUT) as waited:
            while self._queued_bytes and self._queued_bytes + cost > CONTROL_QUEUE_BYTES:
                await self._room.park()
        if waited.cancelled_caught:
            self._end(CloseCode.GOING_AWAY, "peer is not reading (a reply waited for room)")
            return
        self._queue_control(reply)

    async def send(self, msg: Message) -> None:
        """Send a one-way message (queued ahead of bulk data)."""
        if self.closed.is_set():
            raise Unavailable(f"the session with {self.node_id[:16]}... is closed")
        self._queue_control(msg)

    def send_quietly(self, msg: Message) -> None:
        """Queue a one-way message if the session is still open (gossip: a closed session needs
        no news). It never waits, so gossip to many peers costs no task per message."""
        if not self.closed.is_set():
            self._queue_control(msg)

    async def send_data(
        self, stream: int, offset: int, payload: DataBlock | bytes | memoryview
    ) -> None:
        """Send a bulk data block; waits while the writer is BULK_QUEUE blocks behind."""
        if self.closed.is_set():
            raise Unavailable(f"the session with {self.node_id[:16]}... is closed")
        await self._bulk_send.send((stream, offset, payload))
        self._work.set()

    async def request(self, msg: Message, *, reply_timeout: float = REQUEST_TIMEOUT) -> Message:
        """Send a request (its ``id`` is replaced by a fresh one) and wait for the reply.

        Raises:
            NotPermitted, Unavailable, RequestFailed: the peer refused, or the session ended or
                timed out.
        """
        request_id = next(self._ids)
        msg = dataclasses.replace(msg, id=request_id)  # type: ignore[call-arg]
        pending = _Pending()
        self._pending[request_id] = pending
        try:
            await self.send(msg)
            with trio.move_on_after(reply_timeout):
                await pending.event.wait()
        finally:
            del self._pending[request_id]
        if pending.reply is None:
            if self.closed.is_set():
                raise Unavailable(f"the session with {self.node_id[:16]}... closed")
            raise Unavailable(f"{self.node_id[:16]}... did not answer within {reply_timeout:.0f} s")
        reply = pending.reply
        if isinstance(reply, ErrorReply):
            raise_for_reply(reply)
        expected = type(msg).REPLY_TYPE
        if expected is None or not isinstance(reply, expected):
            # the peer's protocol error: its session ends (a penalty no peer can shrug off)
            reason = f"answered {type(msg).__name__} with {type(reply).__name__}"
            self._end(CloseCode.PROTOCOL_ERROR, reason)
            raise RequestFailed(ErrorCode.BAD_REQUEST, f"{self.node_id[:16]}... {reason}")
        return reply

    def statistics(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "address": self.address,
            "direction": self.direction,
            "channels": sorted(self.channels),
            "rttMs": None if self.rtt is None else round(self.rtt * 1000, 3),
            "connectedSeconds": round(time.time() - self.connected_at, 1),
            "bytesSent": self.bytes_sent,
            "bytesReceived": self.bytes_received,
            "pendingRequests": len(self._pending),
            "messagesDropped": self.messages_dropped,
            "controlQueuedBytes": self._queued_bytes,
        }


def error_code_of(exc: KacheryError) -> str:
    """The ErrorCode sent for a local error raised while answering a request."""
    from kachery.protocol.errors import InvalidInput
    from kachery.storage.errors import NotFound

    if isinstance(exc, NotPermitted):
        return ErrorCode.NOT_PERMITTED
    if isinstance(exc, NotFound):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, InvalidInput):
        return ErrorCode.BAD_REQUEST
    if isinstance(exc, Unavailable):
        return ErrorCode.BUSY
    return ErrorCode.INTERNAL
