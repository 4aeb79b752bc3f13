"""Feed benchmark: append rates, catch-up, and live propagation, beside the goals and hypercore.

Every figure is measured in this run, on this machine, with messages of 200 bytes (the JSON of
each message value), real nodes, real websockets on 127.0.0.1 and SQLite on disk:

- append: the node's in-process append (``FeedService.append``, like hypercore's
  ``core.append``), signed and durable when it returns; one message per call (one caller, and
  eight concurrent callers sharing group commits) and batches of 100, the message values built
  before the clock starts. Signatures use nonces made ahead by the nonce maker process
  (node/services/nonces.py), whose pipe holds 16,384; so also 200,000 in a row, past what it
  holds, and, for comparison in the same run, every signature by RFC 8032 as before it. Then the
  same through the local HTTP API of a ``kachery-node start`` daemon (the ``kachery.node`` client).
- catch-up: a fresh node follows a 100,000-message subfeed held by another node: messages/s from
  subscribing until all are verified and stored. Once with checkpoints (one signature per batch),
  once verifying every signature in worker threads, to compare the two designs.
- live: 1000 messages appended one at a time; for each, the time from the append call until the
  second node has stored it (p50, p99); then in a 10-node swarm, until all 9 followers have it.

The nodes of a run share one process and one Trio loop (both cores are available to SQLite and
signature checks in worker threads). Usage: ./scripts/bench/feeds [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from kachery.node.client import DaemonClient
from kachery.node.daemon.control import NodeControl
from kachery.node.daemon.node import Node
from kachery.node.home import HOME_ENV, NodeHome
from kachery.node.services.feeds.api import FeedAPI
from kachery.node.services.feeds.service import FeedService
from kachery.node.testing import Daemon
from kachery.protocol.feeds import SubfeedRef
from kachery.protocol.uri import subfeed_hash

REFERENCE = "hypercore 11.37.1, loopback TCP, measured here"
GOALS = {
    "append single": ">= 15k/s",
    "append batch": ">= 40k/s",
    "catch-up": ">= 20k/s",
    "live p50": "<= 1 ms",
    "live p99": "<= 5 ms",
    "10-node p99": "<= 50 ms",
}
HYPERCORE = {
    "append single": "9.8k/s",
    "append batch": "100k/s",
    "catch-up": "6.6k/s",
    "live p50": "1.1 ms",
    "live p99": "6.3 ms",
    "10-node p99": "-",
}

rows: list[tuple[str, str, str, str]] = []


def message(i: int) -> dict[str, Any]:
    """A message whose JSON is exactly 200 bytes."""
    base = {"n": i, "kind": "note", "text": ""}
    pad = 200 - len(json.dumps(base, separators=(",", ":")))
    value = {**base, "text": "x" * pad}
    assert len(json.dumps(value, separators=(",", ":"))) == 200
    return value


def row(what: str, value: str, goal_key: str | None = None) -> None:
    goal = GOALS.get(goal_key or "", "")
    ref = HYPERCORE.get(goal_key or "", "")
    rows.append((what, value, goal, ref))
    print(f"  {what:58} {value:>12}", file=sys.stderr, flush=True)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds / 1000:.1f}k/s"


def feeds(node: Node) -> FeedService:
    return node.services.feeds


def feed_api(node: Node) -> FeedAPI:
    return node.services.feed_api


class Cluster:
    """Nodes in one Trio loop, in one channel where every member has every role."""

    def __init__(self, nursery: trio.Nursery, base: Path) -> None:
        self.nursery = nursery
        self.base = base
        self.nodes: list[Node] = []

    async def add(self, name: str) -> Node:
        home, _ = NodeHome.init(self.base / name)
        node = Node(home, listen_host="127.0.0.1", listen_port=0)
        await self.nursery.start(node.run)
        if not self.nodes:
            await NodeControl(node).channel_create("lab")
        else:
            token = (await NodeControl(self.nodes[0]).channel_invite("lab", ["all"]))["token"]
            await NodeControl(node).channel_join(token)
        self.nodes.append(node)
        return node

    async def meshed(self) -> None:
        """Wait until every node has a session with every other."""
        n = len(self.nodes)
        with trio.fail_after(60):
            for node in self.nodes:
                await node.wait_until(lambda node=node: len(node.connections) >= n - 1)


async def timed(
    fn: Callable[[list[dict[str, Any]]], Awaitable[object]], values: list[dict[str, Any]]
) -> float:
    start = time.perf_counter()
    await fn(values)
    return time.perf_counter() - start


async def bench_appends(base: Path, count: int) -> None:
    print("append (in-process, signed and durable on return)", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, base)
        owner = await cluster.add("append-owner")
        f = feeds(owner)
        feed_id = (await FeedAPI(f).feed_create("bench"))["feedId"]
        ref = SubfeedRef(feed_id, subfeed_hash("entries"))
        await f.append(ref, [message(0)])
        n = 1

        def prepared(k: int) -> list[dict[str, Any]]:
            """The next ``k`` message values, built before the clock starts (as hypercore's
            bench appends ready buffers): the figure is the node's append, not the bench's."""
            nonlocal n
            values = [message(n + i) for i in range(k)]
            n += k
            return values

        async def sequential(values: list[dict[str, Any]]) -> None:
            for value in values:
                await f.append(ref, [value])

        async def concurrent(values: list[dict[str, Any]]) -> None:
            async def appender(mine: list[dict[str, Any]]) -> None:
                for value in mine:
                    await f.append(ref, [value])

            async with trio.open_nursery() as inner:
                for k in range(8):  # eight callers share one queue of values, in order
                    inner.start_soon(appender, values[k::8])

        async def batches(values: list[dict[str, Any]]) -> None:
            for at in range(0, len(values), 100):
                await f.append(ref, values[at : at + 100])

        runs = {"seq": [], "conc": [], "batch": []}  # type: dict[str, list[float]]
        for _ in range(3):
            values = prepared(count)
            runs["seq"].append(count / await timed(sequential, values))
            values = prepared(count // 8 * 8)
            runs["conc"].append(len(values) / await timed(concurrent, values))
            values = prepared(count * 2 // 100 * 100)
            runs["batch"].append(len(values) / await timed(batches, values))
        row("append, 1 message per call, one caller", _k(runs["seq"]), "append single")
        row("append, 1 message per call, 8 concurrent callers", _k(runs["conc"]), "append single")
        row("append, batches of 100", _k(runs["batch"]), "append batch")
        values = prepared(count * 20)
        sustained = len(values) / await timed(batches, values)
        row(f"  batches of 100, {len(values):,} in a row", _k([sustained]))
        print(
            f"    ({f.stats.signed_with_precomputed_nonce:,} of {f.stats.appended:,} messages"
            " signed with a nonce made ahead by the nonce maker process)",
            file=sys.stderr,
        )
        live = f.live[(ref.feed_id, ref.subfeed_hash)]
        assert live.signer is not None
        live.signer.nonces = None  # every signature by RFC 8032, as before the nonce maker
        values = prepared(count)
        rfc_single = count / await timed(sequential, values)
        values = prepared(count * 2 // 100 * 100)
        rfc_batch = len(values) / await timed(batches, values)
        row("  1 per call, every signature by RFC 8032 (no nonce maker)", _k([rfc_single]))
        row("  batches of 100, every signature by RFC 8032", _k([rfc_batch]))
        nursery.cancel_scope.cancel()


def _k(rates: list[float]) -> str:
    return f"{statistics.median(rates) / 1000:.1f}k/s"


def bench_api_appends(base: Path, count: int) -> None:
    """The same appends through a real daemon's local HTTP API (the kachery.node client)."""
    import kachery.node as kn

    daemon = Daemon(base / "api-daemon")
    daemon.start()
    old = os.environ.get(HOME_ENV)
    os.environ[HOME_ENV] = str(daemon.home)
    try:
        sub = kn.create_feed("bench").get_subfeed("entries")
        sub.append_message(message(0))
        start = time.perf_counter()
        for i in range(count):
            sub.append_message(message(i))
        single = count / (time.perf_counter() - start)
        start = time.perf_counter()
        calls = max(1, count // 20)
        for i in range(calls):
            sub.append_messages([message(i * 100 + j) for j in range(100)])
        batch = calls * 100 / (time.perf_counter() - start)
    finally:
        if old is None:
            del os.environ[HOME_ENV]
        else:
            os.environ[HOME_ENV] = old
        try:
            stop(daemon)
        finally:
            daemon.kill()  # never leave a daemon behind, whatever failed
    print(
        "append through the local HTTP API (kachery.node client, daemon process)", file=sys.stderr
    )
    row("  via HTTP API, 1 message per call", rate(int(single), 1.0))
    row("  via HTTP API, batches of 100", rate(int(batch), 1.0))


def stop(daemon: Daemon) -> None:
    """Stop a daemon through its API. (Ctrl-C can be swallowed when it lands inside the API
    server's code right after a burst of calls: reported, and avoided here.)"""
    DaemonClient(daemon.home).call("shutdown")
    assert daemon.proc is not None
    daemon.proc.wait(timeout=60)
    daemon.stop()


async def bench_catchup(base: Path, total: int) -> None:
    print(f"catch-up of {total:,} messages by a fresh node", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, base)
        source = await cluster.add("catchup-source")
        f = feeds(source)
        feed_id = (await FeedAPI(f).feed_create("bench"))["feedId"]
        ref = SubfeedRef(feed_id, subfeed_hash("entries"))
        uri = f"feed://{feed_id}/entries"
        for start in range(0, total, 1000):
            await f.append(ref, [message(i) for i in range(start, min(total, start + 1000))])
        for name, every in (("checkpoints", False), ("every signature", True)):
            node = await cluster.add(f"catchup-{name.replace(' ', '-')}")
            feeds(node).receiver.verify_every_signature = every
            with trio.fail_after(600):
                await node.wait_until(lambda node=node: source.node_id in node.connections)
                start = time.perf_counter()
                await feed_api(node).feed_subscribe(uri, "lab")
                await feeds(node).wait_count(ref, total)
            seconds = time.perf_counter() - start
            stats = feeds(node).stats
            how = (
                "one signature per checkpoint, a hash per message"
                if not every
                else f"every signature, {2} worker threads"
            )
            row(
                f"catch-up, {how}",
                rate(total, seconds),
                "catch-up" if not every else None,
            )
            print(
                f"    ({seconds:.2f} s; proven by checkpoint {stats.proven_by_checkpoint:,},"
                f" verified one by one {stats.verified_one_by_one:,})",
                file=sys.stderr,
            )
        nursery.cancel_scope.cancel()


async def bench_live(base: Path, count: int, swarm_size: int) -> None:
    print("live propagation, one message at a time", file=sys.stderr)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, base)
        owner = await cluster.add("live-owner")
        for i in range(1, swarm_size):
            await cluster.add(f"live-{i}")
        await cluster.meshed()
        f = feeds(owner)
        feed_id = (await FeedAPI(f).feed_create("bench"))["feedId"]
        ref = SubfeedRef(feed_id, subfeed_hash("entries"))
        uri = f"feed://{feed_id}/entries"
        followers = cluster.nodes[1:]
        await f.append(ref, [message(0)])

        async def measure(group: list[Node]) -> list[float]:
            for node in group:
                await feed_api(node).feed_subscribe(uri, "lab")
            live = f.live[(ref.feed_id, ref.subfeed_hash)]

            def subscribed() -> bool:
                return all(
                    node.node_id in live.gossip.peers and live.gossip.peers[node.node_id].subscriber
                    for node in group
                )

            with trio.fail_after(60):
                await owner.wait_until(subscribed)
            latencies = []
            for _ in range(count + 50):
                n = f.count(ref)
                start = time.perf_counter()
                await f.append(ref, [message(n)])
                with trio.fail_after(30):
                    for node in group:
                        await feeds(node).wait_count(ref, n + 1)
                latencies.append(time.perf_counter() - start)
            return sorted(latencies[50:])  # the first 50 warm the path up

        two = await measure(followers[:1])
        row("live, until a second node has it: p50", _ms(two, 0.50), "live p50")
        row("live, until a second node has it: p99", _ms(two, 0.99), "live p99")
        many = await measure(followers[1:])
        row(f"live, until all {swarm_size} nodes have it: p50", _ms(many, 0.50))
        row(f"live, until all {swarm_size} nodes have it: p99", _ms(many, 0.99), "10-node p99")
        dup = sum(feeds(node).stats.duplicates for node in followers)
        pushes = sum(feeds(node).stats.pushes_sent for node in cluster.nodes)
        pulls = sum(feeds(node).stats.pulls for node in cluster.nodes)
        print(
            f"    ({pushes:,} pushes, {pulls:,} pulls, {dup:,} duplicates dropped in the swarm)",
            file=sys.stderr,
        )
        nursery.cancel_scope.cancel()


def _ms(sorted_latencies: list[float], q: float) -> str:
    i = min(len(sorted_latencies) - 1, int(q * len(sorted_latencies)))
    return f"{sorted_latencies[i] * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = parser.parse_args()
    appends, total, live = (2000, 20_000, 200) if args.quick else (10_000, 100_000, 1000)
    print(f"loadavg {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="kachery-bench-feeds-") as tmp:
        base = Path(tmp)
        trio.run(bench_appends, base, appends)
        bench_api_appends(base, appends // 5)
        trio.run(bench_catchup, base, total)
        trio.run(bench_live, base, live, 10)
    print(f"\nloadavg {os.getloadavg()[0]:.2f}; messages of 200 bytes (JSON)")
    print(f"{'what':58} {'measured':>12} {'goal':>10}  {REFERENCE}")
    for what, value, goal, ref in rows:
        print(f"{what:58} {value:>12} {goal:>10}  {ref}")


if __name__ == "__main__":
    main()
