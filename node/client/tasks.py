"""The Python client for tasks: ``kn.taskfunction``, ``kn.run_task_backend``, ``kn.request_task``.

Providing, in a script of its own (a worker process, so a crashing task never takes the node
down)::

    import kachery.node as kn

    @kn.taskfunction("spikesort.v1", type="pure-calculation")
    def spikesort(recording: str, threshold: float = 5.0) -> dict:
        ...

    kn.run_task_backend(channels=["lab"])  # blocks; Ctrl-C stops it

A function takes JSON keyword arguments and returns a JSON value, ``bytes``, or a
``pathlib.Path`` to a file; the result is stored in the node's store (a JSON value as compact
JSON with sorted keys, like ``store_json``) and handed over as a URI. An action's return value
is ignored: it succeeds or fails. ``run_task_backend`` registers the functions with the running
daemon (``task_backend_listen``, a stream of jobs), runs each job in one of ``slots`` threads, and
reports its outcome (``task_backend_report``); it reconnects if the daemon restarts.

Requesting::

    task = kn.request_task("spikesort.v1", {"recording": uri}, channel="lab")
    task.status              # waiting, pending, queued, running, finished or error
    value = task.wait()      # the result (raises TaskFailed, with the message, on error)

Everything goes through the daemon that runs for ``$KACHERY_NODE_HOME``.

Non-goals: isolating tasks from each other (they share the worker process: run several workers
for that) and killing a hung task (its request times out; restart the worker).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kachery.node.client import DaemonClient
from kachery.node.errors import NodeError, NotPermitted, Unavailable
from kachery.node.home import NodeHome, default_home
from kachery.protocol.errors import InvalidInput, KacheryError
from kachery.protocol.kachery_json import check_json_value
from kachery.protocol.tasks import (
    INLINE_RESULT_BYTES,
    ResultKind,
    TaskStatus,
    TaskType,
    check_function_id,
    check_kwargs,
    check_request_id,
    clip_error,
    is_inline_result,
    parse_task_type,
)
from kachery.protocol.uri import FileURI, parse_file_uri
from kachery.storage.errors import NotFound

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SLOTS = 4
"""Jobs a worker runs at once (threads): enough that one slow task does not block the rest."""

RECONNECT_SECONDS = 1.0
"""First wait before a worker reconnects to a daemon that went away; doubles up to a minute."""

RECONNECT_MAX_SECONDS = 60.0


REPORTS_PER_CALL = 64
"""Job reports a worker sends in one call, at most."""


class TaskFailed(NodeError):
    """A task ended with an error; the message is its provider's (or the requester's) reason."""


@dataclass(frozen=True, slots=True)
class TaskFunction:
    """A function registered with ``@taskfunction``."""

    function_id: str
    task_type: TaskType
    func: Callable[..., Any]


_REGISTRY: dict[str, TaskFunction] = {}


def taskfunction(function_id: str, *, type: str = "pure-calculation") -> Callable[[F], F]:
    """Register a function as a task (kachery-client's decorator).

    Args:
        function_id: the name requesters use, with a version (``"spikesort.v1"``): change it
            when the function's results change, since pure results are cached under it.
        type: ``"pure-calculation"`` (deterministic: cached and shared), ``"query"`` (runs on
            every request) or ``"action"`` (changes state; runs at most once per request).

    Raises:
        InvalidInput: the function ID or type is malformed.
    """
    fid = check_function_id(function_id)
    task_type = parse_task_type(type)

    def register(func: F) -> F:
        _REGISTRY[fid] = TaskFunction(fid, task_type, func)  # re-running a cell replaces it
        return func

    return register


def registered_functions() -> dict[str, TaskFunction]:
    """The functions registered in this process, by function ID."""
    return dict(_REGISTRY)


# -- running jobs (the worker) -------------------------------------------------------------------


def store_result(home: NodeHome, value: Any) -> tuple[str, ResultKind]:
    """Store a function's return value in the node's store; its URI and kind.

    ``bytes`` are stored as they are, a ``pathlib.Path`` as a copy of the file, anything else
    must be a JSON value (stored as compact JSON with sorted keys).

    Raises:
        InvalidInput: the value is none of these (the message names what is not JSON).
        KacheryError: the store failed (disk full, file missing).
    """
    if isinstance(value, os.PathLike):
        path = Path(value)
        return str(home.files.store_path(path).uri(path.name)), ResultKind.FILE
    data, kind = _result_bytes(value)
    return str(home.files.store_bytes(data).uri()), kind


def _result_bytes(value: Any) -> tuple[bytes, ResultKind]:
    """A bytes or JSON result as the bytes its file holds.

    Raises:
        InvalidInput: the value is not JSON (the message names what is not).
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), ResultKind.BYTES
    check_json_value(value, "the result")
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8"), ResultKind.JSON


