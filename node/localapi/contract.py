"""What the daemon and its local clients agree on: the loopback address, the token header, and
the two files a running daemon leaves in its node home.

``daemon.json`` holds its pid, API port, node ID and listen address (written atomically, mode
0600, while it runs); ``client-auth`` a random token (mode 0600) that every API call sends as the
``KACHERY-CLIENT-AUTH-CODE`` header, so only users who can read the node home can drive its
daemon. The server (server.py) and the client (node/client/) both import this module, and
neither imports the other.

Non-goal: the HTTP exchange itself (server.py serves it, node/client/ calls it).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kachery.node.errors import DaemonNotRunning, NodeError

log = logging.getLogger(__name__)

DAEMON_INFO_FILE = "daemon.json"
CLIENT_AUTH_FILE = "client-auth"
AUTH_HEADER = "KACHERY-CLIENT-AUTH-CODE"
"""The request header carrying the token (kachery-daemon's name for it)."""

API_HOST = "127.0.0.1"
"""The API listens on loopback only."""

TOKEN_BYTES = 32
"""Random bytes in the client-auth token (written as hex)."""

KEEP_ALIVE_SECONDS = 5.0
"""How long the daemon keeps an idle API connection open for the client's next call."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DaemonInfo:
    """What a running daemon publishes in ``<home>/daemon.json``.

    Attributes:
        pid: the daemon's process ID.
        api_port: the local API's port on 127.0.0.1.
        node_id: the node's ID (hex public key).
        listen: the peer listen address, ``host:port``.
    """

    pid: int
    api_port: int
    node_id: str
    listen: str

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "apiPort": self.api_port,
            "nodeId": self.node_id,
            "listen": self.listen,
        }

    @classmethod
    def from_json(cls, value: object) -> DaemonInfo:
        """Parse the JSON object; raises ``TypeError`` naming what is wrong."""
        if not isinstance(value, Mapping):
            raise TypeError("expected a JSON object")
        fields = {"pid": int, "apiPort": int, "nodeId": str, "listen": str}
        for key, kind in fields.items():
            if not isinstance(value.get(key), kind) or isinstance(value.get(key), bool):
                raise TypeError(f"{key!r} must be a {kind.__name__}")
        return cls(
            pid=value["pid"],
            api_port=value["apiPort"],
            node_id=value["nodeId"],
            listen=value["listen"],
        )


def write_daemon_info(home_path: Path, info: DaemonInfo | Mapping[str, Any]) -> None:
    """Publish ``info`` as ``<home>/daemon.json`` (mode 0600), atomically: readers never see a
    partial file.

    Args:
        home_path: the node home.
        info: a ``DaemonInfo``, or its JSON form ``{"pid", "apiPort", "nodeId", "listen"}``.

    Raises:
        NodeError: the file cannot be written.
        TypeError: ``info`` lacks a field or has one of the wrong type (a bug in the caller).
    """
    if not isinstance(info, DaemonInfo):
        info = DaemonInfo.from_json(info)
    path = home_path / DAEMON_INFO_FILE
    tmp = home_path / f".{DAEMON_INFO_FILE}.{os.getpid()}.tmp"
    try:
        _write_private(tmp, json.dumps(info.to_json()) + "\n", exclusive=False)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NodeError(f"cannot write {path}: {exc.strerror}") from None


def read_daemon_info(home_path: Path) -> DaemonInfo | None:
    """The running daemon's ``daemon.json``, or None if there is none.

    Raises:
        NodeError: the file exists but cannot be read or does not parse.
    """
    path = home_path / DAEMON_INFO_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NodeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return DaemonInfo.from_json(json.loads(text))
    except (TypeError, ValueError) as exc:
        raise NodeError(
            f"{path} is not a daemon description ({exc}); remove it if no daemon is running"
        ) from None


def remove_daemon_info(home_path: Path, *, pid: int | None = None) -> None:
    """Remove ``<home>/daemon.json`` if it names ``pid`` (default: the calling process), so a
    daemon stopping late never removes the file of one started after it."""
    pid = os.getpid() if pid is None else pid
    try:
        info = read_daemon_info(home_path)
    except NodeError:
        info = None
    if info is not None and info.pid == pid:
        (home_path / DAEMON_INFO_FILE).unlink(missing_ok=True)


def ensure_client_auth(home_path: Path) -> str:
    """The client-auth token of this node home; creates ``<home>/client-auth`` (mode 0600) with a
    fresh random token if it does not exist yet.

    Raises:
        NodeError: the file cannot be created or read.
    """
    path = home_path / CLIENT_AUTH_FILE
    try:
        _write_private(path, os.urandom(TOKEN_BYTES).hex() + "\n", exclusive=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise NodeError(f"cannot create {path}: {exc.strerror}") from None
    return read_client_auth(home_path)


def read_client_auth(home_path: Path) -> str:
    """The token in ``<home>/client-auth``.

    Raises:
        DaemonNotRunning: there is no token: no daemon has ever run for this home.
        NodeError: the file cannot be read or is empty.
    """
    path = home_path / CLIENT_AUTH_FILE
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise DaemonNotRunning(not_running(home_path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeError(f"cannot read {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    if not token:
        raise NodeError(f"{path} is empty: remove it and restart the daemon")
    return token


def _write_private(path: Path, text: str, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def not_running(home_path: Path) -> str:
    """What to say when no daemon runs for ``home_path``."""
    return f"no kachery-node daemon is running for {home_path}: start one with 'kachery-node start'"
