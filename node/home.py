"""The node home: where a node keeps its identity, database and blob store.

``$KACHERY_NODE_HOME`` (default ``~/.kachery-node``) holds::

    node-key          the node's Ed25519 seed, hex, mode 0600; never sent anywhere
    keys/<kind>-<id>  private keys of channels this node owns and feeds it writes (mode 0600)
    kachery-node-id   the node ID (kachery-daemon kept this file too)
    kachery.db        SQLite database (WAL): file index, mutables, and later channels, feeds, tasks
    store/sha1/...    the blob store, in kachery's layout
    store/tmp/        temporary files of stores in progress

Non-goal: anything networked; the daemon builds on this.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from kachery.node.errors import NodeError, NotInitialized
from kachery.protocol.identity import SEED_BYTES, KeyPair
from kachery.protocol.uri import FileURI

if TYPE_CHECKING:  # imported where first used: the command line starts without SQLAlchemy
    from kachery.storage.blobstore import BlobStore
    from kachery.storage.channels import Channels
    from kachery.storage.db import Database
    from kachery.storage.downloads import Downloads
    from kachery.storage.files import LocalFiles
    from kachery.storage.mutables import Mutables

log = logging.getLogger(__name__)

HOME_ENV = "KACHERY_NODE_HOME"
DATABASE_URL_ENV = "KACHERY_NODE_DATABASE_URL"
KEY_FILE = "node-key"
KEYS_DIR = "keys"
KEY_KINDS = ("channel", "feed")
NODE_ID_FILE = "kachery-node-id"


def default_home() -> Path:
    """``$KACHERY_NODE_HOME``, else ``~/.kachery-node``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".kachery-node"


_SHARED: dict[tuple[Path, int, int, str | None], NodeHome] = {}
"""Homes opened by ``NodeHome.shared`` in this process."""


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
            from kachery.storage.blobstore import make_private_dirs

            make_private_dirs(path)
        except OSError as exc:
            raise NodeError(f"cannot create the node home {path}: {exc.strerror}") from None
        key_path = path / KEY_FILE
        created = False
        if not key_path.exists():
            _write_key(key_path, os.urandom(SEED_BYTES))
            created = True
        home = cls.open(path)
        _write_private(path / NODE_ID_FILE, home.node_id + "\n")
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

    @classmethod
    def shared(cls, path: Path | None = None) -> NodeHome:
        """``open``, reusing the home this process opened before (and its database engine, which
        costs a millisecond or more to create), as long as its key file is the same file.

        For the client library, whose every call would otherwise open the home afresh.

        Raises:
            NotInitialized: there is no node key there yet.
        """
        path = (path or default_home()).expanduser().absolute()
        try:
            key_stat = (path / KEY_FILE).stat()
        except OSError:
            return cls.open(path)  # says what is missing
        ident = (path, key_stat.st_ino, key_stat.st_mtime_ns, os.environ.get(DATABASE_URL_ENV))
        home = _SHARED.get(ident)
        if home is None:
            home = _SHARED[ident] = cls.open(path)
        return home

    @cached_property
    def database(self) -> Database:
        from kachery.storage.db import Database, sqlite_url

        url = os.environ.get(DATABASE_URL_ENV)
        if url is None:
            # SQLite gives the -wal and -shm files the database file's mode: create it 0600
            # (it holds invite secrets), and tighten one a former version left 0644.
            db_path = self.path / "kachery.db"
            os.close(os.open(db_path, os.O_WRONLY | os.O_CREAT, 0o600))
            os.chmod(db_path, 0o600)
            url = sqlite_url(db_path)
        return Database(url)

    @cached_property
    def blobs(self) -> BlobStore:
        """The blob store alone (no database: reading a stored blob needs only its path)."""
        from kachery.storage.blobstore import BlobStore

        return BlobStore(self.path / "store")

    def stored_blob(self, uri: FileURI) -> tuple[Path, int, int] | None:
        """Where a whole file's blob is, as ``LocalFiles.locate`` answers, found by its path
        alone (no database, so no SQLAlchemy to load); None if it is not a blob here.

        Only verified bytes are ever renamed into the blob store, so a blob there is the file.
        """
        if uri.chunk_of is not None:
            return None
        path = self.blobs.blob_path(uri.sha1)
        try:
            return path, 0, path.stat().st_size
        except OSError:
            return None

    @cached_property
    def files(self) -> LocalFiles:
        from kachery.storage.files import LocalFiles

        return LocalFiles(self.database, self.blobs)

    @cached_property
    def mutables(self) -> Mutables:
        from kachery.storage.mutables import Mutables

        return Mutables(self.database)

    @cached_property
    def downloads(self) -> Downloads:
        from kachery.storage.downloads import Downloads

        return Downloads(self.database, self.path / "store")

    @cached_property
    def channels(self) -> Channels:
        from kachery.storage.channels import Channels

        return Channels(self.database)

    def _key_path(self, kind: str, key_id: str) -> Path:
        if kind not in KEY_KINDS:
            raise ValueError(f"unknown kind of key {kind!r}")
        return self.path / KEYS_DIR / f"{kind}-{key_id}"

    def save_key(self, kind: str, key: KeyPair) -> None:
        """Keep a private key this node holds (``kind`` is ``channel`` or ``feed``).

        Written to ``keys/<kind>-<id>`` with mode 0600; never sent anywhere. Keeping a key that is
        already kept changes nothing.
        """
        path = self._key_path(kind, key.id)
        from kachery.storage.blobstore import make_private_dirs

        make_private_dirs(path.parent)
        if not path.exists():
            _write_key(path, key.seed)

    def key(self, kind: str, key_id: str) -> KeyPair | None:
        """A private key this node holds (a channel it owns, a feed it writes), else None."""
        path = self._key_path(kind, key_id)
        return KeyPair(_read_key(path)) if path.exists() else None

    def forget_key(self, kind: str, key_id: str) -> None:
        """Delete a private key: whatever it signed can no longer be extended from this node."""
        self._key_path(kind, key_id).unlink(missing_ok=True)

    def close(self) -> None:
        if "database" in self.__dict__:
            self.database.close()


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (replacing it) with mode 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _write_key(path: Path, seed: bytes) -> None:
    """Write a key file whole or not at all: a half-written key (a full disk) would stand in for
    the key for ever. A key already kept under that name stays as it is.

    Raises:
        StoreFull: no space left for it.
        NodeError: it cannot be written for another reason.
    """
    from kachery.storage import StoreFull
    from kachery.storage.errors import is_no_space

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            data = (seed.hex() + "\n").encode("ascii")
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(partial, path)
    except FileExistsError:
        pass
    except OSError as exc:
        if is_no_space(exc):
            raise StoreFull(
                f"no space left on the device to keep a key in {path.parent}: free space, retry"
            ) from None
        raise NodeError(f"cannot keep a key in {path}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)


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
