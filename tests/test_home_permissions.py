"""Everything a node creates in its home is its user's alone, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kachery.node.home import NodeHome


def _loose(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if stat.S_IMODE(path.lstat().st_mode) & 0o077:
                found.append(f"{path.relative_to(root)} {oct(stat.S_IMODE(path.lstat().st_mode))}")
    if stat.S_IMODE(root.stat().st_mode) & 0o077:
        found.append(". (the home)")
    return found


def test_a_home_made_under_a_permissive_umask_is_private(tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("probe B")
    old = os.umask(0)
    try:
        home, _ = NodeHome.init(tmp_path / "deep" / "home")
        home.files.store_path(source)
        home.downloads.begin("a" * 40, None, 10, 1)
        from kachery.protocol.identity import KeyPair

        home.save_key("feed", KeyPair(os.urandom(32)))
        home.close()
    finally:
        os.umask(old)
    assert _loose(tmp_path / "deep" / "home") == []
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == 0o700


def test_an_existing_loose_home_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "home"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    home, _ = NodeHome.init(path)
    db = path / "kachery.db"
    home.files  # noqa: B018 (opens the database)
    home.close()
    os.chmod(db, 0o644)
    os.chmod(path, 0o755)
    again = NodeHome.open(path)
    again.files  # noqa: B018
    again.close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    again, _ = NodeHome.init(path)
    again.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
