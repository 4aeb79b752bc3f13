"""kachery-node: the runtime, and the Python client (``import kachery.node as kn``).

The client mirrors kachery-client. Files: ``store_file``, ``load_file``, ``load_bytes``,
``store_json``/``load_json``, ``store_text``/``load_text``, ``store_npy``/``load_npy``.
Mutables: ``set``/``get``. Feeds: ``create_feed``, ``load_feed``, ``get_feed_id``, ``Feed``,
``Subfeed`` (``append_message``, ``get_next_messages``, ``message_stream``, ``watch``).
Tasks: ``taskfunction``, ``run_task_backend``, ``request_task`` (a ``TaskHandle``). Errors are
``KacheryError``s (``TaskFailed`` is one) whose message says what went wrong. It finds the node
through ``$KACHERY_NODE_HOME``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kachery.protocol.lazy import lazy_exports

if TYPE_CHECKING:
    from kachery.protocol.errors import KacheryError

    from .client.feeds import Feed, Subfeed, create_feed, get_feed_id, load_feed, load_subfeed
    from .client.files import (
        load_bytes,
        load_file,
        load_json,
        load_npy,
        load_text,
        store_bytes,
        store_file,
        store_json,
        store_npy,
        store_text,
    )
    from .client.mutables import get, set
    from .client.tasks import TaskFailed, TaskHandle, request_task, run_task_backend, taskfunction

__all__ = [
    "Feed",
    "KacheryError",
    "Subfeed",
    "TaskFailed",
    "TaskHandle",
    "create_feed",
    "get",
    "get_feed_id",
    "load_bytes",
    "load_feed",
    "load_file",
    "load_json",
    "load_npy",
    "load_subfeed",
    "load_text",
    "request_task",
    "run_task_backend",
    "set",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
    "store_text",
    "taskfunction",
]

_HOMES = {
    "Feed": ".client.feeds",
    "KacheryError": "kachery.protocol.errors",
    "Subfeed": ".client.feeds",
    "TaskFailed": ".client.tasks",
    "TaskHandle": ".client.tasks",
    "create_feed": ".client.feeds",
    "get": ".client.mutables",
    "get_feed_id": ".client.feeds",
    "load_bytes": ".client.files",
    "load_feed": ".client.feeds",
    "load_file": ".client.files",
    "load_json": ".client.files",
    "load_npy": ".client.files",
    "load_subfeed": ".client.feeds",
    "load_text": ".client.files",
    "request_task": ".client.tasks",
    "run_task_backend": ".client.tasks",
    "set": ".client.mutables",
    "store_bytes": ".client.files",
    "store_file": ".client.files",
    "store_json": ".client.files",
    "store_npy": ".client.files",
    "store_text": ".client.files",
    "taskfunction": ".client.tasks",
}
"""Where each name lives: imported on first use, so the command line, which imports
kachery.node's modules, starts without loading every client."""


__getattr__ = lazy_exports(__name__, _HOMES)
