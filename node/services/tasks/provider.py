"""Providing tasks: the jobs this node runs for requesters, and what each requester hears.

A ``TaskRequest`` joins (or creates) the job for its task in the ``JobBook``: one job per pure
calculation (by exact arguments, whoever asks), one per query or action request. A new job is
first prepared (a pure calculation already held here is answered at once; an action is recorded
in the database before anything else, and a duplicate delivery is answered from that record),
then queued until a worker (backends.py) has a free slot, then sent down that worker's stream.
Status changes and lease renewals (every third of the lease) go to requesters in batches, one
frame per peer per flush; a waiter on this node hears them at once (``local_update``).

Non-goals: the book itself (kachery.protocol.task_jobs), the workers (backends.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from kachery.node.changes import Doorbell
from kachery.node.daemon.peer import PeerConnection
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.services.host import Host
from kachery.node.services.tasks.common import (
    LEASE_SECONDS,
    RENEWALS_PER_LEASE,
    TaskStats,
    has_role,
    log,
    spawn_guarded,
)
from kachery.node.services.tasks.results import ResultCache
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput
from kachery.protocol.messages import Message
from kachery.protocol.task_jobs import Job, JobBook, Waiter
from kachery.protocol.tasks import (
    MAX_UPDATES_PER_MESSAGE,
    MAX_WAITING_PER_REQUESTER,
    ResultKind,
    StatusUpdate,
    TaskCancel,
    TaskLookup,
    TaskLookupResponse,
    TaskRequest,
    TaskRequestResponse,
    TaskSpec,
    TaskStatus,
    TaskStatusBatch,
    TaskType,
)
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskStore


class TaskProvider:
    """The jobs this node runs, and their waiters."""

    def __init__(
        self,
        node: Host,
        store: TaskStore,
        results: ResultCache,
        stats: TaskStats,
        local_update: Callable[[str, StatusUpdate, int], None],
        *,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.node = node
        self.store = store
        self.results = results
        self.stats = stats
        self.local_update = local_update
        """Gives news of a job to a request made on this node (the requester's)."""
        self.lease_seconds = lease_seconds
        self.book = JobBook()
        self.backend_channels: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        """The stream of jobs to each worker (backends.py opens and closes them)."""
        self._prepared: dict[str, trio.Event] = {}
        self._outbox: dict[str, dict[tuple[str, str], StatusUpdate]] = {}
        self._outbox_ready = Doorbell()

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.lease_seconds * 1000))

    def _require_provide(self, channel: str) -> None:
        if not has_role(self.node, channel, self.node.node_id, Role.PROVIDE_TASKS):
            name = self.node.membership.name_of(channel)
            raise NotPermitted(f"this node does not provide tasks in channel {name}")

    async def on_task_request(self, conn: PeerConnection, msg: TaskRequest) -> Message:
        self._require_provide(msg.channel)
        if self.book.waiting[conn.node_id] >= MAX_WAITING_PER_REQUESTER:
            raise Unavailable(
                f"{MAX_WAITING_PER_REQUESTER} requests of node {conn.node_id[:16]}... are waiting"
                " on tasks here already; retry when some have ended"
            )
        spec = TaskSpec.create(
            msg.function_id,
            msg.kwargs,
            msg.task_type,
            request_id=msg.request_id,
            requester=conn.node_id,
        )
        if spec.task_id != msg.task_id:
            raise InvalidInput(
                f"the task ID {msg.task_id} does not match {spec.function_id} and its kwargs"
                f" (expected {spec.task_id})"
            )
        update = await self.submit(spec, Waiter(conn.node_id, spec.request_id, msg.channel))
        return TaskRequestResponse(
            id=msg.id,
            status=str(update.status),
            lease_ms=self.lease_ms,
            error=update.error,
            result_uri=update.result_uri,
            result_kind=None if update.result_kind is None else str(update.result_kind),
            result_size=update.result_size,
            result_data=update.result_data,
        )

    async def submit(self, spec: TaskSpec, waiter: Waiter) -> StatusUpdate:
        """Join ``waiter`` to the job for ``spec`` (creating and preparing it if new); returns
        the job's state for that waiter.

        Raises:
            NotFound: no worker here serves the function in the waiter's channel.
            InvalidInput: it is served as another type of task.
        """
        served = self.book.serves(spec.function_id, waiter.channel)
        if served is None:
            raise NotFound(
                f"node {self.node.node_id[:16]}... does not serve task function"
                f" {spec.function_id!r} in channel {self.node.membership.name_of(waiter.channel)}"
            )
        if served is not spec.task_type:
            raise InvalidInput(
                f"task function {spec.function_id!r} is a {served} on node"
                f" {self.node.node_id[:16]}..., not a {spec.task_type}: request it as a {served}"
            )
        job, created = self.book.join(spec, waiter)
        if created:
            ready = self._prepared[job.job_id] = trio.Event()
            try:
                await self._prepare(job)
            except BaseException:
                if job.job_id in self.book.jobs and not job.queued:
                    self.complete(job, TaskStatus.ERROR, error="the provider failed to take it")
                raise
            finally:
                ready.set()
                del self._prepared[job.job_id]
        else:
            ready_event = self._prepared.get(job.job_id)
            if ready_event is not None:
                await ready_event.wait()
        return job.update_for(waiter.request_id)

    async def _prepare(self, job: Job) -> None:
        """Answer a new job from the cache or the action ledger, or queue it for a worker."""
        spec = job.spec
        if spec.task_type is TaskType.PURE:
            held = await self.results.held(
                spec.task_id, spec.kwargs_digest, TaskType.PURE, inline=True
            )
            if held is not None:
                record, size, data = held
                self.stats.jobs_answered_from_cache += 1
                self.complete(
                    job,
                    TaskStatus.FINISHED,
                    result_uri=record.result_uri,
                    result_kind=ResultKind(record.result_kind),
                    result_size=size,
                    result_data=data,
                )
                return
        elif spec.task_type is TaskType.ACTION:
            ledger, created = await self.node.run_sync(
                self.store.accept_action,
                spec.requester,
                spec.request_id,
                spec.function_id,
                spec.kwargs_digest,
            )
            if not created and (
                ledger.kwargs_digest != spec.kwargs_digest or ledger.function_id != spec.function_id
            ):
                self.complete(
                    job,
                    TaskStatus.ERROR,
                    error=f"request ID {spec.request_id} was already used for another action"
                    f" ({ledger.function_id}): choose a new one",
                )
                return
            if ledger.status == "finished":
                self.complete(job, TaskStatus.FINISHED)
                return
            if ledger.status == "error":
                self.complete(job, TaskStatus.ERROR, error=ledger.error or "the action failed")
                return
            if ledger.status == "running":
                self.complete(
                    job,
                    TaskStatus.ERROR,
                    error="outcome unknown: this provider stopped while the action ran; it will"
                    " not run again under this request ID",
                )
                return
        self.book.enqueue(job)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand back what no worker here can run; give queued jobs to free worker slots."""
        for job in self.book.unservable():
            self.book.release(job)
            self.handed_back(job)
        for backend, job in self.book.assign():
            self.send_updates(job)
            if job.spec.task_type is TaskType.ACTION:
                spawn_guarded(self.node, self._start_action, backend.backend_id, job)
            else:
                self._deliver(backend.backend_id, job)

    async def _start_action(self, backend_id: str, job: Job) -> None:
        spec = job.spec
        await self.node.run_sync(self.store.mark_action, spec.requester, spec.request_id, "running")
        if job.job_id in self.book.jobs and job.backend == backend_id:
            self._deliver(backend_id, job)

    def _deliver(self, backend_id: str, job: Job) -> None:
        send = self.backend_channels.get(backend_id)
        if send is None:
            return
        spec = job.spec
        event = {
            "event": "job",
            "jobId": job.job_id,
            "functionId": spec.function_id,
            "taskType": str(spec.task_type),
            "taskId": spec.task_id,
            "requestId": spec.request_id,
            "kwargs": spec.kwargs,
        }
        try:
            send.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.warning("backend %s could not take job %s", backend_id, job.job_id)
            return
        job.delivered = True
        self.stats.jobs_run += 1

    def handed_back(self, job: Job) -> None:
        """Tell the waiters of a job this node gave up that it did not run it."""
        job.error = job.error or "the provider has no worker for it any more"
        self.send_updates(job)
        if job.spec.task_type is TaskType.ACTION:
            spec = job.spec
            spawn_guarded(
                self.node,
                self.node.run_sync,
                self.store.forget_action,
                spec.requester,
                spec.request_id,
            )

    def complete(
        self,
        job: Job,
        status: TaskStatus,
        *,
        error: str | None = None,
        result_uri: str | None = None,
        result_kind: ResultKind | None = None,
        result_size: int | None = None,
        result_data: bytes | None = None,
    ) -> None:
        self.book.complete(
            job.job_id,
            status,
            error=error,
            result_uri=result_uri,
            result_kind=result_kind,
            result_size=result_size,
            result_data=result_data,
        )
        self.send_updates(job)
        self.dispatch()

    def send_updates(self, job: Job) -> None:
        for waiter in list(job.waiters.values()):
            update = job.update_for(waiter.request_id)
            if waiter.node_id == self.node.node_id:
                self.local_update(self.node.node_id, update, self.lease_ms)
            else:
                self._outbox.setdefault(waiter.node_id, {})[(waiter.channel, waiter.request_id)] = (
                    update
                )
                self._outbox_ready.ring()

    async def flush_updates(self) -> None:
        """Send queued status updates: one frame per peer and channel per flush (coalesced)."""
        while True:
            await self._outbox_ready.wait()
            outbox, self._outbox = self._outbox, {}
            for node_id, updates in outbox.items():
                conn = self.node.connections.get(node_id)
                if conn is None:
                    continue
                by_channel: dict[str, list[dict[str, Any]]] = {}
                for (channel, _), update in updates.items():
                    by_channel.setdefault(channel, []).append(update.to_wire())
                for channel, wires in by_channel.items():
                    for at in range(0, len(wires), MAX_UPDATES_PER_MESSAGE):
                        batch = TaskStatusBatch(
                            channel=channel,
                            lease_ms=self.lease_ms,
                            updates=wires[at : at + MAX_UPDATES_PER_MESSAGE],
                        )
                        conn.send_quietly(batch)

    async def renew_leases(self) -> None:
        """Every third of the lease, re-send the state of every job still queued or running."""
        while True:
            await trio.sleep(self.lease_seconds / RENEWALS_PER_LEASE)
            for job in list(self.book.jobs.values()):
                if job.queued or job.status is TaskStatus.RUNNING:
                    self.send_updates(job)

    async def on_cancel(self, conn: PeerConnection, msg: TaskCancel) -> None:
        self.book.leave(conn.node_id, msg.request_id)

    async def on_lookup(self, conn: PeerConnection, msg: TaskLookup) -> TaskLookupResponse:
        # A holder that may not serve files could not hand the result over: it says no.
        if not has_role(self.node, msg.channel, self.node.node_id, Role.PROVIDE_FILES):
            return TaskLookupResponse(id=msg.id, found=False)
        held = await self.results.held(msg.task_id, msg.kwargs_digest, msg.task_type, inline=True)
        if held is None:
            return TaskLookupResponse(id=msg.id, found=False)
        record, size, data = held
        self.stats.lookups_answered += 1
        return TaskLookupResponse(
            id=msg.id,
            found=True,
            result_uri=record.result_uri,
            result_kind=record.result_kind,
            result_size=size,
            finished_at=int(record.finished_at * 1000),
            result_data=data,
        )
