"""Errors of the node layer (extends the tree in ``kachery.protocol.errors``)::

    KacheryError
    └── NodeError               the node could not do what was asked
        ├── NotInitialized      no node home yet: run ``kachery-node init``
        ├── NotPermitted        a peer or the local user lacks a role (or is not a member)
        ├── Unavailable         the network could not answer: no peer, timed out, closed
        └── DaemonNotRunning    no daemon answers for this node home: ``kachery-node start``

Errors from storage/ and protocol/ pass through unchanged: they already say what went wrong.
"""

from __future__ import annotations

from kachery.protocol.errors import KacheryError


class NodeError(KacheryError):
    """The node could not do what was asked."""


class NotInitialized(NodeError):
    """The node home does not exist yet."""


class NotPermitted(NodeError):
    """A peer or the local user lacks a role in the channel (or is not a member)."""


class Unavailable(NodeError):
    """The network could not answer: no provider, the session closed, or a timeout."""


class DaemonNotRunning(NodeError):
    """No ``kachery-node`` daemon answers for this node home (no daemon.json, or refused)."""


def lone_error(exc: BaseException) -> BaseException:
    """The single exception inside nested one-member exception groups (else ``exc`` itself).

    Trio's nurseries wrap what escapes them in exception groups; at the boundary of a function
    that used a nursery internally, a lone error is re-raised as itself.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class LinkClosed(Exception):
    """The link is closed; ``code`` and ``reason`` are the websocket close code and reason."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"link closed ({code}: {reason or 'no reason'})")
        self.code = code
        self.reason = reason or ""
