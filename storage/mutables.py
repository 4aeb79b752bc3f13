"""Mutables: the node-local key/value store (aliases, settings), never shared with peers.

kachery semantics: keys and values are JSON values; a key is identified by its canonical JSON
(sorted keys, compact), so ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` are the same key.
``set(key, value, update=False)`` refuses to overwrite an existing value.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import delete, select

from kachery.protocol.errors import InvalidInput
from kachery.protocol.kachery_json import JSONValue, check_json_value

from . import schema
from .db import Database
from .errors import AlreadyExists

MAX_MUTABLE_BYTES = 1024 * 1024
"""Largest key or value (as JSON): mutables are for small things; store big ones as files."""


def _canonical(value: JSONValue, what: str) -> str:
    check_json_value(value, what)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_MUTABLE_BYTES:
        raise InvalidInput(f"{what} is larger than {MAX_MUTABLE_BYTES} bytes as JSON")
    return text


class Mutables:
    """The mutables table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def set(self, key: JSONValue, value: JSONValue, *, update: bool = True) -> None:
        """Set ``key`` to ``value``.

        Raises:
            AlreadyExists: ``update`` is False and the key has a value.
            InvalidInput: the key or value is not JSON, or too large.
        """
        k = _canonical(key, "mutable key")
        v = _canonical(value, "mutable value")
        table = schema.mutables
        with self.db.begin() as conn:
            exists = conn.execute(select(table.c.key).where(table.c.key == k)).first() is not None
            if exists and not update:
                raise AlreadyExists(
                    f"mutable {k} already has a value: to replace it, pass update=True"
                    " (on the command line, leave out --no-update)"
                )
            if exists:
                conn.execute(
                    table.update().where(table.c.key == k).values(value=v, updated_at=time.time())
                )
            else:
                conn.execute(table.insert().values(key=k, value=v, updated_at=time.time()))

    def get(self, key: JSONValue) -> JSONValue:
        """The value of ``key``, or None if it has none."""
        k = _canonical(key, "mutable key")
        table = schema.mutables
        with self.db.begin() as conn:
            row = conn.execute(select(table.c.value).where(table.c.key == k)).first()
        return None if row is None else json.loads(row.value)

    def delete(self, key: JSONValue) -> bool:
        """Remove ``key``; True if it had a value."""
        k = _canonical(key, "mutable key")
        table = schema.mutables
        with self.db.begin() as conn:
            result = conn.execute(delete(table).where(table.c.key == k))
        return bool(result.rowcount)

    def items(self) -> list[tuple[JSONValue, JSONValue]]:
        """All keys and values, sorted by key."""
        table = schema.mutables
        with self.db.begin() as conn:
            rows = conn.execute(select(table.c.key, table.c.value).order_by(table.c.key)).all()
        return [(json.loads(r.key), json.loads(r.value)) for r in rows]
