"""The chunk exchange, sans-I/O: its messages, and the plan of a download.

Messages. ``FindFile`` asks a peer whether it can serve a file (or a manifest); the answer says
its size and manifest. ``GetData`` asks for the bytes ``[start, end)`` of a file; the provider
sends them as bulk data frames on the request's ``stream`` (session.py ``KIND_DATA``), then
answers ``GetDataResponse``. Both need ``requestFiles`` in the request's channel; a node answers
them only where it has ``provideFiles``.

``DownloadPlan`` decides, from what has happened so far, which piece to ask of which provider:
pieces go in file order (sequential disk writes), each provider holds up to
``PIECES_PER_PROVIDER`` pieces at once, so a faster provider finishes sooner and gets the next
piece, and providers are ranked by measured rate. When no unassigned piece is left, idle
providers duplicate the pieces still in flight (the end game) and the first verified copy
wins. A provider that sends bytes that fail verification is dropped for this file. The plan
does no I/O and reads no clock: the caller passes the time in.

Non-goal: moving bytes (node/services/files/ does) and verifying them (hashlib, in the node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._hex import is_sha1_hex
from .errors import RemoteProtocolError
from .manifest import CHUNK_SIZE, Manifest
from .messages import Message, MsgType, message

DATA_FRAME_BYTES = 256 * 1024
"""Bytes of file data per bulk frame: large enough to amortise per-frame costs, small enough that
a control message waits at most one frame (~0.3 ms at 1 GB/s) behind bulk data."""


def frame_sizes(start: int, size: int) -> list[int]:
    """How a provider splits the ``size`` bytes at file offset ``start`` into data frames.

    Frames break at multiples of DATA_FRAME_BYTES of the file, not of the range: every frame but
    a range's first and last then covers whole pages at a page-aligned offset, which the
    downloader writes to disk without a copy (O_DIRECT). Receivers accept any split.
    """
    first = min(size, DATA_FRAME_BYTES - start % DATA_FRAME_BYTES)
    sizes = [first] if first else []
    sizes.extend(min(DATA_FRAME_BYTES, size - at) for at in range(first, size, DATA_FRAME_BYTES))
    return sizes


MAX_GET_BYTES = CHUNK_SIZE
"""Largest range one GetData may ask for: one manifest piece."""

PIECES_PER_PROVIDER = 2
"""Pieces in flight per provider: one being sent, one queued, so the pipe never idles."""

MAX_PROVIDER_FAILURES = 3
"""Failed pieces after which a provider is not revived for this file even if found again."""


@message(MsgType.FIND_FILE)
@dataclass(frozen=True, slots=True, kw_only=True)
class FindFile(Message):
    """Can you serve the file (or manifest) whose SHA-1 is ``sha1``?"""

    id: int
    channel: str
    sha1: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_sha1(self.sha1)


@message(MsgType.FIND_FILE_RESPONSE, answers=FindFile)
@dataclass(frozen=True, slots=True, kw_only=True)
class FindFileResponse(Message):
    """``has``: this node serves it now; ``size`` and ``manifest_sha1`` describe it."""

    id: int
    has: bool
    size: int | None = None
    manifest_sha1: str | None = None


@message(MsgType.GET_DATA)
@dataclass(frozen=True, slots=True, kw_only=True)
class GetData(Message):
    """Send bytes ``[start, end)`` of file ``sha1`` as data frames on ``stream``."""

    id: int
    channel: str
    sha1: str
    start: int
    end: int
    stream: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_sha1(self.sha1)
        if not 0 <= self.start <= self.end or self.end - self.start > MAX_GET_BYTES:
            raise RemoteProtocolError(
                f"GetData range {self.start}..{self.end} is not 0 <= start <= end"
                f" with at most {MAX_GET_BYTES} bytes"
            )
        if not 0 <= self.stream < 2**32:
            raise RemoteProtocolError("GetData stream must fit in 32 bits")


@message(MsgType.GET_DATA_RESPONSE, answers=GetData, after_data=True)
@dataclass(frozen=True, slots=True, kw_only=True)
class GetDataResponse(Message):
    """All frames of the range were sent (``sent`` bytes); it travels behind them."""

    id: int
    sent: int


@message(MsgType.CANCEL_DATA)
@dataclass(frozen=True, slots=True, kw_only=True)
class CancelData(Message):
    """Stop sending ``stream`` (the downloader has the piece from someone else)."""

    stream: int


def _check_sha1(value: str) -> None:
    if not is_sha1_hex(value):
        raise RemoteProtocolError(f"{value!r} is not a 40-hex-digit SHA-1")


# -- planning ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Piece ``index``: bytes ``[start, end)``, which must hash to ``sha1``."""

    index: int
    start: int
    end: int
    sha1: str

    @property
    def size(self) -> int:
        return self.end - self.start


def pieces_of(size: int, sha1: str, manifest: Manifest | None) -> list[Piece]:
    """The pieces of a file: the manifest's chunks, or one piece for a small file."""
    if manifest is None:
        return [Piece(0, 0, size, sha1)]
    return [Piece(i, c.start, c.end, c.sha1) for i, c in enumerate(manifest.chunks)]


@dataclass(slots=True)
class ProviderState:
    """What the plan knows of one provider."""

    node_id: str
    rate: float = 0.0
    """Bytes per second, an exponentially weighted average of finished pieces."""
    in_flight: set[int] = field(default_factory=set)
    dropped: str = ""
    """Why it was dropped for this file (empty while it is usable)."""
    corrupt: bool = False
    """It sent bytes that failed verification: never used again for this file."""
    failures: int = 0
    delivered: int = 0


