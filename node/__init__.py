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

    from .feeds_client import Feed, Subfeed, create_feed, get_feed_id, load_feed, load_subfeed
    from .files_client import (
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
    from .mutables_client import get, set
    from .tasks_client import TaskFailed, TaskHandle, request_task, run_task_backend, taskfunction

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
    "Feed": ".feeds_client",
    "KacheryError": "kachery.protocol.errors",
    "Subfeed": ".feeds_client",
    "TaskFailed": ".tasks_client",
    "TaskHandle": ".tasks_client",
    "create_feed": ".feeds_client",
    "get": ".mutables_client",
    "get_feed_id": ".feeds_client",
    "load_bytes": ".files_client",
    "load_feed": ".feeds_client",
    "load_file": ".files_client",
    "load_json": ".files_client",
    "load_npy": ".files_client",
    "load_subfeed": ".feeds_client",
    "load_text": ".files_client",
    "request_task": ".tasks_client",
    "run_task_backend": ".tasks_client",
    "set": ".mutables_client",
    "store_bytes": ".files_client",
    "store_file": ".files_client",
    "store_json": ".files_client",
    "store_npy": ".files_client",
    "store_text": ".files_client",
    "taskfunction": ".tasks_client",
}
"""Where each name lives: imported on first use, so the command line, which imports
kachery.node's modules, starts without loading every client."""


__getattr__ = lazy_exports(__name__, _HOMES)