def describe_exception(exc: BaseException, function_id: str | None = None) -> str:
    """``ValueError: bad threshold (at sort.py:12 in spikesort)``: what a requester sees.

    The place is the innermost frame outside this module; an error raised by the call itself
    (a missing or unexpected argument) is placed at the call: ``(calling FUNCTION_ID)``.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    where = ""
    if frames:
        last = frames[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    elif function_id is not None:
        where = f" (calling {function_id})"
    return clip_error(f"{type(exc).__name__}: {exc}{where}")


def execute_job(
    home: NodeHome, function: TaskFunction, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Run one job and store its result; returns the report (``status``, and ``error`` or
    ``result_uri``, ``result_kind`` and for a small result ``result_data``) for
    ``task_backend_report``.

    A small result (at most INLINE_RESULT_BYTES) is not written to the store: its bytes go
    with the report (base64), and the daemon keeps them in the result's record, in the same
    transaction. A larger one, or a file, is stored and reported by its URI.
    """
    try:
        value = function.func(**kwargs)
    except BaseException as exc:  # SystemExit in a task must not silently end a worker thread
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"status": "error", "error": describe_exception(exc, function.function_id)}
    if function.task_type is TaskType.ACTION:
        return {"status": "finished"}
    try:
        result = _result_report(home, value)
    except KacheryError as exc:
        return {"status": "error", "error": f"its result could not be stored: {exc}"}
    return {"status": "finished", **result}


def _result_report(home: NodeHome, value: Any) -> dict[str, str]:
    """A job's result as its report gives it: stored (a file, or large), or small and inline."""
    if isinstance(value, os.PathLike):
        uri, kind = store_result(home, value)
        return {"result_uri": uri, "result_kind": str(kind)}
    data, kind = _result_bytes(value)
    if len(data) > INLINE_RESULT_BYTES:
        return {"result_uri": str(home.files.store_bytes(data).uri()), "result_kind": str(kind)}
    return {
        "result_uri": str(FileURI(sha1=hashlib.sha1(data).hexdigest())),
        "result_kind": str(kind),
        "result_data": base64.b64encode(data).decode("ascii"),
    }


class _Worker:
    """Threads that run jobs, and one that reports them to the daemon: the reports of jobs
    that end while a report is on its way go together in the next call."""

    def __init__(self, home: NodeHome, functions: dict[str, TaskFunction], slots: int) -> None:
        self.home = home
        self.functions = functions
        self.client = DaemonClient(home.path)
        self.jobs: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.reports: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        # Daemon threads: a task that never returns cannot keep the worker from exiting.
        for i in range(slots):
            threading.Thread(target=self._work, name=f"kachery-task-{i}", daemon=True).start()
        threading.Thread(target=self._report, name="kachery-task-reports", daemon=True).start()

    def _work(self) -> None:
        while True:
            backend_id, job = self.jobs.get()
            function = self.functions[job["functionId"]]
            started = time.perf_counter()
            report = execute_job(self.home, function, job.get("kwargs") or {})
            log.info(
                "%s %s in %.3f s%s",
                function.function_id,
                report["status"],
                time.perf_counter() - started,
                f": {report['error']}" if report.get("error") else "",
            )
            self.reports.put((backend_id, {"job_id": job["jobId"], **report}))

    def _report(self) -> None:
        while True:
            batch = [self.reports.get()]
            while len(batch) < REPORTS_PER_CALL:
                try:
                    batch.append(self.reports.get_nowait())
                except queue.Empty:
                    break
            by_backend: dict[str, list[dict[str, Any]]] = {}
            for backend_id, report in batch:
                by_backend.setdefault(backend_id, []).append(report)
            for backend_id, reports in by_backend.items():
                try:
                    answers = self.client.call(
                        "task_backend_reports", backend_id=backend_id, reports=reports
                    )
                except KacheryError as exc:
                    log.warning("could not report %d jobs: %s", len(reports), exc)
                    continue
                for answer in answers:
                    error = answer.get("error")
                    if error is None:
                        continue
                    if error.get("type") == "NotFound":
                        log.info("job %s was handed back before it finished", answer["jobId"])
                    else:
                        log.warning("could not report job %s: %s", answer["jobId"], error)

    def serve(
        self, channels: list[str] | None, slots: int, on_ready: Callable[[dict[str, Any]], None]
    ) -> None:
        """One connection to the daemon: register, then queue each job it sends."""
        listed = [
            {"functionId": f.function_id, "type": str(f.task_type)} for f in self.functions.values()
        ]
        with self.client.stream(
            "task_backend_listen", functions=listed, channels=channels, slots=slots
        ) as events:
            backend_id = ""
            for event in events:
                if event.get("event") == "registered":
                    backend_id = str(event["backendId"])
                    on_ready(event)
                elif event.get("event") == "job" and event.get("functionId") in self.functions:
                    self.jobs.put((backend_id, event))


