"""The provider's book of jobs, sans-I/O: which requests wait on which job, and what each hears.

A provider runs a pure calculation once for everyone who asks: ``JobBook`` joins every request for
the same task (and exact kwargs digest) to one ``Job`` and lists its ``Waiter``s, each of whom
gets a ``StatusUpdate`` when the job's status changes. A query or an action is a job of its own
per request. Jobs go to backends (worker processes that registered the function); a backend that
is lost hands its jobs back (``BackendLoss``). A requester has at most
MAX_WAITING_PER_REQUESTER requests waiting here.

Non-goals: running functions and clocks (the node's task service does both), the messages
(tasks.py).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import LocalProtocolError
from .tasks import (
    ResultKind,
    StatusUpdate,
    TaskSpec,
    TaskStatus,
    TaskType,
    advance,
    clip_error,
)


@dataclass(frozen=True, slots=True)
class Waiter:
    """A requester waiting for a job: its node, its request ID, the channel it asked in."""

    node_id: str
    request_id: str
    channel: str


@dataclass(slots=True)
class Job:
    """One run of a task on this provider, shared by every waiter with the same ``job_key``."""

    job_id: str
    spec: TaskSpec
    waiters: dict[tuple[str, str], Waiter] = field(default_factory=dict)
    status: TaskStatus = TaskStatus.QUEUED
    backend: str | None = None
    """The worker running it."""
    delivered: bool = False
    """Handed to the worker process (an action is then possibly running)."""
    queued: bool = False
    """In the queue (prepared: its cache or action record was checked)."""
    released: bool = False
    """Handed back: this node will not run it (no worker serves it any more)."""
    reporting: bool = False
    """Its worker reported the outcome, which is being recorded: it no longer needs a worker."""
    error: str | None = None
    result_uri: str | None = None
    result_kind: ResultKind | None = None
    result_size: int | None = None
    result_data: bytes | None = None

    @property
    def channels(self) -> set[str]:
        return {w.channel for w in self.waiters.values()}

    def update_for(self, request_id: str) -> StatusUpdate:
        """This job's news for one of its waiters (a handed-back job reads as pending)."""
        return StatusUpdate(
            request_id=request_id,
            status=TaskStatus.PENDING if self.released else self.status,
            error=self.error,
            result_uri=self.result_uri,
            result_kind=self.result_kind,
            result_size=self.result_size,
            result_data=self.result_data,
        )


@dataclass(slots=True)
class Backend:
    """A worker process of this node: the functions it runs, where, and how many at once."""

    backend_id: str
    functions: dict[str, TaskType]
    channels: frozenset[str] | None
    """Channels it serves (None: every channel where this node provides tasks)."""
    slots: int
    jobs: set[str] = field(default_factory=set)

    def allows(self, channels: Iterable[str]) -> bool:
        return self.channels is None or not self.channels.isdisjoint(channels)

    def runs(self, job: Job) -> bool:
        spec = job.spec
        return self.functions.get(spec.function_id) is spec.task_type and self.allows(job.channels)

    @property
    def free(self) -> int:
        return self.slots - len(self.jobs)


@dataclass(frozen=True, slots=True)
class BackendLoss:
    """What became of the jobs of a worker that went away.

    Attributes:
        requeued: back in the queue (another worker here serves them).
        released: handed back: no worker here serves them any more (never started, or a pure
            calculation or query that may run again elsewhere).
        lost: actions the worker had received: they may or may not have run (outcome unknown).
    """

    requeued: list[Job]
    released: list[Job]
    lost: list[Job]