@dataclass(frozen=True, slots=True)
class Assignment:
    """Ask ``provider`` for ``piece``."""

    provider: str
    piece: Piece


class DownloadPlan:
    """Which piece to fetch from which provider next.

    Args:
        pieces: the file's pieces (``pieces[i].index == i``).
        verified: indexes already verified (a resumed download).
        providers: node IDs that said they have the file, best first.
        wanted: indexes to fetch (for a byte range); all by default.
    """

    RATE_WEIGHT = 0.5
    """Weight of the newest measurement in a provider's rate average."""

    def __init__(
        self,
        pieces: list[Piece],
        verified: set[int],
        providers: list[str],
        wanted: set[int] | None = None,
    ) -> None:
        self.pieces = pieces
        self.wanted = set(range(len(pieces))) if wanted is None else set(wanted)
        self.verified = set(verified)
        self.checking: set[int] = set()
        """Pieces that arrived and are being verified: not in flight, not to be assigned."""
        self.providers: dict[str, ProviderState] = {p: ProviderState(p) for p in providers}
        self._order = list(providers)

    # -- queries -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.wanted <= self.verified

    @property
    def usable(self) -> list[ProviderState]:
        return [self.providers[p] for p in self._order if not self.providers[p].dropped]

    def in_flight(self) -> set[int]:
        return {i for p in self.providers.values() for i in p.in_flight}

    def verified_bytes(self) -> int:
        return sum(self.pieces[i].size for i in self.verified)

    def statistics(self) -> dict[str, Any]:
        return {
            p.node_id: {"rate": p.rate, "delivered": p.delivered, "dropped": p.dropped}
            for p in self.providers.values()
        }

    # -- decisions -----------------------------------------------------------------------------

    def add_provider(self, node_id: str) -> None:
        """Add a provider found since, or revive one that went away (never a corrupt one)."""
        state = self.providers.get(node_id)
        if state is None:
            self.providers[node_id] = ProviderState(node_id)
            self._order.append(node_id)
        elif not state.corrupt and state.failures < MAX_PROVIDER_FAILURES:
            state.dropped = ""

    def next_assignments(self) -> list[Assignment]:
        """Pieces to request now; each returned assignment is recorded as in flight."""
        assignments: list[Assignment] = []
        flying = self.in_flight()
        waiting = [
            p
            for p in self.pieces
            if p.index in self.wanted
            and p.index not in self.verified
            and p.index not in flying
            and p.index not in self.checking
        ]
        ranked = sorted(self.usable, key=lambda p: -p.rate)
        # Normal phase: unassigned pieces in file order to providers with free slots, fastest first.
        progress = True
        while waiting and progress:
            progress = False
            for provider in ranked:
                if waiting and len(provider.in_flight) < PIECES_PER_PROVIDER:
                    piece = waiting.pop(0)
                    provider.in_flight.add(piece.index)
                    assignments.append(Assignment(provider.node_id, piece))
                    progress = True
        if waiting:
            return assignments
        # End game: idle providers duplicate pieces in flight elsewhere (least-covered first).
        for provider in ranked:
            if provider.in_flight:
                continue
            coverage: dict[int, int] = {}
            for other in self.providers.values():
                for i in other.in_flight:
                    coverage[i] = coverage.get(i, 0) + 1
            candidates = sorted(coverage, key=lambda i: (coverage[i], i))
            if candidates:
                index = candidates[0]
                provider.in_flight.add(index)
                assignments.append(Assignment(provider.node_id, self.pieces[index]))
        return assignments

    def piece_arrived(self, provider: str, index: int, seconds: float) -> None:
        """All bytes of a piece arrived: the provider's slot is free while it is verified.

        Duplicates elsewhere (end game) go on until this copy is known to be good.
        """
        state = self.providers[provider]
        state.in_flight.discard(index)
        size = self.pieces[index].size
        state.delivered += size
        measured = size / max(seconds, 1e-6)
        if state.rate == 0:
            state.rate = measured
        else:
            state.rate = self.RATE_WEIGHT * measured + (1 - self.RATE_WEIGHT) * state.rate
        self.checking.add(index)

    def piece_verified(self, index: int) -> list[str]:
        """A piece that arrived matched its hash and is written.

        Returns the providers still fetching a duplicate of it (to cancel).
        """
        self.checking.discard(index)
        self.verified.add(index)
        others = []
        for other in self.providers.values():
            if index in other.in_flight:
                other.in_flight.discard(index)
                others.append(other.node_id)
        return others

    def piece_failed(self, provider: str, index: int, reason: str, *, corrupt: bool) -> None:
        """A piece did not arrive (``corrupt``: it arrived and failed verification).

        The provider is dropped for this file; one that was merely unreachable may come back
        through ``add_provider``.
        """
        state = self.providers[provider]
        state.in_flight.discard(index)
        self.checking.discard(index)
        state.dropped = reason
        state.corrupt = state.corrupt or corrupt
        state.failures += 1

    def revivable(self, node_id: str) -> bool:
        """A provider not in the plan, or dropped but worth another try."""
        state = self.providers.get(node_id)
        return state is None or (
            bool(state.dropped) and not state.corrupt and state.failures < MAX_PROVIDER_FAILURES
        )

    def piece_cancelled(self, provider: str, index: int) -> None:
        """A duplicate request was cancelled because another copy won."""
        self.providers[provider].in_flight.discard(index)
