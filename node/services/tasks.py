"""The task service: requesting tasks across a channel, and providing them through local workers.

Providing. A worker process (``kn.run_task_backend``) opens the streaming API method
``task_backend_listen`` with the functions it serves; the service adds it to its ``JobBook`` and
announces the functions to its channel peers (``TaskProviders``, on every new session and
whenever workers come or go). A ``TaskRequest`` joins (or creates) the job for its task: one job
per pure calculation (by exact arguments, whoever asks), one per query or action request. A new
job is first prepared (a pure calculation already cached here is answered at once; an action is
recorded in the database before anything else, and a duplicate delivery is answered from that
record), then queued until a worker has a free slot, then sent down that worker's stream. The
worker stores the result as a file in this node's store and reports it (``task_backend_report``);
the result's record is committed before any requester hears of it. Status changes and lease
renewals (every third of the lease) go to requesters in batches, one frame per peer per flush.
When a worker's stream closes (it exited, crashed, or was killed), its jobs go to another local
worker or are handed back, so requesters ask another provider; an action the worker had received
ends in an error saying its outcome is unknown (it may have run: it never runs twice).

Requesting. ``request`` checks the arguments, answers a pure calculation cached here at once,
and otherwise runs the request in the background: ask the members likely to hold the result
whether they do (``TaskLookup``; fetch it with the chunk exchange), else ask the provider that
rendezvous hashing ranks first among those that announced the function, and follow its lease.
The likely holders are the other providers of the function, which computed its results; the
first-ranked one answers from its own cache when asked to run the task, and when no provider is
online every member is asked, since one of them may have fetched the result earlier. A provider
that refuses, hands the task back, goes silent for a lease or loses its session is given up on
until it changes (reconnects, or its workers change), and the next is asked; an action sticks to
the provider that may hold it. A finished result is kept here with its record (a small one, which
came inline, in the record itself; a larger file fetched into this node's store), so this node
answers lookups from other members later, even when the provider is offline. A query that no
provider answers within its timeout returns its last result, marked as a fallback.

Non-goals: the wire format and the decisions (kachery.protocol.tasks), SQL
(kachery.storage.tasks), running the functions (kachery.node.client.tasks, in the worker).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import trio

from kachery.node.changes import Changes, Doorbell
from kachery.node.daemon.boundary import PerPeerSlots
from kachery.node.daemon.peer import PeerConnection, RequestFailed
from kachery.node.errors import NotPermitted, Unavailable
from kachery.node.localapi.methods import StreamResult, exposed
from kachery.node.services.files.service import FileService
from kachery.protocol.channel import Role
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.files import MAX_GET_BYTES
from kachery.protocol.messages import ErrorCode, Message
from kachery.protocol.task_jobs import Job, JobBook, Waiter
from kachery.protocol.tasks import (
    INLINE_RESULT_BYTES,
    MAX_UPDATES_PER_MESSAGE,
    MAX_WAITING_PER_REQUESTER,
    Candidate,
    Lease,
    Marker,
    ResultKind,
    StatusUpdate,
    TaskCancel,
    TaskLookup,
    TaskLookupResponse,
    TaskProviders,
    TaskRequest,
    TaskRequestResponse,
    TaskSpec,
    TaskStatus,
    TaskStatusBatch,
    TaskType,
    advance,
    check_function_id,
    choose_provider,
    clip_error,
    is_inline_result,
    parse_task_type,
)
from kachery.protocol.uri import ChunkOf, FileURI, parse_file_uri
from kachery.storage.errors import NotFound
from kachery.storage.tasks import TaskResult, TaskStore

if TYPE_CHECKING:
    from kachery.node.services.host import Host

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
"""A provider's lease on a task it took: renewed every third of it while the task is queued or
running; a requester that hears nothing for this long asks another provider. Shorter than the
session keepalive (45 s), so a hung provider is noticed before its session is."""

RENEWALS_PER_LEASE = 3
"""Renewals sent per lease period: two may be lost before a lease lapses."""

NO_PROVIDER_SECONDS = 10.0
"""How long a request waits for any member to serve its function before it fails: sessions and
announcements arrive within a second of start-up, and a restarted worker re-announces at once."""

DEFAULT_TIMEOUTS = {
    TaskType.PURE: 3600.0,
    TaskType.QUERY: 30.0,
    TaskType.ACTION: 300.0,
}
"""Seconds a request may take by default: calculations can be long (the lease, not the timeout,
detects a dead provider); a query falls back to its last result quickly; an action in between."""

MAX_TIMEOUT = 7 * 24 * 3600.0
"""Longest timeout accepted (a week)."""

RETRY_SECONDS = 1.0
"""A provider given up on without a change (busy, silent) is asked again after this, doubling
with each failure up to RETRY_MAX_SECONDS."""

RETRY_MAX_SECONDS = 30.0

LOOKUP_SECONDS = 2.0
"""How long to wait for members to say whether they hold a result: past that, running the task
is the better bet."""

REQUESTS_PER_PEER = 32
"""Task requests and lookups in flight to one peer (it answers at most 64 requests at once)."""

FETCHES_AT_ONCE = 16
"""Result files fetched at once (each asks every peer who has it)."""

KEPT_REQUESTS = 10_000
"""Finished requests remembered for ``task status`` and ``task list`` (results stay cached in
the database regardless)."""

KEPT_ENDED_REQUESTS = 1000
"""Ended requests whose final state is kept in the database, so ``task status``, ``task wait``
and ``task list`` still know them after the daemon restarts."""

KEEP_ENDED_SECONDS = 1.0
"""Ended requests' states are written at most this long after they end, all that ended meanwhile
in one transaction (and at exit): one write per request cost the requester daemon ~0.5 ms of CPU
each and added ~0.8 ms to a cached request's p50 in ``scripts/bench/tasks``."""

MIN_ID_PREFIX = 8
"""The fewest leading characters of a request or task ID that ``task_status`` takes for it."""

DEFAULT_BACKEND_SLOTS = 4
"""Jobs a worker runs at once unless it says otherwise."""

MAX_BACKEND_SLOTS = 256


class _GaveUp(Exception):
    """No provider could be found or kept: the request ends (or falls back to a last result)."""


