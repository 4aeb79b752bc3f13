"""Every error kachery-node raises on purpose, and whose fault it was.

The tree (storage/ and node/ extend it from ``KacheryError``)::

    KacheryError                    base of every deliberate kachery-node error
    ├── InvalidInput (ValueError)   a value handed to us is malformed (URI, manifest, JSON, roles)
    │   ├── InvalidURI
    │   └── InvalidManifest
    └── ProtocolError               a peer session cannot go on
        ├── LocalProtocolError      we misused the protocol API: a bug on our side
        └── RemoteProtocolError     the peer misbehaved; ``close_code`` is sent on the websocket

Anything else escaping ``kachery.protocol`` is a bug.
"""

from __future__ import annotations

from enum import IntEnum


class KacheryError(Exception):
    """Base class of every error kachery-node raises on purpose.

    The command line prints ``str(error)`` as a one-line message, so messages say what went
    wrong and, where it helps, what was expected.
    """


class InvalidInput(KacheryError, ValueError):
    """A value handed to kachery-node (by a user, a file or a peer) is malformed."""


class InvalidURI(InvalidInput):
    """A ``sha1://`` or ``feed://`` URI does not parse."""


class InvalidManifest(InvalidInput):
    """A manifest is not kachery's JSON, or it does not describe its file consistently."""


class CloseCode(IntEnum):
    """Websocket close codes used by kachery sessions (RFC 6455 section 7.4 plus our 4xxx range).

    Values are never reused.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    # 4000-4999 are for applications.
    VERSION_MISMATCH = 4000
    AUTHENTICATION_FAILED = 4001
    NOT_A_MEMBER = 4002
    MEMBER_REMOVED = 4003
    BAD_FRAME = 4004
    INVITE_REFUSED = 4005


class ProtocolError(KacheryError):
    """A peer session cannot go on."""


class LocalProtocolError(ProtocolError):
    """We misused the protocol API (for example sent a message in the wrong state): a bug here."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    Args:
        message: what the peer did wrong.
        close_code: the websocket close code to end the session with.
    """

    def __init__(self, message: str, *, close_code: CloseCode = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code
