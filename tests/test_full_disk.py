"""A real full disk: a node home on a small tmpfs mounted for the test, filled to the last byte.

Every command that needs space fails with one line that says the disk is full, the daemon stays
up, nothing half-written is kept, and once space is freed the same commands work and everything
stored before is intact. Needs root (to mount); skipped, saying why, where it cannot mount.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kachery.node.testing import CommandFailed, Daemon

DISK_BYTES = 48 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem of DISK_BYTES (tmpfs), mounted for the test and unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root and mount(8)")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk refuses another byte; returns it."""
    filler = disk / "filler"
    block = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(block[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def refusal(node: Daemon, *args: str) -> str:
    """Run a command that must fail; its one-line message."""
    with pytest.raises(CommandFailed) as info:
        node.cli(*args)
    message = str(info.value).split("failed: ", 1)[1]
    assert "\n" not in message, message
    assert "internal error" not in message
    assert "Traceback" not in message
    return message


def test_a_full_disk_gets_one_line_errors_and_loses_nothing(
    small_disk: Path, tmp_path: Path
) -> None:
    node = Daemon(small_disk / "home")
    node.start()
    try:
        before = tmp_path / "before.bin"
        before.write_bytes(os.urandom(1_000_000))
        uri_before = node.cli("store", str(before)).strip()
        feed_id = node.cli("feed", "create", "notebook").strip()
        node.cli("feed", "append", f"feed://{feed_id}/entries", '{"n": 0}')

        filler = fill(small_disk)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(3_000_000))
        for args in [
            ("store", str(big)),
            ("feed", "create", "second"),
            ("feed", "append", f"feed://{feed_id}/entries", '{"n": 1}'),
            ("mutable", "set", "key", "value"),
        ]:
            message = refusal(node, *args)
            assert "full" in message or "space" in message, (args, message)
        status = json.loads(node.cli("status", "--json"))  # the daemon is still up
        assert status["nodeId"] == node.node_id

        filler.unlink()
        assert node.cli("load", uri_before, "-o", str(tmp_path / "out.bin"))
        assert (tmp_path / "out.bin").read_bytes() == before.read_bytes()
        uri_big = node.cli("store", str(big)).strip()
        assert hashlib.sha1(big.read_bytes()).hexdigest() in uri_big
        second = node.cli("feed", "create", "second").strip()
        assert second != feed_id
        node.cli("feed", "append", f"feed://{feed_id}/entries", '{"n": 1}')
        read = node.cli("feed", "read", f"feed://{feed_id}/entries", "--json")
        records = [json.loads(line) for line in read.splitlines()]
        assert [r["message"] for r in records] == [{"n": 0}, {"n": 1}]
        node.cli("verify")  # exits non-zero if any stored file fails its hash
        # no half-written key or blob was left behind by the refusals
        leftovers = [p.name for p in small_disk.rglob("*") if ".partial" in p.name]
        assert leftovers == []
    finally:
        node.kill()