@dataclass(slots=True)
class _Attempt:
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
class _Request:
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
    attempt: _Attempt | None = None
    failed: dict[str, tuple[Marker, float]] = field(default_factory=dict)
    """Providers given up on: their marker then, and when they may be asked regardless."""
    failures: dict[str, int] = field(default_factory=dict)
    sticky: str | None = None
    did_not_run: bool = False
    """An action's provider handed it back unrun (rather than being lost with it)."""
    reasons: list[str] = field(default_factory=list)
    on_end: Callable[[_Request], None] | None = None
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


@dataclass(slots=True)
class _Announced:
    """What a peer last announced in a channel."""

    conn: PeerConnection
    serial: int
    generation: int
    functions: dict[str, TaskType]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A worker's report on one job, checked: how it ended, and its result."""

    status: TaskStatus
    error: str | None = None
    uri: str | None = None
    kind: ResultKind | None = None
    size: int | None = None
    data: bytes | None = None


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    cache_hits: int = 0
    lookup_hits: int = 0
    provider_cache_hits: int = 0
    """Pure calculations answered from the cache of the provider asked to run them."""
    computed: int = 0
    fallbacks: int = 0
    errors: int = 0
    jobs_run: int = 0
    jobs_answered_from_cache: int = 0
    lookups_answered: int = 0
    results_inline: int = 0
    """Results that arrived inside the provider's (or holder's) message."""
    results_fetched: int = 0
    """Results fetched with the chunk exchange (over INLINE_RESULT_BYTES)."""


