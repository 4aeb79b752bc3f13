"""What the parts of the task service share: limits and timings, counters, and two helpers.

Non-goal: any behaviour (the other modules of this package).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kachery.node.services.host import Host
from kachery.protocol.channel import Role
from kachery.protocol.errors import KacheryError
from kachery.protocol.tasks import TaskType

log = logging.getLogger("kachery.node.services.tasks")

LEASE_SECONDS = 30.0
"""A provider's lease on a task it took: renewed every third of it while the task is queued or
running; a requester that hears nothing for this long asks another provider. Shorter than the
session keepalive (45 s), so a hung provider is noticed before its session is."""

RENEWALS_PER_LEASE = 3
"""Renewals sent per lease period: two may be lost before a lease lapses."""

NO_PROVIDER_SECONDS = 10.0
"""How long a request waits for any member to serve its function before it fails: sessions and
announcements arrive within a second of start-up, and a restarted worker re-announces at once."""

DEFAULT_TIMEOUTS = {
    TaskType.PURE: 3600.0,
    TaskType.QUERY: 30.0,
    TaskType.ACTION: 300.0,
}
"""Seconds a request may take by default: calculations can be long (the lease, not the timeout,
detects a dead provider); a query falls back to its last result quickly; an action in between."""

MAX_TIMEOUT = 7 * 24 * 3600.0
"""Longest timeout accepted (a week)."""

RETRY_SECONDS = 1.0
"""A provider given up on without a change (busy, silent) is asked again after this, doubling
with each failure up to RETRY_MAX_SECONDS."""

RETRY_MAX_SECONDS = 30.0

LOOKUP_SECONDS = 2.0
"""How long to wait for members to say whether they hold a result: past that, running the task
is the better bet."""

REQUESTS_PER_PEER = 32
"""Task requests and lookups in flight to one peer (it answers at most 64 requests at once)."""

FETCHES_AT_ONCE = 16
"""Result files fetched at once (each asks every peer who has it)."""

KEPT_REQUESTS = 10_000
"""Finished requests remembered for ``task status`` and ``task list`` (results stay cached in
the database regardless)."""

KEPT_ENDED_REQUESTS = 1000
"""Ended requests whose final state is kept in the database, so ``task status``, ``task wait``
and ``task list`` still know them after the daemon restarts."""

KEEP_ENDED_SECONDS = 1.0
"""Ended requests' states are written at most this long after they end, all that ended meanwhile
in one transaction (and at exit): one write per request cost the requester daemon ~0.5 ms of CPU
each and added ~0.8 ms to a cached request's p50 in ``scripts/bench/tasks``."""

MIN_ID_PREFIX = 8
"""The fewest leading characters of a request or task ID that ``task_status`` takes for it."""

DEFAULT_BACKEND_SLOTS = 4
"""Jobs a worker runs at once unless it says otherwise."""

MAX_BACKEND_SLOTS = 256


@dataclass(slots=True)
class TaskStats:
    """Counters of the task service (``kachery-node status``)."""

    requests: int = 0
    cache_hits: int = 0
    lookup_hits: int = 0
    provider_cache_hits: int = 0
    """Pure calculations answered from the cache of the provider asked to run them."""
    computed: int = 0
    fallbacks: int = 0
    errors: int = 0
    jobs_run: int = 0
    jobs_answered_from_cache: int = 0
    lookups_answered: int = 0
    results_inline: int = 0
    """Results that arrived inside the provider's (or holder's) message."""
    results_fetched: int = 0
    """Results fetched with the chunk exchange (over INLINE_RESULT_BYTES)."""


def has_role(node: Host, channel: str, node_id: str, role: Role) -> bool:
    """Whether ``node_id`` holds ``role`` in ``channel`` (as this node's membership says)."""
    return role in node.membership.roles_of(channel, node_id)


def spawn_guarded(node: Host, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
    """Run ``fn(*args)`` in the background; a KacheryError it raises (a database or session
    failure) is logged, never allowed to take the node down."""

    async def guarded() -> None:
        try:
            await fn(*args)
        except KacheryError as exc:
            log.warning("task service: %s failed: %s", getattr(fn, "__name__", fn), exc)

    node.spawn(guarded)
