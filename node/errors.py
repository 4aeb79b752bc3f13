"""Errors of the node layer (extends the tree in ``kachery.protocol.errors``)::

    KacheryError
    └── NodeError               the node could not do what was asked
        └── NotInitialized      no node home yet: run ``kachery-node init``

Errors from storage/ and protocol/ pass through unchanged: they already say what went wrong.
"""

from __future__ import annotations

from kachery.protocol.errors import KacheryError


class NodeError(KacheryError):
    """The node could not do what was asked."""


class NotInitialized(NodeError):
    """The node home does not exist yet."""
