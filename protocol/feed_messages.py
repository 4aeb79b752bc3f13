"""The feed replicator's session messages (type numbers 50-60).

Requests need a role in their channel, checked by the receiving node before it reads anything
else: ``FeedSubscribe``, ``FeedGet`` and ``FeedSubmit`` need ``requestFeeds``. The one-way
messages (``FeedHave``, ``FeedPush``, ``FeedUnsubscribe``, ``FeedPrune``, ``FeedGraft``) are acted
on only if the sender has the role its part needs in the channel they name (``provideFeeds`` to
push or announce, ``requestFeeds`` to prune or graft); the feed service checks that. A node
answers ``FeedSubscribe`` and ``FeedGet`` only where it has ``provideFeeds`` itself.

Messages travel as ``[body, signature]`` pairs of byte strings, exactly as signed (see
feeds.py); checkpoints as ``[count, chainHash, signature]``. Every field is checked on
construction, so a malformed frame is refused (``BAD_FRAME``) before any service sees it.

Non-goal: what a node does with them (node/services/feeds/, planned by feed_gossip.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._hex import is_public_key_hex, is_sha1_hex
from .errors import CloseCode, RemoteProtocolError
from .messages import Message, MsgType, message

MAX_BATCH_MESSAGES = 1000
"""Messages in one push or get response: bounds a frame's decode work..."""

MAX_BATCH_BYTES = 1024 * 1024
"""...and its size (bodies and signatures), well under the 4 MiB frame limit."""

MAX_BATCH_CHECKPOINTS = 64
"""Checkpoints in one push or response (one per 500 messages or 256 KiB is typical)."""

MAX_SUBMIT_MESSAGES = 1000
"""Messages a granted writer submits in one request."""


def _bad(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, close_code=CloseCode.BAD_FRAME)


def _check_subfeed(msg: Any) -> None:
    if not is_public_key_hex(msg.feed_id):
        raise _bad(f"{type(msg).__name__}.feedId is not 64 lowercase hex digits")
    if not is_sha1_hex(msg.subfeed_hash):
        raise _bad(f"{type(msg).__name__}.subfeedHash is not 40 lowercase hex digits")


def _check_count(msg: Any, name: str, value: int) -> None:
    if not 0 <= value < 2**63:
        raise _bad(f"{type(msg).__name__}.{name} is out of range")


def _check_batch(msg: Any, messages: list[list[bytes]], checkpoints: list[list[Any]]) -> None:
    if len(messages) > MAX_BATCH_MESSAGES:
        raise _bad(f"{type(msg).__name__} carries over {MAX_BATCH_MESSAGES} messages")
    if len(checkpoints) > MAX_BATCH_CHECKPOINTS:
        raise _bad(f"{type(msg).__name__} carries over {MAX_BATCH_CHECKPOINTS} checkpoints")
    size = 0
    for item in messages:
        if len(item) != 2:
            raise _bad(f"{type(msg).__name__}: a message is [body, signature]")
        size += len(item[0]) + len(item[1])
    if size > MAX_BATCH_BYTES:
        raise _bad(f"{type(msg).__name__} carries over {MAX_BATCH_BYTES} bytes of messages")


@message(MsgType.FEED_SUBSCRIBE)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedSubscribe(Message):
    """A follower's request: "I hold ``count`` messages of this subfeed; keep me posted"."""

    id: int
    channel: str
    feed_id: str
    subfeed_hash: str
    count: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
        _check_count(self, "count", self.count)


@message(MsgType.FEED_SUBSCRIBE_RESPONSE, answers=FeedSubscribe)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedSubscribeResponse(Message):
    """The responder's count, and whether it pushes new messages to the subscriber eagerly."""

    id: int
    count: int
    mesh: bool

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_count(self, "count", self.count)


@message(MsgType.FEED_HAVE)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedHave(Message):
    """Lazy announcement: "I hold the first ``count`` messages of this subfeed"."""

    channel: str
    feed_id: str
    subfeed_hash: str
    count: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
        _check_count(self, "count", self.count)


@message(MsgType.FEED_GET)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedGet(Message):
    """Ask for messages ``start ..`` (at most ``limit``; the answer may hold fewer)."""

    id: int
    channel: str
    feed_id: str
    subfeed_hash: str
    start: int
    limit: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
        _check_count(self, "start", self.start)
        if not 1 <= self.limit <= MAX_BATCH_MESSAGES:
            raise _bad(f"FeedGet.limit must be 1..{MAX_BATCH_MESSAGES}")


@message(MsgType.FEED_GET_RESPONSE, answers=FeedGet)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedGetResponse(Message):
    """Messages from ``start`` on, the checkpoints among them, and the responder's count."""

    id: int
    start: int
    messages: list[list[bytes]]
    checkpoints: list[list[Any]]
    count: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_count(self, "start", self.start)
        _check_count(self, "count", self.count)
        _check_batch(self, self.messages, self.checkpoints)


@message(MsgType.FEED_PUSH)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedPush(Message):
    """Eager gossip: new messages ``start ..`` of a subfeed (and checkpoints among them)."""

    channel: str
    feed_id: str
    subfeed_hash: str
    start: int
    messages: list[list[bytes]]
    checkpoints: list[list[Any]]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
        _check_count(self, "start", self.start)
        _check_batch(self, self.messages, self.checkpoints)


@message(MsgType.FEED_UNSUBSCRIBE)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedUnsubscribe(Message):
    """The sender no longer follows this subfeed through the receiver."""

    channel: str
    feed_id: str
    subfeed_hash: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)


@message(MsgType.FEED_SUBMIT)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedSubmit(Message):
    """A granted writer asks the feed owner's node to sign and append ``messages``."""

    id: int
    channel: str
    feed_id: str
    subfeed_hash: str
    messages: list[Any]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
        if not 1 <= len(self.messages) <= MAX_SUBMIT_MESSAGES:
            raise _bad(f"FeedSubmit carries 1..{MAX_SUBMIT_MESSAGES} messages")


@message(MsgType.FEED_SUBMIT_RESPONSE, answers=FeedSubmit)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedSubmitResponse(Message):
    """The submitted messages are appended as numbers ``start .. start + count - 1``."""

    id: int
    start: int
    count: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_count(self, "start", self.start)
        _check_count(self, "count", self.count)


@message(MsgType.FEED_PRUNE)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedPrune(Message):
    """PlumTree's prune: "your push reached me as a duplicate: announce to me lazily instead"."""

    channel: str
    feed_id: str
    subfeed_hash: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)


@message(MsgType.FEED_GRAFT)
@dataclass(frozen=True, slots=True, kw_only=True)
class FeedGraft(Message):
    """PlumTree's graft: "I had to pull what you announced: push to me eagerly again"."""

    channel: str
    feed_id: str
    subfeed_hash: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_subfeed(self)
