"""Workers: the processes that run this node's task functions (``kn.run_task_backend``).

A worker opens the streaming API method ``task_backend_listen`` with the functions it serves
(and the channels, and how many jobs it runs at once); jobs come down that stream. It stores each
result as a file in this node's store and reports it (``task_backend_report`` or, several at
once, ``task_backend_reports``); the result's record is committed before any requester hears of
it. When a worker's stream closes (it exited, crashed, or was killed), its jobs go to another
worker here or are handed back, so requesters ask another provider; an action the worker had
received ends in an error saying its outcome is unknown (it may have run: it never runs twice).

Non-goal: running the functions (kachery.node.client.tasks, in the worker).
"""

from __future__ import annotations

import base64
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio

from kachery.node.errors import NotPermitted
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.services.host import Host
from kachery.node.services.tasks.common import (
    DEFAULT_BACKEND_SLOTS,
    MAX_BACKEND_SLOTS,
    has_role,
    log,
    spawn_guarded,
)
from kachery.node.services.tasks.provider import TaskProvider
from kachery.node.services.tasks.results import ResultCache
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.task_jobs import Job
from kachery.protocol.tasks import (
    ResultKind,
    TaskStatus,
    TaskType,
    check_function_id,
    clip_error,
    is_inline_result,
    parse_task_type,
)
from kachery.protocol.uri import parse_file_uri
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskResult, TaskStore


@dataclass(frozen=True, slots=True)
class Outcome:
    """A worker's report on one job, checked: how it ended, and its result."""

    status: TaskStatus
    error: str | None = None
    uri: str | None = None
    kind: ResultKind | None = None
    size: int | None = None
    data: bytes | None = None


