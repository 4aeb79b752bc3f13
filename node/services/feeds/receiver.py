"""Receiving feed messages from peers: verify, store, or keep the evidence of a fork.

``Receiver.receive`` takes messages ``start ..`` of a subfeed from a peer (pushed, or pulled by
the replicator): duplicates are dropped, a conflicting but validly signed message is fork
evidence (kept in ``feed_forks``; our history stays, the other branch is refused), messages ahead
of a gap are stashed (at most STASH_MESSAGES) until the gap fills, and what continues the head is
verified and stored. A batch is proven by the owner's checkpoint where it reaches one
(protocol/feeds.py explains why that suffices) and otherwise checked signature by signature:
INLINE_VERIFY messages on the event loop, more in VERIFY_THREADS worker threads. A peer that sends
invalid feed data is penalised, and cut off at the threshold.

Non-goals: deciding what to pull or push (gossip.py), the checks themselves
(kachery.protocol.feeds).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any, cast

import trio

from kachery.node.changes import Doorbell
from kachery.node.errors import Unavailable
from kachery.node.services.feeds.live import FeedStats, LiveSubfeed, names, split
from kachery.node.services.feeds.writer import GroupCommit, Write
from kachery.node.services.host import Host
from kachery.protocol.errors import CloseCode, KacheryError
from kachery.protocol.feed_messages import MAX_BATCH_MESSAGES, FeedGet, FeedGetResponse, FeedPrune
from kachery.protocol.feeds import (
    ChainDiverged,
    Checkpoint,
    FeedRejected,
    ForkEvidence,
    Head,
    PreparedBatch,
    SubfeedRef,
    finish_batch,
    first_bad_signature,
    fork_evidence,
    prepare_batch,
)
from kachery.protocol.penalties import PenaltyBox
from kachery.storage.feeds import FeedStore

log = logging.getLogger("kachery.node.services.feeds")

INLINE_VERIFY = 4
"""Received batches up to this many messages are checked on the event loop (~60 us each);
larger ones in worker threads."""

VERIFY_THREADS = 2
"""Worker threads that check signatures of a batch in parallel (libsodium releases the GIL)."""

STASH_MESSAGES = 4096
"""Messages received ahead of a gap, held (unverified, in memory only) until the gap fills."""


class Receiver:
    """What peers send of the subfeeds this node holds."""

    def __init__(
        self,
        node: Host,
        store: FeedStore,
        writer: GroupCommit,
        stats: FeedStats,
        live: dict[tuple[str, str], LiveSubfeed],
        pull_wake: Doorbell,
    ) -> None:
        self.node = node
        self.store = store
        self.writer = writer
        self.stats = stats
        self.live = live
        self.pull_wake = pull_wake
        self.penalties = PenaltyBox()
        self.verify_every_signature = False
        """Ignore checkpoints and verify each received signature (in VERIFY_THREADS threads):
        slower; kept so the benchmark can compare the two."""
        self._verify_limiter = trio.CapacityLimiter(VERIFY_THREADS)

    async def receive(
        self,
        live: LiveSubfeed,
        peer: str,
        channel: str,
        start: int,
        items: Sequence[Sequence[bytes]],
        wire_checkpoints: Sequence[Sequence[Any]],
        *,
        pushed: bool = False,
    ) -> None:
        """Take messages ``start ..`` from ``peer``: drop duplicates, keep fork evidence, stash
        what is ahead of a gap, verify and store what continues the head. A push that brought
        nothing new prunes its sender (it will announce instead of pushing)."""
        try:
            checkpoints = [Checkpoint.from_wire(c) for c in wire_checkpoints]
        except FeedRejected as exc:
            self.offence(peer, str(exc))
            return
        diverged: ChainDiverged | None = None
        async with live.lock:
            count = live.head.count
            known = max(0, min(len(items), count - start))
            if known and not await self._check_known(live, peer, start, items[:known]):
                return
            new, new_start = items[known:], start + known
            if not new:
                conn = self.node.connections.get(peer)
                if pushed and conn is not None:
                    conn.send_quietly(FeedPrune(channel=channel, **names(live.ref)))
                return
            if live.signer is not None:
                # Only this node extends a feed it owns; a validly signed message from elsewhere
                # that does not match ours was caught above as a fork.
                return
            if new_start > count:
                self._stash(live, peer, new_start, new)
                return
            try:
                await self._accept(live, new_start, new, checkpoints)
            except FeedRejected as exc:
                self.offence(peer, str(exc))
                return
            except ChainDiverged as exc:
                diverged = exc
            else:
                await self._drain_stash(live)
        if diverged is not None:
            await self._investigate(live, peer, channel, diverged)

    async def _accept(
        self,
        live: LiveSubfeed,
        start: int,
        items: Sequence[Sequence[bytes]],
        checkpoints: Sequence[Checkpoint],
    ) -> None:
        """Verify messages that continue the head, store them, move the head (lock held)."""
        assert start == live.head.count
        ref, head = live.ref, live.head
        if self.verify_every_signature:
            checkpoints = ()
        if len(items) <= INLINE_VERIFY:
            prepared = prepare_batch(ref, head, items, checkpoints)
            bad = first_bad_signature(ref, prepared.bodies, prepared.signatures, prepared.unproven)
            if bad is not None:
                raise FeedRejected(f"message {start + bad} has a bad signature", index=bad)
            new_head = finish_batch(prepared)
        else:
            prepared, new_head = await self._verify_in_threads(ref, head, items, checkpoints)
        self.stats.proven_by_checkpoint += prepared.proven
        self.stats.verified_one_by_one += len(prepared) - prepared.proven
        await self.writer.commit(
            Write(
                live,
                start,
                prepared.bodies,
                prepared.signatures,
                prepared.chains,
                prepared.checkpoints,
                new_head,
            )
        )
        self.stats.received += len(prepared)

    async def _verify_in_threads(
        self,
        ref: SubfeedRef,
        head: Head,
        items: Sequence[Sequence[bytes]],
        checkpoints: Sequence[Checkpoint],
    ) -> tuple[PreparedBatch, Head]:
        def prepare_and_finish() -> tuple[PreparedBatch, Head | None]:
            prepared = prepare_batch(ref, head, items, checkpoints)
            if prepared.proven < len(prepared):
                return prepared, None
            return prepared, finish_batch(prepared)

        run = functools.partial(trio.to_thread.run_sync, limiter=self._verify_limiter)
        prepared, new_head = await run(prepare_and_finish)
        if new_head is not None:
            return prepared, new_head
        unproven = prepared.unproven
        parts = split(unproven, VERIFY_THREADS if len(unproven) >= 64 else 1)
        bad: list[int] = []

        async def verify(part: range) -> None:
            found = await run(first_bad_signature, ref, prepared.bodies, prepared.signatures, part)
            if found is not None:
                bad.append(found)

        async with trio.open_nursery() as nursery:
            for part in parts:
                nursery.start_soon(verify, part)
        if bad:
            index = min(bad)
            raise FeedRejected(f"message {head.count + index} has a bad signature", index=index)
        return prepared, await run(finish_batch, prepared)

    async def _check_known(
        self, live: LiveSubfeed, peer: str, start: int, items: Sequence[Sequence[bytes]]
    ) -> bool:
        """Messages below the head: duplicates are dropped; a conflicting, validly signed one is
        fork evidence. Returns False if the rest of the batch must be ignored."""
        for i, item in enumerate(items):
            number = start + i
            theirs = (item[0], item[1])
            held = live.recent.get(number)
            if held is None:
                held = await self.node.run_sync(self.store.message, live.sf, number)
            if held is None or held == theirs:
                self.stats.duplicates += 1
                continue
            try:
                evidence = fork_evidence(live.ref, number, held, theirs)
            except FeedRejected as exc:
                self.offence(peer, str(exc))
                return False
            if evidence is not None:
                await self._record_fork(live, evidence, peer)
                return False
        return True

    def _stash(
        self, live: LiveSubfeed, peer: str, start: int, items: Sequence[Sequence[bytes]]
    ) -> None:
        """Keep messages that arrived ahead of a gap (the puller will fill it)."""
        if len(live.stash) + len(items) > STASH_MESSAGES:
            live.stash.clear()
        for i, item in enumerate(items):
            live.stash.setdefault(start + i, (item[0], item[1], peer))
        self.pull_wake.ring()

    async def _drain_stash(self, live: LiveSubfeed) -> None:
        """Accept stashed messages that now continue the head (lock held)."""
        for n in [n for n in live.stash if n < live.head.count]:
            del live.stash[n]
        while live.head.count in live.stash:
            run: list[list[bytes]] = []
            n = live.head.count
            peer = live.stash[n][2]
            while n in live.stash and len(run) < MAX_BATCH_MESSAGES and live.stash[n][2] == peer:
                body, signature, _ = live.stash.pop(n)
                run.append([body, signature])
                n += 1
            try:
                await self._accept(live, live.head.count, run, list(live.checkpoints))
            except (FeedRejected, ChainDiverged) as exc:
                live.stash.clear()
                if isinstance(exc, FeedRejected):
                    self.offence(peer, str(exc))
                return

    async def _investigate(
        self, live: LiveSubfeed, peer: str, channel: str, diverged: ChainDiverged
    ) -> None:
        """A validly signed message did not follow our head: ask the peer for its version of
        the message before it, and keep the two as evidence if they differ. A peer that cannot
        show a conflicting message sent a message that chains to nothing: its fault."""
        number = diverged.number - 1
        conn = self.node.connections.get(peer)
        if conn is None:
            return
        try:
            reply = await conn.request(
                FeedGet(
                    id=0,
                    channel=channel,
                    **names(live.ref),
                    start=number,
                    limit=1,
                )
            )
        except Unavailable as exc:
            log.info("could not ask %s... about a suspected fork: %s", peer[:16], exc)
            return
        except KacheryError as exc:
            self.offence(peer, f"sent message {diverged.number} but not message {number} ({exc})")
            return
        reply = cast(FeedGetResponse, reply)  # request() checked it
        held = live.recent.get(number) or await self.node.run_sync(
            self.store.message, live.sf, number
        )
        if not reply.messages or held is None:
            self.offence(peer, f"sent message {diverged.number} without a message {number}")
            return
        theirs = (reply.messages[0][0], reply.messages[0][1])
        try:
            evidence = fork_evidence(live.ref, number, held, theirs)
        except FeedRejected as exc:
            self.offence(peer, str(exc))
            return
        if evidence is None:
            self.offence(peer, f"message {diverged.number} does not link to message {number}")
            return
        await self._record_fork(live, evidence, peer)

    async def _record_fork(self, live: LiveSubfeed, evidence: ForkEvidence, peer: str) -> None:
        live.gossip.diverged(peer)
        new = await self.writer.write(
            self.store.add_fork,
            live.ref.feed_id,
            live.ref.subfeed_hash,
            evidence.number,
            evidence.first,
            evidence.second,
            reported_by=peer,
        )
        live.forked = True
        if new:
            self.stats.forks += 1
            log.warning(
                "FORK of feed %s subfeed %s at message %d: two different messages signed by the"
                " feed key (the other from %s...); keeping this node's history, refusing the"
                " other branch",
                live.ref.feed_id,
                live.ref.subfeed_hash,
                evidence.number,
                peer[:16],
            )
            self.node.notify()

    def offence(self, peer: str, reason: str) -> None:
        """Penalise ``peer`` for invalid feed data; cut it off past the threshold."""
        self.stats.offences += 1
        log.warning("refused feed data from %s...: %s", peer[:16], reason)
        if self.penalties.offence(peer, trio.current_time()):
            log.warning("closing the session with %s...: repeated invalid feed data", peer[:16])
            for live in self.live.values():
                live.gossip.gone(peer)
            conn = self.node.connections.get(peer)
            if conn is not None:
                self.node.spawn(
                    conn.close, CloseCode.PROTOCOL_ERROR, f"invalid feed data: {reason}"[:120]
                )
        self.node.notify()

    def banned(self, peer: str) -> bool:
        return self.penalties.banned(peer, trio.current_time())
