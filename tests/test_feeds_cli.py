"""Feeds as a lab member uses them: real ``kachery-node start`` daemons, the ``feed`` commands,
the ``kachery.node`` client, and kill -9 of a daemon in the middle of appends."""

from __future__ import annotations

import functools
import json
import os
import queue
import subprocess
import threading
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import trio

import kachery.node as kn
from kachery.node.home import HOME_ENV
from kachery.node.testing import EXE, Daemon
from kachery.protocol.feeds import (
    Head,
    SubfeedRef,
    finish_batch,
    first_bad_signature,
    prepare_batch,
)
from kachery.protocol.uri import subfeed_hash
from kachery.storage.errors import AlreadyExists

WAIT = 30.0  # seconds: a safety net for reading a child's output, never a pacing device


def run(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], input=stdin, capture_output=True, text=True, env=d.env(), timeout=60
    )


def line_reader(proc: subprocess.Popen[str]) -> tuple[Callable[[], str], threading.Thread]:
    """``next_line()`` returns the child's next stdout line, waiting for it at most WAIT seconds
    (a thread reads the pipe into a queue until it ends: no polling, no sleeps)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return functools.partial(lines.get, timeout=WAIT), reader


def test_the_feed_commands_from_create_to_delete(daemons: dict[str, Daemon]) -> None:
    d = daemons["lab"]
    d.start()
    feed_id = d.cli("feed", "create", "notebook").strip()
    assert len(feed_id) == 64
    assert d.cli("feed", "create", "notebook", "--exist-ok").strip() == feed_id
    uri = f"feed://{feed_id}/entries"
    assert d.cli("feed", "append", uri, '{"session": 3}', '"two"').split() == ["0", "1"]
    assert run(d, "feed", "append", uri, "-", stdin='[3]\n\n{"four": 4}\n').stdout.split() == [
        "2",
        "3",
    ]
    lines = d.cli("feed", "read", uri).splitlines()
    assert lines == ['0\t{"session": 3}', '1\t"two"', "2\t[3]", '3\t{"four": 4}']
    records = [
        json.loads(x) for x in d.cli("feed", "read", uri, "--start", "2", "--json").split("\n") if x
    ]
    assert [r["messageNumber"] for r in records] == [2, 3]
    assert d.cli("feed", "read", uri, "--start", "1", "--limit", "1").strip() == '1\t"two"'
    assert d.cli("feed", "count", uri).strip() == "4"
    listed = d.json("feed", "list")
    assert listed[0]["name"] == "notebook"
    assert listed[0]["subfeeds"][0]["count"] == 4
    assert "notebook" in d.cli("feed", "list")

    bad = run(d, "feed", "append", uri, "not json")
    assert bad.returncode == 1
    assert "is not JSON" in bad.stderr
    not_an_id = run(d, "feed", "forks", "nothex")
    assert not_an_id.returncode == 1
    assert "'nothex' is not 64 hex digits" in not_an_id.stderr
    assert d.json("feed", "forks", feed_id.upper()) == []
    refused = run(d, "feed", "delete", feed_id)
    assert refused.returncode == 1
    assert "destroys its private key" in refused.stderr
    assert "--force" in refused.stderr  # the flag a command-line user types
    assert d.cli("feed", "count", uri).strip() == "4"
    d.cli("feed", "delete", feed_id, "--force")
    assert run(d, "feed", "count", uri).returncode == 1


def test_feed_watch_prints_messages_as_they_arrive_from_another_node(
    daemons: dict[str, Daemon],
) -> None:
    owner, member = daemons["owner"], daemons["member"]
    owner.start()
    member.start()
    owner.cli("channel", "create", "lab")
    token = owner.cli("channel", "invite", "lab", "--roles", "requestFeeds,provideFeeds").strip()
    member.cli("join", token)
    feed_id = owner.cli("feed", "create", "notebook").strip()
    uri = f"feed://{feed_id}/entries"
    owner.cli("feed", "append", uri, '"before"')
    member.cli("feed", "subscribe", uri, "lab")
    watch = subprocess.Popen(
        [EXE, "feed", "watch", uri, "--start", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=member.env(),
    )
    next_line, reader = line_reader(watch)
    try:
        assert next_line() == '0\t"before"\n'
        for i in range(1, 4):
            owner.cli("feed", "append", uri, json.dumps({"live": i}))
            assert next_line() == f'{i}\t{{"live": {i}}}\n'
    finally:
        watch.terminate()
        watch.wait(timeout=30)
        reader.join(timeout=WAIT)  # it reads to the end of the pipe, then the pipe can close
        assert watch.stdout is not None
        assert watch.stderr is not None
        watch.stdout.close()
        watch.stderr.close()


def test_the_python_client_mirrors_kachery_client(
    daemons: dict[str, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = daemons["lab"]
    d.start()
    monkeypatch.setenv(HOME_ENV, str(d.home))
    feed = kn.create_feed("notebook")
    with pytest.raises(AlreadyExists):
        kn.create_feed("notebook")
    assert kn.get_feed_id("notebook") == feed.feed_id
    assert kn.get_feed_id("notebook", create=True) == feed.feed_id
    assert kn.get_feed_id("missing") is None
    assert kn.load_feed("notebook").feed_id == feed.feed_id
    entries = kn.load_feed(feed.uri).get_subfeed("entries")
    assert entries.uri == f"feed://{feed.feed_id}/entries"
    assert entries.get_subfeed_hash() == subfeed_hash("entries")
    assert entries.append_message({"n": 0}) == 0
    assert entries.append_messages([{"n": 1}, {"n": 2}]) == 1
    assert entries.get_num_local_messages() == 3
    assert entries.get_next_messages(wait_msec=0) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert entries.get_next_messages(wait_msec=0) == []
    assert entries.get_position() == 3

    # get_next_messages waits for the next message (appended from another thread).
    appender = threading.Thread(target=entries.append_message, args=({"n": 3},))
    got: list[Any] = []
    reader = threading.Thread(
        target=lambda: got.extend(entries.get_next_messages(wait_msec=30_000))
    )
    reader.start()
    appender.start()
    appender.join(timeout=WAIT)
    reader.join(timeout=WAIT)
    assert got == [{"n": 3}]

    # message_stream replays from the position, then blocks for new messages.
    entries.set_position(2)
    stream = entries.message_stream()
    assert [next(stream), next(stream)] == [{"n": 2}, {"n": 3}]
    threading.Thread(target=entries.append_message, args=({"n": 4},)).start()
    assert next(stream) == {"n": 4}
    stream.close()

    # The Trio-native iterator.
    async def watch() -> list[Any]:
        entries.set_position(3)
        seen: list[Any] = []
        with trio.fail_after(WAIT):
            async with aclosing(entries.watch()) as messages:
                async for message in messages:
                    seen.append(message)
                    if len(seen) == 2:
                        await trio.to_thread.run_sync(entries.append_message, {"n": 5})
                    if len(seen) == 3:
                        break
        return seen

    assert trio.run(watch) == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert entries.get_position() == 6


def test_an_acknowledged_append_survives_kill_9(
    daemons: dict[str, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = daemons["lab"]
    d.start()
    monkeypatch.setenv(HOME_ENV, str(d.home))
    entries = kn.create_feed("ledger").get_subfeed("entries")
    acked: list[int] = []
    enough = threading.Event()

    def append_forever() -> None:
        try:
            for i in range(100_000):
                acked.append(entries.append_message({"entry": i, "pad": "x" * 150}))
                if len(acked) >= 300:
                    enough.set()
        except Exception:  # the daemon dies under it: the call in flight was never acknowledged
            enough.set()

    thread = threading.Thread(target=append_forever)
    thread.start()
    assert enough.wait(WAIT)
    assert d.proc is not None
    d.proc.kill()  # SIGKILL, while appends are in flight
    thread.join(timeout=WAIT)
    d.kill()
    assert acked == list(range(len(acked)))

    d.start()
    stored = entries.get_num_local_messages()
    assert stored >= len(acked)  # nothing acknowledged was lost
    records = entries.get_next_messages(max_num_messages=stored, signed=True)
    assert [r["message"]["entry"] for r in records] == list(range(stored))
    # And what survived is a valid signed chain: verify it as a peer would.
    ref = SubfeedRef(entries.get_feed_id(), entries.get_subfeed_hash())
    items = [[bytes.fromhex(r["body"]), bytes.fromhex(r["signature"])] for r in records]
    prepared = prepare_batch(ref, Head.empty(ref), items)
    assert first_bad_signature(ref, prepared.bodies, prepared.signatures, prepared.unproven) is None
    assert finish_batch(prepared).count == stored
    # The node appends after the restart, continuing the same chain.
    assert entries.append_message({"entry": "after restart"}) == stored
    assert os.environ[HOME_ENV] == str(d.home)
