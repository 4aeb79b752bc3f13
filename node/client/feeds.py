"""The Python client for feeds: ``import kachery.node as kn; kn.load_feed(...)``.

It mirrors kachery-client::

    feed = kn.create_feed("notebook")                 # or kn.load_feed("notebook", create=True)
    entries = feed.get_subfeed("entries")
    entries.append_message({"session": 3, "note": "probe B"})
    kn.get_feed_id("notebook")                        # the same feed ID again

    sub = kn.load_feed(uri, channel="lab").get_subfeed("entries")   # follow it live
    for msg in sub.get_next_messages(wait_msec=5000): ...
    for msg in sub.message_stream(): ...               # blocks, yields each message as it comes
    async for msg in sub.watch(): ...                  # the same, Trio-native

A ``Subfeed`` keeps a reading position, as in kachery-client: ``get_next_messages`` returns the
messages after it and moves it on. Every call goes to the running daemon through the local API
(``DaemonClient``); without one, calls raise ``DaemonNotRunning``. Errors are the daemon's
``KacheryError`` subclasses.

Non-goal: reading the database without a daemon (watching needs the daemon's live state).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from kachery.node.client import DaemonClient
from kachery.node.home import default_home
from kachery.protocol.errors import InvalidInput
from kachery.protocol.kachery_json import JSONValue, subfeed_hash_of_object
from kachery.protocol.uri import FeedURI, parse_feed_uri
from kachery.storage.errors import NotFound


def _client() -> DaemonClient:
    return DaemonClient(default_home())


def create_feed(feed_name: str | None = None) -> Feed:
    """Create a feed owned by this node (named ``feed_name`` if given) and return it.

    Raises:
        AlreadyExists: a feed of that name exists here (use ``load_feed(name, create=True)``).
    """
    result = _client().call("feed_create", name=feed_name)
    return Feed(result["feedId"])


def get_feed_id(feed_name: str, *, create: bool = False) -> str | None:
    """The ID of the feed named ``feed_name`` on this node (created if ``create``), or None."""
    if create:
        return str(_client().call("feed_create", name=feed_name, exist_ok=True)["feedId"])
    for feed in _client().call("feed_list"):
        if feed.get("name") == feed_name:
            return str(feed["feedId"])
    return None


def load_feed(feed_name_or_uri: str, *, create: bool = False, channel: str | None = None) -> Feed:
    """A feed by local name, ID or ``feed://`` URI.

    Args:
        feed_name_or_uri: a name given at creation, a 64-hex feed ID, or a feed URI (a subfeed
            part is ignored: use ``get_subfeed``).
        create: create a feed of that name if there is none.
        channel: follow the feed's subfeeds live in this channel as they are opened.

    Raises:
        NotFound: no feed of that name here (and ``create`` is False).
    """
    text = feed_name_or_uri
    if text.startswith("feed://"):
        return Feed(parse_feed_uri(text).feed_id, channel=channel)
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return Feed(text.lower(), channel=channel)
    feed_id = get_feed_id(text, create=create)
    if feed_id is None:
        raise NotFound(f"no feed named {text!r} on this node (create it with create=True)")
    return Feed(feed_id, channel=channel)


def load_subfeed(uri: str, *, channel: str | None = None) -> Subfeed:
    """The subfeed a ``feed://<feed id>/<subfeed name>`` URI names."""
    parsed = parse_feed_uri(uri)
    if parsed.subfeed_name is None:
        raise InvalidInput(f"{uri} names a whole feed, not a subfeed")
    return Feed(parsed.feed_id, channel=channel).get_subfeed(parsed.subfeed_name)


class Feed:
    """A feed (kachery-client's ``Feed``).

    Args:
        feed_id: its 64-hex ID.
        channel: follow its subfeeds live in this channel when they are opened.
    """

    def __init__(self, feed_id: str, *, channel: str | None = None) -> None:
        self.feed_id = parse_feed_uri(f"feed://{feed_id}").feed_id
        self.channel = channel

    def get_feed_id(self) -> str:
        return self.feed_id

    def get_uri(self) -> str:
        return f"feed://{self.feed_id}"

    @property
    def uri(self) -> str:
        return self.get_uri()

    def get_subfeed(self, subfeed_name: str | dict[str, JSONValue]) -> Subfeed:
        """A subfeed by name (a JSON object is hashed as kachery did); follows it live if the
        feed was loaded with a channel."""
        subfeed = Subfeed(self, subfeed_name)
        if self.channel is not None:
            subfeed.subscribe(self.channel)
        return subfeed

    def get_subfeed_names(self) -> list[str]:
        """Names (or ``~<hash>``) of the subfeeds held here."""
        for feed in _client().call("feed_list"):
            if feed["feedId"] == self.feed_id:
                return [s["name"] or f"~{s['subfeedHash']}" for s in feed["subfeeds"]]
        return []

    def delete(self, *, force: bool = False) -> int:
        """Remove the feed from this node; returns the number of messages removed.

        An owned feed's key goes too, so nobody can append to it again: that needs ``force``.
        """
        return int(_client().call("feed_delete", feed_id=self.feed_id, force=force)["messages"])

    def __repr__(self) -> str:
        return f"Feed({self.feed_id})"


