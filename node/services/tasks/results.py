"""Task results held on this node: the records of results computed or fetched here.

A result is a file in the store (or, if small, bytes kept in its record) named by its URI. A
record is served only while its bytes are still here and still match its URI: one removed from
the store, or corrupt, is forgotten on the spot. The keys of all records are kept in memory,
so that most lookups, which are for tasks never computed here, cost no query.

Non-goal: SQL (kachery.storage.tasks).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from kachery.node.services.tasks.common import log
from kachery.protocol.tasks import INLINE_RESULT_BYTES, is_inline_result
from kachery.protocol.uri import parse_file_uri
from kachery.storage.tasks import TaskResult, TaskStore

if TYPE_CHECKING:
    from kachery.node.services.host import Host


class ResultCache:
    """The results this node holds."""

    def __init__(self, node: Host, store: TaskStore) -> None:
        self.node = node
        self.store = store
        self._keys: set[tuple[str, str, str]] | None = None
        """Results recorded here (None until loaded)."""

    async def load(self) -> None:
        self._keys = await self.node.run_sync(self.store.result_keys)

    async def held(
        self, task_id: str, kwargs_digest: str, task_type: str, *, inline: bool = False
    ) -> tuple[TaskResult, int, bytes | None] | None:
        """The result recorded here, its size, and its bytes if its row keeps them (or, with
        ``inline``, to send it, if its file is small enough to travel inline); None unless its
        bytes are still here and still match its URI."""
        key = (task_id, kwargs_digest, str(task_type))
        if self._keys is not None and key not in self._keys:
            return None
        held = await self.node.run_sync(
            self._read_held, task_id, kwargs_digest, str(task_type), inline
        )
        if held is None and self._keys is not None:
            self._keys.discard(key)
        return held

    def _read_held(
        self, task_id: str, kwargs_digest: str, task_type: str, inline: bool
    ) -> tuple[TaskResult, int, bytes | None] | None:
        record = self.store.result(task_id, kwargs_digest, task_type)
        if record is None:
            return None
        data = record.result_data
        if data is not None:
            sha1 = parse_file_uri(record.result_uri).sha1
            if is_inline_result(data, sha1):
                return record, len(data), data
            log.warning("the result %s kept in the database is corrupt; forgotten", sha1)
            self.store.forget_result(task_id, kwargs_digest, task_type)
            return None
        found = self.read_result_file(record.result_uri, inline=inline)
        if found is None:  # removed from the store (verify --remove): forget the record too
            self.store.forget_result(task_id, kwargs_digest, task_type)
            return None
        return record, *found

    def read_result_file(self, uri: str, *, inline: bool) -> tuple[int, bytes | None] | None:
        """A stored result's size, and (with ``inline``) its bytes if at most
        INLINE_RESULT_BYTES; None if it is not in the store, or if its bytes were read and no
        longer hash to what the URI names."""
        sha1 = parse_file_uri(uri).sha1
        entry = self.node.home.files.get(sha1)
        if entry is None:
            return None
        if not inline or entry.size > INLINE_RESULT_BYTES:
            return entry.size, None
        try:
            data = entry.path.read_bytes()
        except OSError:
            return None
        if hashlib.sha1(data).hexdigest() != sha1:  # never send what would not verify
            log.warning("stored result %s does not match its hash; not served", sha1)
            return None
        return entry.size, data

    async def save(self, record: TaskResult) -> None:
        await self.node.run_sync(self.store.save_result, record)
        self.note(record)

    def note(self, record: TaskResult) -> None:
        if self._keys is not None:
            self._keys.add((record.task_id, record.kwargs_digest, record.task_type))

    async def kept_bytes(self, sha1: str) -> bytes | None:
        """A small result's bytes kept in its record (so `load` of its URI works here)."""
        return await self.node.run_sync(self.store.kept_bytes, sha1)
