"""The kachery-node demo: what a lab member would type, run for real, with what it prints.

Every step runs the real ``kachery-node`` command in a temporary node home, so the demo leaves
nothing behind. Run it with ./scripts/demo.
"""

from __future__ import annotations

import filecmp
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _demo_feeds import feeds_demo, relay_demo
from _demo_tasks import offline_tasks_demo, tasks_demo

from kachery.node.testing import Daemon
from kachery.protocol import parse_file_uri

EXE = str(Path(sys.executable).with_name("kachery-node"))


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def run(home: Path, *args: str, stdin: bytes | None = None, show: bool = True) -> str:
    env = {**os.environ, "KACHERY_NODE_HOME": str(home)}
    print(f"$ kachery-node {shlex.join(args)}", flush=True)
    proc = subprocess.run([EXE, *args], input=stdin, capture_output=True, env=env, check=False)
    out = proc.stdout.decode(errors="replace")
    if show and out:
        print(out.rstrip("\n"))
    if proc.stderr:
        print(proc.stderr.decode(errors="replace").rstrip("\n"))
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed with exit code {proc.returncode}")
    return out.strip()


@contextmanager
def lab_swarm(base: Path) -> Iterator[dict[str, Daemon]]:
    """Three daemons on loopback (owner, alice, bob), stopped (Ctrl-C) at the end."""
    nodes = {name: Daemon(base / name) for name in ("owner", "alice", "bob")}
    try:
        for name, node in nodes.items():
            node.start()
            print(f"started {name}: node {node.node_id[:16]}... (kachery-node start)")
        yield nodes
    finally:
        for node in nodes.values():
            if node.proc is not None:
                node.stop()


def channel_part(nodes: dict[str, Daemon], base: Path) -> None:
    """Part 2: a private channel: create, invite, join, peer exchange, refusals."""
    owner, alice, bob = nodes["owner"], nodes["alice"], nodes["bob"]
    show(owner, "channel", "create", "lab", "--label", "Buzsaki lab recordings")
    say("The owner invites each member: a token to paste, valid 7 days, one use.")
    roles = "requestFiles,provideFiles,requestFeeds,provideFeeds,requestTasks,provideTasks"
    token = ""
    for name in ("alice", "bob"):
        print(f"$ kachery-node channel invite lab --roles {roles} --uses 1")
        token = owner.cli("channel", "invite", "lab", "--roles", roles, "--uses", "1").strip()
        print(f"{token[:48]}...  ({len(token)} characters)")
        say(f"{name} joins: dials the owner, proves the invite, is added to the channel.")
        print("$ kachery-node join kachery-invite:...")
        print(nodes[name].cli("join", token).strip())
    say("All three hold the same signed membership document:")
    show(bob, "channel", "members", "lab")
    say("bob was told only the owner's address; he finds alice by peer exchange:")
    show(bob, "peers", "--wait-for", owner.node_id, alice.node_id)
    say("Every session is authenticated and encrypted; outsiders are refused:")
    stranger = Daemon(base / "stranger")
    stranger.start()
    try:
        show(stranger, "channel", "create", "elsewhere")
        print("$ kachery-node join <the invite bob used>")
        print(stranger.cli("join", token, check=False).strip())
    finally:
        stranger.stop()


