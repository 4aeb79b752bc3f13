"""Session messages: frozen dataclasses, one per message type, validated on construction.

On the wire a message is the canonical CBOR of ``[type number, {camelCaseField: value}]`` inside
an encrypted frame (session.py). Type numbers are a ``MsgType`` IntEnum whose values are never
reused: a retired message keeps its number, commented out. Each message class is registered with
``@message(MsgType.X)``; decoding looks the number up, and an unknown number becomes an
``UnknownMessage`` so that an older node can answer a newer one with an error instead of failing.

Requests carry an ``id`` chosen by the sender; the reply (a response or an ``ErrorReply``)
carries the same ``id``. Requests act inside a channel and carry ``channel``; the receiver checks
the sender's membership, and the role its own table of routes names (node/daemon/routes.py),
before reading anything else. Services define their messages in their own modules with ``@message``.

Non-goal: the handshake (session.py) and what nodes do with messages (node/).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from ._hex import is_public_key_hex
from .codec import decode, encode
from .errors import CloseCode, LocalProtocolError, RemoteProtocolError


class MsgType(IntEnum):
    """Message type numbers. Never reuse a value.

    Ranges: 1-9 session, 10-29 membership, 30-49 files, 50-69 feeds, 70-89 tasks.
    """

    ERROR = 1
    PING = 2
    PONG = 3
    DOC_ANNOUNCE = 10
    DOC_REQUEST = 11
    DOC_RESPONSE = 12
    DOC_PUSH = 13
    PEER_ANNOUNCE = 20
    PEER_LIST_REQUEST = 21
    PEER_LIST_RESPONSE = 22
    CHANNEL_LEAVE = 23
    FIND_FILE = 30
    FIND_FILE_RESPONSE = 31
    GET_DATA = 32
    GET_DATA_RESPONSE = 33
    CANCEL_DATA = 34
    FEED_SUBSCRIBE = 50
    FEED_SUBSCRIBE_RESPONSE = 51
    FEED_HAVE = 52
    FEED_GET = 53
    FEED_GET_RESPONSE = 54
    FEED_PUSH = 55
    FEED_UNSUBSCRIBE = 56
    FEED_SUBMIT = 57
    FEED_SUBMIT_RESPONSE = 58
    FEED_PRUNE = 59
    FEED_GRAFT = 60
    TASK_REQUEST = 70
    TASK_REQUEST_RESPONSE = 71
    TASK_STATUS = 72
    TASK_PROVIDERS = 73
    TASK_CANCEL = 74
    # 75: unused (results travel in TASK_STATUS); never give it another meaning.
    TASK_LOOKUP = 76
    TASK_LOOKUP_RESPONSE = 77


class ErrorCode(StrEnum):
    """Why a request was refused; sent in ``ErrorReply.code``."""

    NOT_PERMITTED = "not-permitted"
    NOT_A_MEMBER = "not-a-member"
    NOT_FOUND = "not-found"
    BAD_REQUEST = "bad-request"
    UNSUPPORTED = "unsupported"
    BUSY = "busy"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of all session messages."""

    TYPE: ClassVar[MsgType]
    REPLY: ClassVar[bool] = False
    """True for responses: they answer the request whose ``id`` they carry."""
    AFTER_DATA: ClassVar[bool] = False
    """Sent in order behind bulk data frames (not ahead of them, as control messages are)."""
    REPLY_TYPE: ClassVar[type[Message] | None] = None
    """For requests: the one response type that answers it (besides an ``ErrorReply``); a
    reply of any other type is the peer's protocol error. Set by ``@message(answers=...)``."""

    def __post_init__(self) -> None:
        _check_fields(self)


M = TypeVar("M", bound=Message)
_REGISTRY: dict[int, type[Message]] = {}


def message(
    msg_type: MsgType,
    *,
    reply: bool = False,
    answers: type[Message] | None = None,
    after_data: bool = False,
) -> typing.Callable[[type[M]], type[M]]:
    """Class decorator: register a message class under its type number.

    Args:
        msg_type: its number on the wire.
        reply: it answers a request (carries that request's ``id``).
        answers: the request class it answers (implies ``reply``): that request's
            ``REPLY_TYPE`` becomes this class, so no other reply type is accepted for it.
        after_data: the message closes a bulk transfer and must not overtake its data frames.
    """

    def register(cls: type[M]) -> type[M]:
        if msg_type in _REGISTRY:
            raise LocalProtocolError(f"message type {msg_type!r} registered twice")
        if answers is not None:
            if answers.REPLY_TYPE is not None:
                raise LocalProtocolError(f"{answers.__name__} already has a reply type")
            answers.REPLY_TYPE = cls
        cls.TYPE = msg_type
        cls.REPLY = reply or answers is not None
        cls.AFTER_DATA = after_data
        _REGISTRY[msg_type] = cls
        return cls

    return register


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownMessage:
    """A message whose type this node does not know (from a newer node)."""

    type: int
    id: int | None


