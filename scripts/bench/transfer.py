"""Benchmark: a 1 GiB file loaded by node B from node A over loopback, end to end.

Measured in one run, on the same bytes:
- raw loopback TCP (one process sends, another receives and discards): the ceiling;
- the reference a user would reach for: ``python -m http.server`` and ``curl -o``, then a
  hashlib SHA-1 pass over the downloaded file (download, then verify); and beside it, for
  context only, the same followed by an fdatasync of the download: kachery-node's load waits
  until the file's bytes are on disk before it lands in the store (pieces are fdatasync'ed as
  they are recorded), curl never does, and this VM's disk writes at 0.3-1.2 GB/s;
- ``kachery-node load URI`` on node B: from the command's start until the verified file is in
  B's store (encrypted session, every piece verified, whole-file SHA-1 checked);
- multi-source: three providers each capped at R (``--max-upload-rate``); one downloader.
Goal (issue 4): kachery-node >= the download-then-verify reference; multi-source >= 2.5 x R.
Usage: scripts/bench/transfer [--size BYTES] [--repeat N] [--rate BYTES_PER_S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import GIB, write_random_file

from kachery.node.home import NodeHome
from kachery.node.testing import Daemon

SINK = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); n = 0
buf = bytearray(1 << 20)
while (k := c.recv_into(buf)):
    n += k
print(n, flush=True)
"""


def raw_tcp(path: Path) -> float:
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
        sock.sendfile(f)
    received = int(sink.stdout.readline())
    elapsed = time.perf_counter() - start
    sink.wait()
    sink.stdout.close()
    assert received == path.stat().st_size
    return elapsed


def http_then_verify(path: Path, out: Path, expected: str) -> tuple[float, float, float]:
    """Seconds to download with curl, to verify with hashlib, and then to fdatasync the file
    (which curl never does, and kachery-node does before a downloaded file lands)."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(path.parent),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N ..."
        port = int(line.split(" port ")[1].split()[0])
        url = f"http://127.0.0.1:{port}/{path.name}"
        start = time.perf_counter()
        subprocess.run(["curl", "-s", "-o", str(out), url], check=True)
        download = time.perf_counter() - start
        start = time.perf_counter()
        h = hashlib.sha1()
        with open(out, "rb", buffering=0) as f:
            while block := f.read(4 << 20):
                h.update(block)
        verify = time.perf_counter() - start
        assert h.hexdigest() == expected
        start = time.perf_counter()
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        sync = time.perf_counter() - start
        out.unlink()
        return download, verify, sync
    finally:
        server.terminate()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def swarm(base: Path, names: list[str], rate: str | None = None) -> list[Daemon]:
    nodes = [Daemon(base / name) for name in names]
    owner = nodes[0]
    owner.start(*(("--max-upload-rate", rate) if rate else ()))
    owner.cli("channel", "create", "bench")
    for node in nodes[1:]:
        extra = ("--max-upload-rate", rate) if rate and node is not nodes[-1] else ()
        node.start(*extra)
        node.cli("join", owner.cli("channel", "invite", "bench", "--roles", "all").strip())
    last = nodes[-1]
    last.cli("peers", "--wait-for", *(n.node_id for n in nodes[:-1]))
    return nodes


def timed_load(node: Daemon, uri: str, sha1: str) -> float:
    start = time.perf_counter()
    node.cli("load", uri)
    elapsed = time.perf_counter() - start
    home = NodeHome.open(node.home)
    entry = home.files.get(sha1)
    assert entry is not None, "the load did not land the file"
    home.files.remove(sha1)  # the next run loads from scratch (the manifest stays)
    home.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=GIB)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50e6, help="R for the multi-source run")
    args = parser.parse_args()
    if not shutil.which("curl"):
        sys.exit("curl is needed for the reference download")
    with tempfile.TemporaryDirectory(prefix="kachery-bench-", dir=Path.home()) as tmp:
        base = Path(tmp)
        data_dir = base / "www"
        data_dir.mkdir()
        path = data_dir / "data.bin"
        print(f"writing a {args.size / GIB:.2f} GiB test file ...", flush=True)
        write_random_file(path, args.size)
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                h.update(block)
        expected = h.hexdigest()

        a, b = swarm(base, ["a", "b"])
        try:
            uri = a.cli("store", str(path)).strip()
            timed_load(b, uri, expected)  # warm-up: manifest fetched, page cache touched
            tcp, http, verify, sync, kachery = [], [], [], [], []
            for _ in range(args.repeat):  # interleaved, so noise hits every method alike
                tcp.append(raw_tcp(path))
                d, v, f = http_then_verify(path, base / "out.bin", expected)
                http.append(d)
                verify.append(v)
                sync.append(f)
                kachery.append(timed_load(b, uri, expected))
        finally:
            for node in (a, b):
                node.stop()

        size = args.size
        ref = [d + v for d, v in zip(http, verify, strict=True)]
        durable = [r + f for r, f in zip(ref, sync, strict=True)]
        rows = [
            ("raw loopback TCP (sendfile -> recv)", tcp),
            ("http.server -> curl (download only)", http),
            ("hashlib SHA-1 of the download", verify),
            ("reference: curl download, then verify", ref),
            ("  the same, then fdatasync (not the goal)", durable),
            ("kachery-node load (encrypted, verified)", kachery),
        ]
        print(f"\n{'what':42} {'GB/s':>6} {'median s':>9} {'min..max s':>14}")
        for name, times in rows:
            med = statistics.median(times)
            spread = f"{min(times):6.2f}..{max(times):<6.2f}"
            print(f"{name:42} {size / med / 1e9:6.2f} {med:9.2f} {spread}")
        ratio = statistics.median(ref) / statistics.median(kachery)
        print(f"\nkachery-node load vs download-then-verify: {ratio:.2f}x (goal >= 1.0)")

        print(
            f"\nmulti-source: 3 providers capped at R = {args.rate / 1e6:.0f} MB/s each ...",
            flush=True,
        )
        multi_size = int(args.rate * 16)  # ~5 s at 3 x R: long enough that start-up amortises
        multi = data_dir / "multi.bin"
        write_random_file(multi, multi_size)
        nodes = swarm(base / "multi", ["p1", "p2", "p3", "downloader"], rate=str(args.rate))
        try:
            uri = ""
            for provider in nodes[:3]:
                uri = provider.cli("store", str(multi)).strip()
            sha1 = uri.split("//")[1].split("/")[0].split("?")[0]
            elapsed = timed_load(nodes[3], uri, sha1)
            served = [p.json("status")["files"]["bytesUploaded"] for p in nodes[:3]]
            inside = nodes[3].last_load_seconds()
        finally:
            for node in nodes:
                node.stop()
        rate = multi_size / inside
        print(
            f"downloader: {rate / 1e6:.0f} MB/s = {rate / args.rate:.2f} x R (goal >= 2.5);"
            f" {multi_size / elapsed / args.rate:.2f} x R counting the CLI's start-up"
        )
        print("bytes served by each provider:", ", ".join(f"{s / 1e6:.0f} MB" for s in served))
        print(
            json.dumps(
                {
                    "loadGBps": size / statistics.median(kachery) / 1e9,
                    "ratio": ratio,
                    "multiSourceTimesR": rate / args.rate,
                }
            )
        )


if __name__ == "__main__":
    main()
