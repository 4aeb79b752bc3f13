"""Whom to dial next: a pure planning function, and the backoff that paces retries.

The node keeps a session with every other member of its channels, up to ``max_connections``.
``plan_dials`` decides synchronously, from what the node knows (members wanted, their announced
addresses, channel bootstrap addresses, sessions open, dials in progress, backoff), which dials
to start now; the node's dialer task carries them out and calls ``plan_dials`` again when
something changes or DIAL_INTERVAL passes (httpcore's "decide, then do the I/O").

Backoff is exponential with jitter, per target (a node ID, or a bootstrap address when the node
behind it is not known yet), so that a lab's worth of nodes restarting together do not dial in
lockstep, and a dead peer costs one dial every few minutes at most.
"""

from __future__ import annotations

from dataclasses import dataclass

DIAL_INTERVAL = 5.0
"""Seconds between planning rounds when nothing else wakes the dialer."""

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
"""A failing target is retried after 1, 2, 4 ... seconds, at most every 5 minutes (with jitter)."""

MAX_CONNECTIONS = 64
"""Sessions (open or being dialed) a node keeps at most."""

MAX_NEW_DIALS = 8
"""Dials started per planning round."""


@dataclass(frozen=True, slots=True)
class DialTarget:
    """A dial to start: the address, and the node expected there (None for a bootstrap)."""

    address: str
    node_id: str | None

    @property
    def key(self) -> str:
        return self.node_id or self.address


@dataclass(slots=True)
class Backoff:
    """Failures so far for one target, and when it may be tried again (monotonic seconds)."""

    failures: int = 0
    next_at: float = 0.0

    def failed(self, now: float, jitter: float) -> None:
        """Record a failure; ``jitter`` is a random number in [0, 1)."""
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**self.failures)
        self.next_at = now + delay * (0.5 + jitter)
        self.failures += 1


def plan_dials(
    *,
    now: float,
    wanted: dict[str, set[str]],
    addresses: dict[str, list[str]],
    bootstrap: dict[str, list[str]],
    connected: set[str],
    connected_channels: set[str],
    in_progress: set[str],
    backoff: dict[str, Backoff],
    own_addresses: set[str],
    max_connections: int = MAX_CONNECTIONS,
    max_new: int = MAX_NEW_DIALS,
) -> list[DialTarget]:
    """The dials to start now.

    Args:
        now: monotonic time.
        wanted: node IDs to keep a session with -> channels shared with them.
        addresses: node ID -> announced addresses.
        bootstrap: channel ID -> bootstrap addresses (used while no member of it is connected).
        connected: node IDs with an open session.
        connected_channels: channels served by at least one open session.
        in_progress: keys (node IDs or addresses) of dials under way.
        backoff: key -> failures and retry time.
        own_addresses: this node's addresses (never dialed).
    """
    room = min(max_new, max_connections - len(connected) - len(in_progress))
    targets: list[DialTarget] = []
    # Members that share the most channels first; then by ID, so plans are deterministic.
    for node_id in sorted(wanted, key=lambda n: (-len(wanted[n]), n)):
        if len(targets) >= room:
            return targets
        if node_id in connected or node_id in in_progress:
            continue
        state = backoff.get(node_id)
        if state is not None and state.next_at > now:
            continue
        choices = [a for a in addresses.get(node_id, []) if a not in own_addresses]
        if not choices:
            continue
        failures = 0 if state is None else state.failures
        targets.append(DialTarget(choices[failures % len(choices)], node_id))
    for channel_id in sorted(bootstrap):
        if channel_id in connected_channels:
            continue
        for address in bootstrap[channel_id]:
            if len(targets) >= room:
                return targets
            if address in own_addresses or address in in_progress:
                continue
            if any(t.address == address for t in targets):
                continue
            state = backoff.get(address)
            if state is not None and state.next_at > now:
                continue
            targets.append(DialTarget(address, None))
    return targets
