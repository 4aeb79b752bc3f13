"""Tasks, sans-I/O: task IDs and specs, status values, the task messages, leases, and the
requester's choice of provider (the provider's book of jobs is task_jobs.py).

A *task* is a call of a registered function (``function_id``) with JSON keyword arguments.
Three types: a *pure calculation* is deterministic, so its result is cached and shared under
its task ID; a *query* reruns on every request and keeps its last result as a fallback; an
*action* changes state and runs at most once per request ID.

IDs. The task ID is kachery's (``kachery_json.task_hash``: SHA-1 of the canonical JSON of
``{functionId, kwargs}``, integral floats as ints, non-integral floats as null). Beside it travels
``exact_kwargs_digest``, in which floats keep their value: a cached result is only ever served
for the same digest, so ``threshold=5.5`` and ``threshold=6.5`` never share one. A request ID
(chosen by the requester, reused when it retries) names one request.

Routing. Requesters rank the providers of a function by rendezvous hashing of the task's
``route_key`` over their node IDs (``rank_providers``), so concurrent requesters of one pure task
all ask the same provider, which runs it once for all of them (``JobBook`` joins them to one
job). That provider holds a *lease* on the task: every status message renews it; a requester
that hears nothing for the lease's length, or whose session with the provider closes, or that is
told the task was handed back (``lease_ms == 0``), moves to the next provider
(``choose_provider``). Actions never move once a provider may have them: a retry goes to the same
provider, whose durable record answers it.

Messages (type numbers 70-77): ``TaskRequest`` asks a provider to run a task (needs
``requestTasks``); ``TaskStatusBatch`` carries status changes and lease renewals from provider to
requester, many per frame; ``TaskProviders`` announces the functions a node serves in a channel;
``TaskCancel`` withdraws a request; ``TaskLookup`` asks any member for a cached result.

Non-goals: running functions, moving result files (the chunk exchange does), persistence
(kachery.storage.tasks) and clocks: times are arguments.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ._hex import is_sha1_hex
from .errors import CloseCode, InvalidInput, LocalProtocolError, RemoteProtocolError
from .kachery_json import JSONValue, check_json_value, exact_kwargs_digest, task_hash
from .messages import Message, MsgType, message
from .uri import parse_file_uri

# -- limits --------------------------------------------------------------------------------------

MAX_FUNCTION_ID_CHARS = 200
"""Longest function ID: names like ``spikesort.mountainsort4.v2``, never documents."""

MAX_REQUEST_ID_CHARS = 64
"""Longest request ID (the client's are 32 hex digits; a user may choose a readable one)."""

MAX_KWARGS_BYTES = 256 * 1024
"""Largest kwargs as JSON: arguments name data by URI; bulk data travels as files."""

MAX_ERROR_CHARS = 4000
"""Longest error message carried for a task (a traceback's last lines, not the whole log)."""

MAX_UPDATES_PER_MESSAGE = 500
"""Status updates in one ``TaskStatusBatch``: bounds a frame (each update is under 5 KiB)."""

INLINE_RESULT_BYTES = 4096
"""A result file of at most this many bytes travels inside the message that announces it
(``resultData``, checked against the URI's SHA-1 on decoding), sparing the requester a find and a
fetch; most results are a few bytes of JSON. 500 updates of this size fit a frame."""


def is_inline_result(data: bytes, sha1: str) -> bool:
    """Whether ``data`` may stand for a result's file: at most INLINE_RESULT_BYTES, hashing to
    ``sha1``. Checked wherever such bytes arrive or are read back (wire, worker, database)."""
    return len(data) <= INLINE_RESULT_BYTES and hashlib.sha1(data).hexdigest() == sha1


MAX_ANNOUNCED_FUNCTIONS = 1000
"""Functions one node may announce in a channel."""

MAX_WAITING_PER_REQUESTER = 1000
"""Requests one requester may have waiting on a provider's jobs at once; more are answered busy
(a member cannot make a provider hold an unbounded book of jobs)."""

MAX_LEASE_MS = 3_600_000
"""Longest lease a provider may grant itself (an hour): beyond it a dead provider stalls users."""

_FUNCTION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-:+/@]*")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_\-]+")


