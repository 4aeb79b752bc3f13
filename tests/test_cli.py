"""The command line, run as a user runs it: the real console script in a subprocess."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kachery.node.cli.main import build_parser
from kachery.node.cli.tasks import TASK_TYPES
from kachery.node.progress import format_duration
from kachery.protocol.tasks import TaskType

from .conftest import pattern_bytes

EXE = str(Path(sys.executable).with_name("kachery-node"))


def kn(
    home: Path, *args: str, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "KACHERY_NODE_HOME": str(home)}
    proc = subprocess.run([EXE, *args], input=stdin, capture_output=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"kachery-node {args} failed: {proc.stderr.decode()}")
    return proc


@pytest.fixture
def khome(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    kn(home, "init")
    return home


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.startswith("kachery-node: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_init_creates_a_private_key_and_is_idempotent(tmp_path: Path) -> None:
    home = tmp_path / "h"
    first = kn(home, "init")
    node_id = first.stdout.decode().strip()
    assert len(node_id) == 64
    assert stat.S_IMODE((home / "node-key").stat().st_mode) == 0o600
    assert (home / "kachery-node-id").read_text().strip() == node_id
    again = kn(home, "init")
    assert again.stdout.decode().strip() == node_id
    assert "already existed" in again.stderr.decode()
    info = json.loads(kn(home, "info", "--json").stdout)
    assert info["nodeId"] == node_id
    assert info["files"] == 0


def test_store_prints_the_uri_alone_and_load_and_cat_give_the_bytes_back(
    khome: Path, tmp_path: Path
) -> None:
    src = tmp_path / "notes.txt"
    data = b"spike times\n" * 1000
    src.write_bytes(data)
    uri = kn(khome, "store", str(src)).stdout.decode()
    assert uri == f"sha1://{hashlib.sha1(data).hexdigest()}/notes.txt\n"
    uri = uri.strip()
    assert kn(khome, "cat", uri).stdout == data
    assert kn(khome, "cat", uri, "--start", "12", "--end", "23").stdout == data[12:23]
    out = tmp_path / "out.txt"
    assert kn(khome, "load", uri, "-o", str(out)).stdout.decode().strip() == str(out)
    assert out.read_bytes() == data
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    kn(khome, "load", uri, "-o", str(outdir))
    assert (outdir / "notes.txt").read_bytes() == data
    local = Path(kn(khome, "load", uri).stdout.decode().strip())
    assert local.read_bytes() == data
    listing = [json.loads(line) for line in kn(khome, "ls", "--json").stdout.splitlines()]
    assert [item["size"] for item in listing] == [len(data)]


def test_store_reads_stdin_and_prints_json_lines(khome: Path) -> None:
    proc = kn(khome, "store", "--json", "-", stdin=b"from stdin")
    record = json.loads(proc.stdout)
    assert record["uri"] == f"sha1://{hashlib.sha1(b'from stdin').hexdigest()}"
    assert record["size"] == 10


def test_store_link_refuses_stdin_rather_than_copying_it(khome: Path) -> None:
    proc = kn(khome, "store", "--link", "-", stdin=b"not a file", check=False)
    assert proc.returncode == 2
    assert "kachery-node store: error: --link indexes a file where it lies" in proc.stderr.decode()
    assert json.loads(kn(khome, "info", "--json").stdout)["files"] == 0


def test_chunk_uris_read_only_their_range(khome: Path, tmp_path: Path) -> None:
    data = pattern_bytes(20_000_001)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = kn(khome, "store", str(src)).stdout.decode().strip()
    file_sha1 = hashlib.sha1(data).hexdigest()
    tail_sha1 = hashlib.sha1(data[20_000_000:]).hexdigest()
    chunk = f"sha1://{tail_sha1}?chunkOf={file_sha1}~20000000~20000001"
    assert kn(khome, "cat", chunk).stdout == data[20_000_000:]
    out = tmp_path / "chunk.bin"
    kn(khome, "load", chunk, "-o", str(out))
    assert out.read_bytes() == data[20_000_000:]
    kn(khome, "load", uri, "-o", str(out))  # several blocks: the copy that bypasses the cache
    assert out.read_bytes() == data
    assert kn(khome, "cat", uri, "--start", "19999999", "--end", "20000001").stdout == data[-2:]


def test_a_failed_load_leaves_the_output_file_untouched(khome: Path, tmp_path: Path) -> None:
    data = b"recorded samples " * 100
    kn(khome, "store", "-", stdin=data)
    wrong = f"sha1://{'0123456789abcdef' * 2}01234567?chunkOf={hashlib.sha1(data).hexdigest()}~0~10"
    keep = tmp_path / "keep.txt"
    keep.write_bytes(b"existing\n")
    assert_one_line_error(kn(khome, "load", wrong, "-o", str(keep), check=False), "hash to")
    assert keep.read_bytes() == b"existing\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "keep.txt"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("store", "/nonexistent/file"), ["no such file"]),
        (("cat", "sha1://nothex"), ["invalid URI", "expected sha1://<40 hex digits>"]),
        (("load", "sha1://" + "0" * 40), ["is not stored on this node"]),
        (("cat", "sha1://" + "0" * 40, "--start", "5"), ["is not stored on this node"]),
        (("mutable", "delete", "nokey"), ["has no value"]),
    ],
)
def test_user_errors_are_one_line_with_exit_code_1(
    khome: Path, args: tuple[str, ...], fragments: list[str]
) -> None:
    assert_one_line_error(kn(khome, *args, check=False), *fragments)


def test_a_directory_is_refused(khome: Path, tmp_path: Path) -> None:
    assert_one_line_error(kn(khome, "store", str(tmp_path), check=False), "is a directory")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--end", "9"), "--end 9 is past the end of the file (size 5 bytes)"),
        (("--start", "9999999"), "--start 9999999 is past the end of the file (size 5 bytes)"),
        (("--start", "4", "--end", "2"), "--start 4 is after --end 2"),
        (("--start", "-1"), "--start -1 is negative"),
    ],
)
def test_a_range_outside_the_file_is_refused_saying_why(
    khome: Path, flags: tuple[str, ...], message: str
) -> None:
    uri = kn(khome, "store", "-", stdin=b"12345").stdout.decode().strip()
    assert_one_line_error(kn(khome, "cat", uri, *flags, check=False), message)
    assert kn(khome, "cat", uri, "--start", "5").stdout == b""  # the empty range at the end


def test_home_is_accepted_after_the_command_too(khome: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "not-this-one"  # what KACHERY_NODE_HOME says: --home overrides it
    info = json.loads(kn(elsewhere, "info", "--json", "--home", str(khome)).stdout)
    assert info["home"] == str(khome)
    kn(elsewhere, "mutable", "set", "where", "after", "--home", str(khome))
    assert kn(khome, "mutable", "get", "where").stdout == b'"after"\n'
    before_and_after = kn(elsewhere, "--home", str(elsewhere), "info", "--home", str(khome))
    assert f"home:     {khome}" in before_and_after.stdout.decode()  # the later one wins
    assert_one_line_error(kn(khome, "info", "--home", str(elsewhere), check=False), "init")


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for sub in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(sub)


def test_every_command_documents_home_in_its_help() -> None:
    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) > 30  # the walk reached the actions of channel, feed, task, mutable
    for leaf in leaves:
        assert "--home DIR" in leaf.format_help(), leaf.prog


def test_commands_before_init_say_to_run_init(tmp_path: Path) -> None:
    assert_one_line_error(kn(tmp_path / "none", "info", check=False), "kachery-node init")


def test_usage_mistakes_exit_2_with_help(khome: Path) -> None:
    proc = kn(khome, "store", check=False)
    assert proc.returncode == 2
    assert b"usage:" in proc.stderr


@pytest.mark.parametrize("address", ["notaurl", "ws://lab1", "http://lab1:20432", "ws://:20432"])
def test_start_refuses_an_announce_address_peers_cannot_dial(tmp_path: Path, address: str) -> None:
    # No node home: a usage error comes first, and a regression fails at once (no daemon runs).
    proc = kn(tmp_path, "start", "--listen", "127.0.0.1:0", "--announce", address, check=False)
    assert proc.returncode == 2
    assert f"argument --announce: {address!r} is not an address peers can dial" in (
        proc.stderr.decode()
    )


def test_feed_read_signed_without_json_is_a_usage_error(khome: Path) -> None:
    proc = kn(khome, "feed", "read", f"feed://{'a' * 64}/entries", "--signed", check=False)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("usage: kachery-node feed read")
    assert "kachery-node feed read: error: --signed needs --json" in err


def test_mutables_from_the_command_line(khome: Path) -> None:
    kn(khome, "mutable", "set", "alias", "sha1://" + "1" * 40)
    kn(khome, "mutable", "set", '{"run": 3}', '{"ok": true}')
    assert json.loads(kn(khome, "mutable", "get", "alias").stdout) == "sha1://" + "1" * 40
    assert json.loads(kn(khome, "mutable", "get", '{"run":3}').stdout) == {"ok": True}
    proc = kn(khome, "mutable", "set", "alias", "x", "--no-update", check=False)
    assert_one_line_error(proc, "already has a value", "leave out --no-update")
    assert json.loads(kn(khome, "mutable", "get", "missing").stdout) is None


def test_verify_reports_corruption_with_a_nonzero_exit_also_when_removing_it(khome: Path) -> None:
    uri = kn(khome, "store", "-", stdin=b"precious").stdout.decode().strip()
    assert kn(khome, "verify").stdout == b"1 file checked, 0 corrupt\n"
    path = Path(kn(khome, "load", uri).stdout.decode().strip())
    path.write_bytes(b"precioux")
    proc = kn(khome, "verify", check=False)
    assert proc.returncode == 1
    assert b"CORRUPT" in proc.stdout
    removed = kn(khome, "verify", "--remove", check=False)
    assert removed.returncode == 1  # corruption was found, even though it is now removed
    assert b"(removed)" in removed.stdout
    assert kn(khome, "verify").stdout == b"0 files checked, 0 corrupt\n"


@pytest.mark.slow
def test_kill_9_while_storing_1_gib_leaves_no_partial_blob_and_no_row(
    khome: Path, tmp_path: Path
) -> None:
    src = tmp_path / "one-gib.bin"
    block = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for _ in range(1024):
            f.write(block)
    env = {**os.environ, "KACHERY_NODE_HOME": str(khome)}
    proc = subprocess.Popen([EXE, "store", str(src)], env=env, stdout=subprocess.DEVNULL)
    tmp_dir = khome / "store" / "tmp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the store is well under way
        parts = list(tmp_dir.glob("*.part"))
        if parts and parts[0].stat().st_size > 300 << 20:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the store never got going")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(kn(khome, "info", "--json").stdout)["files"] == 0
    assert not list((khome / "store" / "sha1").rglob("*"))
    # The next store cleans the leftover and succeeds.
    uri = kn(khome, "store", str(src)).stdout.decode().strip()
    kn(khome, "init")  # start-up cleaning of leftovers
    assert list(tmp_dir.iterdir()) == []
    assert uri.startswith("sha1://")
    assert json.loads(kn(khome, "info", "--json").stdout)["files"] == 2  # file + manifest


def test_load_without_a_daemon_finds_stored_blobs_and_linked_files(
    khome: Path, tmp_path: Path
) -> None:
    """A stored blob is found by its path alone; a linked file through the index (no daemon
    runs here to ask); an unknown file says no daemon runs to fetch it."""
    stored, linked = tmp_path / "stored.bin", tmp_path / "linked.bin"
    stored.write_bytes(b"stored " * 100)
    linked.write_bytes(b"linked " * 100)
    uri = kn(khome, "store", str(stored)).stdout.decode().strip()
    assert Path(kn(khome, "load", uri).stdout.decode().strip()).read_bytes() == b"stored " * 100
    uri = kn(khome, "store", "--link", str(linked)).stdout.decode().strip()
    assert kn(khome, "load", uri).stdout.decode().strip() == str(linked)
    missing = f"sha1://{hashlib.sha1(b'nowhere').hexdigest()}/x"
    assert_one_line_error(kn(khome, "load", missing, check=False), "no daemon is running")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59.9, "59s"), (125, "2m05s"), (3720, "1h02m"), (90000, "1d01h")],
)
def test_durations_carry_their_units(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_the_command_line_starts_without_loading_sqlalchemy_or_trio() -> None:
    """Every command pays for what the command line imports: the database layer (SQLAlchemy,
    ~150 ms), the runtime, the task protocol (~27 ms) and the store's copier load only where a
    command uses them."""
    heavy = {"sqlalchemy", "trio", "kachery.protocol.tasks", "kachery.storage.blobstore"}
    code = f"import sys, kachery.node.cli.main; print(sorted({heavy!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "[]"


def test_the_task_types_the_command_line_offers_are_the_protocols() -> None:
    assert list(TASK_TYPES) == [str(t) for t in TaskType]