class Subfeed:
    """One subfeed of a feed, with a reading position (kachery-client's ``Subfeed``)."""

    def __init__(self, feed: Feed, subfeed_name: str | dict[str, JSONValue]) -> None:
        self.feed = feed
        if isinstance(subfeed_name, dict):
            subfeed_name = "~" + subfeed_hash_of_object(subfeed_name)
        self.subfeed_name = subfeed_name
        self._uri = FeedURI(feed_id=feed.feed_id, subfeed_name=subfeed_name)
        self._position = 0

    # -- names ---------------------------------------------------------------------------------

    def get_feed_id(self) -> str:
        return self.feed.feed_id

    def get_subfeed_name(self) -> str:
        return self.subfeed_name

    def get_subfeed_hash(self) -> str:
        hash_ = self._uri.subfeed_hash
        assert hash_ is not None
        return hash_

    def get_subfeed_uri(self) -> str:
        return str(self._uri)

    @property
    def uri(self) -> str:
        return self.get_subfeed_uri()

    # -- writing -------------------------------------------------------------------------------

    def append_message(self, message: JSONValue) -> int:
        """Append one message (the feed must be owned here); returns its number once durable."""
        return self.append_messages([message])

    def append_messages(self, messages: list[JSONValue]) -> int:
        """Append messages in order; returns the number of the first once all are durable."""
        result = _client().call("feed_append", uri=self.uri, messages=list(messages))
        return int(result["start"])

    def submit_message(self, message: JSONValue) -> int:
        """Ask the owner's node to append a message (this node must have been granted)."""
        return self.submit_messages([message])

    def submit_messages(self, messages: list[JSONValue]) -> int:
        channel = self.feed.channel
        result = _client().call("feed_submit", uri=self.uri, messages=messages, channel=channel)
        return int(result["start"])

    def grant(self, node_id: str, *, revoke: bool = False) -> None:
        """Let ``node_id`` submit messages to this subfeed of an owned feed (or revoke it)."""
        _client().call("feed_grant", uri=self.uri, node_id=node_id, revoke=revoke)

    def subscribe(self, channel: str) -> int:
        """Follow this subfeed live through ``channel``; returns the messages held now."""
        return int(_client().call("feed_subscribe", uri=self.uri, channel=channel)["count"])

    # -- reading -------------------------------------------------------------------------------

    def get_num_local_messages(self) -> int:
        """Messages of this subfeed held on this node."""
        try:
            return int(_client().call("feed_count", uri=self.uri))
        except NotFound:
            return 0

    def get_position(self) -> int:
        return self._position

    def set_position(self, position: int) -> None:
        if position < 0:
            raise InvalidInput("a position is >= 0")
        self._position = position

    def get_next_messages(
        self, *, wait_msec: float = 0, max_num_messages: int = 0, signed: bool = False
    ) -> list[Any]:
        """The messages after the position (waiting up to ``wait_msec`` for the first); moves
        the position past them.

        Args:
            wait_msec: how long to wait when there is nothing new yet.
            max_num_messages: at most this many (0: up to 1000).
            signed: return the full records (number, timestamp, metaData, body and signature
                in hex) instead of the message values.
        """
        limit = max_num_messages if max_num_messages > 0 else 1000
        try:
            result = _client().call(
                "feed_read",
                uri=self.uri,
                start=self._position,
                limit=limit,
                wait_msec=wait_msec,
                signed=signed,
            )
        except NotFound:
            return []
        records = result["messages"]
        self._position += len(records)
        return records if signed else [r["message"] for r in records]

    def get_next_message(self, *, wait_msec: float = 0) -> Any:
        """The next message, or None if none came within ``wait_msec``."""
        found = self.get_next_messages(wait_msec=wait_msec, max_num_messages=1)
        return found[0] if found else None

    def message_stream(self) -> Iterator[Any]:
        """Every message from the position on, then each new one as it arrives (blocking)."""
        with _client().stream("feed_watch", uri=self.uri, start=self._position) as events:
            for event in events:
                self._position = int(event["messageNumber"]) + 1
                yield event["message"]

    async def watch(self) -> AsyncIterator[Any]:
        """``message_stream`` as a Trio async iterator (reads happen in a worker thread).

        To stop early, close it (as with any async generator under Trio)::

            async with contextlib.aclosing(subfeed.watch()) as messages:
                async for message in messages:
                    ...
        """
        import trio

        events = await trio.to_thread.run_sync(
            lambda: _client().stream("feed_watch", uri=self.uri, start=self._position)
        )
        try:
            iterator = iter(events)
            while True:
                event = await trio.to_thread.run_sync(next, iterator, None, abandon_on_cancel=True)
                if event is None:
                    return
                self._position = int(event["messageNumber"]) + 1
                yield event["message"]
        finally:
            events.close()

    def __repr__(self) -> str:
        return f"Subfeed({self.uri})"


__all__ = [
    "Feed",
    "Subfeed",
    "create_feed",
    "get_feed_id",
    "load_feed",
    "load_subfeed",
]