# -- values --------------------------------------------------------------------------------------


class TaskType(StrEnum):
    """The three kinds of task (kachery's names)."""

    PURE = "pure-calculation"
    QUERY = "query"
    ACTION = "action"


class TaskStatus(StrEnum):
    """Where a request stands, as its requester sees it."""

    WAITING = "waiting"
    """Not sent yet: looking for a cached result or for a provider."""
    PENDING = "pending"
    """Sent to a provider that has not taken it yet."""
    QUEUED = "queued"
    """A provider took it and waits for a free worker slot."""
    RUNNING = "running"
    """A worker runs it."""
    FINISHED = "finished"
    ERROR = "error"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.FINISHED, TaskStatus.ERROR)


TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.WAITING: frozenset(
        {TaskStatus.WAITING, TaskStatus.PENDING, TaskStatus.FINISHED, TaskStatus.ERROR}
    ),
    TaskStatus.PENDING: frozenset(TaskStatus),
    TaskStatus.QUEUED: frozenset(TaskStatus),
    TaskStatus.RUNNING: frozenset(TaskStatus),
    TaskStatus.FINISHED: frozenset(),
    TaskStatus.ERROR: frozenset(),
}
"""Every legal status change, in one place. A request goes back to waiting or pending when its
provider hands it back or is lost (failover), and a job back to queued when its worker dies; a
finished or failed request never changes again; nothing is queued or running before it is sent."""


def advance(current: TaskStatus, new: TaskStatus) -> TaskStatus:
    """``new``, if ``current -> new`` is legal (see ``TRANSITIONS``).

    Raises:
        LocalProtocolError: it is not (a bug in the caller).
    """
    if new not in TRANSITIONS[current]:
        raise LocalProtocolError(f"a task cannot go from {current} to {new}")
    return new


class ResultKind(StrEnum):
    """What a finished task's result file holds."""

    JSON = "json"
    """A JSON value, stored as compact JSON with sorted keys (``store_json``)."""
    BYTES = "bytes"
    """Bytes the function returned."""
    FILE = "file"
    """A file the function returned the path of; the result is its URI."""


def parse_task_type(value: object) -> TaskType:
    """``"pure-calculation"``, ``"query"`` or ``"action"``.

    Raises:
        InvalidInput: anything else, listing the three.
    """
    try:
        return TaskType(str(value))
    except ValueError:
        names = ", ".join(t.value for t in TaskType)
        raise InvalidInput(f"unknown task type {value!r}: use one of {names}") from None


def check_function_id(function_id: object) -> str:
    """A function ID: letters, digits and ``._-:+/@``, up to MAX_FUNCTION_ID_CHARS.

    Raises:
        InvalidInput: it is not one; the message says why.
    """
    if not isinstance(function_id, str) or not function_id:
        raise InvalidInput("a task function ID is a non-empty string, like 'spikesort.v1'")
    if len(function_id) > MAX_FUNCTION_ID_CHARS:
        raise InvalidInput(f"function ID is longer than {MAX_FUNCTION_ID_CHARS} characters")
    if _FUNCTION_ID.fullmatch(function_id) is None:
        raise InvalidInput(
            f"function ID {function_id!r} may hold only letters, digits and ._-:+/@"
            " (and starts with a letter, digit or _)"
        )
    return function_id


def check_request_id(request_id: object) -> str:
    """A request ID: 1 to MAX_REQUEST_ID_CHARS letters, digits, ``_`` or ``-``.

    Raises:
        InvalidInput: it is not one.
    """
    if (
        not isinstance(request_id, str)
        or not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS
        or _REQUEST_ID.fullmatch(request_id) is None
    ):
        raise InvalidInput(
            f"request ID {request_id!r} is not 1 to {MAX_REQUEST_ID_CHARS} letters, digits,"
            " '_' or '-'"
        )
    return request_id


