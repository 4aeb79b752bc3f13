"""Subfeeds in use on a node: their heads, newest messages, gossip state and signers.

A ``LiveSubfeed`` is what the feed service keeps per subfeed in use: its head (count, last
signature, chain value), the newest messages in memory (``Recent``: at most RECENT_MESSAGES and
RECENT_BYTES), the owner's checkpoints, messages stashed ahead of a gap, the gossip state
(``SubfeedGossip``) and, for an owned feed, the signer. The helpers below turn stored messages
into the JSON the local API answers, and cut batches for the wire.

Non-goal: loading and storing them (service.py, writer.py).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from kachery.node.changes import Changes
from kachery.protocol.feed_gossip import SubfeedGossip
from kachery.protocol.feed_messages import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES
from kachery.protocol.feeds import Checkpoint, FeedSigner, Head, SubfeedRef, decode_record
from kachery.protocol.kachery_json import JSONValue

RECENT_MESSAGES = 4096
"""Newest messages of a subfeed kept in memory (pushes, duplicate checks, live reads)..."""

RECENT_BYTES = 4 * 1024 * 1024
"""...and at most this many bytes of them."""

READ_LIMIT = 1000
"""Messages ``feed_read`` returns by default."""

DEFAULT_SUBFEED = "default"


class Recent:
    """The newest messages of a subfeed, in memory: numbers ``start .. start + len - 1``."""

    __slots__ = ("bodies", "bytes", "signatures", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.bodies: list[bytes] = []
        self.signatures: list[bytes] = []
        self.bytes = 0

    def extend(self, start: int, bodies: Sequence[bytes], signatures: Sequence[bytes]) -> None:
        if start != self.start + len(self.bodies):
            self.start, self.bodies, self.signatures, self.bytes = start, [], [], 0
        self.bodies.extend(bodies)
        self.signatures.extend(signatures)
        self.bytes += sum(len(b) for b in bodies)
        if len(self.bodies) > RECENT_MESSAGES or self.bytes > RECENT_BYTES:
            drop = len(self.bodies) // 2
            self.bytes -= sum(len(b) for b in self.bodies[:drop])
            del self.bodies[:drop]
            del self.signatures[:drop]
            self.start += drop

    def get(self, n: int) -> tuple[bytes, bytes] | None:
        i = n - self.start
        if 0 <= i < len(self.bodies):
            return self.bodies[i], self.signatures[i]
        return None

    def slice(self, start: int, end: int) -> list[tuple[bytes, bytes]] | None:
        """Messages ``start .. end - 1`` if all are here."""
        if start < self.start or end > self.start + len(self.bodies):
            return None
        a, b = start - self.start, end - self.start
        return list(zip(self.bodies[a:b], self.signatures[a:b], strict=True))


@dataclass(eq=False)
class LiveSubfeed:
    """A subfeed in use on this node (see the module docstring)."""

    ref: SubfeedRef
    sf: int
    name: str | None
    head: Head
    signer: FeedSigner | None = None
    channels: set[str] = field(default_factory=set)
    """Channels this node follows the subfeed in."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    changed: Changes = field(default_factory=Changes)
    gossip: SubfeedGossip = field(default_factory=SubfeedGossip)
    recent: Recent = field(init=False)
    checkpoints: deque[Checkpoint] = field(default_factory=lambda: deque(maxlen=16))
    stash: dict[int, tuple[bytes, bytes, str]] = field(default_factory=dict)
    forked: bool = False
    pulling: bool = False
    deleted: bool = False

    def __post_init__(self) -> None:
        self.recent = Recent(self.head.count)

    @property
    def count(self) -> int:
        return self.head.count

    @property
    def followed(self) -> bool:
        return bool(self.channels)

    async def wait_beyond(self, count: int) -> None:
        """Wait until more than ``count`` messages are held (or the subfeed is deleted)."""
        while self.head.count <= count and not self.deleted:
            await self.changed.wait()


@dataclass
class FeedStats:
    """Counters of the feed service (``kachery-node status``)."""

    appended: int = 0
    signed_with_precomputed_nonce: int = 0
    received: int = 0
    duplicates: int = 0
    proven_by_checkpoint: int = 0
    verified_one_by_one: int = 0
    pushes_sent: int = 0
    haves_sent: int = 0
    pulls: int = 0
    offences: int = 0
    forks: int = 0
    commits: int = 0
    inline_writes: int = 0
    thread_writes: int = 0


def chunks(
    start: int, items: list[tuple[bytes, bytes]]
) -> list[tuple[int, list[tuple[bytes, bytes]]]]:
    """Split messages into batches within MAX_BATCH_MESSAGES and MAX_BATCH_BYTES."""
    out: list[tuple[int, list[tuple[bytes, bytes]]]] = []
    chunk: list[tuple[bytes, bytes]] = []
    size = 0
    for item in items:
        n = len(item[0]) + len(item[1])
        if chunk and (len(chunk) >= MAX_BATCH_MESSAGES or size + n > MAX_BATCH_BYTES):
            out.append((start, chunk))
            start += len(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        out.append((start, chunk))
    return out


def size_of(items: Sequence[tuple[bytes, bytes]]) -> int:
    return sum(len(b) + len(s) for b, s in items)


def split(indices: range, parts: int) -> list[range]:
    step = max(1, math.ceil(len(indices) / parts))
    return [range(i, min(i + step, indices.stop)) for i in range(indices.start, indices.stop, step)]


def record_json(body: bytes, signature: bytes, *, signed: bool) -> dict[str, Any]:
    record = decode_record(body)
    out: dict[str, Any] = {
        "messageNumber": record.number,
        "timestamp": record.timestamp,
        "message": record.message,
        "metaData": record.metadata,
    }
    if signed:
        out["body"] = body.hex()
        out["signature"] = signature.hex()
    return out


def evidence_json(item: tuple[bytes, bytes], message: JSONValue, timestamp: int) -> dict[str, Any]:
    return {
        "message": message,
        "timestamp": timestamp,
        "body": item[0].hex(),
        "signature": item[1].hex(),
    }


def names(ref: SubfeedRef) -> dict[str, str]:
    return {"feed_id": ref.feed_id, "subfeed_hash": ref.subfeed_hash}


def name_of(s: Any) -> str:
    return str(s.subfeed_name) if s.subfeed_name is not None else f"~{s.subfeed_hash}"
