"""What a service may use of the node that runs it: the narrow interface between node/daemon/ and
node/services/.

A service is given a ``Host`` (the daemon's ``Node`` is one) and the other services it needs, at
construction; it never sees the ``Node`` class. It reads the node's identity, home and membership,
looks at the open sessions (read-only), runs blocking storage calls in worker threads
(``run_sync``), starts background work (``spawn``), and waits on or signals a change of state
(``wait_until`` / ``notify``). It does not register its peer handlers: node/daemon/routes.py lists
every peer message with its handler and the role its sender needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from kachery.node.daemon.membership import Membership
    from kachery.node.daemon.peer import PeerConnection
    from kachery.node.home import NodeHome

T = TypeVar("T")


class Host(Protocol):
    """The node, as its services see it."""

    @property
    def node_id(self) -> str:
        """This node's ID (hex public key)."""

    @property
    def home(self) -> NodeHome:
        """The node home: its stores and keys."""

    @property
    def membership(self) -> Membership:
        """The channels this node belongs to, their members and roles."""

    @property
    def connections(self) -> Mapping[str, PeerConnection]:
        """Open sessions by peer ID (read-only: the node opens and closes them)."""

    def sessions_in(self, channel: str) -> list[PeerConnection]:
        """Open sessions that serve ``channel``."""

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking storage call in a worker thread."""

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background, in the node's nursery."""

    def notify(self) -> None:
        """Wake everyone waiting in ``wait_until`` (state changed)."""

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (without polling) until ``predicate()`` holds after some state change."""
