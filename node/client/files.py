"""The Python client for files: ``import kachery.node as kn; kn.store_file(...)``.

It mirrors kachery-client: ``store_file``, ``load_file``, ``load_bytes``, ``store_json`` /
``load_json``, ``store_text`` / ``load_text``, ``store_npy`` / ``load_npy``. The node home is
found through ``$KACHERY_NODE_HOME``. Storing and reading what is already stored work directly on
the node's store, with no daemon; a file that is not stored here is fetched by the running daemon
from the node's channels. As in kachery-client, ``load_*`` returns None when the file cannot be
found; every other problem raises a ``KacheryError`` that says what went wrong.

Non-goal: feeds and tasks (their own modules).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path
from typing import Any

from kachery.node.client import DaemonClient
from kachery.node.errors import DaemonNotRunning
from kachery.node.home import NodeHome
from kachery.protocol.errors import InvalidInput
from kachery.protocol.kachery_json import JSONValue, check_json_value
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound


def _home() -> NodeHome:
    return NodeHome.shared()


def store_file(path: str | Path, basename: str | None = None) -> str:
    """Store a file in this node; returns its URI (labelled with ``basename`` or the file name)."""
    path = Path(path)
    entry = _home().files.store_path(path)
    return str(entry.uri(Path(basename or path.name).name))


def store_bytes(data: bytes, basename: str | None = None) -> str:
    """Store bytes; returns their URI."""
    return str(_home().files.store_bytes(data).uri(basename or ""))


def store_text(text: str, basename: str | None = None) -> str:
    return store_bytes(text.encode("utf-8"), basename)


def store_json(value: JSONValue, basename: str | None = None) -> str:
    """Store a JSON value (compact, keys sorted, so equal values get equal URIs)."""
    check_json_value(value)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return store_text(text, basename)


def _fetch_whole(home: NodeHome, uri: FileURI) -> tuple[Path, int, int] | None:
    """Fetch a file through the daemon; where its bytes are, or None if nobody has it."""
    try:
        with DaemonClient(home.path).stream("file_load", uri=str(uri)) as stream:
            for _ in stream:
                pass
            result = stream.result
    except (NotFound, DaemonNotRunning):
        return None
    return Path(result["path"]), 0, int(result["size"])


def load_file(uri: str, dest: str | Path | None = None) -> str | None:
    """The local path of a file, fetched from the channel if needed (or copied to ``dest``).

    Returns None if the file is not here and cannot be found in the node's channels (or no
    daemon runs to look for it).
    """
    parsed = parse_file_uri(uri)
    home = _home()
    located = home.files.locate(parsed) or _fetch_whole(home, parsed)
    if located is None:
        return None
    path, lo, hi = located
    if dest is None and (lo, hi) == (0, path.stat().st_size):
        return str(path)
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp()) / parsed.sha1
    target.write_bytes(_read(path, lo, hi))
    return str(target)


def load_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes | None:
    """The bytes of a file (or of ``[start, end)`` of it); None if it cannot be found.

    A range of a file that is not stored here fetches only the pieces that cover it.
    """
    parsed = parse_file_uri(uri)
    home = _home()
    located = home.files.locate(parsed)
    if located is None and (start is not None or end is not None):
        try:
            answer = DaemonClient(home.path).call(
                "file_fetch_range", uri=uri, start=start or 0, end=end
            )
        except (NotFound, DaemonNotRunning):
            return None
        return _read(Path(answer["path"]), answer["start"], answer["end"])
    located = located or _fetch_whole(home, parsed)
    if located is None:
        return None
    path, lo, hi = located
    first, last = lo + (start or 0), hi if end is None else lo + end
    if not lo <= first <= last <= hi:
        raise InvalidInput(f"byte range {start}..{end} is outside 0..{hi - lo}")
    return _read(path, first, last)


def _read(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def load_text(uri: str) -> str | None:
    """A stored UTF-8 text, or None if the file cannot be found.

    Raises:
        InvalidInput: the file is not UTF-8 text.
    """
    data = load_bytes(uri)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{uri} is not UTF-8 text: {exc}") from None


def load_json(uri: str) -> Any:
    """A stored JSON value, or None if the file cannot be found.

    Raises:
        InvalidInput: the file is not JSON.
    """
    text = load_text(uri)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{uri} is not JSON: {exc}") from None


def store_npy(array: Any, basename: str | None = None) -> str:
    """Store a numpy array in .npy format (needs numpy installed)."""
    np = _numpy("store_npy")

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return store_bytes(buffer.getvalue(), basename or "array.npy")


def load_npy(uri: str) -> Any:
    """A stored numpy array, or None if the file cannot be found (needs numpy installed)."""
    np = _numpy("load_npy")

    data = load_bytes(uri)
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def _numpy(what: str) -> Any:
    try:
        import numpy
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"{what} needs numpy, which kachery-node does not install: pip install numpy",
            name="numpy",
        ) from exc
    return numpy


__all__ = [
    "load_bytes",
    "load_file",
    "load_json",
    "load_npy",
    "load_text",
    "store_bytes",
    "store_file",
    "store_json",
    "store_npy",
    "store_text",
]
