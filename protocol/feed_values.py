"""Feed message values: what a message and its metaData may hold, and their canonical CBOR.

A message is any JSON value of at most MAX_MESSAGE_BYTES as canonical CBOR (64 KiB): integers fit
in 64 bits, floats are finite, map keys are strings, nesting is at most MAX_JSON_DEPTH. metaData
is a JSON object of at most MAX_METADATA_BYTES. Each check names the first part of a value that
breaks a rule, as a path (``message.items[3]``).

Non-goal: the signed body around them (feeds.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cbor2

from .errors import InvalidInput
from .kachery_json import JSONValue

MAX_MESSAGE_BYTES = 64 * 1024
"""Largest message value, as canonical CBOR: a notebook entry or ledger record, not a file (store
big things as files and append their URI)."""

MAX_METADATA_BYTES = 4096
"""Largest metaData object, as canonical CBOR (provenance such as who submitted a message)."""

MAX_JSON_DEPTH = 64
"""Deepest nesting in a message (the codec's bound)."""

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
"""Integers a message may hold: what a CBOR major type 0/1 item carries without a bignum tag."""


def check_message_value(value: JSONValue, what: str = "message") -> None:
    """Raise ``InvalidInput`` naming the first part of ``value`` a feed message cannot carry.

    JSON values only (dicts with string keys, lists, strings, finite floats, booleans, null) and
    integers within 64 bits.
    """
    _check_value(value, what, 0)


def _check_value(value: Any, path: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"{path} nests deeper than {MAX_JSON_DEPTH} levels")
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidInput(f"{path} is the integer {value}, which does not fit in 64 bits")
        return
    if kind is float:
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}, which JSON cannot carry")
        return
    if kind is list or kind is tuple:
        for i, item in enumerate(value):
            _check_value(item, f"{path}[{i}]", depth + 1)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise InvalidInput(f"{path} has a key {key!r} that is not a string")
            _check_value(item, f"{path}[{key!r}]", depth + 1)
        return
    raise InvalidInput(f"{path} is a {kind.__name__}, which is not a JSON value")


def _canonical_cbor(value: JSONValue, what: str) -> bytes:
    """Canonical CBOR of a checked JSON value; a string UTF-8 cannot encode is InvalidInput.

    Python strings may hold lone surrogates (``json.loads('"\\ud800"')`` makes one); UTF-8,
    and so CBOR and JSON text, cannot carry them. Looked for only when encoding fails, so the
    common case pays nothing.
    """
    try:
        data: bytes = cbor2.dumps(value, canonical=True)
    except UnicodeEncodeError:
        where = _unencodable(value, what) or what
        raise InvalidInput(
            f"{where} holds a lone surrogate, which UTF-8 (and so JSON and CBOR) cannot carry"
        ) from None
    return data


def _unencodable(value: Any, path: str) -> str | None:
    """The path of the first string (or key) in ``value`` that UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
        return None
    items: Any = ()
    if isinstance(value, dict):
        for key in value:
            if _unencodable(key, "") is not None:
                return f"{path} key {key!r}"
        items = ((f"{path}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    for where, item in items:
        found = _unencodable(item, where)
        if found is not None:
            return found
    return None


def encode_message_value(value: JSONValue, what: str = "message") -> bytes:
    """The canonical CBOR of a message value, after checking it is JSON and within the limit.

    Raises:
        InvalidInput: not a JSON value, or over MAX_MESSAGE_BYTES (the message says which).
    """
    check_message_value(value, what)
    data = _canonical_cbor(value, what)
    if len(data) > MAX_MESSAGE_BYTES:
        raise InvalidInput(
            f"{what} is {len(data):,} bytes as CBOR, over the {MAX_MESSAGE_BYTES:,}-byte limit of a"
            " feed message: store large data as a file and append its URI"
        )
    return data


def encode_metadata(value: Mapping[str, JSONValue] | None) -> bytes:
    """The canonical CBOR of a metaData object (``{}`` if None).

    Raises:
        InvalidInput: not a JSON object, or over MAX_METADATA_BYTES.
    """
    if value is None:
        return b"\xa0"
    if not isinstance(value, dict):
        raise InvalidInput(f"metaData must be a JSON object, not {type(value).__name__}")
    check_message_value(value, "metaData")
    data = _canonical_cbor(value, "metaData")
    if len(data) > MAX_METADATA_BYTES:
        raise InvalidInput(f"metaData is {len(data):,} bytes, over {MAX_METADATA_BYTES:,}")
    return data
