"""kachery-node: the runtime, and the Python client (``import kachery.node as kn``).

The client mirrors kachery-client. Files: ``store_file``, ``load_file``, ``load_bytes``,
``store_json``/``load_json``, ``store_text``/``load_text``, ``store_npy``/``load_npy``.
Mutables: ``set``/``get``. Feeds: ``create_feed``, ``load_feed``, ``get_feed_id``, ``Feed``,
``Subfeed`` (``append_message``, ``get_next_messages``, ``message_stream``, ``watch``).
Tasks: ``taskfunction``, ``run_task_backend``, ``request_task`` (a ``TaskHandle``). It finds the
node through ``$KACHERY_NODE_HOME``.
"""

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