class JobBook:
    """The jobs of one provider node, its workers (backends), and the queue between them.

    It decides; the node acts (sends the jobs, the status updates, writes records). Jobs are
    joined by ``TaskSpec.job_key`` so that concurrent requests for one pure calculation run once.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        """By job ID."""
        self.by_key: dict[str, Job] = {}
        self.backends: dict[str, Backend] = {}
        self.queue: deque[str] = deque()
        self.generation = 0
        """Changes whenever a backend comes or goes (announced to requesters)."""
        self.waiting: Counter[str] = Counter()
        """Requests each requester has waiting on jobs here (see MAX_WAITING_PER_REQUESTER)."""
        self._serial = 0

    # -- backends ------------------------------------------------------------------------------

    def add_backend(
        self,
        backend_id: str,
        functions: Mapping[str, TaskType],
        *,
        channels: Iterable[str] | None = None,
        slots: int = 1,
    ) -> Backend:
        if backend_id in self.backends:
            raise LocalProtocolError(f"backend {backend_id} added twice")
        if slots < 1:
            raise LocalProtocolError("a backend has at least one slot")
        backend = Backend(
            backend_id,
            dict(functions),
            None if channels is None else frozenset(channels),
            slots,
        )
        self.backends[backend_id] = backend
        self.generation += 1
        return backend

    def remove_backend(self, backend_id: str) -> BackendLoss:
        """Forget a backend; its jobs are requeued, handed back, or lost (see BackendLoss)."""
        backend = self.backends.pop(backend_id, None)
        self.generation += 1
        requeued: list[Job] = []
        released: list[Job] = []
        lost: list[Job] = []
        if backend is None:
            return BackendLoss(requeued, released, lost)
        for job_id in sorted(backend.jobs):
            job = self.jobs[job_id]
            job.backend = None
            if job.reporting:
                continue
            if job.spec.task_type is TaskType.ACTION and job.delivered:
                lost.append(job)
                continue
            job.delivered = False
            job.status = advance(job.status, TaskStatus.QUEUED)
            if self._anyone_runs(job):
                self.queue.appendleft(job_id)  # it waited longest: first again
                requeued.append(job)
            else:
                released.append(job)
        for job_id in list(self.queue):  # queued jobs nobody here can run any more
            job = self.jobs[job_id]
            if not self._anyone_runs(job):
                self.queue.remove(job_id)
                released.append(job)
        for job in released:
            job.released = True
            self._drop(job)
        return BackendLoss(requeued, released, lost)

    def _anyone_runs(self, job: Job) -> bool:
        return any(b.runs(job) for b in self.backends.values())

    def functions_in(self, channel: str) -> dict[str, TaskType]:
        """Functions some backend serves in ``channel`` (and their types)."""
        served: dict[str, TaskType] = {}
        for backend in self.backends.values():
            if backend.allows([channel]):
                served.update(backend.functions)
        return dict(sorted(served.items()))

    def serves(self, function_id: str, channel: str) -> TaskType | None:
        return self.functions_in(channel).get(function_id)

    # -- jobs ----------------------------------------------------------------------------------

    def join(self, spec: TaskSpec, waiter: Waiter) -> tuple[Job, bool]:
        """The job for ``spec`` with ``waiter`` added; True if it was created (prepare it, then
        ``enqueue`` it or ``complete`` it)."""
        job = self.by_key.get(spec.job_key)
        created = job is None
        if job is None:
            self._serial += 1
            job = Job(job_id=f"j{self._serial}", spec=spec)
            self.jobs[job.job_id] = job
            self.by_key[spec.job_key] = job
        if (waiter.node_id, waiter.request_id) not in job.waiters:
            self.waiting[waiter.node_id] += 1
        job.waiters[(waiter.node_id, waiter.request_id)] = waiter
        return job, created

    def _forget_waiter(self, node_id: str) -> None:
        self.waiting[node_id] -= 1
        if self.waiting[node_id] <= 0:
            del self.waiting[node_id]

    def leave(self, node_id: str, request_id: str) -> Job | None:
        """A waiter withdrew. A query nobody waits for any more is dropped if not started
        (returned); every other job runs on."""
        for job in self.jobs.values():
            if job.waiters.pop((node_id, request_id), None) is not None:
                self._forget_waiter(node_id)
                if (
                    not job.waiters
                    and job.spec.task_type is TaskType.QUERY
                    and job.status is TaskStatus.QUEUED
                ):
                    if job.job_id in self.queue:
                        self.queue.remove(job.job_id)
                    self._drop(job)
                    return job
                return None
        return None

    def enqueue(self, job: Job) -> None:
        """Queue a prepared job for a worker slot."""
        if job.job_id not in self.jobs or job.queued:
            raise LocalProtocolError(f"job {job.job_id} cannot be queued")
        job.queued = True
        self.queue.append(job.job_id)

    def unservable(self) -> list[Job]:
        """Queued jobs no backend here can run: hand them back (``release``)."""
        return [self.jobs[j] for j in self.queue if not self._anyone_runs(self.jobs[j])]

    def release(self, job: Job) -> None:
        """Hand a queued job back: this node will not run it."""
        if job.job_id in self.queue:
            self.queue.remove(job.job_id)
        job.released = True
        self._drop(job)

    def assign(self) -> list[tuple[Backend, Job]]:
        """Give queued jobs to backends with free slots (oldest first); each returned job is now
        running on its backend."""
        free = [b for b in self.backends.values() if b.free > 0]
        if not free or not self.queue:
            return []
        assigned: list[tuple[Backend, Job]] = []
        for job_id in list(self.queue):
            job = self.jobs[job_id]
            backend = next((b for b in free if b.free > 0 and b.runs(job)), None)
            if backend is None:
                continue
            self.queue.remove(job_id)
            backend.jobs.add(job_id)
            job.backend = backend.backend_id
            job.status = advance(job.status, TaskStatus.RUNNING)
            assigned.append((backend, job))
            if not any(b.free > 0 for b in free):
                break
        return assigned

    def complete(
        self,
        job_id: str,
        status: TaskStatus,
        *,
        error: str | None = None,
        result_uri: str | None = None,
        result_kind: ResultKind | None = None,
        result_size: int | None = None,
        result_data: bytes | None = None,
    ) -> Job:
        """A job finished or failed (or was answered without running): it leaves the book.

        Raises:
            LocalProtocolError: no such job, or ``status`` is not terminal.
        """
        job = self.jobs.get(job_id)
        if job is None or not status.terminal:
            raise LocalProtocolError(f"job {job_id} cannot complete as {status}")
        if job_id in self.queue:
            self.queue.remove(job_id)
        job.status = advance(job.status, status)
        job.error = None if error is None else clip_error(error)
        job.result_uri = result_uri
        job.result_kind = result_kind
        job.result_size = result_size
        job.result_data = result_data
        self._drop(job)
        return job

    def _drop(self, job: Job) -> None:
        if self.jobs.pop(job.job_id, None) is not None:
            for node_id, _ in job.waiters:
                self._forget_waiter(node_id)
        if self.by_key.get(job.spec.job_key) is job:
            del self.by_key[job.spec.job_key]
        if job.backend is not None:
            backend = self.backends.get(job.backend)
            if backend is not None:
                backend.jobs.discard(job.job_id)

    def statistics(self) -> dict[str, int]:
        running = sum(1 for j in self.jobs.values() if j.status is TaskStatus.RUNNING)
        return {
            "backends": len(self.backends),
            "slots": sum(b.slots for b in self.backends.values()),
            "jobsQueued": len(self.queue),
            "jobsRunning": running,
        }
