"""Websocket masking in C (node/daemon/wsmask.py): the same bytes as wsproto's own, frame by
frame."""

from __future__ import annotations

import importlib
import os
import random

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from kachery.node.daemon import wsmask
from kachery.node.daemon.transport import MASKING_IN_C


def test_the_transport_masks_in_c() -> None:
    assert MASKING_IN_C, "websockets.speedups should be installed with kachery-node"
    assert wsmask.install()  # a second call keeps the C masker
    assert wsmask.PYTHON_MASKER is not None


@pytest.mark.parametrize("seed", range(5))
def test_c_masking_equals_wsprotos_over_any_split_of_a_payload(seed: int) -> None:
    rng = random.Random(seed)
    frame_protocol = importlib.import_module("wsproto.frame_protocol")
    key = os.urandom(4)
    c_masker, py_masker = frame_protocol.XorMaskerSimple(key), wsmask.PYTHON_MASKER(key)
    assert type(c_masker) is not type(py_masker)
    payload = os.urandom(rng.randrange(0, 300_000))
    at = 0
    while at < len(payload):  # partial payloads, as they come off the socket: the key rotates
        part = payload[at : at + rng.choice((1, 2, 3, 5, 4096, 65_537, 262_144))]
        assert bytes(c_masker.process(bytearray(part))) == bytes(py_masker.process(bytearray(part)))
        at += len(part)
    assert bytes(c_masker.process(bytearray())) == b""


def test_frames_masked_in_c_are_read_back_by_a_server() -> None:
    client, server = FrameProtocol(client=True, extensions=[]), FrameProtocol(False, [])
    payloads = [os.urandom(n) for n in (0, 1, 125, 126, 65_535, 65_536, 262_144)]
    for payload in payloads:
        server.receive_bytes(client._serialize_frame(Opcode.BINARY, payload))
    got = [bytes(frame.payload) for frame in server.received_frames()]
    assert got == payloads


def test_without_the_c_module_wsproto_keeps_masking_in_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def without_speedups(name: str, package: str | None = None) -> object:
        if name == "websockets.speedups":
            raise ImportError("no module named websockets.speedups")
        return real(name, package)

    monkeypatch.setattr(wsmask.importlib, "import_module", without_speedups)
    frame_protocol = real("wsproto.frame_protocol")
    before = frame_protocol.XorMaskerSimple
    assert not wsmask.install()
    assert frame_protocol.XorMaskerSimple is before  # left as it was
