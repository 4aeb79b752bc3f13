"""The feeds part of the demo: a lab notebook on one node, followed live on another.

Called from scripts/demo.py with the running daemons of the lab channel. Every step runs the real
``kachery-node`` command; ``feed watch`` runs as its own process and its lines are shown as they
arrive (a thread reads them into a queue: nothing polls or sleeps).
"""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from kachery.node.client import DaemonClient
from kachery.node.testing import EXE, Daemon


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def show(node: Daemon, *args: str) -> str:
    print(f"$ kachery-node {shlex.join(args)}", flush=True)
    out = node.cli(*args)
    if out.strip():
        print(out.rstrip("\n"), flush=True)
    return out.strip()


class Watch:
    """A ``kachery-node feed watch`` process whose lines arrive in a queue."""

    def __init__(self, node: Daemon, uri: str) -> None:
        self.proc = subprocess.Popen(
            [EXE, "feed", "watch", uri, "--start", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=node.env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise SystemExit("demo step failed: feed watch printed nothing") from None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def feeds_demo(nodes: dict[str, Daemon], base: Path) -> str:
    """Part: feeds. alice keeps a lab notebook; bob follows it live. Returns its URI."""
    owner, alice, bob = nodes["owner"], nodes["alice"], nodes["bob"]
    say("Feeds: signed append-only logs. alice starts a lab notebook (a feed is a key pair).")
    feed_id = show(alice, "feed", "create", "notebook")
    uri = f"feed://{feed_id}/entries"
    entries = [
        {"session": 3, "note": "probe B inserted, 1200 um"},
        {"session": 3, "note": "baseline recording started"},
    ]
    show(alice, "feed", "append", uri, *(json.dumps(e) for e in entries))

    say("bob follows the notebook through the lab channel, and watches it live:")
    show(bob, "feed", "subscribe", uri, "lab")
    print(f"$ kachery-node feed watch {uri} --start 0 &", flush=True)
    watch = Watch(bob, uri)
    try:
        for _ in entries:
            print(f"  [bob's watch] {watch.line()}", flush=True)
        say("alice appends as the experiment goes; each entry appears in bob's watch at once:")
        for note in ("stimulus block A", "stimulus block B", "session ended, probe out"):
            value = json.dumps({"session": 3, "note": note})
            print(f"$ kachery-node feed append {uri} '{value}'", flush=True)
            start = time.perf_counter()
            alice.cli("feed", "append", uri, value)
            line = watch.line()
            elapsed = (time.perf_counter() - start) * 1000
            print(f"  [bob's watch] {line}   ({elapsed:.0f} ms after the command, incl. its start)")

        say("alice lets the owner's node write too: it submits, alice's node signs and appends.")
        show(alice, "feed", "grant", uri, owner.node_id)
        show(
            owner, "feed", "submit", uri, json.dumps({"session": 3, "note": "spike sorting queued"})
        )
        print(f"  [bob's watch] {watch.line()}", flush=True)
    finally:
        watch.stop()

    say("Every message is signed and chained; bob verified each before storing it:")
    record = json.loads(bob.cli("feed", "read", uri, "--start", "5", "--json", "--signed"))
    print(
        f"message 5: {json.dumps(record['message'])}, metaData {json.dumps(record['metaData'])},"
        f" signature {record['signature'][:32]}..."
    )
    show(bob, "feed", "list")
    return uri


def relay_demo(nodes: dict[str, Daemon], base: Path, uri: str) -> None:
    """Part: alice goes offline; bob relays her notebook to the owner."""
    owner, alice, bob = nodes["owner"], nodes["alice"], nodes["bob"]
    say("alice goes offline; bob serves the notebook to the owner, who follows it from him:")
    held = len(bob.cli("feed", "read", uri).splitlines())
    DaemonClient(alice.home).call("shutdown")
    assert alice.proc is not None
    alice.proc.wait(timeout=60)
    alice.stop()
    show(owner, "feed", "subscribe", uri, "lab")
    relayed = Watch(owner, uri)
    try:
        lines = [relayed.line() for _ in range(held)]
    finally:
        relayed.stop()
    print(f"owner now holds {len(lines)} messages, the last: {lines[-1]}")
    print(f"(feeds stored under {base}: removed at the end of the demo)")
