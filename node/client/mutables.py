"""The Python client for mutables: ``kn.set(key, value)`` and ``kn.get(key)``, node-local.

kachery semantics: keys and values are JSON values; ``set(..., update=False)`` refuses to
overwrite. Works directly on the node's database (no daemon needed).
"""

from __future__ import annotations

from kachery.node.home import NodeHome
from kachery.protocol.kachery_json import JSONValue


def set(key: JSONValue, value: JSONValue, *, update: bool = True) -> None:
    """Set a node-local key (kachery-client's ``set``)."""
    NodeHome.shared().mutables.set(key, value, update=update)


def get(key: JSONValue) -> JSONValue:
    """A node-local key's value, or None."""
    return NodeHome.shared().mutables.get(key)


__all__ = ["get", "set"]