def encode_message(msg: Message) -> bytes:
    """The CBOR of ``[type, fields]`` (the plaintext of a message frame)."""
    body = {camel_case(f.name): getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return encode([int(msg.TYPE), body])


def decode_message(data: bytes | memoryview) -> Message | UnknownMessage:
    """Decode and validate one message.

    Raises:
        RemoteProtocolError: malformed CBOR, not ``[type, fields]``, or fields of wrong types.
    """
    value = decode(data)
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], dict)):
        raise RemoteProtocolError("a message is [type, fields]", close_code=CloseCode.BAD_FRAME)
    msg_type, body = value
    cls = _REGISTRY.get(msg_type) if type(msg_type) is int else None
    if cls is None:
        raw_id = body.get("id")
        return UnknownMessage(type=msg_type, id=raw_id if type(raw_id) is int else None)
    if not all(isinstance(k, str) for k in body):
        raise RemoteProtocolError(
            f"{cls.__name__} has a field name that is not text", close_code=CloseCode.BAD_FRAME
        )
    names = _field_names(cls)
    unknown = set(body) - set(names)
    if unknown:
        raise RemoteProtocolError(
            f"{cls.__name__} has unknown fields {sorted(unknown)}", close_code=CloseCode.BAD_FRAME
        )
    try:
        return cls(**{names[k]: v for k, v in body.items()})
    except TypeError as exc:
        raise RemoteProtocolError(
            f"{cls.__name__}: {exc}", close_code=CloseCode.BAD_FRAME
        ) from None


# -- field checking ------------------------------------------------------------------------------


def camel_case(name: str) -> str:
    """A Python field name as the wire (and API) spells it: ``subfeed_hash`` -> ``subfeedHash``."""
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


_FIELD_NAMES: dict[type[Message], dict[str, str]] = {}
_HINTS: dict[type[Message], dict[str, Any]] = {}


def _field_names(cls: type[Message]) -> dict[str, str]:
    """camelCase wire name -> field name (cached per class)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = {camel_case(f.name): f.name for f in dataclasses.fields(cls)}
    return names


def _hints(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _check_fields(msg: Message) -> None:
    hints = _hints(type(msg))
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if not _matches(value, hints[f.name]):
            raise RemoteProtocolError(
                f"{type(msg).__name__}.{f.name} has the wrong type ({type(value).__name__})",
                close_code=CloseCode.BAD_FRAME,
            )
        if f.name == "channel" and not is_public_key_hex(value):
            raise RemoteProtocolError(
                f"{type(msg).__name__}.channel is not a 64-hex-digit channel ID",
                close_code=CloseCode.BAD_FRAME,
            )


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float)
    if isinstance(hint, type):
        return isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    raise LocalProtocolError(f"unsupported field type {hint!r}")


# -- messages ------------------------------------------------------------------------------------


@message(MsgType.ERROR, reply=True)
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply(Message):
    """The answer to a request that was refused or failed."""

    id: int
    code: str
    message: str


@message(MsgType.PING)
@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Message):
    """Keep-alive and round-trip measurement; answered by a ``Pong`` with the same nonce."""

    nonce: int


@message(MsgType.PONG)
@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Message):
    nonce: int


@message(MsgType.DOC_ANNOUNCE)
@dataclass(frozen=True, slots=True, kw_only=True)
class DocAnnounce(Message):
    """Lazy gossip: "I hold version ``version`` of this channel's membership document"."""

    channel: str
    version: int


@message(MsgType.DOC_REQUEST)
@dataclass(frozen=True, slots=True, kw_only=True)
class DocRequest(Message):
    """Ask for the channel's documents with versions above ``after``."""

    id: int
    channel: str
    after: int


@message(MsgType.DOC_RESPONSE, answers=DocRequest)
@dataclass(frozen=True, slots=True, kw_only=True)
class DocResponse(Message):
    id: int
    docs: list[dict[str, Any]]


@message(MsgType.DOC_PUSH)
@dataclass(frozen=True, slots=True, kw_only=True)
class DocPush(Message):
    """Eager gossip of new documents (in version order)."""

    channel: str
    docs: list[dict[str, Any]]


@message(MsgType.PEER_ANNOUNCE)
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAnnounce(Message):
    """Signed address announcements of members (peer exchange)."""

    channel: str
    announcements: list[dict[str, Any]]


@message(MsgType.PEER_LIST_REQUEST)
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerListRequest(Message):
    """Ask for the announcements the peer holds for a channel's members."""

    id: int
    channel: str


@message(MsgType.PEER_LIST_RESPONSE, answers=PeerListRequest)
@dataclass(frozen=True, slots=True, kw_only=True)
class PeerListResponse(Message):
    id: int
    announcements: list[dict[str, Any]]


@message(MsgType.CHANNEL_LEAVE)
@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelLeave(Message):
    """The sender stops taking part in a channel (it keeps its membership until removed)."""

    channel: str


def is_request(msg: Message) -> bool:
    """A request: it carries an ``id`` and expects a reply."""
    return not msg.REPLY and hasattr(msg, "id")
