"""The one wire codec: canonical CBOR (RFC 8949 section 4.2.1) out, checked CBOR in.

Everything kachery-node signs or sends is ``encode(value)``: deterministic bytes, so two nodes that
build the same value sign the same bytes. On the way in, ``decode`` checks the byte size and then
walks the item headers (no objects built) to check nesting depth, item counts and the allowed
subset: integers, byte and text strings, arrays, maps, false/true/null and floats. Tags are
refused (they can build cycles and arbitrary objects), as are indefinite lengths. Only then does
cbor2 build the value.

Non-goal: schemas. Message types (messages.py) check their own fields.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import CloseCode, LocalProtocolError, RemoteProtocolError

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest CBOR value accepted: above any frame we send (bulk payloads are 256 KiB; feed batches
are capped at 1 MiB), small enough that a hostile peer cannot make us allocate much."""

MAX_DEPTH = 64
"""Deepest nesting accepted: kachery messages are JSON documents, rarely more than 10 deep."""

MAX_ITEMS = 1_000_000
"""Most data items (scalars and containers) in one value: bounds decode work per frame."""

_INT_MAX = 2**64 - 1  # CBOR major types 0 and 1 carry 64-bit magnitudes; larger needs tags


def encode(value: Any) -> bytes:
    """Canonical CBOR of ``value`` (dicts, lists, str, bytes, int, float, bool, None).

    Raises:
        LocalProtocolError: the value holds something CBOR-without-tags cannot carry.
    """
    _check_encodable(value, 0)
    return cbor2.dumps(value, canonical=True)


def _check_encodable(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LocalProtocolError(f"value nests deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, bytes, float)):
        return
    if isinstance(value, int):
        if not -_INT_MAX - 1 <= value <= _INT_MAX:
            raise LocalProtocolError(f"integer {value} does not fit in 64 bits")
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_encodable(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise LocalProtocolError(f"map key {key!r} is not a string or an integer")
            _check_encodable(item, depth + 1)
        return
    raise LocalProtocolError(f"cannot encode a {type(value).__name__} in a kachery message")


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Decode one CBOR value after checking its size, depth and item subset.

    Raises:
        RemoteProtocolError: the bytes are too large, too deep, malformed, or use a refused
            feature; ``close_code`` is MESSAGE_TOO_BIG or BAD_FRAME.
    """
    if len(data) > max_bytes:
        raise RemoteProtocolError(
            f"CBOR value of {len(data)} bytes exceeds the {max_bytes}-byte limit",
            close_code=CloseCode.MESSAGE_TOO_BIG,
        )
    view = memoryview(data)
    scan(view, max_depth=max_depth)
    try:
        return cbor2.loads(view, max_depth=max_depth + 1, allow_duplicate_keys=False)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError) as exc:
        raise RemoteProtocolError(
            f"malformed CBOR: {exc}", close_code=CloseCode.BAD_FRAME
        ) from None


_SIZES = {24: 1, 25: 2, 26: 4, 27: 8}


def scan(data: memoryview, *, max_depth: int = MAX_DEPTH) -> None:
    """Walk the item headers of exactly one CBOR value without building it.

    Raises:
        RemoteProtocolError: malformed, trailing bytes, too deep, too many items, or a refused
            feature (tags, indefinite lengths, undefined and other simple values).
    """
    end = len(data)
    pos = 0
    items = 0
    pending = [1]  # items still expected at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            raise _bad("truncated CBOR value")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            arg = info
        elif info in _SIZES:
            size = _SIZES[info]
            if pos + size > end:
                raise _bad("truncated CBOR header")
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif info == 31:
            raise _bad("indefinite-length CBOR items are not allowed")
        else:
            raise _bad(f"reserved CBOR additional information {info}")
        items += 1
        if items > MAX_ITEMS:
            raise _bad(f"more than {MAX_ITEMS} CBOR items in one value")
        if major in (0, 1):
            continue
        if major in (2, 3):
            if arg > end - pos:
                raise _bad("CBOR string runs past the end of the frame")
            pos += arg
            continue
        if major in (4, 5):
            count = arg if major == 4 else 2 * arg
            if count > end - pos:  # every item takes at least one byte
                raise _bad("CBOR container declares more items than the frame holds")
            if len(pending) > max_depth:
                raise _bad(f"CBOR value nests deeper than {max_depth} levels")
            pending.append(count)
            continue
        if major == 6:
            raise _bad("CBOR tags are not allowed")
        # major 7: only false, true, null and floats
        if info in (20, 21, 22, 25, 26, 27):
            continue
        raise _bad(f"CBOR simple value {arg} is not allowed")
    if pos != end:
        raise _bad(f"{end - pos} trailing bytes after the CBOR value")


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, close_code=CloseCode.BAD_FRAME)