def files_part(nodes: dict[str, Daemon], base: Path) -> None:
    """Part 3: alice shares a recording; bob loads it from every member that has it."""
    alice, bob, owner = nodes["alice"], nodes["bob"], nodes["owner"]
    say("alice stores a 300 MB recording; the owner keeps a copy too (a second provider).")
    recording = base / "session3.dat"
    with open(recording, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(300):
            f.write(block[i:] + block[:i])
    uri = show(alice, "store", str(recording))
    owner.cli("store", str(recording))
    say("bob asks the channel who has it, then loads it: pieces come from both, verified.")
    show(bob, "find", uri)
    print(f"$ kachery-node load {uri} -o {base / 'copy.dat'}")
    start = time.perf_counter()
    bob.cli("load", uri, "-o", str(base / "copy.dat"))
    elapsed = time.perf_counter() - start
    fetched = bob.last_load_seconds()
    same = filecmp.cmp(recording, base / "copy.dat", shallow=False)
    print(
        f"fetched 300 MB into bob's store in {fetched:.2f} s ({300 / fetched:.0f} MB/s, every"
        f" piece verified); {elapsed:.2f} s with the command's start and the copy to copy.dat;"
        f" identical: {same}"
    )
    say("A byte range of a file not stored here fetches only the pieces that cover it:")
    other = base / "other.dat"
    other.write_bytes(os.urandom(60_000_000))
    other_uri = alice.cli("store", str(other)).strip()
    print(f"$ kachery-node cat {other_uri} --start 45000000 --end 45000016 | xxd")
    data = subprocess.run(
        [EXE, "cat", other_uri, "--start", "45000000", "--end", "45000016"],
        capture_output=True,
        env=bob.env(),
        check=True,
    ).stdout
    print(data.hex(" "), "(matches:", data == other.read_bytes()[45_000_000:45_000_016], ")")


def show(node: Daemon, *args: str) -> str:
    print(f"$ kachery-node {shlex.join(args)}")
    out = node.cli(*args)
    print(out.rstrip("\n"))
    return out.strip()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kachery-demo-") as tmp:
        base = Path(tmp)
        local(base)
        say("Part 2: a private channel. Three nodes on this machine: an owner and two members.")
        with lab_swarm(base) as nodes:
            channel_part(nodes, base)
            files_part(nodes, base)
            notebook = feeds_demo(nodes, base)
            calculation = tasks_demo(nodes, base, notebook)
            relay_demo(nodes, base, notebook)
            offline_tasks_demo(nodes, calculation)
    print("\ndemo finished; its temporary node homes are removed.")


def local(base: Path) -> None:
    """Part 1: one node's local store."""
    home = base / "lab-node"
    say("A node is an Ed25519 key pair in a home directory; its ID is the public key.")
    run(home, "init")

    say("Store files: each prints its content URI, the same one kachery computes.")
    notes = base / "notes.txt"
    notes.write_text("2026-11-25 session 3: 64 channels, 30 kHz, probe B\n")
    uri_notes = run(home, "store", str(notes))
    big = base / "recording.dat"
    with open(big, "wb") as f:
        for i in range(45):
            f.write(bytes([i]) * 1_000_000)
    start = time.perf_counter()
    uri_big = run(home, "store", str(big))
    elapsed = time.perf_counter() - start
    print(f"(45 MB stored in {elapsed:.2f} s; over 20 MB, so its URI carries a manifest)")
    run(home, "store", "-", stdin=b'{"subject": "mouse-17", "depth_um": 1200}')

    say("List, load and cat: the bytes come back from the store, verified when stored.")
    run(home, "ls")
    out = base / "copy.txt"
    run(home, "load", uri_notes, "-o", str(out))
    print(f"copy matches: {out.read_bytes() == notes.read_bytes()}")
    run(home, "cat", uri_notes, "--start", "0", "--end", "18")
    print()
    say("A chunk URI names a byte range of a big file; only that range is read.")
    manifest = json.loads(run(home, "cat", f"sha1://{parse_file_uri(uri_big).manifest_sha1}"))
    last = manifest["chunks"][-1]
    chunk = f"sha1://{last['sha1']}?chunkOf={manifest['sha1']}~{last['start']}~{last['end']}"
    chunk_out = base / "chunk.bin"
    run(home, "load", chunk, "-o", str(chunk_out))
    print(f"chunk is {chunk_out.stat().st_size} bytes")

    say("Mutables: a node-local key/value store for aliases and settings.")
    run(home, "mutable", "set", "latest-recording", uri_big)
    run(home, "mutable", "get", "latest-recording")

    say("verify re-hashes everything in the store.")
    run(home, "verify")
    run(home, "info")

    say("Bad input gets a one-line error and changes nothing.")
    env = {**os.environ, "KACHERY_NODE_HOME": str(home)}
    for args in (["cat", "sha1://not-a-hash"], ["store", str(base / "missing.txt")]):
        print(f"$ kachery-node {shlex.join(args)}")
        proc = subprocess.run([EXE, *args], capture_output=True, env=env, check=False)
        print(proc.stderr.decode().rstrip(), f"(exit code {proc.returncode})")


if __name__ == "__main__":
    main()
