"""Task records: cached results (pure calculations, last results of queries) and actions.

``TaskStore`` keeps two tables. ``task_results`` maps (task ID, exact kwargs digest, type) to the
URI of a result held here: a pure calculation's result, which this node shares with the channel
(it answers ``TaskLookup``), or a query's latest result, its fallback. A small result (at most
``INLINE_RESULT_BYTES``, the size that travels inside task messages) keeps its bytes in its row,
committed with it in one transaction; a larger one is a file in this node's store.
The digest is part of the key because kachery's task ID writes non-integral floats as null: a
result is only ever found for the exact arguments it was computed from. ``task_actions`` is a
provider's ledger of the action requests it accepted, written (and committed) before an action
runs and again when it ends, so a request delivered twice, even across a restart, runs once.

Non-goals: the result files themselves (the blob store) and deciding anything
(node/services/tasks/).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Row, delete, select
from sqlalchemy.engine import Connection

from kachery.protocol.errors import InvalidInput
from kachery.protocol.tasks import is_inline_result

from . import schema
from .db import Database

ACTION_STATES = ("queued", "running", "finished", "error")
"""An accepted action is queued, then running (recorded before the worker gets it), then
finished or error."""


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A result held on this node.

    Attributes:
        task_id: kachery's task ID.
        kwargs_digest: the exact digest of the arguments it was computed from.
        task_type: ``pure-calculation`` or ``query``.
        function_id: the function.
        result_uri: the result file's URI (in this node's store).
        result_kind: ``json``, ``bytes`` or ``file``.
        source: where it came from: the provider that ran it, or the member that held it.
        finished_at: when it was computed (seconds since the epoch).
        result_data: a small result's bytes, kept in the row (None: the result is a file in
            the store). Unverified as read: check them against ``result_uri`` before use.
    """

    task_id: str
    kwargs_digest: str
    task_type: str
    function_id: str
    result_uri: str
    result_kind: str
    source: str
    finished_at: float
    result_data: bytes | None = None


@dataclass(frozen=True, slots=True)
class ActionRecord:
    """An action request a provider accepted (see ``ACTION_STATES``)."""

    requester: str
    request_id: str
    function_id: str
    kwargs_digest: str
    status: str
    error: str | None
    accepted_at: float
    finished_at: float | None


