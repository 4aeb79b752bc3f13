"""Fetching bytes: one piece (a byte range) of a file from one provider.

``Fetcher.fetch`` sends a ``GetData`` with a fresh stream number and collects the bulk data frames
of that stream (``on_data``) into a ``Receiver``, in order, without copying; a provider that sends
nothing for STALL_SECONDS is abandoned, and a cancelled fetch tells the provider to stop. Hashing
is the caller's, in a worker thread. ``penalise`` records an offence against a peer that sent
bytes provably not what was asked for, and closes its session at the ban threshold.

Non-goals: which provider to ask (download.py), what the bytes should hash to (the manifest).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import TYPE_CHECKING

import trio

from kachery.node.daemon.peer import PeerConnection, RequestFailed
from kachery.node.errors import Unavailable, lone_error
from kachery.node.services.files.disk import hash_frames
from kachery.node.services.files.finding import Provider
from kachery.protocol.errors import CloseCode
from kachery.protocol.files import CancelData, GetData, Piece
from kachery.protocol.penalties import PenaltyBox
from kachery.protocol.session import DataReceived

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger("kachery.node.services.files")

STALL_SECONDS = 30.0
"""A piece request that receives nothing for this long is abandoned (the provider stalled)."""


class Receiver:
    """One piece request in flight: its frames, kept as they arrived (no copy into a buffer).

    Frames of one range come in order from their provider. Nothing is hashed on arrival: the
    event loop only decrypts and files the frames, and ``digest`` runs in a worker thread once
    the piece is complete (hashlib releases the GIL), so receiving the next piece overlaps
    checking this one. Written with one ``pwritev`` per piece.
    """

    def __init__(self, piece: Piece) -> None:
        self.piece = piece
        self.frames: list[memoryview] = []
        self.received = 0
        self.last_data = trio.current_time()
        self.error = ""

    def put(self, offset: int, payload: memoryview) -> None:
        if offset != self.piece.start + self.received:
            self.error = f"sent bytes at {offset}, expected {self.piece.start + self.received}"
            return
        if self.received + len(payload) > self.piece.size:
            self.error = f"sent bytes past the end of the requested piece ({self.piece.end})"
            return
        self.frames.append(payload)
        self.received += len(payload)
        self.last_data = trio.current_time()

    def digest(self) -> str:
        """The SHA-1 of the received bytes (blocking: call it in a worker thread)."""
        hasher = hashlib.sha1()
        hash_frames(hasher, self.frames)
        return hasher.hexdigest()

    def data(self) -> bytes:
        return b"".join(self.frames)


class Fetcher:
    """Pieces in flight from this node's providers."""

    def __init__(self, node: Host, penalties: PenaltyBox) -> None:
        self.node = node
        self.penalties = penalties
        self._receivers: dict[tuple[str, int], Receiver] = {}
        self._streams = itertools.count(1)

    async def fetch(self, provider: Provider, sha1: str, piece: Piece) -> Receiver:
        """Ask ``provider`` for ``piece`` of ``sha1``; return when all its bytes arrived.

        Raises:
            Unavailable, NotPermitted, RequestFailed: it did not deliver (the message says why).
        """
        conn = self.node.connections.get(provider.node_id)
        if conn is None:
            raise Unavailable(f"{provider.node_id[:16]}... is no longer connected")
        stream = next(self._streams)
        receiver = Receiver(piece)
        self._receivers[(conn.node_id, stream)] = receiver
        request = GetData(
            id=0,
            channel=provider.channel,
            sha1=sha1,
            start=piece.start,
            end=piece.end,
            stream=stream,
        )
        try:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_stall, receiver, nursery.cancel_scope)
                    try:
                        await conn.request(request, reply_timeout=float("inf"))
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise lone_error(group) from None
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._send_cancel(conn, stream)
            raise
        finally:
            del self._receivers[(conn.node_id, stream)]
        if receiver.error:
            raise RequestFailed("bad-data", f"{conn.node_id[:16]}... {receiver.error}")
        if receiver.received != piece.size:
            stalled = trio.current_time() - receiver.last_data >= STALL_SECONDS
            raise Unavailable(
                f"{conn.node_id[:16]}... sent {receiver.received} of {piece.size} bytes"
                + (" (stalled)" if stalled else "")
            )
        return receiver

    async def _watch_stall(self, receiver: Receiver, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(STALL_SECONDS / 3)
            if trio.current_time() - receiver.last_data >= STALL_SECONDS:
                scope.cancel()
                return

    async def _send_cancel(self, conn: PeerConnection, stream: int) -> None:
        conn.send_quietly(CancelData(stream=stream))

    def penalise(self, node_id: str, reason: str) -> None:
        """An offence: ``node_id`` sent bytes that are provably not what was asked for."""
        banned = self.penalties.offence(node_id, trio.current_time())
        ban = f": not asked for {self.penalties.ban_seconds:.0f} s" if banned else ""
        log.warning("%s... %s%s", node_id[:16], reason, ban)
        conn = self.node.connections.get(node_id)
        if banned and conn is not None:
            self.node.spawn(conn.close, CloseCode.PROTOCOL_ERROR, "sent corrupt data repeatedly")

    async def on_data(self, conn: PeerConnection, event: DataReceived) -> None:
        receiver = self._receivers.get((conn.node_id, event.stream))
        if receiver is not None:
            receiver.put(event.offset, event.payload)
