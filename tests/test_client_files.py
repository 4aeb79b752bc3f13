"""The Python client (``import kachery.node as kn``) and ``kachery-node load`` against real
daemons in subprocesses, including a downloader killed with SIGKILL halfway through."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kachery.node as kn
from kachery.node.home import HOME_ENV, NodeHome
from kachery.node.testing import EXE, Daemon
from kachery.protocol import parse_file_uri

PIECE = 20_000_000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    provider, member = Daemon(tmp_path / "provider"), Daemon(tmp_path / "member")
    try:
        provider.start("--max-upload-rate", "60M")
        member.start()
        provider.cli("channel", "create", "lab")
        member.cli("join", provider.cli("channel", "invite", "lab", "--roles", "all").strip())
        member.cli("peers", "--wait-for", provider.node_id)
        yield provider, member
    finally:
        for d in (provider, member):
            d.kill()


def test_the_python_client_stores_and_loads_across_the_channel(
    pair: tuple[Daemon, Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, member = pair
    monkeypatch.setenv(HOME_ENV, str(provider.home))
    data = os.urandom(30_000_000)
    src = tmp_path / "rec.dat"
    src.write_bytes(data)
    uri = kn.store_file(src)
    assert "/rec.dat?manifest=" in uri
    json_uri = kn.store_json({"spikes": [1, 2, 3], "rate": 30000.0})
    text_uri = kn.store_text("session notes")
    assert kn.load_json(json_uri) == {"spikes": [1, 2, 3], "rate": 30000.0}
    kn.set("latest", uri)
    assert kn.get("latest") == uri

    monkeypatch.setenv(HOME_ENV, str(member.home))
    assert kn.get("latest") is None  # mutables never leave their node
    assert kn.load_bytes(uri, 25_000_000, 25_000_100) == data[25_000_000:25_000_100]
    downloads = json.loads(member.cli("find", uri, "--json").splitlines()[0])
    assert downloads["nodeId"] == provider.node_id
    path = kn.load_file(uri)
    assert path is not None
    assert Path(path).read_bytes() == data
    assert kn.load_text(text_uri) == "session notes"
    assert kn.load_json(json_uri) == {"spikes": [1, 2, 3], "rate": 30000.0}
    assert kn.load_file("sha1://" + "0" * 40) is None


def test_a_downloader_killed_halfway_resumes_and_refetches_at_most_one_piece(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    provider, member = pair
    src = tmp_path / "big.dat"
    src.write_bytes(os.urandom(200_000_000))
    uri = provider.cli("store", str(src)).strip()
    env = member.env()
    load = subprocess.Popen(
        [EXE, "load", uri, "--json"], stdout=subprocess.PIPE, text=True, env=env
    )
    assert load.stdout is not None
    for line in load.stdout:  # progress lines, as they come
        event = json.loads(line)
        if event.get("event") == "progress" and event["done"] >= 100_000_000:
            assert member.proc is not None
            member.proc.send_signal(signal.SIGKILL)
            break
    load.wait(timeout=60)
    load.stdout.close()
    member.kill()
    member.start()
    downloads = json.loads(member.cli("downloads", "--json"))
    verified = downloads[0]["verifiedPieces"]
    # Progress counts pieces verified in memory (5 here); their durable record (fdatasync, then
    # a commit, coalesced) may lag by the batch in progress when the daemon is killed.
    assert verified >= 3
    member.cli("peers", "--wait-for", provider.node_id)
    stats_before = provider.json("status")["files"]["bytesUploaded"]
    out = json.loads(member.cli("load", uri, "--json").splitlines()[-1])
    assert Path(out["path"]).stat().st_size == 200_000_000
    resent = provider.json("status")["files"]["bytesUploaded"] - stats_before
    assert resent <= 200_000_000 - verified * PIECE + PIECE


def test_a_file_that_is_not_what_load_json_expects_raises_a_kachery_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    NodeHome.init(tmp_path / "home")
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    not_json = kn.store_text("session notes, not JSON")
    with pytest.raises(kn.KacheryError, match="is not JSON: Expecting value"):
        kn.load_json(not_json)
    not_text = kn.store_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(kn.KacheryError, match="is not UTF-8 text"):
        kn.load_text(not_text)


def test_downloads_lists_a_file_read_in_part_and_discards_it(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    provider, member = pair
    src = tmp_path / "recording.dat"
    src.write_bytes(b"0123456789" * 4_500_000)  # 45 MB: three pieces
    uri = provider.cli("store", str(src)).strip()
    assert member.cli("cat", uri, "--start", "5", "--end", "12") == "5678901"
    listed = member.cli("downloads")
    assert "42.9 MiB  1/3 pieces verified (19.1 MiB)  unfinished" in listed
    sha1 = parse_file_uri(uri).sha1
    assert member.cli("downloads", "--discard", sha1).startswith(f"discarded sha1://{sha1} (")
    assert member.cli("downloads") == "no unfinished loads\n"
    failed = member.cli("downloads", "--discard", uri, check=False)
    assert "no unfinished download of" in failed