class TaskService:
    """Tasks for one node: the requester and the provider sides (see the module docstring).

    Args:
        node: the node.
        lease_seconds: the lease this node holds on tasks it takes (tests shorten it).
    """

    name = "tasks"

    def __init__(
        self, node: Host, files: FileService, *, lease_seconds: float = LEASE_SECONDS
    ) -> None:
        self.node = node
        self._files = files
        self.store = TaskStore(node.home.database)
        self.lease_seconds = lease_seconds
        self.no_provider_seconds = NO_PROVIDER_SECONDS
        self.book = JobBook()
        self.stats = _Stats()
        self._nursery: trio.Nursery | None = None
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._ended_queue: list[tuple[str, str, float, str]] = []
        self._keeping_ended = False
        self._prepared: dict[str, trio.Event] = {}
        self._backend_channels: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._outbox: dict[str, dict[tuple[str, str], StatusUpdate]] = {}
        self._outbox_ready = Doorbell()
        self._remote: dict[tuple[str, str], _Announced] = {}
        self._announced: dict[PeerConnection, dict[str, tuple[int, dict[str, str]]]] = {}
        self._serials: dict[PeerConnection, int] = {}
        self._next_serial = 1
        self._providers_changed = Changes()
        self._peer_slots = PerPeerSlots(REQUESTS_PER_PEER)
        self._fetches = trio.Semaphore(FETCHES_AT_ONCE)
        self._held_keys: set[tuple[str, str, str]] | None = None
        """Results recorded here (None until loaded): most lookups are for tasks never
        computed here, and this answers them without a query."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce, flush status updates and renew leases until cancelled."""
        self._held_keys = await self.node.run_sync(self.store.result_keys)
        self._files.kept_elsewhere.append(self._kept_bytes)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_sessions)
                nursery.start_soon(self._flush_updates)
                nursery.start_soon(self._renew_leases)
                task_status.started()
        finally:
            self._keep_last_ended()

    def _keep_last_ended(self) -> None:
        """At exit: keep the final states that ended too late for ``_keep_ended`` (a short
        blocking write; the node is stopping)."""
        batch, self._ended_queue = self._ended_queue, []
        if batch:
            self._write_ended(batch)

    def _write_ended(self, batch: list[tuple[str, str, float, str]]) -> None:
        """Keep final states (blocking); a failure is logged: only their history is lost."""
        try:
            self.store.record_ended_requests(batch, keep=KEPT_ENDED_REQUESTS)
        except KacheryError as exc:
            log.warning("could not keep the final state of %d task requests: %s", len(batch), exc)

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the task service is not running"
        return self._nursery

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``fn(*args)`` in the service's nursery; a KacheryError it raises (a database or
        session failure) is logged, never allowed to take the node down."""

        async def guarded() -> None:
            try:
                await fn(*args)
            except KacheryError as exc:
                log.warning("task service: %s failed: %s", getattr(fn, "__name__", fn), exc)

        self.nursery.start_soon(guarded)

    @property
    def lease_ms(self) -> int:
        return max(1, round(self.lease_seconds * 1000))

    async def _kept_bytes(self, sha1: str) -> bytes | None:
        """A small result's bytes kept in its record (so `load` of its URI works here)."""
        return await self.node.run_sync(self.store.kept_bytes, sha1)

    def _name(self, channel: str) -> str:
        return self.node.membership.name_of(channel)

    def _has_role(self, channel: str, node_id: str, role: Role) -> bool:
        return role in self.node.membership.roles_of(channel, node_id)

    # == providing ==============================================================================

    def _require_provide(self, channel: str) -> None:
        if not self._has_role(channel, self.node.node_id, Role.PROVIDE_TASKS):
            raise NotPermitted(f"this node does not provide tasks in channel {self._name(channel)}")

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
        update = await self._submit(spec, Waiter(conn.node_id, spec.request_id, msg.channel))
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

    async def _submit(self, spec: TaskSpec, waiter: Waiter) -> StatusUpdate:
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
                f" {spec.function_id!r} in channel {self._name(waiter.channel)}"
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
                    self._complete(job, TaskStatus.ERROR, error="the provider failed to take it")
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
            held = await self._held(spec.task_id, spec.kwargs_digest, TaskType.PURE, inline=True)
            if held is not None:
                record, size, data = held
                self.stats.jobs_answered_from_cache += 1
                self._complete(
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
                self._complete(
                    job,
                    TaskStatus.ERROR,
                    error=f"request ID {spec.request_id} was already used for another action"
                    f" ({ledger.function_id}): choose a new one",
                )
                return
            if ledger.status == "finished":
                self._complete(job, TaskStatus.FINISHED)
                return
            if ledger.status == "error":
                self._complete(job, TaskStatus.ERROR, error=ledger.error or "the action failed")
                return
            if ledger.status == "running":
                self._complete(
                    job,
                    TaskStatus.ERROR,
                    error="outcome unknown: this provider stopped while the action ran; it will"
                    " not run again under this request ID",
                )
                return
        self.book.enqueue(job)
        self._dispatch()

    async def _held(
        self, task_id: str, kwargs_digest: str, task_type: str, *, inline: bool = False
    ) -> tuple[TaskResult, int, bytes | None] | None:
        """The result recorded here, its size, and its bytes if its row keeps them (or, with
        ``inline``, to send it, if its file is small enough to travel inline); None unless its
        bytes are still here and still match its URI."""
        key = (task_id, kwargs_digest, str(task_type))
        if self._held_keys is not None and key not in self._held_keys:
            return None
        held = await self.node.run_sync(
            self._read_held, task_id, kwargs_digest, str(task_type), inline
        )
        if held is None and self._held_keys is not None:
            self._held_keys.discard(key)
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
        found = self._read_result_file(record.result_uri, inline=inline)
        if found is None:  # removed from the store (verify --remove): forget the record too
            self.store.forget_result(task_id, kwargs_digest, task_type)
            return None
        return record, *found

    def _read_result_file(self, uri: str, *, inline: bool) -> tuple[int, bytes | None] | None:
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

    async def _save_result(self, record: TaskResult) -> None:
        await self.node.run_sync(self.store.save_result, record)
        self._note_held(record)

    def _note_held(self, record: TaskResult) -> None:
        if self._held_keys is not None:
            self._held_keys.add((record.task_id, record.kwargs_digest, record.task_type))

    def _dispatch(self) -> None:
        """Hand back what no worker here can run; give queued jobs to free worker slots."""
        for job in self.book.unservable():
            self.book.release(job)
            self._handed_back(job)
        for backend, job in self.book.assign():
            self._send_updates(job)
            if job.spec.task_type is TaskType.ACTION:
                self._spawn(self._start_action, backend.backend_id, job)
            else:
                self._deliver(backend.backend_id, job)

    async def _start_action(self, backend_id: str, job: Job) -> None:
        spec = job.spec
        await self.node.run_sync(self.store.mark_action, spec.requester, spec.request_id, "running")
        if job.job_id in self.book.jobs and job.backend == backend_id:
            self._deliver(backend_id, job)

    def _deliver(self, backend_id: str, job: Job) -> None:
        send = self._backend_channels.get(backend_id)
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

    def _handed_back(self, job: Job) -> None:
        """Tell the waiters of a job this node gave up that it did not run it."""
        job.error = job.error or "the provider has no worker for it any more"
        self._send_updates(job)
        if job.spec.task_type is TaskType.ACTION:
            spec = job.spec
            self._spawn(
                self.node.run_sync, self.store.forget_action, spec.requester, spec.request_id
            )

    def _complete(
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
        self._send_updates(job)
        self._dispatch()

    # -- status updates to requesters ----------------------------------------------------------

    def _send_updates(self, job: Job) -> None:
        for waiter in list(job.waiters.values()):
            update = job.update_for(waiter.request_id)
            if waiter.node_id == self.node.node_id:
                self._apply_update(self.node.node_id, update, self.lease_ms)
            else:
                self._outbox.setdefault(waiter.node_id, {})[(waiter.channel, waiter.request_id)] = (
                    update
                )
                self._outbox_ready.ring()

    async def _flush_updates(self) -> None:
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
                        await conn.send_quietly(batch)

    async def _renew_leases(self) -> None:
        """Every third of the lease, re-send the state of every job still queued or running."""
        while True:
            await trio.sleep(self.lease_seconds / RENEWALS_PER_LEASE)
            for job in list(self.book.jobs.values()):
                if job.queued or job.status is TaskStatus.RUNNING:
                    self._send_updates(job)

    async def on_cancel(self, conn: PeerConnection, msg: TaskCancel) -> None:
        self.book.leave(conn.node_id, msg.request_id)

    # -- lookups -------------------------------------------------------------------------------

    async def on_lookup(self, conn: PeerConnection, msg: TaskLookup) -> TaskLookupResponse:
        # A holder that may not serve files could not hand the result over: it says no.
        if not self._has_role(msg.channel, self.node.node_id, Role.PROVIDE_FILES):
            return TaskLookupResponse(id=msg.id, found=False)
        held = await self._held(msg.task_id, msg.kwargs_digest, msg.task_type, inline=True)
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

    # -- workers (backends) --------------------------------------------------------------------

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
                self._has_role(c, me, Role.PROVIDE_TASKS)
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
            if not self._has_role(channel, me, Role.PROVIDE_TASKS):
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
        self.book.add_backend(backend_id, parsed, channels=channel_ids, slots=slots)
        self._backend_channels[backend_id] = send
        log.info("worker %s serves %s", backend_id, ", ".join(parsed))
        self._providers_updated()
        self._dispatch()
        try:
            yield {
                "event": "registered",
                "backendId": backend_id,
                "nodeId": self.node.node_id,
                "functions": {f: str(t) for f, t in parsed.items()},
                "channels": None
                if channel_ids is None
                else sorted(self._name(c) for c in channel_ids),
            }
            async with receive:
                async for job in receive:
                    yield job
        finally:
            self._remove_backend(backend_id)

    def _remove_backend(self, backend_id: str) -> None:
        """A worker's stream closed: requeue, hand back or lose its jobs (synchronous: it runs
        in the ``finally`` of a cancelled stream)."""
        send = self._backend_channels.pop(backend_id, None)
        if send is not None:
            send.close()
        loss = self.book.remove_backend(backend_id)
        log.info(
            "worker %s went away: %d jobs requeued, %d handed back, %d actions lost",
            backend_id,
            len(loss.requeued),
            len(loss.released),
            len(loss.lost),
        )
        for job in loss.requeued:
            self._send_updates(job)
        for job in loss.released:
            job.error = "its worker went away and no other worker here serves it"
            self._handed_back(job)
        for job in loss.lost:
            self._spawn(self._lose_action, job)
        self._providers_updated()
        self._dispatch()

    async def _lose_action(self, job: Job) -> None:
        spec = job.spec
        message = (
            "outcome unknown: the worker went away while the action ran; it will not run again"
            " under this request ID"
        )
        await self.node.run_sync(
            self.store.mark_action, spec.requester, spec.request_id, "error", message
        )
        if job.job_id in self.book.jobs:
            self._complete(job, TaskStatus.ERROR, error=message)

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
        taken: list[tuple[Job, _Outcome]] = []
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
                if job.job_id in self.book.jobs:
                    self._complete(
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

    async def _check_report(self, backend_id: str, report: dict[str, Any]) -> tuple[Job, _Outcome]:
        job_id, status = report.get("job_id"), report.get("status")
        job = self.book.jobs.get(str(job_id))
        if job is None or job.backend != backend_id or job.reporting:
            raise NotFound(f"no job {job_id} runs on worker {backend_id} (handed back or over)")
        outcome = TaskStatus(status) if status in ("finished", "error") else None
        if outcome is None:
            raise InvalidInput(f"a job reports finished or error, not {status!r}")
        if outcome is TaskStatus.ERROR:
            return job, _Outcome(outcome, error=clip_error(str(report.get("error") or "failed")))
        if job.spec.task_type is TaskType.ACTION:
            return job, _Outcome(outcome)
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
                functools.partial(self._read_result_file, str(parsed), inline=True)
            )
        if found is None:
            raise NotFound(f"the result {result_uri} is not in this node's store")
        size, data = found
        return job, _Outcome(
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

    async def _record_outcomes(self, taken: list[tuple[Job, _Outcome]]) -> None:
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
                self._note_held(record)

    # -- announcing what this node serves ------------------------------------------------------

    def _providers_updated(self) -> None:
        self._providers_changed.notify()
        self.node.notify()

    def _session_state(self) -> tuple[Any, ...]:
        m = self.node.membership
        return (
            tuple((c, frozenset(c.channels)) for c in self.node.connections.values()),
            tuple((c, m.history(c).version) for c in m.channel_ids()),
            self.book.generation,
        )

    async def _watch_sessions(self) -> None:
        """On every change of sessions, membership or workers: announce what this node serves
        where it changed, forget announcements of ended sessions, wake requests."""
        while True:
            state = self._session_state()

            def changed(state: tuple[Any, ...] = state) -> bool:
                return self._session_state() != state

            await self._announce()
            self._forget_closed()
            self._providers_changed.notify()
            for req in list(self._requests.values()):
                if req.attempt is not None and not req.terminal:
                    req.wake()
            await self.node.wait_until(changed)

    async def _announce(self) -> None:
        me = self.node.node_id
        for conn in list(self.node.connections.values()):
            sent = self._announced.setdefault(conn, {})
            for channel in sorted(conn.channels):
                functions: dict[str, str] = {}
                if self._has_role(channel, me, Role.PROVIDE_TASKS):
                    functions = {f: str(t) for f, t in self.book.functions_in(channel).items()}
                state = (self.book.generation, functions)
                previous = sent.get(channel)
                if previous == state or (previous is None and not functions):
                    continue
                if previous is not None and previous[1] == functions == {}:
                    continue
                sent[channel] = state
                msg = TaskProviders(
                    channel=channel, generation=self.book.generation, functions=functions
                )
                await conn.send_quietly(msg)

    def _forget_closed(self) -> None:
        live = set(self.node.connections.values())
        for conn in [c for c in self._announced if c not in live]:
            del self._announced[conn]
        for conn in [c for c in self._serials if c not in live]:
            del self._serials[conn]
        for key in [k for k, a in self._remote.items() if a.conn not in live]:
            del self._remote[key]

    async def on_providers(self, conn: PeerConnection, msg: TaskProviders) -> None:
        if msg.channel not in conn.channels:
            return
        if not self._has_role(msg.channel, conn.node_id, Role.PROVIDE_TASKS) and msg.functions:
            log.debug("ignored task functions from %s...: it lacks provideTasks", conn.node_id[:16])
            return
        serial = self._serials.get(conn)
        if serial is None:
            serial = self._serials[conn] = self._next_serial
            self._next_serial += 1
        self._remote[(conn.node_id, msg.channel)] = _Announced(
            conn,
            serial,
            msg.generation,
            {f: TaskType(t) for f, t in msg.functions.items()},
        )
        self._providers_changed.notify()

    def _candidates(self, function_id: str, channels: list[str]) -> list[Candidate]:
        """Members that serve ``function_id`` in one of ``channels`` now (this node included)."""
        me = self.node.node_id
        found: dict[str, Candidate] = {}
        for channel in channels:
            if self._has_role(channel, me, Role.PROVIDE_TASKS):
                task_type = self.book.serves(function_id, channel)
                if task_type is not None:
                    found[me] = Candidate(me, channel, task_type, (0, self.book.generation))
                    break
        for (node_id, channel), announced in self._remote.items():
            if node_id in found or channel not in channels:
                continue
            conn = self.node.connections.get(node_id)
            if conn is not announced.conn or conn.closed.is_set() or channel not in conn.channels:
                continue
            if not self._has_role(channel, node_id, Role.PROVIDE_TASKS):
                continue
            task_type = announced.functions.get(function_id)
            if task_type is not None:
                marker = (announced.serial, announced.generation)
                found[node_id] = Candidate(node_id, channel, task_type, marker)
        return list(found.values())

    def _known_functions(self, channels: list[str]) -> list[str]:
        known: set[str] = set()
        for (_, channel), announced in self._remote.items():
            if channel in channels:
                known.update(announced.functions)
        for channel in channels:
            known.update(self.book.functions_in(channel))
        return sorted(known)

    # == requesting =============================================================================

    def _request_channels(self, channel: str | None) -> list[str]:
        m, me = self.node.membership, self.node.node_id
        if channel is not None:
            channel_id = m.resolve(channel)
            if not self._has_role(channel_id, me, Role.REQUEST_TASKS):
                raise NotPermitted(
                    f"not permitted: this node lacks role requestTasks in channel {channel}"
                )
            return [channel_id]
        found = [c for c in m.active_channels() if self._has_role(c, me, Role.REQUEST_TASKS)]
        if not found:
            raise NotPermitted(
                "not permitted: this node lacks role requestTasks in every channel it is in"
            )
        return sorted(found)

    async def request(
        self,
        function_id: str,
        kwargs: dict[str, Any] | None = None,
        task_type: str = TaskType.PURE,
        *,
        channel: str | None = None,
        timeout_seconds: float | None = None,
        request_id: str | None = None,
    ) -> _Request:
        """Start a request (or find the one ``request_id`` names); returns its state, already
        finished if this node holds the result of a pure calculation.

        Raises:
            InvalidInput: the function ID, type, kwargs, timeout or request ID is malformed, or
                the request ID names another request.
            NotPermitted: this node lacks requestTasks (in ``channel``, or everywhere).
            NotFound: no such channel.
        """
        spec = TaskSpec.create(
            function_id,
            {} if kwargs is None else kwargs,
            task_type,
            request_id=request_id or os.urandom(16).hex(),
            requester=self.node.node_id,
        )
        existing = self._requests.get(spec.request_id)
        if existing is not None:
            old = existing.spec
            if (old.function_id, old.task_type, old.kwargs_digest) != (
                spec.function_id,
                spec.task_type,
                spec.kwargs_digest,
            ):
                raise InvalidInput(
                    f"request ID {spec.request_id} already names a request of"
                    f" {old.function_id}: choose a new one"
                )
            if existing.status is not TaskStatus.ERROR:
                return existing  # still running, or finished: nothing to ask again
            # A failed request asked again is a retry: ask the provider again (an action's
            # provider answers from its durable record, so it still runs at most once).
        seconds = (
            DEFAULT_TIMEOUTS[spec.task_type] if timeout_seconds is None else float(timeout_seconds)
        )
        if not (0 < seconds <= MAX_TIMEOUT and math.isfinite(seconds)):
            raise InvalidInput(f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} s")
        channels = self._request_channels(channel)
        req = _Request(
            spec=spec,
            channels=channels,
            timeout=seconds,
            deadline=trio.current_time() + seconds,
            on_end=self._ended,
        )
        self._remember(req)
        self.stats.requests += 1
        if spec.task_type is TaskType.PURE:
            held = await self._held(spec.task_id, spec.kwargs_digest, TaskType.PURE)
            if held is not None:
                record, _, data = held
                self.stats.cache_hits += 1
                req.finish(
                    record.result_uri,
                    ResultKind(record.result_kind),
                    provider=record.source,
                    data=data,
                    cached=True,
                    note="cached on this node",
                )
                return req
        self.nursery.start_soon(self._run_request, req)
        return req

    def _remember(self, req: _Request) -> None:
        self._requests[req.spec.request_id] = req
        while len(self._requests) > KEPT_REQUESTS:
            oldest = next(iter(self._requests))
            if not self._requests[oldest].terminal:
                break
            del self._requests[oldest]

    def _ended(self, req: _Request) -> None:
        """A request ended: keep its final state in the database, in the background and in
        batches (KEEP_ENDED_SECONDS; a failure to keep it costs only its history, never its
        result)."""
        spec = req.spec
        state = json.dumps(req.snapshot(self._names(), data=True))
        self._ended_queue.append((spec.request_id, spec.task_id, req.updated_at, state))
        if not self._keeping_ended:
            try:
                self.nursery.start_soon(self._keep_ended)
            except RuntimeError:  # shutting down: its history is not kept
                return
            self._keeping_ended = True

    async def _keep_ended(self) -> None:
        try:
            await trio.sleep(KEEP_ENDED_SECONDS)  # let the requests ending meanwhile join in
            while self._ended_queue:
                batch, self._ended_queue = self._ended_queue, []
                await self.node.run_sync(self._write_ended, batch)
        finally:
            self._keeping_ended = False

    async def _ended_state(self, request_id: str) -> dict[str, Any] | None:
        """The kept final state of a request that ended here before (None if none is kept)."""
        state = await self.node.run_sync(self.store.ended_request, request_id)
        if state is None:
            return None
        loaded: dict[str, Any] = json.loads(state)
        return loaded

    async def _run_request(self, req: _Request) -> None:
        try:
            with trio.move_on_at(req.deadline):
                await self._drive(req)
            if not req.terminal:
                reason = f"timed out after {req.timeout:g} s"
                if req.attempt is None and not self._candidates(req.spec.function_id, req.channels):
                    reason += ": " + self._no_provider_message(req)
                await self._give_up(req, reason)
        except _GaveUp as exc:
            await self._give_up(req, str(exc))
        except KacheryError as exc:
            req.fail(str(exc))
        except Exception:
            log.exception("task request %s failed", req.spec.request_id)
            req.fail("internal error in the requesting node (its log has the details)")
        finally:
            self._withdraw(req)
            if req.status is TaskStatus.ERROR:
                self.stats.errors += 1

    async def _give_up(self, req: _Request, reason: str) -> None:
        """No provider answered in time: a query falls back to its last result; else an error."""
        detail = reason + ("; " + "; ".join(req.reasons[-5:]) if req.reasons else "")
        if req.spec.task_type is TaskType.QUERY:
            held = await self._held(req.spec.task_id, req.spec.kwargs_digest, TaskType.QUERY)
            if held is not None:
                record, _, data = held
                self.stats.fallbacks += 1
                req.finish(
                    record.result_uri,
                    ResultKind(record.result_kind),
                    provider=record.source,
                    data=data,
                    cached=True,
                    fallback=True,
                    note=f"fallback to the last result ({detail})",
                )
                return
        if req.spec.task_type is TaskType.ACTION and req.sticky is not None:
            if req.did_not_run:
                detail += "; the action did not run"
            else:
                detail += (
                    f"; its outcome is unknown: request it again with request ID"
                    f" {req.spec.request_id} to learn it from {req.sticky[:16]}..."
                )
        req.fail(detail)

    def _withdraw(self, req: _Request) -> None:
        """Stop following the current attempt: the provider need not keep us posted."""
        attempt, req.attempt = req.attempt, None
        if attempt is None or (attempt.lease is not None and attempt.lease.released):
            return
        if attempt.status.terminal:
            return
        if attempt.conn is None:
            self.book.leave(self.node.node_id, req.spec.request_id)
            return
        msg = TaskCancel(channel=attempt.candidate.channel, request_id=req.spec.request_id)
        self.nursery.start_soon(attempt.conn.send_quietly, msg)

    async def _drive(self, req: _Request) -> None:
        spec = req.spec
        if spec.task_type is TaskType.PURE:
            req.set(TaskStatus.WAITING, note="looking for a cached result in the channel")
            if await self._lookup(req):
                return
        no_provider_since: float | None = None
        while not req.terminal:
            now = trio.current_time()
            for node_id, (_, retry_at) in list(req.failed.items()):
                if now >= retry_at:
                    del req.failed[node_id]
            candidates = self._candidates(spec.function_id, req.channels)
            failed = {n: marker for n, (marker, _) in req.failed.items()}
            chosen = choose_provider(spec.route_key, candidates, failed, req.sticky)
            if chosen is None:
                wake_at = req.deadline
                if not candidates and req.sticky is None:
                    no_provider_since = now if no_provider_since is None else no_provider_since
                    give_up_at = no_provider_since + self.no_provider_seconds
                    if now >= give_up_at:
                        raise _GaveUp(self._no_provider_message(req))
                    wake_at = min(wake_at, give_up_at)
                    note = f"waiting for a member that serves {spec.function_id}"
                else:
                    no_provider_since = None
                    note = "waiting for a provider to become available"
                if req.failed:
                    wake_at = min(wake_at, *(t for _, t in req.failed.values()))
                req.set(TaskStatus.WAITING, note=note, provider=None)
                await self._providers_changed.wait(deadline=wake_at)
                continue
            no_provider_since = None
            if chosen.task_type is not spec.task_type:
                req.fail(
                    f"task function {spec.function_id!r} is served as a {chosen.task_type}, not a"
                    f" {spec.task_type}: request it with type {chosen.task_type}"
                )
                return
            reason = await self._attempt(req, chosen)
            if reason is None:
                return
            self._give_up_on(req, chosen, reason)

    def _give_up_on(self, req: _Request, chosen: Candidate, reason: str) -> None:
        node_id = chosen.node_id
        count = req.failures[node_id] = req.failures.get(node_id, 0) + 1
        retry = min(RETRY_MAX_SECONDS, RETRY_SECONDS * 2 ** (count - 1))
        req.failed[node_id] = (chosen.marker, trio.current_time() + retry)
        req.reasons.append(f"{node_id[:16]}...: {reason}")
        log.debug("task %s: gave up on %s...: %s", req.spec.request_id, node_id[:16], reason)
        attempt = req.attempt
        if (
            req.spec.task_type is TaskType.ACTION
            and attempt is not None
            and attempt.maybe_delivered
        ):
            req.sticky = node_id
            req.did_not_run = attempt.lease is not None and attempt.lease.released
        self._withdraw(req)

    def _no_provider_message(self, req: _Request) -> str:
        spec = req.spec
        names = ", ".join(self._name(c) for c in req.channels)
        known = self._known_functions(req.channels)
        shown = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        return f"no member of channel {names} serves task function {spec.function_id!r}" + (
            f" (members serve: {shown})" if known else " (no member serves any task function)"
        )

    async def _attempt(self, req: _Request, chosen: Candidate) -> str | None:
        """Ask one provider and follow it; None when the request ended, else why it did not."""
        spec = req.spec
        me = self.node.node_id
        conn = None if chosen.node_id == me else self.node.connections.get(chosen.node_id)
        if chosen.node_id != me and conn is None:
            return "not connected"
        attempt = req.attempt = _Attempt(chosen, conn)
        req.set(TaskStatus.PENDING, provider=chosen.node_id, note="")
        try:
            if conn is None:
                update = await self._submit(spec, Waiter(me, spec.request_id, chosen.channel))
                lease_ms = self.lease_ms
                attempt.maybe_delivered = True
            else:
                attempt.maybe_delivered = True
                request = TaskRequest(
                    id=0,
                    channel=chosen.channel,
                    request_id=spec.request_id,
                    function_id=spec.function_id,
                    task_type=str(spec.task_type),
                    task_id=spec.task_id,
                    kwargs=spec.kwargs,
                )
                async with self._peer_slots.hold(chosen.node_id):
                    reply = await conn.request(request)
                reply = cast(TaskRequestResponse, reply)  # request() checked it
                update, lease_ms = reply.update(spec.request_id), reply.lease_ms
        except (InvalidInput, RequestFailed) as exc:
            if isinstance(exc, InvalidInput) or exc.code == ErrorCode.BAD_REQUEST:
                req.fail(f"refused by {chosen.node_id[:16]}...: {exc}")
                return None
            attempt.maybe_delivered = False
            return f"refused: {exc}"
        except (NotFound, NotPermitted) as exc:
            attempt.maybe_delivered = False
            return f"refused: {exc}"
        except Unavailable as exc:
            return f"no answer: {exc}"
        if req.attempt is not attempt:
            return "superseded"
        if spec.task_type is TaskType.PURE and update.status is TaskStatus.FINISHED:
            attempt.from_cache = True
        if attempt.lease is None:
            self._apply_update(chosen.node_id, update, lease_ms)
        else:  # a status batch overtook the reply: it is the newer news
            attempt.lease.renew(trio.current_time(), lease_ms)
        return await self._follow(req, attempt)

    def _apply_update(self, provider: str, update: StatusUpdate, lease_ms: int) -> None:
        """News from ``provider`` about one of our requests (ignored unless it is the one we
        follow for that request)."""
        req = self._requests.get(update.request_id)
        if req is None or req.terminal:
            return
        attempt = req.attempt
        if attempt is None or attempt.candidate.node_id != provider:
            return
        now = trio.current_time()
        if attempt.lease is None:
            attempt.lease = Lease.granted(provider, now, lease_ms)
        else:
            attempt.lease.renew(now, lease_ms)
        if update.status is TaskStatus.PENDING:  # handed back: it will not run there
            attempt.lease.released = True
        attempt.status = update.status
        attempt.error = update.error
        attempt.result_uri = update.result_uri
        attempt.result_kind = update.result_kind
        attempt.result_size = update.result_size
        attempt.result_data = update.result_data
        if update.status in (TaskStatus.QUEUED, TaskStatus.RUNNING) and req.status != update.status:
            req.set(update.status)
        req.wake()

    async def on_status_batch(self, conn: PeerConnection, msg: TaskStatusBatch) -> None:
        for update in msg.parsed():
            self._apply_update(conn.node_id, update, msg.lease_ms)

    async def _follow(self, req: _Request, attempt: _Attempt) -> str | None:
        """Wait on the provider until the task ends, it hands the task back, or it is lost."""
        while True:
            lease = attempt.lease
            assert lease is not None
            if attempt.status is TaskStatus.FINISHED:
                return await self._take_result(req, attempt)
            if attempt.status is TaskStatus.ERROR:
                req.fail(attempt.error or "the task failed at its provider")
                return None
            if lease.released:
                return "handed back: " + (attempt.error or "it will not run it")
            if attempt.conn is not None and attempt.conn.closed.is_set():
                return "its session closed"
            if lease.expired(trio.current_time()):
                return f"silent for a whole lease ({lease.lease_ms / 1000:g} s): lease expired"
            await req.wait_until(lease.expires_at)

    async def _take_result(self, req: _Request, attempt: _Attempt) -> str | None:
        spec = req.spec
        provider = attempt.candidate.node_id
        if spec.task_type is TaskType.ACTION:
            req.finish(None, None, provider=provider)
            return None
        uri, kind = attempt.result_uri, attempt.result_kind
        if uri is None or kind is None:
            return "it finished without a result"
        data = attempt.result_data
        if provider != self.node.node_id:
            req.note = "fetching the result"
            record = TaskResult(
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
                function_id=spec.function_id,
                result_uri=uri,
                result_kind=str(kind),
                source=provider,
                finished_at=time.time(),
            )
            try:
                await self._fetch_result(record, attempt.result_size, attempt.result_data)
            except NotPermitted as exc:
                req.fail(f"cannot fetch the result: {exc}")
                return None
            except KacheryError as exc:
                return f"its result could not be fetched: {exc}"
        if attempt.from_cache:
            self.stats.provider_cache_hits += 1
            note = f"cached by its provider {provider[:16]}..."
            req.finish(uri, kind, provider=provider, data=data, cached=True, note=note)
        else:
            self.stats.computed += 1
            req.finish(uri, kind, provider=provider, data=data)
        return None

    async def _fetch_result(self, record: TaskResult, size: int | None, data: bytes | None) -> None:
        """Bring a result here, and keep its record.

        A small result came inline (``data``, already checked against the URI when its message
        was decoded): its record keeps its bytes, in one transaction, with no file in the store.
        A result of one piece is fetched as the chunk that is the whole file: one verified range
        from one holder. A larger one takes the resumable, multi-source download of the chunk
        exchange.
        """
        parsed = parse_file_uri(record.result_uri)
        if data is not None:
            if not is_inline_result(data, parsed.sha1):  # the decoder checked: a bug guard
                raise Unavailable(f"the inline result of {parsed} does not match its hash")
            await self._save_result(replace(record, result_data=data))
            self.stats.results_inline += 1
            return
        target = parsed
        if size is not None and size <= MAX_GET_BYTES and parsed.manifest_sha1 is None:
            whole = ChunkOf(file_sha1=parsed.sha1, start=0, end=size)
            target = FileURI(sha1=parsed.sha1, chunk_of=whole)
        async with self._fetches:
            await self._files.download(target)
        await self._save_result(record)
        self.stats.results_fetched += 1

    def _likely_holders(self, req: _Request) -> list[tuple[PeerConnection, str]]:
        """The members to ask for a cached result, each with the channel to ask in.

        The providers of the function computed its results: they are asked, except the one the
        request goes to next, which answers from its own cache when asked to run it. When no
        provider is online, every member is asked: one may hold a result it fetched earlier.
        """
        spec = req.spec
        candidates = self._candidates(spec.function_id, req.channels)
        asked: list[tuple[PeerConnection, str]] = []
        if candidates:
            first = choose_provider(spec.route_key, candidates, {})
            for candidate in candidates:
                conn = self.node.connections.get(candidate.node_id)
                if conn is not None and candidate is not first:
                    asked.append((conn, candidate.channel))
            return asked
        for conn in list(self.node.connections.values()):
            shared = [c for c in req.channels if c in conn.channels]
            if shared:
                asked.append((conn, shared[0]))
        return asked

    async def _lookup(self, req: _Request) -> bool:
        """Ask the likely holders whether they hold the result; fetch the first found."""
        spec = req.spec
        me = self.node.node_id
        asked = self._likely_holders(req)
        if not asked:
            return False
        found: list[tuple[str, TaskLookupResponse]] = []

        async def ask(conn: PeerConnection, channel: str, done: trio.CancelScope) -> None:
            msg = TaskLookup(
                id=0,
                channel=channel,
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
            )
            try:
                async with self._peer_slots.hold(conn.node_id):
                    reply = await conn.request(msg, reply_timeout=LOOKUP_SECONDS)
            except KacheryError as exc:
                log.debug("TaskLookup to %s...: %s", conn.node_id[:16], exc)
                return
            if isinstance(reply, TaskLookupResponse) and reply.found:
                found.append((conn.node_id, reply))
                done.cancel()

        async with trio.open_nursery() as nursery:
            for conn, channel in asked:
                nursery.start_soon(ask, conn, channel, nursery.cancel_scope)
        for holder, reply in found:
            if reply.result_uri is None or reply.result_kind is None:
                continue
            record = TaskResult(
                task_id=spec.task_id,
                kwargs_digest=spec.kwargs_digest,
                task_type=str(spec.task_type),
                function_id=spec.function_id,
                result_uri=reply.result_uri,
                result_kind=reply.result_kind,
                source=holder,
                finished_at=(reply.finished_at or 0) / 1000 or time.time(),
            )
            try:
                await self._fetch_result(record, reply.result_size, reply.result_data)
            except KacheryError as exc:
                log.debug("cached result of %s not fetched: %s", spec.task_id, exc)
                continue
            self.stats.lookup_hits += 1
            req.finish(
                reply.result_uri,
                ResultKind(reply.result_kind),
                provider=holder if holder != me else None,
                data=reply.result_data,
                cached=True,
                note=f"cached by member {holder[:16]}...",
            )
            return True
        return False

    # -- local API -----------------------------------------------------------------------------

    def _names(self) -> dict[str, str]:
        return {c: self._name(c) for c in self.node.membership.channel_ids()}

    def _find(self, ident: str) -> _Request | None:
        req = self._requests.get(ident)
        if req is not None:
            return req
        for candidate in reversed(self._requests.values()):
            if candidate.spec.task_id == ident:
                return candidate
        return None

    @exposed
    async def task_request(
        self,
        function_id: str,
        kwargs: dict[str, Any] | None = None,
        task_type: str = TaskType.PURE,
        channel: str | None = None,
        timeout_seconds: float | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Start a task request (answered at once if its result is cached here); returns its
        state. Follow it with ``task_wait``."""
        req = await self.request(
            function_id,
            kwargs,
            task_type,
            channel=channel,
            timeout_seconds=timeout_seconds,
            request_id=request_id,
        )
        return req.snapshot(self._names(), data=True)

    @exposed
    async def task_wait(
        self, request_id: str, within_seconds: float | None = None, changes: bool = True
    ) -> AsyncIterator[dict[str, Any] | StreamResult]:
        """Stream a request's state each time it changes (unless ``changes`` is false), until it
        ends (or ``within_seconds`` pass); the result is its last state."""
        req = self._requests.get(request_id)
        if req is None:
            yield StreamResult(await self._ended_or_not_found(request_id))
            return
        names = self._names()
        deadline = self._deadline(within_seconds)
        shown: tuple[Any, ...] | None = None
        while True:
            state = (req.status, req.provider, req.note)
            if state != shown and changes:
                shown = state
                yield req.snapshot(names, kwargs=False)
            if req.terminal or trio.current_time() >= deadline:
                break
            await req.wait_until(deadline)
        yield StreamResult(req.snapshot(names, data=True))

    @exposed
    async def task_outcome(
        self, request_id: str, within_seconds: float | None = None
    ) -> dict[str, Any]:
        """A request's state once it ends (or once ``within_seconds`` pass): ``task_wait``
        without its events, answered as one plain reply."""
        req = self._requests.get(request_id)
        if req is None:
            return await self._ended_or_not_found(request_id)
        deadline = self._deadline(within_seconds)
        while not req.terminal and trio.current_time() < deadline:
            await req.wait_until(deadline)
        return req.snapshot(self._names(), data=True)

    async def _ended_or_not_found(self, request_id: str) -> dict[str, Any]:
        """The kept final state of a request no longer in memory.

        Raises:
            NotFound: no request with that ID ended here (among the newest KEPT_ENDED_REQUESTS),
                and none is running.
        """
        state = await self._ended_state(request_id)
        if state is None:
            raise NotFound(f"no task request {request_id} on this node")
        return state

    def _deadline(self, within_seconds: float | None) -> float:
        return math.inf if within_seconds is None else trio.current_time() + within_seconds

    async def _full_id(self, ident: str) -> str:
        """The request or task ID that ``ident`` names: itself, or the one ID (among requests
        made here, in memory or kept since they ended, and results held here) that it is a
        prefix of, if at least MIN_ID_PREFIX characters long (``task list`` shows prefixes).
        Unmatched, ``ident`` is returned as is.

        Raises:
            InvalidInput: ``ident`` is a prefix of several IDs.
        """
        if len(ident) < MIN_ID_PREFIX:
            return ident
        found = {
            i
            for r in self._requests.values()
            for i in (r.spec.request_id, r.spec.task_id)
            if i.startswith(ident)
        }
        found.update(await self.node.run_sync(self.store.ids_starting, ident))
        if ident in found:
            return ident
        if len(found) == 1:
            return found.pop()
        if found:
            shown = ", ".join(sorted(found)[:5]) + (", ..." if len(found) > 5 else "")
            raise InvalidInput(
                f"{ident} is the start of several request or task IDs ({shown}):"
                " give more of the ID"
            )
        return ident

    @exposed
    async def task_status(self, task: str) -> dict[str, Any]:
        """The state of a request (by request ID, or the newest with a task ID), else the results
        this node holds for a task ID; a unique prefix of either ID will do."""
        task = await self._full_id(task)
        req = self._find(task)
        if req is not None:
            return req.snapshot(self._names(), data=True)
        ended = await self._ended_state(task)
        if ended is not None:
            return ended
        held = await self.node.run_sync(self.store.results_for, task)
        if held:
            newest = held[0]
            return {
                "taskId": newest.task_id,
                "functionId": newest.function_id,
                "taskType": newest.task_type,
                "status": str(TaskStatus.FINISHED),
                "cached": True,
                "fallback": False,
                "error": None,
                "resultUri": newest.result_uri,
                "resultKind": newest.result_kind,
                "provider": newest.source,
                "finishedAt": newest.finished_at,
                "results": len(held),
            }
        raise NotFound(f"no task or request {task} known on this node")

    @exposed
    async def task_list(self, limit: int = 50) -> dict[str, Any]:
        """Recent requests made here (newest first), and the jobs this node runs for others."""
        names = self._names()
        limit = max(0, limit)
        requests = [r.snapshot(names, kwargs=False) for r in reversed(self._requests.values())]
        if len(requests) < limit:  # then those that ended before the daemon last started
            shown = {r["requestId"] for r in requests}
            for text in await self.node.run_sync(self.store.ended_requests, limit):
                state = json.loads(text)
                if state["requestId"] not in shown:
                    state.pop("kwargs", None)
                    state.pop("resultData", None)
                    requests.append(state)
            requests.sort(key=lambda r: -float(r["createdAt"]))
        jobs = [
            {
                "jobId": job.job_id,
                "functionId": job.spec.function_id,
                "taskType": str(job.spec.task_type),
                "taskId": job.spec.task_id,
                "status": str(job.status),
                "waiters": len(job.waiters),
                "requesters": sorted({w.node_id for w in job.waiters.values()}),
            }
            for job in self.book.jobs.values()
        ]
        return {"requests": requests[:limit], "jobs": jobs}

    @exposed
    async def task_providers(self) -> list[dict[str, Any]]:
        """Members that serve task functions (this node included), per channel."""
        me = self.node.node_id
        out = []
        for channel in self.node.membership.active_channels():
            if self._has_role(channel, me, Role.PROVIDE_TASKS):
                functions = self.book.functions_in(channel)
                if functions:
                    out.append(
                        {
                            "nodeId": me,
                            "self": True,
                            "channel": self._name(channel),
                            "functions": {f: str(t) for f, t in functions.items()},
                        }
                    )
        for (node_id, channel), announced in sorted(self._remote.items()):
            if announced.functions and self.node.connections.get(node_id) is announced.conn:
                out.append(
                    {
                        "nodeId": node_id,
                        "self": False,
                        "channel": self._name(channel),
                        "functions": {f: str(t) for f, t in announced.functions.items()},
                    }
                )
        return out

    def statistics(self) -> dict[str, Any]:
        """Counters for ``kachery-node status``."""
        active = sum(1 for r in self._requests.values() if not r.terminal)
        return {
            "requests": self.stats.requests,
            "activeRequests": active,
            "cacheHits": self.stats.cache_hits,
            "lookupHits": self.stats.lookup_hits,
            "providerCacheHits": self.stats.provider_cache_hits,
            "computed": self.stats.computed,
            "fallbacks": self.stats.fallbacks,
            "errors": self.stats.errors,
            "jobsRun": self.stats.jobs_run,
            "jobsAnsweredFromCache": self.stats.jobs_answered_from_cache,
            "lookupsAnswered": self.stats.lookups_answered,
            "resultsInline": self.stats.results_inline,
            "resultsFetched": self.stats.results_fetched,
            **self.book.statistics(),
            "leaseSeconds": self.lease_seconds,
        }
