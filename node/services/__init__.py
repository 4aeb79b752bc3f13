"""The services a node runs beside membership: files (chunk exchange), feeds, tasks.

A service is built with a ``Host`` (host.py: the narrow view of the node it may use) and the other
services it needs, may run background tasks in the node's nursery (``run``), and exposes its
local-API methods with ``@exposed``. Its peer handlers are public methods (``on_<message>``) that
node/daemon/routes.py lists, with the role each sender needs; a service never registers them
itself. ``Services`` is the one place that builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:  # imported when built: the nonce maker process runs from this package
    from kachery.node.services.feeds.api import FeedAPI
    from kachery.node.services.feeds.service import FeedService
    from kachery.node.services.files.service import FileService
    from kachery.node.services.host import Host
    from kachery.node.services.tasks.service import TaskService


class Service(Protocol):
    """What the node expects of a service."""

    name: str
    """Its key in ``kachery-node status`` (``files``, ``feeds``, ``tasks``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start background work in the node's nursery; call ``task_status.started()``."""

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status`` (trio's ``statistics()`` convention)."""


@dataclass(frozen=True, slots=True)
class Services:
    """A node's services, each given what it needs at construction."""

    files: FileService
    feeds: FeedService
    feed_api: FeedAPI
    tasks: TaskService

    @classmethod
    def build(cls, host: Host, *, max_upload_rate: float | None = None) -> Services:
        from kachery.node.services.feeds.api import FeedAPI
        from kachery.node.services.feeds.service import FeedService
        from kachery.node.services.files.service import FileService
        from kachery.node.services.tasks.service import TaskService

        files = FileService(host, max_upload_rate=max_upload_rate)
        feeds = FeedService(host)
        return cls(
            files=files, feeds=feeds, feed_api=FeedAPI(feeds), tasks=TaskService(host, files)
        )

    def all(self) -> tuple[Service, ...]:
        """In start order (the task service offers its kept results to the file service)."""
        return (self.files, self.feeds, self.tasks)

    def controls(self) -> tuple[object, ...]:
        """The objects whose ``@exposed`` methods the local API serves."""
        return (self.files, self.feed_api, self.tasks, self.tasks.workers)
