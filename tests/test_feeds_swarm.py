"""Feeds between real nodes: real websockets on 127.0.0.1, separate homes, one Trio loop.

Nothing sleeps to wait: tests wait on the feed service's own events (``wait_count``) or on
``Node.wait_until``, inside ``trio.fail_after`` as a safety net.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import kachery.node.services.feeds.service as feeds_module
import kachery.node.services.feeds.writer as writer_module
from kachery.node.daemon.node import Node
from kachery.node.daemon.peer import Refusal, RequestFailed
from kachery.node.daemon.transport import DialError
from kachery.node.errors import NotPermitted
from kachery.node.services.feeds.api import FeedAPI
from kachery.node.services.feeds.service import FeedService
from kachery.protocol.codec import encode
from kachery.protocol.errors import CloseCode, InvalidInput
from kachery.protocol.feed_messages import FeedGet, FeedPush, FeedSubscribe
from kachery.protocol.feeds import (
    CHECKPOINT_EVERY_MESSAGES,
    MAX_BODY_BYTES,
    Head,
    SubfeedRef,
    decode_record,
    finish_batch,
    first_bad_signature,
    prepare_batch,
)
from kachery.protocol.uri import subfeed_hash
from kachery.storage.errors import AlreadyExists, DatabaseError, NotFound

from .swarm import WAIT, Swarm, control, lab, swarm, until, wait
from .test_nonces import first_nonce


def feeds(node: Node) -> FeedService:
    return node.services.feeds


def feed_api(node: Node) -> FeedAPI:
    return node.services.feed_api


async def notebook(owner: Node, subfeed: str = "entries") -> tuple[SubfeedRef, str]:
    feed_id = (await feed_api(owner).feed_create("notebook"))["feedId"]
    return SubfeedRef(feed_id, subfeed_hash(subfeed)), f"feed://{feed_id}/{subfeed}"


async def has(node: Node, ref: SubfeedRef, count: int) -> None:
    with trio.fail_after(WAIT):
        await feeds(node).wait_count(ref, count)


async def connected(a: Node, b: Node) -> None:
    await wait(a, lambda: b.node_id in a.connections)
    await wait(b, lambda: a.node_id in b.connections)


async def followed_by(follower: Node, owner: Node, ref: SubfeedRef) -> None:
    """Wait until ``follower`` has subscribed through ``owner`` (it is a source there)."""

    def ready() -> bool:
        live = feeds(owner).live.get((ref.feed_id, ref.subfeed_hash))
        return live is not None and follower.node_id in live.gossip.peers

    await wait(owner, ready)


# -- one node ------------------------------------------------------------------------------------


async def test_local_feeds_are_created_named_appended_read_listed_and_deleted(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        f = feed_api(node)
        created = await f.feed_create("notebook")
        assert (await f.feed_create("notebook", exist_ok=True))["feedId"] == created["feedId"]
        with pytest.raises(AlreadyExists, match="notebook"):
            await f.feed_create("notebook")
        uri = f"feed://{created['feedId']}/entries"
        assert await f.feed_append(uri, [{"n": 1}, "two", [3]]) == {"start": 0, "count": 3}
        assert await f.feed_append(uri, [None]) == {"start": 3, "count": 1}
        assert await f.feed_count(uri) == 4
        read = await f.feed_read(uri, start=1, limit=2, signed=True)
        assert [m["message"] for m in read["messages"]] == ["two", [3]]
        assert read["messages"][0]["messageNumber"] == 1
        assert len(bytes.fromhex(read["messages"][0]["signature"])) == 64
        assert not read["forked"]
        # A literal-hash subfeed name (~<sha1>) is the same subfeed.
        same = f"feed://{created['feedId']}/~{subfeed_hash('entries')}"
        assert await f.feed_count(same) == 4
        assert await f.feed_count(f"feed://{created['feedId']}/empty") == 0
        [listed] = await f.feed_list()
        assert (listed["name"], listed["owned"]) == ("notebook", True)
        assert listed["subfeeds"][0]["count"] == 4
        with pytest.raises(InvalidInput, match="name a subfeed"):
            await f.feed_append(f"feed://{created['feedId']}", [1])
        with pytest.raises(InvalidInput, match="not a JSON value"):
            await f.feed_append(uri, [b"bytes"])
        with pytest.raises(InvalidInput, match="limit of a feed message"):
            await f.feed_append(uri, ["x" * 70_000])
        assert await f.feed_count(uri) == 4  # nothing of a refused append is stored
        with pytest.raises(InvalidInput, match="destroys its private key"):
            await f.feed_delete(created["feedId"])
        deleted = await f.feed_delete(created["feedId"], force=True)
        assert deleted == {"feedId": created["feedId"], "messages": 4, "owned": True}
        assert await f.feed_list() == []
        with pytest.raises(NotFound):
            await f.feed_count(uri)
        assert not (node.home.path / "keys" / f"feed-{created['feedId']}").exists()


async def test_a_feed_key_is_private_to_its_node_and_only_its_owner_appends(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        key_file = owner.home.path / "keys" / f"feed-{ref.feed_id}"
        assert key_file.stat().st_mode & 0o777 == 0o600
        await feed_api(a).feed_subscribe(uri, "lab")
        with pytest.raises(NotPermitted, match="not owned by this node"):
            await feed_api(a).feed_append(uri, ["forged"])


async def test_appended_messages_survive_a_restart(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        ref, uri = await notebook(node)
        await feed_api(node).feed_append(uri, [1, 2, 3])
        s.stop("lab")
        await wait(node, lambda: feeds(node)._nursery is not None)
        node.home.close()
        again = await s.start("lab")
        await feed_api(again).feed_append(uri, [4])
        read = await feed_api(again).feed_read(uri)
        assert [m["message"] for m in read["messages"]] == [1, 2, 3, 4]
        assert feeds(again).count(ref) == 4


async def stored_chain(f: FeedService, ref: SubfeedRef) -> list[Any]:
    """Every stored message of a subfeed, checked as a peer would: signatures, numbers, links,
    stored chain values and checkpoints. Returns the message values."""
    live = f.live[(ref.feed_id, ref.subfeed_hash)]
    count = f.count(ref)
    items = await trio.to_thread.run_sync(f.store.read, live.sf, 0, count)
    assert len(items) == count
    prepared = prepare_batch(ref, Head.empty(ref), [list(i) for i in items])
    assert first_bad_signature(ref, prepared.bodies, prepared.signatures, prepared.unproven) is None
    assert finish_batch(prepared) == live.head
    for n in (0, count // 2, count - 1):
        assert await trio.to_thread.run_sync(f.store.chain_after, live.sf, n) == prepared.chains[n]
    checkpoints = await trio.to_thread.run_sync(f.store.checkpoints, live.sf, 0, count)
    every = CHECKPOINT_EVERY_MESSAGES
    assert [c.count for c in checkpoints] == list(range(every, count + 1, every))
    assert all(c.verify(ref) and c.chain_hash == prepared.chains[c.count - 1] for c in checkpoints)
    return [decode_record(body).message for body, _ in items]


async def test_concurrent_appends_share_commits_and_keep_one_valid_chain(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        f = feeds(node)
        ref, _ = await notebook(node)
        returned: list[tuple[str, int, int]] = []

        async def appender(name: str, size: int) -> None:
            for i in range(10):
                values = [f"{name} {i} {j}" for j in range(size)]
                start, count = await f.append(ref, values)
                returned.append((name, start, count))

        calls = 0
        async with trio.open_nursery() as nursery:
            for k in range(6):  # one message per call: inline group commits
                nursery.start_soon(appender, f"single{k}", 1)
                calls += 10
            nursery.start_soon(appender, "big", 150)  # over INLINE_WRITE: a worker thread
            calls += 10
        messages = await stored_chain(f, ref)
        assert len(messages) == 6 * 10 + 150 * 10
        for name, start, count in returned:  # each call got the numbers its messages have
            assert [m.split()[0] for m in messages[start : start + count]] == [name] * count
        for k in ["big"] + [f"single{k}" for k in range(6)]:  # each caller's order is kept
            mine = [m for m in messages if m.split()[0] == k]
            assert mine == sorted(mine, key=lambda m: [int(x) for x in m.split()[1:]])
        assert f.stats.commits < calls  # concurrent callers shared commits
        assert f.stats.inline_writes > 0
        assert f.stats.thread_writes > 0


async def test_a_failed_append_stores_nothing_and_the_next_one_continues_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        f = feeds(node)
        ref, _ = await notebook(node)
        assert await f.append(ref, ["kept"]) == (0, 1)

        def broken(*_: Any, **__: Any) -> None:
            raise DatabaseError("the disk is full (simulated)")

        with monkeypatch.context() as patch:
            patch.setattr(f.store, "append_many", broken)
            with pytest.raises(DatabaseError, match="simulated"):
                await f.append(ref, ["lost alone"])  # a lone append, written inline
            failures = 0

            async def doomed(i: int) -> None:
                nonlocal failures
                with pytest.raises(DatabaseError, match="simulated"):
                    await f.append(ref, [f"lost {i}"] * (1 if i else 200))
                failures += 1

            async with trio.open_nursery() as nursery:  # queued appends fail with their group
                for i in range(4):
                    nursery.start_soon(doomed, i)
            assert failures == 4
            assert f.count(ref) == 1
        assert await f.append(ref, ["next"]) == (1, 1)
        assert await stored_chain(f, ref) == ["kept", "next"]


async def test_the_wal_is_checkpointed_after_so_many_bytes_of_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-message commit counts ~5.6 KB (it rewrites a page); 200 messages count their bytes.
    assert 5_000 < writer_module.wal_bytes(1, 400) < 6_000
    assert writer_module.wal_bytes(200, 80_000) > 90_000
    monkeypatch.setattr(writer_module, "WAL_CHECKPOINT_BYTES", 30_000)
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        f = feeds(node)
        ref, _ = await notebook(node)
        checkpoint, run_checkpoint = f.store.checkpoint_wal, f.writer._checkpoint_wal
        passes = 0
        finished = trio.Event()

        def counted() -> None:
            nonlocal passes
            passes += 1
            checkpoint()

        async def observed() -> None:
            await run_checkpoint()
            finished.set()

        monkeypatch.setattr(f.store, "checkpoint_wal", counted)
        monkeypatch.setattr(f.writer, "_checkpoint_wal", observed)
        for i in range(4):  # ~23 KB: not yet
            await f.append(ref, [i])
        assert not f.writer._wal_checkpointing
        for i in range(4):
            await f.append(ref, [i])
        with trio.fail_after(WAIT):
            await finished.wait()
        assert passes == 2  # one checkpoint: a pass beside the appends, one holding them back
        finished = trio.Event()
        await f.append(ref, [{"pad": "x" * 400}] * 200)  # one big commit is enough on its own
        with trio.fail_after(WAIT):
            await finished.wait()
        assert passes == 4


async def test_a_wal_checkpoint_completes_while_appends_go_on_so_the_wal_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "WAL_CHECKPOINT_BYTES", 2**60)  # only the one run here
    async with swarm(tmp_path) as s:
        node = await s.start("lab")
        f = feeds(node)
        ref, _ = await notebook(node)
        for i in range(200):  # one-message commits: a few WAL frames each
            await f.append(ref, [i])
        checkpoint = f.store.checkpoint_wal
        calls = 0

        def checkpoint_while_appending() -> None:
            nonlocal calls
            calls += 1
            checkpoint()
            if calls == 1:  # appends land in the WAL behind the first pass
                for i in range(40):
                    trio.from_thread.run(f.append, ref, [f"during {i}"])

        monkeypatch.setattr(f.store, "checkpoint_wal", checkpoint_while_appending)
        await f.writer._checkpoint_wal()
        await f.append(ref, ["after"])  # starts the WAL over if the checkpoint reached its end
        path = f.store.db.engine.url.database
        assert path is not None

        def wal_frames() -> int:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                return int(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])

        assert await trio.to_thread.run_sync(wal_frames) < 20
        assert await stored_chain(f, ref) == [
            *range(200),
            *[f"during {i}" for i in range(40)],
            "after",
        ]


# -- following live ------------------------------------------------------------------------------


async def test_a_subscriber_follows_live_and_watchers_see_each_message_as_it_arrives(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(owner).feed_append(uri, [{"entry": 0}])
        assert await feed_api(a).feed_subscribe(uri, "lab") == {"count": 0, "channel": "lab"}
        await has(a, ref, 1)
        seen: list[Any] = []
        seen_changed = trio.Event()

        async def watcher() -> None:
            nonlocal seen_changed
            async for record in feed_api(a).feed_watch(uri, start=0):
                assert isinstance(record, dict)
                seen.append(record["message"])
                seen_changed.set()
                seen_changed = trio.Event()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            for i in range(1, 20):
                await feed_api(owner).feed_append(uri, [{"entry": i}])
                with trio.fail_after(WAIT):
                    while len(seen) < i + 1:  # each message reaches the watcher before the next
                        await seen_changed.wait()
            nursery.cancel_scope.cancel()
        assert seen == [{"entry": i} for i in range(20)]
        assert feeds(owner).stats.pushes_sent >= 19  # eager pushes, not polling


async def test_messages_signed_with_precomputed_nonces_are_verified_one_by_one_by_a_follower(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(owner).feed_append(uri, ["first"])  # the first take starts the nonce maker
        await first_nonce(feeds(owner).nonces)
        await until(lambda: feeds(owner).nonces.ready() >= 300)  # ahead of the appends below
        feeds(a).receiver.verify_every_signature = True  # no checkpoint shortcut: every signature
        await feed_api(a).feed_subscribe(uri, "lab")
        await followed_by(a, owner, ref)
        for i in range(50):
            await feeds(owner).append(ref, [i])
        await feeds(owner).append(ref, list(range(50, 300)))
        assert feeds(owner).stats.signed_with_precomputed_nonce == 300
        await has(a, ref, 301)
        assert feeds(a).stats.offences == 0
        assert feeds(a).stats.verified_one_by_one >= 300
        read = await feed_api(a).feed_read(uri, start=0, limit=400)
        assert [m["message"] for m in read["messages"]] == ["first", *range(300)]


async def test_a_follower_waits_with_wait_msec_for_the_next_message(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(a).feed_subscribe(uri, "lab")
        await followed_by(a, owner, ref)
        async with trio.open_nursery() as nursery:
            result: dict[str, Any] = {}

            async def reader() -> None:
                result.update(await feed_api(a).feed_read(uri, start=0, wait_msec=WAIT * 1000))

            nursery.start_soon(reader)
            await feed_api(owner).feed_append(uri, ["hello"])
        assert [m["message"] for m in result["messages"]] == ["hello"]


async def test_any_member_can_serve_a_feed_not_only_its_owner(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(owner).feed_append(uri, list(range(1200)))
        await feed_api(a).feed_subscribe(uri, "lab")
        await has(a, ref, 1200)
        s.stop("owner")
        await wait(a, lambda: owner.node_id not in a.connections)
        await wait(b, lambda: owner.node_id not in b.connections)
        await feed_api(b).feed_subscribe(uri, "lab")
        await has(b, ref, 1200)  # relayed by a, verified by b (checkpoints travel too)
        read = await feed_api(b).feed_read(uri, start=1199)
        assert read["messages"][0]["message"] == 1199
        assert feeds(b).stats.proven_by_checkpoint >= 1000


async def test_following_resumes_after_a_restart(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(a).feed_subscribe(uri, "lab")
        await feed_api(owner).feed_append(uri, ["before"])
        await has(a, ref, 1)
        s.stop("a")
        await wait(owner, lambda: a.node_id not in owner.connections)
        a.home.close()
        await feed_api(owner).feed_append(uri, ["while away"])
        again = await s.start("a")
        await has(again, ref, 2)
        await feed_api(owner).feed_append(uri, ["after"])
        await has(again, ref, 3)


# -- write access for others ---------------------------------------------------------------------


async def test_a_granted_node_submits_and_the_owner_signs_and_appends(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        await feed_api(a).feed_subscribe(uri, "lab")
        await connected(b, owner)
        with pytest.raises(NotPermitted, match="may not write"):
            await feed_api(b).feed_submit(uri, ["not yet"])
        await feed_api(owner).feed_grant(uri, b.node_id)
        result = await feed_api(b).feed_submit(uri, [{"from": "b"}])
        assert result == {"start": 0, "count": 1, "owner": owner.node_id}
        await has(a, ref, 1)
        [record] = (await feed_api(a).feed_read(uri))["messages"]
        assert record["message"] == {"from": "b"}
        assert record["metaData"] == {"submittedBy": b.node_id}
        await feed_api(owner).feed_grant(uri, b.node_id, revoke=True)
        with pytest.raises(NotPermitted):
            await feed_api(b).feed_submit(uri, ["revoked"])


# -- roles ---------------------------------------------------------------------------------------


async def test_request_feeds_is_needed_to_subscribe_and_provide_feeds_to_serve(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner = await s.start("owner")
        channel = (await control(owner).channel_create("lab"))["channelId"]
        reader = await s.start("reader")  # may follow, may not serve
        outsider = await s.start("outsider")  # may neither
        for node, roles in ((reader, ["requestFeeds"]), (outsider, ["requestFiles"])):
            token = (await control(owner).channel_invite("lab", roles))["token"]
            await control(node).channel_join(token)
        ref, uri = await notebook(owner)
        await feed_api(owner).feed_append(uri, ["secret"])

        with pytest.raises(NotPermitted, match="requestFeeds"):
            await feed_api(outsider).feed_subscribe(uri, "lab")
        await connected(outsider, owner)
        get = FeedGet(
            id=0,
            channel=channel,
            feed_id=ref.feed_id,
            subfeed_hash=ref.subfeed_hash,
            start=0,
            limit=10,
        )
        with pytest.raises(NotPermitted, match="lacks role requestFeeds"):
            await outsider.connections[owner.node_id].request(get)

        await feed_api(reader).feed_subscribe(uri, "lab")
        await has(reader, ref, 1)
        await connected(reader, outsider)
        with pytest.raises(NotPermitted, match="does not provide feeds"):
            await owner.connections[reader.node_id].request(get)


# -- faults --------------------------------------------------------------------------------------


async def crafted_push(
    s: Swarm,
) -> tuple[Node, Node, Node, SubfeedRef, Callable[[int, list[list[bytes]]], Awaitable[None]]]:
    """An owner, a follower ``a`` that holds message 0, and ``push(start, items)`` which makes
    member ``b`` send ``a`` a push of hand-made messages over their real session."""
    owner, a, b, channel = await lab(s)
    ref, uri = await notebook(owner)
    await feed_api(owner).feed_append(uri, ["genuine 0"])
    await feed_api(a).feed_subscribe(uri, "lab")
    await has(a, ref, 1)
    await connected(a, b)

    async def push(start: int, items: list[list[bytes]]) -> None:
        msg = FeedPush(
            channel=channel,
            feed_id=ref.feed_id,
            subfeed_hash=ref.subfeed_hash,
            start=start,
            messages=items,
            checkpoints=[],
        )
        before = feeds(a).stats.offences
        await b.connections[a.node_id].send(msg)
        await wait(a, lambda: feeds(a).stats.offences > before)

    return owner, a, b, ref, push


def forge(
    owner: Node, ref: SubfeedRef, number: int, previous: bytes | None, **fields: Any
) -> list[bytes]:
    """A message body signed with the real feed key (as only a compromised owner could)."""
    body = {
        "feedId": ref.feed_id,
        "subfeedHash": ref.subfeed_hash,
        "messageNumber": number,
        "previousSignature": previous,
        "timestamp": 1,
        "message": "forged",
        "metaData": {},
        **fields,
    }
    data = encode(body)
    key = feeds(owner).key_of(ref.feed_id)
    assert key is not None
    return [data, key.sign(data)]


async def genuine(owner: Node, ref: SubfeedRef, n: int) -> list[bytes]:
    live = feeds(owner).live[(ref.feed_id, ref.subfeed_hash)]
    [item] = await feeds(owner).read_items(live, n, 1)
    return [item[0], item[1]]


async def test_a_message_with_a_bad_signature_is_rejected_and_its_sender_penalised(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, ref, push = await crafted_push(s)
        first = await genuine(owner, ref, 0)
        body = forge(owner, ref, 1, first[1])[0]
        await push(1, [[body, bytes(64)]])
        assert feeds(a).count(ref) == 1
        assert feeds(a).penalties.offences[b.node_id] == 1


async def test_a_message_with_a_wrong_number_is_rejected_and_its_sender_penalised(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, ref, push = await crafted_push(s)
        first = await genuine(owner, ref, 0)
        await push(1, [forge(owner, ref, 5, first[1])])  # validly signed, claims number 5
        assert feeds(a).count(ref) == 1
        assert feeds(a).penalties.offences[b.node_id] == 1


async def test_a_broken_chain_is_rejected_and_its_sender_penalised(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, ref, push = await crafted_push(s)
        first = await genuine(owner, ref, 0)
        good = forge(owner, ref, 1, first[1])
        broken = forge(owner, ref, 2, bytes(64))  # does not link to message 1
        await push(1, [good, broken])
        assert feeds(a).count(ref) == 1  # the whole batch is refused, nothing stored
        # A validly signed message that does not follow a's head, and no conflicting message
        # behind it: b cannot show a fork, so it is b's fault too.
        await push(1, [forge(owner, ref, 1, bytes(64))])
        assert feeds(a).count(ref) == 1
        assert feeds(a).penalties.offences[b.node_id] == 2
        assert await feed_api(a).feed_forks() == []


async def test_an_oversized_message_is_rejected_and_its_sender_penalised(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, ref, push = await crafted_push(s)
        first = await genuine(owner, ref, 0)
        big = forge(owner, ref, 1, first[1], message="x" * MAX_BODY_BYTES)
        await push(1, [big])
        assert feeds(a).count(ref) == 1
        assert feeds(a).penalties.offences[b.node_id] == 1


async def test_a_repeat_offender_is_cut_off_and_its_feed_traffic_refused(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, ref, push = await crafted_push(s)
        first = await genuine(owner, ref, 0)
        bad = [forge(owner, ref, 1, first[1])[0], bytes(64)]
        await push(1, [bad])
        await push(1, [bad])
        await push(1, [bad])  # the third offence closes the session
        await wait(a, lambda: b.node_id not in a.connections)
        assert b.node_id in feeds(a).statistics()["banned"]
        # The genuine feed still flows from the owner.
        await feeds(owner).append(ref, ["genuine 1"])
        await has(a, ref, 2)


# -- forks ---------------------------------------------------------------------------------------


async def test_a_fork_is_detected_kept_as_evidence_and_never_overwrites_history(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, twin, follower, _channel = await lab(s)
        ref, uri = await notebook(owner)
        key = feeds(owner).key_of(ref.feed_id)
        assert key is not None
        await feeds(twin).adopt_key(key.seed)  # the owner's key used on a second machine
        await feed_api(follower).feed_subscribe(uri, "lab")
        await followed_by(follower, owner, ref)
        await followed_by(follower, twin, ref)

        await feed_api(owner).feed_append(uri, ["A0: from the owner"])
        await has(follower, ref, 1)
        await feed_api(twin).feed_append(uri, ["B0: from the twin"])
        await wait(follower, lambda: feeds(follower).stats.forks == 1)

        [fork] = await feed_api(follower).feed_forks()
        assert fork["messageNumber"] == 0
        assert fork["kept"]["message"] == "A0: from the owner"
        assert fork["other"]["message"] == "B0: from the twin"
        assert fork["reportedBy"] == twin.node_id
        # The twin's branch goes on; the follower keeps the first history and refuses it.
        await feed_api(twin).feed_append(uri, ["B1"])
        await feed_api(owner).feed_append(uri, ["A1"])
        await has(follower, ref, 2)
        read = await feed_api(follower).feed_read(uri)
        assert [m["message"] for m in read["messages"]] == ["A0: from the owner", "A1"]
        assert read["forked"]
        assert feeds(follower).penalties.offences.get(twin.node_id, 0) == 0  # not its fault


# -- partitions and late joiners ----------------------------------------------------------------


def partition(nodes: list[Node], halves: tuple[set[str], set[str]]) -> Callable[[], None]:
    """Refuse sessions across the two halves (both dialing and accepting); returns heal()."""
    originals: list[tuple[Node, Any, Any]] = []
    for node in nodes:
        other = halves[1] if node.node_id in halves[0] else halves[0]
        connect, admit = node.connect, node._admit

        async def blocked_connect(
            address: str,
            *,
            expected_peer: str | None = None,
            invite: Any = None,
            _c=connect,
            _o=other,
        ) -> Any:
            if expected_peer in _o:
                raise DialError(f"{address}: partitioned (test)")
            return await _c(address, expected_peer=expected_peer, invite=invite)

        async def blocked_admit(session: Any, identified: Any, _a=admit, _o=other) -> Any:
            if identified.node_id in _o:
                raise Refusal(CloseCode.GOING_AWAY, "partitioned (test)")
            return await _a(session, identified)

        node.connect = blocked_connect  # type: ignore[method-assign]
        node._admit = blocked_admit  # type: ignore[method-assign]
        originals.append((node, connect, admit))

    def heal() -> None:
        for node, connect, admit in originals:
            node.connect = connect  # type: ignore[method-assign]
            node._admit = admit  # type: ignore[method-assign]
            node._backoff.clear()
            node._wake_dialer.ring()

    return heal


async def test_a_partitioned_swarm_keeps_reading_and_converges_after_healing(
    tmp_path: Path,
) -> None:
    async with swarm(tmp_path) as s:
        owner, a, b, _channel = await lab(s)
        c, d = await s.start("c"), await s.start("d")
        for node in (c, d):
            await control(node).channel_join(
                (await control(owner).channel_invite("lab", ["all"]))["token"]
            )
        nodes = [owner, a, b, c, d]
        for x in nodes:
            await wait(x, lambda x=x: len(x.connections) == 4)
        ref, uri = await notebook(owner)
        await feed_api(owner).feed_append(uri, list(range(10)))
        for follower in (a, b, c, d):
            await feed_api(follower).feed_subscribe(uri, "lab")
            await has(follower, ref, 10)

        left = {owner.node_id, a.node_id, b.node_id}
        right = {c.node_id, d.node_id}
        heal = partition(nodes, (left, right))
        for x in nodes:
            for peer, conn in list(x.connections.items()):
                if (x.node_id in left) != (peer in left):
                    await conn.close(CloseCode.GOING_AWAY, "partition (test)")
        for x in nodes:
            await wait(x, lambda x=x: len(x.connections) == (2 if x.node_id in left else 1))

        for i in range(10, 60):  # the owner keeps appending, one message at a time
            await feeds(owner).append(ref, [i])
        await has(a, ref, 60)
        await has(b, ref, 60)
        for x in (c, d):  # the other half keeps reading what it holds
            read = await feed_api(x).feed_read(uri, start=5, limit=100)
            assert [m["message"] for m in read["messages"]] == list(range(5, 10))

        heal()
        for x in nodes:
            await wait(x, lambda x=x: len(x.connections) == 4)
        for x in (c, d):
            await has(x, ref, 60)
            read = await feed_api(x).feed_read(uri, start=0, limit=100)
            assert [m["message"] for m in read["messages"]] == list(range(60))


@pytest.mark.slow
async def test_a_late_joiner_catches_up_100k_messages_then_follows_live(tmp_path: Path) -> None:
    async with swarm(tmp_path) as s:
        owner, _a, _b, _channel = await lab(s)
        ref, uri = await notebook(owner)
        for start in range(0, 100_000, 1000):
            await feeds(owner).append(ref, [{"n": n} for n in range(start, start + 1000)])
        late = await s.start("late")
        await control(late).channel_join(
            (await control(owner).channel_invite("lab", ["all"]))["token"]
        )
        await feed_api(late).feed_subscribe(uri, "lab")
        with trio.fail_after(120):
            await feeds(late).wait_count(ref, 100_000)
        stats = feeds(late).stats
        assert stats.proven_by_checkpoint >= 99_000  # one signature per batch, not per message
        for n in range(100_000, 100_010):
            await feeds(owner).append(ref, [{"n": n}])
            await has(late, ref, n + 1)
        read = await feed_api(late).feed_read(uri, start=99_998, limit=4)
        assert [m["message"]["n"] for m in read["messages"]] == [99_998, 99_999, 100_000, 100_001]


async def test_a_peer_naming_unwritten_subfeeds_makes_at_most_max_empty_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feeds_module, "MAX_EMPTY_SUBFEEDS", 3)
    async with swarm(tmp_path) as s:
        owner, a, _b, channel = await lab(s)
        ref, uri = await notebook(owner)
        await connected(a, owner)
        conn = a.connections[owner.node_id]
        answers = []
        for i in range(6):
            msg = FeedSubscribe(
                id=0, channel=channel, feed_id=ref.feed_id, subfeed_hash=f"{i:040x}", count=0
            )
            try:
                await conn.request(msg)
                answers.append("followed")
            except RequestFailed as exc:
                answers.append(exc.code)
        assert answers == ["followed"] * 3 + ["not-found"] * 3
        store = feeds(owner).store
        assert await owner.run_sync(store.empty_subfeeds, ref.feed_id) == 3
        # the owner itself still writes to new subfeeds
        await feed_api(owner).feed_append(uri, ["first"])
        await feed_api(owner).feed_append(f"feed://{ref.feed_id}/other", ["second"])
