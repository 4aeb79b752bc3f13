"""The services a node runs beside membership: files (chunk exchange), feeds, tasks.

A service is built with the node, registers the peer requests and messages it answers
(``node.on_request``, ``node.on_message``, ``node.on_data``), may run background tasks in the
node's nursery (``run``), and exposes its local-API methods with ``@exposed``. ``build_services``
is the one place that lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from kachery.node.daemon.node import Node


class Service(Protocol):
    """What the node expects of a service."""

    name: str
    """Its key in ``kachery-node status`` (``files``, ``feeds``, ``tasks``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start background work in the node's nursery; call ``task_status.started()``."""

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status`` (trio's ``statistics()`` convention)."""


def build_services(node: Node) -> list[Service]:
    """Create the node's services (each registers its handlers with ``node``)."""
    from kachery.node.services.feeds import FeedService
    from kachery.node.services.files import FileService
    from kachery.node.services.tasks import TaskService

    return [
        FileService(node, max_upload_rate=node.max_upload_rate),
        FeedService(node),
        TaskService(node),
    ]
