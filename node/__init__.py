"""kachery-node: the runtime, and the Python client (``import kachery.node as kn``).

The client mirrors kachery-client. Files: ``store_file``, ``load_file``, ``load_bytes``,
``store_json``/``load_json``, ``store_text``/``load_text``, ``store_npy``/``load_npy``.
Mutables: ``set``/``get``. It finds the node through ``$KACHERY_NODE_HOME``.
"""

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

__all__ = [
    "get",
    "load_bytes",
    "load_file",
    "load_json",
    "load_npy",
    "load_text",
    "set",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
    "store_text",
]