class Workers:
    """The worker processes of one node, and their reports."""

    def __init__(
        self,
        node: Host,
        store: TaskStore,
        provider: TaskProvider,
        results: ResultCache,
        providers_updated: Callable[[], None],
    ) -> None:
        self.node = node
        self.store = store
        self.provider = provider
        self.results = results
        self.providers_updated = providers_updated
        """Called when the functions this node serves change (a worker came or went)."""

    def _backend_functions(self, functions: object) -> dict[str, TaskType]:
        if not isinstance(functions, list) or not functions:
            raise InvalidInput('functions must be a non-empty list of {"functionId", "type"}')
        parsed: dict[str, TaskType] = {}
        for item in functions:
            if not isinstance(item, dict):
                raise InvalidInput('each function is {"functionId": ..., "type": ...}')
            function_id = check_function_id(item.get("functionId"))
            task_type = parse_task_type(item.get("type", TaskType.PURE))
            if parsed.get(function_id, task_type) is not task_type:
                raise InvalidInput(f"function {function_id!r} is listed with two types")
            parsed[function_id] = task_type
        return parsed

    def _backend_channel_ids(self, channels: list[str] | None) -> frozenset[str] | None:
        me = self.node.node_id
        if channels is None:
            if not any(
                has_role(self.node, c, me, Role.PROVIDE_TASKS)
                for c in self.node.membership.active_channels()
            ):
                raise NotPermitted(
                    "this node lacks role provideTasks in every channel it is in: ask a channel"
                    " admin for it (kachery-node channel set-roles)"
                )
            return None
        if not isinstance(channels, list):
            raise InvalidInput("channels must be a list of channel names")
        ids = set()
        for name in channels:
            channel = self.node.membership.resolve(str(name))
            if not has_role(self.node, channel, me, Role.PROVIDE_TASKS):
                raise NotPermitted(f"this node lacks role provideTasks in channel {name}")
            ids.add(channel)
        return frozenset(ids)

    @exposed
    async def task_backend_listen(
        self,
        functions: list[dict[str, Any]],
        channels: list[str] | None = None,
        slots: int = DEFAULT_BACKEND_SLOTS,
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Serve task functions from a worker process: streams the jobs given to it.

        The first event is ``{"event": "registered", "backendId": ...}``; then one
        ``{"event": "job", "jobId", "functionId", "taskType", "taskId", "requestId", "kwargs"}``
        per job, at most ``slots`` unfinished at once; report each with ``task_backend_report``.
        Closing the stream (the worker exits or dies) hands its jobs to other workers.
        """
        parsed = self._backend_functions(functions)
        channel_ids = self._backend_channel_ids(channels)
        if not isinstance(slots, int) or not 1 <= slots <= MAX_BACKEND_SLOTS:
            raise InvalidInput(f"slots must be 1..{MAX_BACKEND_SLOTS}")
        backend_id = "b" + os.urandom(8).hex()
        send, receive = trio.open_memory_channel[dict[str, Any]](slots * 2)
        self.provider.book.add_backend(backend_id, parsed, channels=channel_ids, slots=slots)
        self.provider.backend_channels[backend_id] = send
        log.info("worker %s serves %s", backend_id, ", ".join(parsed))
        self.providers_updated()
        self.provider.dispatch()
        try:
            yield {
                "event": "registered",
                "backendId": backend_id,
                "nodeId": self.node.node_id,
                "functions": {f: str(t) for f, t in parsed.items()},
                "channels": None
                if channel_ids is None
                else sorted(self.node.membership.name_of(c) for c in channel_ids),
            }
            async with receive:
                async for job in receive:
                    yield job
        finally:
            self._remove_backend(backend_id)

    def _remove_backend(self, backend_id: str) -> None:
        """A worker's stream closed: requeue, hand back or lose its jobs (synchronous: it runs
        in the ``finally`` of a cancelled stream)."""
        send = self.provider.backend_channels.pop(backend_id, None)
        if send is not None:
            send.close()
        loss = self.provider.book.remove_backend(backend_id)
        log.info(
            "worker %s went away: %d jobs requeued, %d handed back, %d actions lost",
            backend_id,
            len(loss.requeued),
            len(loss.released),
            len(loss.lost),
        )
        for job in loss.requeued:
            self.provider.send_updates(job)
        for job in loss.released:
            job.error = "its worker went away and no other worker here serves it"
            self.provider.handed_back(job)
        for job in loss.lost:
            spawn_guarded(self.node, self._lose_action, job)
        self.providers_updated()
        self.provider.dispatch()

    async def _lose_action(self, job: Job) -> None:
        spec = job.spec
        message = (
            "outcome unknown: the worker went away while the action ran; it will not run again"
            " under this request ID"
        )
        await self.node.run_sync(
            self.store.mark_action, spec.requester, spec.request_id, "error", message
        )
        if job.job_id in self.provider.book.jobs:
            self.provider.complete(job, TaskStatus.ERROR, error=message)

    @exposed
    async def task_backend_report(
        self,
        backend_id: str,
        job_id: str,
        status: str,
        error: str | None = None,
        result_uri: str | None = None,
        result_kind: str | None = None,
        result_data: str | None = None,
    ) -> dict[str, Any]:
        """A worker's report that a job finished (with its stored result) or failed."""
        report = {
            "job_id": job_id,
            "status": status,
            "error": error,
            "result_uri": result_uri,
            "result_kind": result_kind,
            "result_data": result_data,
        }
        (outcome,) = await self._settle_reports(backend_id, [report])
        if isinstance(outcome, KacheryError):
            raise outcome
        return {"status": str(outcome)}

    @exposed
    async def task_backend_reports(
        self, backend_id: str, reports: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Several reports at once, each an object of ``task_backend_report``'s arguments
        (``job_id``, ``status``, ``error``, ``result_uri``, ``result_kind``, ``result_data``);
        their results are recorded in one transaction. Answers each, in order: ``{"jobId",
        "status"}``, or ``{"jobId", "error": {"type", "message"}}``."""
        if not isinstance(reports, list) or not all(isinstance(r, dict) for r in reports):
            raise InvalidInput("reports must be a list of objects")
        outcomes = await self._settle_reports(backend_id, reports)
        return [
            {"jobId": r.get("job_id"), "status": str(o)}
            if not isinstance(o, KacheryError)
            else {"jobId": r.get("job_id"), "error": {"type": type(o).__name__, "message": str(o)}}
            for r, o in zip(reports, outcomes, strict=True)
        ]

    async def _settle_reports(
        self, backend_id: str, reports: list[dict[str, Any]]
    ) -> list[TaskStatus | KacheryError]:
        """Check each report, record the results and actions they bring, then complete their
        jobs (a job completes even if recording failed, as its worker is done with it)."""
        outcomes: list[TaskStatus | KacheryError] = []
        taken: list[tuple[Job, Outcome]] = []
        for report in reports:
            try:
                checked = await self._check_report(backend_id, report)
            except KacheryError as exc:
                outcomes.append(exc)
                continue
            checked[0].reporting = True
            taken.append(checked)
            outcomes.append(checked[1].status)
        failure: KacheryError | None = None
        try:
            await self._record_outcomes(taken)
        except KacheryError as exc:
            failure = exc
        finally:
            for job, outcome in taken:
                if job.job_id in self.provider.book.jobs:
                    self.provider.complete(
                        job,
                        outcome.status,
                        error=outcome.error,
                        result_uri=outcome.uri,
                        result_kind=outcome.kind,
                        result_size=outcome.size,
                        result_data=outcome.data,
                    )
        if failure is not None:
            outcomes = [failure if isinstance(o, TaskStatus) else o for o in outcomes]
        return outcomes

    async def _check_report(self, backend_id: str, report: dict[str, Any]) -> tuple[Job, Outcome]:
        job_id, status = report.get("job_id"), report.get("status")
        job = self.provider.book.jobs.get(str(job_id))
        if job is None or job.backend != backend_id or job.reporting:
            raise NotFound(f"no job {job_id} runs on worker {backend_id} (handed back or over)")
        outcome = TaskStatus(status) if status in ("finished", "error") else None
        if outcome is None:
            raise InvalidInput(f"a job reports finished or error, not {status!r}")
        if outcome is TaskStatus.ERROR:
            return job, Outcome(outcome, error=clip_error(str(report.get("error") or "failed")))
        if job.spec.task_type is TaskType.ACTION:
            return job, Outcome(outcome)
        result_uri, result_kind = report.get("result_uri"), report.get("result_kind")
        if not isinstance(result_uri, str) or not isinstance(result_kind, str):
            raise InvalidInput("a finished job reports its resultUri and resultKind")
        parsed = parse_file_uri(result_uri)
        if result_kind not in ResultKind.__members__.values():
            raise InvalidInput(f"unknown result kind {result_kind!r}")
        found: tuple[int, bytes | None] | None = self._inline_report(
            parsed.sha1, report.get("result_data")
        )
        if found is None:
            found = await self.node.run_sync(
                functools.partial(self.results.read_result_file, str(parsed), inline=True)
            )
        if found is None:
            raise NotFound(f"the result {result_uri} is not in this node's store")
        size, data = found
        return job, Outcome(
            outcome, uri=str(parsed), kind=ResultKind(result_kind), size=size, data=data
        )

    def _inline_report(self, sha1: str, encoded: object) -> tuple[int, bytes] | None:
        """A small result's bytes as the worker sent them with its report (base64), if they
        match the URI; None to read them from the store instead."""
        if not isinstance(encoded, str):
            return None
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise InvalidInput("resultData is not base64") from None
        if not is_inline_result(data, sha1):
            raise InvalidInput(f"resultData does not match the result's URI sha1://{sha1}")
        return len(data), data

    async def _record_outcomes(self, taken: list[tuple[Job, Outcome]]) -> None:
        """Mark the actions; record the results, in one transaction."""
        records = []
        for job, outcome in taken:
            spec = job.spec
            if spec.task_type is TaskType.ACTION:
                await self.node.run_sync(
                    self.store.mark_action,
                    spec.requester,
                    spec.request_id,
                    str(outcome.status),
                    outcome.error,
                )
            elif outcome.uri is not None and outcome.kind is not None:
                records.append(
                    TaskResult(
                        task_id=spec.task_id,
                        kwargs_digest=spec.kwargs_digest,
                        task_type=str(spec.task_type),
                        function_id=spec.function_id,
                        result_uri=outcome.uri,
                        result_kind=str(outcome.kind),
                        source=self.node.node_id,
                        finished_at=time.time(),
                        result_data=outcome.data,
                    )
                )
        if records:
            await self.node.run_sync(self.store.save_results, records)
            for record in records:
                self.results.note(record)
