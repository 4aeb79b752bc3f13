"""Benchmark: kachery/1 handshakes, and session throughput encrypted versus plain.

Two processes on loopback, with the node's own transport (trio-websocket as the daemon tunes it):
- handshake: N dials, each a new TCP connection, websocket upgrade and kachery handshake
  (X25519 + Ed25519 both ways, 1.5 round trips and the verdict); p50 and p99, beside the bare
  websocket connection without the handshake;
- throughput: 1 GiB in 256 KiB messages from the listening process to the dialing one
  (server -> client, the direction bulk data flows when a downloader dials a provider), and
  the other way, as plain websocket messages and as AEGIS-256 session frames (encrypted,
  authenticated, decrypted on arrival).
Goal (issue 3): encryption costs at most 30% of plain throughput; handshake p50 under 10 ms.
Usage: scripts/bench/session [--handshakes N] [--size BYTES] [--repeat N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time

import trio

from kachery.node.daemon.boundary import PeerFaults
from kachery.node.daemon.peer import handshake_as_initiator, handshake_as_responder
from kachery.node.daemon.process import tune_malloc
from kachery.node.daemon.transport import Link, LinkClosed, dial, listen
from kachery.protocol.identity import KeyPair
from kachery.protocol.session import Admission, Claim, DataBlock, DataReceived, Session

MESSAGE = 256 * 1024
SERVER_KEY = KeyPair(b"s" * 32)
CLIENT_KEY = KeyPair(b"c" * 32)


async def admit(session: Session, identified: object) -> Admission:
    return Admission()


async def serve(mode: str, direction: str, size: int) -> None:
    """The listening process: prints its port, then serves one kind of connection forever."""
    payload = os.urandom(MESSAGE)

    async def handler(link: Link) -> None:
        session = None
        if mode in ("handshake", "encrypted"):
            session, _, _ = await handshake_as_responder(
                link, SERVER_KEY, observed_address="", admit=admit
            )
        if mode in ("connect", "handshake"):
            with contextlib.suppress(LinkClosed):
                await link.receive()  # until the client closes
            return
        await transfer(link, session, payload, size, send=direction == "s2c")

    async with trio.open_nursery() as nursery:
        start = functools.partial(listen, handler, "127.0.0.1", 0, faults=PeerFaults())
        port = await nursery.start(start)
        print(port, flush=True)


async def transfer(
    link: Link, session: Session | None, payload: bytes, size: int, *, send: bool
) -> float:
    """Send or receive ``size`` bytes; the receiver acknowledges the end."""
    start = time.perf_counter()
    if send:
        # The node's provider reads file bytes straight into DataBlocks (no copy before the
        # cipher); one block reused here, as the plain run reuses one payload.
        block = DataBlock.of(payload)
        for offset in range(0, size, MESSAGE):
            frame = payload if session is None else session.send_data(1, offset, block)
            await link.send(frame)
        await link.receive()  # the receiver's acknowledgement
    else:
        got = 0
        while got < size:
            data = await link.receive()
            if session is None:
                got += len(data)
            else:
                event = session.receive(data)
                assert isinstance(event, DataReceived)
                got += len(event.payload)
        await link.send(b"ok" if session is None else session.send_data(0, 0, b"ok"))
    return time.perf_counter() - start


async def client_throughput(port: int, mode: str, direction: str, size: int) -> float:
    async with dial(f"ws://127.0.0.1:{port}") as link:
        session = None
        if mode != "plain":
            session, _, _ = await handshake_as_initiator(
                link, CLIENT_KEY, expected_peer=SERVER_KEY.id, make_claim=lambda s, i: Claim()
            )
        payload = os.urandom(MESSAGE)
        return await transfer(link, session, payload, size, send=direction == "c2s")


async def client_handshakes(port: int, count: int, with_handshake: bool) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        async with dial(f"ws://127.0.0.1:{port}") as link:
            if with_handshake:
                await handshake_as_initiator(
                    link, CLIENT_KEY, expected_peer=SERVER_KEY.id, make_claim=lambda s, i: Claim()
                )
            times.append(time.perf_counter() - start)
    return times


def start_server(mode: str, direction: str, size: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, direction, str(size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        tune_malloc()
        trio.run(serve, sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--size", type=int, default=1 << 30)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tune_malloc()

    print(f"{args.handshakes} connections each, loopback, separate processes")
    for label, mode, with_handshake in (
        ("websocket connect only (reference)", "connect", False),
        ("websocket connect + kachery handshake", "handshake", True),
    ):
        proc, port = start_server(mode, "s2c", 0)
        try:
            times = trio.run(client_handshakes, port, args.handshakes, with_handshake)
        finally:
            stop(proc)
        ms = [t * 1000 for t in times[10:]]  # the first few warm caches up
        print(f"  {label:40} p50 {pct(ms, 0.5):6.2f} ms   p99 {pct(ms, 0.99):6.2f} ms")

    gib = args.size / (1 << 30)
    print(f"\nsession throughput, {gib:.2f} GiB in 256 KiB messages (median of {args.repeat})")
    results: dict[tuple[str, str], float] = {}
    for direction in ("s2c", "c2s"):
        rates: dict[str, list[float]] = {"plain": [], "encrypted": []}
        for _ in range(args.repeat):  # interleaved, so a noisy moment hits both modes alike
            for mode in rates:
                proc, port = start_server(mode, direction, args.size)
                try:
                    elapsed = trio.run(client_throughput, port, mode, direction, args.size)
                finally:
                    stop(proc)
                rates[mode].append(args.size / elapsed / 1e9)
        for mode, measured in rates.items():
            results[direction, mode] = statistics.median(measured)
            print(
                f"  {'listener -> dialer' if direction == 's2c' else 'dialer -> listener':20}"
                f" {mode:10} {results[direction, mode]:5.2f} GB/s"
                f"   ({min(measured):.2f}..{max(measured):.2f})"
            )
        cost = 1 - results[direction, "encrypted"] / results[direction, "plain"]
        print(f"  {'':20} encryption costs {cost * 100:4.0f}% of plain throughput (goal <= 30%)")


if __name__ == "__main__":
    main()
