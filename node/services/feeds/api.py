"""The feed service's local API: the ``feed_*`` methods ``kachery-node feed`` and the Python
client call (create, list, delete, append, count, read, watch, grant, submit, subscribe,
unsubscribe, forks, statistics).

Each takes URIs and names as the user wrote them, checks them, and calls the service; answers are
JSON with camelCase keys. An unknown subfeed of a known feed reads as empty, as in kachery.

Non-goal: the work itself (service.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import trio

from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.services.feeds.live import (
    DEFAULT_SUBFEED,
    READ_LIMIT,
    LiveSubfeed,
    evidence_json,
    name_of,
    names,
    record_json,
)
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.feed_messages import FeedSubmit, FeedSubmitResponse, FeedUnsubscribe
from kachery.protocol.feed_values import encode_message_value
from kachery.protocol.feeds import SubfeedRef, decode_record
from kachery.protocol.identity import SEED_BYTES, public_key_from_id
from kachery.protocol.uri import FeedURI, parse_feed_uri, subfeed_hash
from kachery.storage.errors import AlreadyExists, NotFound

if TYPE_CHECKING:
    from kachery.node.services.feeds.service import FeedService

log = logging.getLogger("kachery.node.services.feeds")


class FeedAPI:
    """The ``feed_*`` methods of one node's feed service."""

    def __init__(self, feeds: FeedService) -> None:
        self.feeds = feeds
        self.node = feeds.node
        self.store = feeds.store

    def _uri(self, uri: str, *, subfeed_required: bool = True) -> tuple[SubfeedRef, str | None]:
        parsed = parse_feed_uri(uri)
        if parsed.subfeed_name is None:
            if subfeed_required:
                raise InvalidInput(
                    f"{uri} names a whole feed: name a subfeed, like"
                    f" feed://{parsed.feed_id}/{DEFAULT_SUBFEED}"
                )
            return SubfeedRef(parsed.feed_id, subfeed_hash(DEFAULT_SUBFEED)), DEFAULT_SUBFEED
        name = None if parsed.subfeed_name.startswith("~") else parsed.subfeed_name
        assert parsed.subfeed_hash is not None
        return SubfeedRef(parsed.feed_id, parsed.subfeed_hash), name

    async def _known(self, ref: SubfeedRef) -> LiveSubfeed:
        """A subfeed of a feed known here (an unknown subfeed of it is empty, as in kachery)."""
        live = self.feeds.live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            return live
        if await self.node.run_sync(self.store.feed, ref.feed_id) is None:
            raise NotFound(
                f"feed {ref.feed_id} is not on this node: follow one of its subfeeds with"
                " 'kachery-node feed subscribe URI CHANNEL'"
            )
        live = await self.feeds.load(ref, create=True)
        assert live is not None
        return live

    @exposed
    async def feed_create(self, name: str | None = None, exist_ok: bool = False) -> dict[str, Any]:
        """Create a feed (a new key pair), optionally under a local name."""
        if name is not None:
            if not name or len(name) > 200:
                raise InvalidInput("a feed name is 1 to 200 characters")
            existing = await self.node.run_sync(self.store.feed_by_name, name)
            if existing is not None:
                if exist_ok:
                    return {"feedId": existing.feed_id, "name": name, "created": False}
                raise AlreadyExists(f"a feed named {name!r} already exists: {existing.feed_id}")
        feed_id = await self.feeds.adopt_key(os.urandom(SEED_BYTES), name=name)
        log.info("created feed %s%s", feed_id, f" ({name})" if name else "")
        return {"feedId": feed_id, "name": name, "created": True}

    @exposed
    async def feed_list(self) -> list[dict[str, Any]]:
        """Feeds on this node, with their subfeeds, counts, follows and forks."""
        feeds = await self.node.run_sync(self.store.feeds)
        subfeeds = await self.node.run_sync(self.store.subfeeds)
        subs = await self.node.run_sync(self.store.subscriptions)
        forks = await self.node.run_sync(self.store.forks)
        out = []
        for feed in feeds:
            entries = []
            for s in subfeeds:
                if s.feed_id != feed.feed_id:
                    continue
                live = self.feeds.live.get((s.feed_id, s.subfeed_hash))
                entries.append(
                    {
                        "subfeedHash": s.subfeed_hash,
                        "name": s.subfeed_name,
                        "count": live.head.count if live is not None else s.count,
                        "following": [
                            self.node.membership.name_of(x.channel_id)
                            for x in subs
                            if x.feed_id == s.feed_id and x.subfeed_hash == s.subfeed_hash
                        ],
                        "uri": str(FeedURI(feed_id=s.feed_id, subfeed_name=name_of(s))),
                    }
                )
            out.append(
                {
                    "feedId": feed.feed_id,
                    "name": feed.name,
                    "owned": feed.owned,
                    "uri": f"feed://{feed.feed_id}",
                    "subfeeds": entries,
                    "forks": sum(1 for f in forks if f.feed_id == feed.feed_id),
                }
            )
        return out

    @exposed
    async def feed_delete(self, feed_id: str, force: bool = False) -> dict[str, Any]:
        """Remove a feed and all its messages from this node (an owned feed's key too)."""
        feed_id = parse_feed_uri(f"feed://{feed_id.removeprefix('feed://')}").feed_id
        owned = self.feeds.key_of(feed_id) is not None
        if owned and not force:
            raise InvalidInput(
                f"feed {feed_id} is owned by this node: deleting it destroys its private key, and"
                " nobody can ever append to it again; to do it anyway, pass force=True"
                " (on the command line, --force)"
            )
        removed = await self.feeds.writer.write(self.store.delete_feed, feed_id)
        for key in [k for k in self.feeds.live if k[0] == feed_id]:
            live = self.feeds.live.pop(key)
            live.deleted = True
            live.changed.notify()
            for peer, view in list(live.gossip.peers.items()):
                conn = self.node.connections.get(peer)
                if conn is not None and view.source:
                    conn.send_quietly(
                        FeedUnsubscribe(
                            channel=view.channel,
                            **names(live.ref),
                        ),
                    )
        self.feeds.grants = {k: v for k, v in self.feeds.grants.items() if k[0] != feed_id}
        if owned:
            self.feeds.keys.pop(feed_id, None)
            self.node.home.forget_key("feed", feed_id)
        self.node.notify()
        return {"feedId": feed_id, "messages": removed, "owned": owned}

    @exposed
    async def feed_append(self, uri: str, messages: list[Any]) -> dict[str, Any]:
        """Sign and append messages to an owned subfeed; answers after they are durable."""
        if not isinstance(messages, list):
            raise InvalidInput("messages must be a JSON array of messages")
        ref, name = self._uri(uri)
        start, count = await self.feeds.append(ref, messages, subfeed_name=name)
        return {"start": start, "count": count}

    @exposed
    async def feed_count(self, uri: str) -> int:
        """Messages of a subfeed held here."""
        ref, _ = self._uri(uri)
        return (await self._known(ref)).head.count

    @exposed
    async def feed_read(
        self,
        uri: str,
        start: int = 0,
        limit: int = READ_LIMIT,
        wait_msec: float = 0,
        signed: bool = False,
    ) -> dict[str, Any]:
        """Messages from ``start`` (at most ``limit``); waits up to ``wait_msec`` for the first."""
        ref, _ = self._uri(uri)
        live = await self._known(ref)
        if start < 0 or limit < 0:
            raise InvalidInput("start and limit must be >= 0")
        if wait_msec > 0 and live.head.count <= start:
            with trio.move_on_after(wait_msec / 1000):
                await live.wait_beyond(start)
        items = await self.feeds.read_items(live, start, min(limit, 10_000))
        return {
            "start": start,
            "messages": [record_json(b, s, signed=signed) for b, s in items],
            "count": live.head.count,
            "forked": live.forked,
        }

    @exposed
    async def feed_watch(
        self, uri: str, start: int | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Stream messages as they arrive (from ``start``, default: only new ones)."""
        ref, _ = self._uri(uri)
        live = await self._known(ref)
        position = live.head.count if start is None else max(0, start)
        async for record in self.feeds.follow(live, position):
            position += 1
            yield record
        yield StreamResult({"deleted": True, "position": position})

    @exposed
    async def feed_grant(self, uri: str, node_id: str, revoke: bool = False) -> dict[str, Any]:
        """Let a node submit messages to an owned subfeed (or revoke that)."""
        ref, _ = self._uri(uri)
        if self.feeds.key_of(ref.feed_id) is None:
            raise NotPermitted(f"feed {ref.feed_id} is not owned by this node")
        node_id = node_id.lower()
        public_key_from_id(node_id)  # InvalidInput unless 64 hex digits
        await self.feeds.writer.write(
            self.store.grant, ref.feed_id, ref.subfeed_hash, node_id, allow=not revoke
        )
        self.feeds.grants.pop((ref.feed_id, ref.subfeed_hash), None)
        return {"subfeedHash": ref.subfeed_hash, "nodeId": node_id, "granted": not revoke}

    @exposed
    async def feed_submit(
        self, uri: str, messages: list[Any], channel: str | None = None
    ) -> dict[str, Any]:
        """Ask the owner's node (any connected peer that owns the feed) to append messages."""
        ref, _ = self._uri(uri)
        if not isinstance(messages, list) or not messages:
            raise InvalidInput("messages must be a non-empty JSON array")
        for i, m in enumerate(messages):
            encode_message_value(m, f"message {i}")
        if self.feeds.key_of(ref.feed_id) is not None:
            start, count = await self.feeds.append(
                ref, messages, metadata={"submittedBy": self.node.node_id}
            )
            return {"start": start, "count": count, "owner": self.node.node_id}
        channels = (
            [self.node.membership.resolve(channel)]
            if channel is not None
            else self.node.membership.active_channels()
        )
        errors: list[str] = []
        for conn in list(self.node.connections.values()):
            for ch in sorted(set(channels) & conn.channels):
                try:
                    reply = await conn.request(
                        FeedSubmit(
                            id=0,
                            channel=ch,
                            **names(ref),
                            messages=messages,
                        )
                    )
                except NotFound:
                    break  # not the owner
                except KacheryError as exc:
                    errors.append(f"{conn.node_id[:16]}...: {exc}")
                    break
                reply = cast(FeedSubmitResponse, reply)  # request() checked it
                return {"start": reply.start, "count": reply.count, "owner": conn.node_id}
        if errors:
            raise NotPermitted("submission refused: " + "; ".join(errors))
        raise Unavailable(f"no connected peer owns feed {ref.feed_id}")

    @exposed
    async def feed_subscribe(self, uri: str, channel: str) -> dict[str, Any]:
        """Follow a subfeed live through a channel (kept across restarts)."""
        ref, name = self._uri(uri)
        channel_id = self.node.membership.resolve(channel)
        count = await self.feeds.subscribe(ref, channel_id, name=name)
        return {"count": count, "channel": self.node.membership.name_of(channel_id)}

    @exposed
    async def feed_unsubscribe(self, uri: str, channel: str | None = None) -> dict[str, Any]:
        """Stop following a subfeed (in one channel, or all); what is held stays."""
        ref, _ = self._uri(uri)
        channel_id = None if channel is None else self.node.membership.resolve(channel)
        ended = await self.feeds.writer.write(
            self.store.unsubscribe, ref.feed_id, ref.subfeed_hash, channel_id
        )
        live = self.feeds.live.get((ref.feed_id, ref.subfeed_hash))
        if live is not None:
            gone = set(live.channels) if channel_id is None else {channel_id}
            live.channels -= gone
            for peer, view in list(live.gossip.peers.items()):
                if view.channel in gone and view.source:
                    conn = self.node.connections.get(peer)
                    if conn is not None:
                        conn.send_quietly(
                            FeedUnsubscribe(
                                channel=view.channel,
                                **names(ref),
                            ),
                        )
                    view.source = False
        return {"unsubscribed": ended}

    @exposed
    async def feed_forks(self, feed_id: str | None = None) -> list[dict[str, Any]]:
        """Evidence of forks: pairs of different messages with one number, both validly signed."""
        records = await self.node.run_sync(self.store.forks, feed_id)
        out = []
        for r in records:
            kept, other = decode_record(r.kept[0]), decode_record(r.other[0])
            out.append(
                {
                    "feedId": r.feed_id,
                    "subfeedHash": r.subfeed_hash,
                    "messageNumber": r.message_number,
                    "kept": evidence_json(r.kept, kept.message, kept.timestamp),
                    "other": evidence_json(r.other, other.message, other.timestamp),
                    "reportedBy": r.reported_by,
                    "detectedAt": r.detected_at,
                }
            )
        return out

    @exposed
    async def feed_statistics(self) -> dict[str, Any]:
        """Counters of the feed service, and the offences and bans of peers."""
        return self.feeds.statistics()
