"""A task request as its requester follows it, and one attempt at a provider.

Non-goal: driving them (requester.py).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kachery.node.changes import Changes
from kachery.node.daemon.peer import PeerConnection
from kachery.protocol.tasks import (
    Candidate,
    Lease,
    Marker,
    ResultKind,
    TaskSpec,
    TaskStatus,
    advance,
    clip_error,
)


class GaveUp(Exception):
    """No provider could be found or kept: the request ends (or falls back to a last result)."""


@dataclass(slots=True)
class Attempt:
    """One provider asked for one request."""

    candidate: Candidate
    conn: PeerConnection | None
    """The session it was asked through (None: this node)."""
    lease: Lease | None = None
    status: TaskStatus = TaskStatus.PENDING
    error: str | None = None
    result_uri: str | None = None
    result_kind: ResultKind | None = None
    result_size: int | None = None
    result_data: bytes | None = None
    maybe_delivered: bool = False
    """The request may have reached the provider (an action may be held there)."""
    from_cache: bool = False
    """A pure calculation finished in the provider's first answer: it held the result, and
    nothing ran."""


@dataclass(slots=True)
class Request:
    """A request made through this node, as its requester follows it."""

    spec: TaskSpec
    channels: list[str]
    timeout: float
    deadline: float
    """trio.current_time() when it times out."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    status: TaskStatus = TaskStatus.WAITING
    error: str | None = None
    result_uri: str | None = None
    result_kind: ResultKind | None = None
    result_data: bytes | None = None
    """A small result's bytes (verified), handed to the client with the request's state so it
    needs no store to read them; None for a result that is a file in the store."""
    cached: bool = False
    fallback: bool = False
    provider: str | None = None
    note: str = ""
    attempt: Attempt | None = None
    failed: dict[str, tuple[Marker, float]] = field(default_factory=dict)
    """Providers given up on: their marker then, and when they may be asked regardless."""
    failures: dict[str, int] = field(default_factory=dict)
    sticky: str | None = None
    did_not_run: bool = False
    """An action's provider handed it back unrun (rather than being lost with it)."""
    reasons: list[str] = field(default_factory=list)
    on_end: Callable[[Request], None] | None = None
    """Called once, when the request reaches a terminal state."""
    _changes: Changes = field(default_factory=Changes)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def wake(self) -> None:
        self._changes.notify()

    async def wait_until(self, deadline: float) -> None:
        """Wait for a change (or ``deadline``)."""
        await self._changes.wait(deadline=deadline)

    def set(self, status: TaskStatus, **fields: Any) -> None:
        if self.terminal:
            return
        self.status = advance(self.status, status)
        for name, value in fields.items():
            setattr(self, name, value)
        self.updated_at = time.time()
        self.wake()
        if self.status.terminal and self.on_end is not None:
            self.on_end(self)

    def finish(
        self,
        uri: str | None,
        kind: ResultKind | None,
        *,
        provider: str | None,
        data: bytes | None = None,
        cached: bool = False,
        fallback: bool = False,
        note: str = "",
    ) -> None:
        self.set(
            TaskStatus.FINISHED,
            result_uri=uri,
            result_kind=kind,
            result_data=data,
            provider=provider,
            cached=cached,
            fallback=fallback,
            note=note,
        )

    def fail(self, message: str) -> None:
        self.set(TaskStatus.ERROR, error=clip_error(message), note="")

    def snapshot(
        self, names: dict[str, str], *, kwargs: bool = True, data: bool = False
    ) -> dict[str, Any]:
        """The state as the local API shows it; with ``data``, a small result's bytes too
        (``resultData``, base64), so the client reads them from the answer."""
        spec = self.spec
        out: dict[str, Any] = {
            "requestId": spec.request_id,
            "taskId": spec.task_id,
            "functionId": spec.function_id,
            "taskType": str(spec.task_type),
            "channels": [names.get(c, c[:16]) for c in self.channels],
            "status": str(self.status),
            "error": self.error,
            "resultUri": self.result_uri,
            "resultKind": None if self.result_kind is None else str(self.result_kind),
            "cached": self.cached,
            "fallback": self.fallback,
            "provider": self.provider,
            "note": self.note,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "elapsedSeconds": round(
                (self.updated_at if self.terminal else time.time()) - self.created_at, 6
            ),
        }
        if kwargs:
            out["kwargs"] = spec.kwargs
        if data and self.result_data is not None and self.status is TaskStatus.FINISHED:
            out["resultData"] = base64.b64encode(self.result_data).decode("ascii")
        return out