class TaskStore:
    """The task tables of one node's database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- results -------------------------------------------------------------------------------

    def result(self, task_id: str, kwargs_digest: str, task_type: str) -> TaskResult | None:
        """The result held for exactly these arguments, or None."""
        t = schema.task_results
        with self.db.begin() as conn:
            row = conn.execute(
                select(t).where(
                    t.c.task_id == task_id,
                    t.c.kwargs_digest == kwargs_digest,
                    t.c.task_type == task_type,
                )
            ).first()
        return None if row is None else _result(row)

    def results_for(self, task_id: str) -> list[TaskResult]:
        """Every result held under a task ID (several if non-integral floats collide)."""
        t = schema.task_results
        with self.db.begin() as conn:
            rows = conn.execute(
                select(t).where(t.c.task_id == task_id).order_by(t.c.finished_at.desc())
            ).all()
        return [_result(r) for r in rows]

    def kept_bytes(self, sha1: str) -> bytes | None:
        """The bytes of a small result with SHA-1 ``sha1`` kept in a result's record, if one
        holds them and they still hash to it (else None)."""
        t = schema.task_results
        with self.db.begin() as conn:
            rows = conn.execute(
                select(t.c.result_data).where(
                    # then "/label", "?manifest=..." or nothing
                    *_starting(t.c.result_uri, f"sha1://{sha1}"),
                    t.c.result_data.is_not(None),
                )
            ).all()
        for row in rows:
            data = bytes(row.result_data)
            if is_inline_result(data, sha1):
                return data
        return None

    def ids_starting(self, prefix: str, limit: int = 10) -> list[str]:
        """The task IDs of results held here, and the IDs of ended requests kept here, that
        begin with ``prefix``: at most ``limit`` of each kind, each ID once, sorted."""
        results, requests = schema.task_results, schema.task_requests
        with self.db.begin() as conn:
            task_ids = conn.execute(
                select(results.c.task_id)
                .where(*_starting(results.c.task_id, prefix))
                .distinct()
                .order_by(results.c.task_id)
                .limit(limit)
            ).all()
            request_ids = conn.execute(
                select(requests.c.request_id)
                .where(*_starting(requests.c.request_id, prefix))
                .order_by(requests.c.request_id)
                .limit(limit)
            ).all()
        return sorted({r.task_id for r in task_ids} | {r.request_id for r in request_ids})

    # -- requests made here, once ended -------------------------------------------------------

    def record_ended_requests(self, ended: list[tuple[str, str, float, str]], *, keep: int) -> None:
        """Keep ended requests' final states: (request ID, task ID, ended at, state as JSON
        text), each replacing an earlier one under the same ID (a retried request); then drop
        all but the newest ``keep``. One transaction."""
        t = schema.task_requests
        with self.db.begin() as conn:
            ids = [e[0] for e in ended]
            conn.execute(delete(t).where(t.c.request_id.in_(ids)))
            rows = [
                {"request_id": r, "task_id": k, "ended_at": at, "state": state}
                for r, k, at, state in {e[0]: e for e in ended}.values()
            ]
            conn.execute(t.insert(), rows)
            newest = select(t.c.request_id).order_by(t.c.ended_at.desc()).limit(keep)
            conn.execute(delete(t).where(t.c.request_id.not_in(newest.scalar_subquery())))

    def ended_request(self, request_id: str) -> str | None:
        """The final state (JSON text) of an ended request, or None."""
        t = schema.task_requests
        with self.db.begin() as conn:
            row = conn.execute(select(t.c.state).where(t.c.request_id == request_id)).first()
        return None if row is None else str(row.state)

    def ended_requests(self, limit: int) -> list[str]:
        """The final states (JSON text) of the newest ``limit`` ended requests, newest first."""
        t = schema.task_requests
        with self.db.begin() as conn:
            rows = conn.execute(select(t.c.state).order_by(t.c.ended_at.desc()).limit(limit)).all()
        return [str(r.state) for r in rows]

    def result_keys(self) -> set[tuple[str, str, str]]:
        """(task ID, kwargs digest, type) of every result held: small enough to keep in memory,
        so a lookup for a task never computed here needs no query."""
        t = schema.task_results
        with self.db.begin() as conn:
            rows = conn.execute(select(t.c.task_id, t.c.kwargs_digest, t.c.task_type)).all()
        return {(r.task_id, r.kwargs_digest, r.task_type) for r in rows}

    def results(self, limit: int = 100) -> list[TaskResult]:
        """The newest results held here."""
        t = schema.task_results
        with self.db.begin() as conn:
            rows = conn.execute(select(t).order_by(t.c.finished_at.desc()).limit(limit)).all()
        return [_result(r) for r in rows]

    def save_result(self, result: TaskResult) -> None:
        """Record a result (replacing the one held for the same arguments: a query's last), with
        its bytes if it keeps them in the row."""
        self.save_results([result])

    def save_results(self, results: list[TaskResult]) -> None:
        """Record several results in one transaction (as ``save_result`` records one; of two
        for the same arguments, the later)."""
        t = schema.task_results
        latest = {(r.task_id, r.kwargs_digest, r.task_type): r for r in results}
        if not latest:
            return
        with self.db.begin() as conn:
            for result in latest.values():
                conn.execute(
                    delete(t).where(
                        t.c.task_id == result.task_id,
                        t.c.kwargs_digest == result.kwargs_digest,
                        t.c.task_type == result.task_type,
                    )
                )
            conn.execute(t.insert(), [asdict(r) for r in latest.values()])  # fields = columns

    def forget_result(self, task_id: str, kwargs_digest: str, task_type: str) -> None:
        """Drop a record (its file is no longer in the store)."""
        t = schema.task_results
        with self.db.begin() as conn:
            conn.execute(
                delete(t).where(
                    t.c.task_id == task_id,
                    t.c.kwargs_digest == kwargs_digest,
                    t.c.task_type == task_type,
                )
            )

    # -- actions -------------------------------------------------------------------------------

    def action(self, requester: str, request_id: str) -> ActionRecord | None:
        with self.db.begin() as conn:
            return _action_row(conn, requester, request_id)

    def accept_action(
        self, requester: str, request_id: str, function_id: str, kwargs_digest: str
    ) -> tuple[ActionRecord, bool]:
        """Record an accepted action as queued, unless it is recorded already.

        Returns:
            The record, and True if it was created now (False: a duplicate delivery; the record
            says what became of the first).
        """
        t = schema.task_actions
        with self.db.begin() as conn:
            existing = _action_row(conn, requester, request_id)
            if existing is not None:
                return existing, False
            conn.execute(
                t.insert().values(
                    requester=requester,
                    request_id=request_id,
                    function_id=function_id,
                    kwargs_digest=kwargs_digest,
                    status="queued",
                    error=None,
                    accepted_at=time.time(),
                    finished_at=None,
                )
            )
            created = _action_row(conn, requester, request_id)
        assert created is not None
        return created, True

    def mark_action(
        self, requester: str, request_id: str, status: str, error: str | None = None
    ) -> None:
        """Move an action to ``status`` (committed before this returns)."""
        if status not in ACTION_STATES:
            raise InvalidInput(f"unknown action state {status!r}: one of {ACTION_STATES}")
        t = schema.task_actions
        done = time.time() if status in ("finished", "error") else None
        with self.db.begin() as conn:
            conn.execute(
                t.update()
                .where(t.c.requester == requester, t.c.request_id == request_id)
                .values(status=status, error=error, finished_at=done)
            )

    def forget_action(self, requester: str, request_id: str) -> None:
        """Drop the record of an action handed back before it ran (a retry may run it)."""
        t = schema.task_actions
        with self.db.begin() as conn:
            conn.execute(delete(t).where(t.c.requester == requester, t.c.request_id == request_id))


def _result(row: Row[object]) -> TaskResult:
    return TaskResult(**row._mapping)  # the fields are the columns


def _action_row(conn: Connection, requester: str, request_id: str) -> ActionRecord | None:
    t = schema.task_actions
    row = conn.execute(
        select(t).where(t.c.requester == requester, t.c.request_id == request_id)
    ).first()
    return None if row is None else ActionRecord(**row._mapping)


def _starting(column: Any, prefix: str) -> tuple[Any, Any]:
    """SQL conditions: ``column`` begins with ``prefix`` (IDs and URIs are ASCII below "~"), as
    a range the column's index serves, where LIKE would scan."""
    return column >= prefix, column < prefix + "~"
