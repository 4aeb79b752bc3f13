"""The read-only HTTP gateway of a real daemon: stored files by URI, with Range support."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kachery.node.localapi.contract import read_daemon_info
from kachery.node.testing import Daemon


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path / "node")
    daemon.start()
    yield daemon
    daemon.kill()


def get(
    node: Daemon, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    info = read_daemon_info(node.home)
    assert info is not None
    conn = http.client.HTTPConnection("127.0.0.1", info.api_port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_the_gateway_serves_whole_files_and_ranges(node: Daemon, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    src = tmp_path / "trace.bin"
    src.write_bytes(data)
    uri = node.cli("store", str(src)).strip()
    path = "/sha1/" + uri.removeprefix("sha1://")
    status, headers, body = get(node, path)
    assert (status, body) == (200, data)
    assert headers["accept-ranges"] == "bytes"
    assert headers["etag"] == f'"{hashlib.sha1(data).hexdigest()}"'
    assert "immutable" in headers["cache-control"]
    status, headers, body = get(node, path, {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, data[1000:2000])
    assert headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert get(node, path, {"Range": "bytes=-10"})[2] == data[-10:]
    assert get(node, path, {"Range": "bytes=2999990-"})[2] == data[2999990:]
    status, headers, _ = get(node, path, {"Range": "bytes=5000000-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(data)}"
    status, headers, body = get(node, path, method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", str(len(data)))


def test_the_gateway_serves_chunk_uris_and_refuses_what_is_not_stored(
    node: Daemon, tmp_path: Path
) -> None:
    data = os.urandom(21_000_000)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    node.cli("store", str(src))
    file_sha1 = hashlib.sha1(data).hexdigest()
    tail = data[20_000_000:]
    chunk = f"/sha1/{hashlib.sha1(tail).hexdigest()}?chunkOf={file_sha1}~20000000~21000000"
    assert get(node, chunk)[2] == tail
    status, _, body = get(node, "/sha1/" + "0" * 40)
    assert status == 404
    assert "not stored on this node" in json.loads(body)["error"]["message"]
    status, _, body = get(node, "/sha1/nothex")
    assert status == 400


def test_malformed_or_wrong_requests_get_400_or_404_never_500(node: Daemon, tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = tmp_path / "small.bin"
    src.write_bytes(data)
    node.cli("store", str(src))
    file_sha1 = hashlib.sha1(data).hexdigest()
    good = hashlib.sha1(data[:1000]).hexdigest()
    cases = {
        f"/sha1/{'0' * 40}?chunkOf={file_sha1}~0~1000": 400,  # wrong hash for the range
        f"/sha1/{good}?chunkOf={file_sha1}~0~999999": 400,  # range past the end of the file
        f"/sha1/{good}?chunkOf={'1' * 40}~0~1000": 404,  # whole file not stored here
        "/sha1/" + "g" * 40: 400,  # not hex
        f"/sha1/{file_sha1}?%ff%00=&&==chunkOf": 400,  # garbage query string
    }
    for path, wanted in cases.items():
        status, _, body = get(node, path)
        assert status == wanted, (path, status, body)
        message = json.loads(body)["error"]["message"]
        assert message, path
        assert "\n" not in message, (path, message)