def run_task_backend(
    channels: list[str] | None = None,
    *,
    functions: Iterable[str] | None = None,
    slots: int = DEFAULT_SLOTS,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
    reconnect: bool = True,
) -> None:
    """Serve the registered task functions through this node until Ctrl-C (kachery-client's
    ``run_task_backend``).

    Args:
        channels: channel names to serve in (default: every channel where the node has
            ``provideTasks``).
        functions: the function IDs to serve (default: every registered one).
        slots: jobs run at once, each in a thread of this process.
        on_ready: called with the daemon's ``registered`` event each time it (re)connects.
        reconnect: if the daemon goes away, wait and register again (else raise).

    Raises:
        InvalidInput: nothing to serve, or an unknown function ID.
        NotPermitted: the node lacks provideTasks (in ``channels``).
        DaemonNotRunning: no daemon runs for the node home (and ``reconnect`` is off).
    """
    if logging.getLogger().handlers == [] and not log.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
        )
    chosen = _chosen(functions)
    if not 1 <= slots <= 256:
        raise InvalidInput("slots must be 1..256")
    worker = _Worker(NodeHome.open(default_home()), chosen, slots)

    def ready(event: dict[str, Any]) -> None:
        where = ", ".join(event.get("channels") or []) or "every channel with provideTasks"
        log.info("serving %s in %s", ", ".join(chosen), where)
        if on_ready is not None:
            on_ready(event)

    delay = RECONNECT_SECONDS
    try:
        while True:
            try:
                worker.serve(channels, slots, ready)
                delay = RECONNECT_SECONDS
                problem = "the daemon ended the worker's stream"
            except (InvalidInput, NotPermitted, NotFound):
                raise
            except NodeError as exc:
                if not reconnect:
                    raise
                problem = str(exc)
            log.warning("%s; registering again in %.0f s", problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)
    except KeyboardInterrupt:
        log.info("stopped")


def _chosen(functions: Iterable[str] | None) -> dict[str, TaskFunction]:
    if functions is None:
        chosen = dict(_REGISTRY)
    else:
        chosen = {}
        for fid in functions:
            if fid not in _REGISTRY:
                raise InvalidInput(f"no task function {fid!r} is registered in this process")
            chosen[fid] = _REGISTRY[fid]
    if not chosen:
        raise InvalidInput("no task functions to serve: decorate them with @kn.taskfunction")
    return chosen


# -- requesting ----------------------------------------------------------------------------------


def _client() -> DaemonClient:
    return DaemonClient(default_home())


def request_task(
    function_id: str,
    kwargs: dict[str, Any] | None = None,
    *,
    type: str = "pure-calculation",
    channel: str | None = None,
    timeout: float | None = None,
    request_id: str | None = None,
) -> TaskHandle:
    """Ask the channel to run a task; returns at once with a handle (finished already if the
    result of a pure calculation is cached on this node).

    Args:
        function_id: the function, as its provider registered it.
        kwargs: its JSON keyword arguments.
        type: ``"pure-calculation"``, ``"query"`` or ``"action"`` (as registered).
        channel: where to ask (default: every channel where this node has requestTasks).
        timeout: seconds the request may take before it fails (a query then returns its last
            result, marked ``fallback``); by default an hour, 30 s and 5 minutes per type.
        request_id: this request's ID; pass the same one to retry an action safely (it runs at
            most once per request ID).

    Raises:
        InvalidInput: the arguments are not JSON, or another part is malformed.
        NotPermitted: this node lacks requestTasks.
        DaemonNotRunning: no daemon runs for the node home.
    """
    check_function_id(function_id)
    args = check_kwargs({} if kwargs is None else kwargs)
    task_type = parse_task_type(type)
    if request_id is not None:
        check_request_id(request_id)
    state = _client().call(
        "task_request",
        function_id=function_id,
        kwargs=args,
        task_type=str(task_type),
        channel=channel,
        timeout_seconds=timeout,
        request_id=request_id,
    )
    return TaskHandle(state)


