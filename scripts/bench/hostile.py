"""Hostile peers against a real daemon (a subprocess), in one run.

Prints the attacks run and how many daemons exited (must be 0), the victim's RSS before and
after 300k one-way messages from a member (goal: growth under 10 MB), and an honest member's
load latency (``kachery-node load`` of a fresh 1 MB file, median) during a pre-handshake flood
(1 MB M1s and silent handshakes from many connections) against the same without it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import struct
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import trio

from kachery.node.daemon.peer import handshake_as_initiator
from kachery.node.daemon.transport import LinkClosed, dial
from kachery.node.home import NodeHome
from kachery.node.testing import Daemon
from kachery.protocol.codec import encode
from kachery.protocol.files import CancelData
from kachery.protocol.identity import KeyPair
from kachery.protocol.messages import DocAnnounce
from kachery.protocol.session import PROTOCOL, Claim


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_seconds(victim: Daemon, member: Daemon, base: Path, n: int) -> list[float]:
    times = []
    for _ in range(n):
        path = base / f"f-{os.urandom(4).hex()}.bin"
        path.write_bytes(os.urandom(1 << 20))
        uri = victim.cli("store", str(path)).strip()
        start = time.perf_counter()
        member.cli("load", uri)
        times.append(time.perf_counter() - start)
    return times


async def reset_after_upgrade(host: str, port: int) -> None:
    sock = trio.socket.socket()
    await sock.connect((host, port))
    await sock.send(
        f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {PROTOCOL}\r\n\r\n".encode()
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def send_m1(address: str, m1: bytes) -> None:
    with contextlib.suppress(Exception):
        async with dial(address) as link:
            await link.send(m1)
            with trio.move_on_after(2), contextlib.suppress(LinkClosed):
                await link.receive()


async def as_member(address: str, key: KeyPair, node_id: str, channel: str, frames: int) -> None:
    """A session as a member, then ``frames`` one-way messages (cancels of unknown streams)."""
    async with dial(address) as link:
        session, _, _ = await handshake_as_initiator(
            link, key, expected_peer=node_id, make_claim=lambda _s, _i: Claim(channels=(channel,))
        )
        for i in range(frames):
            await link.send(session.send_message(CancelData(stream=i)))
        await link.send(session.send_message(DocAnnounce(channel=channel, version=1)))
        await trio.sleep(1)


async def flood(address: str, stop: trio.Event) -> int:
    sent = 0
    big = encode({"protocol": PROTOCOL, "e": os.urandom(32), "n": os.urandom(1 << 20)})
    async with trio.open_nursery() as nursery:
        while not stop.is_set():
            for _ in range(8):
                nursery.start_soon(send_m1, address, big)
                sent += 1
            await trio.sleep(0.1)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kachery-bench-hostile-") as tmp:
        base = Path(tmp)
        victim, member, rogue = (Daemon(base / n) for n in ("victim", "member", "rogue"))
        daemons = (victim, member, rogue)
        try:
            for d in daemons:
                d.start()
            victim.cli("channel", "create", "lab")
            for d in (member, rogue):
                d.cli("join", victim.cli("channel", "invite", "lab", "--roles", "all").strip())
            for d in daemons:
                d.cli("peers", "--wait-for", *(o.node_id for o in daemons if o is not d))
            channel = victim.json("channel", "list")[0]["channelId"]
            rogue.stop()
            key = NodeHome.open(rogue.home).keypair
            address = victim.json("status")["addresses"][0]
            parts = urlsplit(address)
            host, port = parts.hostname or "127.0.0.1", parts.port or 0
            assert victim.proc is not None
            pid = victim.proc.pid
            attacks = 0

            quiet = load_seconds(victim, member, base, args.loads)

            async def attack() -> tuple[float, float, list[float], int]:
                nonlocal attacks
                for _ in range(200):
                    await reset_after_upgrade(host, port)
                    attacks += 1
                for point in (bytes(32), b"\x01" + bytes(31)):
                    for _ in range(10):
                        await send_m1(
                            address, encode({"protocol": PROTOCOL, "e": point, "n": os.urandom(32)})
                        )
                        attacks += 1
                await trio.sleep(1)
                before = rss_mb(pid)
                await as_member(address, key, victim.node_id, channel, args.messages)
                attacks += 1
                await trio.sleep(1)
                after = rss_mb(pid)
                stop = trio.Event()
                result: list[float] = []
                sent = 0
                async with trio.open_nursery() as nursery:

                    async def run_flood() -> None:
                        nonlocal sent
                        sent = await flood(address, stop)

                    nursery.start_soon(run_flood)
                    await trio.sleep(1)
                    result = await trio.to_thread.run_sync(
                        load_seconds, victim, member, base, args.loads
                    )
                    stop.set()
                attacks += sent
                return before, after, result, sent

            before, after, flooded, sent = trio.run(attack)
            exits = sum(d.proc is None or d.proc.poll() is not None for d in (victim, member))
            status = victim.json("status")
            print(f"attacks run                                  {attacks}")
            print(f"daemon exits                                 {exits}   (goal 0)")
            print(
                f"victim RSS, {args.messages} one-way messages   {before:.1f} -> {after:.1f} MB"
                f"   growth {after - before:+.1f} MB (goal < 10 MB)"
            )
            q, f = statistics.median(quiet), statistics.median(flooded)
            print(f"honest 1 MB load, no flood (reference)       p50 {q * 1000:.0f} ms")
            print(
                f"honest 1 MB load, during a flood of {sent} 1 MB M1s  p50 {f * 1000:.0f} ms"
                f"   ({f / q:.2f}x)"
            )
            print(
                f"victim: faults contained {status['peerFaultsContained']},"
                f" connections lost {status['peerConnectionsLost']},"
                f" handshakes refused busy {status['handshakesRefusedBusy']}"
            )
        finally:
            for d in daemons:
                d.kill()


if __name__ == "__main__":
    main()
