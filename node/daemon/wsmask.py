"""Websocket masking in C, for the frames a dialer sends.

RFC 6455 makes a client mask every frame it sends (XOR with a fresh random 4-byte key), and the
server unmask it. wsproto, under trio-websocket, does both in Python: ~310 us per 256 KiB
frame here, each way, so bulk data from a dialer to a listener ran at 0.64 GB/s against 2.66 the
other way. ``websockets`` (a well-kept websocket library) ships the same operation in C as
``websockets.speedups.apply_mask``: ~5 us per 256 KiB frame. ``install`` puts it under wsproto,
keeping wsproto's interface (a masker per frame, whose key rotates as partial payloads go by);
without that module, or with a wsproto that no longer has the class, wsproto masks as before.
The bytes on the wire are the same either way (tests/test_wsmask.py compares them).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger(__name__)

PYTHON_MASKER: Any = None
"""wsproto's own masker class, once ``install`` has replaced it (for the tests)."""


def install() -> bool:
    """Make wsproto mask and unmask with websockets' C function; True if it now does."""
    frame_protocol: Any
    try:
        apply_mask = importlib.import_module("websockets.speedups").apply_mask
        frame_protocol = importlib.import_module("wsproto.frame_protocol")
    except (ImportError, AttributeError):
        return False
    current = getattr(frame_protocol, "XorMaskerSimple", None)
    if current is None:
        return False
    if getattr(current, "in_c", False):
        return True

    class CMasker:
        """wsproto's ``XorMaskerSimple``, with the XOR done by ``apply_mask``."""

        in_c = True
        __slots__ = ("_key",)

        def __init__(self, masking_key: bytes | bytearray) -> None:
            self._key = bytes(masking_key)

        def process(self, data: Any) -> bytes:
            masked: bytes = apply_mask(data, self._key)
            turn = len(masked) % 4  # the next payload continues with the next key byte
            if turn:
                self._key = self._key[turn:] + self._key[:turn]
            return masked

    global PYTHON_MASKER
    PYTHON_MASKER = current
    frame_protocol.XorMaskerSimple = CMasker
    log.debug("websocket masking in C (websockets.speedups)")
    return True