def check_kwargs(kwargs: object) -> dict[str, JSONValue]:
    """Task arguments: a JSON object of at most MAX_KWARGS_BYTES.

    Raises:
        InvalidInput: naming the first part that JSON cannot carry, or the size.
    """
    if not isinstance(kwargs, dict):
        raise InvalidInput(f"task kwargs must be a JSON object, not {type(kwargs).__name__}")
    check_json_value(kwargs, "kwargs")
    try:
        size = len(json.dumps(kwargs, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    except ValueError as exc:  # a lone surrogate, or an integer of over 4300 digits
        raise InvalidInput(f"kwargs cannot be written as JSON: {exc}") from None
    if size > MAX_KWARGS_BYTES:
        raise InvalidInput(
            f"kwargs are {size} bytes as JSON, over {MAX_KWARGS_BYTES}: pass large data as a"
            " file URI"
        )
    return kwargs


def clip_error(text: str) -> str:
    """An error message cut to MAX_ERROR_CHARS (its end kept: that is where tracebacks say why)."""
    return text if len(text) <= MAX_ERROR_CHARS else "..." + text[-(MAX_ERROR_CHARS - 3) :]


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """One request for a task, checked: build it with ``TaskSpec.create``.

    Attributes:
        function_id: the registered function.
        task_type: pure calculation, query or action.
        kwargs: its JSON keyword arguments.
        task_id: kachery's task ID (``task_hash``).
        kwargs_digest: the exact digest (floats kept) a cached result must match.
        request_id: the requester's ID for this request.
        requester: the node that asked (its node ID).
    """

    function_id: str
    task_type: TaskType
    kwargs: dict[str, JSONValue]
    task_id: str
    kwargs_digest: str
    request_id: str
    requester: str

    @classmethod
    def create(
        cls,
        function_id: object,
        kwargs: object,
        task_type: object,
        *,
        request_id: object,
        requester: str,
    ) -> TaskSpec:
        """Check every part and compute the IDs.

        Raises:
            InvalidInput: a part is malformed; the message says which and why.
        """
        fid = check_function_id(function_id)
        args = check_kwargs(kwargs)
        return cls(
            function_id=fid,
            task_type=parse_task_type(task_type),
            kwargs=args,
            task_id=task_hash(fid, args),
            kwargs_digest=exact_kwargs_digest(fid, args),
            request_id=check_request_id(request_id),
            requester=requester,
        )

    @property
    def job_key(self) -> str:
        """What a provider runs once: a pure calculation once per exact arguments, whoever asks;
        a query or an action once per request (of one requester)."""
        if self.task_type is TaskType.PURE:
            return f"{self.task_type}:{self.kwargs_digest}"
        return f"{self.task_type}:{self.requester}:{self.request_id}"

    @property
    def route_key(self) -> str:
        """What requesters rank providers by: every requester of one pure calculation (or one
        query) picks the same provider; an action's retries go where the action went."""
        if self.task_type is TaskType.ACTION:
            return f"action:{self.request_id}"
        return self.kwargs_digest


# -- messages ------------------------------------------------------------------------------------


def _bad(text: str) -> RemoteProtocolError:
    return RemoteProtocolError(text, close_code=CloseCode.BAD_FRAME)


def _check_wire_function_id(msg: object, value: str) -> None:
    try:
        check_function_id(value)
    except InvalidInput as exc:
        raise _bad(f"{type(msg).__name__}: {exc}") from None


def _check_wire_request_id(msg: object, value: str) -> None:
    try:
        check_request_id(value)
    except InvalidInput as exc:
        raise _bad(f"{type(msg).__name__}: {exc}") from None


def _check_wire_type(msg: object, value: str) -> None:
    if value not in TaskType.__members__.values():
        raise _bad(f"{type(msg).__name__}.taskType {value!r} is not a task type")


def _check_result(
    msg: object, uri: str | None, kind: str | None, size: int | None, data: object = None
) -> None:
    name = msg.__name__ if isinstance(msg, type) else type(msg).__name__
    if not ((uri is None) == (kind is None) == (size is None)):
        raise _bad(f"{name}: resultUri, resultKind and resultSize come together")
    if size is not None and not 0 <= size < 2**63:
        raise _bad(f"{name}.resultSize {size} is out of range")
    if uri is not None:
        try:
            parsed = parse_file_uri(uri)
        except InvalidInput as exc:
            raise _bad(f"{name}.resultUri: {exc}") from None
        if kind not in ResultKind.__members__.values():
            raise _bad(f"{name}.resultKind {kind!r} is not a result kind")
    if data is None:
        return
    if uri is None or not isinstance(data, bytes) or len(data) != size:
        raise _bad(f"{name}.resultData is the bytes of the result, resultSize of them")
    if len(data) > INLINE_RESULT_BYTES:
        raise _bad(f"{name}.resultData is over {INLINE_RESULT_BYTES} bytes")
    if parsed.chunk_of is not None or not is_inline_result(data, parsed.sha1):
        raise _bad(f"{name}.resultData does not hash to its resultUri")


def _check_lease(msg: object, lease_ms: int) -> None:
    if not 0 <= lease_ms <= MAX_LEASE_MS:
        raise _bad(f"{type(msg).__name__}.leaseMs {lease_ms} is not 0..{MAX_LEASE_MS}")


@message(MsgType.TASK_REQUEST)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequest(Message):
    """Run this task (or join its run), and keep me posted with ``TaskStatusBatch``.

    The provider recomputes ``task_id`` and checks ``kwargs`` are JSON (a failure is answered
    ``bad-request``; it does not end the session: it is the requester's mistake, not a broken
    frame). A provider that does not serve the function answers ``not-found``.
    """

    id: int
    channel: str
    request_id: str
    function_id: str
    task_type: str
    task_id: str
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_wire_request_id(self, self.request_id)
        _check_wire_function_id(self, self.function_id)
        _check_wire_type(self, self.task_type)
        if not is_sha1_hex(self.task_id):
            raise _bad("TaskRequest.taskId is not 40 lowercase hex digits")


@message(MsgType.TASK_REQUEST_RESPONSE, answers=TaskRequest)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRequestResponse(Message):
    """The provider took the task: its status now, and the lease it holds (``lease_ms``)."""

    id: int
    status: str
    lease_ms: int
    error: str | None = None
    result_uri: str | None = None
    result_kind: str | None = None
    result_size: int | None = None
    result_data: bytes | None = None
    """The result's bytes, if at most INLINE_RESULT_BYTES."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if self.status not in TaskStatus.__members__.values():
            raise _bad(f"TaskRequestResponse.status {self.status!r} is not a task status")
        _check_lease(self, self.lease_ms)
        _check_result(self, self.result_uri, self.result_kind, self.result_size, self.result_data)

    def update(self, request_id: str) -> StatusUpdate:
        """The same news as a status update."""
        return StatusUpdate(
            request_id=request_id,
            status=TaskStatus(self.status),
            error=self.error,
            result_uri=self.result_uri,
            result_kind=None if self.result_kind is None else ResultKind(self.result_kind),
            result_size=self.result_size,
            result_data=self.result_data,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusUpdate:
    """Where one request stands at its provider.

    A non-terminal status in a batch whose ``lease_ms`` is 0 means *handed back*: the provider
    will not run it (its worker went away); the requester asks another.
    """

    request_id: str
    status: TaskStatus
    error: str | None = None
    result_uri: str | None = None
    result_kind: ResultKind | None = None
    result_size: int | None = None
    """Bytes in the result file (a small one is fetched as one piece)."""
    result_data: bytes | None = None
    """The result's bytes, if at most INLINE_RESULT_BYTES (checked against ``result_uri``)."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"requestId": self.request_id, "status": str(self.status)}
        if self.error is not None:
            wire["error"] = self.error
        if self.result_uri is not None and self.result_kind is not None:
            wire["resultUri"] = self.result_uri
            wire["resultKind"] = str(self.result_kind)
            wire["resultSize"] = self.result_size
            if self.result_data is not None:
                wire["resultData"] = self.result_data
        return wire

    @classmethod
    def from_wire(cls, value: object) -> StatusUpdate:
        """Parse one update.

        Raises:
            RemoteProtocolError: it is malformed.
        """
        if not isinstance(value, dict) or not set(value) <= {
            "requestId",
            "status",
            "error",
            "resultUri",
            "resultKind",
            "resultSize",
            "resultData",
        }:
            raise _bad(
                "a task status update is {requestId, status[, error][, resultUri, resultKind,"
                " resultSize[, resultData]]}"
            )
        request_id, status = value.get("requestId"), value.get("status")
        error, uri, kind = value.get("error"), value.get("resultUri"), value.get("resultKind")
        size = value.get("resultSize")
        if not isinstance(request_id, str):
            raise _bad("a task status update lacks its requestId")
        _check_wire_request_id(StatusUpdate, request_id)
        if not isinstance(status, str) or status not in TaskStatus.__members__.values():
            raise _bad(f"task status {status!r} is not one of {', '.join(TaskStatus)}")
        if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_CHARS):
            raise _bad(f"a task error is a string of at most {MAX_ERROR_CHARS} characters")
        if not (uri is None or isinstance(uri, str)) or not (kind is None or isinstance(kind, str)):
            raise _bad("a task status update's resultUri and resultKind are strings")
        if not (size is None or type(size) is int):
            raise _bad("a task status update's resultSize is an integer")
        data = value.get("resultData")
        _check_result(StatusUpdate, uri, kind, size, data)
        return cls(
            request_id=request_id,
            status=TaskStatus(status),
            error=error,
            result_uri=uri,
            result_kind=None if kind is None else ResultKind(kind),
            result_size=size,
            result_data=data,
        )


@message(MsgType.TASK_STATUS)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatusBatch(Message):
    """Provider to requester: news of requests in ``channel``, and a renewed lease for each.

    Sent when statuses change and, for tasks still queued or running, every third of the lease:
    a requester that hears nothing for ``lease_ms`` treats the provider as lost.
    """

    channel: str
    lease_ms: int
    updates: list[dict[str, Any]]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_lease(self, self.lease_ms)
        if len(self.updates) > MAX_UPDATES_PER_MESSAGE:
            raise _bad(f"TaskStatusBatch carries over {MAX_UPDATES_PER_MESSAGE} updates")
        for update in self.updates:
            StatusUpdate.from_wire(update)

    def parsed(self) -> list[StatusUpdate]:
        return [StatusUpdate.from_wire(u) for u in self.updates]


@message(MsgType.TASK_PROVIDERS)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskProviders(Message):
    """ "In ``channel`` I serve these functions" (function ID -> task type); the whole set each
    time. ``generation`` changes whenever the node's workers come or go, so a requester knows
    that a provider it gave up on may be worth asking again."""

    channel: str
    generation: int
    functions: dict[str, str]

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not 0 <= self.generation < 2**63:
            raise _bad("TaskProviders.generation is out of range")
        if len(self.functions) > MAX_ANNOUNCED_FUNCTIONS:
            raise _bad(f"TaskProviders lists over {MAX_ANNOUNCED_FUNCTIONS} functions")
        for function_id, task_type in self.functions.items():
            _check_wire_function_id(self, function_id)
            _check_wire_type(self, task_type)


@message(MsgType.TASK_CANCEL)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskCancel(Message):
    """The requester stopped waiting for ``request_id`` (timed out, or moved to another
    provider): stop sending it news. A pure calculation runs on (its result will be cached)."""

    channel: str
    request_id: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_wire_request_id(self, self.request_id)


@message(MsgType.TASK_LOOKUP)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskLookup(Message):
    """Do you hold a result of this task for these exact arguments? Any member may answer."""

    id: int
    channel: str
    task_id: str
    kwargs_digest: str
    task_type: str

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if not (is_sha1_hex(self.task_id) and is_sha1_hex(self.kwargs_digest)):
            raise _bad("TaskLookup.taskId and kwargsDigest are 40 lowercase hex digits")
        _check_wire_type(self, self.task_type)
        if self.task_type == TaskType.ACTION:
            raise _bad("TaskLookup: actions have no cached results")


@message(MsgType.TASK_LOOKUP_RESPONSE, answers=TaskLookup)
@dataclass(frozen=True, slots=True, kw_only=True)
class TaskLookupResponse(Message):
    """``found``: the result file is here (fetch it with the chunk exchange)."""

    id: int
    found: bool
    result_uri: str | None = None
    result_kind: str | None = None
    result_size: int | None = None
    finished_at: int | None = None
    """When it was computed, in ms since the epoch."""
    result_data: bytes | None = None
    """The result's bytes, if at most INLINE_RESULT_BYTES."""

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        _check_result(self, self.result_uri, self.result_kind, self.result_size, self.result_data)
        if self.found and self.result_uri is None:
            raise _bad("TaskLookupResponse: found without a resultUri")


# -- choosing a provider (requester side) --------------------------------------------------------


Marker = tuple[int, int]
"""What a requester knew of a provider when it gave up on it: (session serial, generation). A
provider is worth asking again once either changes (it reconnected, or its workers changed)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A provider of a function: where to ask it, and its marker."""

    node_id: str
    channel: str
    task_type: TaskType
    marker: Marker


def rendezvous_score(route_key: str, node_id: str) -> int:
    """Highest random weight of ``node_id`` for ``route_key`` (rendezvous hashing)."""
    return int.from_bytes(hashlib.sha1(f"{route_key}|{node_id}".encode()).digest()[:8], "big")


def rank_providers(route_key: str, node_ids: Iterable[str]) -> list[str]:
    """Providers in the order every requester tries them for ``route_key``.

    Deterministic and independent of the order given, so requesters that see the same providers
    agree; adding or removing one provider moves only the keys it wins or held.
    """
    return sorted(set(node_ids), key=lambda n: (-rendezvous_score(route_key, n), n))


def choose_provider(
    route_key: str,
    candidates: Sequence[Candidate],
    failed: Mapping[str, Marker],
    sticky: str | None = None,
) -> Candidate | None:
    """The provider to ask next, or None (wait for a change).

    Args:
        route_key: ``TaskSpec.route_key``.
        candidates: providers of the function now (one per node).
        failed: providers given up on, with their marker at the time: skipped until it changes.
        sticky: only this provider may be asked (an action it may already hold).
    """
    by_node = {c.node_id: c for c in candidates}
    for node_id in rank_providers(route_key, by_node):
        candidate = by_node[node_id]
        if sticky is not None and node_id != sticky:
            continue
        if failed.get(node_id) == candidate.marker:
            continue
        return candidate
    return None


@dataclass(slots=True)
class Lease:
    """A requester's view of the lease its provider holds on a task.

    Every status message from the provider renews it for the ``lease_ms`` it carries; a renewal
    with 0 is a hand-back.
    """

    holder: str
    expires_at: float
    released: bool = False
    lease_ms: int = 0
    """The length of the last renewal."""

    @classmethod
    def granted(cls, holder: str, now: float, lease_ms: int) -> Lease:
        lease = cls(holder, now)
        lease.renew(now, lease_ms)
        return lease

    def renew(self, now: float, lease_ms: int) -> None:
        if lease_ms <= 0:
            self.released = True
            self.expires_at = now
        else:
            self.lease_ms = lease_ms
            self.expires_at = max(self.expires_at, now + lease_ms / 1000)

    def expired(self, now: float) -> bool:
        return self.released or now >= self.expires_at
