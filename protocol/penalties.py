"""Offences of peers (invalid data they sent) and the bans they earn: socket-free, time as numbers.

A peer that sends data failing its check (a corrupt piece, a forged feed message) commits an
offence; at the threshold the node closes its session and ignores it for a while. Bans expire:
an honest peer blamed wrongly, or one whose disk was repaired, is trusted again later. Used by
the file and feed services, each with its own box. Non-goal: deciding what is an offence.
"""

from __future__ import annotations

PENALTY_THRESHOLD = 3
"""Offences after which a peer's session is closed and it is banned..."""

BAN_SECONDS = 600.0
"""...for this long: what it sends is ignored meanwhile, and it is not asked."""


class PenaltyBox:
    """Offences per peer, and bans.

    Args:
        threshold: offences that close the session and ban the peer.
        ban_seconds: how long a ban lasts.
    """

    def __init__(
        self, *, threshold: int = PENALTY_THRESHOLD, ban_seconds: float = BAN_SECONDS
    ) -> None:
        self.threshold = threshold
        self.ban_seconds = ban_seconds
        self.offences: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}

    def offence(self, peer: str, now: float) -> bool:
        """Record one offence by ``peer``; True if it must now be cut off (and it is banned)."""
        count = self.offences.get(peer, 0) + 1
        self.offences[peer] = count
        if count >= self.threshold:
            self._banned_until[peer] = now + self.ban_seconds
            self.offences[peer] = 0
            return True
        return False

    def banned(self, peer: str, now: float) -> bool:
        """True while ``peer`` serves a ban."""
        until = self._banned_until.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._banned_until[peer]
            return False
        return True

    def banned_peers(self, now: float) -> frozenset[str]:
        return frozenset(p for p in list(self._banned_until) if self.banned(p, now))
