"""kachery's hashes of JSON values: task IDs and object-named subfeeds.

kachery-client 1.2.0 hashes ``{"functionId": ..., "kwargs": ...}`` as the SHA-1 of JSON with sorted
keys, compact separators and ASCII escapes, after writing integral floats as integers. The
reference vectors show one more rule, a weakness kept for compatibility: a float that is *not*
integral is written as ``null``, so ``threshold=5.5`` and ``threshold=6.5`` share a task ID. To
never answer one with the other's cached result, kachery-node records beside each result the
``exact_kwargs_digest``, in which floats keep their value, and checks it on every cache lookup.

Non-goal: hashing anything but JSON values; ``check_json_value`` says what is not one.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .errors import InvalidInput

JSONValue = Any
"""A value of JSON's data model: dict with str keys, list, str, int, float, bool, None."""

MAX_JSON_DEPTH = 64
"""Deepest JSON nesting accepted (the same bound as the wire codec)."""


def check_json_value(value: JSONValue, what: str = "value") -> None:
    """Raise ``InvalidInput`` naming the first part of ``value`` that JSON cannot carry."""
    _check(value, what, 0)


def _check(value: JSONValue, path: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(f"{path} nests deeper than {MAX_JSON_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{path} is {value}, which JSON cannot carry")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{path} has a key {key!r} that is not a string")
            _check(item, f"{path}[{key!r}]", depth + 1)
        return
    raise InvalidInput(f"{path} is a {type(value).__name__}, which is not a JSON value")


def _kachery_floats(value: JSONValue) -> JSONValue:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, dict):
        return {k: _kachery_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_kachery_floats(v) for v in value]
    return value


def _sha1_json(value: JSONValue) -> str:
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except ValueError as exc:  # an integer of over 4300 digits
        raise InvalidInput(f"value cannot be written as JSON: {exc}") from None
    return hashlib.sha1(text.encode("ascii")).hexdigest()


def task_hash(function_id: str, kwargs: dict[str, JSONValue]) -> str:
    """kachery's task ID of a pure calculation: see the module docstring for the rule.

    Raises:
        InvalidInput: ``kwargs`` is not a JSON object.
    """
    if not isinstance(kwargs, dict):
        raise InvalidInput(f"task kwargs must be a JSON object, not {type(kwargs).__name__}")
    check_json_value(kwargs, "kwargs")
    return _sha1_json({"functionId": function_id, "kwargs": _kachery_floats(kwargs)})


def exact_kwargs_digest(function_id: str, kwargs: dict[str, JSONValue]) -> str:
    """SHA-1 of the same JSON as ``task_hash`` but with every float kept (integral ones as ints)."""
    check_json_value(kwargs, "kwargs")

    def ints(value: JSONValue) -> JSONValue:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: ints(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [ints(v) for v in value]
        return value

    return _sha1_json({"functionId": function_id, "kwargs": ints(kwargs)})


def subfeed_hash_of_object(name: dict[str, JSONValue]) -> str:
    """kachery's hash of a subfeed named by a JSON object (sorted keys, compact separators)."""
    check_json_value(name, "subfeed name")
    return _sha1_json(name)