class TaskHandle:
    """A task request made through this node: its state, and its result once finished."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = dict(state)
        self._value: Any = None
        self._loaded = False

    @property
    def request_id(self) -> str:
        return str(self._state["requestId"])

    @property
    def task_id(self) -> str:
        """kachery's task ID (the same for the same function and arguments)."""
        return str(self._state["taskId"])

    @property
    def function_id(self) -> str:
        return str(self._state["functionId"])

    @property
    def state(self) -> dict[str, Any]:
        """Everything the daemon said about the request last time it was asked."""
        return dict(self._state)

    def refresh(self) -> dict[str, Any]:
        """Ask the daemon for the current state."""
        if not self._terminal:
            self._state.update(_client().call("task_status", task=self.request_id))
        return self.state

    @property
    def _terminal(self) -> bool:
        return TaskStatus(self._state["status"]).terminal

    @property
    def status(self) -> str:
        """``waiting``, ``pending``, ``queued``, ``running``, ``finished`` or ``error`` (asks the
        daemon unless the request has ended)."""
        return str(self.refresh()["status"])

    @property
    def error(self) -> str | None:
        return self._state.get("error")

    @property
    def fallback(self) -> bool:
        """A query's result that is the last one held, because no provider answered in time."""
        return bool(self._state.get("fallback"))

    @property
    def cached(self) -> bool:
        """The result was found in a cache (this node's or another member's): nothing ran."""
        return bool(self._state.get("cached"))

    @property
    def result_uri(self) -> str | None:
        return self._state.get("resultUri")

    def wait(self, timeout: float | None = None) -> Any:
        """Wait until the request ends; returns ``result``.

        Args:
            timeout: seconds to wait (default: until the request's own timeout ends it).

        Raises:
            TaskFailed: the task ended with an error (the message says why).
            Unavailable: it was still going after ``timeout`` seconds.
        """
        if not self._terminal:
            client = _client()
            if timeout is None:
                client.timeout = None  # the daemon answers when the request ends
            outcome = client.call(
                "task_outcome", request_id=self.request_id, within_seconds=timeout
            )
            self._state.update(outcome)
        if not self._terminal:
            raise Unavailable(
                f"task {self.function_id} is still {self._state['status']} after {timeout} s"
            )
        return self.result

    @property
    def result(self) -> Any:
        """The result: a JSON value, ``bytes``, or for a returned file its URI; None for an
        action (which only succeeds or fails).

        Raises:
            TaskFailed: the task ended with an error.
            NodeError: it has not finished yet (call ``wait``).
        """
        status = TaskStatus(self._state["status"])
        if status is TaskStatus.ERROR:
            raise TaskFailed(f"task {self.function_id} failed: {self.error}")
        if status is not TaskStatus.FINISHED:
            raise NodeError(f"task {self.function_id} is {status}, not finished: call wait()")
        if not self._loaded:
            self._value = load_result(
                self._state.get("resultUri"),
                self._state.get("resultKind"),
                self._state.get("resultData"),
            )
            self._loaded = True
        return self._value

    def __repr__(self) -> str:
        return f"TaskHandle({self.function_id}, {self._state['status']}, {self.request_id})"


def load_result(uri: str | None, kind: str | None, data: str | None = None) -> Any:
    """A finished request's value (a returned file stays a URI): from ``data``, the bytes of a
    small result as the daemon's answer carries them (base64), else from its file in this node's
    store. A result stored as a blob is found by its path, with no database query.

    Raises:
        NotFound: the result file is no longer in the store.
        NodeError: ``data`` does not match the URI's SHA-1 (never returned as the value).
    """
    if uri is None or kind is None:
        return None
    if kind == ResultKind.FILE:
        return uri
    parsed = parse_file_uri(uri)
    if data is not None:
        raw = base64.b64decode(data, validate=True)
        if not is_inline_result(raw, parsed.sha1):
            raise NodeError(f"the daemon's copy of the result {uri} does not match its hash")
    else:
        home = NodeHome.shared()
        located = home.stored_blob(parsed) or home.files.locate(parsed)
        if located is None:
            raise NotFound(f"the result {uri} is no longer in this node's store")
        path, start, end = located
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
    return json.loads(raw) if kind == ResultKind.JSON else raw


__all__ = [
    "TaskFailed",
    "TaskFunction",
    "TaskHandle",
    "registered_functions",
    "request_task",
    "run_task_backend",
    "taskfunction",
]
