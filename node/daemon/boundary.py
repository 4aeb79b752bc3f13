"""The peer boundary: whatever goes wrong while serving one peer ends that peer's session only.

Every piece of work done for one remote party (an inbound connection from the upgrade on, a
dial, a session's reader, writer and handlers) runs inside ``PeerFaults.contain``. An exception
that escapes it is logged with the peer it concerns and counted (``statistics()``, shown by
``kachery-node status``); nothing outside that peer's work is cancelled. Expected network
failures (a reset, a closed websocket) are counted apart and logged at debug level only.

Non-goal: deciding what a peer may do (membership and roles) or penalising it (the services).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from kachery.node.errors import LinkClosed

log = logging.getLogger(__name__)

NETWORK_ERRORS = (
    OSError,
    ConnectionClosed,
    LinkClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)
"""What a reset, half-closed or vanished connection raises: the network's doing, not a bug."""

MAX_KINDS = 64
"""Distinct exception kinds counted by name (their number is bounded by the code, not the
peers; the cap is a second guard)."""


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (nested) exception group."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


class PeerFaults:
    """The one place where a peer's failures are contained, logged and counted."""

    def __init__(self) -> None:
        self.contained = 0
        """Unexpected exceptions that ended one peer's work (bugs, or input nothing checked)."""
        self.network = 0
        """Connections lost to the network (resets, closes) while serving a peer."""
        self.kinds: Counter[str] = Counter()

    @contextmanager
    def contain(self, peer: str, what: str) -> Iterator[None]:
        """Run the body for ``peer`` (a node ID or an address); nothing it raises gets out.

        Cancellation (``trio.Cancelled``, KeyboardInterrupt) passes through untouched.
        """
        try:
            yield
        except* NETWORK_ERRORS as group:
            self.network += len(leaves(group))
            log.debug("%s %s: connection lost (%s)", what, _short(peer), leaves(group)[0])
        except* Exception as group:
            for exc in leaves(group):
                self.contained += 1
                kind = type(exc).__name__
                if kind in self.kinds or len(self.kinds) < MAX_KINDS:
                    self.kinds[kind] += 1
                log.warning("%s %s ended by %s: %s", what, _short(peer), kind, exc, exc_info=exc)

    def statistics(self) -> dict[str, Any]:
        return {
            "peerFaultsContained": self.contained,
            "peerConnectionsLost": self.network,
            "peerFaultKinds": dict(self.kinds),
        }


class PerPeerSlots:
    """At most ``limit`` holders at once for each peer. A peer's semaphore exists only while
    someone holds or waits for it, so the map is bounded by the work in flight, not by how many
    peers ever came by."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: dict[str, trio.Semaphore] = {}

    @asynccontextmanager
    async def hold(self, peer: str) -> AsyncIterator[None]:
        slot = self._slots.get(peer)
        if slot is None:
            slot = self._slots[peer] = trio.Semaphore(self.limit)
        try:
            async with slot:
                yield
        finally:
            # a release hands the slot to a waiter directly: full again means nobody is left
            if slot.value == self.limit and self._slots.get(peer) is slot:
                del self._slots[peer]

    def __len__(self) -> int:
        return len(self._slots)


def _short(peer: str) -> str:
    """A node ID as the logs show it (16 hex digits), or an address as it is."""
    return f"{peer[:16]}..." if len(peer) == 64 else peer
