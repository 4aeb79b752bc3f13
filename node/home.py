"""The node home: where a node keeps its identity, database and blob store.

``$KACHERY_NODE_HOME`` (default ``~/.kachery-node``) holds::

    node-key          the node's Ed25519 seed, hex, mode 0600; never sent anywhere
    keys/channel-<id> owner keys of channels this node created (mode 0600)
    kachery-node-id   the node ID (kachery-daemon kept this file too)
    kachery.db        SQLite database (WAL): file index, mutables, and later channels, feeds, tasks
    store/sha1/...    the blob store, in kachery's layout
    store/tmp/        temporary files of stores in progress

Non-goal: anything networked; the daemon builds on this.
"""

from __future__ import annotations

import logging
import os
import stat
from functools import cached_property
from pathlib import Path

from kachery.protocol.identity import SEED_BYTES, KeyPair
from kachery.storage.blobstore import BlobStore
from kachery.storage.channels import Channels
from kachery.storage.db import Database, sqlite_url
from kachery.storage.downloads import Downloads
from kachery.storage.files import LocalFiles
from kachery.storage.mutables import Mutables

from .errors import NodeError, NotInitialized

log = logging.getLogger(__name__)

HOME_ENV = "KACHERY_NODE_HOME"
DATABASE_URL_ENV = "KACHERY_NODE_DATABASE_URL"
KEY_FILE = "node-key"
KEYS_DIR = "keys"
NODE_ID_FILE = "kachery-node-id"


def default_home() -> Path:
    """``$KACHERY_NODE_HOME``, else ``~/.kachery-node``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".kachery-node"


class NodeHome:
    """An initialized node home. Open one with ``NodeHome.open`` or create it with ``init``."""

    def __init__(self, path: Path, keypair: KeyPair) -> None:
        self.path = path
        self.keypair = keypair
        self.node_id = keypair.id

    @classmethod
    def init(cls, path: Path | None = None) -> tuple[NodeHome, bool]:
        """Create the home and node key if they do not exist.

        Returns:
            The home, and True if a new key was created (False if it existed already).
        """
        path = (path or default_home()).expanduser().absolute()
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeError(f"cannot create the node home {path}: {exc.strerror}") from None
        key_path = path / KEY_FILE
        created = False
        if not key_path.exists():
            _write_key(key_path, os.urandom(SEED_BYTES))
            created = True
        home = cls.open(path)
        (path / NODE_ID_FILE).write_text(home.node_id + "\n")
        home.files.blobs.clean_temp()
        return home, created

    @classmethod
    def open(cls, path: Path | None = None) -> NodeHome:
        """Open an existing home.

        Raises:
            NotInitialized: there is no node key there yet.
        """
        path = (path or default_home()).expanduser().absolute()
        key_path = path / KEY_FILE
        if not key_path.exists():
            raise NotInitialized(f"no kachery node at {path}: run 'kachery-node init' first")
        return cls(path, KeyPair(_read_key(key_path)))

    @cached_property
    def database(self) -> Database:
        url = os.environ.get(DATABASE_URL_ENV) or sqlite_url(self.path / "kachery.db")
        return Database(url)

    @cached_property
    def files(self) -> LocalFiles:
        return LocalFiles(self.database, BlobStore(self.path / "store"))

    @cached_property
    def mutables(self) -> Mutables:
        return Mutables(self.database)

    @cached_property
    def downloads(self) -> Downloads:
        return Downloads(self.database, self.path / "store")

    @cached_property
    def channels(self) -> Channels:
        return Channels(self.database)

    def save_channel_key(self, key: KeyPair) -> None:
        """Keep the private key of a channel this node owns (mode 0600, never sent anywhere)."""
        keys = self.path / KEYS_DIR
        keys.mkdir(mode=0o700, exist_ok=True)
        _write_key(keys / f"channel-{key.id}", key.seed)

    def channel_key(self, channel_id: str) -> KeyPair | None:
        """The owner key of a channel, if this node owns it."""
        path = self.path / KEYS_DIR / f"channel-{channel_id}"
        return KeyPair(_read_key(path)) if path.exists() else None

    def close(self) -> None:
        if "database" in self.__dict__:
            self.database.close()


def _write_key(path: Path, seed: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (seed.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    text = path.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        seed = b""
    if len(seed) != SEED_BYTES:
        raise NodeError(f"{path} does not hold a {SEED_BYTES}-byte key in hex")
    return seed
